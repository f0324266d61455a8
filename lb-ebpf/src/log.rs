//! Datapath event logging behind the runtime switch.
//!
//! A log line costs about 100 ns, so events are logged only while the agent
//! has set `CONFIG_F_LOG` in `LB_CONFIG`; with the switch off the cost is
//! one predictable branch on an already loaded value. Only events are
//! logged (new flow, reject, backend gone, drops), never every packet of an
//! established flow.

/// Logs an event at info level if `$config.log` is set.
///
/// Addresses are passed in network byte order and printed with `{:i}`
/// after `u32::from_be`; ports likewise with `u16::from_be`.
macro_rules! event {
    ($ctx:expr, $config:expr, $($arg:tt)+) => {
        if $config.log {
            aya_log_ebpf::info!($ctx, $($arg)+);
        }
    };
}
pub(crate) use event;
