//! The runtime configuration the agent writes into `LB_CONFIG`, read once
//! per packet that reaches the translation or reply checks. `LB_CONFIG` is
//! an array, whose lookup the verifier inlines: a few instructions.

use lb_common::config::{CONFIG_F_LOG, DatapathConfig};

use crate::maps::LB_CONFIG;

/// A copy of the configuration with defaults applied: a timeout, port or
/// hairpin address of 0 (an agent that has not written the map yet) means
/// the default, so flows do not expire after a second.
#[derive(Clone, Copy)]
pub struct Config {
    /// Emit aya-log lines for datapath events (`CONFIG_F_LOG`).
    pub log: bool,
    pub tcp_timeout: u32,
    pub tcp_closing_timeout: u32,
    pub udp_timeout: u32,
    /// Entries per Maglev table.
    pub maglev_table_size: u32,
    /// Node address for source-translated external flows, network byte
    /// order; 0 when none is known (such flows are dropped).
    pub snat_addr: u32,
    /// Source address of hairpin flows, network byte order.
    pub hairpin_addr: u32,
    /// Translated source ports, host byte order, `nat_port_min <=
    /// nat_port_max` (an inverted or empty range means the default).
    pub nat_port_min: u16,
    pub nat_port_max: u16,
}

impl Config {
    #[inline(always)]
    pub fn load() -> Self {
        let stored = LB_CONFIG.get(0).copied().unwrap_or(DatapathConfig::DEFAULT);
        let or_default = |value: u32, default: u32| if value == 0 { default } else { value };
        let (nat_port_min, nat_port_max) =
            if stored.nat_port_min == 0 || stored.nat_port_min > stored.nat_port_max {
                (
                    DatapathConfig::DEFAULT.nat_port_min,
                    DatapathConfig::DEFAULT.nat_port_max,
                )
            } else {
                (stored.nat_port_min, stored.nat_port_max)
            };
        Self {
            log: stored.flags & CONFIG_F_LOG != 0,
            tcp_timeout: or_default(stored.tcp_timeout, DatapathConfig::DEFAULT.tcp_timeout),
            tcp_closing_timeout: or_default(
                stored.tcp_closing_timeout,
                DatapathConfig::DEFAULT.tcp_closing_timeout,
            ),
            udp_timeout: or_default(stored.udp_timeout, DatapathConfig::DEFAULT.udp_timeout),
            maglev_table_size: or_default(
                stored.maglev_table_size,
                DatapathConfig::DEFAULT.maglev_table_size,
            ),
            snat_addr: stored.snat_addr,
            hairpin_addr: or_default(stored.hairpin_addr, DatapathConfig::DEFAULT.hairpin_addr),
            nat_port_min,
            nat_port_max,
        }
    }

    /// Whether `addr:port` (network byte order) is where the backend of a
    /// source-translated flow sends its replies: the SNAT or hairpin
    /// address, a port in the translated range. Only compares, so it runs
    /// before any map lookup on the path of packets that are no service's.
    #[inline(always)]
    pub const fn is_nat_destination(&self, addr: u32, port: u16) -> bool {
        if addr != self.hairpin_addr && (addr != self.snat_addr || self.snat_addr == 0) {
            return false;
        }
        let port = u16::from_be(port);
        port >= self.nat_port_min && port <= self.nat_port_max
    }
}
