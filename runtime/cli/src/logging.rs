//! Log output in the two formats runc speaks.
//!
//! containerd's runc shim passes `--log <file> --log-format json` and, when a command fails,
//! reads the last `{"level":"error","msg":...}` line of that file to build the error it returns
//! to its client. Matching that line shape is what makes trenv's errors readable through `ctr`.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

struct RuncLayer {
    format: LogFormat,
    max: Level,
    out: Mutex<Box<dyn Write + Send>>,
}

#[derive(Default)]
struct Fields {
    msg: String,
    extra: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg.push_str(value);
        } else {
            let _ = write!(self.extra, " {}={:?}", field.name(), value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.msg, "{value:?}");
        } else {
            let _ = write!(self.extra, " {}={:?}", field.name(), value);
        }
    }
}

fn level_word(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

impl<S: Subscriber> Layer<S> for RuncLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = event.metadata().level();
        // Library warnings (e.g. "cgroup hugetlb not supported") are noise to runc's callers
        // unless debugging was asked for.
        let max = if event.metadata().target().starts_with("trenv") || self.max >= Level::DEBUG {
            self.max
        } else {
            Level::ERROR
        };
        if *level > max {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let msg = format!("{}{}", f.msg, f.extra);
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let line = match self.format {
            LogFormat::Json => serde_json::json!({
                "level": level_word(level),
                "msg": msg,
                "time": time,
            })
            .to_string(),
            LogFormat::Text => format!("time={time:?} level={} msg={msg:?}", level_word(level)),
        };
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// Installs the global logger. `path` of `None` (or `/dev/stderr`) logs to stderr.
/// `TRENV_LOG=debug|info|warn|error` overrides the level chosen by `debug`.
pub fn init(path: Option<&Path>, format: LogFormat, debug: bool) -> io::Result<()> {
    let max = match std::env::var("TRENV_LOG").ok().as_deref() {
        Some("trace") => Level::TRACE,
        Some("debug") => Level::DEBUG,
        Some("info") => Level::INFO,
        Some("error") => Level::ERROR,
        Some("warn") => Level::WARN,
        _ if debug => Level::DEBUG,
        _ => Level::WARN,
    };
    let out: Box<dyn Write + Send> = match path {
        Some(p) if p != Path::new("/dev/stderr") => {
            Box::new(OpenOptions::new().create(true).append(true).open(p)?)
        }
        _ => Box::new(io::stderr()),
    };
    let layer = RuncLayer {
        format,
        max,
        out: Mutex::new(out),
    };
    // A second init (e.g. from tests) keeps the first logger.
    let _ = tracing_subscriber::registry().with(layer).try_init();
    Ok(())
}
