//! TURN over TLS: coturn's client over TLS, and certificate reloads (file
//! change, SIGHUP) that reach new connections without dropping a session.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Natrix, PASSWORD, USER, free_port, tool, uclient, udp_echo_peer};

/// Writes a fresh self-signed certificate with common name `cn`, replacing
/// the files atomically (rename), as cert-manager or certbot do.
fn write_cert(dir: &Path, cn: &str) {
    let (cert_tmp, key_tmp) = (dir.join("cert.tmp"), dir.join("key.tmp"));
    let status = Command::new(tool("openssl"))
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-days", "2", "-nodes", "-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(&key_tmp)
        .arg("-out")
        .arg(&cert_tmp)
        .output()
        .expect("running openssl");
    assert!(status.status.success(), "openssl failed: {status:?}");
    std::fs::rename(&key_tmp, dir.join("key.pem")).expect("rename key");
    std::fs::rename(&cert_tmp, dir.join("cert.pem")).expect("rename cert");
}

/// The common name of the certificate the server presents now.
fn served_cn(port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -subject"
        ))
        .output()
        .expect("openssl s_client");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wait_for_cn(port: u16, cn: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = served_cn(port);
        if seen.contains(cn) || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn turn_over_tls_relays_and_reloads_certificates_without_dropping_sessions() {
    let dir = std::env::temp_dir().join(format!("natrix-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    write_cert(&dir, "natrix-one");
    let tls_port = free_port();
    let tls_listen = format!("127.0.0.1:{tls_port}");
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    let mut natrix = Natrix::relay(&[
        "--peer-allow",
        "127.0.0.0/8",
        "--tls-listen",
        &tls_listen,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    assert!(served_cn(tls_port).contains("natrix-one"));
    let (_peer, peer_port) = udp_echo_peer();
    let pp = peer_port.to_string();
    let tp = tls_port.to_string();

    // A 4-second session over TLS spans the reload.
    let session = {
        let (tp, pp) = (tp.clone(), pp.clone());
        std::thread::spawn(move || {
            uclient(&[
                "-t",
                "-S",
                "-p",
                &tp,
                "-u",
                USER,
                "-w",
                PASSWORD,
                "-e",
                "127.0.0.1",
                "-r",
                &pp,
                "-n",
                "200",
                "-m",
                "1",
                "-c",
                "-l",
                "500",
                "127.0.0.1",
            ])
        })
    };
    std::thread::sleep(Duration::from_millis(1000));
    write_cert(&dir, "natrix-two");
    let seen = wait_for_cn(tls_port, "natrix-two");
    assert!(seen.contains("natrix-two"), "after a file change: {seen}");
    let report = session.join().expect("uclient thread");
    assert_eq!(
        (report.sent, report.received, report.lost),
        (200, 200, 0),
        "the TLS session across the reload:\n{}",
        report.output
    );

    // SIGHUP reloads on demand and does not stop the process.
    write_cert(&dir, "natrix-three");
    // SAFETY: kill(2) on the PID of a child this test spawned.
    assert_eq!(unsafe { libc::kill(natrix.pid(), libc::SIGHUP) }, 0);
    let seen = wait_for_cn(tls_port, "natrix-three");
    assert!(seen.contains("natrix-three"), "after SIGHUP: {seen}");
    assert!(natrix.alive(), "SIGHUP stopped natrix: {}", natrix.log());

    // A broken file keeps the previous certificate in service.
    std::fs::write(dir.join("cert.pem"), b"not a certificate").expect("write");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(served_cn(tls_port).contains("natrix-three"));
    let report = uclient(&[
        "-t",
        "-S",
        "-p",
        &tp,
        "-u",
        USER,
        "-w",
        PASSWORD,
        "-e",
        "127.0.0.1",
        "-r",
        &pp,
        "-n",
        "20",
        "-m",
        "1",
        "-c",
        "127.0.0.1",
    ]);
    assert_eq!(
        (report.sent, report.received, report.lost),
        (20, 20, 0),
        "{}",
        report.output
    );
    let _ = std::fs::remove_dir_all(&dir);
}
