//! Pools on real filesystems: a tmpfs the pool mounts itself, and a plain directory as a
//! DAX filesystem stands in for on hosts without PMem/CXL.

use std::os::unix::fs::{FileExt, MetadataExt};

use super::*;

struct TmpPool {
    pool: Option<FilePool>,
    _dir: tempfile::TempDir,
}

impl TmpPool {
    fn tmpfs(capacity: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pool = FilePool::tmpfs("test", &dir.path().join("pool"), capacity).unwrap();
        Self {
            pool: Some(pool),
            _dir: dir,
        }
    }

    fn get(&self) -> &FilePool {
        self.pool.as_ref().unwrap()
    }
}

impl Drop for TmpPool {
    fn drop(&mut self) {
        if let Some(p) = self.pool.take() {
            let dir = p.info().dir;
            p.destroy().unwrap();
            assert!(mount_at(&dir).is_none(), "tmpfs left mounted");
        }
    }
}

fn page(b: u8) -> Vec<u8> {
    vec![b; 4096]
}

#[test]
fn a_tmpfs_region_is_sparse_read_only_and_accounted() {
    let t = TmpPool::tmpfs(1 << 20);
    let pool = t.get();
    assert_eq!(mount_at(&pool.info().dir).unwrap().0, "tmpfs");
    let r = pool
        .create_region("tpl-1", 64 * 4096, 2 * 4096, &mut |w| {
            w.write_at(0, &page(1))?;
            w.write_at(40 * 4096, &page(2))
        })
        .unwrap();
    assert_eq!(r.size, 64 * 4096);
    let meta = r.file.metadata().unwrap();
    // Two pages hold data; the rest is a hole.
    assert_eq!(meta.blocks() * 512, 2 * 4096);
    assert_eq!(meta.mode() & 0o777, 0o444);
    let mut buf = page(0);
    r.file.read_exact_at(&mut buf, 40 * 4096).unwrap();
    assert_eq!(buf, page(2));
    r.file.read_exact_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, page(0));
    let u = pool.usage().unwrap();
    assert_eq!((u.used, u.regions), (2 * 4096, 1));
    assert_eq!(pool.regions().unwrap(), ["tpl-1"]);
    assert!(matches!(
        pool.create_region("tpl-1", 4096, 0, &mut |_| Ok(())),
        Err(PoolError::RegionExists { .. })
    ));
}

#[test]
fn a_full_pool_refuses_and_a_failed_fill_leaves_nothing() {
    let t = TmpPool::tmpfs(16 * 4096);
    let pool = t.get();
    pool.create_region("a", 8 * 4096, 8 * 4096, &mut |w| {
        (0..8).try_for_each(|i| w.write_at(i * 4096, &page(3)))
    })
    .unwrap();
    let e = pool
        .create_region("b", 16 * 4096, 9 * 4096, &mut |_| Ok(()))
        .unwrap_err();
    assert!(
        matches!(e, PoolError::Full { need, free, .. } if need == 9 * 4096 && free == 8 * 4096),
        "{e}"
    );
    let e = pool
        .create_region("c", 4 * 4096, 4096, &mut |w| w.write_at(4 * 4096, &page(1)))
        .unwrap_err();
    assert!(matches!(e, PoolError::OutOfRange { .. }), "{e}");
    assert_eq!(pool.regions().unwrap(), ["a"]);
    assert_eq!(pool.usage().unwrap().used, 8 * 4096);
}

#[test]
fn a_mapped_region_cannot_be_removed() {
    let t = TmpPool::tmpfs(1 << 20);
    let pool = t.get();
    let r = pool
        .create_region("mapped", 4096, 4096, &mut |w| w.write_at(0, &page(7)))
        .unwrap();
    let len = std::num::NonZeroUsize::new(4096).unwrap();
    // SAFETY: a private read-only mapping of a file nobody truncates during the test.
    let addr = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_PRIVATE,
            &r.file,
            0,
        )
    }
    .unwrap();
    let me = i32::try_from(std::process::id()).unwrap();
    match pool.remove_region("mapped") {
        Err(PoolError::InUse { pids, .. }) => assert!(pids.contains(&me), "{pids:?}"),
        other => panic!("removed while mapped: {other:?}"),
    }
    // SAFETY: the mapping made above.
    unsafe { nix::sys::mman::munmap(addr, 4096) }.unwrap();
    pool.remove_region("mapped").unwrap();
    assert!(matches!(
        pool.open_region("mapped"),
        Err(PoolError::NoRegion { .. })
    ));
}

#[test]
fn a_daxfs_pool_works_on_a_plain_directory() {
    let dir = tempfile::tempdir().unwrap();
    let pool = FilePool::daxfs("dax", dir.path(), 1 << 20).unwrap();
    assert_eq!(pool.info().kind, PoolKind::Daxfs);
    let r = pool
        .create_region("x", 3 * 4096, 4096, &mut |w| w.write_at(4096, &page(9)))
        .unwrap();
    let mut buf = page(0);
    r.file.read_exact_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, page(9));
    drop(r);
    pool.destroy().unwrap();
    assert!(
        dir.path().exists(),
        "a daxfs pool's directory belongs to the operator"
    );
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count(),
        0
    );
}

#[test]
fn bad_names_and_kinds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pool = FilePool::daxfs("dax", dir.path(), 1 << 20).unwrap();
    for bad in ["", ".hidden", "a/b", "../x"] {
        assert!(matches!(
            pool.create_region(bad, 4096, 0, &mut |_| Ok(())),
            Err(PoolError::Config(_))
        ));
    }
    assert!("ramfs".parse::<PoolKind>().is_err());
    assert_eq!("daxfs".parse::<PoolKind>().unwrap(), PoolKind::Daxfs);
    let e = FilePool::hugetlbfs("h", dir.path(), 1 << 20).unwrap_err();
    assert!(e.to_string().contains("not a hugetlbfs mount"), "{e}");
}
