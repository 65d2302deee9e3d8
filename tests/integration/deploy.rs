//! The systemd unit in `deploy/`: it verifies, and its exposure score stays at or below 2.0.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_miralix-gateway");
const MAX_EXPOSURE: f64 = 2.0;

/// `systemd-analyze`, or `None` outside CI where it is not installed (`.ci/run` installs it).
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing in CI; .ci/run installs the systemd package"
        );
        eprintln!("skipped: systemd-analyze is not installed (apt-get install systemd)");
    }
    found.then_some("systemd-analyze")
}

/// The unit with `ExecStart` pointing at the binary under test, as a file named like the real one.
fn unit_under_test(dir: &Path) -> std::path::PathBuf {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/miralix-gateway.service"),
    )
    .unwrap();
    assert!(unit.contains("/usr/bin/miralix-gateway"));
    let path = dir.join("miralix-gateway.service");
    std::fs::write(&path, unit.replace("/usr/bin/miralix-gateway", BIN)).unwrap();
    path
}

#[test]
fn the_unit_verifies() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let output = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("miralix-gateway.service"), "{stderr}");
}

#[test]
fn the_unit_exposure_is_at_most_two() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let output = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let exposure: f64 = stdout
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for miralix-gateway.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{stdout}"
    );
}

#[test]
fn every_file_the_debian_package_ships_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let sources: Vec<&str> = manifest
        .lines()
        .filter_map(|line| line.trim().strip_prefix("[\"")?.split('"').next())
        .collect();
    assert!(sources.len() >= 4, "assets found: {sources:?}");
    for source in sources {
        // The binary is built by `cargo deb` itself.
        if source != "target/release/miralix-gateway" {
            assert!(
                root.join(source).is_file(),
                "package asset {source} is missing"
            );
        }
    }
    assert!(
        root.join("deploy/miralix-gateway.service").is_file(),
        "systemd-units unit-scripts"
    );
}
