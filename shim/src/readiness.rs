//! `io.trenv.ready`: when a started container counts as initialised.
//!
//! `tcp:<port>` (a connection to 127.0.0.1:<port> in the container's network namespace is
//! accepted), `http:<port><path>` (a GET of <path> there answers with a status below 500),
//! `file:<path>` (the path exists in the container's root), `delay:<ms>`. With it, Start returns
//! once the container is ready (or its process has exited, or `[timeouts] ready_secs` ran out:
//! the task is running either way, so Start still succeeds and the shim logs why it stopped
//! waiting). A platform's first request then meets an initialised function instead of a
//! connection refused; the same moment is where templates are snapshotted.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Component, PathBuf};
use std::time::{Duration, Instant};

/// How often a probe is retried.
const EVERY: Duration = Duration::from_millis(5);
/// How long one connection attempt or HTTP exchange may take.
const ATTEMPT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    Tcp(u16),
    Http { port: u16, path: String },
    File(PathBuf),
    Delay(Duration),
}

/// Why waiting ended without the container being ready.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotReady {
    #[error("not ready after {0:?}")]
    Timeout(Duration),
    #[error("its process exited")]
    Exited,
    #[error("cannot enter its network namespace: {0}")]
    Netns(String),
}

impl std::str::FromStr for Ready {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const EXPECTED: &str = "expected tcp:<port>, http:<port><path>, file:<path> or delay:<ms>";
        let (kind, arg) = s.split_once(':').ok_or(EXPECTED)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or(EXPECTED);
        match kind {
            "tcp" => Ok(Ready::Tcp(port(arg)?)),
            "http" => {
                let at = arg.find('/').ok_or(EXPECTED)?;
                let path = &arg[at..];
                if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(EXPECTED);
                }
                Ok(Ready::Http {
                    port: port(&arg[..at])?,
                    path: path.to_string(),
                })
            }
            "file" => {
                let p = PathBuf::from(arg);
                let inside = p.is_absolute()
                    && p.components()
                        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
                if !inside {
                    return Err(EXPECTED);
                }
                Ok(Ready::File(p))
            }
            "delay" => arg
                .parse::<u64>()
                .map(|ms| Ready::Delay(Duration::from_millis(ms)))
                .map_err(|_| EXPECTED),
            _ => Err(EXPECTED),
        }
    }
}

impl Ready {
    /// Waits until process `pid` (a container's init) is ready, at most `timeout`; how long
    /// it took.
    pub fn wait(&self, pid: i32, timeout: Duration) -> Result<Duration, NotReady> {
        let start = Instant::now();
        let deadline = start + timeout;
        match self {
            Ready::Delay(d) => {
                std::thread::sleep((*d).min(timeout));
                return if *d <= timeout {
                    Ok(start.elapsed())
                } else {
                    Err(NotReady::Timeout(timeout))
                };
            }
            Ready::File(path) => {
                let rel = path.strip_prefix("/").unwrap_or(path);
                let target = PathBuf::from(format!("/proc/{pid}/root")).join(rel);
                poll(pid, deadline, timeout, || target.exists())?;
            }
            Ready::Tcp(port) => {
                let port = *port;
                in_netns(pid, move || {
                    poll(pid, deadline, timeout, || tcp_accepts(port))
                })??;
            }
            Ready::Http { port, path } => {
                let (port, path) = (*port, path.clone());
                in_netns(pid, move || {
                    poll(pid, deadline, timeout, || http_answers(port, &path))
                })??;
            }
        }
        Ok(start.elapsed())
    }
}

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie (exited, not reaped yet) counts as gone.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
}

fn poll(
    pid: i32,
    deadline: Instant,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), NotReady> {
    loop {
        if ready() {
            return Ok(());
        }
        if !alive(pid) {
            return Err(NotReady::Exited);
        }
        if Instant::now() >= deadline {
            return Err(NotReady::Timeout(timeout));
        }
        std::thread::sleep(EVERY);
    }
}

