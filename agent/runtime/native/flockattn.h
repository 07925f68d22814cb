// flockattn.h: what the extension's translation units share (flockattn.cpp: prefill attention and
// the module; flockthreads.cpp: the BLAS and the thread pool; flockkv.cpp: array views and KV
// cache sources; flockdecode.cpp: decode attention; flockops.cpp: the fused small ops of a
// decoder layer).

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"

namespace fk {

namespace mx = mlx::core;

// The runner's thread budget for the kernels (configure() sets it).
extern int kernel_threads;

// f(thread_index) on `threads` threads of a persistent pool (OpenBLAS on one thread meanwhile).
void parallel(int threads, const std::function<void(int)>& f);

// f(thread_index) on the pool without touching OpenBLAS's threads (for kernels that call no BLAS).
void run_threads(int threads, const std::function<void(int)>& f);

// Which BLAS the kernels call and how many threads they use (flockthreads.cpp).
std::string configure(const std::string& path, int threads);

// Row-major sgemm through the configured BLAS: C = alpha * A @ op(B) + beta * C.
void sgemm(int transb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
           int ldb, float beta, float* c, int ldc);

mx::Stream cpu_stream();
void check_float(const mx::array& a, const char* what);

// exp for float32 (Cephes expf polynomial, ~1 ulp), branch-free so the loops around it vectorise.
static inline __attribute__((always_inline)) float fast_exp(float x) {
  // Ternaries, not std::min/max: those are not inlined into the target_clones variants.
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365478515625f ? -87.3365478515625f : x;
  // Round to nearest by the 1.5 * 2^23 trick: no libm call, vectorisable without -ffast-math.
  float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  int bits = (static_cast<int>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// s[j] = exp(s[j] - m) for j < n, returning their sum. The sum runs in 16 fixed lanes rather than
// an omp simd reduction, whose order depends on the buffer's alignment (the vectoriser peels to
// align): a row then gives the same bits wherever it lies, so chunked prefill equals one pass.
static inline __attribute__((always_inline)) float exp_and_sum(float* s, int n, float m) {
  float lanes[16] = {};
  int j = 0;
  for (; j + 16 <= n; j += 16) {
#pragma omp simd
    for (int l = 0; l < 16; ++l) {
      float p = fast_exp(s[j + l] - m);
      s[j + l] = p;
      lanes[l] += p;
    }
  }
  float tail = 0.f;
  for (; j < n; ++j) {
    float p = fast_exp(s[j] - m);
    s[j] = p;
    tail += p;
  }
  float sum = 0.f;
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  return sum + tail;
}

// A float32 array's data with strides in elements; a copy when the last axis is not unit-stride.
struct View {
  const float* data;
  std::vector<int64_t> strides;
  std::vector<float> owned;
};

View view_of(const mx::array& a);

// One side (keys or values) of a 4-D cache (batch, kv_heads, positions, head_dim): float32, or
// MLX's affine quantization along head_dim (packed uint32 codes, a scale and a bias per group),
// read in place: `rows` hands out float32 rows, dequantizing only the ones asked for.
struct KvSource {
  View plain;
  const uint32_t* codes = nullptr;
  std::vector<int64_t> code_strides;
  View scales, biases;
  int bits = 0, group = 0, head_dim = 0;

  bool quantized() const { return bits != 0; }
  int64_t stride(int axis) const { return quantized() ? code_strides[axis] : plain.strides[axis]; }
  // Rows [j0, j0 + n) of (b, g) with leading dimension `ld`: a pointer into the float cache, or
  // those rows dequantized into `scratch` (n * head_dim floats).
  const float* rows(int b, int g, int j0, int n, float* scratch, int& ld) const;
  // The same rows always copied into `dst` (leading dimension head_dim).
  void copy_rows(int b, int g, int j0, int n, float* dst) const;
};

// A cache side from its arrays: {values} float32, or {codes, scales, biases} quantized.
KvSource kv_source(const std::vector<mx::array>& parts, int bits, int group, int head_dim);

// The keys' and values' sources of a kernel's inputs: from inputs[first], one array each float32,
// three each quantized (codes, scales, biases).
std::pair<KvSource, KvSource> kv_sources(const std::vector<mx::array>& inputs, size_t first,
                                         int bits, int group, int head_dim);

struct DecodeShape {
  int rows, heads, kv_heads, capacity, head_dim;
  float scale;
};

// One query per row (head h of row r at q + r * q_row + h * q_head) against keys
// [0, positions[r]] of each row's cache; out (rows, heads * head_dim).
void decode_kernel(const DecodeShape& sh, const float* q, int64_t q_row, int64_t q_head,
                   const KvSource& k,
                   const KvSource& v, const int32_t* positions, int64_t pos_stride, float* out,
                   int threads);

// The decode attention primitive (flockdecode.cpp): inputs q, positions, then kv_sources' parts.
std::shared_ptr<mx::Primitive> make_decode_attention(mx::Stream s, float scale, int threads,
                                                     int bits, int group);

// The fused small ops (flockops.cpp), added to the module.
void register_ops(nanobind::module_& m);

// Few-row projections (flockdense.cpp): output rows [n0, n1) of y (rows x n, leading dimension
// ldy) = x @ W.T, W (n, k) with leading dimension ldw, row r of x at x[r].
void dense_range(const float* w, int64_t ldw, const float* const* x, int rows, int k, float* y,
                 int64_t ldy, int n0, int n1);
// Thread t's share [first, end) of n output rows split into `threads` multiples of `unit`.
std::pair<int, int> split_rows(int n, int unit, int threads, int t);
// Work handed out in chunks of `chunk` rows of [0, n) to whichever thread asks next (an atomic
// counter shared by the job's threads): on a busy machine a descheduled thread then delays the
// job by one chunk, not by its whole static share. f(first, end) for each chunk taken.
template <typename F>
void take_chunks(std::atomic<int>& next, int n, int chunk, const F& f) {
  for (;;) {
    const int64_t first = static_cast<int64_t>(next.fetch_add(1, std::memory_order_relaxed)) * chunk;
    if (first >= n) return;
    f(static_cast<int>(first), static_cast<int>(std::min<int64_t>(first + chunk, n)));
  }
}

// Pointers to the rows (last axis) of a float32 array, through its view.
std::vector<const float*> row_pointers(const mx::array& a, const View& v);
void register_dense(nanobind::module_& m);
// The fused decode layer (flocklayer.cpp).
void register_layer(nanobind::module_& m);
// A few rows' mixture-of-experts MLP (flockmoe.cpp).
void register_moe(nanobind::module_& m);

}  // namespace fk
