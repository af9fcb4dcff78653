//! Bad input: every case gives a clear error, a non-zero exit, and leaves nothing behind.

use std::path::Path;
use std::time::Duration;

use trenv_integration::bundle::Bundle;
use trenv_integration::leaks::{assert_container_gone, processes_with};
use trenv_integration::runtime::Runtime;
use trenv_integration::{require_root, unique_id, wait_for};

fn assert_nothing_left(rt: &Runtime, id: &str) {
    assert_container_gone(rt, id);
    assert!(processes_with(id).is_empty(), "processes of {id} left");
}

#[test]
fn malformed_config_json() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("badcfg");
    let b = Bundle::new(&id, &["true"]);
    std::fs::write(
        b.path().join("config.json"),
        b"{\"ociVersion\": \"1.0.2\", \"process\": [",
    )
    .expect("write");
    for cmd in ["create", "run"] {
        let e = rt.fail(&[cmd, "--bundle", &b.path().to_string_lossy(), &id]);
        assert!(e.contains("config.json"), "{cmd}: {e}");
        assert_nothing_left(&rt, &id);
    }
    // Well-formed JSON that is not a spec.
    std::fs::write(b.path().join("config.json"), b"[1, 2, 3]").expect("write");
    let e = rt.fail(&["create", "--bundle", &b.path().to_string_lossy(), &id]);
    assert!(e.contains("config.json"), "{e}");
    assert_nothing_left(&rt, &id);
}

#[test]
fn missing_rootfs() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("norootfs");
    let b = Bundle::new(&id, &["true"]);
    std::fs::remove_dir_all(b.rootfs()).expect("rm");
    let e = rt.fail(&["create", "--bundle", &b.path().to_string_lossy(), &id]);
    assert!(e.contains("rootfs"), "{e}");
    assert_nothing_left(&rt, &id);
}

#[test]
fn missing_bundle_and_config() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("nobundle");
    let e = rt.fail(&["create", "--bundle", "/nonexistent/trenv-it-bundle", &id]);
    assert!(e.contains("/nonexistent/trenv-it-bundle"), "{e}");
    let dir = tempfile::tempdir().expect("tmp");
    let e = rt.fail(&["create", "--bundle", &dir.path().to_string_lossy(), &id]);
    assert!(e.contains("config.json not found"), "{e}");
    assert_nothing_left(&rt, &id);
}

#[test]
fn duplicate_id_keeps_the_first_container() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("dup");
    let b = Bundle::new(&id, &["sleep", "1000"]);
    let bundle = b.path().to_string_lossy().into_owned();
    rt.detached(&["run", "--detach", "--bundle", &bundle, &id]);
    let pid = rt.state(&id)["pid"].clone();
    for cmd in ["create", "run"] {
        let e = rt.fail(&[cmd, "--bundle", &bundle, &id]);
        assert!(e.contains("already exists"), "{e}");
    }
    let images = tempfile::Builder::new()
        .prefix("trenv-it-img-")
        .tempdir()
        .expect("tmp");
    rt.ok(&[
        "checkpoint",
        "--leave-running",
        "--image-path",
        &images.path().to_string_lossy(),
        &id,
    ]);
    let e = restore_fails(
        &rt,
        &[],
        &[],
        &images.path().to_string_lossy(),
        &bundle,
        &id,
    );
    assert!(e.contains("already exists"), "{e}");
    // The first one is untouched.
    assert_eq!(rt.status(&id), "running");
    assert_eq!(rt.state(&id)["pid"], pid);
    rt.ok(&["delete", "--force", &id]);
    assert_nothing_left(&rt, &id);
}

#[test]
fn unknown_and_invalid_ids() {
    require_root();
    let rt = Runtime::trenv();
    for args in [
        vec!["state", "trenv-it-nope"],
        vec!["start", "trenv-it-nope"],
        vec!["kill", "trenv-it-nope", "KILL"],
        vec!["delete", "trenv-it-nope"],
        vec!["pause", "trenv-it-nope"],
        vec!["ps", "trenv-it-nope"],
        vec!["exec", "trenv-it-nope", "true"],
        vec!["checkpoint", "trenv-it-nope"],
    ] {
        let e = rt.fail(&args);
        assert!(e.contains("does not exist"), "{args:?}: {e}");
    }
    // delete --force of a missing container succeeds, as with runc.
    rt.ok(&["delete", "--force", "trenv-it-nope"]);
    let e = rt.fail(&["state", "../etc"]);
    assert!(e.contains("invalid container id"), "{e}");
    let e = rt.fail(&["kill", "trenv-it-x", "NOTASIGNAL"]);
    assert!(e.contains("does not exist") || e.contains("signal"), "{e}");
}

#[test]
fn invalid_signal_and_states() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("sig");
    let b = Bundle::new(&id, &["sleep", "1000"]);
    rt.detached(&["create", "--bundle", &b.path().to_string_lossy(), &id]);
    let e = rt.fail(&["kill", &id, "NOTASIGNAL"]);
    assert!(e.contains("invalid signal"), "{e}");
    // A created (not started) container cannot be checkpointed or paused.
    let e = rt.fail(&["checkpoint", "--image-path", "/tmp/trenv-it-never", &id]);
    assert!(e.contains("only a running or paused container"), "{e}");
    assert!(!Path::new("/tmp/trenv-it-never").exists());
    rt.fail(&["pause", &id]);
    rt.ok(&["delete", "--force", &id]);
    assert_nothing_left(&rt, &id);
}