/// Runs `f` in a thread of its own that has joined `pid`'s network namespace (setns changes
/// only the calling thread's).
fn in_netns<T: Send + 'static>(
    pid: i32,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NotReady> {
    let ns = File::open(format!("/proc/{pid}/ns/net")).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            NotReady::Exited
        } else {
            NotReady::Netns(e.to_string())
        }
    })?;
    std::thread::Builder::new()
        .name("ready-probe".into())
        .spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NotReady::Netns(e.to_string()))?;
            Ok(f())
        })
        .map_err(|e| NotReady::Netns(e.to_string()))?
        .join()
        .map_err(|_| NotReady::Netns("probe thread panicked".into()))?
}

fn tcp_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), ATTEMPT).is_ok()
}

fn http_answers(port: u16, path: &str) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), ATTEMPT)
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(ATTEMPT));
    let _ = s.set_write_timeout(Some(ATTEMPT));
    let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 32];
    let mut got = 0;
    while got < head.len() {
        match s.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    // The rest of the answer is read to its end (bounded): closing with unread data sends a
    // reset, which servers such as Python's http.server report as an error on stderr — and
    // a checkpoint taken right after the probe would catch the connection half-closed.
    let mut rest = [0u8; 4096];
    let until = Instant::now() + ATTEMPT;
    while Instant::now() < until {
        match s.read(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // "HTTP/1.x NNN ..."
    std::str::from_utf8(&head[..got])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .is_some_and(|code| (100..500).contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn me() -> i32 {
        i32::try_from(std::process::id()).unwrap()
    }

    #[test]
    fn parses_the_documented_forms_and_rejects_the_rest() {
        assert_eq!("tcp:8080".parse(), Ok(Ready::Tcp(8080)));
        assert_eq!(
            "http:8080/healthz?x=1".parse(),
            Ok(Ready::Http {
                port: 8080,
                path: "/healthz?x=1".into()
            })
        );
        assert_eq!(
            "file:/tmp/ready".parse(),
            Ok(Ready::File("/tmp/ready".into()))
        );
        assert_eq!(
            "delay:250".parse(),
            Ok(Ready::Delay(Duration::from_millis(250)))
        );
        for bad in [
            "",
            "tcp",
            "tcp:",
            "tcp:0",
            "tcp:70000",
            "http:8080",
            "http:/x",
            "http:80/a b",
            "file:relative",
            "file:/../etc",
            "delay:-1",
            "delay:soon",
            "udp:53",
        ] {
            assert!(bad.parse::<Ready>().is_err(), "{bad:?} accepted");
        }
    }

    /// Answers `n` requests on `l` with `status_line`.
    fn answer(l: &TcpListener, status_line: &'static [u8], n: usize) {
        for s in l.incoming().take(n) {
            let mut s = s.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf);
            let _ = s.write_all(status_line);
        }
    }

    #[test]
    fn tcp_and_http_wait_for_a_late_listener() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
            answer(&l, b"HTTP/1.0 204 No Content\r\n\r\n", 2);
        });
        let took = Ready::Http {
            port,
            path: "/".into(),
        }
        .wait(me(), Duration::from_secs(10))
        .unwrap();
        assert!(took >= Duration::from_millis(150), "{took:?}");
        Ready::Tcp(port)
            .wait(me(), Duration::from_secs(10))
            .unwrap();
        server.join().unwrap();
    }

    #[test]
    fn a_server_error_is_not_ready_and_timeouts_are_reported() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || answer(&l, b"HTTP/1.0 503 Busy\r\n\r\n", usize::MAX));
        let probe = Ready::Http {
            port,
            path: "/".into(),
        };
        assert_eq!(
            probe.wait(me(), Duration::from_millis(200)),
            Err(NotReady::Timeout(Duration::from_millis(200)))
        );
        assert!(Ready::Delay(Duration::from_secs(5))
            .wait(me(), Duration::from_millis(10))
            .is_err());
    }

    #[test]
    fn file_and_exit() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ready");
        let probe = Ready::File(f.clone());
        let g = f.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(g, b"").unwrap();
        });
        probe.wait(me(), Duration::from_secs(10)).unwrap();

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let never = Ready::File("/no/such/file".into());
        assert_eq!(
            never.wait(pid, Duration::from_secs(10)),
            Err(NotReady::Exited)
        );
        child.wait().unwrap();
        assert_eq!(
            never.wait(pid, Duration::from_secs(10)),
            Err(NotReady::Exited)
        );
    }
}
