// flocklayer: a dense float32 decoder layer's decode step in three MLX CPU primitives around the
// cache writes and the attention kernel, part of the flockattn extension.
//
// At short context a decode step is the projections' weight traffic plus per-op cost: MLX's
// dispatch, an allocation and a wake of the kernel threads for each of ~11 ops a layer. Here
// - layer_entry: RMSNorm, the fused qkv projection and RoPE (outputs q, k, v as rope_qkv does);
// - layer_block: the output projection and its residual add, RMSNorm, gate_up, SwiGLU, down and
//   its residual add (the new residual stream);
// each one job of the kernel threads: every thread computes the (tiny) norm itself and a range of
// the projections' output rows (whole heads for qkv, so it ropes what it computed), with a spin
// barrier where a projection needs all of the previous one. The KV write (MLX's in-place scatter)
// and decode attention (flockdecode.cpp, which threads long contexts itself) stay separate ops.
// The sums are dense_range's and the norm's as flockops computes them.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <thread>
#include <tuple>

#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "flockattn.h"

namespace nb = nanobind;

namespace fk {
namespace {

// All `n` threads of one job meet here (spinning: the job is a few hundred microseconds).
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    const int phase = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) {
      if (spins < 8192) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0}, phase_{0};
};

// As flockops' norm_row: x * rsqrt(mean(x^2) + eps) * w, the squares summed in 16 fixed lanes.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void norm_into(const float* x, const float* w, float eps, int n, float* out) {
  float lanes[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
#pragma omp simd
    for (int l = 0; l < 16; ++l) lanes[l] += x[i + l] * x[i + l];
  }
  float sum = 0.f;
  for (; i < n; ++i) sum += x[i] * x[i];
  for (int l = 0; l < 16; ++l) sum += lanes[l];
  const float r = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
#pragma omp simd
  for (int j = 0; j < n; ++j) out[j] = (x[j] * r) * w[j];
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void swiglu_into(const float* gate, const float* up, int n, float* out) {
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    float g = gate[j];
    out[j] = g * (1.f / (1.f + fast_exp(-g))) * up[j];
  }
}

// As flockops' rope: angles (position * scale) * inv_freq, halves or interleaved pairs.
void rope_head(const float* x, const float* inv, int position, float scale, int d,
               bool traditional, float* out) {
  const int half = d / 2;
  const float p = static_cast<float>(position) * scale;
  for (int i = 0; i < half; ++i) {
    const float a = p * inv[i], c = std::cos(a), s = std::sin(a);
    if (traditional) {
      float x1 = x[2 * i], x2 = x[2 * i + 1];
      out[2 * i] = x1 * c - x2 * s;
      out[2 * i + 1] = x1 * s + x2 * c;
    } else {
      float x1 = x[i], x2 = x[i + half];
      out[i] = x1 * c - x2 * s;
      out[i + half] = x1 * s + x2 * c;
    }
  }
}

// Weights below this many floats a job stay on one thread.
constexpr int64_t kParallelWeights = 1 << 15;

int job_threads(int threads, int64_t weights) {
  return weights < kParallelWeights ? 1 : std::max(1, threads);
}

void alloc_outputs(std::vector<mx::array>& outputs, const std::vector<mx::array>& inputs,
                   mx::Stream s) {
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(s);
  for (const auto& a : inputs) encoder.set_input_array(a);
  for (auto& o : outputs) encoder.set_output_array(o);
}

struct EntrySpec {
  int heads, kv_heads, head_dim;
  float eps, rope_scale;
  bool traditional;
};

class LayerEntry : public mx::Primitive {
 public:
  LayerEntry(mx::Stream s, EntrySpec sp, int threads)
      : mx::Primitive(s), sp_(sp), threads_(threads) {}

