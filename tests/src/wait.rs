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

/// One look at the thing being waited for.
#[derive(Debug)]
pub enum Probe<T> {
    /// Done: the wait returns this value.
    Ready(T),
    /// Not yet; the text says what was seen, for the timeout message.
    Pending(String),
    /// It will never happen (e.g. the process that should do it died):
    /// the wait ends at once with this error.
    Failed(TestbedError),
}

/// Polls `probe` until it is ready, fails, or `timeout` passes. The last
/// pending state is quoted in the timeout error, so a failure says what was
/// seen instead of just "timed out".
pub fn poll<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Probe<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        let last = match probe() {
            Probe::Ready(value) => return Ok(value),
            Probe::Failed(error) => return Err(error),
            Probe::Pending(state) => state,
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

/// [`poll`] for probes that cannot fail for good: `Ok(value)` is ready,
/// `Err(state)` is pending.
pub fn wait_for<T, E: Display>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, E>,
) -> Result<T> {
    poll(timeout, what, || match probe() {
        Ok(value) => Probe::Ready(value),
        Err(state) => Probe::Pending(state.to_string()),
    })
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
