//! Ready-made clusters for end-to-end tests and the demo: [`OneNode`] (one
//! node, one client pod, `n` backend pods running servers, a manifest
//! directory and the agent attached to every pod's veth) and [`MultiNode`]
//! (nodes on a network, each with pods and its own agent, and external
//! clients).

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::agent::{Agent, AgentConfig, XdpForward};
use crate::error::Result;
use crate::manifests::{
    Endpoint, EndpointPort, EndpointSlice, ManifestDir, Protocol, Service, ServicePort, TargetPort,
};
use crate::topology::{ExternalClient, NETWORK_IFACE, Node, Pod, Testbed, UplinkPeer};
use crate::traffic::{TcpServer, UdpServer};

/// Name of the node of a [`OneNode`] cluster.
pub const NODE: &str = "node";
/// Name of its client pod (always the first pod: `198.18.0.2`).
pub const CLIENT: &str = "client";

/// Name of backend pod `n` (1-based; it gets subnet `198.18.<n>.0/24`).
pub fn backend_name(n: usize) -> String {
    format!("backend-{n}")
}

/// One node with a client pod and backend pods `backend-1..=n`, each
/// backend running a TCP server on every port of `tcp_ports` and a UDP
/// server on every port of `udp_ports`.
///
/// Field order is teardown order: the agent stops first (it detaches from
/// the pod interfaces and unpins), then the servers, then the namespaces
/// and the scratch directory with the manifests.
#[derive(Debug)]
pub struct OneNode {
    agent: Option<Agent>,
    tcp_servers: Vec<TcpServer>,
    udp_servers: Vec<UdpServer>,
    manifests: ManifestDir,
    testbed: Testbed,
}

impl OneNode {
    /// Builds the namespaces and starts the servers; the agent is started
    /// separately ([`OneNode::start_agent`]) so manifests can be put in
    /// place before it first reads them.
    pub fn build(tag: &str, backends: usize, tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Self> {
        let mut testbed = Testbed::new(tag)?;
        let manifests = ManifestDir::create(testbed.scratch().join("manifests"))?;
        let node = testbed.add_node(NODE)?;
        node.add_pod(CLIENT)?;
        for n in 1..=backends {
            node.add_pod(&backend_name(n))?;
        }
        let mut tcp_servers = Vec::new();
        let mut udp_servers = Vec::new();
        for backend in &node.pods()[1..] {
            for &port in tcp_ports {
                tcp_servers.push(TcpServer::start(backend, port)?);
            }
            for &port in udp_ports {
                udp_servers.push(UdpServer::start(backend, port)?);
            }
        }
        Ok(Self {
            agent: None,
            tcp_servers,
            udp_servers,
            manifests,
            testbed,
        })
    }

    /// [`OneNode::build`], then [`OneNode::start_agent`].
    pub fn start(tag: &str, backends: usize, tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Self> {
        let mut cluster = Self::build(tag, backends, tcp_ports, udp_ports)?;
        cluster.start_agent()?;
        Ok(cluster)
    }

    /// Starts the agent on the node, attached to every pod's interface,
    /// watching the manifest directory, pinning under
    /// `/sys/fs/bpf/<testbed>-agent`.
    pub fn start_agent(&mut self) -> Result<&Agent> {
        assert!(self.agent.is_none(), "the agent is already running");
        let pin_dir = self.testbed.pin_dir("agent")?;
        let node = self.node();
        let agent = Agent::start(node, self.manifests.path(), &node.pod_ifaces(), pin_dir)?;
        Ok(self.agent.insert(agent))
    }

    /// The running agent; panics if it was not started (a bug in the test).
    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the agent was not started")
    }

    /// Stops the agent (see [`Agent::stop`]), notes what it left in its pin
    /// directory, and drops it (which removes the leftovers).
    pub fn stop_agent(&mut self) -> Result<StoppedAgent> {
        let agent = self.agent.take().expect("the agent was not started");
        let status = agent.stop()?;
        Ok(StoppedAgent {
            status,
            pin_dir_left: agent.pin_dir_exists(),
            pins_left: agent.pins_left(),
        })
    }

    pub fn testbed(&self) -> &Testbed {
        &self.testbed
    }

    pub fn node(&self) -> &Node {
        self.testbed.node(NODE)
    }

    pub fn manifests(&self) -> &ManifestDir {
        &self.manifests
    }

    pub fn client(&self) -> &Pod {
        self.node().pod(CLIENT)
    }

    /// Backend pod `n`, 1-based.
    pub fn backend(&self, n: usize) -> &Pod {
        self.node().pod(&backend_name(n))
    }

    pub fn backends(&self) -> &[Pod] {
        &self.node().pods()[1..]
    }

    pub fn tcp_servers(&self) -> &[TcpServer] {
        &self.tcp_servers
    }

    pub fn udp_servers(&self) -> &[UdpServer] {
        &self.udp_servers
    }
}

/// How the agent of a [`OneNode`] ended.
#[derive(Debug)]
pub struct StoppedAgent {
    pub status: std::process::ExitStatus,
    /// The pin directory still existed after the agent exited.
    pub pin_dir_left: bool,
    /// Pins the agent left behind.
    pub pins_left: Vec<String>,
}

/// A Service `name` with one TCP and one UDP port, and its EndpointSlice:
/// the shape most tests need.
#[derive(Clone, Debug)]
pub struct SimpleService {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// Service port and target port of the TCP port named `tcp`.
    pub tcp: (u16, u16),
    /// Service port and target port of the UDP port named `udp`.
    pub udp: (u16, u16),
}

impl SimpleService {
    pub fn new(name: &str, cluster_ip: Ipv4Addr, tcp: (u16, u16), udp: (u16, u16)) -> Self {
        Self {
            name: name.to_owned(),
            cluster_ip,
            tcp,
            udp,
        }
    }

