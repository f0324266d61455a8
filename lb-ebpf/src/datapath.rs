//! The per-packet decision, shared by every program and parameterised by
//! the program's [`Role`]: parse; then the forward path (the destination is
//! a frontend the role translates), the reply path of source-translated
//! flows (the destination is a translated port), the reply path (the
//! source is a backend of a tracked flow), else pass.
//!
//! Outcomes that are not errors are counted here; errors are returned to
//! the entry point, which counts them (`Error::counter`) and applies their
//! action.

use lb_common::{
    backend::{BACKEND_F_LOCAL, BackendAddr, RevNat},
    conntrack::{FLOW_F_EXTERNAL, FLOW_F_HAIRPIN, FLOW_F_SNAT, Flow, FlowKey},
    counters::Counter,
    ports::PORT_F_BACKEND,
    service::{SERVICE_F_EXTERNAL, SERVICE_F_SOURCE_RANGES, ServiceValue},
    stats::DropReason,
};

use crate::{
    affinity, backend,
    config::{self, Config, NatConfig},
    conntrack::{self, Now},
    context::{Action, PacketContext},
    counters::count,
    error::Error,
    fib,
    log::event,
    maps::LB_REVNAT,
    nat::{self, Tuple},
    parse::{self, Packet, Parsed},
    ports, reject, service, snat, source_range, stats,
};

/// Where a program runs, which decides what it translates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RoleKind {
    /// At the host side of pods' veths (`lb_tc_pod`): every frontend, as a
    /// pod may reach NodePorts, load-balancer IPs and external IPs too.
    Pod,
    /// On the node's external interfaces (`lb_xdp_ext`, `lb_tc_ext`): only
    /// frontends with `SERVICE_F_EXTERNAL`; ClusterIP traffic arriving from
    /// outside passes untouched. New flows to a backend on another node
    /// are source-translated to the node's address.
    External,
}

/// A program's role as a type, so that every program gets its own copy of
/// the code: with two programs of one context type sharing a function, the
/// compiler keeps it (the log closures, in practice) out of line as a BPF
/// subprogram, whose stack frame adds to the caller's beyond the limit.
pub trait Role {
    const KIND: RoleKind;

    #[inline(always)]
    fn translates(service: &ServiceValue) -> bool {
        match Self::KIND {
            RoleKind::Pod => true,
            RoleKind::External => service.flags & SERVICE_F_EXTERNAL != 0,
        }
    }
}

/// [`RoleKind::Pod`].
pub struct Pod;

impl Role for Pod {
    const KIND: RoleKind = RoleKind::Pod;
}

/// [`RoleKind::External`].
pub struct External;

impl Role for External {
    const KIND: RoleKind = RoleKind::External;
}

/// Handles one packet.
#[inline(always)]
pub fn process<C: PacketContext, R: Role>(ctx: &C) -> Result<Action, Error> {
    let pkt = match parse::parse(ctx)? {
        Parsed::L4(pkt) => pkt,
        Parsed::Fragment => {
            count(Counter::Fragment);
            return Ok(Action::Pass);
        }
        Parsed::NotIpv4 | Parsed::OtherProtocol => {
            count(Counter::Pass);
            return Ok(Action::Pass);
        }
    };
    // The port filter first: most packets of a node are no service's, and
    // a port no frontend (of this role's kind) has needs no hash lookup.
    if ports::bits(pkt.dst_port) & ports::frontend_bit(R::KIND) != 0
        && let Some(service) = service::lookup(&pkt)
        && R::translates(&service)
    {
        let service = match R::KIND {
            RoleKind::Pod => service::internal_view(&pkt, service),
            RoleKind::External => service,
        };
        let result = forward::<C, R>(ctx, &pkt, &service);
        if let Err(error) = result {
            dropped::<C, R>(ctx, &pkt, service.id, error);
        }
        return result;
    }
    // Replies. Every reply comes from a backend, which is in LB_REVNAT
    // (source-translated flows' replies too): a packet that is no
    // service's costs that one lookup, as before source translation
    // existed, and none at all from a port no backend has. The
    // translated-port check then only compares against the configuration.
    if ports::bits(pkt.src_port) & PORT_F_BACKEND == 0 {
        count(Counter::Pass);
        return Ok(Action::Pass);
    }
    let backend = BackendAddr::new(pkt.src_addr, pkt.src_port, pkt.proto);
    let Some(candidates) = LB_REVNAT.get_ptr(&backend) else {
        count(Counter::Pass);
        return Ok(Action::Pass);
    };
    // SAFETY: copied out at once; REVNAT is only written by the agent.
    let candidates: RevNat = unsafe { *candidates };
    let found = match config::nat_destination(pkt.dst_addr, pkt.dst_port) {
        // A hairpin flow's backend answers the hairpin address, any other
        // translated flow's the node's.
        Some(hairpin) => snat::reply_flow(&pkt)
            .filter(|(_, _, flow)| (flow.flags & FLOW_F_HAIRPIN != 0) == hairpin),
        None => None,
    };
    let Some((key, entry, flow)) = found.or_else(|| revnat_flow(&pkt, &candidates)) else {
        count(Counter::Pass);
        return Ok(Action::Pass);
    };
    let result = reply::<C, R>(ctx, &pkt, &key, entry, &flow);
    if let Err(error) = result {
        dropped::<C, R>(ctx, &pkt, key.service_id, error);
    }
    result
}

