// Fused bf16 attention for x86 CPUs with AVX-512 BF16 (ldm.accel.cpu_kernels builds this file at first use).
//
// out = softmax(q @ k^T * scale) @ v for bf16 q, k, v, computed as ldm.accel.attention's "blocked" kernel
// computes it (fp32 scores of the bf16 inputs, an fp32 softmax, bf16 probabilities times v accumulated in fp32,
// one bf16 rounding of the output), with everything of a block of query rows in one pass through the cache:
//
//   - keys and values are first packed, per head, into the pair layout of vdpbf16ps (two bf16 of the reduced
//     dimension side by side in every 32-bit lane), so both products run as bf16 x bf16 -> fp32 dot products;
//     a product of two bf16 numbers is exact in fp32, so the scores are fp32 products of the bf16 inputs, as the
//     reference's fp32 matmul of the upcast tensors gives, up to the order of the fp32 sums;
//   - per block of G query rows: the scores of all keys (G x keys fp32, in L2), their row maxima, the
//     exponentials (2^x on a degree-5 polynomial, 8e-8 relative error) and their fp32 row sums, the
//     probabilities rounded to bf16 once, then their product with v;
//   - one OpenMP parallel region per call (torch's libgomp: the library is loaded into a process that already
//     holds it), work split over (batch x head x row block).
//
// Plain C ABI (ctypes): no torch or Python headers, so it compiles in about a second.
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <omp.h>

namespace {

typedef uint16_t bf16;

constexpr int G = 8;            // query rows per block (the QK tile's rows)
constexpr int QK_C = 3;         // 16-key vectors per QK tile (8 x 3 accumulators)
constexpr int PV_ACC = 24;      // accumulators of the PV tile (rows x 16-column vectors)

inline size_t round64(size_t n) { return (n + 63) / 64 * 64; }  // aligned_alloc wants a multiple of the alignment

inline __m512 exp2_ps(__m512 x) {
  // 2^x = 2^n * 2^f, n = round(x), f in [-0.5, 0.5]; near-minimax degree-5 polynomial for 2^f
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(0.0013266970636323094f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009675459936261177f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550742521882057f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022121727466583f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469440460205f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}

// A 32-bit lane of the reduced dimension broadcast to all 16 lanes: two bf16 (a pair) or one fp32.
inline __m512i lane_at(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

// acc += the lanes' dot products: bf16 pairs (vdpbf16ps, exact products, fp32 sums) or fp32 (fma).
template <typename T>
inline __m512 dot(__m512 acc, __m512i a, __m512i b) {
  if constexpr (sizeof(T) == 2) return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  else return _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), acc);
}

template <typename T>
inline void store_row(T* out, __m512 x, int n) {  // the first n of 16 lanes
  if constexpr (sizeof(T) == 2)
    _mm256_mask_storeu_epi16(out, (__mmask16)((1u << n) - 1u), (__m256i)_mm512_cvtneps_pbh(x));
  else _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1u), x);
}

// Elements of T per 32-bit lane: 2 for bf16 (pairs), 1 for fp32.
template <typename T>
constexpr int LANE = (int)(4 / sizeof(T));

