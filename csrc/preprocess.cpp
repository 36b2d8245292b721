// molmoe::preprocess_crops: the image half of the Molmo processor as one fused CPU pass.
//
// uint8 [H, W, 3] -> (images [1 + th*tw, P, p*p*3] float32, masks [1 + th*tw, P] float32), the
// same numbers as molmoe/processing/preprocess.py (the Python path, which equals the released
// processor bit for bit). What the Python path does, in order, and how this file does the same:
//
//   1. x = uint8 / 255 as float32, then torch's antialiased bilinear resize (F.interpolate,
//      antialias=True) to the aspect-preserving size, separably: first along W, then along H,
//      each output a normalised triangle-filter sum accumulated in float32 in tap order.
//      Here: the same weights, computed with the same float/double mix as ATen's CPU kernel
//      (`aa_weights` below), the same two passes in the same order. The uint8 -> float
//      division happens per input row, so no full-resolution float copy is ever made.
//   2. clamp to [0, 1], centre on a zero canvas, normalise as (x - mean) / std (padding becomes
//      -mean / std). Here: per output row, in registers.
//   3. cut the canvas into overlapping crops (stride `stride`), each into p x p patches laid out
//      (dy, dx, c). Here: each finished row is copied straight into every crop that holds it,
//      so the canvas itself is never stored either.
//   4. masks: the fraction of each tile patch's pixels inside the resized image (one float32
//      division of an exact integer count), in the legacy order: tile masks first, then a row of
//      -1 (spec 4.5). Here: from the geometry, without touching pixels.
//
// Work is split into bands of input rows, each finishing the output rows (of both views) whose
// first tap it holds, streamed through a ring of a few resized rows per view (run_input_band);
// bands run on the calling thread and torch's inter-op pool (run_items). On x86 builds of
// torch that round with an FMA tail the W pass runs on blocks of eight rows, one row per
// vector lane (block_to_unit, resize_block_w, block_to_rows); finished rows reach the crops a
// patch row at a time (Stage). docs/preprocessing.md explains each choice and its measured
// effect.
//
// Exactness: every float operation is the one the Python path performs, in the same order,
// rounded as ATen's running build rounds it (plain_steps): bit for bit on x86, tested under
// each ATen capability. This file is built with -ffp-contract=off; elsewhere the contract is
// 1e-6 on pixels, masks exact.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <exception>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace molmoe {
namespace {

// One resize axis: for output i, taps [start[i], start[i] + count[i]) with weights w[i * taps ..].
struct Axis {
  int64_t taps = 1;
  std::vector<int64_t> start, count;
  std::vector<float> w;
  // For the AVX2 W pass: the output pixels in groups of kGroup with the same tap count (so the
  // same rounding steps, see plain_steps), a class's last group padded by repeating its last
  // pixel (computed and stored twice, the same value). Group q: pixels group_x[kGroup * q ..],
  // tap count group_n[q].
  std::vector<int32_t> group_x, group_n;
};

// Three pixels per group: three channels each, nine independent sums in registers.
constexpr int kGroup = 3;

void make_groups(Axis& a) {
  const int64_t n = static_cast<int64_t>(a.count.size());
  std::vector<int32_t> order(n);
  for (int64_t x = 0; x < n; ++x) order[x] = static_cast<int32_t>(x);
  // by tap count, then by position (stable): neighbours share a group where the counts allow
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t p, int32_t q) { return a.count[p] < a.count[q]; });
  a.group_x.clear();
  a.group_n.clear();
  for (int64_t b = 0, e = 0; b < n; b = e) {
    while (e < n && a.count[order[e]] == a.count[order[b]]) ++e;  // one class: [b, e)
    for (int64_t i = b; i < e; i += kGroup) {
      a.group_n.push_back(static_cast<int32_t>(std::max<int64_t>(a.count[order[i]], 1)));
      for (int q = 0; q < kGroup; ++q) a.group_x.push_back(order[std::min(i + q, e - 1)]);
    }
  }
}

// The identity (torch skips the pass when the size is unchanged; x * 1.0f is exact).
Axis identity_axis(int64_t n) {
  Axis a;
  a.taps = 1;
  a.start.resize(n);
  a.count.assign(n, 1);
  a.w.assign(n, 1.0f);
  for (int64_t i = 0; i < n; ++i) a.start[i] = i;
  return a;
}

