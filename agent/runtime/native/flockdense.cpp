// flockdense: the few-row float32 projections of a decode step (y = x @ W.T for 1-16 rows), as
// one MLX CPU primitive threaded over the weight's output rows, part of the flockattn extension.
//
// A decode step is memory-bound: every projection streams its whole weight (SmolLM2-135M: ~540
// MB a token, the tied LM head 113 MB of it) for a handful of dot products per weight row.
// Through MLX's matmul, the BLAS shim and OpenBLAS's sgemv each projection paid OpenBLAS's
// thread hand-off (measured on this 2-core machine under load: a 960 x 576 sgemv took 0.3 ms on
// one thread and 1.7-15 ms on two), and at 2-16 rows a GEMM whose blocking suits neither. Here
// each weight row is read from memory once and dotted with every row of x from registers
// (blocks of 4-8 weight rows x 1-2 rows of x), the threads of the kernel pool taking contiguous
// ranges of output rows. Summation order is fixed (8 lanes, then a fixed tree), so a row's
// result does not depend on the thread count or on which other rows are in the batch.

#include <immintrin.h>

#include <algorithm>
#include <memory>

#include <nanobind/stl/vector.h>

#include "flockattn.h"

namespace nb = nanobind;

namespace fk {
namespace {

// The fixed-order sum of 8 lanes (the same tree the portable path uses).
inline float sum8(const float* l) {
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return sum8(l);
}

// RW weight rows x RX rows of x, K a multiple of 8 handled in registers, the tail in scalars.
template <int RW, int RX>
__attribute__((target("avx2,fma"))) void block_avx2(const float* w, int64_t ldw,
                                                    const float* const* x, int k, float* y,
                                                    int64_t ldy) {
  __m256 acc[RW][RX];
  for (int i = 0; i < RW; ++i)
    for (int r = 0; r < RX; ++r) acc[i][r] = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= k; j += 8) {
    __m256 xv[RX];
    for (int r = 0; r < RX; ++r) xv[r] = _mm256_loadu_ps(x[r] + j);
    for (int i = 0; i < RW; ++i) {
      __m256 wv = _mm256_loadu_ps(w + i * ldw + j);
      for (int r = 0; r < RX; ++r) acc[i][r] = _mm256_fmadd_ps(wv, xv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < RW; ++i)
    for (int r = 0; r < RX; ++r) {
      float s = hsum8(acc[i][r]);
      for (int t = j; t < k; ++t) s += w[i * ldw + t] * x[r][t];
      y[r * ldy + i] = s;
    }
}

// Output rows [n0, n1) of y (rows x n, leading dimension ldy) = x @ W.T, row r of x at x[r].
__attribute__((target("avx2,fma"))) void dense_range_avx2(const float* w, int64_t ldw,
                                                          const float* const* x, int rows, int k,
                                                          float* y, int64_t ldy, int n0, int n1) {
  int i = n0;
  if (rows == 1) {
    for (; i + 8 <= n1; i += 8) block_avx2<8, 1>(w + i * ldw, ldw, x, k, y + i, ldy);
    for (; i < n1; ++i) block_avx2<1, 1>(w + i * ldw, ldw, x, k, y + i, ldy);
    return;
  }
  // Blocks of 4 weight rows (<= 24 KB at k = 1536: they stay in L1 while every pair of x rows
  // passes over them), so the weights come from memory once.
  for (; i + 4 <= n1; i += 4) {
    int r = 0;
    // 4 x 3 accumulators, 3 x rows and a weight vector: the 16 ymm registers, 7 loads a 12 FMAs.
    for (; r + 3 <= rows; r += 3) block_avx2<4, 3>(w + i * ldw, ldw, x + r, k, y + r * ldy + i, ldy);
    for (; r + 2 <= rows; r += 2) block_avx2<4, 2>(w + i * ldw, ldw, x + r, k, y + r * ldy + i, ldy);
    if (r < rows) block_avx2<4, 1>(w + i * ldw, ldw, x + r, k, y + r * ldy + i, ldy);
  }
  for (; i < n1; ++i)
    for (int r = 0; r < rows; ++r) block_avx2<1, 1>(w + i * ldw, ldw, x + r, k, y + r * ldy + i, ldy);
}

// The same sums without AVX2 (8 lanes, the same tree), for CPUs before Haswell.
void dense_range_portable(const float* w, int64_t ldw, const float* const* x, int rows, int k,
                          float* y, int64_t ldy, int n0, int n1) {
  for (int i = n0; i < n1; ++i)
    for (int r = 0; r < rows; ++r) {
      const float* wi = w + i * ldw;
      const float* xr = x[r];
      float lanes[8] = {};
      int j = 0;
      for (; j + 8 <= k; j += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += wi[j + l] * xr[j + l];
      float s = sum8(lanes);
      for (; j < k; ++j) s += wi[j] * xr[j];
      y[r * ldy + i] = s;
    }
}

const bool have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");

}  // namespace

void dense_range(const float* w, int64_t ldw, const float* const* x, int rows, int k, float* y,
                 int64_t ldy, int n0, int n1) {
  if (have_avx2)
    dense_range_avx2(w, ldw, x, rows, k, y, ldy, n0, n1);
  else
    dense_range_portable(w, ldw, x, rows, k, y, ldy, n0, n1);
}

// Output rows split into `threads` contiguous ranges, each a multiple of `unit` rows.
std::vector<const float*> row_pointers(const mx::array& a, const View& v) {
  const int nd = a.ndim();
  const int64_t last = nd ? a.shape(nd - 1) : 1;
  const size_t rows = last ? a.size() / last : 0;
  std::vector<const float*> out(rows);
  std::vector<int> idx(std::max(nd - 1, 0), 0);
  for (size_t r = 0; r < rows; ++r) {
    int64_t off = 0;
    for (int d = 0; d < nd - 1; ++d) off += idx[d] * v.strides[d];
    out[r] = v.data + off;
    for (int d = nd - 2; d >= 0; --d) {
      if (++idx[d] < a.shape(d)) break;
      idx[d] = 0;
    }
  }
  return out;
}

std::pair<int, int> split_rows(int n, int unit, int threads, int t) {
  const int units = (n + unit - 1) / unit;
  const int a = static_cast<int>(static_cast<int64_t>(units) * t / threads) * unit;
  const int b = static_cast<int>(static_cast<int64_t>(units) * (t + 1) / threads) * unit;
  return {std::min(a, n), std::min(b, n)};
}

namespace {

// Weights below this many floats stay on the calling thread (waking the pool costs more).
constexpr int64_t kParallelWeights = 1 << 15;
constexpr int kChunkRows = 64;  // weight rows a thread takes at a time (~150 KB at k = 576)

class Dense : public mx::Primitive {
 public:
  Dense(mx::Stream s, int threads) : mx::Primitive(s), threads_(threads) {}

  // Inputs x (..., k), w (n, k) row-contiguous; output (..., n).
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([x = inputs[0], w = inputs[1], y = out.data<float>(), threads = threads_]() {
      const int k = x.shape(-1), n = w.shape(0);
      const int rows = static_cast<int>(x.size() / std::max(k, 1));
      View xv = view_of(x);  // unit last stride (a copy otherwise)
      std::vector<const float*> xs = row_pointers(x, xv);
      const float* wd = w.data<float>();
      const int64_t ldw = w.strides()[0];
      int t = threads;
      if (static_cast<int64_t>(n) * k < kParallelWeights) t = 1;
      t = std::min(t, std::max(1, n / 8));
      if (t <= 1) {
        dense_range(wd, ldw, xs.data(), rows, k, y, n, 0, n);
        return;
      }
      std::atomic<int> next{0};
      run_threads(t, [&](int) {
        take_chunks(next, n, kChunkRows, [&](int a, int b) {
          dense_range(wd, ldw, xs.data(), rows, k, y, n, a, b);
        });
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flockdense runs on the CPU only");
  }

  const char* name() const override { return "FlockDense"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return threads_ == static_cast<const Dense&>(other).threads_;
  }

 private:
  int threads_;
};

mx::array dense(const mx::array& x, const mx::array& w) {
  check_float(x, "x");
  check_float(w, "w");
  if (x.ndim() < 1 || w.ndim() != 2 || w.shape(1) != x.shape(-1))
    throw std::invalid_argument("dense: x (..., k) and w (n, k)");
  // Weights are loaded (evaluated) row-contiguous; anything else is copied into that layout.
  auto wc = w.is_available() && w.flags().row_contiguous ? w : mx::contiguous(w);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  return mx::array(shape, mx::float32, std::make_shared<Dense>(cpu_stream(), kernel_threads),
                   {x, wc});
}

}  // namespace

void register_dense(nb::module_& m) {
  m.def("dense", &dense, nb::arg("x"), nb::arg("w"),
        "x (..., k) @ w.T for w (n, k) float32: a few rows of x, threaded over w's rows.");
}

}  // namespace fk