  // Inputs h (R, 1, D), norm weight (D,), qkv weight ((H + 2 KV) d, D), positions (R,) int32,
  // inv_freqs (d / 2,); outputs q (R, H, 1, d), k, v (R, KV, 1, d), q and k roped.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    alloc_outputs(outputs, inputs, stream());
    mx::cpu::get_command_encoder(stream()).dispatch(
        [inputs, qd = outputs[0].data<float>(), kd = outputs[1].data<float>(),
         vd = outputs[2].data<float>(), sp = sp_, threads = threads_]() {
          const auto& h = inputs[0];
          const auto& wq = inputs[2];
          const int dim = h.shape(-1), rows = static_cast<int>(h.size() / dim);
          const int d = sp.head_dim, units = sp.heads + 2 * sp.kv_heads, width = units * d;
          View hv = view_of(h);
          std::vector<const float*> hs = row_pointers(h, hv);
          const float* norm_w = inputs[1].data<float>();
          const float* w = wq.data<float>();
          const int64_t ldw = wq.strides()[0];
          const int32_t* pos = inputs[3].data<int32_t>();
          const int64_t pos_stride = inputs[3].strides()[0];
          const float* inv = inputs[4].data<float>();
          std::vector<float> y(static_cast<size_t>(rows) * width);
          const int t = std::min(job_threads(threads, int64_t{width} * dim), units);
          std::atomic<int> next{0};  // heads handed out one at a time
          auto work = [&](int) {
            // Every thread norms the rows itself (a few hundred floats): no barrier.
            std::vector<float> xs(static_cast<size_t>(rows) * dim);
            std::vector<const float*> xp(rows);
            for (int r = 0; r < rows; ++r) {
              norm_into(hs[r], norm_w, sp.eps, dim, xs.data() + static_cast<size_t>(r) * dim);
              xp[r] = xs.data() + static_cast<size_t>(r) * dim;
            }
            const float* const* x = xp.data();
            take_chunks(next, units, 1, [&](int u0, int u1) {
            dense_range(w, ldw, x, rows, dim, y.data(), width, u0 * d, u1 * d);
            for (int r = 0; r < rows; ++r) {
              const float* yr = y.data() + static_cast<size_t>(r) * width;
              const int p = pos[r * pos_stride];
              for (int u = u0; u < u1; ++u) {
                if (u < sp.heads) {
                  rope_head(yr + u * d, inv, p, sp.rope_scale, d, sp.traditional,
                            qd + (static_cast<int64_t>(r) * sp.heads + u) * d);
                } else if (u < sp.heads + sp.kv_heads) {
                  const int g = u - sp.heads;
                  rope_head(yr + u * d, inv, p, sp.rope_scale, d, sp.traditional,
                            kd + (static_cast<int64_t>(r) * sp.kv_heads + g) * d);
                } else {
                  const int g = u - sp.heads - sp.kv_heads;
                  std::memcpy(vd + (static_cast<int64_t>(r) * sp.kv_heads + g) * d, yr + u * d,
                              sizeof(float) * d);
                }
              }
            }
            });
          };
          if (t <= 1)
            work(0);
          else
            run_threads(t, work);
        });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flocklayer runs on the CPU only");
  }

  const char* name() const override { return "FlockLayerEntry"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const LayerEntry&>(other);
    return sp_.heads == o.sp_.heads && sp_.kv_heads == o.sp_.kv_heads &&
           sp_.head_dim == o.sp_.head_dim && sp_.eps == o.sp_.eps &&
           sp_.rope_scale == o.sp_.rope_scale && sp_.traditional == o.sp_.traditional &&
           threads_ == o.threads_;
  }

 private:
  EntrySpec sp_;
  int threads_;
};

class LayerBlock : public mx::Primitive {
 public:
  LayerBlock(mx::Stream s, float eps, int threads)
      : mx::Primitive(s), eps_(eps), threads_(threads) {}