// Scores of R query rows against C vectors of 16 keys. kp: the packed keys at this tile's first block,
// [C][P][16][LANE]; P = D / LANE; s: the rows' scores at this tile's first key; last_valid: which of the last
// vector's keys exist (the others are padding, kept out of the row maxima).
template <typename T, int R, int C>
inline void qk_tile(const T* q, int64_t q_rs, const T* kp, int P, float* s, int64_t s_ld, __m512* rowmax,
                    __mmask16 last_valid) {
  constexpr int L = LANE<T>;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int p = 0; p < P; ++p) {
    __m512i kv[C];
    for (int c = 0; c < C; ++c) kv[c] = _mm512_loadu_si512(kp + ((int64_t)c * P + p) * 16 * L);
    for (int r = 0; r < R; ++r) {
      const __m512i qb = lane_at(q + r * q_rs + L * p);
      for (int c = 0; c < C; ++c) acc[r][c] = dot<T>(acc[r][c], qb, kv[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      _mm512_storeu_ps(s + r * s_ld + c * 16, acc[r][c]);
      const __mmask16 m = c == C - 1 ? last_valid : (__mmask16)0xFFFF;
      rowmax[r] = _mm512_mask_max_ps(rowmax[r], m, rowmax[r], acc[r][c]);
    }
  }
}

template <typename T, int R>
inline void qk_rows(const T* q, int64_t q_rs, const T* kp, int P, int64_t m, float* s, int64_t s_ld,
                    __m512* rowmax) {
  constexpr int L = LANE<T>;
  const int64_t blocks = (m + 15) / 16;
  const int tail = (int)(m - (blocks - 1) * 16);
  const __mmask16 tail_mask = (__mmask16)((1u << tail) - 1u);
  int64_t b = 0;
  for (; b + QK_C <= blocks; b += QK_C)
    qk_tile<T, R, QK_C>(q, q_rs, kp + b * P * 16 * L, P, s + b * 16, s_ld, rowmax,
                        b + QK_C == blocks ? tail_mask : (__mmask16)0xFFFF);
  const int64_t left = blocks - b;
  if (left == 1) qk_tile<T, R, 1>(q, q_rs, kp + b * P * 16 * L, P, s + b * 16, s_ld, rowmax, tail_mask);
  if (left == 2) qk_tile<T, R, 2>(q, q_rs, kp + b * P * 16 * L, P, s + b * 16, s_ld, rowmax, tail_mask);
}

// R rows of probabilities (T; for bf16 pairs of keys side by side) times NV 16-column vectors of the packed
// values ([steps][dv_pad][LANE]), accumulated in fp32 and written as T.
template <typename T, int R, int NV>
inline void pv_tile(const T* pr, int64_t p_ld, const T* vp, int64_t steps, int64_t dv_pad, int col0, T* out,
                    int64_t o_rs, int dv) {
  constexpr int L = LANE<T>;
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
  const T* v = vp + col0 * L;
  for (int64_t m = 0; m < steps; ++m, v += dv_pad * L) {
    __m512i vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = _mm512_loadu_si512(v + i * 16 * L);
    for (int r = 0; r < R; ++r) {
      const __m512i pb = lane_at(pr + r * p_ld + L * m);
      for (int i = 0; i < NV; ++i) acc[r][i] = dot<T>(acc[r][i], pb, vv[i]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < NV; ++i) {
      const int col = col0 + i * 16;
      store_row<T>(out + r * o_rs + col, acc[r][i], dv - col < 16 ? dv - col : 16);
    }
  }
}

template <typename T, int R>
inline void pv_rows_r(const T* pr, int64_t p_ld, const T* vp, int64_t steps, int64_t dv_pad, T* out, int64_t o_rs,
                      int dv) {
  constexpr int NV = PV_ACC / R > 8 ? 8 : PV_ACC / R;
  const int vecs = (int)(dv_pad / 16);
  int i = 0;
  for (; i + NV <= vecs; i += NV) pv_tile<T, R, NV>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv);
  switch (vecs - i) {  // fewer vectors than a full tile (NV <= 8, so at most 7 left)
    case 1: pv_tile<T, R, 1>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv); break;
    case 2: pv_tile<T, R, 2>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv); break;
    case 3: pv_tile<T, R, 3>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv); break;
    case 4: pv_tile<T, R, 4>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv); break;
    case 5: pv_tile<T, R, 5>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv); break;
    case 6: pv_tile<T, R, 6>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv); break;
    case 7: pv_tile<T, R, 7>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv); break;
    default: break;
  }
}

// rows <= G rows of probabilities times v; the row block per tile depends on the value width
template <typename T>
inline void pv_rows(int rows, const T* pr, int64_t p_ld, const T* vp, int64_t steps, int64_t dv_pad, T* out,
                    int64_t o_rs, int dv) {
  const int vecs = (int)(dv_pad / 16);
  const int tile_rows = vecs <= 3 ? 8 : vecs <= 4 ? 6 : 4;
  int r = 0;
  for (; r + tile_rows <= rows; r += tile_rows) {
    if (tile_rows == 8) pv_rows_r<T, 8>(pr + r * p_ld, p_ld, vp, steps, dv_pad, out + r * o_rs, o_rs, dv);
    else if (tile_rows == 6) pv_rows_r<T, 6>(pr + r * p_ld, p_ld, vp, steps, dv_pad, out + r * o_rs, o_rs, dv);
    else pv_rows_r<T, 4>(pr + r * p_ld, p_ld, vp, steps, dv_pad, out + r * o_rs, o_rs, dv);
  }
  for (; r < rows; ++r) pv_rows_r<T, 1>(pr + r * p_ld, p_ld, vp, steps, dv_pad, out + r * o_rs, o_rs, dv);
}

