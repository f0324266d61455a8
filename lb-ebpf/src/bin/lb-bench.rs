//! Measurement harness for `lb_tc_pod` and `lb_xdp_ext`, built as its own
//! object so none of it ships in the production datapath.
//!
//! `BPF_PROG_TEST_RUN` with `repeat > 1` re-runs a program on the buffer it
//! already rewrote, so a translating program would measure the path of its
//! own output from the second run on. `lb_bench_run` is the program under
//! test-run instead: before every run it copies the original packet from
//! `LB_BENCH_INPUT` back into the skb (optionally stepping the source
//! address so every run is a new flow), then tail-calls slot 0 of
//! `LB_BENCH_TARGET`, where userspace puts `lb_tc_pod` (or, to calibrate,
//! `lb_bench_empty`). The tail-called program's verdict is the run's
//! verdict; a failed tail call returns [`TAIL_CALL_FAILED`].
//!
//! `lb_bench_xdp_run` and `lb_bench_xdp_empty` are the same for XDP (a tail
//! call only reaches a program of the caller's type, so XDP has its own
//! slot, `LB_BENCH_XDP_TARGET`); they share `LB_BENCH_INPUT`.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action::XDP_PASS},
    btf_maps::{Array, HashMap, ProgramArray},
    helpers::generated::{bpf_skb_store_bytes, bpf_xdp_store_bytes},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::service::{ServiceKey, ServiceValue};

/// Largest packet the harness replays.
const MAX_PACKET_LEN: usize = 256;

/// Verdict of a run whose tail call failed (no TC verdict uses it).
const TAIL_CALL_FAILED: i32 = 0xbad;

/// The packet replayed before every run. Userspace fills it; with
/// `step_source` set, the program increments the IPv4 source address in it
/// before each run and keeps the IPv4 and L4 checksums correct.
#[repr(C)]
pub struct BenchInput {
    /// Bytes of `data` to replay (the length of the test-run packet).
    pub len: u32,
    /// Non-zero: step the source address every run (a new flow each run).
    pub step_source: u32,
    /// Offset of the L4 checksum in `data`; 0 when there is none to update
    /// (UDP without checksum).
    pub l4_csum_off: u32,
    pub _pad: u32,
    pub data: [u8; MAX_PACKET_LEN],
}

/// Offsets in an untagged Ethernet frame carrying IPv4.
const IP_CSUM_OFF: usize = 14 + 10;
const IP_SRC_OFF: usize = 14 + 12;

#[btf_map]
static LB_BENCH_INPUT: Array<BenchInput, 1> = Array::new();

/// Slot 0: the program each run tail-calls.
#[btf_map]
static LB_BENCH_TARGET: ProgramArray<1> = ProgramArray::new();

/// Slot 0: the XDP program each run of `lb_bench_xdp_run` tail-calls.
#[btf_map]
static LB_BENCH_XDP_TARGET: ProgramArray<1> = ProgramArray::new();

/// The stored packet, its source stepped if asked, and its length as
/// arithmetic the verifier tracks (1..=256); `None` when it is unusable.
#[inline(always)]
fn next_input() -> Option<(&'static BenchInput, u32)> {
    let input = LB_BENCH_INPUT.get_ptr_mut(0)?;
    // SAFETY: the map value stays valid for the run; test runs of one
    // program are serialized on this CPU.
    let input = unsafe { &mut *input };
    if input.step_source != 0 {
        step_source(input);
    }
    if input.len == 0 || input.len as usize > MAX_PACKET_LEN {
        return None;
    }
    // The same range again as arithmetic the verifier tracks: the
    // compiler may turn the comparisons above into a check on a copy.
    let len = (input.len.wrapping_sub(1) & (MAX_PACKET_LEN as u32 - 1)) + 1;
    Some((input, len))
}

/// Replays the stored packet, then tail-calls the program under test.
#[classifier]
fn lb_bench_run(ctx: TcContext) -> i32 {
    let Some((input, len)) = next_input() else {
        return TAIL_CALL_FAILED;
    };
    // SAFETY: `data` holds `MAX_PACKET_LEN` >= `len` bytes; the helper
    // bounds-checks the packet side (the skb has the same length).
    let ret =
        unsafe { bpf_skb_store_bytes(ctx.as_ptr().cast(), 0, input.data.as_ptr().cast(), len, 0) };
    if ret != 0 {
        return TAIL_CALL_FAILED;
    }
    // SAFETY: on success control never returns here.
    unsafe { LB_BENCH_TARGET.tail_call(&ctx, 0) };
    TAIL_CALL_FAILED
}

