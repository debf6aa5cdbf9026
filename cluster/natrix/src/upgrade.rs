//! A binary upgrade without dropping calls. On SIGUSR2 a relay checks that
//! the binary at its path runs, freezes its loops between batches, writes
//! the hand-off ([`Handoff`]: listeners, allocations, their relayed
//! sockets, their TCP connections and TLS 1.3 sessions' traffic secrets) to
//! a memory file, keeps those descriptors open across `exec`, and executes
//! that binary in place: same PID (systemd and the container runtime see
//! one process), same sockets, and the new image goes on serving the same
//! allocations. Datagrams that arrive in between wait in the sockets'
//! kernel buffers. TLS 1.2 sessions end; the control plane (metrics,
//! lookup) listens again.
//!
//! If the new binary cannot be executed after all, the running image is
//! executed instead with the same hand-off, so the allocations survive a
//! failed upgrade too.

use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::{AsRawFd as _, FromRawFd as _, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use natrix_relay::shell::Handoff;

/// The environment variable naming the hand-off's memory file.
const RESUME_ENV: &str = "NATRIX_RESUME_FD";

/// The hand-off a predecessor left, if this process is its successor (call
/// once, before any thread starts).
pub(crate) fn inherited() -> anyhow::Result<Option<Handoff>> {
    let Some(value) = std::env::var_os(RESUME_ENV) else {
        return Ok(None);
    };
    // SAFETY: called at start, before this process spawns a thread; a
    // later upgrade sets it afresh.
    unsafe { std::env::remove_var(RESUME_ENV) };
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|fd| *fd > 2)
        .context("NATRIX_RESUME_FD is not a descriptor")?;
    // SAFETY: the predecessor opened this memory file for us and named it
    // in the environment; nothing else owns it.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut text = String::new();
    file.read_to_string(&mut text)
        .context("reading the handed-over state")?;
    // SAFETY: the descriptors the state names were inherited from the
    // predecessor that wrote it, for this process alone.
    let handoff = unsafe { Handoff::decode(&text) }?;
    Ok(Some(handoff))
}

/// The binary to upgrade to: the path this process was started from (after
/// a package upgrade, the new file there).
fn target() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this binary")?;
    // Replaced on disk, the running image's path reads "… (deleted)".
    let path = exe.to_string_lossy();
    Ok(PathBuf::from(
        path.strip_suffix(" (deleted)").unwrap_or(&path).to_owned(),
    ))
}

/// Whether the binary at this process's path runs here (`--version`
/// within 5 s): checked before anything is frozen.
pub(crate) fn check_target() -> anyhow::Result<String> {
    let exe = target()?;
    let mut child = std::process::Command::new(&exe)
        .arg("--version")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", exe.display()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::ensure!(status.success(), "{} --version failed", exe.display());
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{} --version did not answer", exe.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut version = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut version);
    }
    Ok(version.trim().to_owned())
}

fn clear_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor this process holds.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Executes the new binary with `handoff`; returns only when neither it
/// nor the running image could be executed.
pub(crate) fn exec(handoff: &Handoff) -> anyhow::Error {
    match prepare(handoff) {
        Ok(memfd) => {
            let args: Vec<_> = std::env::args_os().skip(1).collect();
            let run = |program: &std::path::Path| {
                std::process::Command::new(program)
                    .args(&args)
                    .env(RESUME_ENV, memfd.to_string())
                    .exec()
            };
            let first = match target() {
                Ok(exe) => run(&exe),
                Err(e) => std::io::Error::other(e.to_string()),
            };
            tracing::error!(error = %first, "executing the new binary failed: going on with the running one");
            let second = run(std::path::Path::new("/proc/self/exe"));
            anyhow::anyhow!("executing the new binary: {first}; the running one: {second}")
        }
        Err(e) => e.context("preparing the hand-off"),
    }
}

/// Writes the state to a memory file inherited across `exec` and clears
/// close-on-exec on every descriptor it names; the memory file's number.
fn prepare(handoff: &Handoff) -> anyhow::Result<RawFd> {
    let name = c"natrix-handoff";
    // SAFETY: memfd_create with a valid name and no flags (so the file is
    // inherited across exec).
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: a descriptor just created, owned here; `into_raw_fd` below
    // hands it to the successor.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(handoff.encode().as_bytes())?;
    file.rewind()?;
    for fd in handoff.descriptors() {
        clear_cloexec(fd).context("keeping a socket open across exec")?;
    }
    let fd = file.as_raw_fd();
    std::mem::forget(file);
    Ok(fd)
}
