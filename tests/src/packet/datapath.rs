//! The datapath object loaded for `BPF_PROG_TEST_RUN`: no pinning, no
//! attachment, small maps; map contents written with `lb_common` types the
//! way the agent writes them.

use std::{collections::BTreeMap, net::SocketAddrV4};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{LinkOrder, SchedClassifier, TcAttach, TcAttachType, TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    backend::{
        BACKEND_F_ACTIVE, BACKEND_F_NOT_READY, Backend, BackendAddr, MAX_REVNAT_SERVICES, RevNat,
    },
    config::DatapathConfig,
    conntrack::{Flow, FlowKey},
    counters::{COUNTER_COUNT, Counter},
    names,
    ports::{PORT_F_BACKEND, PORT_F_EXTERNAL_FRONTEND, PORT_F_FRONTEND},
    service::{SERVICE_F_EXTERNAL, ServiceKey, ServiceValue, Slot, SlotKey},
};

use super::{PacketError, Result};

mod nat;
mod selection;
pub use nat::SourceRangeSpec;
pub use selection::monotonic_secs;

/// TC verdicts as `BPF_PROG_TEST_RUN` reports them.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// XDP verdicts (`enum xdp_action`).
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The programs of the datapath object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Program {
    /// `lb_tc_pod`: tcx ingress of pod veths (role Pod).
    TcPod,
    /// `lb_xdp_ext`: XDP on external interfaces (role External).
    XdpExternal,
    /// `lb_tc_ext`: tcx ingress of external interfaces (role External).
    TcExternal,
}

impl Program {
    pub const ALL: [Program; 3] = [Program::TcPod, Program::XdpExternal, Program::TcExternal];

    pub const fn name(self) -> &'static str {
        match self {
            Program::TcPod => names::PROG_TC_POD,
            Program::XdpExternal => names::PROG_XDP_EXTERNAL,
            Program::TcExternal => names::PROG_TC_EXTERNAL,
        }
    }

    pub const fn is_xdp(self) -> bool {
        matches!(self, Program::XdpExternal)
    }
}

/// Size of `struct __sk_buff` up to and including `ifindex`: the test-run
/// context of a TC program only needs `ingress_ifindex` (offset 36) and
/// `ifindex` (offset 40); the kernel zero-fills the rest.
const SKB_CTX_LEN: usize = 44;
const SKB_INGRESS_IFINDEX_OFF: usize = 36;
const SKB_IFINDEX_OFF: usize = 40;

/// The `__sk_buff` prefix for a TC test run on interface `ifindex`: the
/// kernel sets `skb->dev` to it (so `bpf_fib_lookup` uses its namespace)
/// and `skb->skb_iif` from `ingress_ifindex`.
pub fn tc_test_context(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; SKB_CTX_LEN];
    ctx[SKB_INGRESS_IFINDEX_OFF..SKB_INGRESS_IFINDEX_OFF + 4]
        .copy_from_slice(&ifindex.to_ne_bytes());
    ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// `struct xdp_md` for an XDP test run of a `frame_len`-byte frame that
/// arrived on `ifindex` (receive queue 0). The kernel requires `data` and
/// `data_meta` 0 and `data_end` the frame length; `ingress_ifindex` is
/// resolved in the calling thread's network namespace and becomes the
/// buffer's receive queue, whose device `bpf_fib_lookup` takes its
/// namespace from.
pub fn xdp_test_context(ifindex: u32, frame_len: usize) -> Vec<u8> {
    let fields: [u32; 6] = [0, frame_len as u32, 0, ifindex, 0, 0];
    fields
        .iter()
        .flat_map(|field| field.to_ne_bytes())
        .collect()
}

/// Map sizes for packet tests: small, the kernel allocates them up front.
const TEST_MAX_SERVICES: u32 = 64;
const TEST_MAX_SLOTS: u32 = 256;
const TEST_MAX_BACKENDS: u32 = 64;
const TEST_MAX_FLOWS: u32 = 1024;

/// Map sizes of a [`Datapath`]; `backends` sizes both `LB_BACKENDS` and
/// `LB_REVNAT`.
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub services: u32,
    pub slots: u32,
    pub backends: u32,
    pub flows: u32,
}

impl Capacities {
    /// The small sizes packet tests use.
    pub const TEST: Self = Self {
        services: TEST_MAX_SERVICES,
        slots: TEST_MAX_SLOTS,
        backends: TEST_MAX_BACKENDS,
        flows: TEST_MAX_FLOWS,
    };
}

