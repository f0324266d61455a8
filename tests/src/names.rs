//! Unique names, so tests (threads of one process, and processes) can build
//! testbeds at the same time without colliding, and leftovers are easy to
//! recognise: every namespace, pin directory and scratch directory a testbed
//! makes starts with [`PREFIX`].

use std::sync::atomic::{AtomicU32, Ordering};

/// Leading part of every name a testbed gives to a kernel or file-system object.
pub const PREFIX: &str = "lbt";

/// `lbt-<tag>-<pid>-<counter>`: unique within the machine while this process
/// lives. `tag` should be short (a word naming the test).
pub fn unique(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}-{tag}-{}-{counter}", std::process::id())
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_unique_and_recognisable() {
        let first = super::unique("x");
        let second = super::unique("x");
        assert_ne!(first, second);
        assert!(
            first.starts_with(&format!("lbt-x-{}-", std::process::id())),
            "{first}"
        );
    }
}
