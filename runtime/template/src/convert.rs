//! Turning a CRIU image set into a template: the pages of private anonymous VMAs move into a
//! pool region (one page-aligned extent per VMA, holes where the VMA had no pages), each
//! such VMA becomes a private mapping of its extent, and its pages leave the pagemap and the
//! pages image. Stock CRIU then restores it by mapping the region (through `--inherit-fd`)
//! instead of writing pages: the pages are shared by every instance until written.
//!
//! Left as CRIU dumped them: stacks and anything growing down, vdso/vvar/vsyscall, shared
//! and SysV memory, AIO rings, memfd, hugetlb, locked (a locked private mapping is faulted
//! in for writing, i.e. copied, at restore), and VMAs without pages. MADV_HUGEPAGE areas are
//! converted without the hint (see the rewrite).
//!
//! With [`Mapping::Kmod`], the region is registered with the pseudo_mm kernel module
//! instead, as a backend with one template range per VMA, and each converted VMA becomes a
//! private mapping of `/dev/pseudo_mm` at its range's offset, marked for CRIU's device
//! plugin hooks (the `criu-plugin/` crate). The module then maps the region's own pages
//! (device pages on a DAX pool) and accounts for them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use trenv_criu::image::{
    entry_pages, entry_present, CgroupEntry, FdTypes, FileEntry, FownEntry, Image, MmEntry,
    Pagemap, PagemapEntry, PstreeEntry, RegFileEntry, VmaEntry,
};
use trenv_mempool::pseudo_mm::{self, BackendKind, PseudoMm};
use trenv_mempool::{align_up, MemoryPool, PoolError, RegionWriter};

use crate::TemplateError;

const PAGE: u64 = 4096;

/// VMA status bits (criu/include/image.h).
pub mod status {
    pub const REGULAR: u32 = 1 << 0;
    pub const STACK: u32 = 1 << 1;
    pub const HEAP: u32 = 1 << 5;
    pub const FILE_PRIVATE: u32 = 1 << 6;
    pub const ANON_PRIVATE: u32 = 1 << 9;
    /// Set by CRIU on device VMAs a plugin handled; at restore the plugin's UPDATE_VMA_MAP
    /// hook sees the VMA, and CRIU maps it without adding PROT_WRITE or writing pages.
    pub const EXT_PLUGIN: u32 = 1 << 27;
}

/// How converted VMAs map their region.
#[derive(Debug, Clone, Copy)]
pub enum Mapping<'a> {
    /// A private mapping of the region file (stock CRIU, `--inherit-fd` of the file).
    File,
    /// A private mapping of `/dev/pseudo_mm` (CRIU with the trenv plugin, `--inherit-fd` of
    /// the device).
    Kmod(&'a PseudoMm),
}

/// A region registered with the pseudo_mm module.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KmodRef {
    pub template: u32,
    /// The backend registered at the build (a template made again has another: the module
    /// reports it, [`pseudo_mm::TemplateInfo::backend`]).
    pub backend: u32,
    pub kind: BackendKind,
    /// Random, given to the module with the template: ids start over when the module is
    /// reloaded, so `template` names this template only while the module reports this tag.
    /// 0 (manifests from before tags) never matches.
    #[serde(default)]
    pub tag: u64,
    /// The template's ranges, `[first page, pages]` of the region file, range `i` for VMA
    /// extent `i`: what it takes to make the template again after a reload.
    #[serde(default)]
    pub ranges: Vec<[u64; 2]>,
}

impl KmodRef {
    /// Whether `info` is this template's (made by this build, or again from it).
    fn owns(&self, info: &pseudo_mm::TemplateInfo) -> bool {
        self.tag != 0 && info.tag == self.tag
    }

