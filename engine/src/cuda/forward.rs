//! One forward call on the device: the rows laid out and the stale blocks uploaded on the host,
//! then every layer's kernels queued on the stream, then the logits and the new K/V copied back
//! (the K/V into the host pools, layer by layer, where the CPU forward would have written them).

use super::pool::DevicePools;
use super::weights::{DevActs, DevLinear, DevQActs};
use super::{CudaModel, dev};
use crate::error::{EngineError, Result};
use crate::kv::KvLayout;
use crate::model::{ForwardItem, LayerHook, LogitsWanted};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

fn grid(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// What a forward call's rows need on the device, built on the host.
struct Rows {
    /// Row r belongs to item `item[r]` at position `pos[r]`.
    item: Vec<usize>,
    pos: Vec<usize>,
    tokens: Vec<u32>,
    /// Per row: the pool slot (`block · block_size + offset`) its K/V goes to.
    slot: Vec<u32>,
    /// Per row: the device address of its pool, where its block table starts in `table`,
    /// and how many positions it sees.
    pool: Vec<u64>,
    tab: Vec<u32>,
    ctx: Vec<u32>,
    table: Vec<u32>,
    /// Per row: RoPE's (cos, sin) pairs, the CPU's own angles.
    cs: Vec<f32>,
}

impl CudaModel {
    pub(super) fn forward_locked(
        &self,
        pools: &mut DevicePools,
        items: &mut [ForwardItem<'_>],
        layer_done: &mut LayerHook<'_>,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let (d, kvd, ff, hd) = (c.d_model, c.kv_dim(), c.d_ff, c.head_dim);
        let t0 = std::time::Instant::now();
        crate::model::validate_and_reserve(c, items)?;
        let rows = self.rows(pools, items)?;
        let r = rows.item.len();
        if r == 0 {
            return Ok(items.iter().map(|_| Vec::new()).collect());
        }
        let gpu = &self.gpu;
        let layout = KvLayout::for_model(c, self.kv_dtype);
        let plane = (layout.plane_bytes() / self.kv_dtype.bytes()) as i32;
        let (bs, nl) = (layout.block_size as i32, c.n_layers as i32);

        let tokens = gpu.upload(&rows.tokens)?;
        let slot = gpu.upload(&rows.slot)?;
        let pool = gpu.upload(&rows.pool)?;
        let tab = gpu.upload(&rows.tab)?;
        let ctxs = gpu.upload(&rows.ctx)?;
        let table = gpu.upload(&rows.table)?;
        let cs = gpu.upload(&rows.cs)?;
        let t1 = std::time::Instant::now();
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev0 = gpu.stream.record_event(timing).map_err(dev)?;
        let qkv_w = d + 2 * kvd;
        // Every scratch buffer below is fully written by a kernel before it is read.
        let mut x = gpu.scratch::<f32>(r * d)?;
        let mut h = gpu.scratch::<f32>(r * d)?;
        let mut qkv = gpu.scratch::<f32>(r * qkv_w)?;
        let mut att = gpu.scratch::<f32>(r * d)?;
        let mut gu = gpu.scratch::<f32>(r * 2 * ff)?;
        let mut g = gpu.scratch::<f32>(r * ff)?;
        let esz = self.kv_dtype.bytes();
        let row_bytes = 2 * kvd * esz;
        let mut staged = gpu.scratch::<u8>(c.n_layers * r * row_bytes)?;

        let s = &gpu.stream;
        let launch = |b: &mut cudarc::driver::LaunchArgs<'_>, cfg: LaunchConfig| -> Result<()> {
            // SAFETY: each call site passes buffers of the shapes its kernel indexes.
            unsafe { b.launch(cfg) }.map(|_| ()).map_err(dev)
        };
        // Embeddings.
        {
            let (n, k) = self.token_embd.dims();
            let (ni, ki) = (n as i32, k as i32);
            let cfg = LaunchConfig {
                grid_dim: ((k as u32).div_ceil(128), r as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let Some((fmt, w)) = self.token_embd.embed_args(&gpu.stream) else {
                return Err(EngineError::Device(
                    "token embeddings in mixed formats".into(),
                ));
            };
            let mut b = s.launch_builder(&gpu.k.embed);
            b.arg(&w)
                .arg(&fmt)
                .arg(&tokens)
                .arg(&mut x)
                .arg(&ni)
                .arg(&ki);
            launch(&mut b, cfg)?;
        }
        let (di, kvdi, ffi) = (d as i32, kvd as i32, ff as i32);
        let (nh, nkv) = (c.n_heads as i32, c.n_kv_heads as i32);
        let eps = c.rms_eps;
        let scale = 1.0 / (hd as f32).sqrt();
        let null = 0u64;
        let max_ctx = rows.ctx.iter().copied().max().unwrap_or(1) as usize;
        let max_ctx_i = max_ctx as i32;
        // The quantized copy of activations a matrix reads, made by the kernel that writes them.
        let quantized_for = |w: &DevLinear, rows: usize, k: usize| -> Result<Option<DevQActs>> {
            if w.wants_quantized() && k.is_multiple_of(32) {
                DevQActs::alloc(gpu, rows, k).map(Some)
            } else {
                Ok(None)
            }
        };
        // RMSNorm of `rows` rows (of `x`, or its rows `src`), quantizing into `q` when given.
        let norm = |x: &CudaSlice<f32>,
                    src: Option<&CudaSlice<u32>>,
                    w: &CudaSlice<f32>,
                    out: &mut CudaSlice<f32>,
                    rows: usize,
                    q: Option<&mut DevQActs>|
         -> Result<()> {
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = s.launch_builder(&gpu.k.rms_norm);
            b.arg(x);
            match src {
                Some(src) => b.arg(src),
                None => b.arg(&null),
            };
            b.arg(w).arg(out).arg(&di).arg(&eps);
            match q {
                Some(q) => b.arg(&mut q.q).arg(&mut q.d).arg(&mut q.s).arg(&mut q.sum),
                None => b.arg(&null).arg(&null).arg(&null).arg(&null),
            };
            launch(&mut b, cfg)
        };
        for (li, l) in self.layers.iter().enumerate() {
            let lii = li as i32;
            let mut hq = quantized_for(&l.wqkv, r, d)?;
            norm(&x, None, &l.attn_norm, &mut h, r, hq.as_mut())?;
            l.wqkv.forward(
                gpu,
                &mut DevActs::quantized_by_producer(&h, r, d, hq),
                &mut qkv,
                qkv_w,
                0,
                false,
            )?;
            {
                let mut st = staged.slice_mut(li * r * row_bytes..(li + 1) * r * row_bytes);
                let work = d / 2 + kvd / 2 + kvd;
                let cfg = LaunchConfig {
                    grid_dim: ((work as u32).div_ceil(128), r as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = s.launch_builder(&gpu.k.rope_store);
                b.arg(&mut qkv).arg(&cs).arg(&pool).arg(&slot).arg(&mut st);
                b.arg(&di)
                    .arg(&kvdi)
                    .arg(&lii)
                    .arg(&nl)
                    .arg(&plane)
                    .arg(&bs);
                launch(&mut b, cfg)?;
            }
            {
                let cfg = LaunchConfig {
                    grid_dim: (r as u32, c.n_heads as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: (max_ctx * 4 + max_ctx.div_ceil(layout.block_size) * 4)
                        as u32,
                };
                let mut b = s.launch_builder(&gpu.k.attention);
                b.arg(&qkv)
                    .arg(&pool)
                    .arg(&table)
                    .arg(&tab)
                    .arg(&ctxs)
                    .arg(&mut att);
                b.arg(&nh)
                    .arg(&nkv)
                    .arg(&lii)
                    .arg(&nl)
                    .arg(&plane)
                    .arg(&bs)
                    .arg(&scale)
                    .arg(&max_ctx_i);
                launch(&mut b, cfg)?;
            }
            l.wo.forward(gpu, &mut DevActs::new(&att, r, d), &mut x, d, 0, true)?;
            let mut hq = quantized_for(&l.w_gate_up, r, d)?;
            norm(&x, None, &l.ffn_norm, &mut h, r, hq.as_mut())?;
            l.w_gate_up.forward(
                gpu,
                &mut DevActs::quantized_by_producer(&h, r, d, hq),
                &mut gu,
                2 * ff,
                0,
                false,
            )?;
            let mut gq = quantized_for(&l.w_down, r, ff)?;
            match gq.as_mut() {
                Some(q) => {
                    let blocks = (r * ff / 32) as i32;
                    let mut b = s.launch_builder(&gpu.k.silu_mul_q);
                    b.arg(&gu).arg(&mut g).arg(&ffi).arg(&blocks);
                    b.arg(&mut q.q).arg(&mut q.d).arg(&mut q.s).arg(&mut q.sum);
                    launch(&mut b, grid(r * ff / 32, 128))?;
                }
                None => {
                    let total = (r * ff) as i32;
                    let mut b = s.launch_builder(&gpu.k.silu_mul);
                    b.arg(&gu).arg(&mut g).arg(&ffi).arg(&total);
                    launch(&mut b, grid(r * ff, 256))?;
                }
            }
            l.w_down.forward(
                gpu,
                &mut DevActs::quantized_by_producer(&g, r, ff, gq),
                &mut x,
                d,
                0,
                true,
            )?;
        }

        // Logits of the rows each item asked for.
        let mut wanted = Vec::new();
        let mut picked: Vec<u32> = Vec::new();
        let mut row0 = 0;
        for it in items.iter() {
            let n = it.tokens.len();
            let rg = match it.logits {
                LogitsWanted::None => 0..0,
                LogitsWanted::Last => row0 + n - 1..row0 + n,
                LogitsWanted::All => row0..row0 + n,
            };
            picked.extend(rg.clone().map(|i| i as u32));
            wanted.push(rg);
            row0 += n;
        }
        let m = picked.len();
        let vocab = c.vocab_size;
        let mut logits = vec![0f32; m * vocab];
        let mut logits_dev = None;
        if m > 0 {
            let src = gpu.upload(&picked)?;
            let mut hn = gpu.scratch::<f32>(m * d)?;
            let w_out = self.output.as_ref().unwrap_or(&self.token_embd);
            let mut hq = quantized_for(w_out, m, d)?;
            norm(&x, Some(&src), &self.output_norm, &mut hn, m, hq.as_mut())?;
            let mut out = gpu.scratch::<f32>(m * vocab)?;
            w_out.forward(
                gpu,
                &mut DevActs::quantized_by_producer(&hn, m, d, hq),
                &mut out,
                vocab,
                0,
                false,
            )?;
            logits_dev = Some(out);
        }
        let ev1 = gpu.stream.record_event(timing).map_err(dev)?;
        let t2 = std::time::Instant::now();
        if let Some(out) = &logits_dev {
            s.memcpy_dtoh(out, &mut logits).map_err(dev)?;
        }
        let mut kv_rows = vec![0u8; c.n_layers * r * row_bytes];
        s.memcpy_dtoh(&staged, &mut kv_rows).map_err(dev)?;
        s.synchronize().map_err(dev)?;
        let t3 = std::time::Instant::now();

        // The new K/V, as stored, into the host pools, layer by layer (as the CPU forward
        // writes them): the prefix cache, KV transfers and the store read them there.
        for li in 0..c.n_layers {
            for row in 0..r {
                let kv = &kv_rows[(li * r + row) * row_bytes..][..row_bytes];
                let (k, v) = kv.split_at(row_bytes / 2);
                items[rows.item[row]].seq.write_raw(li, rows.pos[row], k, v);
            }
            layer_done(li, items);
        }
        for it in items.iter_mut() {
            let n = it.tokens.len();
            it.seq.advance(n);
        }
        {
            let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
            let mut p = self.phases.lock().expect("phases poisoned");
            p.calls += 1;
            p.prep += ms(t0, t1);
            p.launch += ms(t1, t2);
            p.device += ev0.elapsed_ms(&ev1).map_err(dev)? as f64;
            p.wait += ms(t2, t3);
            p.write_back += ms(t3, std::time::Instant::now());
        }
        if wanted.len() == 1 {
            return Ok(vec![logits]);
        }
        let mut out = Vec::with_capacity(items.len());
        let mut at = 0;
        for rg in &wanted {
            let len = rg.len() * vocab;
            out.push(logits[at..at + len].to_vec());
            at += len;
        }
        Ok(out)
    }

    /// Lays out the call's rows and brings every block they read up to date on the device.
    fn rows(&self, pools: &mut DevicePools, items: &[ForwardItem<'_>]) -> Result<Rows> {
        let c = &self.cfg;
        let hd = c.head_dim;
        let mut rows = Rows {
            item: Vec::new(),
            pos: Vec::new(),
            tokens: Vec::new(),
            slot: Vec::new(),
            pool: Vec::new(),
            tab: Vec::new(),
            ctx: Vec::new(),
            table: Vec::new(),
            cs: Vec::new(),
        };
        pools.forget_dropped();
        let mut angles = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let seq = &*it.seq;
            let bs = seq.pool().layout().block_size;
            let addr = pools.sync(&self.gpu, seq, it.tokens.len())?;
            let tab = rows.table.len() as u32;
            rows.table.extend(seq.block_table().iter().map(|b| b.0));
            let start = seq.len();
            for (p, &tok) in it.tokens.iter().enumerate() {
                let pos = start + p;
                rows.item.push(i);
                rows.pos.push(pos);
                rows.tokens.push(tok);
                rows.slot
                    .push((seq.block_table()[pos / bs].0 as usize * bs + pos % bs) as u32);
                rows.pool.push(addr);
                rows.tab.push(tab);
                rows.ctx.push(pos as u32 + 1);
                kernels::ops::rope_angles(hd, pos, c.rope_base, &mut angles);
                rows.cs.extend(angles.iter().flat_map(|&(co, si)| [co, si]));
            }
        }
        Ok(rows)
    }
}