    pub fn tcp_frontend(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.cluster_ip, self.tcp.0)
    }

    pub fn udp_frontend(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.cluster_ip, self.udp.0)
    }

    /// The file the Service goes into (`svc-<name>.yaml`).
    pub fn service_file(&self) -> String {
        format!("svc-{}.yaml", self.name)
    }

    /// The file the EndpointSlice goes into (`eps-<name>.yaml`).
    pub fn slice_file(&self) -> String {
        format!("eps-{}.yaml", self.name)
    }

    pub fn service(&self) -> Service {
        Service::new(
            &self.name,
            self.cluster_ip,
            vec![
                ServicePort::tcp("tcp", self.tcp.0, self.tcp.1),
                ServicePort::udp("udp", self.udp.0, self.udp.1),
            ],
        )
    }

    pub fn slice(&self, endpoints: &[Endpoint]) -> EndpointSlice {
        EndpointSlice::new(
            &self.name,
            "1",
            vec![
                EndpointPort::tcp("tcp", self.tcp.1),
                EndpointPort::udp("udp", self.udp.1),
            ],
            endpoints.to_vec(),
        )
    }

    pub fn write_service(&self, manifests: &ManifestDir) -> Result<()> {
        manifests.write(&self.service_file(), &[self.service().to_value()])
    }

    pub fn write_slice(&self, manifests: &ManifestDir, endpoints: &[Endpoint]) -> Result<()> {
        manifests.write(&self.slice_file(), &[self.slice(endpoints).to_value()])
    }

    /// The `(backend, ready)` pairs the agent should report for the TCP
    /// frontend given these endpoints.
    pub fn expected_tcp_backends(&self, endpoints: &[Endpoint]) -> Vec<(SocketAddrV4, bool)> {
        expected_backends(endpoints, self.tcp.1)
    }

    /// Same for the UDP frontend.
    pub fn expected_udp_backends(&self, endpoints: &[Endpoint]) -> Vec<(SocketAddrV4, bool)> {
        expected_backends(endpoints, self.udp.1)
    }

    /// Waits until both frontends have exactly the backends `endpoints`
    /// describe.
    pub fn wait_programmed(&self, agent: &Agent, endpoints: &[Endpoint]) -> Result<()> {
        agent.wait_for_backends(
            self.tcp_frontend(),
            Protocol::Tcp,
            &self.expected_tcp_backends(endpoints),
        )?;
        agent.wait_for_backends(
            self.udp_frontend(),
            Protocol::Udp,
            &self.expected_udp_backends(endpoints),
        )?;
        Ok(())
    }
}

fn expected_backends(endpoints: &[Endpoint], port: u16) -> Vec<(SocketAddrV4, bool)> {
    endpoints
        .iter()
        .map(|endpoint| (SocketAddrV4::new(endpoint.address, port), endpoint.ready))
        .collect()
}