  // Inputs h (R, 1, D), attention output a (R, 1, H d), o weight (D, H d), ffn norm weight
  // (D,), gate_up weight (2 F, D), down weight (D, F); output
  // s + down(swiglu(gate_up(norm(s)))) with s = h + a @ o.T.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    alloc_outputs(outputs, inputs, stream());
    mx::cpu::get_command_encoder(stream()).dispatch(
        [inputs, out = outputs[0].data<float>(), eps = eps_, threads = threads_]() {
          const auto& h = inputs[0];
          const auto& a = inputs[1];
          const auto &wo = inputs[2], &wgu = inputs[4], &wd = inputs[5];
          const int dim = h.shape(-1), rows = static_cast<int>(h.size() / dim);
          const int attn = a.shape(-1), ffn = wd.shape(1);
          View hv = view_of(h), av = view_of(a);
          std::vector<const float*> hs = row_pointers(h, hv), as = row_pointers(a, av);
          const float* norm_w = inputs[3].data<float>();
          std::vector<float> s(static_cast<size_t>(rows) * dim), xs(s.size());
          std::vector<float> gu(static_cast<size_t>(rows) * 2 * ffn);
          std::vector<float> act(static_cast<size_t>(rows) * ffn);
          std::vector<const float*> xp(rows), actp(rows);
          for (int r = 0; r < rows; ++r) {
            xp[r] = xs.data() + static_cast<size_t>(r) * dim;
            actp[r] = act.data() + static_cast<size_t>(r) * ffn;
          }
          const int t = job_threads(threads, int64_t{2} * ffn * dim);
          SpinBarrier barrier(t);
          std::atomic<int> next_o{0}, next_f{0}, next_d{0};
          constexpr int kChunk = 64;  // output rows a thread takes at a time
          auto work = [&](int i) {
            // s = h + a @ o.T, in chunks of rows.
            take_chunks(next_o, dim, kChunk, [&](int o0, int o1) {
              dense_range(wo.data<float>(), wo.strides()[0], as.data(), rows, attn, s.data(),
                          dim, o0, o1);
              for (int r = 0; r < rows; ++r)
                for (int j = o0; j < o1; ++j) s[r * dim + j] += hs[r][j];
            });
            if (t > 1) barrier.wait();
            if (i == 0)
              for (int r = 0; r < rows; ++r)
                norm_into(s.data() + r * dim, norm_w, eps, dim, xs.data() + r * dim);
            if (t > 1) barrier.wait();
            // gate and up rows [f0, f1), then their SwiGLU.
            const float* w = wgu.data<float>();
            const int64_t ldw = wgu.strides()[0];
            take_chunks(next_f, ffn, kChunk, [&](int f0, int f1) {
              dense_range(w, ldw, xp.data(), rows, dim, gu.data(), 2 * ffn, f0, f1);
              dense_range(w, ldw, xp.data(), rows, dim, gu.data(), 2 * ffn, ffn + f0, ffn + f1);
              for (int r = 0; r < rows; ++r) {
                const float* g = gu.data() + static_cast<size_t>(r) * 2 * ffn;
                swiglu_into(g + f0, g + ffn + f0, f1 - f0, act.data() + r * ffn + f0);
              }
            });
            if (t > 1) barrier.wait();
            take_chunks(next_d, dim, kChunk, [&](int o0, int o1) {
              dense_range(wd.data<float>(), wd.strides()[0], actp.data(), rows, ffn, out, dim,
                          o0, o1);
              for (int r = 0; r < rows; ++r)
                for (int j = o0; j < o1; ++j) out[r * dim + j] += s[r * dim + j];
            });
          };
          if (t <= 1)
            work(0);
          else
            run_threads(t, work);
        });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flocklayer runs on the CPU only");
  }

  const char* name() const override { return "FlockLayerBlock"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const LayerBlock&>(other);
    return eps_ == o.eps_ && threads_ == o.threads_;
  }

 private:
  float eps_;
  int threads_;
};

