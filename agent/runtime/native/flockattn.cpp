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
// BLAS: configure(path) dlopen()s the OpenBLAS that the flockblas shim forwards to and calls its
// sgemm directly, switching OpenBLAS to one thread while the kernel's own threads run (MLX's CPU
// stream is one thread, so no other BLAS call is in flight). Without a path, the cblas_sgemm the
// process already has is used (the preloaded shim, else MLX's reference BLAS).
//
// Build (what `python -m agent.runtime.kernels build` runs): g++ -O3 -std=c++20 -shared -fPIC
// -fopenmp-simd with MLX's and nanobind's headers, nanobind's nb_combined.cpp, -lmlx.

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"

namespace nb = nanobind;
namespace mx = mlx::core;

extern "C" void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta,
                            float* c, int ldc);

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                          int, float, float*, int);
using set_threads_fn = void (*)(int);
using get_threads_fn = int (*)(void);

struct Blas {
  sgemm_fn sgemm = &cblas_sgemm;
  set_threads_fn set_threads = nullptr;
  get_threads_fn get_threads = nullptr;
  std::string origin = "linked cblas_sgemm";
};

Blas blas;
int kernel_threads = 1;

// ---------------------------------------------------------------------------------- threads

// A persistent pool: decode calls the kernels once a layer per step, too often to spawn threads.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  // f(thread_index) on `threads` threads, the caller being thread 0; returns when all are done.
  void run(int threads, const std::function<void(int)>& f) {
    if (threads <= 1) {
      f(0);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mu_);
    {
      std::unique_lock<std::mutex> lock(mu_);
      while (static_cast<int>(workers_.size()) < threads - 1) {
        int index = static_cast<int>(workers_.size()) + 1;
        workers_.emplace_back([this, index] { loop(index); });
      }
      job_ = &f;
      active_ = threads;
      pending_ = threads - 1;
      ++generation_;
    }
    wake_.notify_all();
    f(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(int index) {
    unsigned long seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (index >= active_) continue;
        job = job_;
      }
      (*job)(index);
      {
        std::lock_guard<std::mutex> lock(mu_);
        --pending_;
      }
      done_.notify_one();
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  unsigned long generation_ = 0;
  int active_ = 0, pending_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  static Pool* p = new Pool();  // leaked on purpose: joining threads at exit races interpreter teardown
  return *p;
}

// Runs f on the kernel's threads with OpenBLAS on one thread meanwhile: each of our threads
// calls sgemm, and OpenBLAS's own workers would oversubscribe the runner's cores (even with one
// kernel thread, OpenBLAS splitting these small block products costs more than it gains: a 4K
// prefill layer took 17.7 s of CPU instead of ~1).
void parallel(int threads, const std::function<void(int)>& f) {
  int previous = 0;
  bool restore = blas.set_threads && blas.get_threads && (previous = blas.get_threads()) > 1;
  if (restore) blas.set_threads(1);
  try {
    pool().run(threads, f);
  } catch (...) {
    if (restore) blas.set_threads(previous);
    throw;
  }
  if (restore) blas.set_threads(previous);
}

// -------------------------------------------------------------------------------- softmax math

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

// ----------------------------------------------------------------------------- array helpers

// A float32 array's data with strides in elements; a copy when the last axis is not unit-stride.
struct View {
  const float* data;
  std::vector<int64_t> strides;
  std::vector<float> owned;
};

View view_of(const mx::array& a) {
  View v;
  const auto& st = a.strides();
  v.strides.assign(st.begin(), st.end());
  if (a.ndim() == 0 || st.back() == 1 || a.shape().back() == 1) {
    v.data = a.data<float>();
    return v;
  }
  // Gather into row-major order (rare: every caller's last axis is contiguous today).
  size_t total = a.size();
  v.owned.resize(total);
  const float* src = a.data<float>();
  int nd = a.ndim();
  std::vector<int> idx(nd, 0);
  for (size_t i = 0; i < total; ++i) {
    int64_t off = 0;
    for (int d = 0; d < nd; ++d) off += idx[d] * st[d];
    v.owned[i] = src[off];
    for (int d = nd - 1; d >= 0; --d) {
      if (++idx[d] < a.shape(d)) break;
      idx[d] = 0;
    }
  }
  int64_t stride = 1;
  for (int d = nd - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= a.shape(d);
  }
  v.data = v.owned.data();
  return v;
}

// ---------------------------------------------------------------------------- prefill kernel

constexpr int kQueryBlock = 64;
constexpr int kKeyBlock = 256;

struct PrefillShape {
  int batch, heads, kv_heads, queries, keys, head_dim, offset;
  float scale;
};

void prefill_kernel(const PrefillShape& sh, const View& q, const View& k, const View& v,
                    float* out, int threads) {
  const int group = sh.heads / sh.kv_heads;
  const int d = sh.head_dim;
  // Query blocks are aligned to absolute positions (block B holds positions [64B, 64B + 64)),
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
      const float* kb = k.data + b * k.strides[0] + g * k.strides[1];
      const float* vb = v.data + b * v.strides[0] + g * v.strides[1];
      const int key_end = std::min(sh.keys, base + hi);
      for (int j0 = 0; j0 < key_end; j0 += kKeyBlock) {
        int width = std::min(kKeyBlock, key_end - j0);
        const float* kblock = kb + j0 * k.strides[2];
        const float* vblock = vb + j0 * v.strides[2];
        int ldk = static_cast<int>(k.strides[2]), ldv = static_cast<int>(v.strides[2]);
        if (width < kKeyBlock) {
          // The block products always run at full width (the tail zero-padded, its scores
          // masked): the BLAS's summation order then does not depend on where a prompt's
          // chunks end, so chunked prefill gives bit-identical results to one pass.
          std::fill(kpad.begin(), kpad.end(), 0.f);
          std::fill(vpad.begin(), vpad.end(), 0.f);
          for (int j = 0; j < width; ++j) {
            std::memcpy(&kpad[static_cast<size_t>(j) * d], kblock + j * k.strides[2],
                        sizeof(float) * d);
            std::memcpy(&vpad[static_cast<size_t>(j) * d], vblock + j * v.strides[2],
                        sizeof(float) * d);
          }
          kblock = kpad.data(), vblock = vpad.data(), ldk = ldv = d;
        }
        blas.sgemm(kRowMajor, kNoTrans, kTrans, rows, kKeyBlock, d, 1.f, qs.data(), d, kblock,
                   ldk, 0.f, scores.data(), kKeyBlock);
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
        blas.sgemm(kRowMajor, kNoTrans, kNoTrans, rows, d, kKeyBlock, 1.f, scores.data(),
                   kKeyBlock, vblock, ldv, 1.f, acc.data(), d);
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
  PrefillAttention(mx::Stream s, float scale, int offset, int threads)
      : mx::Primitive(s), scale_(scale), offset_(offset), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([q = inputs[0], k = inputs[1], v = inputs[2], out_ptr = out.data<float>(),
                      scale = scale_, offset = offset_, threads = threads_]() {
      PrefillShape sh{q.shape(0), q.shape(1), k.shape(1), q.shape(2), k.shape(2), q.shape(3),
                      offset, scale};
      View qv = view_of(q), kv = view_of(k), vv = view_of(v);
      prefill_kernel(sh, qv, kv, vv, out_ptr, threads);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flockattn kernels run on the CPU only");
  }

  const char* name() const override { return "FlockPrefillAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const PrefillAttention&>(other);
    return scale_ == o.scale_ && offset_ == o.offset_ && threads_ == o.threads_;
  }

 private:
  float scale_;
  int offset_, threads_;
};

// ----------------------------------------------------------------------------- decode kernel

struct DecodeShape {
  int rows, heads, kv_heads, capacity, head_dim;
  float scale;
};

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
float softmax_inplace(float* s, int n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return exp_and_sum(s, n, m);
}

void decode_kernel(const DecodeShape& sh, const View& q, const View& k, const View& v,
                   const int32_t* positions, int64_t pos_stride, float* out, int threads) {
  const int group = sh.heads / sh.kv_heads;
  const int d = sh.head_dim;
  const int items = sh.rows * sh.kv_heads;
  std::atomic<int> next{0};
  auto work = [&](int) {
    std::vector<float> scores;
    std::vector<float> acc(static_cast<size_t>(group) * d);
    for (;;) {
      int item = next.fetch_add(1);
      if (item >= items) return;
      int r = item / sh.kv_heads, g = item % sh.kv_heads;
      int visible = std::clamp(positions[r * pos_stride] + 1, 1, sh.capacity);
      scores.resize(static_cast<size_t>(group) * visible);
      const float* kb = k.data + r * k.strides[0] + g * k.strides[1];
      const float* vb = v.data + r * v.strides[0] + g * v.strides[1];
      // The group's query heads are rows of one matrix (stride q.strides[1]): one block
      // product against the row's visible keys, a softmax per head, one product with values.
      const float* qg = q.data + r * q.strides[0] + g * group * q.strides[1];
      blas.sgemm(kRowMajor, kNoTrans, kTrans, group, visible, d, sh.scale, qg,
                 static_cast<int>(q.strides[1]), kb, static_cast<int>(k.strides[2]), 0.f,
                 scores.data(), visible);
      float inv[64];
      for (int gi = 0; gi < group; ++gi)
        inv[gi] = 1.f / softmax_inplace(&scores[static_cast<size_t>(gi) * visible], visible);
      blas.sgemm(kRowMajor, kNoTrans, kNoTrans, group, d, visible, 1.f, scores.data(), visible,
                 vb, static_cast<int>(v.strides[2]), 0.f, acc.data(), d);
      for (int gi = 0; gi < group; ++gi) {
        float* dst = out + (static_cast<int64_t>(r) * sh.heads + g * group + gi) * d;
        scaled_copy(dst, &acc[static_cast<size_t>(gi) * d], d, inv[gi]);
      }
    }
  };
  // A short context is a few microseconds of work: waking the pool (and switching OpenBLAS's
  // threads) would cost more than it saves, and its products are too small for OpenBLAS to split.
  int64_t flops = 0;
  for (int r = 0; r < sh.rows; ++r)
    flops += 4LL * std::clamp(positions[r * pos_stride] + 1, 1, sh.capacity) * sh.heads * d;
  if (flops < (int64_t{1} << 21)) {
    work(0);
    return;
  }
  parallel(std::min(threads, items), work);
}

class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(mx::Stream s, float scale, int threads)
      : mx::Primitive(s), scale_(scale), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([q = inputs[0], k = inputs[1], v = inputs[2], p = inputs[3],
                      out_ptr = out.data<float>(), scale = scale_, threads = threads_]() {
      DecodeShape sh{q.shape(0), q.shape(1), k.shape(1), k.shape(2), q.shape(3), scale};
      View qv = view_of(q), kv = view_of(k), vv = view_of(v);
      decode_kernel(sh, qv, kv, vv, p.data<int32_t>(), p.strides()[0], out_ptr, threads);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("flockattn kernels run on the CPU only");
  }

  const char* name() const override { return "FlockDecodeAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecodeAttention&>(other);
    return scale_ == o.scale_ && threads_ == o.threads_;
  }

 private:
  float scale_;
  int threads_;
};

// ------------------------------------------------------------------------------------ ops

mx::Stream cpu_stream() { return mx::default_stream(mx::Device(mx::Device::cpu)); }

void check_float(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) throw std::invalid_argument(std::string(what) + ": float32 only");
}

mx::array prefill_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                            float scale, int offset) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4)
    throw std::invalid_argument("prefill_attention: (batch, heads, tokens, head_dim) arrays");
  check_float(q, "q");
  check_float(k, "k");
  check_float(v, "v");
  if (k.shape() != v.shape() || k.shape(0) != q.shape(0) || k.shape(3) != q.shape(3) ||
      q.shape(1) % k.shape(1) != 0)
    throw std::invalid_argument("prefill_attention: mismatched shapes");
  if (offset < 0 || k.shape(2) < offset + q.shape(2))
    throw std::invalid_argument("prefill_attention: keys must cover offset + queries");
  mx::Shape shape{q.shape(0), q.shape(2), q.shape(1) * q.shape(3)};
  return mx::array(shape, mx::float32,
                   std::make_shared<PrefillAttention>(cpu_stream(), scale, offset,
                                                      kernel_threads),
                   {q, k, v});
}

mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                           const mx::array& positions, float scale) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || q.shape(2) != 1)
    throw std::invalid_argument("decode_attention: q (rows, heads, 1, head_dim), caches 4-D");
  check_float(q, "q");
  check_float(k, "k");
  check_float(v, "v");
  if (k.shape() != v.shape() || k.shape(0) != q.shape(0) || k.shape(3) != q.shape(3) ||
      q.shape(1) % k.shape(1) != 0 || q.shape(1) / k.shape(1) > 64)
    throw std::invalid_argument("decode_attention: mismatched shapes");
  auto pos = mx::astype(positions, mx::int32);
  mx::Shape shape{q.shape(0), 1, q.shape(1) * q.shape(3)};
  return mx::array(shape, mx::float32,
                   std::make_shared<DecodeAttention>(cpu_stream(), scale, kernel_threads),
                   {q, k, v, pos});
}

// Which BLAS the kernels call: the library at `path` (what FLOCK_BLAS_LIB names), or "" for
// the process's own cblas_sgemm. Returns a description, or raises when the path does not load.
std::string configure(const std::string& path, int threads) {
  kernel_threads = std::max(1, threads);
  if (path.empty()) {
    blas = Blas{};
    return blas.origin;
  }
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) throw std::runtime_error(std::string("cannot load ") + dlerror());
  const char* prefix = dlsym(lib, "scipy_cblas_sgemm") ? "scipy_" : "";
  auto sym = [&](const char* name) { return dlsym(lib, (std::string(prefix) + name).c_str()); };
  auto sgemm = reinterpret_cast<sgemm_fn>(sym("cblas_sgemm"));
  if (sgemm == nullptr) throw std::runtime_error(path + " has no cblas_sgemm");
  blas.sgemm = sgemm;
  blas.set_threads = reinterpret_cast<set_threads_fn>(sym("openblas_set_num_threads"));
  blas.get_threads = reinterpret_cast<get_threads_fn>(sym("openblas_get_num_threads"));
  blas.origin = path;
  return blas.origin;
}

}  // namespace

NB_MODULE(_flockattn, m) {
  nb::module_::import_("mlx.core");
  m.doc() = "flock's fused CPU attention kernels (MLX custom primitives)";
  m.def("prefill_attention", &prefill_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("scale"), nb::arg("offset"),
        "Causal attention of q (B, H, n, d) at positions [offset, offset + n) over k, v "
        "(B, KV, >= offset + n, d); returns (B, n, H * d).");
  m.def("decode_attention", &decode_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("positions"), nb::arg("scale"),
        "One query per row, q (R, H, 1, d), over caches (R, KV, C, d), keys j <= positions[r] "
        "visible; returns (R, 1, H * d).");
  m.def("configure", &configure, nb::arg("blas_path"), nb::arg("threads"));
  m.def("threads", [] { return kernel_threads; });
}
