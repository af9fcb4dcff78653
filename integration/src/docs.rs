//! Benchmark results written into the project's Markdown docs: a generated section between
//! two markers, replaced on every run, and its plots copied next to the docs.

use std::path::{Path, PathBuf};

/// Replaces the text from `begin` to `end` (markers included) in the file at `path` with
/// `section`, or appends `section` when the markers are not there (a missing file starts
/// as a "# trenv benchmarks" page).
pub fn replace_section(path: &Path, begin: &str, end: &str, section: &str) -> std::io::Result<()> {
    let old =
        std::fs::read_to_string(path).unwrap_or_else(|_| "# trenv benchmarks\n\n".to_string());
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if e > b => format!(
            "{}{section}{}",
            &old[..b],
            &old[e + end.len()..].trim_start_matches('\n')
        ),
        _ => format!("{}\n\n{section}", old.trim_end()),
    };
    std::fs::write(path, new)
}

/// Copies `plots` into `img/<subdir>/` beside the docs file at `path`.
pub fn copy_plots(path: &Path, subdir: &str, plots: &[PathBuf]) -> std::io::Result<()> {
    let img = path
        .parent()
        .unwrap_or(Path::new("."))
        .join("img")
        .join(subdir);
    std::fs::create_dir_all(&img)?;
    for p in plots {
        if let Some(name) = p.file_name() {
            std::fs::copy(p, img.join(name))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("b.md");
        std::fs::write(&f, "# t\n\nintro\n\n<!-- b -->\nold\n<!-- e -->\n\ntail\n").expect("write");
        replace_section(
            &f,
            "<!-- b -->",
            "<!-- e -->",
            "<!-- b -->\nnew\n<!-- e -->\n",
        )
        .expect("replace");
        assert_eq!(
            std::fs::read_to_string(&f).expect("read"),
            "# t\n\nintro\n\n<!-- b -->\nnew\n<!-- e -->\ntail\n"
        );
        let g = dir.path().join("new.md");
        replace_section(
            &g,
            "<!-- b -->",
            "<!-- e -->",
            "<!-- b -->\nx\n<!-- e -->\n",
        )
        .expect("append");
        assert!(std::fs::read_to_string(&g)
            .expect("read")
            .ends_with("<!-- b -->\nx\n<!-- e -->\n"));
    }
}
