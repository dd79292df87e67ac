//! Reading the kernel's exact per-key drop counts: the `AGG` per-CPU array (see
//! `agent_ebpf::AggSlot`), in large batches (`BPF_MAP_LOOKUP_BATCH`) rather than one system
//! call per slot, summed over CPUs by key.
use std::{collections::HashMap, os::fd::AsRawFd};

use agent_ebpf::{AggBucket, AggKey, AggSlot, AggVal, AGG_BUCKET_SLOTS};
use anyhow::{anyhow, Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};

/// Bytes of values read per system call (whole buckets, all CPUs).
const CHUNK_BYTES: usize = 1 << 20;

/// The aggregation table of a loaded program set.
pub struct AggTable {
    map: Map,
    cpus: usize,
    /// Whether the kernel supports batch lookups on this map (else one lookup per slot).
    batch: bool,
}

impl AggTable {
    pub fn new(map: Map) -> Result<Self> {
        if !matches!(map, Map::PerCpuArray(_)) {
            return Err(anyhow!("AGG is not a per-CPU array"));
        }
        let cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| anyhow!("{what}: {e}"))
            .context("counting possible CPUs")?;
        Ok(AggTable {
            map,
            cpus,
            batch: true,
        })
    }

    fn data(&self) -> &MapData {
        match &self.map {
            Map::PerCpuArray(d) => d,
            _ => unreachable!("checked in new"),
        }
    }

    /// The kernel's counts, summed over CPUs, by key.
    pub fn read(&mut self) -> Vec<(AggKey, AggVal)> {
        let mut sums: HashMap<AggKey, AggVal> = HashMap::new();
        if self.batch {
            match self.read_batched(&mut |slot| add(&mut sums, slot)) {
                Ok(()) => return sums.into_iter().collect(),
                Err(e) => {
                    tracing::debug!("batched read of AGG failed ({e}); reading slot by slot");
                    self.batch = false;
                    sums.clear();
                }
            }
        }
        if let Ok(array) = PerCpuArray::<&MapData, AggBucket>::try_from(&self.map) {
            for values in array.iter().filter_map(Result::ok) {
                for bucket in values.iter() {
                    for slot in &bucket.slots {
                        add(&mut sums, slot);
                    }
                }
            }
        }
        sums.into_iter().collect()
    }

    /// Every slot of every CPU through BPF_MAP_LOOKUP_BATCH (5.6+ for arrays).
    fn read_batched(&self, add: &mut impl FnMut(&AggSlot)) -> std::io::Result<()> {
        let fd = self.data().fd().as_fd_raw();
        let value_size = std::mem::size_of::<AggBucket>().next_multiple_of(8);
        let chunk = (CHUNK_BYTES / (self.cpus * value_size)).max(1);
        let mut keys = vec![0u32; chunk];
        let mut values = vec![0u8; chunk * self.cpus * value_size];
        let mut token_in = 0u32;
        let mut token_out = 0u32;
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    &token_in as *const u32 as u64
                },
                out_batch: &mut token_out as *mut u32 as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: fd as u32,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: attr points at buffers sized for `count` keys and per-CPU values.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>(),
                )
            };
            let err = (rc < 0).then(std::io::Error::last_os_error);
            for i in 0..attr.count as usize {
                for cpu in 0..self.cpus {
                    let at = (i * self.cpus + cpu) * value_size;
                    for s in 0..AGG_BUCKET_SLOTS as usize {
                        let at = at + s * std::mem::size_of::<AggSlot>();
                        // SAFETY: within `values`; AggSlot is plain data, read unaligned.
                        let slot: AggSlot = unsafe {
                            std::ptr::read_unaligned(values[at..].as_ptr() as *const AggSlot)
                        };
                        add(&slot);
                    }
                }
            }
            match err {
                None => {}
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Some(e) => return Err(e),
            }
            token_in = token_out;
            first = false;
        }
    }
}

/// Adds one CPU's slot to the sums.
fn add(sums: &mut HashMap<AggKey, AggVal>, slot: &AggSlot) {
    // A free slot, or one claimed an instant ago and not counted yet.
    if slot.key.location == 0 || slot.val.packets == 0 {
        return;
    }
    let sum = sums.entry(slot.key).or_default();
    sum.packets += slot.val.packets;
    sum.bytes += slot.val.bytes;
    sum.sampled_out += slot.val.sampled_out;
    sum.lost += slot.val.lost;
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `union bpf_attr`, the `batch` member (BPF_MAP_*_BATCH commands).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

trait RawFd {
    fn as_fd_raw(&self) -> i32;
}

impl RawFd for aya::maps::MapFd {
    fn as_fd_raw(&self) -> i32 {
        std::os::fd::AsFd::as_fd(self).as_raw_fd()
    }
}