/// A checkpoint of a counter, for the restore failure cases.
/// `trenv [global] restore -d [extra] --image-path IMG --bundle BUNDLE ID`, which must fail;
/// returns its output.
fn restore_fails(
    rt: &Runtime,
    global: &[&str],
    extra: &[&str],
    image_path: &str,
    bundle: &str,
    id: &str,
) -> String {
    let mut args = global.to_vec();
    args.extend_from_slice(&["restore", "-d"]);
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--image-path", image_path, "--bundle", bundle, id]);
    rt.fail(&args)
}

fn checkpoint(rt: &Runtime, id: &str) -> (Bundle, tempfile::TempDir) {
    let b = Bundle::new(id, &["sh", "-c", "while true; do sleep 0.05; done"]);
    rt.detached(&[
        "run",
        "--detach",
        "--bundle",
        &b.path().to_string_lossy(),
        id,
    ]);
    let images = tempfile::Builder::new()
        .prefix("trenv-it-img-")
        .tempdir()
        .expect("tmp");
    rt.ok(&[
        "checkpoint",
        "--image-path",
        &images.path().to_string_lossy(),
        id,
    ]);
    assert_nothing_left(rt, id);
    (b, images)
}

#[test]
fn restore_from_missing_or_empty_image_dir() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("noimg");
    let b = Bundle::new(&id, &["true"]);
    let bundle = b.path().to_string_lossy().into_owned();
    let e = restore_fails(&rt, &[], &[], "/nonexistent/trenv-it-img", &bundle, &id);
    assert!(e.contains("/nonexistent/trenv-it-img"), "{e}");
    assert_nothing_left(&rt, &id);
    let empty = tempfile::tempdir().expect("tmp");
    let e = restore_fails(&rt, &[], &[], &empty.path().to_string_lossy(), &bundle, &id);
    assert!(e.contains("not a CRIU checkpoint"), "{e}");
    assert_nothing_left(&rt, &id);
}

#[test]
fn restore_from_truncated_images_fails_cleanly() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("trunc");
    let (b, images) = checkpoint(&rt, &id);
    // Truncate every core image: CRIU cannot rebuild the task.
    for e in std::fs::read_dir(images.path()).expect("read").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("core-") || name.starts_with("pagemap-") {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(e.path())
                .expect("open");
            f.set_len(3).expect("truncate");
        }
    }
    let e = restore_fails(
        &rt,
        &[],
        &[],
        &images.path().to_string_lossy(),
        &b.path().to_string_lossy(),
        &id,
    );
    assert!(
        e.contains("criu restore failed") || e.contains("CRIU"),
        "{e}"
    );
    assert!(
        e.contains("restore.log"),
        "error does not point at the CRIU log: {e}"
    );
    assert_nothing_left(&rt, &id);
}

#[test]
fn restore_with_missing_bundle_or_rootfs() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("rsbundle");
    let (b, images) = checkpoint(&rt, &id);
    let img = images.path().to_string_lossy().into_owned();
    let e = restore_fails(&rt, &[], &[], &img, "/nonexistent/trenv-it-b", &id);
    assert!(e.contains("/nonexistent/trenv-it-b"), "{e}");
    assert_nothing_left(&rt, &id);
    std::fs::remove_dir_all(b.rootfs()).expect("rm");
    let e = restore_fails(&rt, &[], &[], &img, &b.path().to_string_lossy(), &id);
    assert!(e.contains("rootfs"), "{e}");
    assert_nothing_left(&rt, &id);
}

#[test]
fn restore_with_bad_options() {
    require_root();
    let rt = Runtime::trenv();
    let id = unique_id("rsopt");
    let (b, images) = checkpoint(&rt, &id);
    let img = images.path().to_string_lossy().into_owned();
    let bundle = b.path().to_string_lossy().into_owned();
    let e = restore_fails(
        &rt,
        &[],
        &["--manage-cgroups-mode", "bogus"],
        &img,
        &bundle,
        &id,
    );
    assert!(e.contains("manage-cgroups-mode"), "{e}");
    assert_nothing_left(&rt, &id);
    // A criu that does not exist.
    let e = restore_fails(
        &rt,
        &["--criu", "/nonexistent/criu"],
        &[],
        &img,
        &bundle,
        &id,
    );
    assert!(e.contains("/nonexistent/criu"), "{e}");
    assert_nothing_left(&rt, &id);
    // After all that, the images still restore.
    rt.detached(&[
        "restore",
        "-d",
        "--image-path",
        &img,
        "--bundle",
        &bundle,
        &id,
    ]);
    assert_eq!(rt.status(&id), "running");
    rt.ok(&["delete", "--force", &id]);
    let gone = wait_for(Duration::from_secs(5), || {
        processes_with(&id).is_empty().then_some(())
    });
    assert!(gone.is_some());
    assert_nothing_left(&rt, &id);
}
