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

template <typename T>
inline void store16(T* p, __m512 x) {  // all 16 lanes
  if constexpr (sizeof(T) == 2) _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(x));
  else _mm512_storeu_ps(p, x);
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
                    int64_t o_rs, int dv, float* o32) {
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
      if (o32) store_row<float>(o32 + r * dv + col, acc[r][i], dv - col < 16 ? dv - col : 16);
    }
  }
}

template <typename T, int R>
inline void pv_rows_r(const T* pr, int64_t p_ld, const T* vp, int64_t steps, int64_t dv_pad, T* out, int64_t o_rs,
                      int dv, float* o32) {
  constexpr int NV = PV_ACC / R > 8 ? 8 : PV_ACC / R;
  const int vecs = (int)(dv_pad / 16);
  int i = 0;
  for (; i + NV <= vecs; i += NV) pv_tile<T, R, NV>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv, o32);
  switch (vecs - i) {  // fewer vectors than a full tile (NV <= 8, so at most 7 left)
    case 1: pv_tile<T, R, 1>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv, o32); break;
    case 2: pv_tile<T, R, 2>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv, o32); break;
    case 3: pv_tile<T, R, 3>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv, o32); break;
    case 4: pv_tile<T, R, 4>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv, o32); break;
    case 5: pv_tile<T, R, 5>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv, o32); break;
    case 6: pv_tile<T, R, 6>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv, o32); break;
    case 7: pv_tile<T, R, 7>(pr, p_ld, vp, steps, dv_pad, i * 16, out, o_rs, dv, o32); break;
    default: break;
  }
}

// rows <= G rows of probabilities times v; the row block per tile depends on the value width
template <typename T>
inline void pv_rows(int rows, const T* pr, int64_t p_ld, const T* vp, int64_t steps, int64_t dv_pad, T* out,
                    int64_t o_rs, int dv, float* o32) {
  const int vecs = (int)(dv_pad / 16);
  const int tile_rows = vecs <= 3 ? 8 : vecs <= 4 ? 6 : 4;
  int r = 0;
  for (; r + tile_rows <= rows; r += tile_rows) {
    if (tile_rows == 8) pv_rows_r<T, 8>(pr + r * p_ld, p_ld, vp, steps, dv_pad, out + r * o_rs, o_rs, dv, o32 ? o32 + r * dv : nullptr);
    else if (tile_rows == 6) pv_rows_r<T, 6>(pr + r * p_ld, p_ld, vp, steps, dv_pad, out + r * o_rs, o_rs, dv, o32 ? o32 + r * dv : nullptr);
    else pv_rows_r<T, 4>(pr + r * p_ld, p_ld, vp, steps, dv_pad, out + r * o_rs, o_rs, dv, o32 ? o32 + r * dv : nullptr);
  }
  for (; r < rows; ++r) pv_rows_r<T, 1>(pr + r * p_ld, p_ld, vp, steps, dv_pad, out + r * o_rs, o_rs, dv, o32 ? o32 + r * dv : nullptr);
}

// One block of `rows` (<= G) query rows of one head: scores, softmax, product with v. For fp32 the probabilities
// replace the scores in s (pr == s).
template <typename T>
void block(const T* q, int64_t q_rs, int rows, const T* kp, int P, int64_t m, const T* vp, int64_t m_pad,
           int64_t dv_pad, int dv, float scale, float* s, T* pr, T* out, int64_t o_rs, float* lse, float* o32) {
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
    const float total = _mm512_reduce_add_ps(sum);
    if (lse) lse[r] = _mm512_reduce_max_ps(rowmax[r]) * c + __builtin_log2f(total);  // P = 2^(s c - lse)
    const __m512 inv = _mm512_set1_ps(1.0f / total);
    T* p = pr + r * m_pad;
    for (j = 0; j < m_pad; j += 16) {  // the probabilities (for bf16 rounded once, as the reference rounds them)
      store16(p + j, _mm512_mul_ps(_mm512_loadu_ps(sr + j), inv));
    }
  }
  pv_rows<T>(rows, pr, m_pad, vp, m_pad / LANE<T>, dv_pad, out, o_rs, dv, o32);
}