// ATen's antialiased bilinear weights for float input (UpSampleKernel.cpp,
// HelperInterpBase::_compute_indices_min_size_weights_aa with scalar_t = float), including
// where C++'s usual conversions make an intermediate double: `i + 0.5`, `+ 0.5`, `1.0 / scale`.
Axis aa_axis(int64_t in, int64_t out) {
  if (in == out) return identity_axis(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const float support = scale >= 1.0f ? static_cast<float>(1.0 * scale) : 1.0f;
  const int64_t taps = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  const float invscale = scale >= 1.0f ? static_cast<float>(1.0 / scale) : 1.0f;
  Axis a;
  a.taps = taps;
  a.start.resize(out);
  a.count.resize(out);
  a.w.assign(out * taps, 0.0f);
  for (int64_t i = 0; i < out; ++i) {
    const float center = static_cast<float>(scale * (i + 0.5));
    const int64_t xmin = std::max(static_cast<int64_t>(center - support + 0.5), int64_t{0});
    int64_t xsize = std::min(static_cast<int64_t>(center + support + 0.5), in) - xmin;
    xsize = std::clamp(xsize, int64_t{0}, taps);
    float* w = a.w.data() + i * taps;
    float total = 0.0f;
    for (int64_t j = 0; j < xsize; ++j) {
      const float d = static_cast<float>(j + xmin) - center;  // int64 - float: float
      float x = static_cast<float>((d + 0.5) * invscale);
      x = std::abs(x);
      const float v = x < 1.0f ? static_cast<float>(1.0 - x) : 0.0f;
      w[j] = v;
      total += v;
    }
    if (total != 0.0f)
      for (int64_t j = 0; j < xsize; ++j) w[j] /= total;
    a.start[i] = xmin;
    a.count[i] = xsize;
  }
  return a;
}

// ATen's CPU kernel, when the output is 1 pixel wide and the height changes, gives every output
// row the taps and weights of row 0 (its vertical pass loses the row stride of the index and
// weight tensors for a width-1 output), so a resized 1-px column is one value repeated. The
// Python path, and the released processor with it, inherit that, so slivers (e.g. 3000 x 4,
// resized to 1 px wide) reproduce it here.
void torch_width1_rows(Axis& a) {
  const int64_t n = static_cast<int64_t>(a.start.size());
  for (int64_t i = 1; i < n; ++i) {
    a.start[i] = a.start[0];
    a.count[i] = a.count[0];
    std::copy(a.w.begin(), a.w.begin() + a.taps, a.w.begin() + i * a.taps);
  }
}

// One output view: the resized image (new_h x new_w) centred on a canvas (out_h x out_w), cut
// into a grid of square crops of side `crop` every `stride` pixels, written from crop index
// `first_crop` on.
struct View {
  int64_t out_h, out_w, new_h, new_w, top, left;
  int64_t grid_h, grid_w, first_crop;
  Axis rows, cols;
};

struct Job {
  const uint8_t* src;
  int64_t in_h, in_w;
  int64_t crop, stride, patch;
  float mean[3], std[3], pad[3];
  std::vector<float> mean3, std3;  // mean / std repeated along the widest resized row
  bool normalize;
  bool fma_tail;  // ATen's build rounds the last taps of each sum as FMAs (see plain_steps)
  bool newton;    // the FMA path's uint8 -> float / 255 by div255's corrected reciprocal
  bool staged;    // finished rows go to the crops by patch row (Stage); needs stride % patch == 0
  float* images;  // [T, P, p*p*3]
  int64_t patches_per_side;
};

using v4f = float __attribute__((vector_size(16)));



inline v4f load4(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// uint8 -> float32 / 255, exactly the Python path's `.float().div_(255.0)` (IEEE division is
// exact per element, vectorised or not; with AVX2 it runs at about the speed of reading memory).
__attribute__((target_clones("avx2", "default")))
void to_unit(const uint8_t* __restrict s, float* __restrict f, int64_t n) {
  for (int64_t k = 0; k < n; ++k) f[k] = static_cast<float>(s[k]) / 255.0f;
}

// One row along W: f (float [in_w * 3], zero tail) -> out (float [new_w * 3 + 1]).
//
// Each output pixel is a chain of dependent adds (one per tap), so four pixels run side by side
// to hide the add latency. A pixel with fewer taps than its neighbours continues with weights
// that are exactly 0 (the weight table is zero-padded): acc + t * 0 == acc, so every pixel's
// sum is the same sequence of roundings as on its own.
__attribute__((target_clones("avx2", "default")))
void resize_row_w(const float* f, const Axis& cols, int64_t new_w, float* out) {
  const int64_t taps = cols.taps;
  const int64_t* start = cols.start.data();
  const int64_t* count = cols.count.data();
  const float* weights = cols.w.data();
  int64_t x = 0;
  for (; x + 4 <= new_w; x += 4) {
    const float *p0 = f + start[x] * 3, *p1 = f + start[x + 1] * 3, *p2 = f + start[x + 2] * 3,
                *p3 = f + start[x + 3] * 3;
    const float *w0 = weights + x * taps, *w1 = w0 + taps, *w2 = w1 + taps, *w3 = w2 + taps;
    const int64_t n =
        std::max(std::max(count[x], count[x + 1]), std::max(count[x + 2], count[x + 3]));
    v4f a0 = load4(p0) * w0[0], a1 = load4(p1) * w1[0], a2 = load4(p2) * w2[0],
        a3 = load4(p3) * w3[0];
    for (int64_t j = 1; j < n; ++j) {
      a0 += load4(p0 + j * 3) * w0[j];
      a1 += load4(p1 + j * 3) * w1[j];
      a2 += load4(p2 + j * 3) * w2[j];
      a3 += load4(p3 + j * 3) * w3[j];
    }
    // 16-byte stores; lane 3 spills into the next pixel, which is written after it.
    std::memcpy(out + x * 3, &a0, sizeof(a0));
    std::memcpy(out + x * 3 + 3, &a1, sizeof(a1));
    std::memcpy(out + x * 3 + 6, &a2, sizeof(a2));
    std::memcpy(out + x * 3 + 9, &a3, sizeof(a3));
  }
  for (; x < new_w; ++x) {
    const float* w = weights + x * taps;
    const float* px = f + start[x] * 3;
    v4f acc = load4(px) * w[0];
    for (int64_t j = 1; j < count[x]; ++j) acc += load4(px + j * 3) * w[j];
    std::memcpy(out + x * 3, &acc, sizeof(acc));
  }
}

// One output row along H: a[k] = sum_j rows[j][k] * w[j], taps in order.
__attribute__((target_clones("avx2", "default")))
void resize_col_h(const float* const* rows, const float* w, int64_t count, int64_t n,
                  float* __restrict a) {
  const float w0 = w[0];
  const float* __restrict b = rows[0];
  for (int64_t k = 0; k < n; ++k) a[k] = b[k] * w0;
  for (int64_t j = 1; j < count; ++j) {
    const float wj = w[j];
    const float* __restrict bj = rows[j];
    for (int64_t k = 0; k < n; ++k) a[k] += bj[k] * wj;
  }
}

// How ATen's CPU kernel rounds one output's sum  acc = t0*w0; acc += tj*wj (j = 1..n-1).
// Its DEFAULT build does every step as a multiply then an add. Its AVX2 and AVX512 builds
// (compiled with FMA) unroll the loop by four: the unrolled steps stay a multiply then an add,
// the remaining (n-1) % 4 steps, or all of them when there are fewer than four, are fused
// multiply-adds. Found by matching ATen's outputs bit for bit on every tap count (docs/
// preprocessing.md); tests/test_native_preprocess.py checks the op equals the Python path
// exactly under each capability.
inline int64_t plain_steps(int64_t count, bool fma_tail) {
  const int64_t m = count - 1;
  return !fma_tail ? m : (m >= 4 ? (m / 4) * 4 : 0);
}

#if defined(__x86_64__) || defined(__i386__)
// The FMA-tail builds' W pass runs on blocks of eight input rows, one row per lane: the rows are
// converted to float and transposed so that each value of a row block is one 8-float vector
// (T[k][l] = row l's value k, k = x * 3 + c), every tap is then one vector load, a broadcast
// weight and a multiply and an add (or an FMA) for 8 output values, and the results are
// transposed back into rows for the H pass. Each value takes exactly the steps and roundings of
// the row-wise pass (the lanes are independent), with about a third of its loads.

// x / 255 for x in 0..255 as q = x * (1/255), corrected once with the exact residual
// x - 255q (an FMA): the IEEE quotient for every one of the 256 values (checked once, below;
// a division is used instead if the check fails), at the cost of a multiply and two FMAs.
__attribute__((target("avx2,fma"))) inline __m256 div255(__m256 v, bool newton) {
  if (!newton) return _mm256_div_ps(v, _mm256_set1_ps(255.0f));
  const __m256 r = _mm256_set1_ps(1.0f / 255.0f);
  const __m256 q = _mm256_mul_ps(v, r);
  const __m256 e = _mm256_fnmadd_ps(q, _mm256_set1_ps(255.0f), v);
  return _mm256_fmadd_ps(e, r, q);
}

__attribute__((target("avx2,fma"))) bool newton_div255_exact() {
  alignas(32) float got[8];
  for (int b = 0; b < 256; b += 8) {
    _mm256_store_ps(got, div255(_mm256_setr_ps(b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6,
                                               b + 7), true));
    for (int l = 0; l < 8; ++l) {
      volatile float x = static_cast<float>(b + l);  // a real division, not folded
      if (got[l] != x / 255.0f) return false;
    }
  }
  return true;
}

// Eight uint8 rows of n bytes (null: a row of zeros) -> T[k][8] = row[k] / 255 as float.
// 16 bytes of each row at a time: a byte transpose (three rounds of unpacks) gives, for each k,
// the eight rows' bytes side by side.
__attribute__((target("avx2,fma")))
void block_to_unit(const uint8_t* const* rows, int64_t n, float* T, bool newton) {
  alignas(16) uint8_t tail[8][16];
  for (int64_t k = 0; k < n; k += 16) {
    const int64_t m = std::min<int64_t>(16, n - k);
    __m128i a[8];
    for (int l = 0; l < 8; ++l) {
      if (!rows[l]) {
        a[l] = _mm_setzero_si128();
      } else if (m == 16) {
        a[l] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[l] + k));
      } else {  // the row's last bytes: never read past its end
        std::memset(tail[l], 0, 16);
        std::memcpy(tail[l], rows[l] + k, m);
        a[l] = _mm_load_si128(reinterpret_cast<const __m128i*>(tail[l]));
      }
    }
    __m128i t[8], u[8], q[8];
    for (int i = 0; i < 4; ++i) {  // rows 2i, 2i+1 byte-interleaved: k 0-7, k 8-15
      t[2 * i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
      t[2 * i + 1] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // rows 4h..4h+3: k 0-3, 4-7, 8-11, 12-15
      u[4 * h + 0] = _mm_unpacklo_epi16(t[4 * h + 0], t[4 * h + 2]);
      u[4 * h + 1] = _mm_unpackhi_epi16(t[4 * h + 0], t[4 * h + 2]);
      u[4 * h + 2] = _mm_unpacklo_epi16(t[4 * h + 1], t[4 * h + 3]);
      u[4 * h + 3] = _mm_unpackhi_epi16(t[4 * h + 1], t[4 * h + 3]);
    }
    for (int i = 0; i < 4; ++i) {  // q[2i]: k 4i, 4i+1; q[2i+1]: k 4i+2, 4i+3 (8 rows each)
      q[2 * i] = _mm_unpacklo_epi32(u[i], u[4 + i]);
      q[2 * i + 1] = _mm_unpackhi_epi32(u[i], u[4 + i]);
    }
    for (int i = 0; i < 8 && 2 * i < m; ++i) {  // q[i]: k + 2i (low half), k + 2i + 1 (high)
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q[i]));
      _mm256_storeu_ps(T + (k + 2 * i) * 8, div255(lo, newton));
      if (2 * i + 1 < m) {
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(q[i], q[i])));
        _mm256_storeu_ps(T + (k + 2 * i + 1) * 8, div255(hi, newton));
      }
    }
  }
}

