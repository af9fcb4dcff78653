//! What a restore from a template adds to a plain CRIU restore: the checked image set (read,
//! never written: CRIU's log and statistics go to the work directory), the pool regions CRIU
//! inherits, the container's tmpfs mounts staged by trenv, and the options the template's
//! conversion implies. Shared by `trenv restore --template` and the shim's template starts.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use trenv_criu::restore::RestoreOptions;

use crate::store::{Prepared, Store};
use crate::tmpfs::{self, Staged};
use crate::TemplateError;

/// A template opened and staged for one restore. Dropping it unmounts the staged tmpfs
/// mounts and closes the regions: keep it until CRIU has returned.
#[derive(Debug)]
pub struct Restoring {
    prepared: Prepared,
    work: PathBuf,
    staged: Staged,
}

impl Restoring {
    /// Checks template `name` (seal, CRIU and kernel versions), opens its regions and stages
    /// its tmpfs mounts in `work` (created if needed).
    pub fn prepare(
        store: &Store,
        name: &str,
        criu_version: &str,
        work: &Path,
    ) -> Result<Self, TemplateError> {
        std::fs::create_dir_all(work).map_err(|e| TemplateError::io("creating", work, e))?;
        let prepared = store.prepare(name, criu_version)?;
        tracing::debug!("restore: template checked");
        let staged = tmpfs::stage(&prepared.images, &prepared.manifest.report.tmpfs, work)?;
        Ok(Self {
            prepared,
            work: work.to_path_buf(),
            staged,
        })
    }

    pub fn manifest(&self) -> &crate::Manifest {
        &self.prepared.manifest
    }

    /// Points `opts` at the template: its images, the work directory, the inherited regions,
    /// the staged mounts, CRIU in the bundle's network namespace, and cgroups left to trenv
    /// when the template's tree is flat (unless the caller chose a mode).
    pub fn apply(&self, opts: &mut RestoreOptions) {
        let report = &self.prepared.manifest.report;
        opts.image_path = self.prepared.images.clone();
        opts.work_path = Some(self.work.clone());
        opts.inherit.extend(
            self.prepared
                .inherit
                .iter()
                .map(|(k, f)| (k.clone(), f.as_raw_fd())),
        );
        opts.ext_mounts.extend(self.staged.ext_mounts());
        opts.net_from_criu = report.netns_shared;
        // A flat template's single cgroup is the container's, which trenv makes and runs
        // CRIU in: CRIU need not mount every hierarchy to re-create it.
        if opts.manage_cgroups_mode.is_none() && report.flat_cgroups {
            opts.manage_cgroups_mode = Some("ignore".into());
        }
        // Dedup would punch holes into the template's shared images.
        opts.auto_dedup = false;
        // A connection the template caught (the readiness probe's, its server side closing
        // while the dump ran) belongs to nobody in a new instance: it comes back closed.
        opts.tcp_close = true;
    }
}

/// Unmounts what restores killed half-way staged in the work directories under `parent`
/// (one level down) and in `parent` itself; what it removed.
pub fn sweep(parent: &Path) -> Vec<PathBuf> {
    let mut removed = tmpfs::sweep(parent);
    for d in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        if d.file_type().is_ok_and(|t| t.is_dir()) {
            removed.extend(tmpfs::sweep(&d.path()));
        }
    }
    removed
}
