//! `trenv install-containerd-config`: the handler it adds is what containerd's CRI plugin
//! reads, the rest of the config is kept, and a second run changes nothing.

use std::process::Command;

use trenv_integration::runtime::trenv_bin;

fn install(config: &std::path::Path) -> std::process::Output {
    Command::new(trenv_bin())
        .args(["install-containerd-config", "--config"])
        .arg(config)
        .output()
        .expect("run trenv")
}

#[test]
fn containerd_reads_the_handler_and_keeps_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    let before = "# site settings\nversion = 2\noom_score = -999\n\n\
        [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\"\n";
    std::fs::write(&config, before).expect("write");
    let out = install(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = std::fs::read_to_string(&config).expect("read");
    assert!(after.starts_with(before), "{after}");
    let again = install(&config);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing changed"));
    assert_eq!(std::fs::read_to_string(&config).expect("read"), after);

    // containerd's own view of the file, merged with its defaults.
    let dump = Command::new("containerd")
        .arg("--config")
        .arg(&config)
        .args(["config", "dump"])
        .output()
        .expect("containerd config dump");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    let table = dump
        .split("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.trenv]")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap_or_else(|| panic!("no trenv runtime in containerd's view:\n{dump}"));
    assert!(
        table.contains("runtime_type = \"io.containerd.trenv.v2\""),
        "{table}"
    );
    assert!(
        table.contains("pod_annotations = [\"io.trenv.*\"]"),
        "{table}"
    );
    assert!(dump.contains("oom_score = -999"), "{dump}");
    assert!(dump.contains("sandbox_image = \"registry.k8s.io/pause:3.9\""));
}

#[test]
fn a_different_runtime_of_that_name_is_not_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    let before = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.trenv]\n\
                  runtime_type = \"io.containerd.runc.v2\"\n";
    std::fs::write(&config, before).expect("write");
    let out = install(&config);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not replacing"));
    assert_eq!(std::fs::read_to_string(&config).expect("read"), before);
}