mx::array contiguous_weight(const mx::array& w, const char* what) {
  check_float(w, what);
  if (w.ndim() != 2) throw std::invalid_argument(std::string(what) + ": (out, in)");
  return w.is_available() && w.flags().row_contiguous ? w : mx::contiguous(w);
}

std::tuple<mx::array, mx::array, mx::array> layer_entry(
    const mx::array& h, const mx::array& norm_w, const mx::array& qkv_w,
    const mx::array& positions, const mx::array& inv_freqs, int heads, int kv_heads, float eps,
    float rope_scale, bool traditional) {
  check_float(h, "h");
  check_float(norm_w, "norm_w");
  check_float(inv_freqs, "inv_freqs");
  auto w = contiguous_weight(qkv_w, "qkv_w");
  if (h.ndim() != 3 || h.shape(1) != 1 || heads <= 0 || kv_heads <= 0 ||
      w.shape(1) != h.shape(2) || w.shape(0) % (heads + 2 * kv_heads))
    throw std::invalid_argument("layer_entry: h (rows, 1, D), qkv_w ((H + 2 KV) d, D)");
  const int rows = h.shape(0), d = w.shape(0) / (heads + 2 * kv_heads);
  if (d % 2 || inv_freqs.size() != static_cast<size_t>(d / 2) ||
      positions.size() != static_cast<size_t>(rows))
    throw std::invalid_argument("layer_entry: inv_freqs (d / 2,), positions (rows,)");
  EntrySpec sp{heads, kv_heads, d, eps, rope_scale, traditional};
  auto out = mx::array::make_arrays(
      {{rows, heads, 1, d}, {rows, kv_heads, 1, d}, {rows, kv_heads, 1, d}},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<LayerEntry>(cpu_stream(), sp, kernel_threads),
      {h, norm_w, w, mx::astype(positions, mx::int32), inv_freqs});
  return {out[0], out[1], out[2]};
}

mx::array layer_block(const mx::array& h, const mx::array& attn, const mx::array& o_w,
                      const mx::array& norm_w, const mx::array& gate_up_w,
                      const mx::array& down_w, float eps) {
  check_float(h, "h");
  check_float(attn, "attn");
  check_float(norm_w, "norm_w");
  auto wo = contiguous_weight(o_w, "o_w");
  auto wgu = contiguous_weight(gate_up_w, "gate_up_w");
  auto wd = contiguous_weight(down_w, "down_w");
  const int dim = h.shape(-1);
  if (h.ndim() != 3 || attn.ndim() != 3 || attn.shape(0) != h.shape(0) ||
      wo.shape(0) != dim || wo.shape(1) != attn.shape(-1) || wgu.shape(1) != dim ||
      wd.shape(0) != dim || wgu.shape(0) != 2 * wd.shape(1))
    throw std::invalid_argument("layer_block: shapes of h, attn and the weights disagree");
  return mx::array(h.shape(), mx::float32,
                   std::make_shared<LayerBlock>(cpu_stream(), eps, kernel_threads),
                   {h, attn, wo, norm_w, wgu, wd});
}

}  // namespace

void register_layer(nb::module_& m) {
  m.def("layer_entry", &layer_entry, nb::arg("h"), nb::arg("norm_w"), nb::arg("qkv_w"),
        nb::arg("positions"), nb::arg("inv_freqs"), nb::arg("heads"), nb::arg("kv_heads"),
        nb::arg("eps"), nb::arg("rope_scale"), nb::arg("traditional"),
        "One decode token a row: rms_norm(h), the qkv projection, q and k roped; returns q "
        "(R, H, 1, d), k, v (R, KV, 1, d).");
  m.def("layer_block", &layer_block, nb::arg("h"), nb::arg("attn"), nb::arg("o_w"),
        nb::arg("norm_w"), nb::arg("gate_up_w"), nb::arg("down_w"), nb::arg("eps"),
        "s + down(swiglu(gate_up(rms_norm(s)))) with s = h + attn @ o_w.T.");
}

}  // namespace fk
