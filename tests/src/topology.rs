//! The simulated cluster: a [`Testbed`] owns nodes, a node owns its pods.
//!
//! A node is a network namespace that routes between its pods, like a
//! Kubernetes node with a plain routed CNI. A pod is a namespace joined to
//! its node by one veth pair, created directly inside the two namespaces:
//! `eth0` in the pod, `h<k>` on the node (the interface the agent attaches
//! to). Nothing is ever created in, or routed through, the root namespace.
//!
//! Addressing, all inside 198.18.0.0/15 (RFC 2544 benchmarking space):
//! pod `k` of node `n` has subnet `198.18.<32n+k>.0/24`, the node side is
//! `.1`, the pod `.2` with its default route via `.1`. Service addresses
//! come from 198.19.0.0/16 ([`cluster_ip`]); nothing routes them, so only
//! the load balancer makes them reachable.

use std::net::Ipv4Addr;
use std::path::Path;

use crate::dirs::{PinDir, ScratchDir};
use crate::error::Result;
use crate::names;
use crate::netns::NetNs;

/// Pods per node the addressing plan has room for.
pub const MAX_PODS_PER_NODE: usize = 32;
/// Nodes the addressing plan has room for (198.18.0.0/16 in /24s).
pub const MAX_NODES: usize = 256 / MAX_PODS_PER_NODE;

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

/// One test's world. Everything it creates is named after
/// [`Testbed::name`] and removed when it is dropped: nodes (with their
/// pods), then the scratch directory.
#[derive(Debug)]
pub struct Testbed {
    nodes: Vec<Node>,
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
            nodes: Vec::new(),
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
    /// pods.
    pub fn add_node(&mut self, name: &str) -> Result<&mut Node> {
        let node = Node::create(&self.name, name, self.nodes.len())?;
        self.nodes.push(node);
        Ok(self.nodes.last_mut().expect("just pushed"))
    }

    /// The node called `name`; panics if there is none (a bug in the test).
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("testbed {} has no node {name}", self.name))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// A pin directory `/sys/fs/bpf/<testbed>-<purpose>` for one agent.
    pub fn pin_dir(&self, purpose: &str) -> Result<PinDir> {
        PinDir::new(&format!("{}-{purpose}", self.name))
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
            testbed: testbed.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ns(&self) -> &NetNs {
        &self.ns
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
        assert_eq!(pod_octet(MAX_NODES - 1, MAX_PODS_PER_NODE - 1), 255);
    }

    #[test]
    #[should_panic(expected = "pods per node")]
    fn addressing_plan_is_bounded() {
        pod_octet(0, MAX_PODS_PER_NODE);
    }
}
