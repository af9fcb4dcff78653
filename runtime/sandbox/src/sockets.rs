//! Counting the sockets a sandbox's network namespace still has, through sock_diag.
//!
//! `/proc/<pid>/net/tcp{,6}` walks the host-wide established hash for every read, and that
//! table is sized for the whole machine: on a host with few connections it still costs
//! several milliseconds of CPU per sandbox purge, competing with the container starts the
//! pool is there to speed up. A sock_diag dump restricted to LISTEN only walks the
//! listening hash. UDP has no connection table, so every UDP socket counts as bound.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    #[error("opening {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    #[error("sock_diag {what}: {source}")]
    Sys {
        what: &'static str,
        source: nix::Error,
    },
    #[error("sock_diag answered {0}")]
    Protocol(String),
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const ALL_STATES: u32 = u32::MAX;

/// One dump: which family and protocol, and which socket states count.
#[derive(Debug, Clone, Copy)]
struct Query {
    family: u8,
    protocol: u8,
    states: u32,
}

// Address families and protocol numbers are below 256.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
const QUERIES: [Query; 4] = [
    Query {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_TCP as u8,
        states: 1 << TCP_LISTEN,
    },
    Query {
        family: libc::AF_INET6 as u8,
        protocol: libc::IPPROTO_TCP as u8,
        states: 1 << TCP_LISTEN,
    },
    Query {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_UDP as u8,
        states: ALL_STATES,
    },
    Query {
        family: libc::AF_INET6 as u8,
        protocol: libc::IPPROTO_UDP as u8,
        states: ALL_STATES,
    },
];

/// Listening TCP and bound UDP sockets (IPv4 and IPv6) in the network namespace `netns`
/// (a path such as `/proc/<pid>/ns/net`).
pub fn listening_or_bound(netns: &Path) -> Result<usize, SocketsError> {
    let sock = socket_in(netns)?;
    let mut n = 0;
    for (seq, q) in (1u32..).zip(QUERIES.iter()) {
        n += dump(&sock, *q, seq)?;
    }
    Ok(n)
}

/// A sock_diag socket bound to `netns`: a netlink socket answers for the namespace it was
/// created in, so a short-lived thread joins the namespace (setns of a network namespace
/// is per thread) and creates it there, leaving the caller's threads where they are.
fn socket_in(netns: &Path) -> Result<OwnedFd, SocketsError> {
    let ns = std::fs::File::open(netns).map_err(|source| SocketsError::Netns {
        path: netns.display().to_string(),
        source,
    })?;
    let made = std::thread::spawn(move || -> Result<OwnedFd, SocketsError> {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
            SocketsError::Sys {
                what: "joining the network namespace",
                source,
            }
        })?;
        socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )
        .map_err(|source| SocketsError::Sys {
            what: "socket",
            source,
        })
    })
    .join();
    made.map_err(|_| SocketsError::Protocol("namespace thread panicked".into()))?
}

/// The request: nlmsghdr followed by inet_diag_req_v2 with an all-zero socket id.
fn request(q: Query, seq: u32) -> Vec<u8> {
    const REQ_LEN: usize = 56;
    const LEN: usize = NLMSG_HDRLEN + REQ_LEN;
    // Both are protocol constants that fit their netlink header fields.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let (len, flags) = (LEN as u32, (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16);
    let mut m = Vec::with_capacity(LEN);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[q.family, q.protocol, 0, 0]);
    m.extend_from_slice(&q.states.to_ne_bytes());
    m.resize(LEN, 0);
    m
}

fn dump(sock: &OwnedFd, q: Query, seq: u32) -> Result<usize, SocketsError> {
    sendto(
        sock.as_raw_fd(),
        &request(q, seq),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|source| SocketsError::Sys {
        what: "send",
        source,
    })?;
    let mut buf = vec![0u8; 32 * 1024];
    let mut count = 0;
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|source| {
            SocketsError::Sys {
                what: "recv",
                source,
            }
        })?;
        match parse(&buf[..n], seq)? {
            Batch::More(c) => count += c,
            Batch::Done(c) => return Ok(count + c),
        }
    }
}

