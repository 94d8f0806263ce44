//! The Debian package (`make deb`, scripts/deb.sh), built from the binary
//! cargo built for the tests (no second, release build), then installed as
//! an administrator installs it: `apt-get install ./clx-pool_….deb` into a
//! Debian root (the CLM test image, `make clm-test-image`, Debian trixie
//! minbase), where the binary, man pages and completions are checked, the
//! example config is checked and run as a pool by the unit's own
//! `ExecStart=`, reloaded by its `ExecReload=` and stopped as systemd stops
//! it, and the package removed again. The image has no systemd, so the
//! unit's keys are read and its commands run by hand. Without Docker, the
//! image or dpkg-deb the container test skips with a message, and fails
//! under CI=true.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{bin, repo_path, stderr, stdout, wait_for};

const IMAGE: &str = "clx-pool/clm-test:1.35.0";
const UNIT: &str = "/usr/lib/systemd/system/clx-pool@.service";
const EXAMPLE: &str = "/usr/share/doc/clx-pool/examples/pool.toml";
/// The instance the tests install, as in the docs: clx-pool@mypool.
const CONFIG: &str = "/etc/clx-pool/mypool.toml";

/// The package's version as Debian writes it (a semver pre-release's dash
/// becomes a tilde).
fn deb_version() -> String {
    env!("CARGO_PKG_VERSION").replacen('-', "~", 1)
}

/// Builds the package of the test binary into `out`; its path.
fn build_deb(out: &Path) -> PathBuf {
    let o = Command::new("bash")
        .arg(repo_path("scripts/deb.sh"))
        .arg(bin())
        .arg(out)
        // A faster xz level: the package is larger, the build ten times quicker.
        .env("DEB_XZ_LEVEL", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "scripts/deb.sh failed:\n{}", stderr(&o));
    let deb = PathBuf::from(stdout(&o).trim());
    let arch = host(&["dpkg", "--print-architecture"]);
    assert_eq!(
        deb,
        out.join(format!("clx-pool_{}_{}.deb", deb_version(), arch.trim())),
        "the package's file name"
    );
    deb
}

fn host(args: &[&str]) -> String {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    stdout(&o)
}

/// dpkg-deb (to build), a Docker engine and the image, or a skip message
/// (a failure under CI=true, where .ci/run provides them).
fn ready(need_docker: bool) -> bool {
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let problem = if !works(&["dpkg-deb", "--version"]) {
        "dpkg-deb is missing (apt-get install dpkg-dev)".to_string()
    } else if need_docker && !works(&["docker", "info"]) {
        "no Docker engine answers (start dockerd)".to_string()
    } else if need_docker && !works(&["docker", "image", "inspect", IMAGE]) {
        format!("{IMAGE} is missing (run `make clm-test-image`)")
    } else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("package tests cannot run under CI: {problem}");
    }
    eprintln!("SKIPPED: {problem}");
    false
}

#[test]
fn package_holds_what_an_administrator_needs_owned_by_root() {
    if !ready(false) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let deb = build_deb(dir.path());

    let field = |name: &str| {
        host(&["dpkg-deb", "--field", deb.to_str().unwrap(), name])
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "clx-pool");
    assert_eq!(field("Version"), deb_version());
    assert_eq!(field("Architecture"), host(&["dpkg", "--print-architecture"]).trim());
    assert_eq!(field("Section"), "admin");
    assert_eq!(field("Priority"), "optional");
    assert!(!field("Maintainer").is_empty());
    let depends = field("Depends");
    assert!(depends.starts_with("libc6 (>= 2."), "Depends: {depends}");

    let contents = host(&["dpkg-deb", "--contents", deb.to_str().unwrap()]);
    let mut paths = Vec::new();
    for line in contents.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "root/root", "every file is root's: {line}");
        paths.push(cols[5].trim_start_matches('.').to_string());
    }
    for want in [
        "/usr/bin/clx-pool",
        "/usr/share/man/man1/clx-pool.1.gz",
        "/usr/share/man/man1/clx-pool-start.1.gz",
        "/usr/share/bash-completion/completions/clx-pool",
        "/usr/share/zsh/vendor-completions/_clx-pool",
        "/usr/share/fish/vendor_completions.d/clx-pool.fish",
        EXAMPLE,
        "/usr/share/doc/clx-pool/copyright",
        "/usr/share/doc/clx-pool/README.md.gz",
        UNIT,
        "/etc/clx-pool/",
    ] {
        assert!(
            paths.iter().any(|p| p == want),
            "{want} is not in the package:\n{contents}"
        );
    }
    // Everything under /usr or in /etc/clx-pool (nothing in /usr/local, no
    // files under the /lib alias).
    for p in &paths {
        assert!(
            p == "/" || p.starts_with("/usr/") || p.starts_with("/etc/"),
            "{p} lies outside /usr"
        );
    }
}