// The W pass of a row block: T[x * 3 + c][8] -> O[x * 3 + c][8] for every output pixel x, by
// groups of three pixels with the same tap count (Axis::group_*), the taps in order: a multiply
// and an add for the plain steps, then FMAs (plain_steps).
__attribute__((target("avx2,fma")))
void resize_block_w(const float* T, const Axis& cols, float* O) {
  static_assert(kGroup == 3, "three pixels of three channels: nine sums");
  const int64_t groups = static_cast<int64_t>(cols.group_n.size()), taps = cols.taps;
  const int32_t* gx = cols.group_x.data();
  const int64_t* start = cols.start.data();
  const float* weights = cols.w.data();
  for (int64_t g = 0; g < groups; ++g) {
    const int32_t* x = gx + kGroup * g;
    const int64_t n = cols.group_n[g], k = plain_steps(n, true);
    const float *b0 = T + start[x[0]] * 24, *b1 = T + start[x[1]] * 24,
                *b2 = T + start[x[2]] * 24;
    const float *w0 = weights + x[0] * taps, *w1 = weights + x[1] * taps,
                *w2 = weights + x[2] * taps;
    __m256 wa = _mm256_broadcast_ss(w0), wb = _mm256_broadcast_ss(w1),
           wc = _mm256_broadcast_ss(w2);
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(b0), wa),
           a1 = _mm256_mul_ps(_mm256_loadu_ps(b0 + 8), wa),
           a2 = _mm256_mul_ps(_mm256_loadu_ps(b0 + 16), wa),
           c0 = _mm256_mul_ps(_mm256_loadu_ps(b1), wb),
           c1 = _mm256_mul_ps(_mm256_loadu_ps(b1 + 8), wb),
           c2 = _mm256_mul_ps(_mm256_loadu_ps(b1 + 16), wb),
           e0 = _mm256_mul_ps(_mm256_loadu_ps(b2), wc),
           e1 = _mm256_mul_ps(_mm256_loadu_ps(b2 + 8), wc),
           e2 = _mm256_mul_ps(_mm256_loadu_ps(b2 + 16), wc);
    int64_t j = 1;
    for (; j <= k; ++j) {
      const int64_t o = j * 24;
      wa = _mm256_broadcast_ss(w0 + j);
      wb = _mm256_broadcast_ss(w1 + j);
      wc = _mm256_broadcast_ss(w2 + j);
      a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(b0 + o), wa));
      a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(b0 + o + 8), wa));
      a2 = _mm256_add_ps(a2, _mm256_mul_ps(_mm256_loadu_ps(b0 + o + 16), wa));
      c0 = _mm256_add_ps(c0, _mm256_mul_ps(_mm256_loadu_ps(b1 + o), wb));
      c1 = _mm256_add_ps(c1, _mm256_mul_ps(_mm256_loadu_ps(b1 + o + 8), wb));
      c2 = _mm256_add_ps(c2, _mm256_mul_ps(_mm256_loadu_ps(b1 + o + 16), wb));
      e0 = _mm256_add_ps(e0, _mm256_mul_ps(_mm256_loadu_ps(b2 + o), wc));
      e1 = _mm256_add_ps(e1, _mm256_mul_ps(_mm256_loadu_ps(b2 + o + 8), wc));
      e2 = _mm256_add_ps(e2, _mm256_mul_ps(_mm256_loadu_ps(b2 + o + 16), wc));
    }
    for (; j < n; ++j) {
      const int64_t o = j * 24;
      wa = _mm256_broadcast_ss(w0 + j);
      wb = _mm256_broadcast_ss(w1 + j);
      wc = _mm256_broadcast_ss(w2 + j);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(b0 + o), wa, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(b0 + o + 8), wa, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(b0 + o + 16), wa, a2);
      c0 = _mm256_fmadd_ps(_mm256_loadu_ps(b1 + o), wb, c0);
      c1 = _mm256_fmadd_ps(_mm256_loadu_ps(b1 + o + 8), wb, c1);
      c2 = _mm256_fmadd_ps(_mm256_loadu_ps(b1 + o + 16), wb, c2);
      e0 = _mm256_fmadd_ps(_mm256_loadu_ps(b2 + o), wc, e0);
      e1 = _mm256_fmadd_ps(_mm256_loadu_ps(b2 + o + 8), wc, e1);
      e2 = _mm256_fmadd_ps(_mm256_loadu_ps(b2 + o + 16), wc, e2);
    }
    float *o0 = O + x[0] * 24, *o1 = O + x[1] * 24, *o2 = O + x[2] * 24;
    _mm256_storeu_ps(o0, a0);
    _mm256_storeu_ps(o0 + 8, a1);
    _mm256_storeu_ps(o0 + 16, a2);
    _mm256_storeu_ps(o1, c0);
    _mm256_storeu_ps(o1 + 8, c1);
    _mm256_storeu_ps(o1 + 16, c2);
    _mm256_storeu_ps(o2, e0);
    _mm256_storeu_ps(o2 + 8, e1);
    _mm256_storeu_ps(o2 + 16, e2);
  }
}

