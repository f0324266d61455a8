//! ns/packet of `lb_tc_pod` as `BPF_PROG_TEST_RUN` reports it, measured
//! correctly.
//!
//! With `repeat > 1` the kernel runs the program again and again on the
//! same skb, which a translating program has already rewritten: from the
//! second run on it would measure the path of its own output (a DNAT'd
//! packet is no service's packet). So the program test-run here is
//! `lb_bench_run` from `lb_agent::EBPF_BENCH_OBJECT`: before every run it
//! copies the original frame back into the skb (and for new flows steps the
//! source address, so every run is a new flow), then tail-calls the program
//! in slot 0 of `LB_BENCH_TARGET`.
//!
//! Each case runs twice per round: with `lb_tc_pod` in the slot, and with
//! `lb_bench_empty` (calibration: replay + tail call + loop). The reported
//! cost is the difference. Every run's outcome is checked through the
//! datapath's counters: after N runs exactly N increments of the case's
//! counter and nothing else, and the last run's verdict and output frame.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ProgramArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use lb_common::counters::Counter;

use super::{
    PacketError, Result,
    datapath::{Counters, Datapath},
};

const PROG_BENCH_RUN: &str = "lb_bench_run";
const PROG_BENCH_EMPTY: &str = "lb_bench_empty";
const MAP_BENCH_INPUT: &str = "LB_BENCH_INPUT";
const MAP_BENCH_TARGET: &str = "LB_BENCH_TARGET";

/// Largest frame the replay wrapper holds (its `MAX_PACKET_LEN`).
pub const MAX_BENCH_FRAME: usize = 256;
/// Offset of the IPv4 source address in an untagged Ethernet frame: the
/// wrapper steps the address found there.
const IP_SRC_OFF: usize = 14 + 12;

/// Value of `LB_BENCH_INPUT`; layout shared with `lb-ebpf/src/bin/lb-bench.rs`.
#[repr(C)]
#[derive(Clone, Copy)]
struct BenchInput {
    len: u32,
    step_source: u32,
    l4_csum_off: u32,
    _pad: u32,
    data: [u8; MAX_BENCH_FRAME],
}

// SAFETY: `repr(C)`, only integer fields, no padding (4 * 4 + 256 bytes),
// valid for any bit pattern.
unsafe impl aya::Pod for BenchInput {}

/// One measured path.
#[derive(Clone, Debug)]
pub struct BenchCase {
    pub name: String,
    /// The frame every run starts from (an IPv4 frame without options).
    pub frame: Vec<u8>,
    /// Step the IPv4 source address before every run (a new flow each run).
    /// Needs the offset of the L4 checksum in `frame` to keep it valid.
    pub step_source_l4_csum_off: Option<usize>,
    pub expected_verdict: u32,
    /// The counter every run must increment exactly once.
    pub expected_counter: Counter,
    /// The output of the last run, when it is known in advance.
    pub expected_output: Option<Vec<u8>>,
}

/// The measurement of one case.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub name: String,
    pub runs_per_round: u32,
    pub rounds: u32,
    /// Median over rounds of the average ns/run with `lb_tc_pod`.
    pub datapath_ns: u32,
    /// Median over rounds of the average ns/run with the empty target.
    pub calibration_ns: u32,
    /// `datapath_ns - calibration_ns`: the cost of `lb_tc_pod` itself.
    pub ns_per_packet: i64,
}

/// The replay wrapper loaded next to a datapath.
pub struct Bench {
    datapath: Datapath,
    harness: Ebpf,
}

enum Target {
    Datapath,
    Empty,
}

fn bench_error(case: &str, detail: impl Into<String>) -> PacketError {
    PacketError::Bench {
        case: case.to_owned(),
        detail: detail.into(),
    }
}

impl Bench {
    /// Loads `lb_agent::EBPF_BENCH_OBJECT` and its two programs.
    pub fn load(datapath: Datapath) -> Result<Self> {
        let mut harness = EbpfLoader::new()
            .load(lb_agent::EBPF_BENCH_OBJECT)
            .map_err(PacketError::LoadObject)?;
        for name in [PROG_BENCH_RUN, PROG_BENCH_EMPTY] {
            let program: &mut SchedClassifier = harness
                .program_mut(name)
                .ok_or(PacketError::MissingProgram { name })?
                .try_into()
                .map_err(|source| PacketError::ProgramType { name, source })?;
            program
                .load()
                .map_err(|source| PacketError::LoadProgram { name, source })?;
        }
        Ok(Self { datapath, harness })
    }

