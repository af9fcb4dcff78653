//! Terminals: the console socket libcontainer sends a pty master to, and the copy loops
//! between that master and containerd's FIFOs.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// A listening console socket at a short path (socket paths are limited to 108 bytes, and
/// containerd's bundle paths can be longer). Removed on drop.
pub struct ConsoleSocket {
    listener: UnixListener,
    pub path: PathBuf,
}

impl ConsoleSocket {
    pub fn new() -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from("/run/containerd/trenv/console");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!(
            "{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        Ok(Self { listener, path })
    }

    /// Receives the pty master the runtime sent (it has already connected by now).
    pub fn receive(&self) -> std::io::Result<File> {
        self.listener.set_nonblocking(true)?;
        let (stream, _) = self.listener.accept().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("no terminal was sent to the console socket: {e}"),
            )
        })?;
        stream.set_nonblocking(false)?;
        let mut buf = [0u8; 4096];
        let (_, fds) = trenv_oci::fdpass::recv_with_fds(stream.as_raw_fd(), &mut buf)
            .map_err(std::io::Error::from)?;
        if let Some(fd) = fds.into_iter().next() {
            return Ok(File::from(fd));
        }
        Err(std::io::Error::other(
            "console socket message carried no descriptor",
        ))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Output copiers still running, by the stream (containerd's stdout/stderr string) they
/// deliver: a process's exit is reported once its output is delivered.
fn copying() -> &'static (Mutex<HashMap<String, usize>>, Condvar) {
    static COPYING: OnceLock<(Mutex<HashMap<String, usize>>, Condvar)> = OnceLock::new();
    COPYING.get_or_init(|| (Mutex::new(HashMap::new()), Condvar::new()))
}

/// Counts one running copier of a stream until dropped.
pub struct Copying(String);

impl Copying {
    pub fn new(stream: &str) -> Self {
        let (m, _) = copying();
        *m.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(stream.to_string())
            .or_default() += 1;
        Self(stream.to_string())
    }
}

impl Drop for Copying {
    fn drop(&mut self) {
        let (m, cv) = copying();
        let mut g = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = g.get_mut(&self.0) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.0);
            }
        }
        cv.notify_all();
    }
}

/// Waits up to `timeout` until no copier of `streams` runs; whether none does.
pub fn wait_copied(streams: &[&str], timeout: std::time::Duration) -> bool {
    let (m, cv) = copying();
    let g = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let busy = |g: &mut HashMap<String, usize>| streams.iter().any(|s| g.contains_key(*s));
    let (mut g, _) = cv
        .wait_timeout_while(g, timeout, |g| busy(g))
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    !busy(&mut g)
}

/// Copies `from` into the FIFO at `fifo` until `from` ends, then closes the FIFO so its
/// reader sees EOF. The FIFO is opened for writing here, before the process can write, when
/// its reader is there already (containerd opens the reading ends before it creates the
/// task): a reader that finds no writer yet would take that for the end of the output.
/// Otherwise the thread opens it, which waits for a reader.
pub fn copy_out(mut from: impl Read + Send + 'static, fifo: String, guard: Option<Copying>) {
    let early = writer_if_read(&fifo);
    std::thread::spawn(move || {
        let _guard = guard;
        let out = match early {
            Some(f) => Ok(f),
            None => OpenOptions::new().write(true).open(&fifo),
        };
        let mut out = match out {
            Ok(f) => Some(f),
            Err(e) => {
                log::warn!("cannot open output FIFO {fifo}: {e}");
                None
            }
        };
        let mut buf = [0u8; 8192];
        // A terminal master fails with EIO once every slave is closed: also the end.
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            // Without a reader (`ctr run -d` exited), the output is dropped, but the pipe
            // is still read: the process neither dies of EPIPE nor blocks on a full pipe.
            // A reader that comes back (`ctr task attach`) gets what follows.
            if out.is_none() {
                out = writer_if_read(&fifo);
            }
            if out
                .as_mut()
                .is_some_and(|o| o.write_all(&buf[..n]).is_err())
            {
                out = None;
            }
        }
    });
}

/// The FIFO opened for writing if it has a reader now (None otherwise), in blocking mode:
/// the copier waits for a slow reader instead of failing.
fn writer_if_read(fifo: &str) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .and_then(|f| {
            let fd = std::os::fd::AsFd::as_fd(&f);
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::F_GETFL)?;
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::F_SETFL(flags))?;
            Ok(f)
        })
        .ok()
}

/// Copies `from` into an open file (a `file://` log) until `from` ends.
pub fn copy_to_file(mut from: impl Read + Send + 'static, mut to: File, guard: Option<Copying>) {
    std::thread::spawn(move || {
        let _guard = guard;
        let _ = std::io::copy(&mut from, &mut to);
    });
}

/// Copies the FIFO at `fifo` into `to` until the FIFO's writer closes, then drops `to` so the
/// process sees EOF on its stdin.
pub fn copy_in(fifo: String, mut to: impl Write + Send + 'static) {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(path_fd) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(&fifo)
    {
        if let Ok(mut w) = waiting().lock() {
            w.insert(fifo.clone(), path_fd.into());
        }
    }
    std::thread::spawn(move || {
        let opened = OpenOptions::new().read(true).open(&fifo);
        if let Ok(mut w) = waiting().lock() {
            w.remove(&fifo);
        }
        let Ok(mut input) = opened else {
            log::warn!("cannot open input FIFO {fifo}");
            return;
        };
        let mut buf = [0u8; 8192];
        while let Ok(n) = input.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// O_PATH descriptors of stdin FIFOs whose [`copy_in`] still waits for a writer, by path.
fn waiting() -> &'static std::sync::Mutex<std::collections::HashMap<String, std::os::fd::OwnedFd>> {
    static WAITING: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, std::os::fd::OwnedFd>>,
    > = std::sync::OnceLock::new();
    WAITING.get_or_init(Default::default)
}

/// Ends a [`copy_in`] still waiting for a writer of `fifo` (a client that never opened
/// its stdin, like `ctr run` without `-i`): opening the FIFO for writing completes the
/// waiting open, and closing it gives that reader EOF. The FIFO is reached through the
/// O_PATH descriptor taken before the wait, as clients unlink it before deleting the
/// task. A shim serving many tasks would otherwise keep one blocked thread per such task.
pub fn release_stdin(fifo: &str) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let Some(fd) = waiting().lock().ok().and_then(|mut w| w.remove(fifo)) else {
        return;
    };
    // O_NONBLOCK: fails with ENXIO instead of waiting when nobody reads any more.
    let _ = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()));
}

/// Copies stdin FIFO -> master and master -> stdout FIFO until the terminal closes.
pub fn spawn_copy(master: Arc<File>, stdin: &str, stdout: &str) -> std::io::Result<()> {
    if !stdout.is_empty() {
        copy_out(master.try_clone()?, stdout.to_string(), None);
    }
    if !stdin.is_empty() {
        copy_in(stdin.to_string(), master.try_clone()?);
    }
    Ok(())
}

/// Sets the terminal size (ResizePty).
pub fn resize(master: &File, width: u32, height: u32) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: u16::try_from(height).unwrap_or(u16::MAX),
        ws_col: u16::try_from(width).unwrap_or(u16::MAX),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct that lives for the duration of the call.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
