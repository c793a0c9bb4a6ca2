// Tandem's CUDA kernels, compiled with NVRTC when a model loads (HD, the head dimension, and
// KV_F16, the KV storage, are defined then), with --fmad=false: a product and a sum are
// rounded as the CPU rounds them, and fmaf is written out where the CPU fuses.
//
// Every output is computed in an order that depends only on the shapes of the model, never on
// how many rows the call has: outputs are batch-invariant. Each kernel of the quantized path
// reproduces the CPU's definition step for step — the matmul (exact integer block sums, then
// fmaf over blocks in order), the activation quantization, RMSNorm, RoPE (the host's angles),
// SiLU and attention (the CPU's exp, its summation orders) — so the w4a8 path computes the
// CPU's bits. The f32 path's matmul sums in its own order (within 1e-3 of the CPU's logits).

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

#if KV_F16
typedef u16 kv_t;
#else
typedef float kv_t;
#endif

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float kv_load(const kv_t* p) {
#if KV_F16
    return h2f(*p);
#else
    return *p;
#endif
}

// v in the pool's format.
__device__ __forceinline__ kv_t kv_of(float v) {
#if KV_F16
    return f2h(v);
#else
    return v;
#endif
}

// kernels::round_half_away.
__device__ __forceinline__ float round_half_away(float x) {
    float a = fabsf(x);
    float t = (float)(int)a;
    float r = t + ((a - t >= 0.5f) ? 1.0f : 0.0f);
    return copysignf(r, x);
}

// Block b of 32 values: kernels::actq::quantize_scalar, then s = d·Σq.
__device__ void quantize_block(const float* x, i8* q, float* d, float* s, int* sum, size_t b) {
    const float* xb = x + b * 32;
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
    float sc = amax / 127.0f;
    float inv = sc > 0.0f ? 1.0f / sc : 0.0f;
    int total = 0;
    for (int i = 0; i < 32; i++) {
        float v = fminf(fmaxf(xb[i] * inv, -127.0f), 127.0f);
        int qi = (int)round_half_away(v);
        q[(size_t)b * 32 + i] = (i8)qi;
        total += qi;
    }
    d[b] = sc;
    s[b] = sc * (float)total;
    sum[b] = total;
}

// One thread per block of 32 values.
extern "C" __global__ void quantize(const float* x, i8* q, float* d, float* s, int* sum, int blocks) {
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b < blocks) quantize_block(x, q, d, s, sum, b);
}

// One row per block. kernels::ops::rms_norm: Σx² over 16 lane accumulators (dot_scalar), a
// halving tree, the tail; then (x · scale) · w. `src`, when not null, picks the input rows.
// With `q` not null, each row's output is quantized too (the next matmul's input).
extern "C" __global__ void rms_norm(const float* x, const u32* src, const float* w, float* out,
                                    int d, float eps, i8* q, float* qd, float* qs, int* qsum) {
    __shared__ float lanes[16];
    __shared__ float scale;
    int r = blockIdx.x;
    const float* xr = x + (size_t)(src ? src[r] : r) * d;
    int full = d / 16 * 16;
    if (threadIdx.x < 16) {
        float acc = 0.0f;
        for (int i = threadIdx.x; i < full; i += 16) acc += xr[i] * xr[i];
        lanes[threadIdx.x] = acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w2 = 8; w2 >= 1; w2 /= 2)
            for (int l = 0; l < w2; l++) lanes[l] += lanes[l + w2];
        float s = lanes[0];
        for (int i = full; i < d; i++) s += xr[i] * xr[i];
        scale = 1.0f / sqrtf(s / (float)d + eps);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[(size_t)r * d + i] = (xr[i] * scale) * w[i];
    if (q) {
        __syncthreads();
        int nb = d / 32;
        for (int b = threadIdx.x; b < nb; b += blockDim.x) quantize_block(out, q, qd, qs, qsum, (size_t)r * nb + b);
    }
}

