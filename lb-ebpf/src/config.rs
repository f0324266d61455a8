//! The runtime configuration the agent writes into `LB_CONFIG`, read once
//! per translated packet (never on the pass-through path).

use lb_common::config::{CONFIG_F_LOG, DatapathConfig};

use crate::maps::LB_CONFIG;

/// A copy of the configuration with defaults applied: a timeout of 0 (an
/// agent that has not written the map yet) means the default, so flows do
/// not expire after a second.
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

impl Config {
    #[inline(always)]
    pub fn load() -> Self {
        let stored = LB_CONFIG.get(0).copied().unwrap_or(DatapathConfig::DEFAULT);
        let or_default = |value: u32, default: u32| if value == 0 { default } else { value };
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
