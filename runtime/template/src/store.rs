//! The template store: one directory per key, names pointing at keys.
//!
//! ```text
//! <root>/by-key/<key>/images/         the converted CRIU image set (read-only by convention)
//! <root>/by-key/<key>/manifest.json   key, names, versions, pool regions, digests, report
//! <root>/by-key/<key>/seal.json       stat fingerprints of every file, taken after a full
//!                                     verification; checked (cheaply) before every use
//! <root>/names/<name>                 symlink to ../by-key/<key>
//! <root>/locks/<key>                  flock: one build (or removal) per key at a time
//! ```
//!
//! A build works in `by-key/.<key>.build-<pid>` and renames it into place, so a template is
//! either complete or absent; leftovers of a crashed build go with `gc`.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use trenv_mempool::pseudo_mm::{self, PseudoMm};
use trenv_mempool::{MemoryPool, PoolError, PoolInfo};

use crate::convert::{self, RegionRef, Report};
use crate::{valid_name, TemplateError};

const MANIFEST: &str = "manifest.json";
const SEAL: &str = "seal.json";
const IMAGES: &str = "images";
const MANIFEST_VERSION: u32 = 1;

/// What a template is, recorded when it is built.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub key: String,
    pub created: String,
    /// CRIU and kernel the image set was dumped and converted with; a restore elsewhere is
    /// refused as stale.
    pub criu: String,
    pub kernel: String,
    pub pool: PoolInfo,
    pub regions: Vec<RegionRef>,
    /// SHA-256 of every image file, by name.
    pub images: std::collections::BTreeMap<String, String>,
    /// SHA-256 of every region file, by region name.
    pub region_digests: std::collections::BTreeMap<String, String>,
    pub report: Report,
}

/// A listed template.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub key: String,
    pub names: Vec<String>,
    pub created: String,
    pub criu: String,
    pub pool: String,
    /// Bytes of page data in the pool.
    pub pool_bytes: u64,
    /// Bytes of page data left in the image set.
    pub image_bytes: u64,
    /// Processes that map the template's memory: its running instances.
    pub instances: Vec<i32>,
}

