//! Project automation, run as `cargo xtask <task>`. Built by the machine's
//! default toolchain; everything else builds with the pinned one
//! ([`cargo::TOOLCHAIN`]), which `setup` installs.

mod bench;
mod build;
mod cargo;
mod demo;
mod lint;
mod setup;
mod test;

use std::{ffi::OsString, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{
    cargo::{CommandFailed, Profile},
    setup::{Mode, Setup},
};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, run, test and lint the load balancer"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check every prerequisite and install what is missing (needs root).
    Setup {
        /// Only report what is missing; fail if anything is.
        #[arg(long)]
        check: bool,
    },
    /// Set up, then build the workspace (lb-agent embeds the BPF object).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the agent with the arguments after `--`.
    Run {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
        /// Arguments for lb-agent.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build, then run all unit and privileged end-to-end tests.
    Test {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
        /// Extra `cargo test` arguments (a further `--` starts the test
        /// harness's).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build, then run the network-namespace demo (lb-demo).
    Demo {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
        /// Arguments for lb-demo.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Measure the datapath, the agent and kube-proxy's rules on this
    /// machine (release build; needs root); writes docs/benchmarks.md.
    Bench {
        /// A smaller run (under two minutes) written to target/bench/.
        #[arg(long)]
        quick: bool,
    },
    /// Clippy with warnings denied, host packages and the BPF program.
    Clippy,
    /// Format the workspace.
    Fmt {
        /// Fail on unformatted code instead of rewriting it.
        #[arg(long)]
        check: bool,
    },
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup { check } => Setup::all(if check { Mode::Check } else { Mode::Install }),
        Task::Build { release } => {
            build::setup_and_build(Profile::from_release_flag(release)).map(drop)
        }
        Task::Run { release, args } => build::run_agent(Profile::from_release_flag(release), &args),
        Task::Test { release, args } => test::test(Profile::from_release_flag(release), &args),
        Task::Demo { release, args } => demo::demo(Profile::from_release_flag(release), &args),
        Task::Bench { quick } => bench::bench(quick),
        Task::Clippy => lint::clippy(),
        Task::Fmt { check } => lint::fmt(check),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cargo::prepare_process_environment().and_then(|()| run(cli.task)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // A failed child's own exit code, so that CI sees cargo's status.
            let code = error
                .downcast_ref::<CommandFailed>()
                .map_or(1, CommandFailed::exit_code);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}