// out = softmax(q @ k^T * scale) @ v for one element type; see the extern "C" functions.
template <typename T>
int attention(const T* q, const T* k, const T* v, T* out, int64_t B, int64_t H, int64_t N, int64_t M, int64_t D,
              int64_t Dv, const int64_t* q_st, const int64_t* k_st, const int64_t* v_st, const int64_t* o_st,
              float scale, int threads, float* lse, float* o32) {
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
                 o_st[2], lse ? lse + bh * N + i0 : nullptr, o32 ? o32 + (bh * N + i0) * Dv : nullptr);
      }
    }
    if ((void*)pr != (void*)s) std::free(pr);
    std::free(s);
  }
  std::free(kp);
  return failed ? -1 : 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Backward (bf16 and fp32), flash-attention style: per head, key blocks outer, query blocks inner; every product is
// the microkernel below, acc[r][c] (+)= sum_p A[r][lane p] . B[lane p][vector c], with A row-major (bf16: pairs of
// the reduced dimension in a 32-bit lane) and B packed in 32-bit lanes (two bf16 or one fp32).
//
//   S^T = K_j q^T (keys x queries)            P^T = 2^(S^T c - lse)            dP^T = V_j dO^T
//   dS^T = scale P^T (dP^T - rowsum(dO o O))  dV_j += P^T dO    dK_j += dS^T q    dQ^T += K_j^T dS^T
//
// So the probabilities and their gradient are made with the queries in the lanes and are never transposed; dQ is
// accumulated transposed ([D][N] fp32) and written out at the end. In bf16, P is rounded to bf16 for dV (as the
// forward's product with v rounds it) and dS for dK and dQ (as FlashAttention-2 does on GPUs; the reference keeps
// dS in fp32: splitting it into two bf16 parts for ~16 bits cost 32% more time, for gradients 1.0-1.5x closer to
// fp64's); sums are fp32. rowsum(dO o O) is taken of the forward's fp32 output.

constexpr int QB = 64;  // queries per block (4 vectors of 16)
constexpr int KB = 32;  // keys per block

