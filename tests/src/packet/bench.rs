//! ns/packet of `lb_tc_pod` and `lb_xdp_ext` as `BPF_PROG_TEST_RUN`
//! reports it, measured correctly.
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
//! XDP cases go through `lb_bench_xdp_run` the same way (slot 0 of
//! `LB_BENCH_XDP_TARGET`, calibrated with `lb_bench_xdp_empty`); a case may
//! give the interface the packet arrives on (the `xdp_md` or `__sk_buff`
//! test-run context), which a forwarding path needs for its FIB lookup (and
//! then must be measured from a thread in that interface's namespace).
//!
//! Each case runs twice per round: with the program under test in the
//! slot, and with the empty program (calibration: replay + tail call +
//! loop). The reported cost is the difference. Every run's outcome is
//! checked through the datapath's counters: after N runs exactly N
//! increments of each of the case's counters and nothing else, and the
//! last run's verdict and output frame.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ProgramArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::counters::Counter;

use super::{
    PacketError, Result,
    datapath::{Counters, Datapath, Program, program_fd, tc_test_context, xdp_test_context},
};

const PROG_BENCH_RUN: &str = "lb_bench_run";
const PROG_BENCH_EMPTY: &str = "lb_bench_empty";
const PROG_BENCH_XDP_RUN: &str = "lb_bench_xdp_run";
const PROG_BENCH_XDP_EMPTY: &str = "lb_bench_xdp_empty";
const MAP_BENCH_INPUT: &str = "LB_BENCH_INPUT";
const MAP_BENCH_TARGET: &str = "LB_BENCH_TARGET";
const MAP_BENCH_XDP_TARGET: &str = "LB_BENCH_XDP_TARGET";

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
    /// The program under test.
    pub program: Program,
    /// The interface the packet arrives on (test-run context), if any.
    pub ifindex: Option<u32>,
    /// The frame every run starts from (an IPv4 frame without options).
    pub frame: Vec<u8>,
    /// Step the IPv4 source address before every run (a new flow each run).
    /// Needs the offset of the L4 checksum in `frame` to keep it valid.
    pub step_source_l4_csum_off: Option<usize>,
    pub expected_verdict: u32,
    /// The counters every run must increment exactly once each (and no
    /// other).
    pub expected_counters: Vec<Counter>,
    /// The output of the last run, when it is known in advance.
    pub expected_output: Option<Vec<u8>>,
}

/// The measurement of one case.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub name: String,
    pub runs_per_round: u32,
    pub rounds: u32,
    /// Median over rounds of the average ns/run with the program under test.
    pub datapath_ns: u32,
    /// Median over rounds of the average ns/run with the empty target.
    pub calibration_ns: u32,
    /// `datapath_ns - calibration_ns`: the cost of the program itself.
    pub ns_per_packet: i64,
}

/// The replay wrapper loaded next to a datapath.
pub struct Bench {
    datapath: Datapath,
    harness: Ebpf,
}

enum Target {
    Datapath(Program),
    Empty,
}

fn bench_error(case: &str, detail: impl Into<String>) -> PacketError {
    PacketError::Bench {
        case: case.to_owned(),
        detail: detail.into(),
    }
}

impl Bench {
    /// Loads `lb_agent::EBPF_BENCH_OBJECT` and its TC and XDP wrappers.
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
        for name in [PROG_BENCH_XDP_RUN, PROG_BENCH_XDP_EMPTY] {
            let program: &mut Xdp = harness
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

    fn xdp_program(&self, name: &'static str) -> Result<&Xdp> {
        self.harness
            .program(name)
            .ok_or(PacketError::MissingProgram { name })?
            .try_into()
            .map_err(|source| PacketError::ProgramType { name, source })
    }

    /// Puts `target` into the slot of the wrapper for programs like `under_test`.
    fn set_target(&mut self, under_test: Program, target: Target) -> Result<()> {
        let xdp = under_test.is_xdp();
        let fd = match target {
            Target::Datapath(program) => self.datapath.program_fd(program)?,
            Target::Empty if xdp => program_fd(&self.harness, PROG_BENCH_XDP_EMPTY)?,
            Target::Empty => program_fd(&self.harness, PROG_BENCH_EMPTY)?,
        };
        let slot = if xdp {
            MAP_BENCH_XDP_TARGET
        } else {
            MAP_BENCH_TARGET
        };
        let map = self
            .harness
            .map_mut(slot)
            .ok_or(PacketError::MissingMap { name: slot })?;
        let mut slots = ProgramArray::try_from(map).map_err(|source| PacketError::Map {
            name: slot,
            operation: "open",
            source,
        })?;
        slots.set(0, &fd, 0).map_err(|source| PacketError::Map {
            name: slot,
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

    /// One test run of the wrapper for `case`'s program: (average ns/run,
    /// verdict of the last run, output of the last run).
    fn run(&self, case: &BenchCase, repeat: u32) -> Result<(u32, u32, Vec<u8>)> {
        let xdp = case.program.is_xdp();
        let mut out = vec![0u8; 4096];
        let ctx = case.ifindex.map(|ifindex| {
            if xdp {
                xdp_test_context(ifindex, case.frame.len())
            } else {
                tc_test_context(ifindex)
            }
        });
        let options = TestRunOptions {
            data_in: Some(&case.frame),
            data_out: Some(&mut out),
            ctx_in: ctx.as_deref(),
            repeat,
            ..TestRunOptions::default()
        };
        let (name, result) = if xdp {
            (
                PROG_BENCH_XDP_RUN,
                self.xdp_program(PROG_BENCH_XDP_RUN)?.test_run(options),
            )
        } else {
            (
                PROG_BENCH_RUN,
                self.program(PROG_BENCH_RUN)?.test_run(options),
            )
        };
        let result = result.map_err(|source| PacketError::TestRun { name, source })?;
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
        let empty_verdict = if case.program.is_xdp() { XDP_PASS } else { 0 };
        for _ in 0..rounds {
            self.set_target(case.program, Target::Datapath(case.program))?;
            let before = self.datapath.counters()?;
            let (ns, verdict, output) = self.run(case, runs)?;
            let after = self.datapath.counters()?;
            check_outcome(case, runs, &before, &after, verdict, &output)?;
            datapath_ns.push(ns);

            self.set_target(case.program, Target::Empty)?;
            let (ns, verdict, _) = self.run(case, runs)?;
            if verdict != empty_verdict {
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
    let expected = case
        .expected_counters
        .iter()
        .map(|counter| (counter.name(), u64::from(runs)))
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

/// `XDP_PASS`, the empty XDP target's verdict.
const XDP_PASS: u32 = super::datapath::XDP_PASS;

fn median(values: &mut [u32]) -> u32 {
    values.sort_unstable();
    values[values.len() / 2]
}
