//! Forwarding by FIB lookup, for packets the stack must not see.
//!
//! The stack drops a packet that arrives with one of its own addresses as
//! source (a martian), and reverse-path filtering may drop one whose
//! source was translated. So every forward packet of a source-translated
//! flow (node SNAT, hairpin), every reply to a translated port, and every
//! reply of an external flow (its new source is a node address or a
//! load-balancer IP) is forwarded here instead of passed to the stack.
//!
//! - XDP ([`Forwarding::BeforeRewrite`]): [`plan`] looks up the route of
//!   the translated packet before anything is rewritten or recorded. When
//!   it leaves through the interface it arrived on and the next hop's MAC
//!   address is known, the caller translates it and [`send`] writes the
//!   MAC addresses for `XDP_TX`. Anything else XDP could forward only by
//!   redirecting to another device (a veth needs its peer's NAPI for that)
//!   or after resolving a neighbour: [`plan`] returns `None`, and the
//!   caller passes the packet untouched to the TC program of the same
//!   interface (`lb_tc_ext`), which does it all again with the helpers
//!   only TC has. With `CONFIG_F_XDP_NO_TX` in `LB_CONFIG` (an uplink
//!   where `XDP_TX` frames are not delivered promptly, such as a veth whose
//!   peer has no XDP program) [`plan`] returns `None` without a lookup:
//!   XDP forwards nothing itself and TC forwards everything.
//! - TC ([`Forwarding::AfterRewrite`]): [`send`] looks up the route of the
//!   translated packet without resolving the neighbour and redirects with
//!   `bpf_redirect_neigh`, which resolves it (and queues the packet while
//!   it does, like the stack).
//!
//! The lookup is the one the stack's forwarding does: an input lookup on
//! the arrival interface (so forwarding must be enabled there), with the
//! translated addresses, ports and protocol (for multipath hashing and
//! policy routing) and TOS 0.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, TC_ACT_REDIRECT,
        bpf_fib_lookup as FibParams, bpf_redir_neigh,
    },
    helpers::generated::{bpf_fib_lookup, bpf_redirect_neigh},
};

use lb_common::config::CONFIG_F_XDP_NO_TX;

use crate::{
    context::{Forwarding, PacketContext, ptr_at},
    error::Error,
    maps::LB_CONFIG,
    nat::Tuple,
    parse::{IP_OFF, Packet},
};

const AF_INET: u8 = 2;
/// Destination and source MAC address, as at the start of the frame.
const MACS_LEN: usize = 12;

/// How [`send`] forwards a packet [`plan`] accepted.
#[derive(Clone, Copy)]
pub enum Route {
    /// XDP: out of the arrival interface to these MAC addresses
    /// (destination, then source).
    Transmit([u8; MACS_LEN]),
    /// TC: looked up after the rewrite.
    AfterRewrite,
}

/// The lookup parameters for the packet `pkt` once translated to `new`,
/// arriving on `ifindex`.
#[inline(always)]
fn params(pkt: &Packet, new: &Tuple, ifindex: u32, tot_len: u16) -> FibParams {
    // SAFETY: the kernel's parameter struct is plain integers and unions
    // of integers; all zeros is a valid value (and what unused fields must be).
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = pkt.proto;
    params.sport = new.src_port;
    params.dport = new.dst_port;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ifindex;
    params.__bindgen_anon_3.ipv4_src = new.src_addr;
    params.__bindgen_anon_4.ipv4_dst = new.dst_addr;
    params
}

/// Whether the agent told XDP to leave all forwarding to TC
/// (`CONFIG_F_XDP_NO_TX`). Read only here, on the way to a forward: other
/// packets never pay for it. An array lookup the verifier inlines, and
/// one field read in place.
#[inline(always)]
fn xdp_transmit_disabled() -> bool {
    LB_CONFIG.get_ptr(0).is_some_and(|config| {
        // SAFETY: an array entry is valid for the whole run.
        let flags = unsafe { (*config).flags };
        flags & CONFIG_F_XDP_NO_TX != 0
    })
}

/// Whether this program may answer a packet by sending it back out
/// (`Action::Bounce`: the RST or ICMP error of a refusal). Not XDP when the
/// agent turned `XDP_TX` off (`CONFIG_F_XDP_NO_TX`): the caller then hands
/// the packet to TC untouched, which answers it from there. Read only on
/// the way to a refusal.
#[inline(always)]
pub fn may_bounce<C: PacketContext>() -> bool {
    C::FORWARDING == Forwarding::AfterRewrite || !xdp_transmit_disabled()
}