/// A container of the test's own, removed when the test ends, also when it
/// fails. It sleeps as its main process, so commands run in it with
/// `docker exec`, and ends by itself after 5 minutes should even the
/// removal be skipped (a test runner's kill).
struct Debian(String);

impl Debian {
    fn start(deb: &Path) -> Debian {
        let name = format!("clx-test-deb-{}", std::process::id());
        let guard = Debian(name.clone());
        let mount = format!("{}:/pkg/clx-pool.deb:ro", deb.display());
        let o = Command::new("docker")
            .args(["run", "-d", "--rm", "--init", "--name", &name])
            .args(["--user", "0", "--network", "none", "-v", &mount])
            .args(["--entrypoint", "sleep", IMAGE, "300"])
            .output()
            .unwrap();
        assert!(o.status.success(), "docker run: {}", stderr(&o));
        guard
    }

    /// `sh -c script` in the container as root.
    fn sh(&self, script: &str) -> Output {
        Command::new("docker")
            .args(["exec", &self.0, "sh", "-c", script])
            .output()
            .unwrap()
    }

    /// Its stdout; panics with its output if it fails.
    fn ok(&self, script: &str) -> String {
        let o = self.sh(script);
        assert!(
            o.status.success(),
            "`{script}` failed ({}):\n{}{}",
            o.status,
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    /// `clx-pool stats --json` of the installed pool.
    fn stats(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&format!("clx-pool stats --json --config {CONFIG}"))).unwrap()
    }
}

impl Drop for Debian {
    fn drop(&mut self) {
        Command::new("docker")
            .args(["rm", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok();
    }
}

/// `[section] key=value` lines of a unit file, comments left out.
fn unit_value<'a>(unit: &'a str, section: &str, key: &str) -> Option<&'a str> {
    let mut current = "";
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = s;
        } else if current == section
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            return Some(v.trim());
        }
    }
    None
}

/// A unit's command line as systemd runs it for instance `mypool`: `%i`
/// expanded, `$$` a literal `$`, in systemd's minimal environment. The
/// unit's lines use only plain words and single quotes, which sh splits as
/// systemd does.
fn as_systemd_runs(command: &str, env: &str) -> String {
    let line = command.replace("%i", "mypool").replace("$$", "$");
    format!("env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin {env} {line}")
}

