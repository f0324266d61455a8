//! The packet operations the translation logic needs, as a trait over the
//! program context.
//!
//! Everything from parsing to DNAT/SNAT, forwarding and reject generation
//! is written against [`PacketContext`]; `TcContext` and `XdpContext`
//! implement it, and [`tc_verdict`] / [`xdp_verdict`] map an [`Action`] to
//! the program type's verdict.
//!
//! The two differ in what the kernel tells them about checksums. An skb may
//! be CHECKSUM_PARTIAL (a local socket's packet on a veth), which only the
//! kernel's L4 checksum helper can tell, so TC goes through it. An XDP
//! buffer is a frame as received: its L4 checksum is the complete one a
//! wire carries, so XDP updates it in software (RFC 1624), without helper
//! calls ([`PacketContext::L4_CSUM_COMPLETE`]). That is an assumption about
//! the external interfaces: a frame from a local veth peer with TX checksum
//! offload on carries only the pseudo-header sum, which XDP would corrupt
//! (the testbed turns the offload off on the network's veths, as on a
//! wire; real NICs never deliver such frames).

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        xdp_action,
    },
    helpers::generated::{
        bpf_l4_csum_replace, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_skb_pull_data, bpf_skb_store_bytes, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len,
        bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::{TcContext, XdpContext},
};

use crate::csum;

/// What happens to a packet once the datapath is done with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Hand the (possibly translated) packet on to the kernel stack.
    Pass,
    /// Drop the packet.
    Drop,
    /// Send the packet, rewritten into a reply (TCP RST, ICMP error), back
    /// out of the interface it arrived on.
    Bounce,
    /// The translated packet was forwarded by FIB lookup (`fib`): XDP
    /// sends it back out of the interface it arrived on with the next
    /// hop's MAC addresses written; TC has already called
    /// `bpf_redirect_neigh`.
    Forward,
}

/// When a program type looks up the route of a packet it must forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    /// XDP: before rewriting, so a packet XDP cannot send itself (another
    /// egress interface, unresolved neighbour) goes on to TC untouched.
    BeforeRewrite,
    /// TC: after rewriting, then `bpf_redirect_neigh`.
    AfterRewrite,
}

/// Which kind of field changed, for the L4 checksum update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Field {
    /// A 32-bit address: covered through the pseudo header only.
    Addr,
    /// A 16-bit port: covered as L4 header data.
    Port,
}

/// Packet access and rewrite primitives of one program type.
pub trait PacketContext: EbpfContext {
    /// The L4 checksum is always the complete one, so callers update it in
    /// software instead of through [`PacketContext::replace_l4_csum`].
    const L4_CSUM_COMPLETE: bool;
    /// How a translated packet is forwarded by FIB lookup.
    const FORWARDING: Forwarding;
    /// Index of the interface the packet arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Start of the directly accessible packet data (the Ethernet header).
    fn data(&self) -> usize;
    /// End of the directly accessible (linear) packet data.
    fn data_end(&self) -> usize;
    /// Length of the whole packet, including any non-linear part.
    fn packet_len(&self) -> u32;
    /// Makes the first `len` bytes directly accessible. Invalidates every
    /// packet pointer.
    fn pull(&self, len: u32) -> Result<(), i64>;
    /// Updates the L4 checksum at `csum_off` after `field` changed from
    /// `from` to `to` (values as on the wire; a port in the low 16 bits).
    /// For UDP a zero checksum (none) stays zero and a result of zero is
    /// written as 0xffff. Invalidates every packet pointer.
    fn replace_l4_csum(
        &self,
        csum_off: usize,
        from: u32,
        to: u32,
        field: L4Field,
        udp: bool,
    ) -> Result<(), i64>;
    /// Grows (zero-filled) or shrinks the packet to `len` bytes.
    /// Invalidates every packet pointer.
    fn set_len(&self, len: u32) -> Result<(), i64>;
    /// Copies `len` packet bytes at `off` to `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes of writes.
    unsafe fn load_bytes(&self, off: usize, dst: *mut u8, len: u32) -> Result<(), i64>;
    /// Copies `len` bytes from `src` into the packet at `off`.
    /// Invalidates every packet pointer.
    ///
    /// # Safety
    /// `src` must be valid for `len` bytes of reads.
    unsafe fn store_bytes(&self, off: usize, src: *const u8, len: u32) -> Result<(), i64>;
}