/// Decides, before any rewrite, whether this program can forward `pkt`
/// once translated to `new`. `Ok(None)`: XDP cannot, or must not
/// (`CONFIG_F_XDP_NO_TX`); pass the packet untouched to TC.
/// `Err(NoRoute)`: nobody can; drop it.
#[inline(always)]
pub fn plan<C: PacketContext>(ctx: &C, pkt: &Packet, new: &Tuple) -> Result<Option<Route>, Error> {
    if C::FORWARDING == Forwarding::AfterRewrite {
        return Ok(Some(Route::AfterRewrite));
    }
    if xdp_transmit_disabled() {
        // TC looks the route up itself and drops what has none.
        return Ok(None);
    }
    let ifindex = ctx.ingress_ifindex();
    // The IPv4 total length, for the lookup's MTU check (host byte order).
    let tot_len = (pkt.l4_off - IP_OFF) as u16 + pkt.l4_len;
    let mut params = params(pkt, new, ifindex, tot_len);
    // SAFETY: `params` is a valid parameter struct of the size passed.
    let ret =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut params, size_of::<FibParams>() as i32, 0) };
    match u32::try_from(ret) {
        Ok(BPF_FIB_LKUP_RET_SUCCESS) if params.ifindex == ifindex => {
            // SAFETY: a successful lookup without SKIP_NEIGH filled in the
            // MAC addresses.
            let (smac, dmac) = unsafe {
                let macs = params.__bindgen_anon_6.__bindgen_anon_2;
                (macs.smac, macs.dmac)
            };
            let mut macs = [0u8; MACS_LEN];
            macs[..6].copy_from_slice(&dmac);
            macs[6..].copy_from_slice(&smac);
            Ok(Some(Route::Transmit(macs)))
        }
        Ok(
            BPF_FIB_LKUP_RET_SUCCESS
            | BPF_FIB_LKUP_RET_NO_NEIGH
            | BPF_FIB_LKUP_RET_NOT_FWDED
            | BPF_FIB_LKUP_RET_FRAG_NEEDED,
        ) => Ok(None),
        // Blackhole, unreachable, prohibit, forwarding disabled, an
        // unsupported tunnel route, or a helper error.
        _ => Err(Error::NoRoute),
    }
}

/// Sends the translated packet `pkt` (now addressed as `new`) the way
/// [`plan`] decided.
#[inline(always)]
pub fn send<C: PacketContext>(
    ctx: &C,
    pkt: &Packet,
    new: &Tuple,
    route: Route,
) -> Result<crate::context::Action, Error> {
    match route {
        Route::Transmit(macs) => {
            let eth: *mut [u8; MACS_LEN] = ptr_at(ctx, 0).ok_or(Error::RewriteFailed)?;
            // SAFETY: `ptr_at` checked the MAC addresses lie in the frame.
            unsafe { *eth = macs };
        }
        Route::AfterRewrite => {
            let ifindex = ctx.ingress_ifindex();
            // tot_len 0: the helper checks the skb's own length against
            // the egress MTU (GSO-aware).
            let mut params = params(pkt, new, ifindex, 0);
            // SAFETY: as in `plan`.
            let ret = unsafe {
                bpf_fib_lookup(
                    ctx.as_ptr(),
                    &mut params,
                    size_of::<FibParams>() as i32,
                    BPF_FIB_LOOKUP_SKIP_NEIGH,
                )
            };
            if ret != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
                return Err(Error::NoRoute);
            }
            // The lookup replaced the destination by the gateway, if the
            // route has one: that is the neighbour to resolve.
            // SAFETY: as for the lookup parameters, all zeros is valid.
            let mut next_hop: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            next_hop.nh_family = u32::from(AF_INET);
            // SAFETY: reading the IPv4 member of the union the lookup wrote.
            next_hop.__bindgen_anon_1.ipv4_nh = unsafe { params.__bindgen_anon_4.ipv4_dst };
            // SAFETY: `next_hop` is a valid parameter struct of the size passed.
            let ret = unsafe {
                bpf_redirect_neigh(
                    params.ifindex,
                    &mut next_hop,
                    size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            };
            if ret != i64::from(TC_ACT_REDIRECT) {
                return Err(Error::NoRoute);
            }
        }
    }
    Ok(crate::context::Action::Forward)
}
