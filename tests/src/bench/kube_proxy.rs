//! What users would run instead: kube-proxy's rules for the same Services,
//! generated in its published layouts and loaded into a node namespace
//! (never the root namespace) with `iptables-restore` and `nft -f`.
//!
//! iptables mode (kube-proxy's `proxier.go` layout): `PREROUTING` and
//! `OUTPUT` jump to `KUBE-SERVICES`, which holds one rule per service port
//! (destination address, protocol, port) jumping to that port's
//! `KUBE-SVC-<hash>` chain; the service chain marks traffic from outside
//! the pod CIDR for masquerade, then picks an endpoint with
//! `-m statistic --mode random --probability 1/(n-i)` and jumps to its
//! `KUBE-SEP-<hash>` chain, which marks hairpin traffic and DNATs.
//! `KUBE-POSTROUTING` masquerades marked packets; `KUBE-FORWARD` accepts
//! established traffic and drops invalid. The rules are matched in order,
//! so the measured service, programmed last, is found after every other.
//!
//! nftables mode (kube-proxy's nftables layout, table `ip kube-proxy`): the
//! `services` chain looks up `ip daddr . meta l4proto . th dport` in the
//! verdict map `service-ips`, which jumps to the service chain; it picks an
//! endpoint chain with `numgen random mod n vmap { ... }`; the same marks,
//! masquerade chain and forward checks (`cluster-ips` reject set,
//! `no-endpoint-services` map).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Stdio;

use super::{BenchError, Result};
use crate::manifests::Protocol;
use crate::netns::NetNs;

/// kube-proxy's masquerade mark bit.
const MASQ_MARK: &str = "0x4000";