/// [`lb_bench_run`] for XDP: replays the stored packet into the XDP buffer
/// (of the same length), then tail-calls slot 0 of `LB_BENCH_XDP_TARGET`.
#[xdp]
fn lb_bench_xdp_run(ctx: XdpContext) -> u32 {
    let Some((input, len)) = next_input() else {
        return TAIL_CALL_FAILED as u32;
    };
    // SAFETY: `data` holds `MAX_PACKET_LEN` >= `len` bytes and is only
    // read; the helper bounds-checks the packet side.
    let ret = unsafe {
        bpf_xdp_store_bytes(
            ctx.as_ptr().cast(),
            0,
            input.data.as_ptr().cast_mut().cast(),
            len,
        )
    };
    if ret != 0 {
        return TAIL_CALL_FAILED as u32;
    }
    // SAFETY: on success control never returns here.
    unsafe { LB_BENCH_XDP_TARGET.tail_call(&ctx, 0) };
    TAIL_CALL_FAILED as u32
}

/// The XDP calibration target: the replay, the tail call and the loop.
#[xdp]
fn lb_bench_xdp_empty(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The calibration target: does nothing, so a run through it costs the
/// replay, the tail call and the test-run loop.
#[classifier]
fn lb_bench_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// The key `lb_bench_lookup` looks up; userspace inserts it into
/// `LB_BENCH_LOOKUP` (198.19.255.254:80/TCP, network byte order).
const LOOKUP_KEY: ServiceKey =
    ServiceKey::new(u32::from_ne_bytes([198, 19, 255, 254]), 80u16.to_be(), 6);

/// A frontend-shaped hash map for the second calibration target.
#[btf_map]
static LB_BENCH_LOOKUP: HashMap<ServiceKey, ServiceValue, 1024> = HashMap::new();

/// Calibration target: one hash lookup with the datapath's frontend key
/// type. `TC_ACT_OK` when the key was found, `TC_ACT_SHOT` when not, so a
/// run that missed is seen.
#[classifier]
fn lb_bench_lookup(_ctx: TcContext) -> i32 {
    let key = LOOKUP_KEY;
    match LB_BENCH_LOOKUP.get_ptr(&key) {
        Some(_) => TC_ACT_OK,
        None => TC_ACT_SHOT,
    }
}

/// Adds one to the IPv4 source address in `input.data` and patches the IP
/// and L4 checksums incrementally (RFC 1624).
#[inline(always)]
fn step_source(input: &mut BenchInput) {
    let data = &mut input.data;
    let old = u32::from_be_bytes([
        data[IP_SRC_OFF],
        data[IP_SRC_OFF + 1],
        data[IP_SRC_OFF + 2],
        data[IP_SRC_OFF + 3],
    ]);
    let new = old.wrapping_add(1);
    data[IP_SRC_OFF..IP_SRC_OFF + 4].copy_from_slice(&new.to_be_bytes());
    patch_checksum(data, IP_CSUM_OFF, old, new);
    // Checksums sit at even offsets; the mask (not a comparison the
    // compiler may rewrite) is what bounds the offset for the verifier.
    let l4_csum_off = input.l4_csum_off as usize & (MAX_PACKET_LEN - 2);
    if l4_csum_off != 0 {
        patch_checksum(data, l4_csum_off, old, new);
    }
}

#[inline(always)]
fn patch_checksum(data: &mut [u8; MAX_PACKET_LEN], off: usize, old: u32, new: u32) {
    if off + 2 > MAX_PACKET_LEN {
        return;
    }
    let check = u16::from_be_bytes([data[off], data[off + 1]]);
    let mut sum = u64::from(!check)
        + u64::from(!(old >> 16) & 0xffff)
        + u64::from(!old & 0xffff)
        + u64::from(new >> 16)
        + u64::from(new & 0xffff);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let check = !(sum as u16);
    data[off..off + 2].copy_from_slice(&check.to_be_bytes());
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
