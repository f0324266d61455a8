//! The kernel side as the agent sees it: loading and attaching the program
//! ([`loader`]), the one writer of its maps ([`writer`]), and the aya maps
//! the writer drives ([`maps`]).

pub mod loader;
pub mod maglev;
pub mod maps;
pub mod writer;