enum Batch {
    More(usize),
    Done(usize),
}

/// Counts the socket records in one datagram of a dump answer.
fn parse(mut b: &[u8], seq: u32) -> Result<Batch, SocketsError> {
    let mut count = 0;
    while b.len() >= NLMSG_HDRLEN {
        let word = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let len = word(0) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(SocketsError::Protocol(format!("a message of {len} bytes")));
        }
        if word(8) == seq {
            match kind {
                NLMSG_DONE => return Ok(Batch::Done(count)),
                NLMSG_ERROR => {
                    let errno = if len >= NLMSG_HDRLEN + 4 {
                        -i32::from_ne_bytes(word(NLMSG_HDRLEN).to_ne_bytes())
                    } else {
                        0
                    };
                    return Err(SocketsError::Protocol(
                        std::io::Error::from_raw_os_error(errno).to_string(),
                    ));
                }
                SOCK_DIAG_BY_FAMILY => count += 1,
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    Ok(Batch::More(count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};

    /// A fresh network namespace with loopback up, held by a thread that runs `f` in it.
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare net");
            // A child inherits the namespaces of the thread that forks it.
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            assert!(up.map(|s| s.success()).unwrap_or(false));
            f()
        })
        .join()
        .expect("netns thread")
    }

    fn own_netns() -> std::path::PathBuf {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        std::path::PathBuf::from(format!("/proc/self/task/{tid}/ns/net"))
    }

    #[test]
    fn counts_listeners_and_udp_but_not_connections() {
        in_new_netns(|| {
            let ns = own_netns();
            assert_eq!(listening_or_bound(&ns).unwrap(), 0);
            let l4 = TcpListener::bind("127.0.0.1:0").unwrap();
            let l6 = TcpListener::bind("[::1]:0").unwrap();
            assert_eq!(listening_or_bound(&ns).unwrap(), 2);
            // An accepted connection is not a listener: still two.
            let c = TcpStream::connect(l4.local_addr().unwrap()).unwrap();
            let (a, _) = l4.accept().unwrap();
            assert_eq!(listening_or_bound(&ns).unwrap(), 2);
            let u = UdpSocket::bind("127.0.0.1:0").unwrap();
            let u6 = UdpSocket::bind("[::1]:0").unwrap();
            assert_eq!(listening_or_bound(&ns).unwrap(), 4);
            drop((l4, l6, u, u6, c, a));
            // The kernel can still list a just-closed socket for a moment (seen once in ~20
            // runs, while other tests loaded the machine): zero within a second.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let mut left = listening_or_bound(&ns).unwrap();
            while left != 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
                left = listening_or_bound(&ns).unwrap();
            }
            assert_eq!(left, 0);
        });
    }

    #[test]
    fn other_namespaces_are_not_counted() {
        let _host = TcpListener::bind("127.0.0.1:0").unwrap();
        in_new_netns(|| assert_eq!(listening_or_bound(&own_netns()).unwrap(), 0));
    }

    #[test]
    fn a_missing_namespace_is_an_error() {
        let e = listening_or_bound(Path::new("/proc/0/ns/net")).unwrap_err();
        assert!(matches!(e, SocketsError::Netns { .. }), "{e}");
    }

    #[test]
    fn malformed_answers_are_errors() {
        let mut m = request(QUERIES[0], 7);
        m[0..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(parse(&m, 7).is_err());
        let mut done = request(QUERIES[0], 7);
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        assert!(matches!(parse(&done, 7), Ok(Batch::Done(0))));
        // A record for another request is not counted.
        let mut rec = request(QUERIES[0], 8);
        rec[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(matches!(parse(&rec, 7), Ok(Batch::More(0))));
    }
}