// One block of `rows` (<= G) query rows of one head: scores, softmax, product with v. For fp32 the probabilities
// replace the scores in s (pr == s).
template <typename T>
void block(const T* q, int64_t q_rs, int rows, const T* kp, int P, int64_t m, const T* vp, int64_t m_pad,
           int64_t dv_pad, int dv, float scale, float* s, T* pr, T* out, int64_t o_rs) {
  __m512 rowmax[G];
  for (int r = 0; r < G; ++r) rowmax[r] = _mm512_set1_ps(-__builtin_inff());
  switch (rows) {
    case 8: qk_rows<T, 8>(q, q_rs, kp, P, m, s, m_pad, rowmax); break;
    case 7: qk_rows<T, 7>(q, q_rs, kp, P, m, s, m_pad, rowmax); break;
    case 6: qk_rows<T, 6>(q, q_rs, kp, P, m, s, m_pad, rowmax); break;
    case 5: qk_rows<T, 5>(q, q_rs, kp, P, m, s, m_pad, rowmax); break;
    case 4: qk_rows<T, 4>(q, q_rs, kp, P, m, s, m_pad, rowmax); break;
    case 3: qk_rows<T, 3>(q, q_rs, kp, P, m, s, m_pad, rowmax); break;
    case 2: qk_rows<T, 2>(q, q_rs, kp, P, m, s, m_pad, rowmax); break;
    default: qk_rows<T, 1>(q, q_rs, kp, P, m, s, m_pad, rowmax); break;
  }
  const float c = scale * 1.4426950408889634f;  // scale * log2(e): softmax by 2^x
  const int64_t full = m / 16;
  const int tail = (int)(m - full * 16);
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * m_pad;
    const __m512 mc = _mm512_set1_ps(_mm512_reduce_max_ps(rowmax[r]) * c);
    const __m512 cv = _mm512_set1_ps(c);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j < full * 16; j += 16) {  // the exponentials, in place of the scores, and their sum
      const __m512 e = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), cv, mc));
      sum = _mm512_add_ps(sum, e);
      _mm512_storeu_ps(sr + j, e);
    }
    if (j < m_pad) {  // the last keys, then zeros up to the padded length (the padded values are zeros too)
      const __mmask16 mk = (__mmask16)((1u << tail) - 1u);
      const __m512 e = _mm512_maskz_mov_ps(mk, exp2_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, sr + j), cv, mc)));
      sum = _mm512_add_ps(sum, e);
      _mm512_storeu_ps(sr + j, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    T* p = pr + r * m_pad;
    for (j = 0; j < m_pad; j += 16) {  // the probabilities (for bf16 rounded once, as the reference rounds them)
      const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sr + j), inv);
      if constexpr (sizeof(T) == 2) _mm256_storeu_si256((__m256i*)(p + j), (__m256i)_mm512_cvtneps_pbh(x));
      else _mm512_storeu_ps(p + j, x);
    }
  }
  pv_rows<T>(rows, pr, m_pad, vp, m_pad / LANE<T>, dv_pad, out, o_rs, dv);
}

