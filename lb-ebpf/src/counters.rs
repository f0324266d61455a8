//! Per-CPU counter increments.

use lb_common::counters::Counter;

use crate::maps::LB_COUNTERS;

/// Adds one to `counter` on the current CPU. Per-CPU slots need no atomic
/// operation; the agent sums them over CPUs.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(value) = LB_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is this CPU's slot of an array entry, valid for
        // the whole program run; nothing else on this CPU runs concurrently.
        unsafe { *value += 1 };
    }
}