/// Records a service's packet that failed with `error`.
#[inline(always)]
fn dropped<C: PacketContext, R: Role>(ctx: &C, pkt: &Packet, service_id: u32, error: Error) {
    let Some(reason) = error.drop_reason() else {
        return;
    };
    stats::drop(service_id, reason);
    let config = Config::load();
    event!(
        ctx,
        config,
        "drop: service {} packet {:i}:{} -> {:i}:{} reason {}",
        service_id,
        u32::from_be(pkt.src_addr),
        u16::from_be(pkt.src_port),
        u32::from_be(pkt.dst_addr),
        u16::from_be(pkt.dst_port),
        reason as u32
    );
}

/// A client packet to a frontend: continue its flow, or start one.
#[inline(always)]
fn forward<C: PacketContext, R: Role>(
    ctx: &C,
    pkt: &Packet,
    service: &ServiceValue,
) -> Result<Action, Error> {
    let config = Config::load();
    let now = Now::read();
    let key = conntrack::forward_key(pkt, service.id);

    if let Some(entry) = conntrack::lookup(&key) {
        // SAFETY: the entry pointer is valid for this run; copy it before
        // any map update.
        let flow: Flow = unsafe { *entry };
        if !conntrack::is_expired(&flow, pkt.is_tcp(), now, &config) {
            if backend::still_serves(&flow) {
                return established::<C, R>(ctx, pkt, service, &key, entry, &flow, now);
            }
            if pkt.is_tcp() && !fib::may_bounce::<C>() {
                // The reset would leave by XDP_TX, which is off: TC finds
                // the same flow and resets it.
                count(Counter::XdpToTc);
                return Ok(Action::Pass);
            }
            // The backend left every EndpointSlice of the service. A TCP
            // connection to it is dead: tell the client at once instead of
            // letting it time out. UDP has no connection: pick a new backend.
            count(Counter::BackendGone);
            conntrack::remove(&key, &flow);
            event!(
                ctx,
                config,
                "backend gone: service {} backend {} client {:i}:{}",
                service.id,
                flow.backend_id,
                u32::from_be(pkt.src_addr),
                u16::from_be(pkt.src_port)
            );
            if pkt.is_tcp() {
                stats::drop(service.id, DropReason::BackendGone);
                return reject::reset(ctx, pkt);
            }
        }
    }
    new_flow::<C, R>(ctx, pkt, service, &key, now, &config)
}

/// A client packet of a tracked flow whose backend still serves it.
#[inline(always)]
fn established<C: PacketContext, R: Role>(
    ctx: &C,
    pkt: &Packet,
    service: &ServiceValue,
    key: &FlowKey,
    entry: *mut Flow,
    flow: &Flow,
    now: Now,
) -> Result<Action, Error> {
    if flow.flags & FLOW_F_SNAT == 0 {
        conntrack::touch_forward(entry, flow, pkt, now);
        nat::dnat(ctx, pkt, flow.backend_addr, flow.backend_port)?;
        count(Counter::Established);
        stats::forward(service.id, flow.backend_id, ctx.packet_len(), false);
        if conntrack::closes(flow, pkt) {
            conntrack::remove(key, flow);
        }
        return Ok(Action::Pass);
    }
    let nat_addr = NatConfig::load().nat_addr(flow.flags & FLOW_F_HAIRPIN != 0);
    if nat_addr == 0 {
        return Err(Error::NoNatAddr);
    }
    let new = Tuple {
        src_addr: nat_addr,
        src_port: flow.nat_port,
        dst_addr: flow.backend_addr,
        dst_port: flow.backend_port,
    };
    let Some(route) = fib::plan(ctx, pkt, &new)? else {
        count(Counter::XdpToTc);
        return Ok(Action::Pass);
    };
    conntrack::touch_forward(entry, flow, pkt, now);
    nat::translate(ctx, pkt, &new)?;
    let action = fib::send(ctx, pkt, &new, route)?;
    count(Counter::Established);
    count(Counter::Forwarded);
    stats::forward(service.id, flow.backend_id, ctx.packet_len(), false);
    if conntrack::closes(flow, pkt) {
        conntrack::remove(key, flow);
    }
    Ok(action)
}

