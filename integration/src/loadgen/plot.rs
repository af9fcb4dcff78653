//! Plots of a benchmark, drawn with plotters as PNG and SVG side by side: latency CDF per
//! mode, node memory over time, and the start breakdown.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::{Invocation, MemorySample, RunSummary};

/// A font for the labels. Text needs one: DejaVu Sans comes with Debian's fonts-dejavu-core.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn ensure_font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONTS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| {
                format!("no font for the plots (install fonts-dejavu-core): tried {FONTS:?}")
            })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        // Registered once for the life of the process, which the font must outlive.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path}: not a usable font"))
    })
    .clone()
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(0xd6, 0x27, 0x28), // runc: red
    RGBColor(0xff, 0x7f, 0x0e), // criu: orange
    RGBColor(0x1f, 0x77, 0xb4), // trenv-pool: blue
    RGBColor(0x2c, 0xa0, 0x2c), // trenv: green
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn colour(mode: &str) -> RGBColor {
    let i = match mode {
        "runc" => 0,
        "criu" => 1,
        "trenv-pool" => 2,
        "trenv" => 3,
        "trenv-cold" => 2,
        "trenv-template" => 3,
        _ => 4,
    };
    COLOURS[i]
}

type Series = Vec<(String, Vec<(f64, f64)>)>;

/// One line chart: a line per mode.
struct Lines {
    title: String,
    x_desc: &'static str,
    y_desc: &'static str,
    log_x: bool,
    series: Series,
}

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

fn draw_lines<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &Lines) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    let pts = c.series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, 0f64, 0f64);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (1.0, 10.0);
    }
    let y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.05 };
    let mut b = ChartBuilder::on(&root);
    b.caption(&c.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(64);
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(c.x_desc)
                .y_desc(c.y_desc)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(err)?;
            for (name, p) in &c.series {
                let col = colour(name);
                chart
                    .draw_series(LineSeries::new(p.iter().copied(), col.stroke_width(2)))
                    .map_err(err)?
                    .label(name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(err)?;
        }};
    }
    if c.log_x {
        let lo = (x0 * 0.8).max(0.1);
        let chart = b
            .build_cartesian_2d((lo..x1 * 1.25).log_scale(), 0f64..y1)
            .map_err(err)?;
        body!(chart);
    } else {
        let chart = b
            .build_cartesian_2d(x0.min(0.0)..x1.max(1.0), 0f64..y1)
            .map_err(err)?;
        body!(chart);
    }
    root.present().map_err(err)
}

/// Stacked bars: a bar per mode, a segment per start phase.
struct Stacked {
    title: String,
    bars: Vec<(String, Vec<(String, f64)>)>,
}

fn draw_stacked<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    c: &Stacked,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(err)?;
    let top = c
        .bars
        .iter()
        .map(|(_, segs)| segs.iter().map(|(_, v)| v).sum::<f64>())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let n = c.bars.len().max(1);
    let n_f = f64::from(u32::try_from(n).unwrap_or(1));
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..n_f, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc("mean start time, ms (warm reuses excluded)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let phase_colours = [
        RGBColor(0x7f, 0x7f, 0x7f),
        RGBColor(0x17, 0xbe, 0xcf),
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xbc, 0xbd, 0x22),
        RGBColor(0x2c, 0xa0, 0x2c),
    ];
    let mut legend_done = std::collections::HashSet::new();
    for (i, (_, segs)) in c.bars.iter().enumerate() {
        let x = f64::from(u32::try_from(i).unwrap_or(0));
        let mut y = 0.0;
        for (k, (phase, v)) in segs.iter().enumerate() {
            let col = phase_colours[k % phase_colours.len()];
            let rect = Rectangle::new([(x + 0.2, y), (x + 0.8, y + v)], col.filled());
            let s = chart.draw_series(std::iter::once(rect)).map_err(err)?;
            if legend_done.insert(phase.clone()) {
                s.label(phase.as_str()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], col.filled())
                });
            }
            y += v;
        }
        // The mode and its total above its bar.
        let label = format!("{} ({y:.0} ms)", c.bars[i].0);
        let style = ("sans-serif", 15).into_font().color(&BLACK).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Bottom,
            ),
        );
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (x + 0.5, y + top * 0.01),
                style,
            )))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

const SIZE: (u32, u32) = (960, 540);

fn both(
    base: &Path,
    f: impl Fn(&Path, bool) -> Result<(), String>,
) -> Result<Vec<PathBuf>, String> {
    let png = base.with_extension("png");
    let svg = base.with_extension("svg");
    f(&png, false)?;
    f(&svg, true)?;
    Ok(vec![png, svg])
}