// out = softmax(q @ k^T * scale) @ v for one element type; see the extern "C" functions.
template <typename T>
int attention(const T* q, const T* k, const T* v, T* out, int64_t B, int64_t H, int64_t N, int64_t M, int64_t D,
              int64_t Dv, const int64_t* q_st, const int64_t* k_st, const int64_t* v_st, const int64_t* o_st,
              float scale, int threads) {
  constexpr int L = LANE<T>;
  const int P = (int)(D / L);
  const int64_t m_pad = (M + 15) / 16 * 16;
  const int64_t dv_pad = (Dv + 15) / 16 * 16;
  const int64_t kv_batches = k_st[0] == 0 ? 1 : B;
  const int64_t heads_kv = kv_batches * H;
  const int64_t kp_size = m_pad * D, vp_size = m_pad * dv_pad;  // elements per head
  T* kp = (T*)std::aligned_alloc(64, round64((size_t)(heads_kv * (kp_size + vp_size)) * sizeof(T)));
  if (!kp) return -1;
  T* vp = kp + heads_kv * kp_size;
  const int64_t blocks = (N + G - 1) / G;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t hk = 0; hk < heads_kv; ++hk) {
      const int64_t b = hk / H, h = hk % H;
      const T* kh = k + b * k_st[0] + h * k_st[1];
      const T* vh = v + b * v_st[0] + h * v_st[1];
      T* kd = kp + hk * kp_size;  // [m_pad / 16][P][16][L]
      for (int64_t j = 0; j < m_pad; ++j) {
        const T* row = kh + j * k_st[2];
        T* dst = kd + (j / 16) * P * 16 * L + (j % 16) * L;
        for (int p = 0; p < P; ++p)
          for (int l = 0; l < L; ++l) dst[p * 16 * L + l] = j < M ? row[L * p + l] : T(0);
      }
      T* vd = vp + hk * vp_size;  // [m_pad / L][dv_pad][L]
      for (int64_t j = 0; j < m_pad; ++j) {
        const T* row = vh + j * v_st[2];
        T* dst = vd + (j / L) * dv_pad * L + (j % L);
        for (int64_t c = 0; c < dv_pad; ++c) dst[c * L] = (j < M && c < Dv) ? row[c] : T(0);
      }
    }
    float* s = (float*)std::aligned_alloc(64, round64((size_t)(G * m_pad) * sizeof(float)));
    T* pr = sizeof(T) == 4 ? (T*)s : (T*)std::aligned_alloc(64, round64((size_t)(G * m_pad) * sizeof(T)));
    if (!s || !pr) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * H * blocks; ++t) {
        const int64_t bh = t / blocks, i0 = (t % blocks) * G;
        const int64_t b = bh / H, h = bh % H;
        const int64_t hk = (kv_batches == 1 ? 0 : b) * H + h;
        const int rows = (int)(N - i0 < G ? N - i0 : G);
        block<T>(q + b * q_st[0] + h * q_st[1] + i0 * q_st[2], q_st[2], rows, kp + hk * kp_size, P, M,
                 vp + hk * vp_size, m_pad, dv_pad, (int)Dv, scale, s, pr, out + b * o_st[0] + h * o_st[1] + i0 * o_st[2],
                 o_st[2]);
      }
    }
    if ((void*)pr != (void*)s) std::free(pr);
    std::free(s);
  }
  std::free(kp);
  return failed ? -1 : 0;
}

}  // namespace

extern "C" {

int ldm_attention_version(void) { return 2; }

// q: [B, H, N, D], k: [Bk, H, M, D], v: [Bk, H, M, Dv], out: [B, H, N, Dv], each with its own strides in elements
// (batch, head, row; the last dimension contiguous); Bk is B or 1 (a batch stride of 0 broadcasts). bf16: D even.
// Returns 0, or -1 when memory for the packed keys and values or the blocks could not be had.
int ldm_attention_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int64_t B, int64_t H, int64_t N,
                       int64_t M, int64_t D, int64_t Dv, const int64_t* q_st, const int64_t* k_st,
                       const int64_t* v_st, const int64_t* o_st, float scale, int threads) {
  return attention<bf16>(q, k, v, out, B, H, N, M, D, Dv, q_st, k_st, v_st, o_st, scale, threads);
}

int ldm_attention_f32(const float* q, const float* k, const float* v, float* out, int64_t B, int64_t H, int64_t N,
                      int64_t M, int64_t D, int64_t Dv, const int64_t* q_st, const int64_t* k_st,
                      const int64_t* v_st, const int64_t* o_st, float scale, int threads) {
  return attention<float>(q, k, v, out, B, H, N, M, D, Dv, q_st, k_st, v_st, o_st, scale, threads);
}

}  // extern "C"