/// The first packet of a flow (or the first after its entry expired or was
/// evicted: a TCP packet without SYN is balanced too, as Cilium does).
#[inline(always)]
fn new_flow<C: PacketContext, R: Role>(
    ctx: &C,
    pkt: &Packet,
    service: &ServiceValue,
    key: &FlowKey,
    now: Now,
    config: &Config,
) -> Result<Action, Error> {
    // kube-proxy filters by source range before anything else, the reject
    // of a service without endpoints included.
    if service.flags & SERVICE_F_SOURCE_RANGES != 0
        && !source_range::allows(service.id, pkt.src_addr)
    {
        return Err(Error::SourceRangeDenied);
    }
    if service::rejects_new_connections(service) {
        if !service::drops_new_connections(service) && !fib::may_bounce::<C>() {
            // The answer would leave by XDP_TX, which is off: TC answers.
            count(Counter::XdpToTc);
            return Ok(Action::Pass);
        }
        count(Counter::NoBackend);
        stats::drop(service.id, DropReason::NoBackend);
        event!(
            ctx,
            config,
            "reject: service {} has no ready backend, client {:i}:{}",
            service.id,
            u32::from_be(pkt.src_addr),
            u16::from_be(pkt.src_port)
        );
        if service::drops_new_connections(service) {
            return Ok(Action::Drop);
        }
        return reject::refuse(ctx, pkt);
    }
    let (backend_id, backend) = if service.affinity_timeout != 0 {
        affinity::select(service, pkt, now, config)?
    } else {
        backend::select(service, pkt, config)?
    };

    let external = service.flags & SERVICE_F_EXTERNAL != 0;
    let mut flags = if external { FLOW_F_EXTERNAL } else { 0 };
    // Hairpin: the client is its own backend, and would drop a packet from
    // its own address; the source becomes the hairpin address. Node SNAT:
    // an external client's flow to another node's backend, whose reply
    // must come back through this node.
    if backend.addr == pkt.src_addr {
        flags |= FLOW_F_SNAT | FLOW_F_HAIRPIN;
    } else if R::KIND == RoleKind::External && external && backend.flags & BACKEND_F_LOCAL == 0 {
        flags |= FLOW_F_SNAT;
    }

    if flags & FLOW_F_SNAT == 0 {
        conntrack::create(key, pkt, backend_id, &backend, now, flags, 0)?;
        nat::dnat(ctx, pkt, backend.addr, backend.port)?;
        count(Counter::NewFlow);
        stats::forward(service.id, backend_id, ctx.packet_len(), true);
        event!(
            ctx,
            config,
            "new flow: {:i}:{} -> {:i}:{} service {} backend {} {:i}:{}",
            u32::from_be(pkt.src_addr),
            u16::from_be(pkt.src_port),
            u32::from_be(pkt.dst_addr),
            u16::from_be(pkt.dst_port),
            service.id,
            backend_id,
            u32::from_be(backend.addr),
            u16::from_be(backend.port)
        );
        return Ok(Action::Pass);
    }

    let nat_config = NatConfig::load();
    let nat_addr = nat_config.nat_addr(flags & FLOW_F_HAIRPIN != 0);
    if nat_addr == 0 {
        return Err(Error::NoNatAddr);
    }
    // The flow exists before its port is claimed (see `snat`): another CPU
    // that finds the port claimed then also finds the flow holding it.
    conntrack::create(key, pkt, backend_id, &backend, now, flags, 0)?;
    let entry = conntrack::lookup(key).ok_or(Error::ConntrackFull)?;
    let nat_port = match snat::allocate(key, entry, &backend, config, &nat_config, now) {
        Ok(nat_port) => nat_port,
        Err(error) => {
            conntrack::remove_unclaimed(key);
            return Err(error);
        }
    };
    event!(
        ctx,
        config,
        "new flow: {:i}:{} -> {:i}:{} service {} backend {} {:i}:{} source {:i}:{}",
        u32::from_be(pkt.src_addr),
        u16::from_be(pkt.src_port),
        u32::from_be(pkt.dst_addr),
        u16::from_be(pkt.dst_port),
        service.id,
        backend_id,
        u32::from_be(backend.addr),
        u16::from_be(backend.port),
        u32::from_be(nat_addr),
        u16::from_be(nat_port)
    );
    let new = Tuple {
        src_addr: nat_addr,
        src_port: nat_port,
        dst_addr: backend.addr,
        dst_port: backend.port,
    };
    match send_new_snat::<C>(ctx, pkt, &new) {
        // The flow exists from here on: a packet XDP hands to TC is an
        // established one there.
        Ok(None) => {
            count(Counter::NewFlow);
            count(Counter::XdpToTc);
            stats::new_flow(service.id, backend_id);
            Ok(Action::Pass)
        }
        Ok(Some(action)) => {
            count(Counter::NewFlow);
            count(Counter::Forwarded);
            stats::forward(service.id, backend_id, ctx.packet_len(), true);
            Ok(action)
        }
        Err(error) => {
            // The packet that created the flow is dropped (no route, a
            // failed rewrite): nothing of the flow reached the backend, so
            // neither the flow nor its port may outlive it; a retransmit
            // starts over.
            conntrack::remove_new(key, &backend, nat_port);
            Err(error)
        }
    }
}

