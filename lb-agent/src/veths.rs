//! Finding the pods' interfaces on a node (`--attach-veths`): every veth
//! of the agent's network namespace, as the node's end of a pod's veth
//! pair is, whatever the CNI plugin names it (`cali*`, `veth*`, `lxc*`).
//!
//! Interfaces are listed with `if_nameindex(3)` (netlink, so the calling
//! thread's network namespace, whatever `/sys` shows) and recognised by
//! their driver, as `ethtool -i` reports it.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `ETHTOOL_GDRVINFO` from linux/ethtool.h.
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo` from linux/ethtool.h.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// Every interface of this network namespace: name -> ifindex.
pub fn interfaces() -> io::Result<BTreeMap<String, u32>> {
    // SAFETY: if_nameindex returns a heap array ended by a zeroed entry,
    // or null on error; it is read, then freed once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut interfaces = BTreeMap::new();
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            interfaces.insert(name, (*entry).if_index);
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(interfaces)
    }
}

/// The driver of `iface` in the agent's network namespace, as `ethtool -i`
/// reports it (`ETHTOOL_GDRVINFO`): "veth", "mlx5_core", "bridge"... Works
/// for virtual devices, which have no `/sys/class/net/IFACE/device`.
pub fn interface_driver(iface: &str) -> io::Result<String> {
    driver(&ioctl_socket()?, iface)
}

/// A socket to send interface ioctls through.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The driver of `iface` (`veth`, `bridge`, ...).
fn driver(socket: &OwnedFd, iface: &str) -> io::Result<String> {
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= request.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL reads the ifreq and writes the drvinfo it points
    // to, both alive and sized as the kernel expects.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The veths of this network namespace: name -> ifindex. An interface that
/// vanishes while being looked at is left out.
pub fn veths() -> io::Result<BTreeMap<String, u32>> {
    let socket = ioctl_socket()?;
    let mut veths = interfaces()?;
    veths.retain(|name, _| {
        driver(&socket, name).is_ok_and(|driver| driver == crate::datapath::loader::VETH_DRIVER)
    });
    Ok(veths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_and_is_no_veth() {
        let all = interfaces().unwrap();
        assert_eq!(all.get("lo"), Some(&1), "{all:?}");
        assert!(!veths().unwrap().contains_key("lo"));
    }

    #[test]
    fn the_driver_of_a_missing_interface_is_an_error() {
        assert!(interface_driver("lbt-no-such0").is_err());
        assert!(interface_driver("a-name-longer-than-ifnamsiz").is_err());
        // Loopback exists in every network namespace and has no ethtool
        // driver information (EOPNOTSUPP), or reports none.
        if let Ok(driver) = interface_driver("lo") {
            assert_ne!(driver, crate::datapath::loader::VETH_DRIVER);
        }
    }
}