fn render_lines(base: &Path, c: &Lines) -> Result<Vec<PathBuf>, String> {
    both(base, |p, svg| {
        if svg {
            draw_lines(SVGBackend::new(p, SIZE).into_drawing_area(), c)
        } else {
            draw_lines(BitMapBackend::new(p, SIZE).into_drawing_area(), c)
        }
    })
}

fn render_stacked(base: &Path, c: &Stacked) -> Result<Vec<PathBuf>, String> {
    both(base, |p, svg| {
        if svg {
            draw_stacked(SVGBackend::new(p, SIZE).into_drawing_area(), c)
        } else {
            draw_stacked(BitMapBackend::new(p, SIZE).into_drawing_area(), c)
        }
    })
}

/// The empirical CDF of `xs` (at most ~400 points, enough for a smooth line).
fn cdf(xs: &[f64]) -> Vec<(f64, f64)> {
    let mut s: Vec<f64> = xs
        .iter()
        .copied()
        .filter(|x| x.is_finite() && *x > 0.0)
        .collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let step = (n / 400).max(1);
    let n_f = f64::from(u32::try_from(n).unwrap_or(u32::MAX));
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| {
            (
                s[i],
                f64::from(u32::try_from(i + 1).unwrap_or(u32::MAX)) / n_f,
            )
        })
        .collect();
    if let Some(&last) = s.last() {
        out.push((last, 1.0));
    }
    out
}

/// A latency CDF (log scale) with a line per series, as `base`.png and `base`.svg.
pub fn draw_cdf(
    base: &Path,
    title: &str,
    x_desc: &'static str,
    series: &[(String, Vec<f64>)],
) -> Result<Vec<PathBuf>, String> {
    ensure_font()?;
    render_lines(
        base,
        &Lines {
            title: title.to_string(),
            x_desc,
            y_desc: "fraction of starts",
            log_x: true,
            series: series.iter().map(|(n, xs)| (n.clone(), cdf(xs))).collect(),
        },
    )
}

/// Draws every plot for the runs in `dir`; returns the files written.
pub fn draw_all(
    dir: &Path,
    runs: &[RunSummary],
    invocations: &[Invocation],
    memory: &[MemorySample],
) -> Result<Vec<PathBuf>, String> {
    ensure_font()?;
    let mut files = Vec::new();
    let mut workloads: Vec<&str> = runs.iter().map(|r| r.workload.as_str()).collect();
    workloads.dedup();
    for w in workloads {
        let modes: Vec<&RunSummary> = runs.iter().filter(|r| r.workload == w).collect();
        let mut lat: Series = Vec::new();
        let mut mem: Series = Vec::new();
        let mut bars = Vec::new();
        for r in &modes {
            let e2e: Vec<f64> = invocations
                .iter()
                .filter(|i| i.workload == w && i.mode == r.mode && i.ok)
                .map(|i| i.e2e_ms)
                .collect();
            lat.push((r.mode.clone(), cdf(&e2e)));
            mem.push((
                r.mode.clone(),
                memory
                    .iter()
                    .filter(|m| m.workload == w && m.mode == r.mode)
                    .map(|m| (m.t_s, m.node_mib))
                    .collect(),
            ));
            let order = ["network", "container", "task_create", "task_start", "ready"];
            let segs: Vec<(String, f64)> = order
                .iter()
                .map(|k| {
                    (
                        k.to_string(),
                        r.start_phases_ms.get(*k).copied().unwrap_or(0.0),
                    )
                })
                .collect();
            bars.push((r.mode.clone(), segs));
        }
        files.extend(render_lines(
            &dir.join(format!("{w}-e2e-cdf")),
            &Lines {
                title: format!("{w}: end-to-end latency CDF"),
                x_desc: "end-to-end latency, ms (log scale)",
                y_desc: "fraction of invocations",
                log_x: true,
                series: lat,
            },
        )?);
        files.extend(render_lines(
            &dir.join(format!("{w}-memory")),
            &Lines {
                title: format!("{w}: node memory (Σ PSS of instances + template pool)"),
                x_desc: "time, s",
                y_desc: "MiB",
                log_x: false,
                series: mem,
            },
        )?);
        files.extend(render_stacked(
            &dir.join(format!("{w}-start-breakdown")),
            &Stacked {
                title: format!("{w}: where a start's time goes"),
                bars,
            },
        )?);
    }
    Ok(files)
}