/// Name of node `n` (1-based) of a [`MultiNode`] cluster: what its agent
/// gets as `--node-name` and its endpoints as `nodeName`.
pub fn node_name(n: usize) -> String {
    format!("node-{n}")
}

/// Name of pod `k` (1-based) on node `n` (1-based): `pod-<n>-<k>`.
pub fn node_pod_name(n: usize, k: usize) -> String {
    format!("pod-{n}-{k}")
}

/// Name of external client `k` (1-based): `ext-<k>`.
pub fn external_client_name(k: usize) -> String {
    format!("ext-{k}")
}

/// The shape of a [`MultiNode`] cluster.
#[derive(Clone, Debug)]
pub struct MultiNodeSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
    pub external_clients: usize,
    /// Every pod runs a TCP server on each of these ports...
    pub tcp_ports: Vec<u16>,
    /// ... and a UDP server on each of these.
    pub udp_ports: Vec<u16>,
    /// What the bridge-side peer of each node's uplink runs.
    pub uplink_peer: UplinkPeer,
    /// `--xdp-forward` of every agent; `None` leaves the agent's default
    /// (`auto`).
    pub xdp_forward: Option<XdpForward>,
}

impl Default for MultiNodeSpec {
    /// Two nodes with two pods each, two external clients, servers on
    /// TCP 8080 and UDP 5353; uplink peers with an XDP program of their
    /// own (so XDP_TX frames arrive at once) and agents told to use
    /// XDP_TX (`--xdp-forward tx`: on these veth uplinks `auto` would
    /// choose `tc`, and the XDP_TX path would go untested).
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 2,
            external_clients: 2,
            tcp_ports: vec![8080],
            udp_ports: vec![5353],
            uplink_peer: UplinkPeer::XdpPass,
            xdp_forward: Some(XdpForward::Tx),
        }
    }
}

/// Nodes `node-1..` on one network, each with pods `pod-<n>-1..` running
/// servers (which report the peer address they saw) and, once started, its
/// own agent (own pin directory, `--node-name node-<n> --external eth0`,
/// `--xdp-forward` as the spec says, attached to its pods); external clients `ext-1..` on the same network;
/// one manifest directory every agent reads.
///
/// Field order is teardown order: agents, servers, then the namespaces.
#[derive(Debug)]
pub struct MultiNode {
    agents: Vec<Agent>,
    tcp_servers: Vec<TcpServer>,
    udp_servers: Vec<UdpServer>,
    manifests: ManifestDir,
    testbed: Testbed,
    spec: MultiNodeSpec,
}

impl MultiNode {
    /// Builds the namespaces and starts the servers; agents are started
    /// separately ([`MultiNode::start_agents`]).
    pub fn build(tag: &str, spec: MultiNodeSpec) -> Result<Self> {
        let mut testbed = Testbed::new(tag)?;
        let manifests = ManifestDir::create(testbed.scratch().join("manifests"))?;
        let mut tcp_servers = Vec::new();
        let mut udp_servers = Vec::new();
        for n in 1..=spec.nodes {
            let node = testbed.add_networked_node_with(&node_name(n), spec.uplink_peer)?;
            for k in 1..=spec.pods_per_node {
                let pod = node.add_pod(&node_pod_name(n, k))?;
                for &port in &spec.tcp_ports {
                    tcp_servers.push(TcpServer::start(pod, port)?);
                }
                for &port in &spec.udp_ports {
                    udp_servers.push(UdpServer::start(pod, port)?);
                }
            }
        }
        for k in 1..=spec.external_clients {
            testbed.add_external_client(&external_client_name(k))?;
        }
        Ok(Self {
            agents: Vec::new(),
            tcp_servers,
            udp_servers,
            manifests,
            testbed,
            spec,
        })
    }

    /// [`MultiNode::build`], then [`MultiNode::start_agents`].
    pub fn start(tag: &str, spec: MultiNodeSpec) -> Result<Self> {
        let mut cluster = Self::build(tag, spec)?;
        cluster.start_agents()?;
        Ok(cluster)
    }

    /// Starts one agent per node (see [`MultiNode::start_agents_with`]).
    pub fn start_agents(&mut self) -> Result<()> {
        self.start_agents_with(|config| config)
    }