template <typename T, int R, int C, bool LOAD>
inline void mk(const T* A, int64_t lda, const T* B, int64_t sp, int64_t sc, int P, float* out, int64_t ldc) {
  constexpr int L = LANE<T>;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = LOAD ? _mm512_loadu_ps(out + r * ldc + c * 16) : _mm512_setzero_ps();
  for (int p = 0; p < P; ++p) {
    __m512i b[C];
    for (int c = 0; c < C; ++c) b[c] = _mm512_loadu_si512(B + p * sp + c * sc);
    for (int r = 0; r < R; ++r) {
      const __m512i a = lane_at(A + r * lda + L * p);
      for (int c = 0; c < C; ++c) acc[r][c] = dot<T>(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * ldc + c * 16, acc[r][c]);
}

template <typename T, int C, bool LOAD>
inline void mk_rows(int rows, const T* A, int64_t lda, const T* B, int64_t sp, int64_t sc, int P, float* out,
                    int64_t ldc) {
  constexpr int R = 24 / C > 8 ? 8 : 24 / C;
  int r = 0;
  for (; r + R <= rows; r += R) mk<T, R, C, LOAD>(A + r * lda, lda, B, sp, sc, P, out + r * ldc, ldc);
  const T* a = A + r * lda;
  float* o = out + r * ldc;
  switch (rows - r) {
    case 1: mk<T, 1, C, LOAD>(a, lda, B, sp, sc, P, o, ldc); break;
    case 2: mk<T, 2, C, LOAD>(a, lda, B, sp, sc, P, o, ldc); break;
    case 3: mk<T, 3, C, LOAD>(a, lda, B, sp, sc, P, o, ldc); break;
    case 4: mk<T, 4, C, LOAD>(a, lda, B, sp, sc, P, o, ldc); break;
    case 5: mk<T, 5, C, LOAD>(a, lda, B, sp, sc, P, o, ldc); break;
    case 6: mk<T, 6, C, LOAD>(a, lda, B, sp, sc, P, o, ldc); break;
    case 7: mk<T, 7, C, LOAD>(a, lda, B, sp, sc, P, o, ldc); break;
    default: break;
  }
}

// out[rows][vecs * 16] (+)= A B over P lanes of the reduced dimension; B's 16-lane vectors taken 4 at a time
template <typename T, bool LOAD>
inline void gemm(int rows, int vecs, const T* A, int64_t lda, const T* B, int64_t sp, int64_t sc, int P, float* out,
                 int64_t ldc) {
  int v = 0;
  for (; v + 4 <= vecs; v += 4) mk_rows<T, 4, LOAD>(rows, A, lda, B + v * sc, sp, sc, P, out + v * 16, ldc);
  switch (vecs - v) {
    case 1: mk_rows<T, 1, LOAD>(rows, A, lda, B + v * sc, sp, sc, P, out + v * 16, ldc); break;
    case 2: mk_rows<T, 2, LOAD>(rows, A, lda, B + v * sc, sp, sc, P, out + v * 16, ldc); break;
    case 3: mk_rows<T, 3, LOAD>(rows, A, lda, B + v * sc, sp, sc, P, out + v * 16, ldc); break;
    default: break;
  }
}

inline float to_float(bf16 x) {
  const uint32_t u = (uint32_t)x << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(float x) { return x; }

template <typename T>
inline T from_float(float x) {
  if constexpr (sizeof(T) == 4) {
    return x;
  } else {  // round to nearest even, as vcvtneps2bf16
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  // NaN stays NaN
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

struct Strides {
  const int64_t* st;
  int64_t at(int64_t b, int64_t h) const { return b * st[0] + h * st[1]; }
};

template <typename T>
int attention_backward(const T* q, const T* k, const T* v, const float* o, const T* dout, const float* lse, T* dq,
                       T* dk, T* dv, int64_t B, int64_t H, int64_t N, int64_t M, int64_t D, int64_t Dv,
                       const int64_t* q_st, const int64_t* k_st, const int64_t* v_st, const int64_t* o_st,
                       const int64_t* do_st, const int64_t* dq_st, const int64_t* dk_st, const int64_t* dv_st,
                       float scale, int threads) {
  const int64_t n_pad = (N + QB - 1) / QB * QB, m_pad = (M + KB - 1) / KB * KB;
  const int64_t d_pad = (D + 15) / 16 * 16, dv_pad = (Dv + 15) / 16 * 16;
  constexpr int L = LANE<T>;
  const int Pd = (int)(D / L), Pv = (int)(Dv / L);
  const float c = scale * 1.4426950408889634f;
  // per-thread buffers, in T and fp32 elements
  const size_t n16 = (size_t)(n_pad * D            // q, lanes: [n_pad / 16][Pd][16][L]
                              + n_pad * Dv         // dO, lanes
                              + n_pad * d_pad      // q, columns: [n_pad / L][d_pad][L]
                              + n_pad * dv_pad     // dO, columns
                              + m_pad * D          // K rows (zero-padded keys)
                              + m_pad * Dv         // V rows
                              + D * m_pad          // K^T rows: [D][m_pad]
                              + 3 * KB * QB);      // P^T, dS^T (rows), dS^T (bf16: key pairs interleaved)
  const size_t n32 = (size_t)(2 * n_pad            // lse, rowsum(dO o O)
                              + 2 * KB * QB        // S^T, dP^T
                              + KB * dv_pad + KB * d_pad  // dV_j, dK_j
                              + D * n_pad);        // dQ^T
  int failed = 0;
  alignas(64) static const int16_t interleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i ilv = _mm512_load_si512(interleave);
#pragma omp parallel num_threads(threads)
  {
    T* b16 = (T*)std::aligned_alloc(64, round64(n16 * sizeof(T)));
    float* b32 = (float*)std::aligned_alloc(64, round64(n32 * sizeof(float)));
    if (!b16 || !b32) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
      T *q_l = b16, *do_l = q_l + n_pad * D, *q_c = do_l + n_pad * Dv, *do_c = q_c + n_pad * d_pad;
      T *k_r = do_c + n_pad * dv_pad, *v_r = k_r + m_pad * D, *kt = v_r + m_pad * Dv;
      T *pt = kt + D * m_pad, *dst = pt + KB * QB, *dsi = L == 1 ? dst : dst + KB * QB;
      float *lse2 = b32, *rowsum = lse2 + n_pad, *st = rowsum + n_pad, *dpt = st + KB * QB;
      float *dvj = dpt + KB * QB, *dkj = dvj + KB * dv_pad, *dqt = dkj + KB * d_pad;
#pragma omp for schedule(dynamic, 1)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const T *qh = q + Strides{q_st}.at(b, h), *kh = k + Strides{k_st}.at(b, h);
        const T* vh = v + Strides{v_st}.at(b, h);
        const float* oh = o + Strides{o_st}.at(b, h);  // the fp32 output
        const T* doh = dout + Strides{do_st}.at(b, h);
        // pack the queries and the output's gradient (zeros past N), both ways
        std::memset(q_l, 0, sizeof(T) * (size_t)(n_pad * (D + Dv + d_pad + dv_pad)));
        for (int64_t i = 0; i < N; ++i) {
          const T *qi = qh + i * q_st[2], *di = doh + i * do_st[2];
          T* ql = q_l + (i / 16) * Pd * 16 * L + (i % 16) * L;
          for (int p = 0; p < Pd; ++p)
            for (int l = 0; l < L; ++l) ql[p * 16 * L + l] = qi[L * p + l];
          T* dl = do_l + (i / 16) * Pv * 16 * L + (i % 16) * L;
          for (int p = 0; p < Pv; ++p)
            for (int l = 0; l < L; ++l) dl[p * 16 * L + l] = di[L * p + l];
          T* qc = q_c + (i / L) * d_pad * L + (i % L);
          for (int64_t d = 0; d < D; ++d) qc[d * L] = qi[d];
          T* dc = do_c + (i / L) * dv_pad * L + (i % L);
          for (int64_t d = 0; d < Dv; ++d) dc[d * L] = di[d];
          float sum = 0.f;
          const float* oi = oh + i * o_st[2];
          for (int64_t d = 0; d < Dv; ++d) sum += to_float(di[d]) * oi[d];
          rowsum[i] = sum;
          lse2[i] = lse[bh * N + i];
        }
        for (int64_t i = N; i < n_pad; ++i) { rowsum[i] = 0.f; lse2[i] = 1e30f; }  // padded queries: P = 0
        // keys and values as rows (zeros past M), and the keys transposed
        for (int64_t j = 0; j < m_pad; ++j) {
          for (int64_t d = 0; d < D; ++d) {
            const T x = j < M ? kh[j * k_st[2] + d] : (T)0;
            k_r[j * D + d] = x;
            kt[d * m_pad + j] = x;
          }
          for (int64_t d = 0; d < Dv; ++d) v_r[j * Dv + d] = j < M ? vh[j * v_st[2] + d] : (T)0;
        }
        std::memset(dqt, 0, sizeof(float) * (size_t)(D * n_pad));
        for (int64_t j0 = 0; j0 < m_pad; j0 += KB) {
          std::memset(dvj, 0, sizeof(float) * (size_t)(KB * (dv_pad + d_pad)));
          const int valid = (int)(M - j0 < KB ? M - j0 : KB);
          for (int64_t i0 = 0; i0 < n_pad; i0 += QB) {
            gemm<T, false>(KB, QB / 16, k_r + j0 * D, D, q_l + (i0 / 16) * Pd * 16 * L, 16 * L, Pd * 16 * L, Pd, st,
                           QB);
            gemm<T, false>(KB, QB / 16, v_r + j0 * Dv, Dv, do_l + (i0 / 16) * Pv * 16 * L, 16 * L, Pv * 16 * L, Pv,
                           dpt, QB);
            for (int jj = 0; jj < KB; jj += 2) {
              for (int qv = 0; qv < QB; qv += 16) {
                const __m512 l2 = _mm512_loadu_ps(lse2 + i0 + qv), rs = _mm512_loadu_ps(rowsum + i0 + qv);
                __m512 ds[2];
                for (int t = 0; t < 2; ++t) {
                  const int j = jj + t;
                  __m512 p = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(st + j * QB + qv), _mm512_set1_ps(c), l2));
                  if (j >= valid) p = _mm512_setzero_ps();
                  const __m512 dp = _mm512_loadu_ps(dpt + j * QB + qv);
                  ds[t] = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(dp, rs)), _mm512_set1_ps(scale));
                  store16(pt + j * QB + qv, p);
                  store16(dst + j * QB + qv, ds[t]);
                }
                if constexpr (L == 2) {
                  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(ds[1], ds[0]);  // [row jj | row jj + 1]
                  _mm512_storeu_si512(dsi + ((jj / 2) * QB + qv) * 2, _mm512_permutexvar_epi16(ilv, both));
                }
              }
            }
            gemm<T, true>(KB, (int)(dv_pad / 16), pt, QB, do_c + (i0 / L) * dv_pad * L, dv_pad * L, 16 * L, QB / L,
                          dvj, dv_pad);
            gemm<T, true>(KB, (int)(d_pad / 16), dst, QB, q_c + (i0 / L) * d_pad * L, d_pad * L, 16 * L, QB / L, dkj,
                          d_pad);
            gemm<T, true>((int)D, QB / 16, kt + j0, m_pad, dsi, QB * L, 16 * L, KB / L, dqt + i0, n_pad);
          }
          T *dkh = dk + Strides{dk_st}.at(b, h), *dvh = dv + Strides{dv_st}.at(b, h);
          for (int jj = 0; jj < valid; ++jj) {
            for (int64_t d = 0; d < D; ++d) dkh[(j0 + jj) * dk_st[2] + d] = from_float<T>(dkj[jj * d_pad + d]);
            for (int64_t d = 0; d < Dv; ++d) dvh[(j0 + jj) * dv_st[2] + d] = from_float<T>(dvj[jj * dv_pad + d]);
          }
        }
        T* dqh = dq + Strides{dq_st}.at(b, h);
        for (int64_t i = 0; i < N; ++i)
          for (int64_t d = 0; d < D; ++d) dqh[i * dq_st[2] + d] = from_float<T>(dqt[d * n_pad + i]);
      }
    }
    std::free(b16);
    std::free(b32);
  }
  return failed ? -1 : 0;
}

}  // namespace

