//! This node's addresses: where its NodePorts are reached (one frontend
//! per address and nodePort), and the address external flows to backends
//! on other nodes are source-translated to (`LB_CONFIG.snat_addr`).
//!
//! - With the Kubernetes API, they are the Node's `status.addresses` of
//!   type `InternalIP` and `ExternalIP` (IPv4; the datapath is IPv4 only),
//!   as kube-proxy's NodePorts answer on the node's IPs; the SNAT address is
//!   the first `InternalIP` (an `ExternalIP` is often not on the node at
//!   all, but translated to it by the cloud's network).
//! - With manifests (no Node object), they are the IPv4 addresses of the
//!   `--external` interfaces, read with `getifaddrs(3)` in the agent's
//!   network namespace; the SNAT address is the first of them.

use std::ffi::CStr;
use std::io;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Node;

/// `status.addresses[].type` values that are NodePort addresses.
pub const INTERNAL_IP: &str = "InternalIP";
pub const EXTERNAL_IP: &str = "ExternalIP";

/// This node's addresses as the datapath needs them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// Every address NodePorts are reached on, each once, in the order
    /// found.
    pub addresses: Vec<Ipv4Addr>,
    /// The source address of external flows to backends on other nodes;
    /// `None`: none known (such flows are dropped).
    pub snat: Option<Ipv4Addr>,
}

impl NodeAddresses {
    /// `LB_CONFIG.snat_addr`: the SNAT address, `0.0.0.0` for none.
    pub fn snat_or_unspecified(&self) -> Ipv4Addr {
        self.snat.unwrap_or(Ipv4Addr::UNSPECIFIED)
    }
}

/// A Node's InternalIP and ExternalIP IPv4 addresses, in the order of
/// `status.addresses`; the SNAT address is the first InternalIP.
pub fn of_node(node: &Node) -> NodeAddresses {
    let mut addresses = NodeAddresses::default();
    let listed = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_deref())
        .unwrap_or_default();
    for address in listed {
        let kind = address.type_.as_str();
        if kind != INTERNAL_IP && kind != EXTERNAL_IP {
            continue;
        }
        // IPv6 addresses (dual-stack nodes) and host names are not ours.
        let Ok(ip) = address.address.parse::<Ipv4Addr>() else {
            continue;
        };
        if kind == INTERNAL_IP && addresses.snat.is_none() {
            addresses.snat = Some(ip);
        }
        if !addresses.addresses.contains(&ip) {
            addresses.addresses.push(ip);
        }
    }
    addresses
}

/// The addresses of the interfaces named in `external`, from the
/// `(interface, address)` pairs of the network namespace: interfaces in
/// the order given, each one's addresses in the kernel's order (primary
/// first). The SNAT address is the first of them (that of the first
/// external interface that has one).
pub fn of_interfaces(external: &[String], all: &[(String, Ipv4Addr)]) -> NodeAddresses {
    let mut addresses = NodeAddresses::default();
    for iface in external {
        for (_, ip) in all.iter().filter(|(name, _)| name == iface) {
            if !addresses.addresses.contains(ip) {
                addresses.addresses.push(*ip);
            }
        }
    }
    addresses.snat = addresses.addresses.first().copied();
    addresses
}

/// Every IPv4 address of the calling thread's network namespace, with its
/// interface, as `getifaddrs(3)` lists them.
pub fn interface_addresses() -> io::Result<Vec<(String, Ipv4Addr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free once below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, alive
        // until freeifaddrs; its name is a NUL-terminated string and an
        // AF_INET address is a sockaddr_in.
        unsafe {
            let ifa = &*entry;
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && !ifa.ifa_name.is_null()
            {
                let addr = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
                let name = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
                found.push((name, ip));
            }
            entry = ifa.ifa_next;
        }
    }
    // SAFETY: the list from getifaddrs, freed once, no longer used.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// The addresses of the `--external` interfaces, read now.
pub fn read_interfaces(external: &[String]) -> io::Result<NodeAddresses> {
    Ok(of_interfaces(external, &interface_addresses()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn node(addresses: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(kind, address)| NodeAddress {
                            type_: (*kind).into(),
                            address: (*address).into(),
                        })
                        .collect(),
                ),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    #[test]
    fn node_addresses_are_its_ipv4_internal_and_external_ips() {
        let addresses = of_node(&node(&[
            ("Hostname", "node-1"),
            ("ExternalIP", "203.0.113.7"),
            ("InternalIP", "fd00::1"),
            ("InternalIP", "198.18.254.2"),
            ("InternalIP", "198.18.254.3"),
            ("InternalDNS", "node-1.cluster.local"),
            ("ExternalIP", "198.18.254.2"),
        ]));
        assert_eq!(
            addresses.addresses,
            [
                Ipv4Addr::new(203, 0, 113, 7),
                Ipv4Addr::new(198, 18, 254, 2),
                Ipv4Addr::new(198, 18, 254, 3),
            ]
        );
        // The first InternalIP, though an ExternalIP comes first.
        assert_eq!(addresses.snat, Some(Ipv4Addr::new(198, 18, 254, 2)));
    }

    #[test]
    fn a_node_without_internal_ip_has_no_snat_address() {
        let addresses = of_node(&node(&[("ExternalIP", "203.0.113.7")]));
        assert_eq!(addresses.addresses, [Ipv4Addr::new(203, 0, 113, 7)]);
        assert_eq!(addresses.snat, None);
        assert_eq!(addresses.snat_or_unspecified(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(of_node(&Node::default()), NodeAddresses::default());
    }

    #[test]
    fn interface_addresses_follow_the_external_interfaces_order() {
        let all = [
            ("lo".to_owned(), Ipv4Addr::LOCALHOST),
            ("eth1".to_owned(), Ipv4Addr::new(198, 18, 1, 1)),
            ("eth0".to_owned(), Ipv4Addr::new(198, 18, 0, 1)),
            ("eth0".to_owned(), Ipv4Addr::new(198, 18, 0, 2)),
            ("pod0".to_owned(), Ipv4Addr::new(198, 18, 32, 1)),
        ];
        let external = ["eth0".to_owned(), "eth1".to_owned()];
        let addresses = of_interfaces(&external, &all);
        assert_eq!(
            addresses.addresses,
            [
                Ipv4Addr::new(198, 18, 0, 1),
                Ipv4Addr::new(198, 18, 0, 2),
                Ipv4Addr::new(198, 18, 1, 1),
            ]
        );
        assert_eq!(addresses.snat, Some(Ipv4Addr::new(198, 18, 0, 1)));
        // An external interface without an address gives way to the next.
        let addresses = of_interfaces(&["down0".to_owned(), "eth1".to_owned()], &all);
        assert_eq!(addresses.snat, Some(Ipv4Addr::new(198, 18, 1, 1)));
        assert_eq!(of_interfaces(&[], &all), NodeAddresses::default());
    }

    #[test]
    fn loopback_has_its_address() {
        let addresses = read_interfaces(&["lo".to_owned()]).unwrap();
        assert!(
            addresses.addresses.contains(&Ipv4Addr::LOCALHOST),
            "{addresses:?}"
        );
    }
}
