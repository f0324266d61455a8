//! The packet operations the translation logic needs, as a trait over the
//! program context.
//!
//! Everything from parsing to DNAT/SNAT and reject generation is written
//! against [`PacketContext`], so an XDP entry point can reuse it by
//! implementing the trait for `XdpContext` (direct stores, software L4
//! checksum updates, `bpf_xdp_adjust_tail`) and mapping [`Action`] to XDP
//! verdicts. TC is the only implementation today.

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{
        bpf_l4_csum_replace, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_skb_pull_data, bpf_skb_store_bytes,
    },
    programs::TcContext,
};

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
    }
}