// The row-wise W pass for FMA-tail builds, one pixel at a time (only for inputs too wide for
// row blocks, see kBlockMaxWidth): each step a multiply and an add, then FMAs.
__attribute__((target("avx2,fma")))
void resize_row_w_fma(const float* f, const Axis& cols, int64_t new_w, float* out) {
  for (int64_t x = 0; x < new_w; ++x) {
    const float* w = cols.w.data() + x * cols.taps;
    const float* p = f + cols.start[x] * 3;
    const int64_t n = cols.count[x], k = plain_steps(n, true);
    __m128 a = _mm_mul_ps(_mm_loadu_ps(p), _mm_set1_ps(w[0]));
    for (int64_t j = 1; j < n; ++j) {
      const __m128 t = _mm_loadu_ps(p + j * 3), wj = _mm_set1_ps(w[j]);
      a = j > k ? _mm_fmadd_ps(t, wj, a) : _mm_add_ps(a, _mm_mul_ps(t, wj));
    }
    _mm_storeu_ps(out + x * 3, a);  // lane 3 spills into the next pixel, written after it
  }
}

// O[k][8] (k < n) -> rows[l][k]: 8 x 8 transposes, the last n % 8 values one by one.
__attribute__((target("avx2,fma")))
void block_to_rows(const float* O, int64_t n, float* const* rows) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const float* o = O + k * 8;
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(o + i * 8);
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {
      u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0x44);
      u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0xEE);
      u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
      u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_ps(rows[i] + k, _mm256_permute2f128_ps(u[i], u[4 + i], 0x20));
      _mm256_storeu_ps(rows[4 + i] + k, _mm256_permute2f128_ps(u[i], u[4 + i], 0x31));
    }
  }
  for (; k < n; ++k)
    for (int l = 0; l < 8; ++l) rows[l][k] = O[k * 8 + l];
}

