//! A template's network namespace is always the restore's to give.
//!
//! How CRIU restores a network namespace depends on how the source was dumped: a container
//! with its own namespace gets a new one (a namespace path in the restoring bundle is
//! silently ignored); one that joined a namespace other than CRIU's was dumped as external
//! and needs that namespace's descriptor (a bundle without a path fails); one that shared
//! CRIU's own namespace stays in whatever namespace the restoring CRIU runs in. A template
//! is restored into bundles of both kinds — a pooled sandbox's (joined) and a fresh one's
//! (own) — so the build rewrites every case into the last one, and the restore starts CRIU
//! in the namespace the bundle asks for (`trenv restore`).
//!
//! Not the external case, although it looks made for this: CRIU then counts the namespace
//! as one of the tree's and, at the end of every restore, spends ~60 ms here on it (with or
//! without network locking), against under 1 ms when the tree shares CRIU's namespace.

use std::path::Path;

use trenv_criu::image::{Image, InventoryEntry, PstreeEntry, TaskKobjIdsEntry};

use crate::TemplateError;

/// Makes the root task's network namespace the one CRIU runs in at restore.
pub fn share_restorers(dir: &Path) -> Result<(), TemplateError> {
    let tree = Image::<PstreeEntry>::read(&dir.join("pstree.img"))?;
    let root = tree
        .entries
        .first()
        .ok_or_else(|| TemplateError::Unsupported("pstree.img has no task".into()))?
        .pid();
    let ids = Image::<TaskKobjIdsEntry>::read(&dir.join(format!("ids-{root}.img")))?;
    let net = ids.single()?.net_ns_id();
    let inv_path = dir.join("inventory.img");
    let mut inv = Image::<InventoryEntry>::read(&inv_path)?;
    let entry = inv
        .entries
        .first_mut()
        .ok_or_else(|| TemplateError::Unsupported("inventory.img is empty".into()))?;
    let Some(root_ids) = entry.root_ids.as_mut() else {
        return Err(TemplateError::Unsupported(
            "inventory.img records no namespaces of CRIU's own".into(),
        ));
    };
    if root_ids.net_ns_id() != net {
        // Other tasks of the tree in other network namespaces would still need theirs.
        for e in std::fs::read_dir(dir)
            .map_err(|e| TemplateError::io("listing", dir, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("ids-") && name.ends_with(".img") {
                for other in Image::<TaskKobjIdsEntry>::read(&e.path())?.entries {
                    if other.net_ns_id() != net {
                        return Err(TemplateError::Unsupported(
                            "processes in several network namespaces".into(),
                        ));
                    }
                }
            }
        }
        root_ids.set_net_ns_id(net);
        inv.write(&inv_path)?;
    }
    let netns = dir.join(format!("netns-{net}.img"));
    match std::fs::remove_file(&netns) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TemplateError::io("removing", &netns, e)),
    }
}
