//! `cargo xtask bench`: the datapath, the agent and kube-proxy's rules
//! measured on this machine (binary `lb-bench-run` of tests/).

use anyhow::Result;

use crate::{
    build::{AGENT_BINARY_VARIABLE, setup_and_build},
    cargo::{Profile, cargo, exec, target_dir, workspace_root},
};

/// Sets up (including iptables and nftables) and builds with the release
/// profile, then runs `lb-bench-run` in xtask's place (see [`exec`]).
/// A full run writes `docs/benchmarks.md` and its plots; `--quick` writes
/// them under `target/bench/` so the committed full run stays.
pub fn bench(quick: bool) -> Result<()> {
    let profile = Profile::Release;
    let agent = setup_and_build(profile)?;
    let (out, shown) = if quick {
        (target_dir().join("bench"), "cargo xtask bench --quick")
    } else {
        (workspace_root().join("docs"), "cargo xtask bench")
    };
    let mut command = cargo();
    command.args(["run", "--package", "lb-tests", "--bin", "lb-bench-run"]);
    profile.apply(&mut command);
    command
        .env(AGENT_BINARY_VARIABLE, &agent)
        .arg("--")
        .arg("--out")
        .arg(out)
        .args(["--command", shown]);
    if quick {
        command.arg("--quick");
    }
    Err(exec(&mut command))
}
