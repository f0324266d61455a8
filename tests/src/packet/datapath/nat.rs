//! [`Datapath`] access to the source-translation map (`LB_SNAT`) and the
//! `loadBalancerSourceRanges` trie (`LB_SRC_RANGES`).

use std::net::Ipv4Addr;

use aya::maps::lpm_trie::{Key, LpmTrie};
use lb_common::{
    conntrack::FlowKey,
    names,
    nat::{SOURCE_RANGE_ALLOWED, SnatKey, SnatValue, SourceRange},
};

use super::{Datapath, Result, map_error};

/// One allowed client range of a service id.
#[derive(Clone, Copy, Debug)]
pub struct SourceRangeSpec {
    pub service_id: u32,
    /// Network address of the range.
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Datapath {
    /// The flow key `LB_SNAT` maps `key` to, if any.
    pub fn snat(&mut self, key: &SnatKey) -> Result<Option<SnatValue>> {
        self.hash_get(names::MAP_SNAT, key)
    }

    /// Every entry of `LB_SNAT`.
    pub fn snat_entries(&mut self) -> Result<Vec<(SnatKey, FlowKey)>> {
        let name = names::MAP_SNAT;
        let map = self.hash_map_mut::<SnatKey, SnatValue>(name)?;
        map.iter()
            .map(|entry| entry.map_err(map_error(name, "iterate")))
            .collect()
    }

    pub fn remove_snat(&mut self, key: &SnatKey) -> Result<()> {
        let name = names::MAP_SNAT;
        self.hash_map_mut::<SnatKey, SnatValue>(name)?
            .remove(key)
            .map_err(map_error(name, "remove"))
    }

    /// Removes every entry of `LB_SNAT` and returns how many there were.
    pub fn clear_snat(&mut self) -> Result<usize> {
        let entries = self.snat_entries()?;
        let name = names::MAP_SNAT;
        let mut map = self.hash_map_mut::<SnatKey, SnatValue>(name)?;
        for (key, _) in &entries {
            map.remove(key).map_err(map_error(name, "remove"))?;
        }
        Ok(entries.len())
    }

    /// Allows clients of `range` to open new connections to the frontends
    /// of its service id that carry `SERVICE_F_SOURCE_RANGES`, written as
    /// the agent writes it: prefix 32 (the service id) + the range's.
    pub fn allow_source_range(&mut self, range: &SourceRangeSpec) -> Result<()> {
        let name = names::MAP_SOURCE_RANGES;
        let mut trie: LpmTrie<_, SourceRange, u8> =
            LpmTrie::try_from(self.map_mut(name)?).map_err(map_error(name, "open"))?;
        let data = SourceRange::new(range.service_id, u32::from_ne_bytes(range.addr.octets()));
        let key = Key::new(
            SourceRange::SERVICE_ID_BITS + u32::from(range.prefix_len),
            data,
        );
        trie.insert(&key, &SOURCE_RANGE_ALLOWED, 0)
            .map_err(map_error(name, "insert"))
    }
}
