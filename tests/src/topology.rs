//! The simulated cluster: a [`Testbed`] owns nodes, a node owns its pods;
//! nodes may also join a shared network with external clients.
//!
//! A node is a network namespace that routes between its pods, like a
//! Kubernetes node with a plain routed CNI. A pod is a namespace joined to
//! its node by one veth pair, created directly inside the two namespaces:
//! `eth0` in the pod, `h<k>` on the node (the interface the agent attaches
//! to). Nothing is ever created in, or routed through, the root namespace.
//!
//! Nodes added with [`Testbed::add_networked_node`] also get an `eth0` on
//! the *network*: a namespace `<testbed>-net` holding the bridge `br0`,
//! each node's and each external client's veth peer enslaved to it. Every
//! networked node routes the other nodes' pod subnets via their node
//! address (a routed CNI without encapsulation). External clients
//! ([`Testbed::add_external_client`]) reach only the node network, plus
//! whatever is routed to a node on purpose ([`ExternalClient::route_via`]:
//! a load-balancer IP or an external IP, as a router or MetalLB would).
//! The network's veths carry what a wire carries: TX checksum offload is
//! off on both ends, so no packet crosses with a partial checksum; and the
//! bridge-side peers of node interfaces take the frames a node's XDP
//! program sends back out with XDP_TX as a NIC's wire would: GRO on gives
//! them the NAPI instance that receives such frames, and a do-nothing XDP
//! program ([`crate::xdp_pass`]) makes the kernel wake it after each burst.
//! A node added with [`UplinkPeer::Plain`] gets no such program on its
//! peer: the uplink of a kind node or a container, whose far end a node
//! cannot touch (the agent must then not rely on XDP_TX: `--xdp-forward`).
//!
//! Addressing, all inside 198.18.0.0/15 (RFC 2544 benchmarking space):
//! pod `k` of node `n` has subnet `198.18.<32n+k>.0/24`, the node side is
//! `.1`, the pod `.2` with its default route via `.1`; so node `n`'s pods
//! all lie in `198.18.<32n>.0/19`, and nodes 0..[`MAX_NODES`] cover
//! 198.18.0.0-198.18.223.255. The rest of 198.18.0.0/16 is the
//! infrastructure's: the node network is [`NODE_NETWORK`] (node `n` at
//! `.n+1`, external client `k` at `.100+k`), load-balancer ingress and
//! external IPs come from [`external_ip`] (198.18.253.0/24). Service
//! addresses come from 198.19.0.0/16 ([`cluster_ip`]); nothing routes
//! them, so only the load balancer makes them reachable.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::dirs::{PinDir, ScratchDir};
use crate::error::Result;
use crate::ethtool::{self, Feature};
use crate::names;
use crate::netns::NetNs;
use crate::xdp_pass::XdpPass;

/// Pods per node the addressing plan has room for.
pub const MAX_PODS_PER_NODE: usize = 32;
/// Nodes the addressing plan has room for: their pods fill
/// 198.18.0.0-198.18.223.255 in /24s, leaving 198.18.224.0/19 to the
/// node network and the external addresses.
pub const MAX_NODES: usize = 224 / MAX_PODS_PER_NODE;
/// Interface of a networked node (and of an external client) on the network.
pub const NETWORK_IFACE: &str = "eth0";
/// The bridge of the network namespace.
pub const BRIDGE: &str = "br0";
/// The node network, a /24: nodes and external clients.
pub const NODE_NETWORK: Ipv4Addr = Ipv4Addr::new(198, 18, 254, 0);
/// External clients the addressing plan has room for (`.100` to `.199`).
pub const MAX_EXTERNAL_CLIENTS: usize = 100;

/// Address of node `index` (0-based) on the node network: `198.18.254.<index+1>`.
pub fn node_addr(index: usize) -> Ipv4Addr {
    assert!(
        index < MAX_NODES,
        "the addressing plan has room for {MAX_NODES} nodes"
    );
    Ipv4Addr::new(198, 18, 254, u8::try_from(index + 1).expect("bounded"))
}

