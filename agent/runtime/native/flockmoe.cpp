// flockmoe: a decode step's mixture-of-experts MLP for a few rows, the selected experts' SwiGLU
// and down projections and their weighted sum in one MLX CPU primitive, part of the flockattn
// extension.
//
// Through mx.gather_mm a decode step runs each (token, expert) pair as its own matrix-vector
// product through the BLAS (with its thread hand-off each time), then MLX's SwiGLU, the down
// gather and the weighted sum as separate ops; at 1-8 rows each product is a few MB of weights
// for one dot product per weight row, so the step is bandwidth and per-op cost. Here the pairs
// are grouped by expert (each selected expert's weights are read once for all the rows that
// chose it) and the work is cut into tasks of (expert, a chunk of the expert's width): a task
// computes its chunk of gate and up for the expert's rows (dense_range: every weight row dotted
// with the rows of x from registers), SwiGLU, and that chunk's share of the down projection
// into its own partial sums, so one job of the kernel threads (taking tasks as they free up)
// streams all the weights once without a barrier. The partials are then summed in chunk order
// and the pairs weighted by their routing scores in top-k order: the result of a row depends
// neither on the thread count nor on the other rows of the batch.
//
// The experts' down projections are in model.experts_down's layout (experts, width, hidden):
// a task's down share is an axpy over contiguous weight rows of the hidden width.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <vector>

#include <nanobind/stl/vector.h>

#include "flockattn.h"

namespace nb = nanobind;

namespace fk {
namespace {

// Rows of the expert width a task takes (gate, up and down: 3 x 64 rows x hidden floats, 768 KB
// at hidden 1024): enough tasks to balance two threads at top 4, few partial sums to add.
constexpr int kChunk = 64;

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void swiglu_span(const float* gate, const float* up, int n, float* out) {
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    float g = gate[j];
    out[j] = g * (1.f / (1.f + fast_exp(-g))) * up[j];
  }
}

// y[0, n) += a * w[0, n)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void axpy(float a, const float* w, int n, float* y) {
#pragma omp simd
  for (int j = 0; j < n; ++j) y[j] += a * w[j];
}

// y[0, n) += x[0, n)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void add_into(const float* x, int n, float* y) {
#pragma omp simd
  for (int j = 0; j < n; ++j) y[j] += x[j];
}

class MoeExperts : public mx::Primitive {
 public:
  MoeExperts(mx::Stream s, int threads) : mx::Primitive(s), threads_(threads) {}