__attribute__((target("avx2,fma")))
void resize_col_h_fma(const float* const* rows, const float* w, int64_t count, int64_t n,
                      float* __restrict a) {
  const int64_t k = plain_steps(count, true);
  const float w0 = w[0];
  const float* __restrict b = rows[0];
  for (int64_t e = 0; e < n; ++e) a[e] = b[e] * w0;
  for (int64_t j = 1; j < count; ++j) {
    const float wj = w[j];
    const float* __restrict bj = rows[j];
    if (j <= k) {
      for (int64_t e = 0; e < n; ++e) a[e] += bj[e] * wj;
    } else {
      for (int64_t e = 0; e < n; ++e) a[e] = __builtin_fmaf(bj[e], wj, a[e]);
    }
  }
}
#endif

// Whether this process's ATen kernels round with an FMA tail (x86 AVX2/AVX512 builds).
bool aten_fma_tail() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool fused = [] {
    const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512"
    return cap == "AVX2" || cap == "AVX512";
  }();
  return fused;
#else
  return false;  // other architectures: plain steps (exact where ATen's build does the same)
#endif
}

// Canvas row y of a view, finished: `resized` is the resized row (new_w * 3 floats in [0, 1]
// before the clamp), or null for a padding row. Clamp, pad, normalise, scatter into crops.
// Clamp to [0, 1] and normalise n interleaved RGB values: (v - mean) / std, one division each
// as the Python path does (mean3 / std3 hold the per-channel values repeated along the row).
__attribute__((target_clones("avx2", "default")))
void normalise_row(const float* __restrict in, const float* __restrict mean3,
                   const float* __restrict std3, bool normalize, int64_t n,
                   float* __restrict out) {
  if (normalize) {
    for (int64_t k = 0; k < n; ++k)
      out[k] = (std::min(std::max(in[k], 0.0f), 1.0f) - mean3[k]) / std3[k];
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = std::min(std::max(in[k], 0.0f), 1.0f);
  }
}

// Copy one canvas row into the patch rows of every crop that holds it: `pps` runs of P floats.
inline void scatter_runs(float* dst, const float* src, int64_t pps, int64_t dst_step,
                         int64_t src_step, int64_t run) {
  for (int64_t px = 0; px < pps; ++px)
    std::memcpy(dst + px * dst_step, src + px * src_step, run * sizeof(float));
}

// One view's finished canvas rows of one patch row (p canvas rows, the rows dy_lo..dy_hi of
// group `group`), held by patch column: patch column pc's row dy at buf[pc * p*p*3 + dy * p*3],
// which is exactly the layout of a crop's patches. When the patch row is complete, each crop
// that holds it receives its 24 patches as one contiguous copy (a crop's patch columns are
// consecutive patch columns of the canvas, since the stride is a multiple of the patch), so
// every output line is written once, whole, in one stream. Writing each canvas row straight
// into every crop instead (168-byte runs 2,352 bytes apart, the lines completed over 14 rows
// with the resize's work in between) ran at about a third of the speed and was the op's
// largest part. Used when stride % patch == 0 (the released geometry and every Molmo config);
// otherwise rows go straight to the crops.
struct Stage {
  std::vector<float> buf;
  int64_t group = -1, dy_lo = 0, dy_hi = -1;
};

void flush(const Job& job, const View& view, Stage& st) {
  if (st.group < 0) return;
  const int64_t p = job.patch, pp3 = p * p * 3, pps = job.patches_per_side;
  const int64_t crop_elems = pps * pps * pp3, y0 = st.group * p;
  const bool whole = st.dy_lo == 0 && st.dy_hi == p - 1;
  const int64_t off = st.dy_lo * p * 3, len = (st.dy_hi - st.dy_lo + 1) * p * 3;
  for (int64_t gi = 0; gi < view.grid_h; ++gi) {
    const int64_t ly = y0 - gi * job.stride;
    if (ly < 0 || ly >= job.crop) continue;
    const int64_t py = ly / p;
    for (int64_t gj = 0; gj < view.grid_w; ++gj) {
      float* dst = job.images + (view.first_crop + gi * view.grid_w + gj) * crop_elems +
                   py * pps * pp3;
      const float* src = st.buf.data() + (gj * job.stride / p) * pp3;
      if (whole) {
        std::memcpy(dst, src, pps * pp3 * sizeof(float));
      } else {
        for (int64_t px = 0; px < pps; ++px)
          std::memcpy(dst + px * pp3 + off, src + px * pp3 + off, len * sizeof(float));
      }
    }
  }
  st.group = -1;
}

void finish_row(const Job& job, const View& view, int64_t y, const float* resized,
                std::vector<float>& row, Stage& st) {
  const int64_t W = view.out_w;
  row.resize(W * 3);
  float* r = row.data();
  const int64_t left = resized ? view.left : W, right = resized ? view.left + view.new_w : W;
  for (int64_t x = 0; x < left; ++x)
    for (int c = 0; c < 3; ++c) r[x * 3 + c] = job.pad[c];
  if (right > left)
    normalise_row(resized, job.mean3.data(), job.std3.data(), job.normalize, (right - left) * 3,
                  r + left * 3);
  for (int64_t x = right; x < W; ++x)
    for (int c = 0; c < 3; ++c) r[x * 3 + c] = job.pad[c];
  const int64_t p = job.patch, pp3 = p * p * 3, pps = job.patches_per_side;
  if (job.staged) {
    const int64_t g = y / p, dy = y % p, columns = W / p;
    if (st.group != g || dy != st.dy_hi + 1) {
      flush(job, view, st);
      st.group = g;
      st.dy_lo = dy;
    }
    st.dy_hi = dy;
    st.buf.resize(columns * pp3);
    float* b = st.buf.data() + dy * p * 3;
    for (int64_t pc = 0; pc < columns; ++pc)
      std::memcpy(b + pc * pp3, r + pc * p * 3, p * 3 * sizeof(float));
    if (dy == p - 1) flush(job, view, st);
    return;
  }
  // Every crop row of the grid that holds canvas row y (crops overlap by crop - stride).
  const int64_t crop_elems = pps * pps * pp3;
  for (int64_t gi = std::min(y / job.stride, view.grid_h - 1); gi >= 0; --gi) {
    const int64_t ly = y - gi * job.stride;
    if (ly >= job.crop) break;
    const int64_t py = ly / p, dy = ly % p;
    for (int64_t gj = 0; gj < view.grid_w; ++gj) {
      float* dst = job.images + (view.first_crop + gi * view.grid_w + gj) * crop_elems +
                   py * pps * pp3 + dy * p * 3;
      const float* src = r + gj * job.stride * 3;
      scatter_runs(dst, src, pps, pp3, p * 3, p * 3);
    }
  }
}


