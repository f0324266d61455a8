//! Runs every benchmark of `lb_tests::bench`, prints the tables and writes
//! `benchmarks.md` with its SVG plots. Started by `cargo xtask bench`,
//! which builds the agent and passes its path in `LB_AGENT_BIN`.
//!
//! ```text
//! lb-bench-run [--quick] --out DIR [--command TEXT]
//! ```
//!
//! Needs root (BPF, network namespaces). Everything it creates is removed
//! when it ends, also on failure.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use lb_tests::bench::{
    Plan, agent, e2e, prog,
    report::{self, Machine, Results},
};

/// Set by SIGINT or SIGTERM; checked at every progress report.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupted(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Ctrl-C and SIGTERM no longer kill the process outright (which would
/// leave namespaces and pins behind): the next progress report panics, and
/// unwinding runs every guard's cleanup.
fn stop_cleanly_on_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                interrupted as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

struct Args {
    plan: Plan,
    out: PathBuf,
    command: String,
}

fn parse_args() -> Result<Args> {
    let mut plan = Plan::full();
    let mut out = None;
    let mut command = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => plan = Plan::quick(),
            "--out" => {
                out = Some(PathBuf::from(
                    args.next().context("--out needs a directory")?,
                ))
            }
            "--command" => command = Some(args.next().context("--command needs text")?),
            other => bail!(
                "unknown argument {other:?}; usage: lb-bench-run [--quick] --out DIR [--command TEXT]"
            ),
        }
    }
    let out = out.context("--out DIR is required")?;
    let command = command.unwrap_or_else(|| {
        format!(
            "lb-bench-run{}",
            if plan.name == "quick" { " --quick" } else { "" }
        )
    });
    Ok(Args { plan, out, command })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks need root (BPF programs, network namespaces)");
    }
    stop_cleanly_on_signals();
    let machine = Machine::current(&args.command);
    let started = Instant::now();
    let mut progress = |what: String| {
        assert!(
            !INTERRUPTED.load(Ordering::Relaxed),
            "interrupted: cleaning up and stopping"
        );
        eprintln!("[{:6.1} s] {what}", started.elapsed().as_secs_f64());
    };
    let plan = args.plan;
    let prog = prog::measure(&plan, &mut progress).context("program cost")?;
    let e2e = e2e::measure(&plan, &mut progress).context("end to end")?;
    let agent = agent::measure(&plan, &mut progress).context("agent")?;
    let results = Results {
        plan,
        prog,
        e2e,
        agent,
        elapsed: started.elapsed(),
    };
    println!("{}", report::tables(&results));
    println!(
        "## Goals\n\n{}",
        report::goals_table(&report::goals(&results))
    );
    report::write(&args.out, &results, &machine)
        .with_context(|| format!("writing the report to {}", args.out.display()))?;
    eprintln!(
        "wrote {} and its plots in {:.0} s",
        args.out.join("benchmarks.md").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
