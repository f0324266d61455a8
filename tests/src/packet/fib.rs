//! A network namespace whose routing table and neighbours make
//! `bpf_fib_lookup` results deterministic for test runs.
//!
//! `bpf_fib_lookup` consults the namespace of the packet's device: for an
//! XDP test run the device of `xdp_md.ingress_ifindex`, for a TC test run
//! `__sk_buff.ifindex`; both are resolved in the namespace of the calling
//! thread, so every test run that forwards goes through [`FibNet::run`],
//! which runs it on a thread inside this namespace. Nothing here touches
//! the root namespace: both ends of every veth pair are created in this
//! one, and the pair is the namespace's only link.
//!
//! The node (this namespace):
//!
//! | what | address | MAC | how |
//! |---|---|---|---|
//! | the node, on `ext0` | [`NODE_ADDR`]/24 | [`NODE_MAC`] | external interface |
//! | node 2 | [`NODE2_ADDR`] | [`NODE2_MAC`] | permanent neighbour on `ext0`; routes [`NODE2_PODS`]/24 |
//! | node 3 | [`NODE3_ADDR`] | none | no neighbour entry (`NO_NEIGH`); routes [`NODE3_PODS`]/24 |
//! | external clients | [`CLIENT_ADDR`], [`CLIENT2_ADDR`] | [`CLIENT_MAC`], [`CLIENT2_MAC`] | permanent neighbours on `ext0` |
//! | a local pod behind `pod0` | [`LOCAL_POD`] | `frame::POD_MAC` (host side `frame::HOST_MAC`) | /32 route and permanent neighbour on `pod0` |
//! | the node, on `ext1` | [`NODE_ADDR_2`]/24 | [`NODE_MAC_2`] | a second network |
//! | node 4, on `ext1` | [`NODE4_ADDR`] | [`NODE4_MAC`] | permanent neighbour on `ext1`; routes [`NODE4_PODS`]/24 |
//! | nowhere | [`BLACKHOLE_PODS`]/24 | | a blackhole route |
//!
//! `net.ipv4.ip_forward` is on: a FIB lookup for a packet arriving on an
//! interface without forwarding reports `FWD_DISABLED`.

use std::ffi::CString;
use std::net::Ipv4Addr;

use crate::command;
use crate::names;
use crate::netns::NetNs;

use super::frame::{HOST_MAC, POD_MAC};
use super::{PacketError, Result};

/// The external interface and its veth peer (both in the namespace).
pub const EXT_IFACE: &str = "ext0";
const EXT_PEER: &str = "ext0p";
/// A second interface of the node, on another network.
pub const OTHER_IFACE: &str = "ext1";
const OTHER_PEER: &str = "ext1p";
/// The host side of the local pod's veth, and its peer (the pod's eth0,
/// kept in the same namespace: only its MAC matters here).
pub const POD_IFACE: &str = "pod0";
const POD_PEER: &str = "pod0p";

/// This node's address on [`EXT_IFACE`] (its NodePort and SNAT address).
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 1);
pub const NODE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x01];
/// Another node, with a known MAC; its pods are [`NODE2_PODS`]/24.
pub const NODE2_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 2);
pub const NODE2_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x02];
pub const NODE2_PODS: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 0);
/// A third node whose MAC is not known (no neighbour entry); its pods are
/// [`NODE3_PODS`]/24.
pub const NODE3_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 3);
pub const NODE3_PODS: Ipv4Addr = Ipv4Addr::new(198, 18, 96, 0);
/// External clients on the node network.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 101);
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x02, 0x65];
pub const CLIENT2_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 150);
pub const CLIENT2_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x02, 0x96];
/// This node's address on [`OTHER_IFACE`].
pub const NODE_ADDR_2: Ipv4Addr = Ipv4Addr::new(198, 18, 252, 1);
pub const NODE_MAC_2: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x11];
/// A node reached through [`OTHER_IFACE`]; its pods are [`NODE4_PODS`]/24.
pub const NODE4_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 252, 4);
pub const NODE4_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x04];
pub const NODE4_PODS: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 0);
/// Pods behind a blackhole route.
pub const BLACKHOLE_PODS: Ipv4Addr = Ipv4Addr::new(198, 18, 160, 0);
/// A pod on this node, behind [`POD_IFACE`].
pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(198, 18, 32, 10);

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn setup_error(source: crate::error::TestbedError) -> PacketError {
    PacketError::Network(source)
}

/// The namespace, deleted on drop (with its interfaces).
pub struct FibNet {
    ns: NetNs,
    ext_ifindex: u32,
    pod_ifindex: u32,
}

