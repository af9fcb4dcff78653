//! OCI bundles built from the busybox example image.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use serde_json::{json, Value};

use crate::{cache_dir, workspace};

/// Directory holding the busybox image (rootfs/ and busybox-oci.tar), built on first use.
pub fn busybox_image() -> PathBuf {
    static BUILD: Once = Once::new();
    let dir = cache_dir().join("images/busybox");
    BUILD.call_once(|| {
        let status = Command::new(workspace().join("examples/busybox/build.sh"))
            .arg(&dir)
            .status()
            .expect("running examples/busybox/build.sh");
        assert!(status.success(), "building the busybox image failed");
    });
    dir
}

/// The Debian + Python example image (examples/python), built on first use.
pub fn python_image() -> PathBuf {
    static BUILD: Once = Once::new();
    debian_image(&BUILD, "python", &[])
}

/// The Python image plus Debian's nodejs (the template tests' Node function).
pub fn node_image() -> PathBuf {
    static BUILD: Once = Once::new();
    debian_image(&BUILD, "python-node", &["nodejs"])
}

/// An examples/python image with extra Debian packages, built once per test process.
fn debian_image(once: &Once, name: &str, packages: &[&str]) -> PathBuf {
    let dir = cache_dir().join("images").join(name);
    once.call_once(|| {
        let status = Command::new("bash")
            .arg(workspace().join("examples/python/build.sh"))
            .arg(&dir)
            .args(packages)
            .status()
            .expect("running examples/python/build.sh");
        assert!(status.success(), "building the {name} image failed");
    });
    dir
}

/// A bundle directory with its own copy of the busybox rootfs. Removed on drop.
pub struct Bundle {
    dir: tempfile::TempDir,
    pub id: String,
}

impl Bundle {
    /// A bundle running `args`, with a writable rootfs and a cgroup under /trenv-it.
    pub fn new(id: &str, args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("trenv-it-bundle-")
            .tempdir()
            .expect("tempdir");
        let src = busybox_image().join("rootfs");
        let st = Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(dir.path().join("rootfs"))
            .status()
            .expect("cp rootfs");
        assert!(st.success());
        let b = Self {
            dir,
            id: id.to_string(),
        };
        b.write_config(&default_config(id, args));
        b
    }

    /// A second bundle with a copy of this one's rootfs as it is now, for another container.
    pub fn clone_as(&self, id: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("trenv-it-bundle-")
            .tempdir()
            .expect("tempdir");
        let st = Command::new("cp")
            .arg("-a")
            .arg(self.rootfs())
            .arg(dir.path().join("rootfs"))
            .status()
            .expect("cp rootfs");
        assert!(st.success());
        let mut cfg = self.config();
        cfg["linux"]["cgroupsPath"] = json!(cgroup_path(id));
        let b = Self {
            dir,
            id: id.to_string(),
        };
        b.write_config(&cfg);
        b
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    pub fn config(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.path().join("config.json")).expect("config");
        serde_json::from_str(&text).expect("config json")
    }

    pub fn write_config(&self, v: &Value) {
        std::fs::write(
            self.dir.path().join("config.json"),
            serde_json::to_vec_pretty(v).expect("json"),
        )
        .expect("write config");
    }

    /// Edits config.json in place.
    pub fn edit(&self, f: impl FnOnce(&mut Value)) {
        let mut v = self.config();
        f(&mut v);
        self.write_config(&v);
    }
}

/// The cgroup path tests give their containers.
pub fn cgroup_path(id: &str) -> String {
    format!("/trenv-it/{id}")
}

/// A minimal runc-style config: new pid, mount, ipc, uts, net namespaces, /proc, /dev, /sys.
pub fn default_config(id: &str, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID"],
                "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID"],
                "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_SETUID", "CAP_SETGID"]
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": "rootfs", "readonly": false },
        "hostname": "trenv-it",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "cgroupsPath": cgroup_path(id),
            "resources": { "devices": [{ "allow": false, "access": "rwm" }] },
            "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "ipc" },
                { "type": "uts" }, { "type": "mount" }
            ],
            "maskedPaths": ["/proc/kcore", "/proc/timer_list", "/proc/sched_debug", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}