/// What a restore from a template needs.
#[derive(Debug)]
pub struct Prepared {
    /// The template's image directory. CRIU only reads it during a restore (its log and
    /// statistics go to the work directory, which must be given); options that write to
    /// images (`--auto-dedup`) must not be used with it.
    pub images: PathBuf,
    /// Region files to hand to CRIU with `--inherit-fd`, under the key CRIU looks for (the
    /// file's path without its leading '/').
    pub inherit: Vec<(String, File)>,
    pub manifest: Manifest,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Fingerprint {
    path: PathBuf,
    size: u64,
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

fn fingerprint(path: &Path) -> std::io::Result<Fingerprint> {
    let m = std::fs::metadata(path)?;
    Ok(Fingerprint {
        path: path.to_path_buf(),
        size: m.len(),
        ino: m.ino(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
    })
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The running kernel's release.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Templates under one root directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    pub fn open(root: &Path) -> Result<Self, TemplateError> {
        for d in ["by-key", "names", "locks"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| TemplateError::io("creating", &p, e))?;
        }
        Ok(Self { root: root.into() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn key_dir(&self, key: &str) -> PathBuf {
        self.root.join("by-key").join(key)
    }

    fn lock(&self, key: &str) -> Result<nix::fcntl::Flock<File>, TemplateError> {
        let path = self.root.join("locks").join(key);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| TemplateError::io("opening lock", &path, e))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| TemplateError::io("locking", &path, e.into()))
    }

    /// The key a name points at.
    pub fn resolve(&self, name: &str) -> Result<String, TemplateError> {
        if !valid_name(name) {
            return Err(TemplateError::InvalidName(name.into()));
        }
        let link = self.root.join("names").join(name);
        let target = std::fs::read_link(&link).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TemplateError::Missing(name.into()),
            _ => TemplateError::io("reading", &link, e),
        })?;
        let key = target
            .file_name()
            .map(|k| k.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !self.key_dir(&key).join(MANIFEST).exists() {
            return Err(TemplateError::Missing(name.into()));
        }
        Ok(key)
    }

    fn read_manifest(&self, key: &str, name: &str) -> Result<Manifest, TemplateError> {
        let path = self.key_dir(key).join(MANIFEST);
        let text = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TemplateError::Missing(name.into()),
            _ => TemplateError::io("reading", &path, e),
        })?;
        serde_json::from_slice(&text).map_err(|e| TemplateError::Corrupt {
            name: name.into(),
            detail: format!("{}: {e}", path.display()),
        })
    }

    pub fn manifest(&self, name: &str) -> Result<Manifest, TemplateError> {
        let key = self.resolve(name)?;
        self.read_manifest(&key, name)
    }

    /// Names pointing at `key`.
    fn names_of(&self, key: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("names"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read_link(e.path())
                            .ok()
                            .and_then(|t| t.file_name().map(|k| k == key))
                            .unwrap_or(false)
                    })
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn set_name(&self, name: &str, key: &str) -> Result<(), TemplateError> {
        let link = self.root.join("names").join(name);
        let tmp = self.root.join("names").join(format!(".{name}.new"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(PathBuf::from("../by-key").join(key), &tmp)
            .map_err(|e| TemplateError::io("linking", &tmp, e))?;
        std::fs::rename(&tmp, &link).map_err(|e| TemplateError::io("naming", &link, e))
    }

    /// Builds the template `name` from the CRIU image set in `from` (left untouched), with
    /// its memory in `pool`. `key` identifies the instance state (see [`crate::key`]); by
    /// default the image set's own digest. One build per key runs at a time; a build that
    /// finds the key built already only adds the name. Returns the manifest and whether
    /// this call built it.
    pub fn build(
        &self,
        from: &Path,
        name: &str,
        key: Option<String>,
        pool: &dyn MemoryPool,
        criu: &str,
    ) -> Result<(Manifest, bool), TemplateError> {
        self.build_with(from, name, key, pool, criu, convert::Mapping::File)
    }

    /// [`Store::build`], with the template's VMAs mapping their regions as `mapping` says.
    pub fn build_with(
        &self,
        from: &Path,
        name: &str,
        key: Option<String>,
        pool: &dyn MemoryPool,
        criu: &str,
        mapping: convert::Mapping<'_>,
    ) -> Result<(Manifest, bool), TemplateError> {
        if !valid_name(name) {
            return Err(TemplateError::InvalidName(name.into()));
        }
        let sources = image_files(from)?;
        if !sources.iter().any(|p| p.ends_with("inventory.img")) {
            return Err(TemplateError::Unsupported(format!(
                "{} is not a CRIU image directory (no inventory.img)",
                from.display()
            )));
        }
        let key = match key {
            Some(k) => k,
            None => {
                let mut d = Vec::new();
                for p in &sources {
                    let n = p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    d.push((
                        n,
                        sha256_file(p).map_err(|e| TemplateError::io("reading", p, e))?,
                    ));
                }
                crate::key::of_images(&d)
            }
        };
        let _lock = self.lock(&key)?;
        if self.key_dir(&key).join(MANIFEST).exists() {
            self.set_name(name, &key)?;
            return Ok((self.read_manifest(&key, name)?, false));
        }
        let work = self
            .root
            .join("by-key")
            .join(format!(".{key}.build-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let images = work.join(IMAGES);
        std::fs::create_dir_all(&images).map_err(|e| TemplateError::io("creating", &images, e))?;
        let built = (|| {
            for p in &sources {
                let to = images.join(p.file_name().unwrap_or_default());
                std::fs::copy(p, &to).map_err(|e| TemplateError::io("copying", p, e))?;
            }
            // Regions of this key are left only by a build that died half-way.
            let prefix = &key[..16.min(key.len())];
            for r in pool.regions()? {
                if r.starts_with(&format!("{prefix}-")) {
                    pool.remove_region(&r)?;
                }
            }
            let report = convert::convert_with(&images, pool, prefix, mapping)?;
            let regions_made: Vec<String> = report.regions.iter().map(|r| r.name.clone()).collect();
            let finish = (|| {
                let mut digests = std::collections::BTreeMap::new();
                for p in image_files(&images)? {
                    let n = p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    digests.insert(
                        n,
                        sha256_file(&p).map_err(|e| TemplateError::io("reading", &p, e))?,
                    );
                }
                let mut region_digests = std::collections::BTreeMap::new();
                for r in &report.regions {
                    region_digests.insert(
                        r.name.clone(),
                        sha256_file(&r.path)
                            .map_err(|e| TemplateError::io("reading", &r.path, e))?,
                    );
                }
                let manifest = Manifest {
                    version: MANIFEST_VERSION,
                    key: key.clone(),
                    created: chrono::Utc::now().to_rfc3339(),
                    criu: criu.into(),
                    kernel: kernel_release(),
                    pool: pool.info(),
                    regions: report.regions.clone(),
                    images: digests,
                    region_digests,
                    report: report.clone(),
                };
                let path = work.join(MANIFEST);
                let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
                std::fs::write(&path, json).map_err(|e| TemplateError::io("writing", &path, e))?;
                let dest = self.key_dir(&key);
                std::fs::rename(&work, &dest)
                    .map_err(|e| TemplateError::io("publishing", &dest, e))?;
                Ok(manifest)
            })();
            if finish.is_err() {
                if let convert::Mapping::Kmod(dev) = mapping {
                    for k in report.regions.iter().filter_map(|r| r.kmod.as_ref()) {
                        convert::release_kmod(dev, k);
                    }
                }
                for r in regions_made {
                    let _ = pool.remove_region(&r);
                }
            }
            finish
        })();
        let manifest = match built {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        self.seal(&key, &manifest)?;
        self.set_name(name, &key)?;
        Ok((manifest, true))
    }

    fn files_of(&self, key: &str, m: &Manifest) -> Vec<PathBuf> {
        let images = self.key_dir(key).join(IMAGES);
        m.images
            .keys()
            .map(|n| images.join(n))
            .chain(m.regions.iter().map(|r| r.path.clone()))
            .collect()
    }

    fn seal(&self, key: &str, m: &Manifest) -> Result<(), TemplateError> {
        let prints: Vec<Fingerprint> = self
            .files_of(key, m)
            .iter()
            .map(|p| fingerprint(p).map_err(|e| TemplateError::io("stat", p, e)))
            .collect::<Result<_, _>>()?;
        let path = self.key_dir(key).join(SEAL);
        let tmp = self.key_dir(key).join(".seal.json.new");
        std::fs::write(&tmp, serde_json::to_vec(&prints).unwrap_or_default())
            .map_err(|e| TemplateError::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| TemplateError::io("sealing", &path, e))
    }

    /// Checks every digest (on success the template is sealed again) and that the pseudo_mm
    /// module has its templates.
    pub fn verify(&self, name: &str) -> Result<Manifest, TemplateError> {
        let m = self.verify_files(name)?;
        self.check_kmod(&self.resolve(name)?, &m, name)?;
        Ok(m)
    }

    fn verify_files(&self, name: &str) -> Result<Manifest, TemplateError> {
        let key = self.resolve(name)?;
        let m = self.read_manifest(&key, name)?;
        let corrupt = |detail: String| TemplateError::Corrupt {
            name: name.into(),
            detail,
        };
        let images = self.key_dir(&key).join(IMAGES);
        for (file, want) in &m.images {
            let p = images.join(file);
            let got = sha256_file(&p).map_err(|e| corrupt(format!("{file}: {e}")))?;
            if &got != want {
                return Err(corrupt(format!("{file}: digest mismatch")));
            }
        }
        for r in &m.regions {
            if !r.path.exists() {
                return Err(TemplateError::Pool(PoolError::NoRegion {
                    pool: m.pool.name.clone(),
                    region: r.name.clone(),
                }));
            }
            let size = std::fs::metadata(&r.path).map(|md| md.len()).unwrap_or(0);
            if size != r.size {
                return Err(corrupt(format!(
                    "pool region {} is {size} bytes, {} expected (truncated?)",
                    r.path.display(),
                    r.size
                )));
            }
            let got = sha256_file(&r.path).map_err(|e| corrupt(format!("{}: {e}", r.name)))?;
            if m.region_digests.get(&r.name) != Some(&got) {
                return Err(corrupt(format!(
                    "pool region {}: digest mismatch",
                    r.path.display()
                )));
            }
        }
        self.seal(&key, &m)?;
        Ok(m)
    }

    /// The template, checked for use: the seal (a stat of every file) matches, or a full
    /// verification passes; CRIU and kernel are the ones it was built with.
    pub fn check(&self, name: &str, criu: &str) -> Result<Manifest, TemplateError> {
        let key = self.resolve(name)?;
        let m = self.read_manifest(&key, name)?;
        let sealed: Option<Vec<Fingerprint>> = std::fs::read(self.key_dir(&key).join(SEAL))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let now: Option<Vec<Fingerprint>> = self
            .files_of(&key, &m)
            .iter()
            .map(|p| fingerprint(p).ok())
            .collect();
        let m = if sealed.is_some() && sealed == now {
            m
        } else {
            tracing::info!(template = name, "seal broken or missing: verifying digests");
            self.verify_files(name)?
        };
        let kernel = kernel_release();
        if m.criu != criu || m.kernel != kernel {
            return Err(TemplateError::Stale {
                name: name.into(),
                built: format!("CRIU {} on kernel {}", m.criu, m.kernel),
                now: format!("CRIU {criu} on kernel {kernel}"),
            });
        }
        self.check_kmod(&key, &m, name)?;
        Ok(m)
    }

    /// Checks that the pseudo_mm module has the templates the images map. A module
    /// reloaded since the build (a reboot) has forgotten them and may have given their ids
    /// to other templates, whose memory a restore would then map: a forgotten template is
    /// made again, under its id, from its region file (verified by the caller); one whose
    /// id is now another's makes the template `Stale`.
    fn check_kmod(&self, key: &str, m: &Manifest, name: &str) -> Result<(), TemplateError> {
        let kmod: Vec<(&Path, &convert::KmodRef)> = m
            .regions
            .iter()
            .filter_map(|r| Some((r.path.as_path(), r.kmod.as_ref()?)))
            .collect();
        if kmod.is_empty() {
            return Ok(());
        }
        let unusable = |e: pseudo_mm::PseudoMmError| TemplateError::Unsupported(e.to_string());
        let dev = PseudoMm::open().map_err(unusable)?;
        for (path, k) in kmod {
            if k.is_live(&dev).map_err(unusable)? {
                continue;
            }
            let _lock = self.lock(key)?;
            if !self.key_dir(key).join(MANIFEST).exists() {
                return Err(TemplateError::Missing(name.into()));
            }
            let file = File::open(path).map_err(|e| TemplateError::io("opening", path, e))?;
            if !k.rearm(&dev, &file).map_err(unusable)? {
                return Err(TemplateError::Stale {
                    name: name.into(),
                    built: format!("pseudo_mm template {}", k.template),
                    now: "a pseudo_mm module that gave its id to another template (reloaded since the build)".into(),
                });
            }
            tracing::info!(
                template = name,
                id = k.template,
                "pseudo_mm template made again after a module reload"
            );
        }
        Ok(())
    }

    /// Checks the template and opens what a restore from it needs.
    pub fn prepare(&self, name: &str, criu: &str) -> Result<Prepared, TemplateError> {
        let manifest = self.check(name, criu)?;
        let images = self.key_dir(&manifest.key).join(IMAGES);
        let mut inherit = Vec::new();
        // Through the module, the images map the device, not the region files.
        if manifest.regions.iter().any(|r| r.kmod.is_some()) {
            let dev = PseudoMm::open().map_err(|e| TemplateError::Unsupported(e.to_string()))?;
            let f = dev
                .file()
                .try_clone()
                .map_err(|e| TemplateError::io("duplicating", Path::new(pseudo_mm::DEVICE), e))?;
            inherit.push((pseudo_mm::DEVICE.trim_start_matches('/').to_string(), f));
        }
        for r in manifest.regions.iter().filter(|r| r.kmod.is_none()) {
            let f = File::open(&r.path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => TemplateError::Pool(PoolError::NoRegion {
                    pool: manifest.pool.name.clone(),
                    region: r.name.clone(),
                }),
                _ => TemplateError::io("opening", &r.path, e),
            })?;
            let key = r.path.to_string_lossy().trim_start_matches('/').to_string();
            inherit.push((key, f));
        }
        Ok(Prepared {
            images,
            inherit,
            manifest,
        })
    }

    pub fn list(&self) -> Result<Vec<Listed>, TemplateError> {
        let dir = self.root.join("by-key");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir)
            .map_err(|e| TemplateError::io("listing", &dir, e))?
            .flatten()
        {
            let key = e.file_name().to_string_lossy().into_owned();
            if key.starts_with('.') {
                continue;
            }
            let Ok(m) = self.read_manifest(&key, &key) else {
                continue;
            };
            out.push(Listed {
                names: self.names_of(&key),
                created: m.created.clone(),
                criu: m.criu.clone(),
                pool: m.pool.name.clone(),
                pool_bytes: m.regions.iter().map(|r| r.data).sum(),
                image_bytes: m.report.pages_left,
                instances: {
                    let mut pids: Vec<i32> = m
                        .regions
                        .iter()
                        .flat_map(|r| trenv_mempool::mapped_by(&r.path))
                        .collect();
                    pids.sort_unstable();
                    pids.dedup();
                    pids
                },
                key,
            });
        }
        out.sort_by(|a, b| a.names.cmp(&b.names).then(a.key.cmp(&b.key)));
        Ok(out)
    }

    /// Removes the name; the template itself goes with its last name, unless a process still
    /// maps its memory (then nothing is removed and the error lists the processes).
    pub fn remove(&self, name: &str) -> Result<(), TemplateError> {
        let key = self.resolve(name)?;
        let _lock = self.lock(&key)?;
        let m = self.read_manifest(&key, name)?;
        let last = self.names_of(&key) == [name.to_string()];
        if last {
            let pids: Vec<i32> = m
                .regions
                .iter()
                .flat_map(|r| trenv_mempool::mapped_by(&r.path))
                .collect();
            if !pids.is_empty() {
                return Err(TemplateError::InUse {
                    name: name.into(),
                    pids,
                });
            }
        }
        if last {
            release_kmod_regions(&m, name)?;
        }
        let link = self.root.join("names").join(name);
        std::fs::remove_file(&link).map_err(|e| TemplateError::io("removing", &link, e))?;
        if last {
            for r in &m.regions {
                if let Err(e) = std::fs::remove_file(&r.path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        return Err(TemplateError::io("removing", &r.path, e));
                    }
                }
            }
            let dir = self.key_dir(&key);
            std::fs::remove_dir_all(&dir).map_err(|e| TemplateError::io("removing", &dir, e))?;
        }
        Ok(())
    }

    /// Removes what no template needs: leftovers of builds that died, templates without a
    /// name (unless mapped), names without a template, and regions of `pool` that no
    /// template refers to (unless mapped). Returns what was removed.
    pub fn gc(&self, pool: Option<&dyn MemoryPool>) -> Result<Vec<String>, TemplateError> {
        let mut removed = Vec::new();
        let by_key = self.root.join("by-key");
        let mut referenced = std::collections::HashSet::new();
        for e in std::fs::read_dir(&by_key)
            .map_err(|e| TemplateError::io("listing", &by_key, e))?
            .flatten()
        {
            let key = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = key.strip_prefix('.') {
                // A build dir whose builder is gone (its pid is the suffix).
                let alive = rest
                    .rsplit_once("-")
                    .and_then(|(_, pid)| pid.parse::<i32>().ok())
                    .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                if !alive {
                    let _ = std::fs::remove_dir_all(e.path());
                    removed.push(format!("build leftover {key}"));
                }
                continue;
            }
            let m = self.read_manifest(&key, &key).ok();
            if self.names_of(&key).is_empty() {
                let mapped = m.as_ref().is_some_and(|m| {
                    m.regions
                        .iter()
                        .any(|r| !trenv_mempool::mapped_by(&r.path).is_empty())
                });
                if !mapped
                    && m.as_ref()
                        .is_none_or(|m| release_kmod_regions(m, &key).is_ok())
                {
                    if let Some(m) = &m {
                        for r in &m.regions {
                            let _ = std::fs::remove_file(&r.path);
                        }
                    }
                    let _ = std::fs::remove_dir_all(e.path());
                    removed.push(format!("unnamed template {key}"));
                    continue;
                }
            }
            if let Some(m) = m {
                referenced.extend(m.regions.iter().map(|r| r.path.clone()));
            }
        }
        let names = self.root.join("names");
        for e in std::fs::read_dir(&names).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with('.') && self.resolve(&n).is_err() {
                let _ = std::fs::remove_file(e.path());
                removed.push(format!("dangling name {n}"));
            }
        }
        if let Some(pool) = pool {
            let dir = pool.info().dir;
            for r in pool.regions()? {
                if !referenced.contains(&dir.join(&r)) && pool.remove_region(&r).is_ok() {
                    removed.push(format!("orphan region {r}"));
                }
            }
        }
        Ok(removed)
    }
}