inline void resize_h(const Job& job, const float* const* rows, const float* w, int64_t count,
                     int64_t n, float* a) {
#if defined(__x86_64__) || defined(__i386__)
  if (job.fma_tail) return resize_col_h_fma(rows, w, count, n, a);
#endif
  resize_col_h(rows, w, count, n, a);
}

// Scratch of one worker thread.
struct Scratch {
  std::vector<float> line, row, acc, ring[2], tin, tout;
  Stage stage[2];
  std::vector<const float*> taps;
};

// The output rows whose first tap is an input row in [r0, r1), for both views, streamed: input
// rows are read in order, each converted to float once and resized along W into a ring of rows
// per view (the most one output row reads, plus one row block); an output row is resized along
// H and finished as soon as its last tap has arrived. A tap window's end never decreases with
// the output row (ATen's first and last taps are both non-decreasing; the width-1 quirk repeats
// one window), so a row's taps are still in the ring when it is finished. The working set is a
// few rows per view whatever the band size: it stays in the core's cache beside the crop rows
// being written.
void run_input_band(const Job& job, const View* views, int64_t r0, int64_t r1, Scratch& s) {
  // FMA-tail builds on x86: W pass by blocks of eight rows (block_to_unit, resize_block_w),
  // whose float copy of a block takes 96 bytes per input column; wider inputs (slivers) go
  // row by row at 12 bytes per column.
  constexpr int64_t kBlock = 8, kBlockMaxWidth = 1 << 16;
#if defined(__x86_64__) || defined(__i386__)
  const bool blocks = job.fma_tail && job.in_w <= kBlockMaxWidth;
#else
  const bool blocks = false;
#endif
  int64_t next[2], last[2], lo[2], need[2], cap[2];
  int64_t from = r1, hi = r0;
  for (int v = 0; v < 2; ++v) {
    const Axis& rows = views[v].rows;
    const auto& st = rows.start;
    // start is non-decreasing in the output row, so the rows owned here are one range.
    next[v] = std::lower_bound(st.begin(), st.end(), r0) - st.begin();
    last[v] = std::lower_bound(st.begin(), st.end(), r1) - st.begin();
    lo[v] = next[v] < last[v] ? st[next[v]] : r1;
    need[v] = lo[v];
    for (int64_t i = next[v]; i < last[v]; ++i)
      need[v] = std::max(need[v], st[i] + std::max<int64_t>(rows.count[i], 1));
    from = std::min(from, lo[v]);
    hi = std::max(hi, need[v]);
    // blocks: eight rows arrive at once; rows: resize_row_w's last pixel writes one float past
    // the row, into the next slot, whose row (the one `taps` back) is never needed again
    cap[v] = std::max<int64_t>(rows.taps, 1) + (blocks ? kBlock : 1);
    s.ring[v].resize(cap[v] * views[v].new_w * 3 + 4);
  }
  s.taps.resize(std::max(cap[0], cap[1]));
  // Finish view v's owned output rows whose last tap is an input row <= r.
  auto emit = [&](int v, int64_t r) {
    const View& view = views[v];
    const Axis& rows = view.rows;
    const int64_t nw3 = view.new_w * 3;
    for (; next[v] < last[v]; ++next[v]) {
      const int64_t i = next[v], st = rows.start[i], n = std::max<int64_t>(rows.count[i], 1);
      if (st + n - 1 > r) break;  // its last tap is still to come
      for (int64_t j = 0; j < n; ++j)
        s.taps[j] = s.ring[v].data() + ((st + j) % cap[v]) * nw3;
      s.acc.resize(nw3 + 4);
      resize_h(job, s.taps.data(), rows.w.data() + i * rows.taps, rows.count[i], nw3,
               s.acc.data());
      finish_row(job, view, view.top + i, s.acc.data(), s.row, s.stage[v]);
    }
  };
  const int64_t in_w = job.in_w;
#if defined(__x86_64__) || defined(__i386__)
  if (blocks) {
    s.tin.resize(in_w * 3 * kBlock);
    s.tout.resize(std::max(views[0].new_w, views[1].new_w) * 3 * kBlock);
    for (int64_t r = from; r < hi; r += kBlock) {
      const uint8_t* src[kBlock];
      for (int64_t l = 0; l < kBlock; ++l)
        src[l] = r + l < hi ? job.src + (r + l) * in_w * 3 : nullptr;
      block_to_unit(src, in_w * 3, s.tin.data(), job.newton);
      const int64_t end = std::min(r + kBlock, hi);  // rows [r, end) are real
      for (int v = 0; v < 2; ++v) {
        if (end <= lo[v] || r >= need[v]) continue;
        const View& view = views[v];
        const int64_t nw3 = view.new_w * 3;
        resize_block_w(s.tin.data(), view.cols, s.tout.data());
        float* dst[kBlock];
        for (int64_t l = 0; l < kBlock; ++l)
          dst[l] = s.ring[v].data() + ((r + l) % cap[v]) * nw3;
        block_to_rows(s.tout.data(), nw3, dst);
        emit(v, end - 1);
      }
    }
    return;
  }
#endif
  const int64_t max_taps = std::max(views[0].cols.taps, views[1].cols.taps);
  s.line.assign((in_w + max_taps + 2) * 3, 0.0f);  // zero tail for padded taps
  for (int64_t r = from; r < hi; ++r) {
    to_unit(job.src + r * in_w * 3, s.line.data(), in_w * 3);
    for (int v = 0; v < 2; ++v) {
      if (r < lo[v] || r >= need[v]) continue;
      const View& view = views[v];
      float* out = s.ring[v].data() + (r % cap[v]) * view.new_w * 3;
#if defined(__x86_64__) || defined(__i386__)
      if (job.fma_tail)
        resize_row_w_fma(s.line.data(), view.cols, view.new_w, out);
      else
#endif
        resize_row_w(s.line.data(), view.cols, view.new_w, out);
      emit(v, r);
    }
  }
}

