//! The port filter (`LB_PORTS`): which ports some frontend listens on
//! and which source ports some backend answers from, so a packet that can
//! be no service's is passed after two array loads instead of two hash
//! lookups (the path every packet of the node that is not load-balanced
//! takes).
//!
//! An array of [`PORT_FILTER_SIZE`] bytes indexed by port in host byte
//! order, each a set of `PORT_F_*` bits. The filter may say yes too often
//! (a bit set for a port nobody uses any more costs the hash lookup it
//! saves, nothing else) but never too rarely: the agent sets a port's bits
//! before it writes the first `LB_SERVICES` / `LB_REVNAT` entry that needs
//! them, and clears them only after the last such entry is gone.

/// Some frontend (`LB_SERVICES` key), of any kind and protocol, has this
/// port: a packet to another port has no service.
pub const PORT_F_FRONTEND: u8 = 1 << 0;
/// Some frontend with [`crate::service::SERVICE_F_EXTERNAL`] has this
/// port: on an external interface, a packet to another port has no
/// service that is translated there.
pub const PORT_F_EXTERNAL_FRONTEND: u8 = 1 << 1;
/// Some backend (`LB_REVNAT` key) has this port: a packet from another
/// source port is no backend's reply.
pub const PORT_F_BACKEND: u8 = 1 << 2;

/// Entries of [`crate::names::MAP_PORTS`]: one per port.
pub const PORT_FILTER_SIZE: u32 = 1 << 16;