    /// Whether the module's template `self.template` is this one, whole: `Ok(false)` when
    /// the id is free or another template's (the module was reloaded since), or the
    /// template is still being made again.
    pub fn is_live(&self, dev: &PseudoMm) -> Result<bool, pseudo_mm::PseudoMmError> {
        match dev.template_info(self.template) {
            Ok(info) => Ok(self.owns(&info) && info.regions as usize == self.ranges.len()),
            Err(e) if e.is_missing() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes the template again under its id and tag, from the region file, once a reload
    /// has made the module forget it, so the images that name it restore as before.
    /// `Ok(false)`: it cannot be, as its id is another template's, or the manifest predates
    /// tags. A template of its tag left half-made (a crash while making it) is made anew.
    /// Callers serialise this per template (the store's key lock).
    pub fn rearm(&self, dev: &PseudoMm, file: &File) -> Result<bool, pseudo_mm::PseudoMmError> {
        if self.tag == 0 || self.ranges.is_empty() {
            return Ok(false);
        }
        match dev.template_info(self.template) {
            Ok(info) if !self.owns(&info) => return Ok(false),
            Ok(info) if info.regions as usize == self.ranges.len() => return Ok(true),
            Ok(_) => try_release_kmod(dev, self)?,
            Err(e) if e.is_missing() => {}
            Err(e) => return Err(e),
        }
        let (backend, _) = dev.register_backend(file, 0)?;
        if let Err(e) = dev.create_template_at(self.template, self.tag) {
            let _ = dev.unregister_backend(backend);
            return if e.is_taken() { Ok(false) } else { Err(e) };
        }
        for &[pgoff, pages] in &self.ranges {
            if let Err(e) = dev.add_region(self.template, backend, pgoff, pages) {
                drop_template(dev, self.template, backend);
                return Err(e);
            }
        }
        Ok(true)
    }
}

/// Deletes a template just made and its backend, best effort (logged).
fn drop_template(dev: &PseudoMm, template: u32, backend: u32) {
    if let Err(e) = dev.delete_template(template) {
        tracing::warn!(template, error = %e, "pseudo_mm template left");
    }
    if let Err(e) = dev.unregister_backend(backend) {
        tracing::warn!(backend, error = %e, "pseudo_mm backend left");
    }
}

/// A random, non-zero template tag.
fn fresh_tag() -> Result<u64, TemplateError> {
    let path = Path::new("/dev/urandom");
    let mut b = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| TemplateError::io("reading", path, e))?;
    Ok(u64::from_ne_bytes(b).max(1))
}

// mmap flags as CRIU stores them (x86-64 values; CRIU images are per-architecture).
const MAP_SHARED: u32 = 0x01;
const MAP_PRIVATE: u32 = 0x02;
const MAP_ANONYMOUS: u32 = 0x20;
const MAP_GROWSDOWN: u32 = 0x100;
const MAP_LOCKED: u32 = 0x2000;
const MAP_HUGETLB: u32 = 0x4_0000;
/// Bit of MADV_HUGEPAGE (14) in a VMA's `madv` bitmap.
const MADV_HUGEPAGE_BIT: u64 = 1 << 14;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// One process's region: what the template keeps of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionRef {
    /// The process (its pid in the image set).
    pub pid: u32,
    /// Region name in the pool.
    pub name: String,
    /// The region file: CRIU's images name it, restore inherits it under this path.
    pub path: PathBuf,
    pub size: u64,
    /// Bytes of data (pages that were present).
    pub data: u64,
    pub vmas: usize,
    /// Mapped through the pseudo_mm module ([`Mapping::Kmod`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kmod: Option<KmodRef>,
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub regions: Vec<RegionRef>,
    /// VMAs left as CRIU dumped them, by reason.
    pub kept: BTreeMap<String, usize>,
    /// Bytes of page data left in the pages images.
    pub pages_left: u64,
    /// tmpfs mounts a restore stages itself (templates built before this field had none).
    #[serde(default)]
    pub tmpfs: Vec<crate::tmpfs::TmpfsMount>,
    /// Every process in one cgroup (per controller) with no cgroups below it: the restore
    /// leaves cgroups to trenv (CRIU's `ignore` mode; the container's cgroup exists and
    /// CRIU runs in it) instead of mounting every hierarchy to re-create the dumped tree.
    #[serde(default)]
    pub flat_cgroups: bool,
    /// The task shares the restoring CRIU's network namespace ([`crate::netns`]): every
    /// restore runs CRIU in the namespace its bundle asks for.
    #[serde(default)]
    pub netns_shared: bool,
}

