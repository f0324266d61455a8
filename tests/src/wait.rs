//! Bounded polling: the testbed never waits without a deadline.

use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Result, TestbedError};

/// How long a test waits for the agent to apply a change. The agent
/// promises "a fraction of a second"; this leaves room for a loaded machine.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Delay between two polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `probe` until it returns `Ok(value)` or `timeout` passes. An
/// `Err(state)` means "not yet"; the last one is quoted in the timeout
/// error, so a failure says what was seen instead of just "timed out".
pub fn wait_for<T, E: Display>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, E>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        let last = match probe() {
            Ok(value) => return Ok(value),
            Err(state) => state.to_string(),
        };
        if start.elapsed() >= timeout {
            return Err(TestbedError::Timeout {
                what: what.to_owned(),
                waited: start.elapsed(),
                last: Some(last),
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() >= timeout {
            return Err(TestbedError::Timeout {
                what: what.to_owned(),
                waited: start.elapsed(),
                last: None,
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}