// A unit of work: view -1 finishes the output rows whose first tap is an input row in [a, b)
// (run_input_band); view v >= 0 finishes view v's padding rows [a, b).
struct Item {
  int view;
  int64_t a, b;
};

// Each thread's scratch lives as long as the thread: the calling thread's, and those of torch's
// inter-op pool (below), so a call allocates nothing but its outputs. Buffers that grew past
// kKeepBytes (inputs of tens of thousands of columns) are released after the call.
Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

void trim_scratch(Scratch& s) {
  constexpr size_t kKeepBytes = size_t{16} << 20;
  size_t bytes = (s.line.capacity() + s.row.capacity() + s.acc.capacity() + s.tin.capacity() +
                  s.tout.capacity() + s.ring[0].capacity() + s.ring[1].capacity() +
                  s.stage[0].buf.capacity() + s.stage[1].buf.capacity()) *
                 sizeof(float);
  if (bytes > kKeepBytes) s = Scratch();
}

// The items, taken in turn by the calling thread and threads-1 tasks on torch's inter-op pool
// (at::launch: threads that persist across calls, unlike threads started per call, which cost
// a clone, a fresh stack and page faults every call; at::parallel_for is inlined from headers
// and in an OpenMP build of torch takes effect only in code compiled with -fopenmp, which would
// link a second OpenMP runtime). Items are claimed from an atomic counter, so the caller alone
// finishes them if the pool is busy; it returns when every item is done. A task that starts
// after that finds nothing to claim and touches nothing but the shared counters it co-owns.
void run_items(const Job& job, const View* views, const std::vector<Item>& items,
               int64_t threads) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<bool> stop{false};
    int64_t n = 0;
    const Job* job = nullptr;
    const View* views = nullptr;
    const Item* items = nullptr;
    std::mutex lock;
    std::condition_variable all_done;
    std::exception_ptr failed;
  };
  auto shared = std::make_shared<Shared>();
  shared->n = static_cast<int64_t>(items.size());
  shared->job = &job;
  shared->views = views;
  shared->items = items.data();
  auto work = [](Shared& st) {
    Scratch& scratch = thread_scratch();
    for (int64_t k = st.next++; k < st.n; k = st.next++) {
      if (!st.stop.load()) {
        try {
          const Item& it = st.items[k];
          if (it.view < 0) {
            run_input_band(*st.job, st.views, it.a, it.b, scratch);
          } else {
            for (int64_t y = it.a; y < it.b; ++y)
              finish_row(*st.job, st.views[it.view], y, nullptr, scratch.row,
                         scratch.stage[it.view]);
          }
          // the item's last, partial patch rows (another item writes their other rows)
          for (int v = 0; v < 2; ++v) flush(*st.job, st.views[v], scratch.stage[v]);
        } catch (...) {  // bad_alloc: the rest is skipped, the caller rethrows it
          for (auto& stage : scratch.stage) stage.group = -1;  // never flushed into a later call
          std::lock_guard<std::mutex> guard(st.lock);
          if (!st.failed) st.failed = std::current_exception();
          st.stop = true;
        }
      }
      if (++st.done == st.n) {
        std::lock_guard<std::mutex> guard(st.lock);
        st.all_done.notify_all();
      }
    }
    trim_scratch(scratch);
  };
  for (int64_t t = 1; t < std::min(threads, shared->n); ++t)
    at::launch([shared, work] { work(*shared); });
  work(*shared);
  {
    std::unique_lock<std::mutex> guard(shared->lock);
    shared->all_done.wait(guard, [&] { return shared->done.load() == shared->n; });
  }
  if (shared->failed) std::rethrow_exception(shared->failed);
}