/// The regular files of an image directory, sorted (logs and work files of CRIU excluded).
fn image_files(dir: &Path) -> Result<Vec<PathBuf>, TemplateError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| TemplateError::io("listing", dir, e))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            !n.ends_with(".log") && !n.starts_with('.') && n != "stats-dump" && n != "stats-restore"
        })
        .collect();
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests;

/// Deletes the pseudo_mm templates and backends of a template's regions. A template still
/// mapped makes it [`TemplateError::InUse`] (the module knows, not /proc: the instances map
/// the device). Without the module loaded there is nothing left to release.
fn release_kmod_regions(m: &Manifest, name: &str) -> Result<(), TemplateError> {
    let kmod: Vec<&convert::KmodRef> = m.regions.iter().filter_map(|r| r.kmod.as_ref()).collect();
    if kmod.is_empty() {
        return Ok(());
    }
    let Ok(dev) = PseudoMm::open() else {
        return Ok(());
    };
    for k in kmod {
        match convert::try_release_kmod(&dev, k) {
            Ok(()) => {}
            Err(e) if e.is_busy() => {
                return Err(TemplateError::InUse {
                    name: name.into(),
                    pids: Vec::new(),
                });
            }
            // Gone already (the module was reloaded): nothing to release.
            Err(_) => {}
        }
    }
    Ok(())
}