/// A pointer to a `T` at `off` in the packet, if the linear data covers it.
/// This is the bounds check the verifier needs before every direct access;
/// call it again after anything that invalidates packet pointers.
#[inline(always)]
pub fn ptr_at<C: PacketContext, T>(ctx: &C, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

impl PacketContext for TcContext {
    const L4_CSUM_COMPLETE: bool = false;
    const FORWARDING: Forwarding = Forwarding::AfterRewrite;

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: reading a field of the program's own context.
        unsafe { (*self.as_ptr().cast::<__sk_buff>()).ingress_ifindex }
    }

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn packet_len(&self) -> u32 {
        self.len()
    }

    #[inline(always)]
    fn pull(&self, len: u32) -> Result<(), i64> {
        // SAFETY: the context pointer is the program's own skb.
        let ret = unsafe { bpf_skb_pull_data(self.as_ptr().cast(), len) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    fn replace_l4_csum(
        &self,
        csum_off: usize,
        from: u32,
        to: u32,
        field: L4Field,
        udp: bool,
    ) -> Result<(), i64> {
        // The low bits of the flags give the field size; BPF_F_PSEUDO_HDR
        // makes the helper treat an address change as a pseudo-header
        // change, which matters for CHECKSUM_PARTIAL skbs (the field then
        // holds the pseudo-header sum, and a port change must not touch it).
        let mut flags = match field {
            L4Field::Addr => 4 | u64::from(BPF_F_PSEUDO_HDR),
            L4Field::Port => 2,
        };
        if udp {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        // SAFETY: the context pointer is the program's own skb; the helper
        // bounds-checks `csum_off` itself.
        let ret = unsafe {
            bpf_l4_csum_replace(
                self.as_ptr().cast(),
                csum_off as u32,
                u64::from(from),
                u64::from(to),
                flags,
            )
        };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    fn set_len(&self, len: u32) -> Result<(), i64> {
        // SAFETY: the context pointer is the program's own skb.
        let ret = unsafe { bpf_skb_change_tail(self.as_ptr().cast(), len, 0) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    unsafe fn load_bytes(&self, off: usize, dst: *mut u8, len: u32) -> Result<(), i64> {
        // SAFETY: the caller guarantees `dst` covers `len` bytes; the helper
        // bounds-checks the packet side.
        let ret = unsafe { bpf_skb_load_bytes(self.as_ptr(), off as u32, dst.cast(), len) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    unsafe fn store_bytes(&self, off: usize, src: *const u8, len: u32) -> Result<(), i64> {
        // SAFETY: the caller guarantees `src` covers `len` bytes; the helper
        // bounds-checks the packet side.
        let ret =
            unsafe { bpf_skb_store_bytes(self.as_ptr().cast(), off as u32, src.cast(), len, 0) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }
}

/// The TC verdict for `action`. [`Action::Bounce`] redirects to the egress
/// of the device the packet arrived on: for the host side of a pod's veth
/// that delivers the reply to the pod.
#[inline(always)]
pub fn tc_verdict(ctx: &TcContext, action: Action) -> i32 {
    match action {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
        Action::Bounce => {
            // SAFETY: reading a field of the program's own context.
            let ifindex = unsafe { (*ctx.as_ptr().cast::<__sk_buff>()).ifindex };
            // SAFETY: plain helper call; flags 0 means egress.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        Action::Forward => TC_ACT_REDIRECT,
    }
}

/// A program of this crate is loaded without `BPF_F_XDP_HAS_FRAGS`, so the
/// whole frame is linear: `data..data_end` is the packet.
impl PacketContext for XdpContext {
    const L4_CSUM_COMPLETE: bool = true;
    const FORWARDING: Forwarding = Forwarding::BeforeRewrite;

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn packet_len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    /// Nothing to pull: the frame is linear.
    #[inline(always)]
    fn pull(&self, _len: u32) -> Result<(), i64> {
        Ok(())
    }

    /// The frame's checksum is complete: RFC 1624 in software.
    #[inline(always)]
    fn replace_l4_csum(
        &self,
        csum_off: usize,
        from: u32,
        to: u32,
        field: L4Field,
        udp: bool,
    ) -> Result<(), i64> {
        let check: *mut [u8; 2] = ptr_at(self, csum_off).ok_or(-1i64)?;
        // SAFETY: `ptr_at` checked the two bytes lie within the frame.
        unsafe {
            let old = u16::from_ne_bytes(*check);
            if udp && old == 0 {
                return Ok(());
            }
            let new = match field {
                L4Field::Addr => csum::replace_u32_l4(old, from, to, udp),
                L4Field::Port => csum::replace_u16(old, from as u16, to as u16, udp),
            };
            *check = new.to_ne_bytes();
        }
        Ok(())
    }

    #[inline(always)]
    fn set_len(&self, len: u32) -> Result<(), i64> {
        // The current length from the helper, not `data_end - data`: the
        // compiler would fold that into arithmetic on `data_end`, which the
        // verifier refuses.
        // SAFETY: the context pointer is the program's own frame.
        let current = unsafe { bpf_xdp_get_buff_len(self.ctx) };
        let delta = len as i32 - current as i32;
        // SAFETY: the context pointer is the program's own frame; the
        // helper checks the new length against the buffer.
        let ret = unsafe { bpf_xdp_adjust_tail(self.ctx, delta) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    unsafe fn load_bytes(&self, off: usize, dst: *mut u8, len: u32) -> Result<(), i64> {
        // SAFETY: the caller guarantees `dst` covers `len` bytes; the helper
        // bounds-checks the frame side.
        let ret = unsafe { bpf_xdp_load_bytes(self.ctx, off as u32, dst.cast(), len) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }

    #[inline(always)]
    unsafe fn store_bytes(&self, off: usize, src: *const u8, len: u32) -> Result<(), i64> {
        // SAFETY: the caller guarantees `src` covers `len` bytes (the helper
        // only reads it despite the `*mut`); it bounds-checks the frame side.
        let ret = unsafe { bpf_xdp_store_bytes(self.ctx, off as u32, src.cast_mut().cast(), len) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }
}

/// The XDP verdict for `action`. A bounced answer and a forwarded packet
/// both leave through the interface they arrived on (`XDP_TX`): the
/// answer with its MAC addresses swapped, the forwarded packet with the
/// next hop's (see `fib`).
#[inline(always)]
pub const fn xdp_verdict(action: Action) -> u32 {
    match action {
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Bounce | Action::Forward => xdp_action::XDP_TX,
    }
}
