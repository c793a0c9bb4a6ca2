//! What the panel-packed integer kernels ([`crate::int8`], [`crate::qmatmul`]) share: weights
//! in panels of [`PANEL`] output channels stored in 64-byte lines, the output matrix handed to
//! tasks that write disjoint panels, and how a call is cut into tasks.

/// Output channels per packed panel: one 512-bit register of 32-bit sums.
pub const PANEL: usize = 16;

/// One cache line of packed weights.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct Line(pub(crate) [u8; 64]);

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
