// flockdecode: decode attention for MLX's Linux CPU backend (one query a row over the
// preallocated cache, each row at its own position), part of the flockattn extension.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <vector>

#include "flockattn.h"

namespace fk {
namespace {

// ----------------------------------------------------------------------------- decode kernel

// Decode attention is memory-bound (a few flops per cached float), and the BLAS's products of
// (group x keys) are too thin to run near bandwidth: a 4K-context layer took 1.5 ms through
// sgemm. These loops stream each key and value row once against all the group's queries.

// scores[gi * n + j] = q_gi . k_j for j < n (queries already scaled).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void group_scores(const float* q, int group, const float* k, int64_t ldk, int n, int d,
                  float* scores, int64_t ld_scores) {
  for (int j = 0; j < n; ++j) {
    const float* kj = k + j * ldk;
    for (int gi = 0; gi < group; ++gi) {
      const float* qg = q + static_cast<size_t>(gi) * d;
      // Eight fixed lanes: the same summation order wherever the rows lie.
      float lanes[8] = {};
      int t = 0;
      for (; t + 8 <= d; t += 8) {
#pragma omp simd
        for (int l = 0; l < 8; ++l) lanes[l] += qg[t + l] * kj[t + l];
      }
      float sum = 0.f;
      for (; t < d; ++t) sum += qg[t] * kj[t];
      sum += ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
             ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
      scores[gi * ld_scores + j] = sum;
    }
  }
}

// acc[gi * d + t] += sum_j p[gi * ld_p + j] * v_j[t] for j < n.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void group_values(const float* p, int64_t ld_p, int group, const float* v, int64_t ldv, int n,
                  int d, float* acc) {
  for (int j = 0; j < n; ++j) {
    const float* vj = v + j * ldv;
    for (int gi = 0; gi < group; ++gi) {
      const float w = p[gi * ld_p + j];
      float* a = acc + static_cast<size_t>(gi) * d;
#pragma omp simd
      for (int t = 0; t < d; ++t) a[t] += w * vj[t];
    }
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
float row_max(const float* s, int n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
float exp_sum_row(float* s, int n, float m) { return exp_and_sum(s, n, m); }

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

constexpr int kDecodeBlock = 64;     // keys dequantized / streamed at a time
constexpr int kSplitKeys = 1024;     // a (row, KV head) is split across threads above this

}  // namespace

void decode_kernel(const DecodeShape& sh, const float* q, int64_t q_row, int64_t q_head,
                   const KvSource& k, const KvSource& v, const int32_t* positions,
                   int64_t pos_stride, float* out, int threads) {
  const int group = sh.heads / sh.kv_heads;
  const int d = sh.head_dim;
  const int pairs = sh.rows * sh.kv_heads;
  std::vector<int> visible(sh.rows);
  int64_t flops = 0;
  int longest = 1;
  for (int r = 0; r < sh.rows; ++r) {
    visible[r] = std::clamp(positions[r * pos_stride] + 1, 1, sh.capacity);
    flops += 4LL * visible[r] * sh.heads * d;
    longest = std::max(longest, visible[r]);
  }
  // A short context is a few microseconds of work: waking the pool (and switching OpenBLAS's
  // threads) would cost more than it saves.
  if (flops < (int64_t{1} << 21)) threads = 1;
  // With fewer (row, KV head) pairs than threads (one long sequence), each pair's keys are
  // split into ranges whose partial softmaxes are merged (flash-decoding).
  int splits = 1;
  if (threads > 1 && pairs < 2 * threads && longest >= 2 * kSplitKeys)
    splits = std::min((2 * threads + pairs - 1) / pairs, longest / kSplitKeys);
  const int items = pairs * splits;
  // Per item and query head: the partial max, sum and unnormalised output.
  std::vector<float> part_max(static_cast<size_t>(items) * group),
      part_sum(part_max.size()), part_acc(part_max.size() * d);
  std::atomic<int> next{0};
  auto work = [&](int) {
    std::vector<float> scores, kscratch, vscratch, qs(static_cast<size_t>(group) * d);
    if (k.quantized()) {
      kscratch.resize(static_cast<size_t>(kDecodeBlock) * d);
      vscratch.resize(kscratch.size());
    }
    for (;;) {
      int item = next.fetch_add(1);
      if (item >= items) return;
      int split = item % splits, pair = item / splits;
      int r = pair / sh.kv_heads, g = pair % sh.kv_heads;
      const int lo = static_cast<int>(static_cast<int64_t>(visible[r]) * split / splits);
      const int hi = static_cast<int>(static_cast<int64_t>(visible[r]) * (split + 1) / splits);
      const int n = hi - lo;
      float* m = &part_max[static_cast<size_t>(item) * group];
      float* l = &part_sum[static_cast<size_t>(item) * group];
      float* acc = &part_acc[static_cast<size_t>(item) * group * d];
      std::fill(acc, acc + static_cast<size_t>(group) * d, 0.f);
      if (n <= 0) {
        std::fill(m, m + group, -INFINITY);
        std::fill(l, l + group, 0.f);
        continue;
      }
      for (int gi = 0; gi < group; ++gi)
        scaled_copy(&qs[static_cast<size_t>(gi) * d], q + r * q_row + (g * group + gi) * q_head,
                    d, sh.scale);
      scores.resize(static_cast<size_t>(group) * n);
      for (int j0 = lo; j0 < hi; j0 += kDecodeBlock) {
        int nb = std::min(kDecodeBlock, hi - j0), ldk;
        const float* kb = k.rows(r, g, j0, nb, kscratch.data(), ldk);
        group_scores(qs.data(), group, kb, ldk, nb, d, scores.data() + (j0 - lo), n);
      }
      for (int gi = 0; gi < group; ++gi) {
        float* s = &scores[static_cast<size_t>(gi) * n];
        m[gi] = row_max(s, n);
        l[gi] = exp_sum_row(s, n, m[gi]);
      }
      for (int j0 = lo; j0 < hi; j0 += kDecodeBlock) {
        int nb = std::min(kDecodeBlock, hi - j0), ldv;
        const float* vb = v.rows(r, g, j0, nb, vscratch.data(), ldv);
        group_values(scores.data() + (j0 - lo), n, group, vb, ldv, nb, d, acc);
      }
    }
  };
  if (threads > 1)
    parallel(std::min(threads, items), work);
  else
    work(0);
  // Merge the splits (in split order, so the result does not depend on thread timing).
  for (int pair = 0; pair < pairs; ++pair) {
    int r = pair / sh.kv_heads, g = pair % sh.kv_heads;
    for (int gi = 0; gi < group; ++gi) {
      float mx_all = -INFINITY;
      for (int s = 0; s < splits; ++s)
        mx_all = std::max(mx_all, part_max[static_cast<size_t>(pair * splits + s) * group + gi]);
      float* dst = out + (static_cast<int64_t>(r) * sh.heads + g * group + gi) * d;
      float total = 0.f;
      std::fill(dst, dst + d, 0.f);
      for (int s = 0; s < splits; ++s) {
        size_t at = static_cast<size_t>(pair * splits + s) * group + gi;
        if (part_max[at] == -INFINITY) continue;
        float w = splits == 1 ? 1.f : fast_exp(part_max[at] - mx_all);
        total += w * part_sum[at];
        const float* a = &part_acc[at * d];
        for (int t = 0; t < d; ++t) dst[t] += w * a[t];
      }
      scale_row(dst, d, 1.f / total);
    }
  }
}

namespace {

class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(mx::Stream s, float scale, int threads, int bits, int group)
      : mx::Primitive(s), scale_(scale), threads_(threads), bits_(bits), group_(group) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([inputs, out_ptr = out.data<float>(), scale = scale_, threads = threads_,
                      bits = bits_, group = group_]() {
      const auto& q = inputs[0];
      const auto& p = inputs[1];
      const auto& k = inputs[2];
      DecodeShape sh{q.shape(0), q.shape(1), k.shape(1), k.shape(2), q.shape(3), scale};
      View qv = view_of(q);
      auto [kv, vv] = kv_sources(inputs, 2, bits, group, q.shape(3));
      decode_kernel(sh, qv.data, qv.strides[0], qv.strides[1], kv, vv, p.data<int32_t>(),
                    p.strides()[0], out_ptr, threads);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flockattn kernels run on the CPU only");
  }

  const char* name() const override { return "FlockDecodeAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecodeAttention&>(other);
    return scale_ == o.scale_ && threads_ == o.threads_ && bits_ == o.bits_ &&
           group_ == o.group_;
  }

 private:
  float scale_;
  int threads_, bits_, group_;
};

}  // namespace

std::shared_ptr<mx::Primitive> make_decode_attention(mx::Stream s, float scale, int threads,
                                                     int bits, int group) {
  return std::make_shared<DecodeAttention>(s, scale, threads, bits, group);
}

}  // namespace fk
