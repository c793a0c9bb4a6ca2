//! What the panel-packed integer kernels ([`crate::int8`], [`crate::qmatmul`]) share: weights
//! in panels of [`PANEL`] output channels stored in 64-byte lines, the output matrix handed to
//! tasks that write disjoint panels, and how a call is cut into tasks.

/// Output channels per packed panel: one 512-bit register of 32-bit sums.
pub const PANEL: usize = 16;

/// One cache line of packed weights.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub(crate) [u8; 64]);

/// Bytes that outlive the weights built on them: a memory-mapped bundle file, say. They must
/// not move while shared (a map or a `Vec` does not): weights keep pointers into them.
pub type SharedBytes = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where a matrix's packed lines live: its own memory (packed at load), or a 64-byte-aligned
/// range of shared bytes (an edge bundle mapped read-only: loading is the `mmap`, and the
/// pages are the page cache's). The kernels see one `[Line]` either way.
#[derive(Clone)]
pub(crate) enum Lines {
    Owned(Vec<Line>),
    Mapped {
        /// Keeps `lines` alive (never read).
        _bytes: SharedBytes,
        /// `count` lines inside `bytes` (resolved once: the kernels deref on every panel).
        lines: *const Line,
        count: usize,
    },
}

// SAFETY: `lines` points into `bytes`, which is immutable, `Send + Sync` and kept alive by the
// `Arc` beside it.
unsafe impl Send for Lines {}
unsafe impl Sync for Lines {}

impl Lines {
    /// `count` lines at `offset` of `bytes`; `None` if out of range or not 64-byte aligned.
    pub(crate) fn mapped(bytes: SharedBytes, offset: usize, count: usize) -> Option<Lines> {
        let b = (*bytes).as_ref();
        let end = offset.checked_add(count.checked_mul(64)?)?;
        let aligned = (b.as_ptr() as usize)
            .wrapping_add(offset)
            .is_multiple_of(64);
        if end > b.len() || !aligned {
            return None;
        }
        let lines = b[offset..].as_ptr() as *const Line;
        Some(Lines::Mapped {
            _bytes: bytes,
            lines,
            count,
        })
    }

    /// The lines as bytes (what a bundle stores).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        let l: &[Line] = self;
        // SAFETY: a Line is 64 plain bytes.
        unsafe { std::slice::from_raw_parts(l.as_ptr() as *const u8, l.len() * 64) }
    }
}

impl std::ops::Deref for Lines {
    type Target = [Line];
    fn deref(&self) -> &[Line] {
        match self {
            Lines::Owned(v) => v,
            // SAFETY: `mapped` checked the range and the 64-byte alignment; a Line is 64
            // plain bytes with no invalid values; the bytes live (unmoved) as long as `self`.
            Lines::Mapped { lines, count, .. } => unsafe {
                std::slice::from_raw_parts(*lines, *count)
            },
        }
    }
}

/// The output matrix, shared by tasks that write disjoint panels of it.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub(crate) ptr: *mut f32,
    /// Row length (the matrix's `n`).
    pub(crate) n: usize,
}
// SAFETY: tasks write disjoint columns of the output.
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

impl Out {
    /// Lanes of panel `p` that are real columns (the last panel may be partial), as a mask.
    #[inline(always)]
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn mask(&self, p: usize) -> u16 {
        let left = self.n - p * PANEL;
        if left >= PANEL {
            0xffff
        } else {
            (1u16 << left) - 1
        }
    }
}

/// Over panels `p0..p1`: `pair(i, p)` for rows `i, i+1` two at a time, then `single(i, p)` for
/// a last odd row (how the AArch64 kernels tile an `m`-row call).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) fn row_pairs(
    m: usize,
    p0: usize,
    p1: usize,
    mut pair: impl FnMut(usize, usize),
    mut single: impl FnMut(usize, usize),
) {
    for p in p0..p1 {
        let mut i = 0;
        while i + 2 <= m {
            pair(i, p);
            i += 2;
        }
        if i < m {
            single(i, p);
        }
    }
}

/// Panels per task: decode-sized calls split the weights evenly over the threads (each byte is
/// read once, by one thread); prefill-sized calls take two panels at a time so every thread
/// stays busy and a task's weights stay in L1 while all rows pass over them.
pub(crate) fn panels_per_task(m: usize, panels: usize) -> usize {
    if m < 4 {
        let threads = crate::pool::global().threads();
        panels.div_ceil(4 * threads).clamp(4, 64)
    } else {
        2
    }
}

/// Runs `f(p0, p1)` over the panels of an `m`-row call of `macs` multiply-accumulates, on the
/// pool when the call is big enough.
pub(crate) fn for_panels(
    m: usize,
    panels: usize,
    macs: usize,
    f: impl Fn(usize, usize) + Sync + Send,
) {
    let per = panels_per_task(m, panels);
    crate::for_each_chunk(panels.div_ceil(per), macs, |c| {
        f(c * per, ((c + 1) * per).min(panels))
    });
}