  // Inputs x (..., D), inds (..., K) int32, scores (..., K) float32, gate_up (E, 2W, D) with the
  // gate rows first, down (E, W, D); output (..., D): sum_j scores[j] * down_e(swiglu(x)).
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([inputs, y = out.data<float>(), threads = threads_]() {
      const auto& x = inputs[0];
      const auto& gu = inputs[3];
      const auto& dn = inputs[4];
      const int d = x.shape(-1), k = inputs[1].shape(-1);
      const int experts = gu.shape(0), width = gu.shape(1) / 2;
      const int rows = static_cast<int>(x.size() / std::max(d, 1));
      const int pairs = rows * k;
      View xv = view_of(x);
      std::vector<const float*> xs = row_pointers(x, xv);
      const int32_t* inds = inputs[1].data<int32_t>();
      const float* scores = inputs[2].data<float>();
      // The pairs in expert order (a counting sort: stable, so a row's pairs keep top-k order
      // within an expert); pair p = r * K + j sits at sorted position pos[p].
      std::vector<int> count(experts + 1, 0), pos(pairs), order(pairs);
      // An index out of range (never from a router's top k) is clamped rather than read past
      // the weights.
      std::vector<int> expert_of(pairs);
      for (int p = 0; p < pairs; ++p) {
        expert_of[p] = std::clamp(inds[p], 0, experts - 1);
        ++count[expert_of[p] + 1];
      }
      for (int e = 0; e < experts; ++e) count[e + 1] += count[e];
      {
        std::vector<int> fill(count.begin(), count.end() - 1);
        for (int p = 0; p < pairs; ++p) {
          pos[p] = fill[expert_of[p]]++;
          order[pos[p]] = p;
        }
      }
      std::vector<int> used;  // the selected experts
      for (int e = 0; e < experts; ++e)
        if (count[e + 1] > count[e]) used.push_back(e);
      const int chunks = (width + kChunk - 1) / kChunk;
      const int tasks = static_cast<int>(used.size()) * chunks;
      // Sorted pairs' rows of x; gate, up and the activation (pairs x W); the down partials
      // (chunks x pairs x D), each written by one task only.
      std::vector<const float*> xsorted(pairs);
      for (int s = 0; s < pairs; ++s) xsorted[s] = xs[order[s] / k];
      std::vector<float> gate(static_cast<size_t>(pairs) * width),
          up(static_cast<size_t>(pairs) * width), act(static_cast<size_t>(pairs) * width),
          partial(static_cast<size_t>(chunks) * pairs * d, 0.f);
      const float* gud = gu.data<float>();
      const float* dnd = dn.data<float>();
      const int64_t gu_expert = gu.strides()[0], dn_expert = dn.strides()[0];
      auto task = [&](int t) {
        const int e = used[t / chunks], c = t % chunks;
        const int first = count[e], n = count[e + 1] - count[e];
        const int a = c * kChunk, b = std::min(width, a + kChunk);
        const float* wg = gud + e * gu_expert;
        const float* wu = wg + static_cast<int64_t>(width) * d;
        float* g = gate.data() + static_cast<size_t>(first) * width;
        float* u = up.data() + static_cast<size_t>(first) * width;
        dense_range(wg, d, xsorted.data() + first, n, d, g, width, a, b);
        dense_range(wu, d, xsorted.data() + first, n, d, u, width, a, b);
        float* ac = act.data() + static_cast<size_t>(first) * width;
        for (int s = 0; s < n; ++s)
          swiglu_span(g + s * width + a, u + s * width + a, b - a, ac + s * width + a);
        const float* wd = dnd + e * dn_expert;
        float* part = partial.data() + (static_cast<size_t>(c) * pairs + first) * d;
        for (int w = a; w < b; ++w)
          for (int s = 0; s < n; ++s) axpy(ac[s * width + w], wd + static_cast<int64_t>(w) * d, d,
                                           part + static_cast<size_t>(s) * d);
      };
      const int t = std::min(threads, tasks);
      if (t <= 1) {
        for (int i = 0; i < tasks; ++i) task(i);
      } else {
        std::atomic<int> next{0};
        run_threads(t, [&](int) { take_chunks(next, tasks, 1, [&](int i, int) { task(i); }); });
      }
      // Each pair's down output: its partials summed in chunk order (into chunk 0's).
      for (int c = 1; c < chunks; ++c)
        add_into(partial.data() + static_cast<size_t>(c) * pairs * d,
                 pairs * d, partial.data());
      for (int r = 0; r < rows; ++r) {
        float* yr = y + static_cast<size_t>(r) * d;
        std::fill(yr, yr + d, 0.f);
        for (int j = 0; j < k; ++j)
          axpy(scores[r * k + j], partial.data() + static_cast<size_t>(pos[r * k + j]) * d, d, yr);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flockmoe runs on the CPU only");
  }

  const char* name() const override { return "FlockMoeExperts"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return threads_ == static_cast<const MoeExperts&>(other).threads_;
  }

 private:
  int threads_;
};

mx::array moe_experts(const mx::array& x, const mx::array& inds, const mx::array& scores,
                      const mx::array& gate_up, const mx::array& down) {
  check_float(x, "x");
  check_float(gate_up, "gate_up");
  check_float(down, "down");
  const int d = x.ndim() ? x.shape(-1) : 0;
  if (x.ndim() < 1 || gate_up.ndim() != 3 || down.ndim() != 3 || gate_up.shape(2) != d ||
      gate_up.shape(1) % 2 || down.shape(0) != gate_up.shape(0) ||
      down.shape(1) != gate_up.shape(1) / 2 || down.shape(2) != d)
    throw std::invalid_argument(
        "moe_experts: x (..., D), gate_up (E, 2W, D), down (E, W, D)");
  if (inds.ndim() < 1 || inds.shape() != scores.shape() ||
      inds.size() / inds.shape(-1) != x.size() / std::max(d, 1))
    throw std::invalid_argument("moe_experts: inds and scores (..., K), one row per row of x");
  auto c = [](const mx::array& a) {
    return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a);
  };
  auto idx = mx::contiguous(mx::astype(inds, mx::int32));
  auto sc = mx::contiguous(mx::astype(scores, mx::float32));
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<MoeExperts>(cpu_stream(), kernel_threads),
                   {x, idx, sc, c(gate_up), c(down)});
}

}  // namespace

void register_moe(nb::module_& m) {
  m.def("moe_experts", &moe_experts, nb::arg("x"), nb::arg("inds"), nb::arg("scores"),
        nb::arg("gate_up"), nb::arg("down"),
        "sum_j scores[..., j] * down[e_j] @ swiglu(gate_up[e_j] @ x) for e_j = inds[..., j]: x "
        "(..., D), gate_up (E, 2W, D) gate rows first, down (E, W, D); returns (..., D).");
}

}  // namespace fk