#define RT 8

// A block's 32 integer weights as 8 words of 4 bytes, in input order (Q4: nibbles 0…15, then
// 16…31 — byte e holds inputs e, low, and 16 + e, high, as in ggml; Q8_0: the signed bytes).
template <int FMT>
__device__ __forceinline__ void block_weights(const u8* q, int wv[8]) {
    if (FMT == 2) {
        const uint4* p = (const uint4*)q;
        uint4 lo = p[0], hi = p[1];
        wv[0] = lo.x; wv[1] = lo.y; wv[2] = lo.z; wv[3] = lo.w;
        wv[4] = hi.x; wv[5] = hi.y; wv[6] = hi.z; wv[7] = hi.w;
    } else {
        uint4 v = *(const uint4*)q;
        wv[0] = v.x & 0x0F0F0F0F; wv[1] = v.y & 0x0F0F0F0F;
        wv[2] = v.z & 0x0F0F0F0F; wv[3] = v.w & 0x0F0F0F0F;
        wv[4] = (v.x >> 4) & 0x0F0F0F0F; wv[5] = (v.y >> 4) & 0x0F0F0F0F;
        wv[6] = (v.z >> 4) & 0x0F0F0F0F; wv[7] = (v.w >> 4) & 0x0F0F0F0F;
    }
}

// The exact integer sum Σ w·a of one block: the weights' 8 words against activation block ab
// (Q4_0's stored nibbles exceed the weights by 8: 8·Σa is taken off).
template <int FMT>
__device__ __forceinline__ int block_isum(const int wv[8], const i8* aq, const int* asum, size_t ab) {
    const int* a = (const int*)(aq + ab * 32);
    int isum = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) isum = __dp4a(wv[j], a[j], isum);
    if (FMT == 0) isum -= 8 * asum[ab];
    return isum;
}

// y[r, col0 + n] (+)= Σ_k x[r, k] · W[n, k] over blocks of 32, W in a GGML block format laid
// out block-major ([block][n]: qs, then d, then m), x quantized per block. Thread n of the
// grid's x, rows RT at a time in the grid's y. kernels::qmatmul's scalar definition exactly.
template <int FMT>
__device__ void mm_q(const u8* w, const i8* aq, const float* ad, const float* as, const int* asum,
                     float* y, int R, int N, int K, int ldy, int col0, int add) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    int r0 = blockIdx.y * RT;
    int rows = min(RT, R - r0);
    int nb = K / 32;
    const int qbytes = FMT == 2 ? 32 : 16;
    const u8* qs = w;
    const u16* wd = (const u16*)(w + (size_t)nb * N * qbytes);
    const u16* wm = wd + (size_t)nb * N;
    float acc[RT];
