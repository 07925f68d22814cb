// flockops: the small ops of a decoder layer fused into single MLX CPU primitives.
//
// On MLX's CPU backend mx.fast.rms_norm and mx.fast.rope run as their fallbacks (about six
// elementwise and reduction ops each), and a decode step of SmolLM2 spends ~18% of its time in
// ~40 such small ops a layer (norms, rope, splits, the KV writes, residual adds, SiLU). Here:
// - rms_norm / add_rms_norm: the residual add and the norm of its result in one pass;
// - swiglu: silu(gate) * up over the fused gate_up projection's output;
// - rope_qkv: the fused qkv projection's output split into q, k, v in the heads-first layout
//   the caches take, q and k roped (one pass instead of split, reshape, transpose, and rope's
//   slices, products and concatenation for each); rope_norm_qkv also RMS-norms each q and k
//   head first (qwen3's q_norm / k_norm). The KV write itself stays MLX's scatter /
//   slice update, which writes the cache in place: an extension primitive that outputs the cache
//   could not take over its buffer (the input was never donatable), so it copied the cache.
// Rows (tokens) are split across the kernel threads when there are enough of them.

#include <algorithm>
#include <cmath>
#include <memory>
#include <tuple>

#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "flockattn.h"

namespace nb = nanobind;

namespace fk {
namespace {

// Elements below which a pass stays on the calling thread (waking the pool costs ~10-30 us).
constexpr int64_t kParallelElements = 1 << 16;

// f(first_row, end_row) over [0, rows), split across the kernel threads when the work is large.
void for_rows(int64_t rows, int64_t per_row, int threads,
              const std::function<void(int64_t, int64_t)>& f) {
  int t = static_cast<int>(std::min<int64_t>(threads, rows));
  if (t <= 1 || rows * per_row < kParallelElements) {
    f(0, rows);
    return;
  }
  parallel(t, [&](int i) { f(rows * i / t, rows * (i + 1) / t); });
}

// A float32 array's contents in row-major order: its data when it is row-contiguous, else a copy.
struct Rows {
  const float* data;
  std::vector<float> owned;
};

Rows rows_of(const mx::array& a) {
  if (a.flags().row_contiguous) return {a.data<float>(), {}};
  View v = view_of(a);  // unit last stride (or a gathered copy); leading axes may be strided
  Rows r;
  r.owned.resize(a.size());
  const int nd = a.ndim();
  const int64_t last = a.shape(nd - 1);
  std::vector<int> idx(nd, 0);
  for (size_t row = 0; row < a.size() / last; ++row) {
    int64_t off = 0;
    for (int d = 0; d < nd - 1; ++d) off += idx[d] * v.strides[d];
    std::memcpy(&r.owned[row * last], v.data + off, sizeof(float) * last);
    for (int d = nd - 2; d >= 0; --d) {
      if (++idx[d] < a.shape(d)) break;
      idx[d] = 0;
    }
  }
  r.data = r.owned.data();
  return r;
}

// ------------------------------------------------------------------------------ RMSNorm, SiLU

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void norm_row(const float* x, const float* w, float eps, int n, float* out) {
  // As MLX's fallback: x * rsqrt(mean(x^2) + eps), then * w, in float32.
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
void add_row(const float* a, const float* b, int n, float* out) {
#pragma omp simd
  for (int j = 0; j < n; ++j) out[j] = a[j] + b[j];
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void swiglu_row(const float* gate, const float* up, int n, float* out) {
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    float g = gate[j];
    out[j] = g * (1.f / (1.f + fast_exp(-g))) * up[j];
  }
}

class RmsNorm : public mx::Primitive {
 public:
  RmsNorm(mx::Stream s, float eps, bool add, int threads)
      : mx::Primitive(s), eps_(eps), add_(add), threads_(threads) {}

  // Inputs x, w (or h, delta, w with `add`); outputs norm(x) (or h + delta, norm(h + delta)).
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    for (auto& o : outputs) encoder.set_output_array(o);
    std::vector<float*> outs;
    for (auto& o : outputs) outs.push_back(o.data<float>());
    encoder.dispatch([inputs, outs, eps = eps_, add = add_, threads = threads_]() {
      const auto& x = inputs[0];
      const int n = x.shape(-1);
      const int64_t rows = x.size() / n;
      Rows a = rows_of(x);
      Rows b = add ? rows_of(inputs[1]) : Rows{nullptr, {}};
      Rows w = rows_of(inputs.back());
      for_rows(rows, n, threads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float* src = a.data + r * n;
          if (add) {
            add_row(src, b.data + r * n, n, outs[0] + r * n);
            src = outs[0] + r * n;
          }
          norm_row(src, w.data, eps, n, outs.back() + r * n);
        }
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flockops kernels run on the CPU only");
  }

  const char* name() const override { return "FlockRmsNorm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const RmsNorm&>(other);
    return eps_ == o.eps_ && add_ == o.add_ && threads_ == o.threads_;
  }

 private:
  float eps_;
  bool add_;
  int threads_;
};

class Swiglu : public mx::Primitive {
 public:
  Swiglu(mx::Stream s, int threads) : mx::Primitive(s), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(inputs[0]);
    encoder.set_output_array(out);
    encoder.dispatch([x = inputs[0], dst = out.data<float>(), threads = threads_]() {
      const int n = x.shape(-1) / 2;
      const int64_t rows = x.size() / (2 * n);
      Rows a = rows_of(x);
      for_rows(rows, 2 * n, threads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          swiglu_row(a.data + r * 2 * n, a.data + r * 2 * n + n, n, dst + r * n);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flockops kernels run on the CPU only");
  }

  const char* name() const override { return "FlockSwiglu"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return threads_ == static_cast<const Swiglu&>(other).threads_;
  }

 private:
  int threads_;
};

// ------------------------------------------------------------------------------ RoPE + KV write

struct RopeSpec {
  int heads, kv_heads, head_dim;
  float scale;  // the positions' scale (nn.RoPE's `scale`)
  bool traditional;
  bool norms = false;  // qwen3: each q and k head RMS-normed (weights q_norm, k_norm) first
  float eps = 0.f;
};

// cos and sin of (position * scale) * inv_freq[i], as step._rope_angles / MLX's rope compute.
void angles(const float* inv_freqs, int half, int position, float scale, float* c, float* s) {
  const float p = static_cast<float>(position) * scale;
  for (int i = 0; i < half; ++i) {
    float a = p * inv_freqs[i];
    c[i] = std::cos(a);
    s[i] = std::sin(a);
  }
}

void rope(const float* x, const float* c, const float* s, int d, bool traditional, float* out) {
  const int half = d / 2;
  if (traditional) {
    for (int i = 0; i < half; ++i) {
      float x1 = x[2 * i], x2 = x[2 * i + 1];
      out[2 * i] = x1 * c[i] - x2 * s[i];
      out[2 * i + 1] = x1 * s[i] + x2 * c[i];
    }
    return;
  }
  for (int i = 0; i < half; ++i) {
    float x1 = x[i], x2 = x[i + half];
    out[i] = x1 * c[i] - x2 * s[i];
    out[i + half] = x1 * s[i] + x2 * c[i];
  }
}

// One token's qkv row (heads + 2 * kv_heads vectors of head_dim): q roped into q_out (heads *
// head_dim, contiguous), k roped and v copied to k_out / v_out (kv head g at + g * kv_stride).
// With sp.norms each q and k head is first RMS-normed with q_norm / k_norm (as mx.fast.rms_norm
// over head_dim), into `scratch` (head_dim floats).
void rope_token(const RopeSpec& sp, const float* qkv, const float* c, const float* s,
                float* q_out, int64_t q_head, float* k_out, float* v_out, int64_t kv_stride,
                const float* q_norm = nullptr, const float* k_norm = nullptr,
                float* scratch = nullptr) {
  const int d = sp.head_dim;
  auto normed = [&](const float* x, const float* w) {
    if (!sp.norms) return x;
    norm_row(x, w, sp.eps, d, scratch);
    return const_cast<const float*>(scratch);
  };
  for (int h = 0; h < sp.heads; ++h)
    rope(normed(qkv + h * d, q_norm), c, s, d, sp.traditional, q_out + h * q_head);
  for (int g = 0; g < sp.kv_heads; ++g) {
    rope(normed(qkv + (sp.heads + g) * d, k_norm), c, s, d, sp.traditional,
         k_out + g * kv_stride);
    std::memcpy(v_out + g * kv_stride, qkv + (sp.heads + sp.kv_heads + g) * d, sizeof(float) * d);
  }
}

class RopeQkv : public mx::Primitive {
 public:
  RopeQkv(mx::Stream s, RopeSpec spec, int threads)
      : mx::Primitive(s), spec_(spec), threads_(threads) {}

  // Inputs qkv (R, n, (H + 2 KV) d), positions (R * n,) int32 (token t of row r at
  // positions[r * n + t]), inv_freqs (d / 2,), with spec.norms q_norm (d,) and k_norm (d,);
  // outputs q (R, H, n, d), k, v (R, KV, n, d), q and k (normed and) roped: the layout the
  // caches and the attention kernels take.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    for (auto& o : outputs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    for (auto& o : outputs) encoder.set_output_array(o);
    // Raw pointers to the outputs, not the arrays: a queued task holding an output array would
    // keep the ops after it from taking over its buffer.
    encoder.dispatch([inputs, qd = outputs[0].data<float>(), kd = outputs[1].data<float>(),
                      vd = outputs[2].data<float>(), sp = spec_, threads = threads_]() {
      const auto& qkv = inputs[0];
      const int rows = qkv.shape(0), n = qkv.shape(1), d = sp.head_dim, half = d / 2;
      const int64_t width = qkv.shape(2);
      Rows x = rows_of(qkv);
      const int32_t* pos = inputs[1].data<int32_t>();
      const int64_t pos_stride = inputs[1].strides()[0];
      const float* inv = inputs[2].data<float>();
      Rows qn = sp.norms ? rows_of(inputs[3]) : Rows{nullptr, {}};
      Rows kn = sp.norms ? rows_of(inputs[4]) : Rows{nullptr, {}};
      const int64_t tokens = static_cast<int64_t>(rows) * n;
      for_rows(tokens, width, threads, [&](int64_t t0, int64_t t1) {
        std::vector<float> c(half), s(half), scratch(d);
        for (int64_t i = t0; i < t1; ++i) {
          const int64_t r = i / n, t = i % n;
          angles(inv, half, pos[i * pos_stride], sp.scale, c.data(), s.data());
          rope_token(sp, x.data + i * width, c.data(), s.data(),
                     qd + (r * sp.heads * n + t) * d, static_cast<int64_t>(n) * d,
                     kd + (r * sp.kv_heads * n + t) * d, vd + (r * sp.kv_heads * n + t) * d,
                     static_cast<int64_t>(n) * d, qn.data, kn.data, scratch.data());
        }
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flockops kernels run on the CPU only");
  }

  const char* name() const override { return "FlockRopeQkv"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const RopeQkv&>(other);
    return spec_.heads == o.spec_.heads && spec_.kv_heads == o.spec_.kv_heads &&
           spec_.head_dim == o.spec_.head_dim && spec_.scale == o.spec_.scale &&
           spec_.traditional == o.spec_.traditional && spec_.norms == o.spec_.norms &&
           spec_.eps == o.spec_.eps && threads_ == o.threads_;
  }

 private:
  RopeSpec spec_;
  int threads_;
};

// ------------------------------------------------------------------------------------ ops

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps) {
  check_float(x, "x");
  check_float(w, "w");
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1))
    throw std::invalid_argument("rms_norm: x (..., n) and w (n,)");
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<RmsNorm>(cpu_stream(), eps, false, kernel_threads), {x, w});
}

std::tuple<mx::array, mx::array> add_rms_norm(const mx::array& h, const mx::array& delta,
                                              const mx::array& w, float eps) {
  check_float(h, "h");
  check_float(delta, "delta");
  check_float(w, "w");
  if (h.shape() != delta.shape() || w.ndim() != 1 || w.shape(0) != h.shape(-1))
    throw std::invalid_argument("add_rms_norm: h, delta (..., n) and w (n,)");
  auto out = mx::array::make_arrays(
      {h.shape(), h.shape()}, {mx::float32, mx::float32},
      std::make_shared<RmsNorm>(cpu_stream(), eps, true, kernel_threads), {h, delta, w});
  return {out[0], out[1]};
}

mx::array swiglu(const mx::array& gate_up) {
  check_float(gate_up, "gate_up");
  if (gate_up.ndim() < 1 || gate_up.shape(-1) % 2)
    throw std::invalid_argument("swiglu: (..., 2 n)");
  auto shape = gate_up.shape();
  shape.back() /= 2;
  return mx::array(shape, mx::float32, std::make_shared<Swiglu>(cpu_stream(), kernel_threads),
                   {gate_up});
}

std::tuple<mx::array, mx::array, mx::array> rope_qkv_impl(
    const mx::array& qkv, const mx::array& positions, const mx::array& inv_freqs, int heads,
    int kv_heads, float rope_scale, bool traditional, const mx::array* q_norm,
    const mx::array* k_norm, float eps) {
  check_float(qkv, "qkv");
  check_float(inv_freqs, "inv_freqs");
  if (qkv.ndim() != 3 || heads <= 0 || kv_heads <= 0 || heads % kv_heads ||
      qkv.shape(2) % (heads + 2 * kv_heads))
    throw std::invalid_argument("rope_qkv: qkv (rows, n, (heads + 2 kv_heads) head_dim)");
  RopeSpec sp{heads, kv_heads, qkv.shape(2) / (heads + 2 * kv_heads), rope_scale, traditional};
  if (sp.head_dim % 2 || inv_freqs.ndim() != 1 || inv_freqs.shape(0) != sp.head_dim / 2)
    throw std::invalid_argument("rope_qkv: inv_freqs must be (head_dim / 2,)");
  const int rows = qkv.shape(0), n = qkv.shape(1);
  if (positions.ndim() != 1 || positions.shape(0) != rows * n)
    throw std::invalid_argument("rope_qkv: one position per token (rows * n,)");
  auto pos = mx::astype(positions, mx::int32);
  std::vector<mx::array> inputs{qkv, pos, inv_freqs};
  if (q_norm != nullptr) {
    for (const mx::array* w : {q_norm, k_norm}) {
      check_float(*w, "q_norm / k_norm");
      if (w->ndim() != 1 || w->shape(0) != sp.head_dim)
        throw std::invalid_argument("rope_norm_qkv: q_norm and k_norm must be (head_dim,)");
      inputs.push_back(*w);
    }
    sp.norms = true;
    sp.eps = eps;
  }
  auto out = mx::array::make_arrays(
      {{rows, heads, n, sp.head_dim}, {rows, kv_heads, n, sp.head_dim},
       {rows, kv_heads, n, sp.head_dim}},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<RopeQkv>(cpu_stream(), sp, kernel_threads), inputs);
  return {out[0], out[1], out[2]};
}

std::tuple<mx::array, mx::array, mx::array> rope_qkv(const mx::array& qkv,
                                                     const mx::array& positions,
                                                     const mx::array& inv_freqs, int heads,
                                                     int kv_heads, float rope_scale,
                                                     bool traditional) {
  return rope_qkv_impl(qkv, positions, inv_freqs, heads, kv_heads, rope_scale, traditional,
                       nullptr, nullptr, 0.f);
}

std::tuple<mx::array, mx::array, mx::array> rope_norm_qkv(
    const mx::array& qkv, const mx::array& positions, const mx::array& inv_freqs, int heads,
    int kv_heads, float rope_scale, bool traditional, const mx::array& q_norm,
    const mx::array& k_norm, float eps) {
  return rope_qkv_impl(qkv, positions, inv_freqs, heads, kv_heads, rope_scale, traditional,
                       &q_norm, &k_norm, eps);
}

}  // namespace

void register_ops(nb::module_& m) {
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("w"), nb::arg("eps"),
        "mx.fast.rms_norm(x, w, eps) in one pass.");
  m.def("add_rms_norm", &add_rms_norm, nb::arg("h"), nb::arg("delta"), nb::arg("w"),
        nb::arg("eps"), "(h + delta, rms_norm(h + delta, w, eps)).");
  m.def("swiglu", &swiglu, nb::arg("gate_up"),
        "silu(gate) * up of gate_up = concatenate([gate, up], -1).");
  m.def("rope_qkv", &rope_qkv, nb::arg("qkv"), nb::arg("positions"), nb::arg("inv_freqs"),
        nb::arg("heads"), nb::arg("kv_heads"), nb::arg("rope_scale"), nb::arg("traditional"),
        "The fused qkv projection's output (R, n, (H + 2 KV) d) split into q (R, H, n, d), k, v "
        "(R, KV, n, d), q and k roped at angles (position * rope_scale) * inv_freqs.");
  m.def("rope_norm_qkv", &rope_norm_qkv, nb::arg("qkv"), nb::arg("positions"),
        nb::arg("inv_freqs"), nb::arg("heads"), nb::arg("kv_heads"), nb::arg("rope_scale"),
        nb::arg("traditional"), nb::arg("q_norm"), nb::arg("k_norm"), nb::arg("eps"),
        "rope_qkv with each q and k head RMS-normed (weights q_norm, k_norm (head_dim,)) before "
        "its rotation, as qwen3's attention does.");
}

}  // namespace fk