impl FibNet {
    /// Creates the namespace and its interfaces, addresses, routes and
    /// neighbours (see the module documentation).
    pub fn create() -> Result<Self> {
        let ns = NetNs::create(names::unique("fib")).map_err(setup_error)?;
        let name = ns.name().to_owned();
        for (iface, peer, mac) in [
            (EXT_IFACE, EXT_PEER, NODE_MAC),
            (POD_IFACE, POD_PEER, HOST_MAC),
            (OTHER_IFACE, OTHER_PEER, NODE_MAC_2),
        ] {
            command::run(
                "ip",
                &[
                    "link", "add", iface, "netns", &name, "type", "veth", "peer", "name", peer,
                    "netns", &name,
                ],
            )
            .map_err(setup_error)?;
            ns.ip(&["link", "set", iface, "address", &mac_text(&mac)])
                .map_err(setup_error)?;
        }
        ns.ip(&["link", "set", POD_PEER, "address", &mac_text(&POD_MAC)])
            .map_err(setup_error)?;
        for iface in [
            EXT_IFACE,
            EXT_PEER,
            POD_IFACE,
            POD_PEER,
            OTHER_IFACE,
            OTHER_PEER,
        ] {
            ns.ip(&["link", "set", iface, "up"]).map_err(setup_error)?;
        }
        ns.sysctl("net.ipv4.ip_forward", "1").map_err(setup_error)?;
        let node = format!("{NODE_ADDR}/24");
        let commands: Vec<Vec<String>> = vec![
            vec![
                "addr".into(),
                "add".into(),
                node,
                "dev".into(),
                EXT_IFACE.into(),
            ],
            neighbour(NODE2_ADDR, &NODE2_MAC, EXT_IFACE),
            neighbour(CLIENT_ADDR, &CLIENT_MAC, EXT_IFACE),
            neighbour(CLIENT2_ADDR, &CLIENT2_MAC, EXT_IFACE),
            route(&format!("{NODE2_PODS}/24"), Some(NODE2_ADDR), EXT_IFACE),
            route(&format!("{NODE3_PODS}/24"), Some(NODE3_ADDR), EXT_IFACE),
            route(&format!("{LOCAL_POD}/32"), None, POD_IFACE),
            neighbour(LOCAL_POD, &POD_MAC, POD_IFACE),
            vec![
                "addr".into(),
                "add".into(),
                format!("{NODE_ADDR_2}/24"),
                "dev".into(),
                OTHER_IFACE.into(),
            ],
            neighbour(NODE4_ADDR, &NODE4_MAC, OTHER_IFACE),
            route(&format!("{NODE4_PODS}/24"), Some(NODE4_ADDR), OTHER_IFACE),
            vec![
                "route".into(),
                "add".into(),
                "blackhole".into(),
                format!("{BLACKHOLE_PODS}/24"),
            ],
        ];
        for args in &commands {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ns.ip(&args).map_err(setup_error)?;
        }
        let (ext_ifindex, pod_ifindex) = ns
            .run(|| (ifindex(EXT_IFACE), ifindex(POD_IFACE)))
            .map_err(setup_error)?;
        Ok(Self {
            ext_ifindex: ext_ifindex?,
            pod_ifindex: pod_ifindex?,
            ns,
        })
    }

    /// Index of [`EXT_IFACE`] in the namespace.
    pub fn ext_ifindex(&self) -> u32 {
        self.ext_ifindex
    }

    /// Index of [`POD_IFACE`] in the namespace.
    pub fn pod_ifindex(&self) -> u32 {
        self.pod_ifindex
    }

    pub fn namespace(&self) -> &NetNs {
        &self.ns
    }

    /// Runs `task` on a thread inside the namespace (where test runs must
    /// be made for their FIB lookups to see its routes).
    pub fn run<T, F>(&self, task: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        self.ns.run(task).map_err(setup_error)
    }
}

fn neighbour(addr: Ipv4Addr, mac: &[u8; 6], dev: &str) -> Vec<String> {
    [
        "neigh",
        "add",
        &addr.to_string(),
        "lladdr",
        &mac_text(mac),
        "dev",
        dev,
        "nud",
        "permanent",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn route(prefix: &str, via: Option<Ipv4Addr>, dev: &str) -> Vec<String> {
    let mut args = vec!["route".to_owned(), "add".to_owned(), prefix.to_owned()];
    if let Some(gateway) = via {
        args.extend(["via".to_owned(), gateway.to_string()]);
    }
    args.extend(["dev".to_owned(), dev.to_owned()]);
    args
}

/// `if_nametoindex` in the calling thread's namespace.
fn ifindex(iface: &str) -> Result<u32> {
    let name = CString::new(iface).expect("interface names have no NUL");
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(PacketError::Interface {
            iface: iface.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(index)
}
