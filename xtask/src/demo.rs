//! `cargo xtask demo`: the namespace demo of tests/ (binary `lb-demo`).

use std::ffi::OsString;

use anyhow::Result;

use crate::{
    build::{AGENT_BINARY_VARIABLE, setup_and_build},
    cargo::{Profile, cargo, exec},
};

/// Sets up and builds, then runs `lb-demo` with `args`; the demo spawns the
/// agent named by [`AGENT_BINARY_VARIABLE`].
pub fn demo(profile: Profile, args: &[OsString]) -> Result<()> {
    let agent = setup_and_build(profile)?;
    let mut command = cargo();
    command.args(["run", "--package", "lb-tests", "--bin", "lb-demo"]);
    profile.apply(&mut command);
    command.env(AGENT_BINARY_VARIABLE, &agent);
    if !args.is_empty() {
        command.arg("--").args(args);
    }
    // In xtask's place (see `exec`): Ctrl-C reaches the demo's teardown.
    Err(exec(&mut command))
}
