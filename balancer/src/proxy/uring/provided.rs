//! A ring of provided buffers (`IORING_REGISTER_PBUF_RING`, 5.19+): receives that name the
//! buffer group complete in whichever buffer the kernel picks when bytes arrive, so a
//! receive waiting for its peer holds no memory of its own.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{IoUring, types};

/// `count` buffers of `size` bytes, registered with one ring as buffer group `group`.
pub(super) struct Provided {
    /// The kernel's view: page-aligned entries, `count` of them.
    entries: *mut types::BufRingEntry,
    layout: std::alloc::Layout,
    buffers: Box<[u8]>,
    size: u32,
    count: u16,
    tail: u16,
}

impl Drop for Provided {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout. The ring that maps it is dropped
        // before (its owner declares the ring first) or unregisters it with its descriptor.
        unsafe { std::alloc::dealloc(self.entries.cast(), self.layout) };
    }
}

impl Provided {
    /// Registers `count` (a power of two) buffers of `size` bytes with `ring` as `group`, all
    /// of them offered. The ring must be dropped before this.
    pub(super) fn new(ring: &IoUring, group: u16, count: u16, size: u32) -> io::Result<Provided> {
        debug_assert!(count.is_power_of_two());
        let layout = std::alloc::Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: a non-zero size; zeroed so the tail starts at 0.
        let entries = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<types::BufRingEntry>();
        if entries.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut this = Provided {
            entries,
            layout,
            buffers: vec![0u8; usize::from(count) * size as usize].into_boxed_slice(),
            size,
            count,
            tail: 0,
        };
        // SAFETY: `entries` holds `count` entries, page-aligned, and lives until after the
        // ring (see `new`'s contract).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, group, 0)?;
        }
        for bid in 0..count {
            this.offer(bid);
        }
        Ok(this)
    }

    /// Puts buffer `bid` (back) in the kernel's reach.
    pub(super) fn offer(&mut self, bid: u16) {
        let mask = self.count - 1;
        let addr = self.start(bid);
        // SAFETY: the index is masked into the entries; the tail is the ring's own field.
        unsafe {
            let entry = &mut *self.entries.add(usize::from(self.tail & mask));
            entry.set_addr(addr as u64);
            entry.set_len(self.size);
            entry.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = types::BufRingEntry::tail(self.entries).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// Where buffer `bid` starts.
    pub(super) fn start(&self, bid: u16) -> *const u8 {
        assert!(bid < self.count, "a buffer id the kernel was given");
        // SAFETY: `bid` < `count`, so the offset is inside `buffers`.
        unsafe {
            self.buffers
                .as_ptr()
                .add(usize::from(bid) * self.size as usize)
        }
    }

    /// The first `len` bytes of buffer `bid`, which a completion filled.
    pub(super) fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        let at = usize::from(bid) * self.size as usize;
        &self.buffers[at..at + len.min(self.size as usize)]
    }
}
