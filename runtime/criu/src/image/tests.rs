//! Round trips on real images: a process dumped by the installed CRIU (4.2.1, from
//! `make setup`), read, decoded, encoded and written back byte for byte, and restored by
//! stock CRIU from the rewritten files.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::*;

/// VMA status bits (criu/include/image.h).
const VMA_AREA_REGULAR: u32 = 1 << 0;
const VMA_ANON_PRIVATE: u32 = 1 << 9;

struct Dumped {
    dir: tempfile::TempDir,
}

fn criu() -> Command {
    Command::new(std::env::var("TRENV_CRIU").unwrap_or_else(|_| "criu".into()))
}

/// Dumps a fresh single-process Python (no children, so its pid is free again once it is
/// reaped and CRIU can restore it under the same pid) holding 256 KiB of its own.
fn dump() -> Dumped {
    let mut child: Child = Command::new("setsid")
        .args([
            "python3",
            "-c",
            "import time\nx = bytearray(b'a') * 262144\ntime.sleep(1000)",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let dir = tempfile::tempdir().expect("tmp");
    let out = criu()
        .args(["dump", "--shell-job", "-t", &child.id().to_string(), "-D"])
        .arg(dir.path())
        .args(["-o", "dump.log"])
        .output()
        .expect("criu must be installed (make setup)");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "criu dump: {}",
        std::fs::read_to_string(dir.path().join("dump.log")).unwrap_or_default()
    );
    Dumped { dir }
}

fn images(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with(".img") && !n.starts_with("pages-")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_image_of_a_dump_reframes_byte_for_byte() {
    let d = dump();
    let all = images(d.dir.path());
    assert!(all.len() >= 8, "few images: {all:?}");
    for path in all {
        let bytes = std::fs::read(&path).unwrap();
        // Images with raw payloads after their entries are not for RawImage; a dump of a
        // shell has none, so every image must parse.
        let raw = RawImage::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(raw.to_bytes().unwrap(), bytes, "{}", path.display());
    }
}

#[test]
fn typed_images_decode_and_encode_to_the_same_bytes() {
    let d = dump();
    let dir = d.dir.path();
    let same = |name: &str, raw: RawImage| {
        let orig = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(
            raw.to_bytes().unwrap(),
            orig,
            "{name} changed in a round trip"
        );
    };
    let inv = Image::<InventoryEntry>::read(&dir.join("inventory.img")).unwrap();
    assert_eq!(inv.header, Header::Single(magic::INVENTORY));
    assert!(inv.single().unwrap().img_version() >= 2);
    same("inventory.img", inv.to_raw().unwrap());

    let tree = Image::<PstreeEntry>::read(&dir.join("pstree.img")).unwrap();
    assert_eq!(tree.header, Header::common(magic::PSTREE));
    assert_eq!(tree.entries.len(), 1);
    same("pstree.img", tree.to_raw().unwrap());
    let root = tree.entries[0].pid();

    let mm = Image::<MmEntry>::read(&dir.join(format!("mm-{root}.img"))).unwrap();
    assert_eq!(mm.header, Header::common(magic::MM));
    let vmas = &mm.single().unwrap().vmas;
    let anon = vmas
        .iter()
        .filter(|v| {
            v.status() & (VMA_AREA_REGULAR | VMA_ANON_PRIVATE)
                == VMA_AREA_REGULAR | VMA_ANON_PRIVATE
        })
        .count();
    assert!(anon > 0, "no private anonymous VMA among {}", vmas.len());
    same(&format!("mm-{root}.img"), mm.to_raw().unwrap());

    let pm = Pagemap::read(&dir.join(format!("pagemap-{root}.img"))).unwrap();
    let present: u64 = pm
        .entries
        .iter()
        .filter(|e| entry_present(e))
        .map(entry_pages)
        .sum();
    let pages = std::fs::metadata(dir.join(format!("pages-{}.img", pm.head.pages_id())))
        .unwrap()
        .len();
    // The pages image holds exactly the present runs.
    assert_eq!(present * 4096, pages);
    // The 256 KiB bytearray is in there.
    assert!(present >= 64, "{present} pages");
    let tmp = dir.join("pagemap-copy.img");
    pm.write(&tmp).unwrap();
    assert_eq!(
        std::fs::read(&tmp).unwrap(),
        std::fs::read(dir.join(format!("pagemap-{root}.img"))).unwrap()
    );
    std::fs::remove_file(&tmp).unwrap();

    let files = Image::<FileEntry>::read(&dir.join("files.img")).unwrap();
    assert!(files
        .entries
        .iter()
        .any(|f| f.type_() == FdTypes::REG && f.reg.name().contains("python3")));
    same("files.img", files.to_raw().unwrap());
}

#[test]
fn fields_this_code_does_not_know_survive_a_rewrite() {
    let mut e = PagemapHead::new();
    e.set_pages_id(7);
    let mut bytes = e.write_to_bytes().unwrap();
    // Field 99, varint 42: what a newer CRIU might add.
    bytes.extend_from_slice(&[0x98, 0x06, 42]);
    let raw = RawImage {
        header: Header::common(magic::PAGEMAP),
        entries: vec![bytes.clone()],
    };
    let decoded = Image::<PagemapHead>::from_raw(&raw).unwrap();
    assert_eq!(decoded.entries[0].pages_id(), 7);
    assert_eq!(decoded.to_raw().unwrap().entries[0], bytes);
}

#[test]
fn broken_images_are_refused_with_reasons() {
    let err = |b: &[u8]| RawImage::parse(b).unwrap_err().to_string();
    assert!(err(&[1, 2]).contains("shorter than its magic"));
    assert!(err(&0xdead_beef_u32.to_le_bytes()).contains("unknown magic"));
    let mut b = Vec::new();
    b.extend_from_slice(&magic::IMG_COMMON.to_le_bytes());
    b.extend_from_slice(&magic::MM.to_le_bytes());
    b.extend_from_slice(&100u32.to_le_bytes());
    b.extend_from_slice(&[0; 10]);
    assert!(err(&b).contains("past the end"));
    let mut b = Vec::new();
    b.extend_from_slice(&magic::IMG_COMMON.to_le_bytes());
    b.extend_from_slice(&magic::MM.to_le_bytes());
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&[0xff, 0xff, 0xff]);
    let raw = RawImage::parse(&b).unwrap();
    let e = Image::<MmEntry>::from_raw(&raw).unwrap_err();
    assert!(matches!(e, ImageError::Decode { .. }), "{e}");
}

/// Stock CRIU restores a dump whose protobuf images were all decoded and written back by
/// this code.
#[test]
fn criu_restores_images_written_by_this_code() {
    let d = dump();
    let dir = d.dir.path();
    let tree = Image::<PstreeEntry>::read(&dir.join("pstree.img")).unwrap();
    tree.write(&dir.join("pstree.img")).unwrap();
    for e in &tree.entries {
        let mm = dir.join(format!("mm-{}.img", e.pid()));
        Image::<MmEntry>::read(&mm).unwrap().write(&mm).unwrap();
        let pm = dir.join(format!("pagemap-{}.img", e.pid()));
        Pagemap::read(&pm).unwrap().write(&pm).unwrap();
    }
    let files = dir.join("files.img");
    Image::<FileEntry>::read(&files)
        .unwrap()
        .write(&files)
        .unwrap();
    let inv = dir.join("inventory.img");
    Image::<InventoryEntry>::read(&inv)
        .unwrap()
        .write(&inv)
        .unwrap();
    let pidfile = dir.join("restored.pid");
    let out = criu()
        .args(["restore", "--shell-job", "-d", "-D"])
        .arg(dir)
        .args(["-o", "restore.log", "--pidfile"])
        .arg(&pidfile)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "criu restore: {}",
        std::fs::read_to_string(dir.join("restore.log")).unwrap_or_default()
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(alive, "restored process {pid} is not running");
}