/// Address of external client `index` (0-based): `198.18.254.<100+index>`.
pub fn external_client_addr(index: usize) -> Ipv4Addr {
    assert!(
        index < MAX_EXTERNAL_CLIENTS,
        "the addressing plan has room for {MAX_EXTERNAL_CLIENTS} external clients"
    );
    Ipv4Addr::new(198, 18, 254, u8::try_from(100 + index).expect("bounded"))
}

/// The `index`-th address for load-balancer ingress IPs and external IPs:
/// `198.18.253.<index>`. Nothing routes these except what a test routes
/// to a node on purpose.
pub fn external_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 253, index)
}

/// The block holding every pod subnet of node `index`: `198.18.<32n>.0/19`.
pub fn node_pod_block(index: usize) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(198, 18, pod_octet(index, 0), 0), 19)
}

/// The `index`-th service address: 198.19.<index / 256>.<index % 256>.
pub fn cluster_ip(index: u16) -> Ipv4Addr {
    let [high, low] = index.to_be_bytes();
    Ipv4Addr::new(198, 19, high, low)
}

/// Subnet octet (the third) of pod `pod` on node `node`.
fn pod_octet(node: usize, pod: usize) -> u8 {
    assert!(
        node < MAX_NODES,
        "the addressing plan has room for {MAX_NODES} nodes"
    );
    assert!(
        pod < MAX_PODS_PER_NODE,
        "the addressing plan has room for {MAX_PODS_PER_NODE} pods per node"
    );
    u8::try_from(node * MAX_PODS_PER_NODE + pod).expect("bounded by the asserts above")
}

// A node's pods fill exactly one /19 (see [`node_pod_block`]).
const _: () = assert!(MAX_PODS_PER_NODE == 32);

fn prefix(addr: Ipv4Addr, len: u8) -> String {
    format!("{addr}/{len}")
}

/// What the bridge-side peer of a networked node's [`NETWORK_IFACE`] runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UplinkPeer {
    /// GRO on and a do-nothing XDP program ([`crate::xdp_pass`]): XDP_TX
    /// frames from the node are delivered at once, as on a NIC's wire.
    #[default]
    XdpPass,
    /// GRO on, no XDP program: like the host end of a kind node's or a
    /// container's veth, where XDP_TX frames from the node wait until
    /// something else wakes the peer.
    Plain,
}

/// One test's world. Everything it creates is named after
/// [`Testbed::name`] and removed when it is dropped: external clients,
/// nodes (with their pods), the network, then the scratch directory.
#[derive(Debug)]
pub struct Testbed {
    // Field order is drop order.
    clients: Vec<ExternalClient>,
    nodes: Vec<Node>,
    network: Option<Network>,
    scratch: ScratchDir,
    name: String,
}

