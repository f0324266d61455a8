//! The runtime configuration the agent writes into `LB_CONFIG`, read once
//! per packet that reaches the translation or reply checks. `LB_CONFIG` is
//! an array, whose lookup the verifier inlines: a few instructions.

use lb_common::config::{CONFIG_F_LOG, DatapathConfig};

use crate::maps::LB_CONFIG;

/// A copy of the configuration with defaults applied: a timeout of 0 (an agent that has not written the map yet) means
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
}

/// The source-translation part of the configuration, read only by the
/// paths of source-translated flows (so the others do not pay for it).
#[derive(Clone, Copy)]
pub struct NatConfig {
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

impl NatConfig {
    #[inline(always)]
    pub fn load() -> Self {
        let stored = LB_CONFIG.get(0).copied().unwrap_or(DatapathConfig::DEFAULT);
        let (nat_port_min, nat_port_max) = nat_port_range(&stored);
        Self {
            snat_addr: stored.snat_addr,
            hairpin_addr: or_default(stored.hairpin_addr, DatapathConfig::DEFAULT.hairpin_addr),
            nat_port_min,
            nat_port_max,
        }
    }

    /// The translated source address of a flow with `flow_flags`
    /// (`FLOW_F_HAIRPIN` or not); 0 if none is configured.
    #[inline(always)]
    pub const fn nat_addr(&self, hairpin: bool) -> u32 {
        if hairpin {
            self.hairpin_addr
        } else {
            self.snat_addr
        }
    }
}

impl Config {
    #[inline(always)]
    pub fn load() -> Self {
        let stored = LB_CONFIG.get(0).copied().unwrap_or(DatapathConfig::DEFAULT);
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
        }
    }
}

#[inline(always)]
const fn or_default(value: u32, default: u32) -> u32 {
    if value == 0 { default } else { value }
}

/// The translated port range, host byte order; the default if the stored
/// one is empty or inverted.
#[inline(always)]
const fn nat_port_range(stored: &DatapathConfig) -> (u16, u16) {
    if stored.nat_port_min == 0 || stored.nat_port_min > stored.nat_port_max {
        (
            DatapathConfig::DEFAULT.nat_port_min,
            DatapathConfig::DEFAULT.nat_port_max,
        )
    } else {
        (stored.nat_port_min, stored.nat_port_max)
    }
}

/// Whether `addr:port` (network byte order) is where the backend of a
/// source-translated flow sends its replies: the SNAT or hairpin address,
/// a port in the translated range. `Some(true)` for the hairpin address.
///
/// This runs on the path of every packet that is no service's, before
/// any hash lookup: it reads the few fields it needs straight from
/// `LB_CONFIG` (an array lookup, which the verifier inlines) and only
/// compares.
#[inline(always)]
pub fn nat_destination(addr: u32, port: u16) -> Option<bool> {
    let stored = LB_CONFIG.get_ptr(0)?;
    // SAFETY: an array entry is valid for the whole run; read field by
    // field, without copying the entry.
    let (snat_addr, hairpin_addr) = unsafe { ((*stored).snat_addr, (*stored).hairpin_addr) };
    let is_hairpin = addr == or_default(hairpin_addr, DatapathConfig::DEFAULT.hairpin_addr);
    if !is_hairpin && (addr != snat_addr || snat_addr == 0) {
        return None;
    }
    // SAFETY: as above.
    let (min, max) = nat_port_range(unsafe { &*stored });
    let port = u16::from_be(port);
    (port >= min && port <= max).then_some(is_hairpin)
}