/// Network-order `u32` of an address, as the maps hold it.
pub fn be_addr(addr: &SocketAddrV4) -> u32 {
    u32::from_ne_bytes(addr.ip().octets())
}

/// Network-order `u16` of a port, as the maps hold it.
pub fn be_port(addr: &SocketAddrV4) -> u16 {
    addr.port().to_be()
}

/// One backend of a [`ServiceSpec`].
#[derive(Clone, Debug)]
pub struct BackendSpec {
    /// Index in `LB_BACKENDS` (never 0).
    pub id: u32,
    pub addr: SocketAddrV4,
    /// Ready backends get a slot; not-ready ones are only listed.
    pub ready: bool,
}

/// A service port as the agent would write it: one frontend, its backends.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub id: u32,
    pub frontend: SocketAddrV4,
    pub proto: u8,
    pub backends: Vec<BackendSpec>,
}

/// Counter values summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; COUNTER_COUNT as usize]);

impl Counters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// Per-counter increase since `before`, listing only non-zero ones.
    pub fn since(&self, before: &Counters) -> BTreeMap<&'static str, u64> {
        Counter::ALL
            .iter()
            .filter_map(|&counter| {
                let delta = self.get(counter) - before.get(counter);
                (delta != 0).then_some((counter.name(), delta))
            })
            .collect()
    }
}

/// What one test run produced.
#[derive(Clone, Debug)]
pub struct RunOutput {
    pub verdict: u32,
    pub frame: Vec<u8>,
}

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
}

