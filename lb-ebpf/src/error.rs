//! Failures of the per-packet path. Each maps to exactly one counter and
//! one action; the entry point counts it (see the verdict table in main.rs).

use lb_common::{counters::Counter, stats::DropReason};

use crate::context::Action;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Truncated or inconsistent headers: passed to the stack, which drops
    /// what it cannot parse either.
    Malformed,
    /// A slot or its backend vanished between lookups (agent update race):
    /// dropped, the client retransmits.
    SlotMiss,
    /// The flow could not be inserted: dropped, since translating it
    /// without an entry would break its replies.
    ConntrackFull,
    /// Building or sending a reject failed: dropped (the reject was a drop
    /// with a notification; without the notification it is still a drop).
    RejectFailed,
    /// A store or checksum helper failed mid-rewrite: dropped, the packet
    /// may be half translated.
    RewriteFailed,
    /// A new connection from outside the service's source ranges: dropped.
    SourceRangeDenied,
    /// A flow needs a translated source port and none of those tried was
    /// free: dropped, the client retransmits.
    NoNatPort,
    /// A flow needs source translation to the node's address and none is
    /// configured: dropped.
    NoNatAddr,
    /// A packet that must be forwarded by FIB lookup has no usable route:
    /// dropped (handing it to the stack would not deliver it either).
    NoRoute,
}

impl Error {
    #[inline(always)]
    pub const fn counter(self) -> Counter {
        match self {
            Error::Malformed => Counter::Malformed,
            Error::SlotMiss => Counter::SlotMiss,
            Error::ConntrackFull => Counter::ConntrackFull,
            Error::RejectFailed => Counter::RejectFailed,
            Error::RewriteFailed => Counter::RewriteFailed,
            Error::SourceRangeDenied => Counter::SourceRangeDenied,
            Error::NoNatPort => Counter::NoNatPort,
            Error::NoNatAddr => Counter::NoNatAddr,
            Error::NoRoute => Counter::NoRoute,
        }
    }

    /// The per-service drop reason, for errors of a service's packet.
    #[inline(always)]
    pub const fn drop_reason(self) -> Option<DropReason> {
        match self {
            Error::Malformed => None,
            Error::SlotMiss => Some(DropReason::SlotMiss),
            Error::ConntrackFull => Some(DropReason::ConntrackFull),
            Error::RejectFailed => Some(DropReason::RejectFailed),
            Error::RewriteFailed => Some(DropReason::RewriteFailed),
            Error::SourceRangeDenied => Some(DropReason::SourceRange),
            Error::NoNatPort | Error::NoNatAddr => Some(DropReason::NoNat),
            Error::NoRoute => Some(DropReason::NoRoute),
        }
    }

    #[inline(always)]
    pub const fn action(self) -> Action {
        match self {
            Error::Malformed => Action::Pass,
            Error::SlotMiss
            | Error::ConntrackFull
            | Error::RejectFailed
            | Error::RewriteFailed
            | Error::SourceRangeDenied
            | Error::NoNatPort
            | Error::NoNatAddr
            | Error::NoRoute => Action::Drop,
        }
    }
}