/// Whether the dumped tree lives in a single cgroup set without cgroups below it.
fn flat_cgroups(dir: &Path) -> Result<bool, TemplateError> {
    let path = dir.join("cgroup.img");
    if !path.exists() {
        return Ok(false);
    }
    let img = Image::<CgroupEntry>::read(&path)?;
    Ok(img.entries.iter().all(|e| {
        e.sets.len() <= 1
            && e.controllers
                .iter()
                .all(|c| c.dirs.iter().all(|d| d.children.is_empty()))
    }))
}

/// Why a VMA stays as dumped, or None when it can be converted.
fn keep_reason(v: &VmaEntry) -> Option<&'static str> {
    let st = v.status();
    let fl = v.flags();
    if st & status::REGULAR == 0 || st & status::ANON_PRIVATE == 0 {
        return Some("not private anonymous");
    }
    if st & !(status::REGULAR | status::ANON_PRIVATE | status::HEAP) != 0 {
        return Some(if st & status::STACK != 0 {
            "stack"
        } else {
            "special"
        });
    }
    if fl & MAP_PRIVATE == 0 || fl & MAP_ANONYMOUS == 0 || fl & MAP_SHARED != 0 {
        return Some("not private anonymous");
    }
    if fl & MAP_GROWSDOWN != 0 {
        return Some("grows down");
    }
    if fl & MAP_HUGETLB != 0 {
        return Some("hugetlb");
    }
    if fl & MAP_LOCKED != 0 {
        return Some("locked");
    }
    if !v.start().is_multiple_of(PAGE) || !v.end().is_multiple_of(PAGE) || v.end() <= v.start() {
        return Some("unaligned");
    }
    None
}

/// A run of pages of the pagemap: where it is in memory and in the pages image.
#[derive(Debug, Clone)]
struct Run {
    entry: PagemapEntry,
    start: u64,
    end: u64,
    /// Offset of its data in the pages image (present runs only).
    data: Option<u64>,
}

fn runs(pm: &Pagemap) -> Result<Vec<Run>, TemplateError> {
    let mut off = 0;
    let mut out = Vec::new();
    for e in &pm.entries {
        if e.flags
            .is_some_and(|f| f & trenv_criu::image::pe_flags::PARENT != 0)
            || e.in_parent()
        {
            return Err(TemplateError::Unsupported(
                "pages in a parent image (incremental dumps cannot become templates)".into(),
            ));
        }
        let len = entry_pages(e) * PAGE;
        let start = e.vaddr();
        let data = entry_present(e).then_some(off);
        if data.is_some() {
            off += len;
        }
        out.push(Run {
            entry: e.clone(),
            start,
            end: start + len,
            data,
        });
    }
    Ok(out)
}

/// Converts the image set in `dir` in place, putting region `<prefix>-<pid>` of `pool` under
/// each process. On failure the regions made so far are removed; `dir` is then unusable
/// (the caller converts a copy).
pub fn convert(dir: &Path, pool: &dyn MemoryPool, prefix: &str) -> Result<Report, TemplateError> {
    convert_with(dir, pool, prefix, Mapping::File)
}

