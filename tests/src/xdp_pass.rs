//! A do-nothing XDP program (`return XDP_PASS`) for the network's
//! bridge-side veth peers of node interfaces.
//!
//! A frame a node's XDP program sends back out with XDP_TX goes into the
//! peer's receive ring; the peer needs a NAPI instance to take it at all
//! (GRO on gives it one, see [`crate::ethtool`]), but the kernel's veth
//! driver only *schedules* that NAPI after an XDP_TX burst if the peer has
//! an XDP program of its own (`veth_xdp_flush` skips the kick otherwise).
//! Without one, XDP_TX frames wait in the ring until unrelated traffic
//! happens to wake the peer: seconds, or forever. This program is that XDP
//! program, and does nothing else.
//!
//! Loaded and attached with raw `bpf(2)` calls (two instructions need no
//! object file): `BPF_PROG_LOAD`, then `BPF_LINK_CREATE` on the interface.
//! The link lives as long as its descriptor: dropping [`XdpPass`] detaches
//! it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{Result, TestbedError};
use crate::netns::NetNs;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_PASS: i32 = 2;

/// `struct bpf_insn`: opcode, dst/src registers (4 bits each), offset,
/// immediate.
#[repr(C)]
#[derive(Clone, Copy)]
struct BpfInsn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// `r0 = XDP_PASS; exit`.
const PROGRAM: [BpfInsn; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0.
    BpfInsn {
        code: 0xb7,
        regs: 0,
        off: 0,
        imm: XDP_PASS,
    },
    // BPF_JMP | BPF_EXIT.
    BpfInsn {
        code: 0x95,
        regs: 0,
        off: 0,
        imm: 0,
    },
];

/// `union bpf_attr`, large enough for both commands used here; unused
/// bytes must be zero.
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

impl BpfAttr {
    fn zeroed() -> Self {
        Self([0; 128])
    }

    fn put_u32(&mut self, offset: usize, value: u32) {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    }

    fn put_u64(&mut self, offset: usize, value: u64) {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
    }
}

fn bpf(command: libc::c_long, attr: &mut BpfAttr) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialised bpf_attr of the size passed;
    // the pointers inside it point to live data of the caller.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            std::mem::size_of::<BpfAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn load() -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = BpfAttr::zeroed();
    attr.put_u32(0, BPF_PROG_TYPE_XDP);
    attr.put_u32(4, u32::try_from(PROGRAM.len()).expect("two instructions"));
    attr.put_u64(8, PROGRAM.as_ptr() as u64);
    attr.put_u64(16, license.as_ptr() as u64);
    let name = b"lbt_xdp_pass";
    attr.0[48..48 + name.len()].copy_from_slice(name);
    attr.put_u32(68, BPF_XDP);
    bpf(BPF_PROG_LOAD, &mut attr)
}

fn link(program: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    let mut attr = BpfAttr::zeroed();
    attr.put_u32(
        0,
        u32::try_from(program.as_raw_fd()).expect("descriptors are non-negative"),
    );
    attr.put_u32(4, ifindex);
    attr.put_u32(8, BPF_XDP);
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// The XDP_PASS program attached (driver mode) to one interface; detached
/// on drop.
#[derive(Debug)]
pub struct XdpPass {
    _link: OwnedFd,
    _program: OwnedFd,
}

impl XdpPass {
    /// Loads the program and links it to `iface` in `ns`.
    pub fn attach(ns: &NetNs, iface: &str) -> Result<Self> {
        let name = std::ffi::CString::new(iface).map_err(|_| {
            TestbedError::io(
                format!("attach XDP_PASS to {iface:?}"),
                io::Error::from(io::ErrorKind::InvalidInput),
            )
        })?;
        ns.run(|| -> io::Result<Self> {
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            let program = load()?;
            let link = link(&program, ifindex)?;
            Ok(Self {
                _link: link,
                _program: program,
            })
        })?
        .map_err(|source| {
            TestbedError::io(
                format!("attach XDP_PASS to {iface} in {}", ns.name()),
                source,
            )
        })
    }
}
