//! A process's standard streams: containerd's FIFOs, or a log URI (`file://`, `binary://`).
//!
//! The process always gets pipes, never the FIFOs or files themselves: pipes can be
//! checkpointed by CRIU and replaced on restore, and the shim closing a FIFO when its pipe
//! ends is how containerd learns that all output has been delivered.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use nix::fcntl::OFlag;
use nix::unistd::{fchown, pipe2, Gid, Uid};

use crate::console::{copy_in, copy_out, copy_to_file, Copying};
use crate::zygote::Stdio;

/// Where a process's output goes, from containerd's stdout/stderr strings.
#[derive(Debug, PartialEq)]
enum Output {
    None,
    /// A FIFO path (the default, also written `fifo://path`).
    Fifo(String),
    /// `file:///path`: appended to a file; stdout and stderr share it.
    File(PathBuf),
    /// `binary:///path?key=value`: a logging binary gets the streams on fds 3 and 4.
    Binary {
        path: PathBuf,
        args: Vec<String>,
    },
}

fn parse(uri: &str) -> Result<Output, String> {
    if uri.is_empty() {
        return Ok(Output::None);
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Ok(Output::Fifo(uri.to_string()));
    };
    if !["fifo", "file", "binary"].contains(&scheme) {
        return Err(format!("unsupported log URI scheme {scheme:?} in {uri:?}"));
    }
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.starts_with('/') {
        return Err(format!("log URI {uri:?} needs an absolute path"));
    }
    match scheme {
        "fifo" => Ok(Output::Fifo(path.to_string())),
        "file" => Ok(Output::File(PathBuf::from(path))),
        "binary" => {
            let mut args = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                args.push(k.to_string());
                if !v.is_empty() {
                    args.push(v.to_string());
                }
            }
            Ok(Output::Binary {
                path: PathBuf::from(path),
                args,
            })
        }
        other => Err(format!("unsupported log URI scheme {other:?} in {uri:?}")),
    }
}

/// What a process's streams are connected to.
pub struct Streams<'a> {
    pub id: &'a str,
    pub namespace: &'a str,
    pub stdin: &'a str,
    pub stdout: &'a str,
    pub stderr: &'a str,
    /// Owner of the pipes the process gets.
    pub owner: (u32, u32),
    /// Pipes for all three streams, even those the container does not have: a template
    /// taken from the process then has pipes that later instances' streams replace
    /// (a checkpointed /dev/null stays /dev/null in every restored instance).
    pub pipe_all: bool,
}