#pragma unroll
    for (int i = 0; i < RT; i++) acc[i] = 0.0f;
    for (int b = 0; b < nb; b++) {
        int wv[8];
        block_weights<FMT>(qs + ((size_t)b * N + n) * qbytes, wv);
        float dw = h2f(wd[(size_t)b * N + n]);
        float mw = FMT == 1 ? h2f(wm[(size_t)b * N + n]) : 0.0f;
#pragma unroll
        for (int i = 0; i < RT; i++) {
            if (i < rows) {
                size_t ab = (size_t)(r0 + i) * nb + b;
                int isum = block_isum<FMT>(wv, aq, asum, ab);
                acc[i] = fmaf((float)isum, dw * ad[ab], acc[i]);
                if (FMT == 1) acc[i] = fmaf(mw, as[ab], acc[i]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RT; i++) {
        if (i < rows) {
            float* o = y + (size_t)(r0 + i) * ldy + col0 + n;
            *o = add ? *o + acc[i] : acc[i];
        }
    }
}

extern "C" __global__ void mm_q4_0(const u8* w, const i8* aq, const float* ad, const float* as,
                                   const int* asum, float* y, int R, int N, int K, int ldy, int col0, int add) {
    mm_q<0>(w, aq, ad, as, asum, y, R, N, K, ldy, col0, add);
}
extern "C" __global__ void mm_q4_1(const u8* w, const i8* aq, const float* ad, const float* as,
                                   const int* asum, float* y, int R, int N, int K, int ldy, int col0, int add) {
    mm_q<1>(w, aq, ad, as, asum, y, R, N, K, ldy, col0, add);
}
extern "C" __global__ void mm_q8_0(const u8* w, const i8* aq, const float* ad, const float* as,
                                   const int* asum, float* y, int R, int N, int K, int ldy, int col0, int add) {
    mm_q<2>(w, aq, ad, as, asum, y, R, N, K, ldy, col0, add);
}

// The same arithmetic for few rows (decode): a warp per output channel, its lanes computing
// the blocks' exact integer sums in parallel, then every lane running the CPU's fmaf chain over
// the blocks in order on values passed by shuffles (the same bits as mm_q, faster when the
// grid would be small). W row-major: [n][block] qs, then d, then m.
template <int FMT>
__device__ void mm_qw(const u8* w, const i8* aq, const float* ad, const float* as, const int* asum,
                      float* y, int R, int N, int K, int ldy, int col0, int add) {
    int lane = threadIdx.x & 31;
    int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    int r0 = blockIdx.y * RT;
    int rows = min(RT, R - r0);
    int nb = K / 32;
    const int qbytes = FMT == 2 ? 32 : 16;
    const u8* qs = w + (size_t)n * nb * qbytes;
    const u16* wd = (const u16*)(w + (size_t)N * nb * qbytes) + (size_t)n * nb;
    const u16* wm = (const u16*)(w + (size_t)N * nb * qbytes) + (size_t)N * nb + (size_t)n * nb;
    float acc[RT];
#pragma unroll
    for (int i = 0; i < RT; i++) acc[i] = 0.0f;
    for (int b0 = 0; b0 < nb; b0 += 32) {
        int b = b0 + lane;
        float t1[RT], t2[RT], t4[RT];
        float mw = 0.0f;
#pragma unroll
        for (int i = 0; i < RT; i++) { t1[i] = 0.0f; t2[i] = 0.0f; t4[i] = 0.0f; }
        if (b < nb) {
            int wv[8];
            block_weights<FMT>(qs + (size_t)b * qbytes, wv);
            float dw = h2f(wd[b]);
            mw = FMT == 1 ? h2f(wm[b]) : 0.0f;
#pragma unroll
            for (int i = 0; i < RT; i++) {
                if (i < rows) {
                    size_t ab = (size_t)(r0 + i) * nb + b;
                    t1[i] = (float)block_isum<FMT>(wv, aq, asum, ab);
                    t2[i] = dw * ad[ab];
                    t4[i] = as[ab];
                }
            }
        }
        int cnt = min(32, nb - b0);
        for (int j = 0; j < cnt; j++) {
            float mwj = __shfl_sync(0xffffffff, mw, j);
#pragma unroll
            for (int i = 0; i < RT; i++) {
                if (i < rows) {
                    float x1 = __shfl_sync(0xffffffff, t1[i], j);
                    float x2 = __shfl_sync(0xffffffff, t2[i], j);
                    acc[i] = fmaf(x1, x2, acc[i]);
                    if (FMT == 1) acc[i] = fmaf(mwj, __shfl_sync(0xffffffff, t4[i], j), acc[i]);
                }
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < RT; i++) {
            if (i < rows) {
                float* o = y + (size_t)(r0 + i) * ldy + col0 + n;
                *o = add ? *o + acc[i] : acc[i];
            }
        }
    }
}

extern "C" __global__ void mmw_q4_0(const u8* w, const i8* aq, const float* ad, const float* as,
                                    const int* asum, float* y, int R, int N, int K, int ldy, int col0, int add) {
    mm_qw<0>(w, aq, ad, as, asum, y, R, N, K, ldy, col0, add);
}
extern "C" __global__ void mmw_q4_1(const u8* w, const i8* aq, const float* ad, const float* as,
                                    const int* asum, float* y, int R, int N, int K, int ldy, int col0, int add) {
    mm_qw<1>(w, aq, ad, as, asum, y, R, N, K, ldy, col0, add);
}
extern "C" __global__ void mmw_q8_0(const u8* w, const i8* aq, const float* ad, const float* as,
                                    const int* asum, float* y, int R, int N, int K, int ldy, int col0, int add) {
    mm_qw<2>(w, aq, ad, as, asum, y, R, N, K, ldy, col0, add);
}

// The f32 reference path: W stored [k][n] (so a warp reads consecutive n), sequential fmaf
// over k per output.
extern "C" __global__ void mm_f32(const float* w, const float* x, float* y, int R, int N, int K,
                                  int ldy, int col0, int add) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    int r0 = blockIdx.y * RT;
    int rows = min(RT, R - r0);
    float acc[RT];
#pragma unroll
    for (int i = 0; i < RT; i++) acc[i] = 0.0f;
    for (int k = 0; k < K; k++) {
        float wk = w[(size_t)k * N + n];
#pragma unroll
        for (int i = 0; i < RT; i++)
            if (i < rows) acc[i] = fmaf(x[(size_t)(r0 + i) * K + k], wk, acc[i]);
    }
#pragma unroll
    for (int i = 0; i < RT; i++) {
        if (i < rows) {
            float* o = y + (size_t)(r0 + i) * ldy + col0 + n;
            *o = add ? *o + acc[i] : acc[i];
        }
    }
}

// Token embeddings: row tok[r] of a table in the matmul layout, dequantized as
// kernels::quant does (fmt 0 Q4_0, 1 Q4_1, 2 Q8_0, 3 f32 stored [k][n]).
extern "C" __global__ void embed(const u8* w, int fmt, const u32* tok, float* x, int N, int K) {
    int r = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= K) return;
    u32 t = tok[r];
    float v;
    if (fmt == 3) {
        v = ((const float*)w)[(size_t)i * N + t];
    } else {
        int nb = K / 32, b = i / 32, e = i % 32;
        int qbytes = fmt == 2 ? 32 : 16;
        const u8* blk = w + ((size_t)b * N + t) * qbytes;
        const u16* wd = (const u16*)(w + (size_t)nb * N * qbytes);
        float d = h2f(wd[(size_t)b * N + t]);
        if (fmt == 2) {
            v = (float)(int)(i8)blk[e] * d;
        } else {
            int q = e < 16 ? (blk[e] & 15) : (blk[e - 16] >> 4);
            if (fmt == 0) {
                v = (float)(q - 8) * d;
            } else {
                float m = h2f((wd + (size_t)nb * N)[(size_t)b * N + t]);
                v = (float)q * d + m;
            }
        }
    }
    x[(size_t)r * K + i] = v;
}

// RoPE (llama.cpp's adjacent pairs, the host's angles: cs[r][pair] = (cos, sin)) on the Q and K
// columns of each row of `qkv`, then K and V written into the row's slot of the KV pool of
// layer `layer` (the CPU pool's layout: K transposed, V by position) and, as stored, into
// `staged` ([row][K | V][kvd] in the pool's format, what the host copies back into its pool).
extern "C" __global__ void rope_store(float* qkv, const float* cs, const u64* pool, const u32* slot,
                                      kv_t* staged, int d, int kvd, int layer, int n_layers,
                                      int plane, int bs) {
    int r = blockIdx.y;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    int width = d + 2 * kvd;
    float* row = qkv + (size_t)r * width;
    const float* c = cs + (size_t)r * HD;
    int q_pairs = d / 2, k_pairs = kvd / 2;
    kv_t* base = (kv_t*)pool[r];
    u32 s = slot[r];
    size_t blk = s / bs, p = s % bs;
    kv_t* kplane = base + ((blk * n_layers + layer) * 2) * (size_t)plane;
    kv_t* vplane = kplane + plane;
    if (t < q_pairs + k_pairs) {
        int pair = t < q_pairs ? t : t - q_pairs;
        float* x = t < q_pairs ? row : row + d;
        int i = (pair * 2) % HD / 2;
        float cos_ = c[2 * i], sin_ = c[2 * i + 1];
        float a = x[2 * pair], b = x[2 * pair + 1];
        float ra = a * cos_ - b * sin_;
        float rb = a * sin_ + b * cos_;
        x[2 * pair] = ra;
        x[2 * pair + 1] = rb;
        if (t >= q_pairs) {
            for (int j = 0; j < 2; j++) {
                int col = 2 * pair + j;  // = h·HD + dim
                kv_t v = kv_of(j ? rb : ra);
                kplane[(size_t)col * bs + p] = v;
                staged[(size_t)r * 2 * kvd + col] = v;
            }
        }
    } else if (t < q_pairs + k_pairs + kvd) {
        int col = t - q_pairs - k_pairs;
        kv_t v = kv_of(row[d + kvd + col]);
        vplane[p * kvd + col] = v;
        staged[(size_t)r * 2 * kvd + kvd + col] = v;
    }
}

// kernels::simd::exp: a range reduction by 2^n and a degree-6 polynomial, fmaf where it fuses.
__device__ __forceinline__ float cpu_exp(float x) {
    const float MAGIC = 12582912.0f;
    x = x > -87.0f ? x : -87.0f;
    float t = fmaf(x, 1.44269504088896341f, MAGIC);
    float n = t - MAGIC;
    float r = fmaf(n, -0.6933594f, x);
    r = fmaf(n, 2.1219444e-4f, r);
    float p = 1.9875691e-4f;
    p = fmaf(p, r, 1.3981999e-3f);
    p = fmaf(p, r, 8.333452e-3f);
    p = fmaf(p, r, 4.1665796e-2f);
    p = fmaf(p, r, 1.6666665e-1f);
    p = fmaf(p, r, 0.5f);
    float y = fmaf(p, r * r, r) + 1.0f;
    return y * __int_as_float(((int)n + 127) << 23);
}

// Causal attention of one row and one query head per block, kernels::attention's definition:
// s[p] = (Σ_d fmaf over d in order) · scale; m = max s; e[p] = exp(s[p] − m);
// z = the 16-lane sums of e (lane p mod 16, in order), halving tree; out[d] = (Σ_p fmaf(e[p],
// v[p][d]) in order) · (1/z). Positions in parallel for the scores, dimensions for the sums.
// `table` holds every sequence's block ids (the row's start at tab[r]); ctx[r] positions are
// visible. Dynamic shared memory: a float per position and a block id per block of `max_ctx`.
extern "C" __global__ void attention(const float* qkv, const u64* pool, const u32* table,
                                     const u32* tab, const u32* ctx, float* out, int n_heads,
                                     int n_kv_heads, int layer, int n_layers, int plane, int bs,
                                     float scale, int max_ctx) {
    extern __shared__ float e[];
    __shared__ float red[32];
    __shared__ float lanes[16];
    int r = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, nt = blockDim.x;
    int d = n_heads * HD, kvd = n_kv_heads * HD;
    int kvh = h / (n_heads / n_kv_heads);
    const float* qr = qkv + (size_t)r * (d + 2 * kvd) + h * HD;
    float q[HD];
#pragma unroll
    for (int i = 0; i < HD; i++) q[i] = qr[i];
    const kv_t* base = (const kv_t*)pool[r];
    const u32* blocks = table + tab[r];
    int n = ctx[r];
    // The row's block ids, after the scores (dynamic shared memory: e[max_ctx], then ids).
    u32* sblk = (u32*)(e + max_ctx);
    for (int i = tid; i < (n + bs - 1) / bs; i += nt) sblk[i] = blocks[i];
    float mx = NEG_INF;
    for (int t = tid; t < n; t += nt) {
        size_t blk = blocks[t / bs], p = t % bs;
        const kv_t* kp = base + ((blk * n_layers + layer) * 2) * (size_t)plane + (size_t)kvh * HD * bs + p;
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < HD; i++) acc = fmaf(q[i], kv_load(kp + (size_t)i * bs), acc);
        float s = acc * scale;
        e[t] = s;
        mx = s > mx ? s : mx;
    }
    for (int o = 16; o >= 1; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    if ((tid & 31) == 0) red[tid / 32] = mx;
    __syncthreads();
    if (tid == 0) {
        float m = red[0];
        for (int w = 1; w < nt / 32; w++) m = fmaxf(m, red[w]);
        red[0] = m;
    }
    __syncthreads();
    float m = red[0];
    for (int t = tid; t < n; t += nt) e[t] = cpu_exp(e[t] - m);
    __syncthreads();
    if (tid < 16) {
        float z = 0.0f;
        for (int t = tid; t < n; t += 16) z += e[t];
        lanes[tid] = z;
    }
    __syncthreads();
    if (tid == 0) {
        for (int w2 = 8; w2 >= 1; w2 /= 2)
            for (int l = 0; l < w2; l++) lanes[l] += lanes[l + w2];
        red[1] = 1.0f / lanes[0];
    }
    __syncthreads();
    float inv = red[1];
    for (int i = tid; i < HD; i += nt) {
        const kv_t* vb = base + (size_t)kvh * HD + i;
        float acc = 0.0f;
        int t = 0;
        // Eight positions' values loaded together (independent loads overlap), then summed in
        // order: the same fmaf chain as one at a time.
        for (; t + 8 <= n; t += 8) {
            float vv[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                size_t blk = sblk[(t + u) / bs], p = (t + u) % bs;
                vv[u] = kv_load(vb + ((blk * n_layers + layer) * 2 + 1) * (size_t)plane + p * kvd);
            }
#pragma unroll
            for (int u = 0; u < 8; u++) acc = fmaf(e[t + u], vv[u], acc);
        }
        for (; t < n; t++) {
            size_t blk = sblk[t / bs], p = t % bs;
            acc = fmaf(e[t], kv_load(vb + ((blk * n_layers + layer) * 2 + 1) * (size_t)plane + p * kvd), acc);
        }
        out[(size_t)r * d + h * HD + i] = acc * inv;
    }
}

// g[r][i] = silu(gu[r][i]) · gu[r][ff + i], kernels::ops::silu_mul: e = exp(min(x, −x)),
// s = 1/(1 + e), σ = e·s below 0 else s, (x·σ)·u.
__device__ __forceinline__ float silu_times(float x, float u) {
    float nx = 0.0f - x;
    float e = cpu_exp(x < nx ? x : nx);
    float s = 1.0f / (1.0f + e);
    float sig = x < 0.0f ? e * s : s;
    return (x * sig) * u;
}

extern "C" __global__ void silu_mul(const float* gu, float* g, int ff, int total) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    int r = t / ff, i = t % ff;
    g[t] = silu_times(gu[(size_t)r * 2 * ff + i], gu[(size_t)r * 2 * ff + ff + i]);
}

// The same, a thread per block of 32 outputs, quantized as they are made (ff a multiple of 32).
extern "C" __global__ void silu_mul_q(const float* gu, float* g, int ff, int blocks, i8* q,
                                      float* qd, float* qs, int* qsum) {
    int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    int nb = ff / 32, r = b / nb, i0 = b % nb * 32;
    for (int i = i0; i < i0 + 32; i++)
        g[(size_t)r * ff + i] = silu_times(gu[(size_t)r * 2 * ff + i], gu[(size_t)r * 2 * ff + ff + i]);
    quantize_block(g, q, qd, qs, qsum, b);
}