impl Testbed {
    /// An empty testbed named `lbt-<tag>-<pid>-<counter>`, with a scratch
    /// directory of that name under the temp directory.
    pub fn new(tag: &str) -> Result<Self> {
        let name = names::unique(tag);
        let scratch = ScratchDir::create(&name)?;
        Ok(Self {
            clients: Vec::new(),
            nodes: Vec::new(),
            network: None,
            scratch,
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A directory for manifests, logs and other files of this testbed.
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// Adds a node namespace `<testbed>-<name>` that forwards between its
    /// pods, on no network.
    pub fn add_node(&mut self, name: &str) -> Result<&mut Node> {
        let node = Node::create(&self.name, name, self.nodes.len())?;
        self.nodes.push(node);
        Ok(self.nodes.last_mut().expect("just pushed"))
    }

    /// Adds a node as [`Testbed::add_node`] does, and joins it to the
    /// network (created on first use) with [`NETWORK_IFACE`] at
    /// [`node_addr`]; it routes the pod blocks of the other networked nodes
    /// via their addresses, and they route its block via its address.
    pub fn add_networked_node(&mut self, name: &str) -> Result<&mut Node> {
        self.add_networked_node_with(name, UplinkPeer::XdpPass)
    }

    /// [`Testbed::add_networked_node`] with the bridge-side peer of the
    /// node's interface set up as `peer` says.
    pub fn add_networked_node_with(&mut self, name: &str, peer: UplinkPeer) -> Result<&mut Node> {
        let index = self.nodes.len();
        let addr = node_addr(index);
        let mut node = Node::create(&self.name, name, index)?;
        let network = self.ensure_network()?;
        let port = format!("n{index}");
        network.connect(&node.ns, &port, addr)?;
        // The bridge-side peer receives what the node's XDP program sends
        // back out of eth0 with XDP_TX: that needs its NAPI, which GRO
        // switches on, and an XDP program of its own, without which the
        // sender never wakes that NAPI (see `xdp_pass`).
        ethtool::set(&network.ns, &port, Feature::Gro, true)?;
        let xdp_pass = match peer {
            UplinkPeer::XdpPass => Some(XdpPass::attach(&network.ns, &port)?),
            UplinkPeer::Plain => None,
        };
        node.network_addr = Some(addr);
        for other in &self.nodes {
            let Some(other_addr) = other.network_addr else {
                continue;
            };
            let (block, len) = node_pod_block(other.index);
            node.ns.ip(&[
                "route",
                "add",
                &prefix(block, len),
                "via",
                &other_addr.to_string(),
            ])?;
            let (block, len) = node_pod_block(index);
            other.ns.ip(&[
                "route",
                "add",
                &prefix(block, len),
                "via",
                &addr.to_string(),
            ])?;
        }
        self.network
            .as_mut()
            .expect("created above")
            .xdp_passes
            .extend(xdp_pass);
        self.nodes.push(node);
        Ok(self.nodes.last_mut().expect("just pushed"))
    }

    /// Adds an external client: a namespace `<testbed>-<name>` on the
    /// network (created on first use) with [`NETWORK_IFACE`] at
    /// [`external_client_addr`], and no route beyond the node network.
    pub fn add_external_client(&mut self, name: &str) -> Result<&ExternalClient> {
        let index = self.clients.len();
        let addr = external_client_addr(index);
        let ns = NetNs::create(format!("{}-{name}", self.name))?;
        let network = self.ensure_network()?;
        network.connect(&ns, &format!("c{index}"), addr)?;
        self.clients.push(ExternalClient {
            ns,
            name: name.to_owned(),
            addr,
        });
        Ok(self.clients.last().expect("just pushed"))
    }

    /// The network, created on first use: a namespace `<testbed>-net` with
    /// the bridge [`BRIDGE`] up.
    fn ensure_network(&mut self) -> Result<&Network> {
        if self.network.is_none() {
            let ns = NetNs::create(format!("{}-net", self.name))?;
            ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
            ns.ip(&["link", "set", BRIDGE, "up"])?;
            self.network = Some(Network {
                xdp_passes: Vec::new(),
                ns,
            });
        }
        Ok(self.network.as_ref().expect("just created"))
    }

    /// The network namespace, if a networked node or an external client
    /// created it.
    pub fn network_ns(&self) -> Option<&NetNs> {
        self.network.as_ref().map(|network| &network.ns)
    }

    /// The node called `name`; panics if there is none (a bug in the test).
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("testbed {} has no node {name}", self.name))
    }

    /// The node called `name`, to add pods to; panics if there is none.
    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        let testbed = &self.name;
        self.nodes
            .iter_mut()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("testbed {testbed} has no node {name}"))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The external client called `name`; panics if there is none.
    pub fn external_client(&self, name: &str) -> &ExternalClient {
        self.clients
            .iter()
            .find(|client| client.name == name)
            .unwrap_or_else(|| panic!("testbed {} has no external client {name}", self.name))
    }