fn map_error(
    name: &'static str,
    operation: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> PacketError {
    move |source| PacketError::Map {
        name,
        operation,
        source,
    }
}

impl Datapath {
    /// Loads `lb_agent::EBPF_OBJECT` with small maps and `lb_tc_pod` into
    /// the kernel, and writes the default configuration.
    pub fn load() -> Result<Self> {
        Self::load_with_max_flows(TEST_MAX_FLOWS)
    }

    /// [`Datapath::load`] with room for `max_flows` flows.
    pub fn load_with_max_flows(max_flows: u32) -> Result<Self> {
        Self::load_with_capacities(&Capacities {
            flows: max_flows,
            ..Capacities::TEST
        })
    }

    /// [`Datapath::load`] with the given map sizes (the benchmarks fill
    /// the maps with up to 100,000 services and a million flows).
    pub fn load_with_capacities(capacities: &Capacities) -> Result<Self> {
        Self::load_programs(capacities, &[Program::TcPod])
    }

    /// Loads the object with small maps and every program: `lb_tc_pod`,
    /// `lb_xdp_ext` and `lb_tc_ext`, sharing the maps.
    pub fn load_all() -> Result<Self> {
        Self::load_programs(&Capacities::TEST, &Program::ALL)
    }

    /// Loads the object with `capacities` and the given programs into the
    /// kernel, and writes the default configuration.
    pub fn load_programs(capacities: &Capacities, programs: &[Program]) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::MAP_SERVICES, capacities.services)
            .map_max_entries(names::MAP_SLOTS, capacities.slots)
            .map_max_entries(names::MAP_BACKENDS, capacities.backends)
            .map_max_entries(names::MAP_REVNAT, capacities.backends)
            .map_max_entries(names::MAP_CONNTRACK, capacities.flows)
            .load(lb_agent::EBPF_OBJECT)
            .map_err(PacketError::LoadObject)?;
        for &program in programs {
            let name = program.name();
            let loaded = ebpf
                .program_mut(name)
                .ok_or(PacketError::MissingProgram { name })?;
            let result = if program.is_xdp() {
                let xdp: &mut Xdp = loaded
                    .try_into()
                    .map_err(|source| PacketError::ProgramType { name, source })?;
                xdp.load()
            } else {
                let classifier: &mut SchedClassifier = loaded
                    .try_into()
                    .map_err(|source| PacketError::ProgramType { name, source })?;
                classifier.load()
            };
            result.map_err(|source| PacketError::LoadProgram { name, source })?;
        }
        let mut datapath = Self { ebpf };
        datapath.set_config(&DatapathConfig::DEFAULT)?;
        Ok(datapath)
    }

    /// The loaded `lb_tc_pod`.
    pub fn program(&self) -> Result<&SchedClassifier> {
        self.classifier(Program::TcPod)
    }

    /// A loaded TC program (`lb_tc_pod` or `lb_tc_ext`).
    pub fn classifier(&self, program: Program) -> Result<&SchedClassifier> {
        let name = program.name();
        self.ebpf
            .program(name)
            .ok_or(PacketError::MissingProgram { name })?
            .try_into()
            .map_err(|source| PacketError::ProgramType { name, source })
    }

    /// A new descriptor of the loaded `program`, e.g. for a program array.
    pub fn program_fd(&self, program: Program) -> Result<aya::programs::ProgramFd> {
        program_fd(&self.ebpf, program.name())
    }

    /// The loaded `lb_xdp_ext`.
    pub fn xdp(&self) -> Result<&Xdp> {
        let name = Program::XdpExternal.name();
        self.ebpf
            .program(name)
            .ok_or(PacketError::MissingProgram { name })?
            .try_into()
            .map_err(|source| PacketError::ProgramType { name, source })
    }

    /// Attaches `lb_tc_pod` at tcx ingress of `iface` in namespace `ns`
    /// (the interface name is resolved there). The link lives as long as
    /// this `Datapath` (or the interface).
    pub fn attach_ingress(&mut self, ns: &crate::netns::NetNs, iface: &str) -> Result<()> {
        let name = std::ffi::CString::new(iface).expect("interface names have no NUL");
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(names::PROG_TC_POD)
            .ok_or(PacketError::MissingProgram {
                name: names::PROG_TC_POD,
            })?
            .try_into()
            .map_err(|source| PacketError::ProgramType {
                name: names::PROG_TC_POD,
                source,
            })?;
        ns.run(|| {
            program.attach(
                name.as_c_str(),
                TcAttach::Tcx {
                    attach_type: TcAttachType::Ingress,
                    order: LinkOrder::first(),
                },
            )
        })
        .map_err(PacketError::Namespace)?
        .map_err(|source| PacketError::Attach {
            name: names::PROG_TC_POD,
            iface: iface.to_owned(),
            source,
        })?;
        Ok(())
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(PacketError::MissingMap { name })
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map> {
        self.ebpf.map(name).ok_or(PacketError::MissingMap { name })
    }

    fn hash_map_mut<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        HashMap::try_from(self.map_mut(name)?).map_err(map_error(name, "open"))
    }

    /// The value under `key` in hash map `name`, `None` if there is none.
    fn hash_get<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        key: &K,
    ) -> Result<Option<V>> {
        match self.hash_map_mut::<K, V>(name)?.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_error(name, "get")(source)),
        }
    }

    pub fn set_config(&mut self, config: &DatapathConfig) -> Result<()> {
        let name = names::MAP_CONFIG;
        let mut map: Array<_, DatapathConfig> =
            Array::try_from(self.map_mut(name)?).map_err(map_error(name, "open"))?;
        map.set(0, config, 0).map_err(map_error(name, "set"))
    }

    pub fn set_service(
        &mut self,
        frontend: &SocketAddrV4,
        proto: u8,
        value: &ServiceValue,
    ) -> Result<()> {
        // As the agent does: the port filter admits the port first.
        let bits = if value.flags & SERVICE_F_EXTERNAL != 0 {
            PORT_F_FRONTEND | PORT_F_EXTERNAL_FRONTEND
        } else {
            PORT_F_FRONTEND
        };
        self.add_port_bits(frontend.port(), bits)?;
        let name = names::MAP_SERVICES;
        let key = ServiceKey::new(be_addr(frontend), be_port(frontend), proto);
        self.hash_map_mut::<ServiceKey, ServiceValue>(name)?
            .insert(&key, value, 0)
            .map_err(map_error(name, "insert"))
    }

    /// The `LB_PORTS` bits of `port` (host byte order).
    pub fn port_bits(&self, port: u16) -> Result<u8> {
        let name = names::MAP_PORTS;
        let map: Array<_, u8> =
            Array::try_from(self.map(name)?).map_err(map_error(name, "open"))?;
        map.get(&u32::from(port), 0).map_err(map_error(name, "get"))
    }

    /// Sets `bits` in the `LB_PORTS` entry of `port` (host byte order).
    /// Bits are never cleared here: a bit too many only costs a lookup.
    pub fn add_port_bits(&mut self, port: u16, bits: u8) -> Result<()> {
        let current = self.port_bits(port)?;
        if current & bits == bits {
            return Ok(());
        }
        let name = names::MAP_PORTS;
        let mut map: Array<_, u8> =
            Array::try_from(self.map_mut(name)?).map_err(map_error(name, "open"))?;
        map.set(u32::from(port), &(current | bits), 0)
            .map_err(map_error(name, "set"))
    }

    pub fn set_slot(&mut self, service_id: u32, slot: u32, backend_id: u32) -> Result<()> {
        let name = names::MAP_SLOTS;
        self.hash_map_mut::<SlotKey, Slot>(name)?
            .insert(&SlotKey { service_id, slot }, &Slot { backend_id }, 0)
            .map_err(map_error(name, "insert"))
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        let name = names::MAP_BACKENDS;
        let mut map: Array<_, Backend> =
            Array::try_from(self.map_mut(name)?).map_err(map_error(name, "open"))?;
        map.set(id, backend, 0).map_err(map_error(name, "set"))
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        let name = names::MAP_BACKENDS;
        let map: Array<_, Backend> =
            Array::try_from(self.map(name)?).map_err(map_error(name, "open"))?;
        map.get(&id, 0).map_err(map_error(name, "get"))
    }

    pub fn revnat(&mut self, backend: &BackendAddr) -> Result<Option<RevNat>> {
        self.hash_get(names::MAP_REVNAT, backend)
    }

    pub fn set_revnat(&mut self, backend: &BackendAddr, value: &RevNat) -> Result<()> {
        self.add_port_bits(u16::from_be(backend.port), PORT_F_BACKEND)?;
        let name = names::MAP_REVNAT;
        self.hash_map_mut::<BackendAddr, RevNat>(name)?
            .insert(backend, value, 0)
            .map_err(map_error(name, "insert"))
    }

    pub fn remove_revnat(&mut self, backend: &BackendAddr) -> Result<()> {
        let name = names::MAP_REVNAT;
        self.hash_map_mut::<BackendAddr, RevNat>(name)?
            .remove(backend)
            .map_err(map_error(name, "remove"))
    }

    /// Writes a whole service the way the agent orders its writes:
    /// backends, then slots, reverse NAT, and the frontend last.
    pub fn add_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        self.add_service_with(spec, 0, 0)
    }

    /// [`Datapath::add_service`] with `SERVICE_F_*` bits on the frontend
    /// and `BACKEND_F_*` bits (beyond ACTIVE / NOT_READY) on every backend,
    /// e.g. `BACKEND_F_LOCAL` for endpoints on this node.
    pub fn add_service_with(
        &mut self,
        spec: &ServiceSpec,
        service_flags: u16,
        backend_flags: u8,
    ) -> Result<()> {
        for backend in &spec.backends {
            let flags = BACKEND_F_ACTIVE
                | backend_flags
                | if backend.ready {
                    0
                } else {
                    BACKEND_F_NOT_READY
                };
            self.set_backend(
                backend.id,
                &Backend {
                    addr: be_addr(&backend.addr),
                    port: be_port(&backend.addr),
                    proto: spec.proto,
                    flags,
                },
            )?;
        }
        let ready: Vec<&BackendSpec> = spec.backends.iter().filter(|b| b.ready).collect();
        for (slot, backend) in ready.iter().enumerate() {
            self.set_member(spec.id, backend.id)?;
            self.set_slot(spec.id, slot as u32, backend.id)?;
        }
        for backend in &spec.backends {
            let key = BackendAddr::new(be_addr(&backend.addr), be_port(&backend.addr), spec.proto);
            let mut value = self.revnat(&key)?.unwrap_or_default();
            let listed = &value.service_ids[..value.count as usize];
            if !listed.contains(&spec.id) {
                assert!(
                    (value.count as usize) < MAX_REVNAT_SERVICES,
                    "too many services for one backend"
                );
                value.service_ids[value.count as usize] = spec.id;
                value.count += 1;
            }
            self.set_revnat(&key, &value)?;
        }
        self.set_service(
            &spec.frontend,
            spec.proto,
            &ServiceValue {
                id: spec.id,
                backend_count: ready.len() as u32,
                flags: service_flags,
                ..Default::default()
            },
        )
    }

    /// Removes a backend from every service the way the agent does when it
    /// leaves every EndpointSlice: it is in no slot (the caller rewrote
    /// those), its reverse-NAT entry goes and its id is freed (zeroed).
    pub fn remove_backend(&mut self, id: u32, addr: &SocketAddrV4, proto: u8) -> Result<()> {
        self.remove_revnat(&BackendAddr::new(be_addr(addr), be_port(addr), proto))?;
        self.set_backend(id, &Backend::default())
    }

    pub fn flow(&mut self, key: &FlowKey) -> Result<Option<Flow>> {
        self.hash_get(names::MAP_CONNTRACK, key)
    }

    pub fn set_flow(&mut self, key: &FlowKey, flow: &Flow) -> Result<()> {
        let name = names::MAP_CONNTRACK;
        self.hash_map_mut::<FlowKey, Flow>(name)?
            .insert(key, flow, 0)
            .map_err(map_error(name, "insert"))
    }

    /// Removes a flow; `Ok(false)` when there was none.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<bool> {
        let name = names::MAP_CONNTRACK;
        match self.hash_map_mut::<FlowKey, Flow>(name)?.remove(key) {
            Ok(()) => Ok(true),
            // bpf_map_delete_elem reports a missing key as ENOENT.
            Err(aya::maps::MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(source) => Err(map_error(name, "remove")(source)),
        }
    }

    /// Number of tracked flows.
    pub fn flow_count(&mut self) -> Result<usize> {
        let name = names::MAP_CONNTRACK;
        let map = self.hash_map_mut::<FlowKey, Flow>(name)?;
        let mut count = 0;
        for key in map.keys() {
            key.map_err(map_error(name, "iterate"))?;
            count += 1;
        }
        Ok(count)
    }

    /// Takes the log records `lb_tc_pod` wrote (aya-log's `AYA_LOGS` ring
    /// buffer) and returns how many there were.
    pub fn drain_log_records(&mut self) -> Result<usize> {
        const NAME: &str = "AYA_LOGS";
        let mut ring = RingBuf::try_from(self.map_mut(NAME)?).map_err(map_error(NAME, "open"))?;
        let mut records = 0;
        while ring.next().is_some() {
            records += 1;
        }
        Ok(records)
    }

    pub fn counters(&self) -> Result<Counters> {
        let name = names::MAP_COUNTERS;
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_error(name, "open"))?;
        let mut counters = Counters::default();
        for counter in Counter::ALL {
            let values = map
                .get(&(counter as u32), 0)
                .map_err(map_error(name, "get"))?;
            counters.0[counter as usize] = values.iter().sum();
        }
        Ok(counters)
    }

    /// Runs `program` once on `frame` as if it arrived on interface
    /// `ifindex` (`None`: no context; the kernel then uses the loopback
    /// device of the calling thread's namespace). `bpf_fib_lookup` consults
    /// the routes of the namespace the calling thread is in: call this
    /// from a thread inside the test's namespace (see
    /// [`super::fib::FibNet::run`]).
    pub fn run_on(
        &self,
        program: Program,
        frame: &[u8],
        ifindex: Option<u32>,
    ) -> Result<RunOutput> {
        let name = program.name();
        let mut out = vec![0u8; 4096];
        let ctx = ifindex.map(|ifindex| {
            if program.is_xdp() {
                xdp_test_context(ifindex, frame.len())
            } else {
                tc_test_context(ifindex)
            }
        });
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx.as_deref(),
            repeat: 1,
            ..TestRunOptions::default()
        };
        let result = if program.is_xdp() {
            self.xdp()?.test_run(options)
        } else {
            self.classifier(program)?.test_run(options)
        }
        .map_err(|source| PacketError::TestRun { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok(RunOutput {
            verdict: result.return_value,
            frame: out,
        })
    }

    /// Runs `lb_tc_pod` once on `frame`.
    pub fn run(&self, frame: &[u8]) -> Result<RunOutput> {
        let mut out = vec![0u8; 4096];
        let result = self
            .program()?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .map_err(|source| PacketError::TestRun {
                name: names::PROG_TC_POD,
                source,
            })?;
        out.truncate(result.data_size_out as usize);
        Ok(RunOutput {
            verdict: result.return_value,
            frame: out,
        })
    }
}

/// A new descriptor of the loaded program `name` of `ebpf`, whatever its type.
pub(crate) fn program_fd(ebpf: &aya::Ebpf, name: &'static str) -> Result<aya::programs::ProgramFd> {
    ebpf.program(name)
        .ok_or(PacketError::MissingProgram { name })?
        .fd()
        .map_err(|source| PacketError::LoadProgram { name, source })?
        .try_clone()
        .map_err(|error| PacketError::Bench {
            case: "setup".to_owned(),
            detail: format!("duplicating the descriptor of {name}: {error}"),
        })
}
