//! The three ways to install natrix, tested as an operator uses them: the
//! Debian package (built, installed with apt, its systemd unit verified,
//! the installed binary run as an unprivileged user), the container image
//! (built without a daemon, mounted, `natrix up` run inside as 65532), and
//! a binary with a config file (file < environment < flag). Plus the shell
//! completions and man pages the package installs.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Natrix, http_get, tool};

fn natrix() -> &'static str {
    env!("CARGO_BIN_EXE_natrix")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The target directory the test binaries were built into.
fn target_dir() -> PathBuf {
    Path::new(natrix())
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("natrix-pkg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// coturn's STUN client asks `port` on loopback for the mapped address.
fn stun_binding_answered(port: u16) {
    let out = Command::new(tool("turnutils_stunclient"))
        .args(["-p", &port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("127.0.0.1"),
        "no Binding answer on {port}: {text}"
    );
}

#[test]
fn completions_parse_in_bash_zsh_and_fish() {
    let dir = temp_dir("completions");
    for (shell, check) in [
        ("bash", vec!["bash", "-n"]),
        ("zsh", vec!["zsh", "-n"]),
        ("fish", vec!["fish", "--no-execute"]),
    ] {
        let script = run(Command::new(natrix()).args(["completions", shell]));
        assert!(
            script.contains("max-allocations-per-ip"),
            "{shell}: the relay's flags complete"
        );
        let path = dir.join(shell);
        std::fs::write(&path, script).unwrap();
        run(Command::new(tool(check[0])).args(&check[1..]).arg(&path));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn man_pages_render_for_every_command_without_warnings() {
    let dir = temp_dir("man");
    run(Command::new(natrix()).arg("man").arg(&dir));
    for page in [
        "natrix",
        "natrix-up",
        "natrix-relay",
        "natrix-lookup",
        "natrix-config",
    ] {
        let path = dir.join(format!("{page}.1"));
        let out = Command::new(tool("groff"))
            // -k: UTF-8 input through preconv, as man(1) renders it.
            .args(["-k", "-man", "-Tutf8", "-ww"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{page}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.trim().is_empty(), "{page}: groff warns: {stderr}");
        // Bold and underline are overstrikes: keep the characters.
        let mut text = String::new();
        for c in String::from_utf8_lossy(&out.stdout).chars() {
            if c == '\u{8}' {
                text.pop();
            } else {
                text.push(c);
            }
        }
        if page == "natrix-relay" {
            assert!(text.contains("--turn-listen"), "{text}");
            assert!(text.contains("NATRIX_TURN_LISTEN"), "env named: {text}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The effective configuration `natrix relay` logs at start, with `env`.
fn effective(config: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    use std::io::BufRead as _;
    let mut child = Command::new(natrix())
        .arg("--config")
        .arg(config)
        .args(["--log-format", "json"])
        .arg("relay")
        .args([
            "--turn-listen",
            &format!("127.0.0.1:{}", common::free_port()),
        ])
        .args(["--metrics-listen", "127.0.0.1:0", "--user", "u:p"])
        .args(args)
        .envs(env.iter().copied())
        .env_remove("NATRIX_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Read on a thread: a process that logs nothing must not hang the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let found = std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .take(200)
            .find(|l| l.contains("effective configuration"));
        let _ = tx.send(found);
    });
    let found = rx.recv_timeout(std::time::Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    match found {
        Ok(Some(line)) => line,
        Ok(None) => panic!("no effective configuration logged"),
        Err(_) => panic!("no effective configuration logged within 20 s"),
    }
}

#[test]
fn a_config_file_is_overridden_by_the_environment_and_flags_win_over_both() {
    let dir = temp_dir("config");
    let file = dir.join("natrix.toml");
    std::fs::write(
        &file,
        "[global]\nregion = \"file-region\"\nzone = \"file-zone\"\n\
         [relay]\nrealm = \"file-realm\"\nmax-allocations-per-ip = 7\n",
    )
    .unwrap();
    let line = effective(
        &file,
        &["--realm", "flag-realm"],
        &[("NATRIX_ZONE", "env-zone")],
    );
    assert!(line.contains(r#"region: \"file-region\""#), "{line}");
    assert!(line.contains(r#"zone: \"env-zone\""#), "{line}");
    assert!(line.contains(r#"realm: \"flag-realm\""#), "{line}");
    assert!(line.contains("max_allocations_per_ip: 7"), "{line}");
    // `natrix config check` names a wrong key and its nearest valid one.
    std::fs::write(&file, "[relay]\nmax-alocations-per-ip = 7\n").unwrap();
    let out = Command::new(natrix())
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max-alocations-per-ip") && stderr.contains("max-allocations-per-ip"),
        "{stderr}"
    );
    // And a process started with it refuses to start, saying so.
    let out = Command::new(natrix())
        .arg("--config")
        .arg(&file)
        .arg("relay")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-allocations-per-ip"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Builds, installs (apt), verifies and runs the Debian package; purges it.
/// Installing needs root (CI runs as root).
#[test]
fn the_debian_package_installs_its_unit_verifies_and_the_installed_binary_serves() {
    if !is_root() {
        eprintln!("skipped: installing a package needs root");
        return;
    }
    let out = temp_dir("deb");
    let deb = run(Command::new("bash")
        .arg(repo().join("cluster/packaging/build-deb"))
        .args(["--profile", "debug", "--no-build", "--out"])
        .arg(&out)
        .env("CARGO_TARGET_DIR", target_dir()));
    let deb = deb.trim();
    let info = run(Command::new("dpkg-deb").args(["--info", deb]));
    assert!(info.contains("Depends: libc6"), "{info}");
    let contents = run(Command::new("dpkg-deb").args(["--contents", deb]));
    for path in [
        "./usr/bin/natrix",
        "./usr/bin/natrix-loadtest",
        "./lib/systemd/system/natrix@.service",
        "./etc/natrix/natrix.toml",
        "./usr/share/man/man1/natrix-relay.1.gz",
        "./usr/share/bash-completion/completions/natrix",
        "./usr/share/zsh/vendor-completions/_natrix",
        "./usr/share/fish/vendor_completions.d/natrix.fish",
    ] {
        assert!(contents.contains(path), "{path} missing:\n{contents}");
    }
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", deb])
        .env("DEBIAN_FRONTEND", "noninteractive"));
    let purge = || {
        let _ = Command::new("apt-get")
            .args(["purge", "-y", "-qq", "natrix"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
    };
    let result = std::panic::catch_unwind(|| {
        let version = run(Command::new("/usr/bin/natrix").arg("--version"));
        assert!(version.starts_with("natrix "), "{version}");
        // The unit: no complaint from systemd, and its hardening scores.
        let verify = Command::new("systemd-analyze")
            .args(["verify", "natrix@relay.service"])
            .output()
            .unwrap();
        assert!(verify.status.success(), "{verify:?}");
        assert!(
            String::from_utf8_lossy(&verify.stderr).trim().is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        // Exposure at most 2.0 of 10 (the threshold counts tenths).
        let security = run(Command::new("systemd-analyze").args([
            "security",
            "--offline=true",
            "--threshold=20",
            "natrix@relay.service",
        ]));
        assert!(security.contains("Overall exposure level"), "{security}");
        run(Command::new("/usr/bin/natrix").args(["config", "check", "/etc/natrix/natrix.toml"]));
        let mode = std::fs::metadata("/etc/natrix/natrix.env").unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600,
            "the secrets file is root's only"
        );
        // The installed binary, with the installed config, as nobody.
        let n = Natrix::launch(
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/natrix",
                "--config",
                "/etc/natrix/natrix.toml",
            ],
            "up",
            &[],
        );
        stun_binding_answered(n.stun.port());
        assert_eq!(http_get(n.metrics, "/readyz").unwrap().0, 200);
    });
    purge();
    assert!(!Path::new("/usr/bin/natrix").exists(), "purged");
    let _ = std::fs::remove_dir_all(&out);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Builds the image without a daemon, checks its configuration against
/// the Helm chart's, mounts it and runs `natrix up` from inside it as the
/// image's user. Needs root (image storage and chroot).
#[test]
fn the_image_runs_natrix_up_as_65532_and_the_chart_pulls_its_tag() {
    if !is_root() {
        eprintln!("skipped: building and mounting an image needs root");
        return;
    }
    let tag = format!("natrix-test:{}", std::process::id());
    run(Command::new("bash")
        .arg(repo().join("cluster/packaging/build-image"))
        .args(["--profile", "debug", "--no-build", "--tag", &tag])
        .env("CARGO_TARGET_DIR", target_dir()));
    let cleanup = || {
        let _ = Command::new("podman")
            .args(["image", "unmount", &tag])
            .output();
        let _ = Command::new("podman").args(["rmi", "-f", &tag]).output();
    };
    let result = std::panic::catch_unwind(|| {
        let config = run(Command::new("podman").args([
            "image",
            "inspect",
            &tag,
            "--format",
            "{{.Config.User}} {{.Config.Entrypoint}} {{.Config.Cmd}}",
        ]));
        assert_eq!(config.trim(), "65532:65532 [/usr/local/bin/natrix] [up]");
        let root = run(Command::new("podman").args(["image", "mount", &tag]));
        let root = root.trim();
        assert!(
            !Path::new(root).join("bin/sh").exists(),
            "no shell in the image"
        );
        let userspec = "--userspec=65532:65532";
        let n = Natrix::launch(
            &["chroot", userspec, root, "/usr/local/bin/natrix"],
            "up",
            &[],
        );
        stun_binding_answered(n.stun.port());
        assert_eq!(http_get(n.metrics, "/readyz").unwrap().0, 200);
        // The load tester runs from it too (the chart's `helm test`).
        run(Command::new("chroot").args([
            userspec,
            root,
            "/usr/local/bin/natrix-loadtest",
            "--version",
        ]));
    });
    cleanup();
    result.unwrap();
    // What the chart pulls by default is what build-image tags by default.
    let chart = std::fs::read_to_string(repo().join("helm/natrix/Chart.yaml")).unwrap();
    let values = std::fs::read_to_string(repo().join("helm/natrix/values.yaml")).unwrap();
    let app_version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .unwrap()
        .trim()
        .trim_matches('"');
    let repository = values
        .lines()
        .skip_while(|l| !l.starts_with("image:"))
        .find_map(|l| l.trim().strip_prefix("repository:"))
        .unwrap()
        .trim();
    let version = run(Command::new(natrix()).arg("--version"));
    assert_eq!(
        format!("{repository}:{app_version}"),
        format!("natrix:{}", version.trim().trim_start_matches("natrix ")),
        "the chart's default image is build-image's default tag"
    );
}

/// `natrix up` on a terminal: one summary a person reads (listeners, URLs,
/// the development credentials, what to try), no library chatter.
#[test]
fn natrix_up_on_a_terminal_prints_one_short_summary() {
    let (turn, lookup, metrics) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let cmd = format!(
        "timeout -s INT 6 {} up --turn-listen 127.0.0.1:{turn} --lookup-listen 127.0.0.1:{lookup} \
         --metrics-listen 127.0.0.1:{metrics} --open-registration",
        natrix()
    );
    // `script` gives natrix a terminal.
    let out = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env_remove("NATRIX_LOG")
        .env_remove("NATRIX_LOG_FORMAT")
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let summary: Vec<&str> = screen
        .lines()
        .take_while(|l| !l.contains("Ctrl-C stops"))
        .collect();
    assert!(screen.contains("Ctrl-C stops"), "no summary:\n{screen}");
    assert!(summary.len() <= 25, "{} lines:\n{screen}", summary.len());
    for want in [
        format!("udp 127.0.0.1:{turn}"),
        format!("http://127.0.0.1:{lookup}/v1/plan"),
        format!("http://127.0.0.1:{lookup}/demo"),
        format!("http://127.0.0.1:{metrics}/metrics"),
        "TURN user     natrix:".to_owned(),
        "API key       nxk_".to_owned(),
        "natrix probe".to_owned(),
        "curl -H 'Authorization: Bearer nxk_".to_owned(),
    ] {
        assert!(screen.contains(&want), "{want} missing:\n{screen}");
    }
    for chatter in ["actix", "INFO", "effective configuration", "WARN"] {
        assert!(
            !screen.contains(chatter),
            "{chatter} on the first screen:\n{screen}"
        );
    }
}
