//! `cargo xtask clippy` and `cargo xtask fmt`.

use anyhow::Result;

use crate::{
    cargo::{HOST_PACKAGES, cargo, run},
    setup::{Mode, Setup},
};

/// Clippy with warnings denied, on the host packages (all targets) and on
/// lb-ebpf for the BPF target. Full setup first: lb-agent's build script
/// builds the BPF object, which needs bpf-linker.
pub fn clippy() -> Result<()> {
    Setup::all(Mode::Install)?;
    let mut host = cargo();
    host.arg("clippy")
        .args(HOST_PACKAGES)
        .args(["--all-targets", "--", "-D", "warnings"]);
    let mut bpf = cargo();
    bpf
        // `-Z build-std` on a stable toolchain, as lb-agent/build.rs does.
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "clippy",
            "--package",
            "lb-ebpf",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--release", "--", "-D", "warnings"]);
    // Both run, so that one pass reports every warning.
    let host_result = run(&mut host);
    let bpf_result = run(&mut bpf);
    host_result.and(bpf_result)
}

/// rustfmt over the workspace; with `check`, fails instead of rewriting.
/// Needs only the toolchain, so it runs without root.
pub fn fmt(check: bool) -> Result<()> {
    let mut setup = Setup::new(Mode::Install);
    setup.toolchain()?;
    setup.finish()?;
    let mut command = cargo();
    command.args(["fmt", "--all"]);
    if check {
        command.arg("--check");
    }
    run(&mut command)
}