/// [`convert`], with the VMAs mapping their regions as `mapping` says.
pub fn convert_with(
    dir: &Path,
    pool: &dyn MemoryPool,
    prefix: &str,
    mapping: Mapping<'_>,
) -> Result<Report, TemplateError> {
    if pool.info().kind == trenv_mempool::PoolKind::Hugetlbfs {
        // A private mapping of a hugetlbfs file is a hugetlb VMA: its address and length, and
        // every later mprotect, munmap or madvise of the program, must be huge-page aligned
        // (CRIU's mmap of an ordinary heap fails with EINVAL), and each instance would
        // reserve huge pages for its copies. Huge pages for a DRAM pool come from a tmpfs.
        return Err(TemplateError::Unsupported(format!(
            "pool {} is hugetlbfs: a process's 4 KiB mappings cannot be backed by hugetlbfs \
             files when stock CRIU restores them; use a tmpfs pool",
            pool.info().name
        )));
    }
    let tree = Image::<PstreeEntry>::read(&dir.join("pstree.img"))?;
    let mut files = Image::<FileEntry>::read(&dir.join("files.img"))?;
    let mut next_id = files.entries.iter().map(FileEntry::id).max().unwrap_or(0) + 1;
    let mut report = Report::default();
    let mut made = Vec::new();
    let res = (|| {
        for p in &tree.entries {
            let pid = p.pid();
            let region = convert_process(
                dir,
                pid,
                pool,
                &format!("{prefix}-{pid}"),
                next_id,
                &mut files,
                &mut report,
                mapping,
            )?;
            if let Some(r) = region {
                made.push((r.name.clone(), r.kmod.clone()));
                report.regions.push(r);
                next_id += 1;
            }
        }
        files.write(&dir.join("files.img"))?;
        report.tmpfs = crate::tmpfs::externalize(dir)?;
        report.flat_cgroups = flat_cgroups(dir)?;
        crate::netns::share_restorers(dir)?;
        report.netns_shared = true;
        Ok(())
    })();
    if let Err(e) = res {
        for (r, kmod) in made {
            if let (Some(k), Mapping::Kmod(dev)) = (kmod, mapping) {
                release_kmod(dev, &k);
            }
            let _ = pool.remove_region(&r);
        }
        return Err(e);
    }
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn convert_process(
    dir: &Path,
    pid: u32,
    pool: &dyn MemoryPool,
    region: &str,
    file_id: u32,
    files: &mut Image<FileEntry>,
    report: &mut Report,
    mapping: Mapping<'_>,
) -> Result<Option<RegionRef>, TemplateError> {
    let mut mm = Image::<MmEntry>::read(&dir.join(format!("mm-{pid}.img")))?;
    let pm = Pagemap::read(&dir.join(format!("pagemap-{pid}.img")))?;
    let pages_path = dir.join(format!("pages-{}.img", pm.head.pages_id()));
    let pages =
        File::open(&pages_path).map_err(|e| TemplateError::io("opening", &pages_path, e))?;
    let runs = runs(&pm)?;
    let entry = mm
        .entries
        .first()
        .ok_or_else(|| TemplateError::Unsupported(format!("mm-{pid}.img has no entry")))?;

    // Present pages per VMA, to pick the VMAs worth converting.
    let present_in = |s: u64, e: u64| -> u64 {
        runs.iter()
            .filter(|r| r.data.is_some())
            .map(|r| r.end.min(e).saturating_sub(r.start.max(s)))
            .sum()
    };
    let mut chosen: Vec<usize> = Vec::new();
    for (i, v) in entry.vmas.iter().enumerate() {
        match keep_reason(v) {
            Some(why) => *report.kept.entry(why.into()).or_default() += 1,
            None if present_in(v.start(), v.end()) == 0 => {
                *report.kept.entry("no pages".into()).or_default() += 1;
            }
            None => chosen.push(i),
        }
    }
    let total: u64 = runs
        .iter()
        .filter(|r| r.data.is_some())
        .map(|r| r.end - r.start)
        .sum();
    let moved: u64 = chosen
        .iter()
        .map(|&i| present_in(entry.vmas[i].start(), entry.vmas[i].end()))
        .sum();
    // CRIU needs a pagemap with at least one entry (a head alone crashes its restore): keep
    // the smallest candidate if nothing else would be left.
    if moved == total {
        if let Some((pos, _)) = chosen
            .iter()
            .enumerate()
            .min_by_key(|(_, &i)| present_in(entry.vmas[i].start(), entry.vmas[i].end()))
        {
            chosen.remove(pos);
            *report.kept.entry("last pages".into()).or_default() += 1;
        }
    }
    if chosen.is_empty() {
        report.pages_left += total;
        return Ok(None);
    }

    // Extents, in VMA order.
    let align = pool.info().alignment;
    let mut extents = Vec::new();
    let mut size = 0;
    for &i in &chosen {
        let v = &entry.vmas[i];
        extents.push((i, v.start(), v.end(), size));
        size = align_up(size + (v.end() - v.start()), align);
    }
    let data: u64 = chosen
        .iter()
        .map(|&i| present_in(entry.vmas[i].start(), entry.vmas[i].end()))
        .sum();
    let mut buf = vec![0u8; 1 << 20];
    let region_ref = pool.create_region(region, size, data, &mut |w: &mut dyn RegionWriter| {
        for r in runs.iter() {
            let Some(data_off) = r.data else { continue };
            for &(_, s, e, ext) in &extents {
                let (from, to) = (r.start.max(s), r.end.min(e));
                let mut at = from;
                while at < to {
                    let n = (to - at).min(u64::try_from(buf.len()).unwrap_or(PAGE));
                    let chunk = &mut buf[..usize::try_from(n).unwrap_or(0)];
                    pages
                        .read_exact_at(chunk, data_off + (at - r.start))
                        .map_err(|e| PoolError::Io {
                            pool: String::new(),
                            what: "reading pages image",
                            path: pages_path.clone(),
                            source: e,
                        })?;
                    w.write_at(ext + (at - s), chunk)?;
                    at += n;
                }
            }
        }
        Ok(())
    })?;

    let kmod = match mapping {
        Mapping::File => None,
        Mapping::Kmod(dev) => match register_kmod(dev, &region_ref, &extents) {
            Ok(k) => Some(k),
            Err(e) => {
                let _ = pool.remove_region(&region_ref.name);
                return Err(e);
            }
        },
    };
    let target = match &kmod {
        Some(k) => Target::Kmod(k.template),
        None => Target::File(&region_ref),
    };
    let rewritten = rewrite(
        dir,
        pid,
        &runs,
        &extents,
        &pm,
        &pages,
        &pages_path,
        file_id,
        target,
        &mut mm,
        files,
        report,
    );
    if let Err(e) = rewritten {
        if let (Some(k), Mapping::Kmod(dev)) = (&kmod, mapping) {
            release_kmod(dev, k);
        }
        let _ = pool.remove_region(&region_ref.name);
        return Err(e);
    }
    Ok(Some(RegionRef {
        pid,
        name: region_ref.name,
        path: region_ref.path,
        size: region_ref.size,
        data,
        vmas: extents.len(),
        kmod,
    }))
}

/// Registers the region file as a backend and makes a template of its extents, one range
/// per VMA in extent order (range `i` is extent `i`).
fn register_kmod(
    dev: &PseudoMm,
    region: &trenv_mempool::Region,
    extents: &[(usize, u64, u64, u64)],
) -> Result<KmodRef, TemplateError> {
    if extents.len() > pseudo_mm::MAX_REGIONS {
        return Err(TemplateError::Unsupported(format!(
            "{} VMAs to convert; a pseudo_mm template holds at most {}",
            extents.len(),
            pseudo_mm::MAX_REGIONS
        )));
    }
    let kmod_err = |e: pseudo_mm::PseudoMmError| TemplateError::Unsupported(e.to_string());
    let tag = fresh_tag()?;
    let (backend, kind) = dev.register_backend(&region.file, 0).map_err(kmod_err)?;
    let template = match dev.create_template(tag) {
        Ok(t) => t,
        Err(e) => {
            let _ = dev.unregister_backend(backend);
            return Err(kmod_err(e));
        }
    };
    let ranges: Vec<[u64; 2]> = extents
        .iter()
        .map(|&(_, s, e, ext)| [ext / PAGE, (e - s) / PAGE])
        .collect();
    for (i, &[pgoff, pages]) in ranges.iter().enumerate() {
        match dev.add_region(template, backend, pgoff, pages) {
            Ok(index) if usize::try_from(index).ok() == Some(i) => {}
            Ok(index) => {
                drop_template(dev, template, backend);
                return Err(TemplateError::Unsupported(format!(
                    "pseudo_mm gave range {index} for extent {i} of template {template}"
                )));
            }
            Err(err) => {
                drop_template(dev, template, backend);
                return Err(kmod_err(err));
            }
        }
    }
    Ok(KmodRef {
        template,
        backend,
        kind,
        tag,
        ranges,
    })
}

/// Deletes a region's pseudo_mm template, then the backend it maps. A mapped template stays
/// (the module refuses with EBUSY) and so does its backend; a backend left once the template
/// is gone is only logged. A template the module no longer has (it was reloaded) leaves
/// nothing to release: its id may be another's now, and is left alone.
pub fn try_release_kmod(dev: &PseudoMm, k: &KmodRef) -> Result<(), pseudo_mm::PseudoMmError> {
    let info = match dev.template_info(k.template) {
        Ok(info) if k.owns(&info) => info,
        Ok(_) => return Ok(()),
        Err(e) if e.is_missing() => return Ok(()),
        Err(e) => return Err(e),
    };
    dev.delete_template(k.template)?;
    if info.backend != 0 {
        if let Err(e) = dev.unregister_backend(info.backend) {
            tracing::warn!(backend = info.backend, error = %e, "pseudo_mm backend left");
        }
    }
    Ok(())
}

/// [`try_release_kmod`], best effort: what stays is logged.
pub fn release_kmod(dev: &PseudoMm, k: &KmodRef) {
    if let Err(e) = try_release_kmod(dev, k) {
        tracing::warn!(template = k.template, error = %e, "pseudo_mm template left");
    }
}

/// What converted VMAs map.
#[derive(Clone, Copy)]
enum Target<'a> {
    File(&'a trenv_mempool::Region),
    /// `/dev/pseudo_mm`, this template.
    Kmod(u32),
}

/// Rewrites the process's pagemap, pages image and mm, and adds the region to `files`.
#[allow(clippy::too_many_arguments)]
fn rewrite(
    dir: &Path,
    pid: u32,
    runs: &[Run],
    extents: &[(usize, u64, u64, u64)],
    pm: &Pagemap,
    pages: &File,
    pages_path: &Path,
    file_id: u32,
    target: Target<'_>,
    mm: &mut Image<MmEntry>,
    files: &mut Image<FileEntry>,
    report: &mut Report,
) -> Result<(), TemplateError> {
    let mm_path = dir.join(format!("mm-{pid}.img"));
    let pm_path = dir.join(format!("pagemap-{pid}.img"));
    // The pagemap and pages image keep what lies outside the extents.
    let inside = |a: u64| extents.iter().any(|&(_, s, e, _)| a >= s && a < e);
    let mut new_entries = Vec::new();
    let new_pages_path = dir.join(format!(".pages-{}.img.new", pm.head.pages_id()));
    let new_pages = File::create(&new_pages_path)
        .map_err(|e| TemplateError::io("creating", &new_pages_path, e))?;
    let mut written = 0u64;
    for r in runs {
        // Cut the run at extent boundaries; keep the parts outside.
        let mut cuts = vec![r.start, r.end];
        for &(_, s, e, _) in extents {
            for c in [s, e] {
                if c > r.start && c < r.end {
                    cuts.push(c);
                }
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            if inside(a) {
                continue;
            }
            let mut part = r.entry.clone();
            part.set_vaddr(a);
            let n = (b - a) / PAGE;
            if r.entry.nr_pages.is_some() {
                part.set_nr_pages(n);
            }
            part.set_compat_nr_pages(u32::try_from(n).unwrap_or(u32::MAX));
            if let Some(off) = r.data {
                let len = usize::try_from(b - a).unwrap_or(0);
                let mut chunk = vec![0u8; len];
                pages
                    .read_exact_at(&mut chunk, off + (a - r.start))
                    .map_err(|e| TemplateError::io("reading", pages_path, e))?;
                new_pages
                    .write_all_at(&chunk, written)
                    .map_err(|e| TemplateError::io("writing", &new_pages_path, e))?;
                written += b - a;
            }
            new_entries.push(part);
        }
    }
    new_pages
        .sync_all()
        .map_err(|e| TemplateError::io("syncing", &new_pages_path, e))?;
    report.pages_left += written;

    let entry = mm
        .entries
        .first_mut()
        .ok_or_else(|| TemplateError::Unsupported(format!("mm-{pid}.img has no entry")))?;
    // VMAs become private mappings of their extents.
    for (k, &(i, _, _, ext)) in extents.iter().enumerate() {
        let v = &mut entry.vmas[i];
        v.set_flags(v.flags() & !MAP_ANONYMOUS);
        v.set_shmid(u64::from(file_id));
        match target {
            Target::File(_) => {
                v.set_status(status::REGULAR | status::FILE_PRIVATE);
                v.set_pgoff(ext);
            }
            Target::Kmod(template) => {
                v.set_status(status::REGULAR | status::FILE_PRIVATE | status::EXT_PLUGIN);
                v.set_pgoff(pseudo_mm::map_offset(
                    template,
                    u32::try_from(k).unwrap_or(u32::MAX),
                ));
            }
        }
        v.set_fdflags(0); // O_RDONLY: a private mapping needs no write access
                          // MADV_HUGEPAGE asked for huge anonymous pages; the pool's pages are shared instead,
                          // and an instance's copies are small pages whatever the hint. Dropped so that the
                          // restore does not depend on the host's THP settings (numpy sets it on large arrays).
        if v.has_madv() {
            v.set_madv(v.madv() & !MADV_HUGEPAGE_BIT);
        }
    }
    // The region as a regular file the images refer to; its mount is that of the executable
    // (any mount of the dumped namespace: restore gets the file through --inherit-fd).
    let exe_mnt = files
        .entries
        .iter()
        .find(|f| f.id() == entry.exe_file_id())
        .and_then(|f| f.reg.mnt_id);
    let mut reg = RegFileEntry::new();
    reg.set_id(file_id);
    reg.set_flags(0);
    reg.set_pos(0);
    let mut fown = FownEntry::new();
    fown.set_uid(0);
    fown.set_euid(0);
    fown.set_signum(0);
    fown.set_pid_type(0);
    fown.set_pid(0);
    reg.fown = Some(fown).into();
    if let Some(m) = exe_mnt {
        reg.set_mnt_id(m);
    }
    match target {
        Target::File(region_ref) => {
            reg.set_name(region_ref.path.to_string_lossy().into_owned());
            reg.set_size(region_ref.size);
            reg.set_mode(S_IFREG | 0o444);
        }
        // A character device has no size to check; the restore inherits it, unchecked.
        Target::Kmod(_) => {
            reg.set_name(pseudo_mm::DEVICE.to_string());
            reg.set_mode(S_IFCHR | 0o600);
        }
    }
    let mut fe = FileEntry::new();
    fe.set_type(FdTypes::REG);
    fe.set_id(file_id);
    fe.reg = Some(reg).into();
    files.entries.push(fe);

    mm.write(&mm_path)?;
    Pagemap {
        header: pm.header,
        head: pm.head.clone(),
        entries: new_entries,
    }
    .write(&pm_path)?;
    std::fs::rename(&new_pages_path, pages_path)
        .map_err(|e| TemplateError::io("replacing", pages_path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest region written before tags and ranges reads back, and names no template a
    /// reloaded module may hold: without a tag it is never taken for the module's.
    #[test]
    fn untagged_kmod_refs_never_match() {
        let k: KmodRef =
            serde_json::from_str(r#"{"template": 3, "backend": 1, "kind": "dax"}"#).unwrap();
        assert_eq!((k.tag, k.ranges.len()), (0, 0));
        let mut info = pseudo_mm::TemplateInfo::default();
        assert!(!k.owns(&info), "tag 0 matched");
        info.tag = 9;
        let tagged = KmodRef { tag: 9, ..k };
        assert!(tagged.owns(&info));
        info.tag = 10;
        assert!(!tagged.owns(&info), "another template's tag matched");
    }

    #[test]
    fn tags_are_random_and_never_zero() {
        let (a, b) = (fresh_tag().unwrap(), fresh_tag().unwrap());
        assert!(a != 0 && b != 0 && a != b);
    }
}
