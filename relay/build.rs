//! Compiles the XDP fast path (`xdp/natrix_xdp.c`) with clang for the BPF
//! target into `OUT_DIR/natrix_xdp.o`, embedded by `src/xdp.rs`. Without
//! clang (or the libbpf headers) the relay builds without it: `--xdp` then
//! says so and the relay runs in userspace.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "xdp/natrix_xdp.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=NATRIX_CLANG");
    println!("cargo::rustc-check-cfg=cfg(natrix_xdp)");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("natrix_xdp.o");
    let clang = std::env::var("NATRIX_CLANG").unwrap_or_else(|_| "clang".to_string());
    let built = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!(
            "-I/usr/include/{}-linux-gnu",
            std::env::consts::ARCH
        ))
        .args(["-c", src, "-o"])
        .arg(&out)
        .status();
    match built {
        Ok(s) if s.success() => println!("cargo:rustc-cfg=natrix_xdp"),
        Ok(s) => println!(
            "cargo:warning=the XDP fast path did not compile ({clang} exited {s}); --xdp is unavailable in this build"
        ),
        Err(e) => println!(
            "cargo:warning=no {clang} to compile the XDP fast path ({e}); --xdp is unavailable in this build (install clang and libbpf-dev)"
        ),
    }
}
