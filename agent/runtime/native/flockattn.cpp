// flockattn: fused causal attention for MLX's Linux CPU backend, as MLX custom primitives.
//
// MLX's CPU scaled_dot_product_attention materialises (heads x queries x keys) scores and runs
// the mask, softmax and their copies as separate single-threaded elementwise ops. Here prefill is
// flash-style: a block of queries of every head in a GQA group (stacked into one matrix, so the
// KV head's block is read once) against blocks of keys, with an online softmax, the block
// products through the BLAS (sgemm), and threads across (batch, KV head, query block). Decode
// attention reads each row's cache once up to that row's own position, threads across rows x KV
// heads. Both return the heads already interleaved, (batch, queries, heads * head_dim), which is
// what the output projection consumes.
//
// BLAS: configure(path) (flockthreads.cpp, with the thread pool) dlopen()s the OpenBLAS that the
// flockblas shim forwards to and calls its sgemm directly, switching OpenBLAS to one thread while
// the kernel's own threads run (MLX's CPU stream is one thread, so no other BLAS call is in
// flight). Without a path, the cblas_sgemm the process already has is used (the preloaded shim,
// else MLX's reference BLAS). Reading inputs in place (views, the KV cache's float32 or quantized
// sides): flockkv.cpp.
//
// Build (what `python -m agent.runtime.kernels build` runs): g++ -O3 -std=c++20 -shared -fPIC
// -fopenmp-simd with MLX's and nanobind's headers, nanobind's nb_combined.cpp, -lmlx.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "flockattn.h"

namespace nb = nanobind;