/// Routes, translates and sends the first packet of a source-translated
/// flow. `Ok(None)`: XDP hands it to TC untouched.
#[inline(always)]
fn send_new_snat<C: PacketContext>(
    ctx: &C,
    pkt: &Packet,
    new: &Tuple,
) -> Result<Option<Action>, Error> {
    let Some(route) = fib::plan(ctx, pkt, new)? else {
        return Ok(None);
    };
    nat::translate(ctx, pkt, new)?;
    fib::send(ctx, pkt, new, route).map(Some)
}

/// The tracked flow a packet whose destination is no frontend answers, if
/// its source is a backend of one of the services `candidates` lists: the
/// key, a pointer to the entry and a copy.
#[inline(always)]
fn revnat_flow(pkt: &Packet, candidates: &RevNat) -> Option<(FlowKey, *mut Flow, Flow)> {
    let count_valid = candidates.count as usize;
    for (i, &service_id) in candidates.service_ids.iter().enumerate() {
        if i >= count_valid {
            break;
        }
        let key = conntrack::reply_key(pkt, service_id);
        let Some(entry) = conntrack::lookup(&key) else {
            continue;
        };
        // SAFETY: the entry pointer is valid for this run.
        let flow: Flow = unsafe { *entry };
        if flow.backend_addr == pkt.src_addr && flow.backend_port == pkt.src_port {
            return Some((key, entry, flow));
        }
    }
    None
}

/// A backend's packet of flow `key`: its source becomes the frontend and
/// its destination the client (unchanged unless the flow is
/// source-translated). Replies of source-translated and external flows
/// are forwarded by FIB lookup (their new source may be a node address);
/// others go to the stack.
#[inline(always)]
fn reply<C: PacketContext, R: Role>(
    ctx: &C,
    pkt: &Packet,
    key: &FlowKey,
    entry: *mut Flow,
    flow: &Flow,
) -> Result<Action, Error> {
    let new = Tuple {
        src_addr: flow.frontend_addr,
        src_port: flow.frontend_port,
        dst_addr: key.client_addr,
        dst_port: key.client_port,
    };
    let route = if flow.flags & (FLOW_F_SNAT | FLOW_F_EXTERNAL) != 0 {
        let Some(route) = fib::plan(ctx, pkt, &new)? else {
            count(Counter::XdpToTc);
            return Ok(Action::Pass);
        };
        Some(route)
    } else {
        None
    };
    conntrack::touch_reply(entry, flow, pkt, Now::read());
    nat::translate(ctx, pkt, &new)?;
    let action = match route {
        Some(route) => {
            let action = fib::send(ctx, pkt, &new, route)?;
            count(Counter::Forwarded);
            action
        }
        None => Action::Pass,
    };
    count(Counter::Reply);
    stats::reply(key.service_id, flow.backend_id, ctx.packet_len());
    if conntrack::closes(flow, pkt) {
        conntrack::remove(key, flow);
    }
    Ok(action)
}
