// flockthreads.cpp: the BLAS the kernels call (configure() picks it) and the persistent thread
// pool they run on (parallel / run_threads, declared in flockattn.h).

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "flockattn.h"

extern "C" void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta,
                            float* c, int ldc);
namespace fk {

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

void sgemm(int transb, int m, int n, int k, float alpha, const float* a, int lda,
           const float* b, int ldb, float beta, float* c, int ldc) {
  blas.sgemm(kRowMajor, kNoTrans, transb ? kTrans : kNoTrans, m, n, k, alpha, a, lda, b, ldb,
             beta, c, ldc);
}

// ---------------------------------------------------------------------------------- threads

// A persistent pool: decode calls the kernels several times a layer per step, too often to
// spawn threads or to sleep between calls. Workers spin (with pause, yielding to other processes
// now and then) for kSpin after a job before sleeping on the condition variable, so the next
// call of the same step finds them awake: a futex wake-up costs ~10-50 us, ~150 a decode step.
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
    }
    job_ = &f;
    pending_.store(threads - 1);
    // The thread count travels in the generation's low byte: a worker sees both at once.
    generation_.store(((generation_.load() >> 8) + 1) << 8 | static_cast<unsigned long>(threads));
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      wake_.notify_all();
    }
    f(0);
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 4096)
        pause();
      else
        std::this_thread::yield();
    }
    job_ = nullptr;
  }

 private:
  static constexpr auto kSpin = std::chrono::microseconds(300);

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void loop(int index) {
    unsigned long seen = 0;
    for (;;) {
      // Spin a while for the next job, then sleep.
      auto start = std::chrono::steady_clock::now();
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        if ((spins & 255) != 255) {
          pause();
          continue;
        }
        if (std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return stop_ || generation_.load() != seen; });
          sleepers_.fetch_sub(1);
          if (stop_) return;
          break;
        }
        if ((spins & 4095) == 4095) std::this_thread::yield();
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;
      }
      seen = generation_.load(std::memory_order_acquire);
      if (index < static_cast<int>(seen & 255)) {
        (*job_.load())(index);
        pending_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  std::atomic<const std::function<void(int)>*> job_{nullptr};
  std::atomic<unsigned long> generation_{0};
  std::atomic<int> pending_{0}, sleepers_{0};
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
void run_threads(int threads, const std::function<void(int)>& f) { pool().run(threads, f); }

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
// Which BLAS the kernels call: the library at `path` (what FLOCK_BLAS_LIB names), or "" for
// the process's own cblas_sgemm. Returns a description, or raises when the path does not load.
std::string configure(const std::string& path, int threads) {
  kernel_threads = std::clamp(threads, 1, 255);  // the pool's generation carries it in a byte
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

}  // namespace fk
