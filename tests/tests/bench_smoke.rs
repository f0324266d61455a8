//! Keeps `cargo xtask bench` from rotting: every part of it runs in a tiny
//! configuration ([`Plan::smoke`]) and must produce sane, checked numbers.
//! No timing is asserted: the figures only have to exist, be positive and
//! finite, and come from the path they claim (the benchmark code itself
//! checks verdicts, counters, replies and map contents and fails
//! otherwise).
//!
//! Privileged: needs root, and the agent binary (`cargo xtask test` builds
//! it and sets `LB_AGENT_BIN`).

use lb_tests::bench::{
    Plan, agent, e2e, prog,
    report::{self, Machine, Results},
};

fn sane(what: &str, value: f64) {
    assert!(
        value.is_finite() && value > 0.0,
        "{what}: {value} is not a positive figure"
    );
}

fn log(what: String) {
    eprintln!("bench smoke: {what}");
}

#[test]
fn every_part_of_the_benchmark_runs_and_reports() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "needs root");
    let plan = Plan::smoke();
    let started = std::time::Instant::now();

    let prog = prog::measure(&plan, &mut log).expect("program cost");
    assert_eq!(
        prog.rows.len(),
        prog::HotPath::ALL.len() * plan.prog_services.len() * plan.prog_flows.len()
    );
    for row in &prog.rows {
        // A difference of two timings may come out at or below zero for
        // the cheapest path on a noisy machine; it must still be a number
        // and a path that did real work must cost something.
        assert!(row.ns.median.is_finite(), "{row:?}");
        assert_eq!(row.ns.samples, plan.prog_rounds as usize);
    }
    for row in &prog.calibration {
        assert!(row.ns.median.is_finite(), "{row:?}");
    }
    sane("empty program", prog.calibration[0].ns.median);

    let e2e = e2e::measure(&plan, &mut log).expect("end to end");
    assert_eq!(
        e2e.rows.len(),
        e2e::Way::ALL.len() * plan.e2e_services.len()
    );
    for row in &e2e.rows {
        sane("TCP p50", row.tcp_p50_us.median);
        sane("TCP p99", row.tcp_p99_us.median);
        sane("connections per second", row.connections_per_s.median);
        sane("UDP p50", row.udp_p50_us.median);
        assert!(row.tcp_p99_us.median >= row.tcp_p50_us.median, "{row:?}");
    }
    assert!(
        e2e.iptables_version.contains("iptables"),
        "{}",
        e2e.iptables_version
    );
    assert!(e2e.nft_version.contains("nftables"), "{}", e2e.nft_version);

    let agent = agent::measure(&plan, &mut log).expect("agent");
    for row in &agent.cold {
        sane("cold start", row.total_ms.median);
        sane("programming", row.programming_ms.median);
        sane("peak memory", row.peak_rss_mib.median);
        assert!(row.total_ms.median >= row.programming_ms.median, "{row:?}");
    }
    sane("change p50", agent.change.p50_ms);
    assert_eq!(agent.change.changes, plan.changes);
    let per_flow = agent.bytes_per_flow().expect("LB_CONNTRACK's memory");
    sane("bytes per flow", per_flow);

    let results = Results {
        plan,
        prog,
        e2e,
        agent,
        elapsed: started.elapsed(),
    };
    let out = std::env::temp_dir().join(format!("lb-bench-smoke-{}", std::process::id()));
    report::write(&out, &results, &Machine::current("bench_smoke")).expect("write the report");
    let markdown = std::fs::read_to_string(out.join("benchmarks.md")).expect("read the report");
    for (name, _) in report::plots(&results) {
        let svg = std::fs::read_to_string(out.join(name)).expect("read a plot");
        assert!(svg.starts_with("<svg") && svg.contains("<rect"), "{name}");
        assert!(markdown.contains(name), "the report links {name}");
    }
    assert_eq!(report::goals(&results).len(), 9);
    std::fs::remove_dir_all(&out).expect("remove the report");
}
