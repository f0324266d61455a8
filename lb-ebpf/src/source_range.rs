//! `loadBalancerSourceRanges`: whether a client may open a connection to a
//! service whose frontend has `SERVICE_F_SOURCE_RANGES`.

use aya_ebpf::btf_maps::lpm_trie::Key;
use lb_common::nat::{SOURCE_RANGE_ALLOWED, SourceRange};

use crate::maps::LB_SRC_RANGES;

/// Bits of a lookup key: the whole service id and the whole address.
const FULL_PREFIX_LEN: u32 = SourceRange::SERVICE_ID_BITS + 32;

/// Whether one of service `service_id`'s ranges holds `client_addr`
/// (network byte order). A service without ranges in the map admits
/// nobody: the agent fails closed when a range does not parse.
#[inline(always)]
pub fn allows(service_id: u32, client_addr: u32) -> bool {
    let key = Key::new(FULL_PREFIX_LEN, SourceRange::new(service_id, client_addr));
    LB_SRC_RANGES
        .get(&key)
        .is_some_and(|allowed| *allowed == SOURCE_RANGE_ALLOWED)
}