std::tuple<at::Tensor, at::Tensor> preprocess_crops_cpu(
    const at::Tensor& image, c10::IntArrayRef canvas, c10::IntArrayRef canvas_resized,
    c10::IntArrayRef global_resized, c10::IntArrayRef tiling, int64_t crop, int64_t stride,
    int64_t patch, c10::ArrayRef<double> mean, c10::ArrayRef<double> std, bool normalize) {
  TORCH_CHECK(image.dim() == 3 && image.size(2) == 3 && image.scalar_type() == at::kByte,
              "preprocess_crops: expected a uint8 [H, W, 3] image, got ", image.scalar_type(),
              " ", image.sizes());
  TORCH_CHECK(image.size(0) >= 1 && image.size(1) >= 1, "preprocess_crops: empty image");
  TORCH_CHECK(canvas.size() == 2 && canvas_resized.size() == 2 && global_resized.size() == 2 &&
                  tiling.size() == 2 && mean.size() == 3 && std.size() == 3,
              "preprocess_crops: canvas, sizes and tiling take 2 values, mean and std 3");
  TORCH_CHECK(patch >= 1 && crop >= patch && crop % patch == 0 && stride >= 1 && stride <= crop,
              "preprocess_crops: bad crop geometry");
  const int64_t th = tiling[0], tw = tiling[1];
  TORCH_CHECK(th >= 1 && tw >= 1 && canvas[0] == (th - 1) * stride + crop &&
                  canvas[1] == (tw - 1) * stride + crop,
              "preprocess_crops: the canvas must be exactly covered by the tiling");
  for (auto s : {canvas_resized, global_resized})
    TORCH_CHECK(s[0] >= 1 && s[1] >= 1, "preprocess_crops: resized sizes must be >= 1");
  TORCH_CHECK(canvas_resized[0] <= canvas[0] && canvas_resized[1] <= canvas[1] &&
                  global_resized[0] <= crop && global_resized[1] <= crop,
              "preprocess_crops: a resized image larger than its canvas");

  const at::Tensor src = image.contiguous();
  const int64_t pps = crop / patch, P = pps * pps, Dp = patch * patch * 3;
  const int64_t T = 1 + th * tw;
  at::Tensor images = at::empty({T, P, Dp}, image.options().dtype(at::kFloat));
  at::Tensor masks = at::empty({T, P}, image.options().dtype(at::kFloat));

  Job job;
  job.src = src.data_ptr<uint8_t>();
  job.in_h = src.size(0);
  job.in_w = src.size(1);
  job.crop = crop;
  job.stride = stride;
  job.patch = patch;
  job.normalize = normalize;
  job.fma_tail = aten_fma_tail();
  job.staged = stride % patch == 0;
#if defined(__x86_64__) || defined(__i386__)
  static const bool newton = job.fma_tail && newton_div255_exact();
  job.newton = newton;
#else
  job.newton = false;
#endif
  job.images = images.data_ptr<float>();
  job.patches_per_side = pps;
  for (int c = 0; c < 3; ++c) {
    job.mean[c] = static_cast<float>(mean[c]);
    job.std[c] = static_cast<float>(std[c]);
    job.pad[c] = normalize ? (0.0f - job.mean[c]) / job.std[c] : 0.0f;
  }

  const int64_t widest = std::max(canvas_resized[1], global_resized[1]);
  job.mean3.resize(widest * 3);
  job.std3.resize(widest * 3);
  for (int64_t k = 0; k < widest * 3; ++k) {
    job.mean3[k] = job.mean[k % 3];
    job.std3[k] = job.std[k % 3];
  }
  auto make_view = [&](int64_t out_h, int64_t out_w, int64_t nh, int64_t nw, int64_t gh,
                       int64_t gw, int64_t first) {
    View v;
    v.out_h = out_h;
    v.out_w = out_w;
    v.new_h = nh;
    v.new_w = nw;
    v.top = (out_h - nh) / 2;
    v.left = (out_w - nw) / 2;
    v.grid_h = gh;
    v.grid_w = gw;
    v.first_crop = first;
    v.rows = aa_axis(job.in_h, nh);
    v.cols = aa_axis(job.in_w, nw);
    if (nw == 1 && nh != job.in_h) torch_width1_rows(v.rows);
    if (job.fma_tail) make_groups(v.cols);
    return v;
  };
  // The global view is crop 0, the tiles follow row-major.
  const View views[2] = {
      make_view(crop, crop, global_resized[0], global_resized[1], 1, 1, 0),
      make_view(canvas[0], canvas[1], canvas_resized[0], canvas_resized[1], th, tw, 1)};

  // Work items: bands of input rows (each finishes the output rows whose first tap it holds,
  // for both views), then chunks of padding rows. Items differ in cost (a band of a view that
  // is only padded costs nothing), so threads take the next item as they finish one instead of
  // a fixed share: BANDS_PER_THREAD bands per thread keep the tail short; each band re-reads
  // the taps of its last rows (up to a row block more), which bounds how small bands are worth
  // making.
  std::vector<Item> items;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
#ifndef BANDS_PER_THREAD
#define BANDS_PER_THREAD 4
#endif
  const int64_t per = BANDS_PER_THREAD * threads;
  const int64_t band_rows = std::clamp<int64_t>((job.in_h + per - 1) / per, 32, 512);
  for (int64_t r = 0; r < job.in_h; r += band_rows)
    items.push_back({-1, r, std::min(r + band_rows, job.in_h)});
  for (int v = 0; v < 2; ++v) {
    const View& view = views[v];
    for (auto [y0, y1] : {std::pair<int64_t, int64_t>{0, view.top},
                          std::pair<int64_t, int64_t>{view.top + view.new_h, view.out_h}})
      for (int64_t y = y0; y < y1; y += 64) items.push_back({v, y, std::min(y + 64, y1)});
  }
  run_items(job, views, items, threads);

  // Masks (tiles only, legacy order): valid rows x valid columns of each patch, / p*p.
  const View& cv = views[1];
  float* m = masks.data_ptr<float>();
  const float area = static_cast<float>(patch * patch);
  auto valid = [](int64_t a0, int64_t n, int64_t lo, int64_t hi) {
    return std::max<int64_t>(0, std::min(a0 + n, hi) - std::max(a0, lo));
  };
  for (int64_t gi = 0; gi < th; ++gi)
    for (int64_t gj = 0; gj < tw; ++gj) {
      float* mt = m + (gi * tw + gj) * P;
      for (int64_t py = 0; py < pps; ++py) {
        const int64_t vr = valid(gi * stride + py * patch, patch, cv.top, cv.top + cv.new_h);
        for (int64_t px = 0; px < pps; ++px) {
          const int64_t vc =
              valid(gj * stride + px * patch, patch, cv.left, cv.left + cv.new_w);
          mt[py * pps + px] = static_cast<float>(vr * vc) / area;
        }
      }
    }
  std::fill(m + (T - 1) * P, m + T * P, -1.0f);
  return {images, masks};
}

}  // namespace

TORCH_LIBRARY(molmoe, m) {
  m.def(
      "preprocess_crops(Tensor image, int[] canvas, int[] canvas_resized, int[] global_resized, "
      "int[] tiling, int crop, int stride, int patch, float[] mean, float[] std, bool normalize)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(molmoe, CPU, m) { m.impl("preprocess_crops", &preprocess_crops_cpu); }

}  // namespace molmoe
