//! The per-packet decision, independent of the program type: parse, then
//! the forward path (destination is a frontend) or the reply path (source
//! is a backend of a tracked flow), else pass.
//!
//! Outcomes that are not errors are counted here; errors are returned to
//! the entry point, which counts them (`Error::counter`) and applies their
//! action.

use lb_common::{conntrack::Flow, counters::Counter, service::ServiceValue, stats::DropReason};

use crate::{
    affinity, backend,
    config::Config,
    conntrack::{self, Now},
    context::{Action, PacketContext},
    counters::count,
    error::Error,
    log::event,
    maps::LB_REVNAT,
    nat,
    parse::{self, Packet, Parsed},
    reject, service, stats,
};

/// Handles one packet arriving from a pod.
#[inline(always)]
pub fn process<C: PacketContext>(ctx: &C) -> Result<Action, Error> {
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
    if let Some(service) = service::lookup(&pkt) {
        let result = forward(ctx, &pkt, &service);
        if let Err(error) = result
            && let Some(reason) = error.drop_reason()
        {
            stats::drop(service.id, reason);
        }
        return result;
    }
    if reply(ctx, &pkt)? {
        return Ok(Action::Pass);
    }
    count(Counter::Pass);
    Ok(Action::Pass)
}

/// A client packet to a frontend: continue its flow, or start one.
#[inline(always)]
fn forward<C: PacketContext>(
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
                conntrack::touch_forward(entry, &flow, pkt, now);
                nat::dnat(ctx, pkt, flow.backend_addr, flow.backend_port)?;
                count(Counter::Established);
                stats::forward(service.id, flow.backend_id, ctx.packet_len(), false);
                if conntrack::closes(&flow, pkt) {
                    conntrack::remove(&key);
                }
                return Ok(Action::Pass);
            }
            // The backend left every EndpointSlice of the service. A TCP
            // connection to it is dead: tell the client at once instead of
            // letting it time out. UDP has no connection: pick a new backend.
            count(Counter::BackendGone);
            conntrack::remove(&key);
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
    new_flow(ctx, pkt, service, &key, now, &config)
}

/// The first packet of a flow (or the first after its entry expired or was
/// evicted: a TCP packet without SYN is balanced too, as Cilium does).
#[inline(always)]
fn new_flow<C: PacketContext>(
    ctx: &C,
    pkt: &Packet,
    service: &ServiceValue,
    key: &lb_common::conntrack::FlowKey,
    now: Now,
    config: &Config,
) -> Result<Action, Error> {
    if service::rejects_new_connections(service) {
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
    conntrack::create(key, pkt, backend_id, &backend, now)?;
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
    Ok(Action::Pass)
}

/// A packet whose destination is no frontend: if its source is a backend
/// and it belongs to a tracked flow, rewrite its source back to the
/// frontend. Returns whether it did.
#[inline(always)]
fn reply<C: PacketContext>(ctx: &C, pkt: &Packet) -> Result<bool, Error> {
    let backend = lb_common::backend::BackendAddr::new(pkt.src_addr, pkt.src_port, pkt.proto);
    let Some(candidates) = LB_REVNAT.get_ptr(&backend) else {
        return Ok(false);
    };
    // SAFETY: copied out at once; REVNAT is only written by the agent.
    let candidates = unsafe { *candidates };
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
        if flow.backend_addr != pkt.src_addr || flow.backend_port != pkt.src_port {
            continue;
        }
        conntrack::touch_reply(entry, &flow, pkt, Now::read());
        nat::snat(ctx, pkt, flow.frontend_addr, flow.frontend_port)?;
        count(Counter::Reply);
        stats::reply(service_id, flow.backend_id, ctx.packet_len());
        if conntrack::closes(&flow, pkt) {
            conntrack::remove(&key);
        }
        return Ok(true);
    }
    Ok(false)
}
