//! The port filter in front of the frontend and reverse-NAT lookups
//! (`LB_PORTS`, see `lb_common::ports`): an array lookup, which the
//! verifier inlines, instead of a hash lookup for ports nothing uses.

use lb_common::ports::{PORT_F_EXTERNAL_FRONTEND, PORT_F_FRONTEND};

use crate::{datapath::RoleKind, maps::LB_PORTS};

/// The `PORT_F_*` bits of `port` (network byte order).
#[inline(always)]
pub fn bits(port: u16) -> u8 {
    LB_PORTS
        .get(u32::from(u16::from_be(port)))
        .copied()
        .unwrap_or(0)
}

/// The bit a frontend that a program of `role` translates sets on its port.
#[inline(always)]
pub const fn frontend_bit(role: RoleKind) -> u8 {
    match role {
        RoleKind::Pod => PORT_F_FRONTEND,
        RoleKind::External => PORT_F_EXTERNAL_FRONTEND,
    }
}