/// One service port with its endpoints, as kube-proxy sees it.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePort {
    /// `namespace/name:port`, kube-proxy's service port name.
    fn port_key(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// FNV-1a, 64 bit: a stable hash for chain names (kube-proxy uses SHA-256;
/// only stability and spread matter here).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `len` base32 characters of the hash of `text`, like kube-proxy's chain
/// name suffixes.
fn hash_name(text: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut hash = fnv1a(text);
    let mut hash2 = fnv1a(&format!("{text}#"));
    (0..len)
        .map(|i| {
            let source = if i < 12 { &mut hash } else { &mut hash2 };
            let symbol = ALPHABET[(*source & 31) as usize] as char;
            *source >>= 5;
            symbol
        })
        .collect()
}

/// kube-proxy's probability for endpoint `i` of `n`: `1/(n-i)` with ten
/// decimals (the last endpoint gets no statistic match).
fn probability(i: usize, n: usize) -> String {
    format!("{:.10}", 1.0 / (n - i) as f64)
}

/// The `iptables-restore` input for `services` (in programming order).
pub fn iptables_rules(services: &[ServicePort], cluster_cidr: &str) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    let mut dispatch = String::new();
    for service in services {
        let key = service.port_key();
        let proto = service.protocol.as_lower();
        let svc_chain = format!("KUBE-SVC-{}", hash_name(&format!("{key}{proto}"), 16));
        let ip = service.cluster_ip;
        let port = service.port;
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            dispatch,
            "-A KUBE-SERVICES -d {ip}/32 -p {proto} -m comment --comment \"{key} cluster IP\" -m {proto} --dport {port} -j {svc_chain}"
        );
        let _ = writeln!(
            rules,
            "-A {svc_chain} ! -s {cluster_cidr} -d {ip}/32 -p {proto} -m comment --comment \"{key} cluster IP\" -m {proto} --dport {port} -j KUBE-MARK-MASQ"
        );
        let n = service.endpoints.len();
        for (i, endpoint) in service.endpoints.iter().enumerate() {
            let sep_chain = format!(
                "KUBE-SEP-{}",
                hash_name(&format!("{key}{proto}{endpoint}"), 16)
            );
            let _ = writeln!(chains, ":{sep_chain} - [0:0]");
            if i + 1 < n {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{key} -> {endpoint}\" -m statistic --mode random --probability {} -j {sep_chain}",
                    probability(i, n)
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{key} -> {endpoint}\" -j {sep_chain}"
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep_chain} -s {}/32 -m comment --comment \"{key}\" -j KUBE-MARK-MASQ",
                endpoint.ip()
            );
            let _ = writeln!(
                rules,
                "-A {sep_chain} -p {proto} -m comment --comment \"{key}\" -m {proto} -j DNAT --to-destination {endpoint}"
            );
        }
    }
    let mut text = String::new();
    text.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    text.push_str(":KUBE-FORWARD - [0:0]\n");
    text.push_str(
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
    );
    text.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    let _ = writeln!(
        text,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    text.push_str(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    text.push_str("COMMIT\n");
    text.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    text.push_str(
        ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    text.push_str(&chains);
    text.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    text.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
    );
    text.push_str(
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    );
    let _ = writeln!(text, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    let _ = writeln!(
        text,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(text, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    text.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    text.push_str(&dispatch);
    text.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    text.push_str(&rules);
    text.push_str("COMMIT\n");
    text
}

/// The `nft -f` input for `services` (in programming order).
pub fn nftables_rules(services: &[ServicePort], cluster_cidr: &str) -> String {
    let mut chains = String::new();
    let mut elements = Vec::new();
    let mut cluster_ips = Vec::new();
    for service in services {
        let proto = service.protocol.as_lower();
        let ip = service.cluster_ip;
        let port = service.port;
        let id = format!(
            "{}/{}/{proto}/{}",
            service.namespace, service.name, service.port_name
        );
        let svc_chain = format!("service-{}-{id}", hash_name(&format!("{id}svc"), 8));
        let mut choices = Vec::new();
        for (i, endpoint) in service.endpoints.iter().enumerate() {
            let ep_chain = format!(
                "endpoint-{}-{id}__{}/{}",
                hash_name(&format!("{id}{endpoint}"), 8),
                endpoint.ip(),
                endpoint.port()
            );
            let _ = writeln!(
                chains,
                "\tchain {ep_chain} {{\n\t\tip saddr {} jump mark-for-masquerade\n\t\tmeta l4proto {proto} dnat to {endpoint}\n\t}}",
                endpoint.ip()
            );
            choices.push(format!("{i} : goto {ep_chain}"));
        }
        let _ = writeln!(
            chains,
            "\tchain {svc_chain} {{\n\t\tip daddr {ip} {proto} dport {port} ip saddr != {cluster_cidr} jump mark-for-masquerade\n\t\tnumgen random mod {} vmap {{ {} }}\n\t}}",
            choices.len(),
            choices.join(", ")
        );
        elements.push(format!("{ip} . {proto} . {port} : goto {svc_chain}"));
        if !cluster_ips.contains(&ip) {
            cluster_ips.push(ip);
        }
    }
    let mut text = String::new();
    text.push_str("table ip kube-proxy {\n\tcomment \"rules for kube-proxy\"\n");
    let _ = writeln!(
        text,
        "\tchain mark-for-masquerade {{\n\t\tmeta mark set meta mark | {MASQ_MARK}\n\t}}"
    );
    let _ = writeln!(
        text,
        "\tchain masquerading {{\n\t\tmeta mark & {MASQ_MARK} == 0 return\n\t\tmeta mark set meta mark ^ {MASQ_MARK}\n\t\tmasquerade fully-random\n\t}}"
    );
    text.push_str(
        "\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\tcomment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"\n\t}\n",
    );
    text.push_str(
        "\tmap service-nodeports {\n\t\ttype inet_proto . inet_service : verdict\n\t\tcomment \"NodePort traffic\"\n\t}\n",
    );
    text.push_str(
        "\tmap no-endpoint-services {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\tcomment \"vmap to drop or reject packets to services with no endpoints\"\n\t}\n",
    );
    text.push_str(
        "\tset cluster-ips {\n\t\ttype ipv4_addr\n\t\tcomment \"Active ClusterIPs\"\n\t}\n",
    );
    text.push_str(
        "\tchain nodeports {\n\t\tmeta l4proto . th dport vmap @service-nodeports\n\t}\n",
    );
    text.push_str(
        "\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t\tfib daddr type local ip daddr != 127.0.0.0/8 jump nodeports\n\t}\n",
    );
    text.push_str(
        "\tchain service-endpoints-check {\n\t\tip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\t}\n",
    );
    text.push_str(
        "\tchain cluster-ips-check {\n\t\tip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\t}\n",
    );
    text.push_str(
        "\tchain filter-forward {\n\t\ttype filter hook forward priority -110; policy accept;\n\t\tct state new jump service-endpoints-check\n\t\tct state new jump cluster-ips-check\n\t}\n",
    );
    text.push_str(
        "\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n",
    );
    text.push_str(
        "\tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n",
    );
    text.push_str(
        "\tchain nat-postrouting {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tjump masquerading\n\t}\n",
    );
    text.push_str(&chains);
    text.push_str("}\n");
    if !elements.is_empty() {
        let _ = writeln!(
            text,
            "add element ip kube-proxy service-ips {{ {} }}",
            elements.join(", ")
        );
    }
    if !cluster_ips.is_empty() {
        let ips: Vec<String> = cluster_ips.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(
            text,
            "add element ip kube-proxy cluster-ips {{ {} }}",
            ips.join(", ")
        );
    }
    text
}

/// Runs `program args` in `ns` with `input` on stdin; fails with its
/// stderr unless it exits successfully.
pub fn load_rules(ns: &NetNs, program: &str, args: &[&str], input: &str) -> Result<()> {
    let what = format!("{program} {} in {}", args.join(" "), ns.name());
    let mut child = ns
        .command(program)?
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| BenchError::io(format!("spawn {what}"), error))?;
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let written = stdin.write_all(input.as_bytes());
    drop(stdin);
    let output = child
        .wait_with_output()
        .map_err(|error| BenchError::io(format!("wait for {what}"), error))?;
    written.map_err(|error| BenchError::io(format!("write rules to {what}"), error))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(BenchError::check(
            what,
            format!("exited with {}: {}", output.status, stderr.trim()),
        ));
    }
    Ok(())
}

/// `program args` run in `ns`, its stdout.
pub fn output_of(ns: &NetNs, program: &str, args: &[&str]) -> Result<String> {
    let what = format!("{program} {} in {}", args.join(" "), ns.name());
    let output = ns
        .command(program)?
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| BenchError::io(format!("run {what}"), error))?;
    if !output.status.success() {
        return Err(BenchError::check(
            what,
            format!(
                "exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<ServicePort> {
        vec![ServicePort {
            namespace: "default".into(),
            name: "web".into(),
            port_name: "http".into(),
            cluster_ip: Ipv4Addr::new(198, 19, 0, 1),
            port: 80,
            protocol: Protocol::Tcp,
            endpoints: vec![
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 8080),
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 2), 8080),
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 3, 2), 8080),
            ],
        }]
    }

    #[test]
    fn iptables_layout_has_dispatch_statistic_dnat_and_masquerade() {
        let text = iptables_rules(&services(), "198.18.0.0/16");
        assert!(text.contains("-A KUBE-SERVICES -d 198.19.0.1/32 -p tcp"));
        assert_eq!(text.matches("--probability 0.3333333333").count(), 1);
        assert_eq!(text.matches("--probability 0.5000000000").count(), 1);
        assert_eq!(text.matches("-j DNAT --to-destination").count(), 3);
        assert!(text.contains("-j MASQUERADE"));
        // The nodeports rule closes KUBE-SERVICES, after every service.
        let nodeports = text.find("--dst-type LOCAL").expect("nodeports rule");
        assert!(text.find("-A KUBE-SERVICES -d").expect("dispatch") < nodeports);
        assert!(text.ends_with("COMMIT\n"));
    }

    #[test]
    fn nftables_layout_has_verdict_map_and_numgen() {
        let text = nftables_rules(&services(), "198.18.0.0/16");
        assert!(text.contains("ip daddr . meta l4proto . th dport vmap @service-ips"));
        assert!(text.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert!(text.contains(
            "add element ip kube-proxy service-ips { 198.19.0.1 . tcp . 80 : goto service-"
        ));
        assert_eq!(text.matches("dnat to 198.18.").count(), 3);
    }

    #[test]
    fn chain_names_are_stable_and_distinct() {
        assert_eq!(hash_name("a", 16), hash_name("a", 16));
        assert_ne!(hash_name("a", 16), hash_name("b", 16));
        assert_eq!(hash_name("a", 16).len(), 16);
    }
}