namespace fk {

// -------------------------------------------------------------------------------- softmax math

// One row of scores s[0, width): the first `visible` are real (the rest masked). Updates the
// running max and sum, writes the probabilities back into s (masked ones 0), and returns the
// factor by which the row's accumulated output must be rescaled.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
float online_softmax_row(float* s, int width, int visible, float& row_max, float& row_sum) {
  float m = row_max;
#pragma omp simd reduction(max : m)
  for (int j = 0; j < visible; ++j) m = s[j] > m ? s[j] : m;
  float sum = exp_and_sum(s, visible, m);
  for (int j = visible; j < width; ++j) s[j] = 0.f;
  float alpha = row_max == -INFINITY ? 0.f : fast_exp(row_max - m);
  row_sum = row_sum * alpha + sum;
  row_max = m;
  return alpha;
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void scale_row(float* x, int n, float a) {
#pragma omp simd
  for (int i = 0; i < n; ++i) x[i] *= a;
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void scaled_copy(float* dst, const float* src, int n, float a) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = src[i] * a;
}

// ---------------------------------------------------------------------------- prefill kernel

// 128 queries a block (x the GQA group's heads: 384 rows for SmolLM2): against 64 the block
// products ran 12-23% faster at 512-4,000 tokens (fewer passes over each key block).
constexpr int kQueryBlock = 128;
constexpr int kKeyBlock = 256;

struct PrefillShape {
  int batch, heads, kv_heads, queries, keys, head_dim, offset;
  float scale;
};

void prefill_kernel(const PrefillShape& sh, const View& q, const KvSource& k, const KvSource& v,
                    float* out, int threads) {
  const int group = sh.heads / sh.kv_heads;
  const int d = sh.head_dim;
  // Query blocks are aligned to absolute positions (block B holds positions [128B, 128B + 128)),
  // and every block product runs at one full shape (missing rows and keys zero-padded): a
  // query's row then sits at the same place in the same BLAS call whether its prompt is
  // prefilled in one pass or in chunks, and gets the same bits (OpenBLAS's results depend on a
  // row's place in its tile).
  const int first_block = sh.offset / kQueryBlock;
  const int qblocks = (sh.offset + sh.queries - 1) / kQueryBlock - first_block + 1;
  const int items = sh.batch * sh.kv_heads * qblocks;
  std::atomic<int> next{0};
  auto work = [&](int) {
    const int rows_max = group * kQueryBlock;
    std::vector<float> qs(static_cast<size_t>(rows_max) * d), acc(qs.size());
    std::vector<float> scores(static_cast<size_t>(rows_max) * kKeyBlock);
    std::vector<float> row_max(rows_max), row_sum(rows_max);
    std::vector<float> kpad(static_cast<size_t>(kKeyBlock) * d), vpad(kpad.size());
    for (;;) {
      int item = next.fetch_add(1);
      if (item >= items) return;
      // Last query blocks first: they see the most keys, so the tail of the schedule is short.
      int qb = qblocks - 1 - item % qblocks;
      int rest = item / qblocks;
      int g = rest % sh.kv_heads;
      int b = rest / sh.kv_heads;
      const int base = (first_block + qb) * kQueryBlock;  // the position of the block's row 0
      const int lo = std::max(base, sh.offset) - base;
      const int hi = std::min(base + kQueryBlock, sh.offset + sh.queries) - base;
      const int rows = rows_max;
      std::fill(qs.begin(), qs.end(), 0.f);
      for (int gi = 0; gi < group; ++gi) {
        int h = g * group + gi;
        for (int ii = lo; ii < hi; ++ii) {
          const float* src = q.data + b * q.strides[0] + h * q.strides[1] +
                             static_cast<int64_t>(base + ii - sh.offset) * q.strides[2];
          scaled_copy(&qs[static_cast<size_t>(gi * kQueryBlock + ii) * d], src, d, sh.scale);
        }
      }
      std::fill(acc.begin(), acc.begin() + static_cast<size_t>(rows) * d, 0.f);
      std::fill(row_max.begin(), row_max.begin() + rows, -INFINITY);
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.f);
      const int key_end = std::min(sh.keys, base + hi);
      for (int j0 = 0; j0 < key_end; j0 += kKeyBlock) {
        int width = std::min(kKeyBlock, key_end - j0);
        const float* kblock;
        const float* vblock;
        int ldk, ldv;
        if (width < kKeyBlock || k.quantized()) {
          // The block products always run at full width (the tail zero-padded, its scores
          // masked): the BLAS's summation order then does not depend on where a prompt's
          // chunks end, so chunked prefill gives bit-identical results to one pass. A
          // quantized cache's block is dequantized here, a block at a time.
          k.copy_rows(b, g, j0, width, kpad.data());
          v.copy_rows(b, g, j0, width, vpad.data());
          std::fill(kpad.begin() + static_cast<size_t>(width) * d, kpad.end(), 0.f);
          std::fill(vpad.begin() + static_cast<size_t>(width) * d, vpad.end(), 0.f);
          kblock = kpad.data(), vblock = vpad.data(), ldk = ldv = d;
        } else {
          kblock = k.rows(b, g, j0, width, nullptr, ldk);
          vblock = v.rows(b, g, j0, width, nullptr, ldv);
        }
        sgemm(1, rows, kKeyBlock, d, 1.f, qs.data(), d, kblock, ldk, 0.f, scores.data(),
              kKeyBlock);
        for (int r = 0; r < rows; ++r) {
          int ii = r % kQueryBlock;
          if (ii < lo || ii >= hi) continue;  // padding rows: zero queries, zero scores
          int visible = std::clamp(base + ii - j0 + 1, 0, width);
          float* s = &scores[static_cast<size_t>(r) * kKeyBlock];
          if (visible == 0) {
            std::fill(s, s + kKeyBlock, 0.f);
            continue;
          }
          float alpha = online_softmax_row(s, kKeyBlock, visible, row_max[r], row_sum[r]);
          if (alpha != 1.f) scale_row(&acc[static_cast<size_t>(r) * d], d, alpha);
        }
        sgemm(0, rows, d, kKeyBlock, 1.f, scores.data(), kKeyBlock, vblock, ldv, 1.f,
              acc.data(), d);
      }
      for (int gi = 0; gi < group; ++gi) {
        int h = g * group + gi;
        for (int ii = lo; ii < hi; ++ii) {
          int r = gi * kQueryBlock + ii;
          int64_t i = base + ii - sh.offset;
          float* dst = out + ((static_cast<int64_t>(b) * sh.queries + i) * sh.heads + h) * d;
          scaled_copy(dst, &acc[static_cast<size_t>(r) * d], d, 1.f / row_sum[r]);
        }
      }
    }
  };
  parallel(std::min(threads, items), work);
}

class PrefillAttention : public mx::Primitive {
 public:
  PrefillAttention(mx::Stream s, float scale, int offset, int threads, int bits, int group)
      : mx::Primitive(s), scale_(scale), offset_(offset), threads_(threads), bits_(bits),
        group_(group) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([inputs, out_ptr = out.data<float>(), scale = scale_, offset = offset_,
                      threads = threads_, bits = bits_, group = group_]() {
      const auto& q = inputs[0];
      const auto& k = inputs[1];
      PrefillShape sh{q.shape(0), q.shape(1), k.shape(1), q.shape(2), k.shape(2), q.shape(3),
                      offset, scale};
      View qv = view_of(q);
      auto [kv, vv] = kv_sources(inputs, 1, bits, group, q.shape(3));
      prefill_kernel(sh, qv, kv, vv, out_ptr, threads);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flockattn kernels run on the CPU only");
  }

  const char* name() const override { return "FlockPrefillAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const PrefillAttention&>(other);
    return scale_ == o.scale_ && offset_ == o.offset_ && threads_ == o.threads_ &&
           bits_ == o.bits_ && group_ == o.group_;
  }

 private:
  float scale_;
  int offset_, threads_, bits_, group_;
};

// ------------------------------------------------------------------------------------ ops

mx::Stream cpu_stream() { return mx::default_stream(mx::Device(mx::Device::cpu)); }

void check_float(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) throw std::invalid_argument(std::string(what) + ": float32 only");
}

// A cache side as the kernels take it: [values] float32, or [codes, scales, biases] (bits 4 or 8,
// `group` elements a scale along head_dim); checked against q's head_dim.
void check_cache(const std::vector<mx::array>& parts, int bits, int group, int head_dim,
                 const char* what) {
  std::string w = what;
  if (bits == 0) {
    if (parts.size() != 1 || parts[0].ndim() != 4 || parts[0].shape(3) != head_dim)
      throw std::invalid_argument(w + ": one float32 (batch, kv_heads, positions, head_dim) array");
    check_float(parts[0], what);
    return;
  }
  if (bits != 4 && bits != 8) throw std::invalid_argument(w + ": bits must be 4 or 8");
  if (parts.size() != 3 || group <= 0 || head_dim % group != 0)
    throw std::invalid_argument(w + ": codes, scales, biases with a group dividing head_dim");
  const auto& c = parts[0];
  if (c.ndim() != 4 || c.dtype() != mx::uint32 || c.shape(3) * 32 / bits != head_dim)
    throw std::invalid_argument(w + ": codes must be uint32 (batch, kv_heads, positions, "
                                    "head_dim * bits / 32)");
  for (int i = 1; i < 3; ++i) {
    check_float(parts[i], what);
    if (parts[i].ndim() != 4 || parts[i].shape(3) != head_dim / group ||
        parts[i].shape(2) != c.shape(2) || parts[i].shape(0) != c.shape(0) ||
        parts[i].shape(1) != c.shape(1))
      throw std::invalid_argument(w + ": scales and biases must be (..., head_dim / group)");
  }
}

std::vector<mx::array> kernel_inputs(std::initializer_list<mx::array> first,
                                     const std::vector<mx::array>& k,
                                     const std::vector<mx::array>& v) {
  std::vector<mx::array> inputs(first);
  inputs.insert(inputs.end(), k.begin(), k.end());
  inputs.insert(inputs.end(), v.begin(), v.end());
  return inputs;
}

mx::array prefill_attention(const mx::array& q, const std::vector<mx::array>& k,
                            const std::vector<mx::array>& v, float scale, int offset, int bits,
                            int group) {
  if (q.ndim() != 4) throw std::invalid_argument("prefill_attention: q (batch, heads, n, d)");
  check_float(q, "q");
  check_cache(k, bits, group, q.shape(3), "k");
  check_cache(v, bits, group, q.shape(3), "v");
  if (k[0].shape() != v[0].shape() || k[0].shape(0) != q.shape(0) ||
      q.shape(1) % k[0].shape(1) != 0)
    throw std::invalid_argument("prefill_attention: mismatched shapes");
  if (offset < 0 || k[0].shape(2) < offset + q.shape(2))
    throw std::invalid_argument("prefill_attention: keys must cover offset + queries");
  mx::Shape shape{q.shape(0), q.shape(2), q.shape(1) * q.shape(3)};
  return mx::array(shape, mx::float32,
                   std::make_shared<PrefillAttention>(cpu_stream(), scale, offset,
                                                      kernel_threads, bits, group),
                   kernel_inputs({q}, k, v));
}

mx::array decode_attention(const mx::array& q, const std::vector<mx::array>& k,
                           const std::vector<mx::array>& v, const mx::array& positions,
                           float scale, int bits, int group) {
  if (q.ndim() != 4 || q.shape(2) != 1)
    throw std::invalid_argument("decode_attention: q (rows, heads, 1, head_dim)");
  check_float(q, "q");
  check_cache(k, bits, group, q.shape(3), "k");
  check_cache(v, bits, group, q.shape(3), "v");
  if (k[0].shape() != v[0].shape() || k[0].shape(0) != q.shape(0) ||
      q.shape(1) % k[0].shape(1) != 0 || q.shape(1) / k[0].shape(1) > 64)
    throw std::invalid_argument("decode_attention: mismatched shapes");
  auto pos = mx::astype(positions, mx::int32);
  mx::Shape shape{q.shape(0), 1, q.shape(1) * q.shape(3)};
  return mx::array(shape, mx::float32,
                   make_decode_attention(cpu_stream(), scale, kernel_threads, bits, group),
                   kernel_inputs({q, pos}, k, v));
}

}  // namespace fk

using namespace fk;

NB_MODULE(_flockattn, m) {
  nb::module_::import_("mlx.core");
  m.doc() = "flock's fused CPU attention kernels (MLX custom primitives)";
  m.def("prefill_attention", &prefill_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("scale"), nb::arg("offset"), nb::arg("bits") = 0, nb::arg("group") = 0,
        "Causal attention of q (B, H, n, d) at positions [offset, offset + n) over the cache "
        "parts k, v ([values] (B, KV, >= offset + n, d), or [codes, scales, biases] with bits "
        "4/8); returns (B, n, H * d).");
  m.def("decode_attention", &decode_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("positions"), nb::arg("scale"), nb::arg("bits") = 0, nb::arg("group") = 0,
        "One query per row, q (R, H, 1, d), over cache parts (R, KV, C, ...), keys "
        "j <= positions[r] visible; returns (R, 1, H * d).");
  m.def("configure", &configure, nb::arg("blas_path"), nb::arg("threads"));
  m.def("threads", [] { return kernel_threads; });
  register_ops(m);
  register_dense(m);
  register_layer(m);
  register_moe(m);
}