#[test]
fn package_installs_into_debian_and_its_unit_runs_the_example_pool() {
    if !ready(true) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let deb = build_deb(dir.path());
    let debian = Debian::start(&deb);

    // Installed as the docs say, from the file, with apt (offline: the
    // dependencies are already there).
    debian.ok("apt-get install -y --no-install-recommends /pkg/clx-pool.deb");
    let status = debian.ok("dpkg-query -W -f '${Status} ${Version}' clx-pool");
    assert_eq!(status, format!("install ok installed {}", deb_version()));
    debian.ok("dpkg --verify clx-pool");
    assert_eq!(debian.ok("command -v clx-pool").trim(), "/usr/bin/clx-pool");
    assert_eq!(
        debian.ok("clx-pool --version").trim(),
        format!("clx-pool {}", env!("CARGO_PKG_VERSION"))
    );

    // Man pages where man finds them (the image has no man-db: the file).
    if debian.sh("command -v man").status.success() {
        assert_eq!(debian.ok("man -w clx-pool").trim(), "/usr/share/man/man1/clx-pool.1.gz");
    }
    for page in ["clx-pool", "clx-pool-start", "clx-pool-check"] {
        let head = debian.ok(&format!("zcat /usr/share/man/man1/{page}.1.gz | grep '^\\.TH'"));
        assert!(head.starts_with(&format!(".TH {page} 1")), "{page}.1.gz: {head}");
    }

    // Completions where each shell looks for those of packages.
    debian.ok("bash -n /usr/share/bash-completion/completions/clx-pool");
    debian.ok("grep -q 'complete -F .* clx-pool$' /usr/share/bash-completion/completions/clx-pool");
    debian.ok("head -n 1 /usr/share/zsh/vendor-completions/_clx-pool | grep -qx '#compdef clx-pool'");
    debian.ok("grep -q '^complete -c clx-pool' /usr/share/fish/vendor_completions.d/clx-pool.fish");
    debian.ok("grep -q '^License: MIT' /usr/share/doc/clx-pool/copyright");

    // The unit template, also at the /lib path of merged-/usr systems.
    let unit = debian.ok(&format!("cat {UNIT}"));
    assert_eq!(debian.ok("cat /lib/systemd/system/clx-pool@.service"), unit);
    let service = |key: &str| unit_value(&unit, "Service", key).unwrap_or_else(|| panic!("the unit has no {key}="));
    assert_eq!(service("Type"), "notify");
    assert_eq!(service("NotifyAccess"), "main");
    assert_eq!(service("KillMode"), "mixed");
    assert_eq!(service("Restart"), "on-failure");
    assert_eq!(
        service("ExecStart"),
        "/usr/bin/clx-pool start --config /etc/clx-pool/%i.toml"
    );
    assert_eq!(service("StateDirectory"), "clx-pool/%i");
    assert!(humantime::parse_duration(&format!("{}s", service("WatchdogSec"))).unwrap() > Duration::ZERO);
    assert_eq!(unit_value(&unit, "Install", "WantedBy"), Some("multi-user.target"));
    if debian.sh("command -v systemd-analyze").status.success() {
        debian.ok(&format!("systemd-analyze verify --man=no {UNIT}"));
    }

    // The example, as an administrator sets up a pool: it passes `check`,
    // its folders are the unit's StateDirectory, and systemd waits longer
    // than its stop_timeout before killing.
    let example: toml::Table = toml::from_str(&debian.ok(&format!("cat {EXAMPLE}"))).unwrap();
    let pool = &example["pool"];
    assert!(
        pool["db_path"]
            .as_str()
            .unwrap()
            .starts_with("/var/lib/clx-pool/mypool/")
    );
    let stop_timeout = humantime::parse_duration(pool["stop_timeout"].as_str().unwrap()).unwrap();
    let stop_sec = Duration::from_secs(service("TimeoutStopSec").parse().unwrap());
    assert!(
        stop_sec > stop_timeout,
        "TimeoutStopSec {stop_sec:?} <= stop_timeout {stop_timeout:?}"
    );
    debian.ok(&format!("cp {EXAMPLE} {CONFIG}"));
    let check = debian.ok(&format!("clx-pool check --config {CONFIG}"));
    assert!(check.contains(": ok ("), "{check}");

    // Started by the unit's ExecStart= in the folder StateDirectory= makes.
    debian.ok("install -d -m 755 /var/lib/clx-pool/mypool");
    let start = as_systemd_runs(service("ExecStart"), "");
    debian.ok(&format!("{start} </dev/null >/var/lib/clx-pool/mypool.log 2>&1 &"));
    debian.ok(&format!("clx-pool wait --ready --timeout 60s --config {CONFIG}"));
    debian.ok("echo 'hello deb' > /var/lib/clx-pool/mypool/workspace/hello.txt");
    for (worker_type, out, want) in [
        ("upper", "out/upper.txt", "HELLO DEB"),
        ("copy", "out/copy.txt", "hello deb"),
    ] {
        debian.ok(&format!(
            "clx-pool submit --config {CONFIG} --wait --timeout 60s {worker_type} hello.txt {out}"
        ));
        let got = debian.ok(&format!("cat /var/lib/clx-pool/mypool/workspace/{out}"));
        assert_eq!(got.trim(), want, "{worker_type}'s output");
    }
    let pid = debian.stats()["supervisor"]["pid"]
        .as_i64()
        .expect("the supervisor's pid");

    // `systemctl reload`: ExecReload= with MAINPID, after an edit.
    debian.ok(&format!("sed -i 's/^count = 2$/count = 3/' {CONFIG}"));
    let reload = as_systemd_runs(service("ExecReload"), &format!("MAINPID={pid}"));
    debian.ok(&reload);
    wait_for("the reload's third copy worker", Duration::from_secs(60), || {
        (debian.stats()["pools"]["copy"]["running"].as_i64() == Some(3)).then_some(())
    });

    // `systemctl stop` (KillMode=mixed): SIGTERM to the supervisor alone,
    // which stops its workers and ends, well within TimeoutStopSec.
    debian.ok(&format!("kill -TERM {pid}"));
    wait_for("the pool to stop", stop_sec, || {
        let s = debian.stats();
        (s["supervisor"]["state"] == "stopped" && s["supervisor"]["running"] == false).then_some(s)
    });
    assert_eq!(debian.stats()["supervisor"]["stopped_uncleanly"], false);
    wait_for("no clx-pool process left", Duration::from_secs(10), || {
        debian
            .ok("cat /proc/[0-9]*/comm 2>/dev/null || true")
            .lines()
            .all(|c| c != "clx-pool")
            .then_some(())
    });

    // Removal: the program goes, the administrator's config and the pool's
    // data stay.
    debian.ok("apt-get purge -y clx-pool");
    debian.ok("! test -e /usr/bin/clx-pool");
    debian.ok(&format!("test -f {CONFIG} && test -f /var/lib/clx-pool/mypool/jobs.db"));
}
