//! The Services a benchmark programs: fillers plus the measured one, as
//! kube-proxy rules ([`super::kube_proxy`]) or as manifests for the agent.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde_json::Value;

use super::Result;
use super::kube_proxy::ServicePort;
use crate::manifests::{
    Endpoint, EndpointPort, EndpointSlice, ManifestDir, NAMESPACE, Protocol, Service,
};

/// Target port of filler endpoints on the first page (see [`fillers`]).
const FILLER_TARGET_PORT: u16 = 10_000;
/// Filler endpoint addresses: 198.18.128.0/17, never routed to.
const FILLER_ENDPOINT_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 128, 0);
const FILLER_ENDPOINT_SPACE: u32 = 1 << 15;

/// ClusterIP of service `index`: 198.19.0.0/16 from .0.1 on.
pub fn service_ip(index: u32) -> Ipv4Addr {
    assert!(
        index < 0xffff,
        "198.19.0.0/16 holds 65,534 service addresses"
    );
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + index)
}

/// `count` filler Services `filler-<i>` with one TCP port (80) and
/// `endpoints` endpoints each. Every endpoint is a distinct address and
/// port (so backends are not shared between Services): addresses fill
/// 198.18.128.0/17 page by page, each page with its own target port.
pub fn fillers(count: u32, endpoints: u32) -> Vec<ServicePort> {
    let per_page = FILLER_ENDPOINT_SPACE / endpoints.max(1);
    (0..count)
        .map(|index| {
            let page = index / per_page;
            let first = (index % per_page) * endpoints;
            let port = FILLER_TARGET_PORT + u16::try_from(page).expect("few pages");
            ServicePort {
                namespace: NAMESPACE.to_owned(),
                name: format!("filler-{index}"),
                port_name: "tcp".to_owned(),
                cluster_ip: service_ip(index),
                port: 80,
                protocol: Protocol::Tcp,
                endpoints: (0..endpoints)
                    .map(|k| {
                        SocketAddrV4::new(
                            Ipv4Addr::from(u32::from(FILLER_ENDPOINT_BASE) + first + k),
                            port,
                        )
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Service and EndpointSlice objects of consecutive ports of one Service
/// (same namespace and name).
fn objects(ports: &[ServicePort]) -> [Value; 2] {
    let first = &ports[0];
    let service = Service::new(
        &first.name,
        first.cluster_ip,
        ports
            .iter()
            .map(|port| {
                let target = port.endpoints.first().map_or(port.port, SocketAddrV4::port);
                match port.protocol {
                    Protocol::Tcp => {
                        crate::manifests::ServicePort::tcp(&port.port_name, port.port, target)
                    }
                    Protocol::Udp => {
                        crate::manifests::ServicePort::udp(&port.port_name, port.port, target)
                    }
                }
            })
            .collect(),
    );
    let slice = slice(ports, "1");
    [service.to_value(), slice.to_value()]
}

/// The EndpointSlice of one Service's ports, every endpoint ready except
/// the addresses in `not_ready`.
pub fn slice_with(ports: &[ServicePort], suffix: &str, not_ready: &[Ipv4Addr]) -> EndpointSlice {
    let first = &ports[0];
    let mut addresses: Vec<Ipv4Addr> = Vec::new();
    for port in ports {
        for endpoint in &port.endpoints {
            if !addresses.contains(endpoint.ip()) {
                addresses.push(*endpoint.ip());
            }
        }
    }
    EndpointSlice::new(
        &first.name,
        suffix,
        ports
            .iter()
            .map(|port| {
                let target = port.endpoints.first().map_or(port.port, SocketAddrV4::port);
                match port.protocol {
                    Protocol::Tcp => EndpointPort::tcp(&port.port_name, target),
                    Protocol::Udp => EndpointPort::udp(&port.port_name, target),
                }
            })
            .collect(),
        addresses
            .into_iter()
            .map(|address| Endpoint {
                address,
                ready: !not_ready.contains(&address),
            })
            .collect(),
    )
}

fn slice(ports: &[ServicePort], suffix: &str) -> EndpointSlice {
    slice_with(ports, suffix, &[])
}

/// Groups consecutive ports of the same Service.
pub fn group(ports: &[ServicePort]) -> Vec<&[ServicePort]> {
    ports
        .chunk_by(|a, b| a.namespace == b.namespace && a.name == b.name)
        .collect()
}

/// Writes `ports` as JSON manifests, `per_file` Services (each a Service
/// and its EndpointSlice) per file, in order; the last Service gets a
/// file of its own, written last. Returns that file's name.
pub fn write_manifests(
    dir: &ManifestDir,
    ports: &[ServicePort],
    per_file: usize,
) -> Result<String> {
    let groups = group(ports);
    let (last, rest) = groups.split_last().expect("at least one service");
    for (n, chunk) in rest.chunks(per_file.max(1)).enumerate() {
        let mut text = String::new();
        for service in chunk {
            for object in objects(service) {
                text.push_str(&object.to_string());
                text.push('\n');
            }
        }
        dir.write_text(&format!("bench-{n:05}.json"), &text)?;
    }
    let file = "bench-measured.json".to_owned();
    let mut text = String::new();
    for object in objects(last) {
        text.push_str(&object.to_string());
        text.push('\n');
    }
    dir.write_text(&file, &text)?;
    Ok(file)
}

/// The text of one Service's manifest file (Service and EndpointSlice),
/// with the endpoints at `not_ready` not ready.
pub fn manifest_text(ports: &[ServicePort], not_ready: &[Ipv4Addr]) -> String {
    let [service, _] = objects(ports);
    format!(
        "{service}\n{}\n",
        slice_with(ports, "1", not_ready).to_value()
    )
}
