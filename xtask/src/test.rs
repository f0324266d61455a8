//! `cargo xtask test`: unit tests and the privileged end-to-end tests.

use std::ffi::OsString;

use anyhow::Result;

use crate::{
    build::{AGENT_BINARY_VARIABLE, setup_and_build},
    cargo::{HOST_PACKAGES, Profile, cargo, exec},
};

/// Sets up and builds (the namespace tests spawn the agent binary, which
/// `cargo test` does not build for another package's tests), then runs
/// `cargo test --no-fail-fast` with the agent's path in
/// [`AGENT_BINARY_VARIABLE`]. `args` go to `cargo test` as given; the whole
/// host workspace is tested unless they select packages themselves.
/// `cargo test` runs in xtask's place (see [`exec`]), so the exit status is
/// its own.
pub fn test(profile: Profile, args: &[OsString]) -> Result<()> {
    let agent = setup_and_build(profile)?;
    let mut command = cargo();
    command.arg("test");
    if !selects_packages(args) {
        command.args(HOST_PACKAGES);
    }
    // Every test binary runs even after one fails, so that a CI log holds
    // every failure and every summary line.
    if !args.iter().any(|arg| arg == "--no-fail-fast") {
        command.arg("--no-fail-fast");
    }
    profile.apply(&mut command);
    command.args(args).env(AGENT_BINARY_VARIABLE, &agent);
    Err(exec(&mut command))
}

/// Whether cargo arguments (those before a `--` that starts the test
/// harness's) choose packages, which `--workspace` would override.
fn selects_packages(args: &[OsString]) -> bool {
    args.iter()
        .map(|arg| arg.to_string_lossy())
        .take_while(|arg| arg != "--")
        .any(|arg| {
            arg == "--workspace"
                || arg == "--all"
                || arg == "--package"
                || arg.starts_with("--package=")
                || (arg.starts_with("-p") && !arg.starts_with("--"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn package_selection_is_detected_before_the_harness_separator() {
        assert!(selects_packages(&args(&["-p", "lb-agent"])));
        assert!(selects_packages(&args(&["-plb-agent"])));
        assert!(selects_packages(&args(&[
            "--package=lb-tests",
            "--test",
            "x"
        ])));
        assert!(selects_packages(&args(&["--workspace"])));
        assert!(!selects_packages(&args(&[])));
        assert!(!selects_packages(&args(&["--test", "datapath"])));
        assert!(!selects_packages(&args(&["--", "-p", "--nocapture"])));
    }
}