    pub fn external_clients(&self) -> &[ExternalClient] {
        &self.clients
    }

    /// A pin directory `/sys/fs/bpf/<testbed>-<purpose>` for one agent.
    pub fn pin_dir(&self, purpose: &str) -> Result<PinDir> {
        PinDir::new(&format!("{}-{purpose}", self.name))
    }
}

/// The network joining networked nodes and external clients: one
/// namespace holding a bridge.
#[derive(Debug)]
struct Network {
    // Detached before the namespace goes.
    xdp_passes: Vec<XdpPass>,
    ns: NetNs,
}

impl Network {
    /// Wires `ns` to the bridge: [`NETWORK_IFACE`] in `ns` at `addr`/24,
    /// its peer `port` in the network namespace enslaved to the bridge,
    /// both created in their namespaces by one request, both with TX
    /// checksum offload off.
    fn connect(&self, ns: &NetNs, port: &str, addr: Ipv4Addr) -> Result<()> {
        self.ns.ip(&[
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            NETWORK_IFACE,
            "netns",
            ns.name(),
        ])?;
        self.ns.ip(&["link", "set", port, "master", BRIDGE])?;
        ethtool::set(&self.ns, port, Feature::TxChecksum, false)?;
        ethtool::set(ns, NETWORK_IFACE, Feature::TxChecksum, false)?;
        self.ns.ip(&["link", "set", port, "up"])?;
        ns.ip(&["addr", "add", &prefix(addr, 24), "dev", NETWORK_IFACE])?;
        ns.ip(&["link", "set", NETWORK_IFACE, "up"])?;
        Ok(())
    }
}

/// A host outside the cluster on the node network: a namespace with
/// [`NETWORK_IFACE`] and one address, routes only to the node network and
/// to what [`ExternalClient::route_via`] adds.
#[derive(Debug)]
pub struct ExternalClient {
    ns: NetNs,
    name: String,
    addr: Ipv4Addr,
}

impl ExternalClient {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Routes `destination` (one address) via `node`'s address, as a router
    /// in front of the cluster (or MetalLB's announcement) would.
    pub fn route_via(&self, destination: Ipv4Addr, node: &Node) -> Result<()> {
        self.ns.ip(&[
            "route",
            "replace",
            &prefix(destination, 32),
            "via",
            &node.addr().to_string(),
        ])?;
        Ok(())
    }

    /// Runs `task` inside the client's network namespace (see [`NetNs::run`]).
    pub fn run<T, F>(&self, task: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        self.ns.run(task)
    }
}

/// A node: a namespace with forwarding on and reverse-path filtering off
/// (replies from a backend leave a pod with the ClusterIP as source once
/// translated, which is not that pod's subnet).
#[derive(Debug)]
pub struct Node {
    // Field order is drop order: pods (and their veths) go before the node.
    pods: Vec<Pod>,
    ns: NetNs,
    name: String,
    index: usize,
    /// The node's address on the network, if it joined it.
    network_addr: Option<Ipv4Addr>,
    testbed: String,
}

