//! `trenv template build|ls|inspect|verify|rm|gc`, and what `trenv restore --template` needs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use trenv_criu::Criu;
use trenv_mempool::{FilePool, MemoryPool, PoolKind};
use trenv_template::key::KeySource;
use trenv_template::Store;

use crate::cli::{Global, MemPoolArgs, StoreArgs, TemplateBuild, TemplateCommand};

pub fn run(g: &Global, cmd: TemplateCommand) -> Result<()> {
    match cmd {
        TemplateCommand::Build(a) => build(g, &a),
        TemplateCommand::Ls { store, format } => ls(&store, &format),
        TemplateCommand::Inspect { store, name } => {
            let m = open(&store)?.manifest(&name)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
            Ok(())
        }
        TemplateCommand::Verify { store, name } => {
            open(&store)?.verify(&name)?;
            println!("{name}: every digest matches");
            Ok(())
        }
        TemplateCommand::Rm { store, name } => Ok(open(&store)?.remove(&name)?),
        TemplateCommand::Gc { store, pool } => {
            // Only a pool that is there: cleaning up mounts nothing.
            let pool = pool
                .pool_kind
                .parse::<PoolKind>()
                .ok()
                .zip(parse_size(&pool.pool_capacity).ok())
                .and_then(|(kind, cap)| {
                    FilePool::existing(kind, &pool.pool_name, &pool.pool_dir, cap)
                });
            for r in open(&store)?.gc(pool.as_ref().map(|p| p as &dyn MemoryPool))? {
                println!("removed {r}");
            }
            Ok(())
        }
    }
}

pub fn open(s: &StoreArgs) -> Result<Store> {
    open_at(&s.store)
}

pub fn open_at(dir: &Path) -> Result<Store> {
    Store::open(dir).with_context(|| format!("template store {}", dir.display()))
}

/// A size with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .with_context(|| format!("invalid size {s:?} (bytes, or a number with K, M, G or T)"))
}

fn open_pool(a: &MemPoolArgs) -> Result<FilePool> {
    let kind: PoolKind = a.pool_kind.parse()?;
    let capacity = parse_size(&a.pool_capacity)?;
    Ok(FilePool::open(kind, &a.pool_name, &a.pool_dir, capacity)?)
}

/// The installed CRIU's version as templates record it ("4.2.1").
pub fn criu_version(g: &Global) -> Result<String> {
    let (a, b, c) = Criu::new(&g.criu)
        .cached_version()
        .context("asking CRIU for its version")?;
    Ok(format!("{a}.{b}.{c}"))
}

fn key_of(bundle: &Path, image: &str) -> Result<String> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let spec: serde_json::Value =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    let image = if image.is_empty() {
        // Without an image digest the rootfs stands for the image.
        spec["annotations"]["io.trenv.image"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| bundle.join("rootfs").display().to_string())
    } else {
        image.to_string()
    };
    Ok(KeySource::from_spec(&spec, &image).key())
}

fn build(g: &Global, a: &TemplateBuild) -> Result<()> {
    let store = open(&a.store)?;
    let pool = open_pool(&a.pool)?;
    let criu = criu_version(g)?;
    let t = std::time::Instant::now();
    let mut checkpoint_dir: Option<PathBuf> = None;
    let (from, bundle) = match (&a.from_checkpoint, &a.from_container) {
        (Some(dir), _) => (dir.clone(), a.bundle.clone()),
        (None, Some(id)) => {
            let c = super::load(g, id)?;
            let bundle = a.bundle.clone().unwrap_or_else(|| c.bundle().to_path_buf());
            let dir = store
                .root()
                .join(format!(".checkpoint-{id}-{}", std::process::id()));
            eprintln!("trenv: checkpointing {id} (left running)");
            let mut c = c;
            let opts = trenv_criu::checkpoint::CheckpointOptions {
                image_path: dir.clone(),
                leave_running: true,
                tcp_established: a.tcp_established,
                // Connections not accepted yet stay with the running container.
                skip_in_flight: true,
                ..Default::default()
            };
            let res = trenv_criu::checkpoint::checkpoint(&mut c, &Criu::new(&g.criu), &opts)
                .with_context(|| format!("checkpointing container {id}"));
            checkpoint_dir = Some(dir.clone());
            if let Err(e) = res {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            (dir, Some(bundle))
        }
        (None, None) => bail!("give --from-checkpoint DIR or --from-container ID"),
    };
    let key = bundle.as_deref().map(|b| key_of(b, &a.image)).transpose()?;
    eprintln!(
        "trenv: building template {} in pool {} ({})",
        a.name,
        a.pool.pool_name,
        a.pool.pool_dir.display()
    );
    let dev = if a.kmod {
        Some(trenv_mempool::pseudo_mm::PseudoMm::open()?)
    } else {
        None
    };
    let mapping = match &dev {
        Some(d) => trenv_template::convert::Mapping::Kmod(d),
        None => trenv_template::convert::Mapping::File,
    };
    let res = store.build_with(&from, &a.name, key, &pool, &criu, mapping);
    if let Some(dir) = checkpoint_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    let (m, built) = res.with_context(|| format!("building template {}", a.name))?;
    let moved: u64 = m.regions.iter().map(|r| r.data).sum();
    for r in &m.regions {
        if let Some(k) = &r.kmod {
            eprintln!(
                "trenv: region {} is pseudo_mm template {} (backend {}, {:?})",
                r.name, k.template, k.backend, k.kind
            );
        }
    }
    eprintln!(
        "trenv: template {} {} in {:.2}s: {} MiB in the pool ({} VMAs), {} KiB left in the images, key {}",
        a.name,
        if built { "built" } else { "already built; name added" },
        t.elapsed().as_secs_f64(),
        moved >> 20,
        m.regions.iter().map(|r| r.vmas).sum::<usize>(),
        m.report.pages_left >> 10,
        &m.key[..16]
    );
    Ok(())
}

fn ls(s: &StoreArgs, format: &str) -> Result<()> {
    let list = open(s)?.list()?;
    match format {
        "json" => println!("{}", serde_json::to_string_pretty(&list)?),
        "table" => {
            println!(
                "{:<24} {:<16} {:>10} {:>10} {:>9} {:<8} {:<10} CREATED",
                "NAME", "KEY", "POOL MiB", "IMAGE KiB", "INSTANCES", "CRIU", "POOL"
            );
            for t in list {
                println!(
                    "{:<24} {:<16} {:>10} {:>10} {:>9} {:<8} {:<10} {}",
                    t.names.join(","),
                    &t.key[..16.min(t.key.len())],
                    t.pool_bytes >> 20,
                    t.image_bytes >> 10,
                    t.instances.len(),
                    t.criu,
                    t.pool,
                    t.created
                );
            }
        }
        other => bail!("unknown format {other:?} (table or json)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