extern "C" {

// q: [B, H, N, D], k: [Bk, H, M, D], v: [Bk, H, M, Dv], out: [B, H, N, Dv], each with its own strides in elements
// (batch, head, row; the last dimension contiguous); Bk is B or 1 (a batch stride of 0 broadcasts). bf16: D even.
// lse: null, or [B, H, N] fp32 receiving each row's log2-sum-exp of the scores times scale * log2(e) (for the
// backward: P = 2^(q.k scale log2(e) - lse)); o32: null, or [B, H, N, Dv] fp32 receiving the output before its
// rounding (the backward's rowsum(dO o O) is taken of it, as the reference's softmax backward takes it of fp32
// probabilities). Returns 0, or -1 when memory could not be had.
int ldm_attention_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, int64_t B, int64_t H, int64_t N,
                       int64_t M, int64_t D, int64_t Dv, const int64_t* q_st, const int64_t* k_st,
                       const int64_t* v_st, const int64_t* o_st, float scale, int threads, float* lse,
                       float* o32) {
  return attention<bf16>(q, k, v, out, B, H, N, M, D, Dv, q_st, k_st, v_st, o_st, scale, threads, lse, o32);
}

int ldm_attention_f32(const float* q, const float* k, const float* v, float* out, int64_t B, int64_t H, int64_t N,
                      int64_t M, int64_t D, int64_t Dv, const int64_t* q_st, const int64_t* k_st,
                      const int64_t* v_st, const int64_t* o_st, float scale, int threads, float* lse,
                       float* o32) {
  return attention<float>(q, k, v, out, B, H, N, M, D, Dv, q_st, k_st, v_st, o_st, scale, threads, lse, o32);
}

