//! `cargo xtask build` and `cargo xtask run`: the build-and-load loop.

use std::{ffi::OsString, path::PathBuf, process::Command};

use anyhow::Result;

use crate::{
    cargo::{HOST_PACKAGES, Profile, cargo, exec, run, workspace_binary},
    setup::{Mode, Setup},
};

/// The agent binary of the lb-agent package.
pub const AGENT_BINARY: &str = "lb-agent";

/// Environment variable naming the agent binary for tests and the demo,
/// which spawn it inside network namespaces.
pub const AGENT_BINARY_VARIABLE: &str = "LB_AGENT_BIN";

/// Builds every host package; lb-agent's build script builds and embeds the
/// BPF object.
fn build(profile: Profile) -> Result<()> {
    let mut command = cargo();
    command.arg("build").args(HOST_PACKAGES);
    profile.apply(&mut command);
    run(&mut command)
}

/// Installs what is missing, builds, and returns the agent binary's absolute
/// path.
pub fn setup_and_build(profile: Profile) -> Result<PathBuf> {
    Setup::all(Mode::Install)?;
    build(profile)?;
    workspace_binary(profile, AGENT_BINARY)
}

/// Builds, then runs the agent in xtask's place (see [`exec`]): Ctrl-C
/// reaches the agent's shutdown path, which detaches the programs.
pub fn run_agent(profile: Profile, args: &[OsString]) -> Result<()> {
    let agent = setup_and_build(profile)?;
    let mut command = Command::new(agent);
    command.args(args);
    Err(exec(&mut command))
}
