//! The two interface features the testbed sets, through the legacy
//! ethtool ioctls (`SIOCETHTOOL` with a `struct ethtool_value`), issued from
//! a socket inside the interface's namespace:
//!
//! - TX checksum offload. A veth with it on hands its peer
//!   CHECKSUM_PARTIAL packets (the L4 checksum field holds only the
//!   pseudo-header sum). Off, the kernel finishes every checksum in
//!   software before the packet crosses, so it carries what a wire carries.
//! - GRO. On a veth it also switches on the NAPI instance that receives
//!   frames sent to it with XDP_TX (or redirect) from its peer's XDP
//!   program: without it those frames are dropped.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{Result, TestbedError};
use crate::netns::NetNs;

/// `SIOCETHTOOL` and the legacy commands of `linux/ethtool.h`.
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

/// A feature with a legacy get/set command pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// TX checksum offload (`ethtool -K IFACE tx`).
    TxChecksum,
    /// Generic receive offload (`ethtool -K IFACE gro`).
    Gro,
}

impl Feature {
    const fn commands(self) -> (u32, u32) {
        match self {
            Feature::TxChecksum => (ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM),
            Feature::Gro => (ETHTOOL_GGRO, ETHTOOL_SGRO),
        }
    }

    const fn name(self) -> &'static str {
        match self {
            Feature::TxChecksum => "tx-checksum",
            Feature::Gro => "gro",
        }
    }
}

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union.
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _rest: [u8; 16],
}

/// One ethtool command on `iface`, from a socket in the calling thread's
/// namespace; returns the value the kernel reports back.
fn ethtool_value(iface: &str, command: u32, value: u32) -> io::Result<u32> {
    if iface.len() >= libc::IFNAMSIZ || iface.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {iface:?}"),
        ));
    }
    // SAFETY: plain syscall; the descriptor is owned right away.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `socket` is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(socket) };
    let mut request = EthtoolValue {
        cmd: command,
        data: value,
    };
    let mut ifreq = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (&raw mut request).cast(),
        _rest: [0; 16],
    };
    ifreq.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: `ifreq` and the `request` it points to outlive the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL, &raw mut ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(request.data)
}

fn ethtool_error(ns: &NetNs, iface: &str, what: &str, source: io::Error) -> TestbedError {
    TestbedError::io(
        format!("ethtool {what} on {iface} in {}", ns.name()),
        source,
    )
}

/// Whether `feature` is on for `iface` in `ns`.
pub fn get(ns: &NetNs, iface: &str, feature: Feature) -> Result<bool> {
    let (get, _) = feature.commands();
    ns.run(|| ethtool_value(iface, get, 0))?
        .map(|value| value != 0)
        .map_err(|source| ethtool_error(ns, iface, &format!("get {}", feature.name()), source))
}

/// Switches `feature` of `iface` in `ns` on or off, and checks the kernel
/// reports the new state (a device may refuse to change a feature).
pub fn set(ns: &NetNs, iface: &str, feature: Feature, on: bool) -> Result<()> {
    let (_, set) = feature.commands();
    let what = format!("{} {}", feature.name(), if on { "on" } else { "off" });
    ns.run(|| ethtool_value(iface, set, u32::from(on)))?
        .map_err(|source| ethtool_error(ns, iface, &what, source))?;
    if get(ns, iface, feature)? != on {
        return Err(ethtool_error(
            ns,
            iface,
            &what,
            io::Error::other("the device kept its previous state"),
        ));
    }
    Ok(())
}