impl Node {
    fn create(testbed: &str, name: &str, index: usize) -> Result<Self> {
        let ns = NetNs::create(format!("{testbed}-{name}"))?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        // `default` covers the pod interfaces created later; rp_filter
        // takes the maximum of `all` and the interface's own value.
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        Ok(Self {
            pods: Vec::new(),
            ns,
            name: name.to_owned(),
            index,
            network_addr: None,
            testbed: testbed.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The node's position in the testbed, which fixes its addresses.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's address on the network ([`NETWORK_IFACE`]); panics if the
    /// node is not on the network (a bug in the test).
    pub fn addr(&self) -> Ipv4Addr {
        self.network_addr
            .unwrap_or_else(|| panic!("node {} is not on the network", self.name))
    }

    /// Whether the node joined the network.
    pub fn is_networked(&self) -> bool {
        self.network_addr.is_some()
    }

    /// Runs `task` inside the node's network namespace (see [`NetNs::run`]).
    pub fn run<T, F>(&self, task: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        self.ns.run(task)
    }

    /// Adds pod `name` (namespace `<testbed>-<name>`) with the next free
    /// subnet, wired to this node by the veth pair `h<k>` (node) / `eth0`
    /// (pod).
    pub fn add_pod(&mut self, name: &str) -> Result<&Pod> {
        let slot = self.pods.len();
        let octet = pod_octet(self.index, slot);
        let gateway = Ipv4Addr::new(198, 18, octet, 1);
        let addr = Ipv4Addr::new(198, 18, octet, 2);
        let host_iface = format!("h{slot}");
        let ns = NetNs::create(format!("{}-{name}", self.testbed))?;

        // Both ends are created inside their namespaces in one netlink
        // request issued from the node namespace: neither end ever exists
        // in the root namespace.
        self.ns.ip(&[
            "link",
            "add",
            &host_iface,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        self.ns
            .ip(&["addr", "add", &format!("{gateway}/24"), "dev", &host_iface])?;
        self.ns.ip(&["link", "set", &host_iface, "up"])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;

        self.pods.push(Pod {
            ns,
            name: name.to_owned(),
            addr,
            gateway,
            host_iface,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// The pod called `name`; panics if there is none (a bug in the test).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|pod| pod.name == name)
            .unwrap_or_else(|| panic!("node {} has no pod {name}", self.name))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The node-side interfaces of all pods: what the agent attaches to.
    pub fn pod_ifaces(&self) -> Vec<&str> {
        self.pods
            .iter()
            .map(|pod| pod.host_iface.as_str())
            .collect()
    }
}

/// A pod: a namespace with `eth0`, one address and a default route via its
/// node.
#[derive(Debug)]
pub struct Pod {
    ns: NetNs,
    name: String,
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
    host_iface: String,
}

impl Pod {
    /// The pod's name as servers report it (not the namespace name).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The node's address on this pod's link.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The node-side end of the pod's veth.
    pub fn host_iface(&self) -> &str {
        &self.host_iface
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// Runs `task` inside the pod's network namespace (see [`NetNs::run`]).
    pub fn run<T, F>(&self, task: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        self.ns.run(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing_plan() {
        assert_eq!(cluster_ip(10), Ipv4Addr::new(198, 19, 0, 10));
        assert_eq!(cluster_ip(257), Ipv4Addr::new(198, 19, 1, 1));
        assert_eq!(pod_octet(0, 3), 3);
        assert_eq!(pod_octet(1, 0), 32);
        assert_eq!(pod_octet(MAX_NODES - 1, MAX_PODS_PER_NODE - 1), 223);
        assert_eq!(node_pod_block(1), (Ipv4Addr::new(198, 18, 32, 0), 19));
        assert_eq!(node_addr(0), Ipv4Addr::new(198, 18, 254, 1));
        assert_eq!(external_client_addr(1), Ipv4Addr::new(198, 18, 254, 101));
        assert_eq!(external_ip(7), Ipv4Addr::new(198, 18, 253, 7));
        // Pod blocks end below the infrastructure's /19.
        let (last_block, _) = node_pod_block(MAX_NODES - 1);
        assert!(u32::from(last_block) + (1 << 13) <= u32::from(Ipv4Addr::new(198, 18, 224, 0)));
        assert!(u32::from(NODE_NETWORK) >= u32::from(Ipv4Addr::new(198, 18, 224, 0)));
    }

    #[test]
    #[should_panic(expected = "pods per node")]
    fn addressing_plan_is_bounded() {
        pod_octet(0, MAX_PODS_PER_NODE);
    }
}