fn chown(fd: &OwnedFd, owner: (u32, u32)) -> std::io::Result<()> {
    if owner != (0, 0) {
        fchown(
            fd.as_raw_fd(),
            Some(Uid::from_raw(owner.0)),
            Some(Gid::from_raw(owner.1)),
        )?;
    }
    Ok(())
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Opens the process ends of the streams and starts the copying; returns which streams the
/// descriptors are for, in stdin, stdout, stderr order.
pub fn open(s: &Streams) -> std::io::Result<(Stdio, Vec<OwnedFd>)> {
    let out = parse(s.stdout).map_err(other)?;
    let err = parse(s.stderr).map_err(other)?;
    let stdio = Stdio {
        stdin: !s.stdin.is_empty() || s.pipe_all,
        stdout: out != Output::None || s.pipe_all,
        stderr: err != Output::None || s.pipe_all,
    };
    let (process, shim) = pipes(stdio, s.owner)?;
    connect(s, shim, out, err)?;
    Ok((stdio, process))
}

/// The shim's ends of a process's stdio pipes, not connected to anything yet.
#[derive(Debug, Default)]
pub struct ShimEnds {
    /// Write end of stdin.
    pub stdin: Option<OwnedFd>,
    /// Read ends of stdout and stderr.
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// Pipes for the wanted streams: the process's ends (stdin, stdout, stderr order) and the
/// shim's.
pub fn pipes(wanted: Stdio, owner: (u32, u32)) -> std::io::Result<(Vec<OwnedFd>, ShimEnds)> {
    let mut process = Vec::new();
    let mut shim = ShimEnds::default();
    if wanted.stdin {
        let (r, w) = pipe2(OFlag::O_CLOEXEC)?;
        chown(&r, owner)?;
        process.push(r);
        shim.stdin = Some(w);
    }
    for (want, end) in [
        (wanted.stdout, &mut shim.stdout),
        (wanted.stderr, &mut shim.stderr),
    ] {
        if want {
            let (r, w) = pipe2(OFlag::O_CLOEXEC)?;
            chown(&w, owner)?;
            process.push(w);
            *end = Some(r);
        }
    }
    Ok((process, shim))
}

/// Connects the shim's ends of a process's pipes (made now, or earlier for a spare
/// instance) to a container's streams. A stream the container does not have behaves as
/// /dev/null would: stdin reads EOF, output is discarded.
pub fn attach(s: &Streams, shim: ShimEnds) -> std::io::Result<()> {
    let out = parse(s.stdout).map_err(other)?;
    let err = parse(s.stderr).map_err(other)?;
    connect(s, shim, out, err)
}

fn connect(s: &Streams, mut shim: ShimEnds, out: Output, err: Output) -> std::io::Result<()> {
    if s.stdin.is_empty() {
        shim.stdin = None;
    }
    for (o, end) in [(&out, &mut shim.stdout), (&err, &mut shim.stderr)] {
        if *o == Output::None {
            if let Some(r) = end.take() {
                copy_to_file(
                    File::from(r),
                    OpenOptions::new().write(true).open("/dev/null")?,
                    None,
                );
            }
        }
    }
    wire(s, shim, out, err)
}

/// Starts the copying between the shim's ends and containerd's side of the streams.
fn wire(s: &Streams, shim: ShimEnds, out: Output, err: Output) -> std::io::Result<()> {
    if let Some(w) = shim.stdin {
        copy_in(s.stdin.to_string(), File::from(w));
    }
    match (&out, &err) {
        (Output::Binary { path, args }, _) => {
            let readers = [shim.stdout, shim.stderr].into_iter().flatten().collect();
            spawn_logger(path, args, s, readers)?;
        }
        (Output::File(path), _) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            for (r, name) in [(shim.stdout, s.stdout), (shim.stderr, s.stderr)] {
                if let Some(r) = r {
                    copy_to_file(File::from(r), file.try_clone()?, Some(Copying::new(name)));
                }
            }
        }
        _ => {
            // Paired by stream: a stream without output has no reader.
            for (o, r, name) in [(out, shim.stdout, s.stdout), (err, shim.stderr, s.stderr)] {
                if let (Output::Fifo(fifo), Some(r)) = (o, r) {
                    copy_out(File::from(r), fifo, Some(Copying::new(name)));
                }
            }
        }
    }
    Ok(())
}

const LOGGER_READY_MS: u16 = 10_000;

/// Starts a containerd logging binary: stdout on fd 3, stderr on fd 4, and fd 5 which it
/// closes (or writes to) when it is ready; waits for that.
fn spawn_logger(
    path: &PathBuf,
    args: &[String],
    s: &Streams,
    readers: Vec<OwnedFd>,
) -> std::io::Result<()> {
    let (ready_r, ready_w) = pipe2(OFlag::O_CLOEXEC)?;
    let mut inherit: Vec<i32> = readers.iter().map(|f| f.as_raw_fd()).collect();
    // A logger for one stream still expects both fds; give it an empty pipe for the other.
    let mut spare = Vec::new();
    while inherit.len() < 2 {
        let (r, w) = pipe2(OFlag::O_CLOEXEC)?;
        inherit.push(r.as_raw_fd());
        spare.push(r);
        drop(w);
    }
    inherit.push(ready_w.as_raw_fd());
    let mut cmd = std::process::Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", s.id)
        .env("CONTAINER_NAMESPACE", s.namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let src = [inherit[0], inherit[1], inherit[2]];
    // SAFETY: the closure only calls fcntl, dup2 and setsid, all async-signal-safe, on descriptors
    // that stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // Move the sources above 3..=5 first, so no dup2 overwrites a later source.
            let mut high = [0; 3];
            for (n, fd) in src.iter().enumerate() {
                high[n] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
                if high[n] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, fd) in (3..).zip(high.iter()) {
                if libc::dup2(*fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::setsid();
            Ok(())
        });
    }
    // The shim's reaper collects the logger when it ends; the handle is not waited on.
    cmd.spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("starting logger {path:?}: {e}")))?;
    drop(ready_w);
    drop(readers);
    drop(spare);
    // Like containerd, wait for a byte or EOF; but not forever on a logger that hangs.
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&ready_r),
        nix::poll::PollFlags::POLLIN,
    )];
    let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(LOGGER_READY_MS))?;
    if ready == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "logger {path:?} did not close or write fd 5 within {LOGGER_READY_MS} ms \
                 (its children must not inherit fd 5)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_uris() {
        assert_eq!(parse("").unwrap(), Output::None);
        assert_eq!(parse("/run/f").unwrap(), Output::Fifo("/run/f".into()));
        assert_eq!(
            parse("fifo:///run/f").unwrap(),
            Output::Fifo("/run/f".into())
        );
        assert_eq!(
            parse("file:///var/log/c.log").unwrap(),
            Output::File("/var/log/c.log".into())
        );
        assert_eq!(
            parse("binary:///bin/logger?level=debug&json").unwrap(),
            Output::Binary {
                path: "/bin/logger".into(),
                args: vec!["level".into(), "debug".into(), "json".into()]
            }
        );
        assert!(parse("http://x/y").unwrap_err().contains("unsupported"));
        assert!(parse("file://relative").unwrap_err().contains("absolute"));
    }
}