    /// Starts the agent of every node: `--manifests <dir> --node-name
    /// node-<n> --external eth0 --attach <each pod's interface>` (and
    /// `--xdp-forward` as the spec says), pinning
    /// under `/sys/fs/bpf/<testbed>-agent-<n>`, with whatever `customize`
    /// adds; each is ready (see [`Agent::start_config`]) before the next
    /// starts.
    pub fn start_agents_with(
        &mut self,
        customize: impl Fn(AgentConfig) -> AgentConfig,
    ) -> Result<()> {
        assert!(self.agents.is_empty(), "the agents are already running");
        for n in 1..=self.spec.nodes {
            let node = self.node(n);
            let config = AgentConfig::manifests(self.manifests.path())
                .node_name(&node_name(n))
                .external(NETWORK_IFACE)
                .attach(&node.pod_ifaces());
            let config = match self.spec.xdp_forward {
                Some(mode) => config.xdp_forward(mode),
                None => config,
            };
            let config = customize(config);
            let pin_dir = self.testbed.pin_dir(&format!("agent-{n}"))?;
            let agent = Agent::start_config(node, &config, pin_dir)?;
            self.agents.push(agent);
        }
        Ok(())
    }

    /// The agent of node `n` (1-based); panics if not started.
    pub fn agent(&self, n: usize) -> &Agent {
        self.agents
            .get(n - 1)
            .unwrap_or_else(|| panic!("no agent on node {n}"))
    }

    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    pub fn testbed(&self) -> &Testbed {
        &self.testbed
    }

    pub fn manifests(&self) -> &ManifestDir {
        &self.manifests
    }

    /// Node `n`, 1-based.
    pub fn node(&self, n: usize) -> &Node {
        self.testbed.node(&node_name(n))
    }

    /// Pod `k` of node `n`, both 1-based.
    pub fn pod(&self, n: usize, k: usize) -> &Pod {
        self.node(n).pod(&node_pod_name(n, k))
    }

    /// External client `k`, 1-based.
    pub fn external_client(&self, k: usize) -> &ExternalClient {
        self.testbed.external_client(&external_client_name(k))
    }

    /// Routes `ip` from every external client via node `n`.
    pub fn route_external(&self, ip: Ipv4Addr, n: usize) -> Result<()> {
        for client in self.testbed.external_clients() {
            client.route_via(ip, self.node(n))?;
        }
        Ok(())
    }

    /// An EndpointSlice of `service` listing `pods` ((node, pod), 1-based)
    /// as ready endpoints with their `nodeName`, one port per Service port
    /// (named like it, carrying its numeric target port).
    pub fn slice(&self, service: &Service, pods: &[(usize, usize)]) -> EndpointSlice {
        let ports = service
            .ports
            .iter()
            .map(|port| {
                let TargetPort::Number(target) = port.target_port else {
                    panic!("MultiNode::slice needs numeric target ports: {port:?}");
                };
                match port.protocol {
                    Protocol::Tcp => EndpointPort::tcp(&port.name, target),
                    Protocol::Udp => EndpointPort::udp(&port.name, target),
                }
            })
            .collect();
        let endpoints = pods
            .iter()
            .map(|&(n, k)| Endpoint::ready(self.pod(n, k).addr()))
            .collect();
        pods.iter().fold(
            EndpointSlice::new(&service.name, "1", ports, endpoints),
            |slice, &(n, k)| slice.with_node_name(self.pod(n, k).addr(), &node_name(n)),
        )
    }

    /// Writes `service` and its slice listing `pods` to `<name>.yaml`
    /// (replacing what was there).
    pub fn write(&self, service: &Service, pods: &[(usize, usize)]) -> Result<()> {
        self.manifests.write(
            &format!("{}.yaml", service.name),
            &[service.to_value(), self.slice(service, pods).to_value()],
        )
    }

    /// Removes what [`MultiNode::write`] wrote for `service`.
    pub fn remove(&self, service: &Service) -> Result<()> {
        self.manifests.remove(&format!("{}.yaml", service.name))
    }

    /// The address and port pod `(n, k)` serves `target` on.
    pub fn backend(&self, n: usize, k: usize, target: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.pod(n, k).addr(), target)
    }

    pub fn tcp_servers(&self) -> &[TcpServer] {
        &self.tcp_servers
    }

    pub fn udp_servers(&self) -> &[UdpServer] {
        &self.udp_servers
    }
}