// The gradients of attention_bf16 / _f32 (given its lse and o32) for q, k, v ([B, H, N, D], [B, H, M, D],
// [B, H, M, Dv]; k and v of the full batch), given the fp32 output o32 (for fp32 the output itself) and the
// output's gradient dout ([B, H, N, Dv]); strides as above.
// bf16: D and Dv even.
int ldm_attention_backward_bf16(const bf16* q, const bf16* k, const bf16* v, const float* o32, const bf16* dout,
                                const float* lse, bf16* dq, bf16* dk, bf16* dv, int64_t B, int64_t H, int64_t N,
                                int64_t M, int64_t D, int64_t Dv, const int64_t* q_st, const int64_t* k_st,
                                const int64_t* v_st, const int64_t* o_st, const int64_t* do_st, const int64_t* dq_st,
                                const int64_t* dk_st, const int64_t* dv_st, float scale, int threads) {
  return attention_backward<bf16>(q, k, v, o32, dout, lse, dq, dk, dv, B, H, N, M, D, Dv, q_st, k_st, v_st, o_st,
                                  do_st, dq_st, dk_st, dv_st, scale, threads);
}

int ldm_attention_backward_f32(const float* q, const float* k, const float* v, const float* o32, const float* dout,
                               const float* lse, float* dq, float* dk, float* dv, int64_t B, int64_t H, int64_t N,
                               int64_t M, int64_t D, int64_t Dv, const int64_t* q_st, const int64_t* k_st,
                               const int64_t* v_st, const int64_t* o_st, const int64_t* do_st, const int64_t* dq_st,
                               const int64_t* dk_st, const int64_t* dv_st, float scale, int threads) {
  return attention_backward<float>(q, k, v, o32, dout, lse, dq, dk, dv, B, H, N, M, D, Dv, q_st, k_st, v_st, o_st,
                                   do_st, dq_st, dk_st, dv_st, scale, threads);
}

}  // extern "C"
