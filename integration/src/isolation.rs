//! What the isolation tests leave in a sandbox for the next function to (not) find.

/// A Python program that dirties its sandbox in every way a purge must undo — System V IPC
/// objects, files in the rootfs, /tmp and /dev/shm, the hostname, a listening socket on port
/// 9999, a process in a session of its own — then writes /tmp/ready and sleeps.
pub const DIRTY: &str = r#"
import ctypes, os, socket, subprocess, time
libc = ctypes.CDLL(None, use_errno=True)
assert libc.shmget(0x1234, 4096, 0o1666) >= 0
assert libc.semget(0x1235, 1, 0o1666) >= 0
assert libc.msgget(0x1236, 0o1666) >= 0
for p in ["/a-root", "/tmp/a-tmp", "/dev/shm/a-shm"]:
    open(p, "w").write("secret")
socket.sethostname("tenant-a")
s = socket.socket()
s.bind(("0.0.0.0", 9999))
s.listen()
subprocess.Popen(["sleep", "1000"], start_new_session=True)
open("/tmp/ready", "w").write("1")
time.sleep(1000)
"#;

/// Asserts that the instance `check` runs shell commands in sees none of [`DIRTY`]'s System V
/// objects (only the three header lines of /proc/sysvipc) and none of its files.
pub fn assert_no_dirty_ipc_or_files(check: impl Fn(&str) -> String) {
    assert_eq!(
        check("cat /proc/sysvipc/shm /proc/sysvipc/sem /proc/sysvipc/msg | wc -l").trim(),
        "3",
        "System V objects left"
    );
    assert_eq!(
        check("ls /a-root /tmp/a-tmp /dev/shm/a-shm 2>/dev/null | wc -l").trim(),
        "0",
        "files left"
    );
}