    pub fn datapath(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    fn program(&self, name: &'static str) -> Result<&SchedClassifier> {
        self.harness
            .program(name)
            .ok_or(PacketError::MissingProgram { name })?
            .try_into()
            .map_err(|source| PacketError::ProgramType { name, source })
    }

    fn set_target(&mut self, target: Target) -> Result<()> {
        let (name, program) = match target {
            Target::Datapath => (lb_common::names::PROG_TC_POD, self.datapath.program()?),
            Target::Empty => (PROG_BENCH_EMPTY, self.program(PROG_BENCH_EMPTY)?),
        };
        let fd = program
            .fd()
            .map_err(|source| PacketError::LoadProgram { name, source })?
            .try_clone()
            .map_err(|error| bench_error("setup", format!("duplicating a program fd: {error}")))?;
        let map = self
            .harness
            .map_mut(MAP_BENCH_TARGET)
            .ok_or(PacketError::MissingMap {
                name: MAP_BENCH_TARGET,
            })?;
        let mut slots = ProgramArray::try_from(map).map_err(|source| PacketError::Map {
            name: MAP_BENCH_TARGET,
            operation: "open",
            source,
        })?;
        slots.set(0, &fd, 0).map_err(|source| PacketError::Map {
            name: MAP_BENCH_TARGET,
            operation: "set",
            source,
        })
    }

    fn set_input(&mut self, case: &BenchCase) -> Result<()> {
        if case.frame.len() > MAX_BENCH_FRAME || case.frame.len() < IP_SRC_OFF + 4 {
            return Err(bench_error(&case.name, "frame length out of range"));
        }
        let mut input = BenchInput {
            len: case.frame.len() as u32,
            step_source: u32::from(case.step_source_l4_csum_off.is_some()),
            l4_csum_off: case.step_source_l4_csum_off.unwrap_or(0) as u32,
            _pad: 0,
            data: [0; MAX_BENCH_FRAME],
        };
        input.data[..case.frame.len()].copy_from_slice(&case.frame);
        let map = self
            .harness
            .map_mut(MAP_BENCH_INPUT)
            .ok_or(PacketError::MissingMap {
                name: MAP_BENCH_INPUT,
            })?;
        let mut array: Array<_, BenchInput> =
            Array::try_from(map).map_err(|source| PacketError::Map {
                name: MAP_BENCH_INPUT,
                operation: "open",
                source,
            })?;
        array.set(0, &input, 0).map_err(|source| PacketError::Map {
            name: MAP_BENCH_INPUT,
            operation: "set",
            source,
        })
    }

    /// One test run of the wrapper: (average ns/run, verdict of the last
    /// run, output of the last run).
    fn run(&self, frame: &[u8], repeat: u32) -> Result<(u32, u32, Vec<u8>)> {
        let mut out = vec![0u8; 4096];
        let result = self
            .program(PROG_BENCH_RUN)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
            .map_err(|source| PacketError::TestRun {
                name: PROG_BENCH_RUN,
                source,
            })?;
        out.truncate(result.data_size_out as usize);
        let ns = u32::try_from(result.duration.as_nanos()).unwrap_or(u32::MAX);
        Ok((ns, result.return_value, out))
    }

    /// Measures `case`: `rounds` rounds of `runs` runs each, against the
    /// datapath and against the empty calibration target.
    pub fn measure(&mut self, case: &BenchCase, runs: u32, rounds: u32) -> Result<BenchResult> {
        let mut datapath_ns = Vec::new();
        let mut calibration_ns = Vec::new();
        // Written once: with a stepping source the wrapper keeps counting
        // in the map across rounds (and calibration runs), so no address
        // repeats and every datapath run stays a new flow.
        self.set_input(case)?;
        for _ in 0..rounds {
            self.set_target(Target::Datapath)?;
            let before = self.datapath.counters()?;
            let (ns, verdict, output) = self.run(&case.frame, runs)?;
            let after = self.datapath.counters()?;
            check_outcome(case, runs, &before, &after, verdict, &output)?;
            datapath_ns.push(ns);

            self.set_target(Target::Empty)?;
            let (ns, verdict, _) = self.run(&case.frame, runs)?;
            if verdict != 0 {
                return Err(bench_error(
                    &case.name,
                    format!("calibration verdict {verdict:#x}, the tail call failed"),
                ));
            }
            if self.datapath.counters()? != after {
                return Err(bench_error(&case.name, "calibration reached the datapath"));
            }
            calibration_ns.push(ns);
        }
        let datapath_ns = median(&mut datapath_ns);
        let calibration_ns = median(&mut calibration_ns);
        Ok(BenchResult {
            name: case.name.clone(),
            runs_per_round: runs,
            rounds,
            datapath_ns,
            calibration_ns,
            ns_per_packet: i64::from(datapath_ns) - i64::from(calibration_ns),
        })
    }
}

fn check_outcome(
    case: &BenchCase,
    runs: u32,
    before: &Counters,
    after: &Counters,
    verdict: u32,
    output: &[u8],
) -> Result<()> {
    let deltas = after.since(before);
    let expected = [(case.expected_counter.name(), u64::from(runs))]
        .into_iter()
        .collect();
    if deltas != expected {
        return Err(bench_error(
            &case.name,
            format!("after {runs} runs the counters moved by {deltas:?}, expected {expected:?}"),
        ));
    }
    if verdict != case.expected_verdict {
        return Err(bench_error(
            &case.name,
            format!(
                "verdict {verdict:#x}, expected {:#x}",
                case.expected_verdict
            ),
        ));
    }
    if let Some(expected_output) = &case.expected_output
        && output != expected_output.as_slice()
    {
        return Err(bench_error(
            &case.name,
            format!(
                "last output differs:\n  got      {}\n  expected {}",
                super::frame::describe(output),
                super::frame::describe(expected_output)
            ),
        ));
    }
    Ok(())
}

fn median(values: &mut [u32]) -> u32 {
    values.sort_unstable();
    values[values.len() / 2]
}
