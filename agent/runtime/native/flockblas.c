/* flockblas: the CBLAS shim that runners preload (LD_PRELOAD) so MLX on Linux uses OpenBLAS.
 *
 * The mlx[cpu] wheel links a reference BLAS, and MLX calls only cblas_sgemm, cblas_dgemm and
 * cblas_cgemm. This library exports exactly those names and forwards them to the library named by
 * FLOCK_BLAS_LIB: scipy-openblas32's libscipy_openblas.so (symbols prefixed `scipy_`) or a plain
 * libopenblas.so. sgemm with M == 1 or N == 1 (every projection of a batch-1 decode step) goes to
 * sgemv instead, which OpenBLAS runs ~5x faster for those shapes; FLOCK_BLAS_GEMV=0 turns that off.
 *
 * Build: cc -O2 -shared -fPIC -pthread -o libflockblas.so flockblas.c -ldl
 * There is no link-time dependency on any BLAS: the library is dlopen()ed on first use.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The CBLAS enums, declared here so the shim builds without any BLAS headers installed. */
enum CBLAS_ORDER { CblasRowMajor = 101, CblasColMajor = 102 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112, CblasConjTrans = 113 };

typedef void (*sgemm_fn)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, int, int,
                         int, float, const float *, int, const float *, int, float, float *, int);
typedef void (*dgemm_fn)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, int, int,
                         int, double, const double *, int, const double *, int, double, double *,
                         int);
typedef void (*cgemm_fn)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, int, int,
                         int, const void *, const void *, int, const void *, int, const void *,
                         void *, int);
typedef void (*sgemv_fn)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, int, int, float, const float *,
                         int, const float *, int, float, float *, int);
typedef char *(*config_fn)(void);

enum { COUNT_SGEMM, COUNT_SGEMV, COUNT_DGEMM, COUNT_CGEMM, COUNTS };

static struct {
    sgemm_fn sgemm;
    dgemm_fn dgemm;
    cgemm_fn cgemm;
    sgemv_fn sgemv;
    int gemv;
    char error[768];
    char info[1024];
} blas;

static pthread_once_t loaded = PTHREAD_ONCE_INIT;
static unsigned long long counts[COUNTS];

void cblas_sgemm(const enum CBLAS_ORDER Order, const enum CBLAS_TRANSPOSE TransA,
                 const enum CBLAS_TRANSPOSE TransB, const int M, const int N, const int K,
                 const float alpha, const float *A, const int lda, const float *B, const int ldb,
                 const float beta, float *C, const int ldc);

static void *symbol(void *lib, const char *prefix, const char *name) {
    char full[96];
    snprintf(full, sizeof full, "%s%s", prefix, name);
    return dlsym(lib, full);
}

/* Loading is lazy rather than a constructor: LD_PRELOAD is inherited by every child of a runner
 * (compilers, shells), and those must not pay for, or fail on, a BLAS they never call. */
static void load(void) {
    const char *path = getenv("FLOCK_BLAS_LIB");
    if (path == NULL || path[0] == '\0') {
        snprintf(blas.error, sizeof blas.error, "FLOCK_BLAS_LIB is not set");
        return;
    }
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        snprintf(blas.error, sizeof blas.error, "cannot load FLOCK_BLAS_LIB=%s: %s", path,
                 dlerror());
        return;
    }
    const char *prefix = dlsym(lib, "scipy_cblas_sgemm") != NULL ? "scipy_" : "";
    blas.sgemm = (sgemm_fn)symbol(lib, prefix, "cblas_sgemm");
    blas.dgemm = (dgemm_fn)symbol(lib, prefix, "cblas_dgemm");
    blas.cgemm = (cgemm_fn)symbol(lib, prefix, "cblas_cgemm");
    blas.sgemv = (sgemv_fn)symbol(lib, prefix, "cblas_sgemv");
    if (!blas.sgemm || !blas.dgemm || !blas.cgemm || !blas.sgemv) {
        snprintf(blas.error, sizeof blas.error,
                 "FLOCK_BLAS_LIB=%s lacks cblas_sgemm/dgemm/cgemm/sgemv (plain or scipy_)", path);
        return;
    }
    /* Pointing FLOCK_BLAS_LIB at the shim itself would make every call recurse forever. */
    if (blas.sgemm == cblas_sgemm) {
        snprintf(blas.error, sizeof blas.error, "FLOCK_BLAS_LIB=%s is flockblas itself", path);
        return;
    }
    const char *gemv = getenv("FLOCK_BLAS_GEMV");
    blas.gemv = !(gemv != NULL && strcmp(gemv, "0") == 0);
    config_fn config = (config_fn)symbol(lib, prefix, "openblas_get_config");
    snprintf(blas.info, sizeof blas.info, "lib=%s\tsymbols=%s\tgemv=%s\tconfig=%s", path,
             prefix[0] ? "scipy_" : "plain", blas.gemv ? "on" : "off",
             config != NULL ? config() : "unknown");
}

static void ensure_loaded(void) {
    pthread_once(&loaded, load);
    if (blas.error[0] != '\0') {
        /* A runner without its BLAS is misconfigured; computing on would hide that. */
        fprintf(stderr, "flockblas: %s\n", blas.error);
        abort();
    }
}

static void count(int which) { __atomic_fetch_add(&counts[which], 1, __ATOMIC_RELAXED); }

/* The row-major sgemm arguments are ones a conforming sgemm accepts (it would report the others). */
static int valid_row_major(int ta, int tb, int M, int N, int K, int lda, int ldb, int ldc) {
    int ok_trans = (ta == CblasNoTrans || ta == CblasTrans || ta == CblasConjTrans) &&
                   (tb == CblasNoTrans || tb == CblasTrans || tb == CblasConjTrans);
    int min_lda = ta == CblasNoTrans ? K : M;
    int min_ldb = tb == CblasNoTrans ? N : K;
    return ok_trans && M >= 0 && N >= 0 && K >= 0 && lda >= (min_lda > 1 ? min_lda : 1) &&
           ldb >= (min_ldb > 1 ? min_ldb : 1) && ldc >= (N > 1 ? N : 1);
}

/* sgemv with beta == 0 must ignore what y holds (MLX hands over uninitialised output, which may
 * hold NaN), exactly as sgemm does; zeroing y first guarantees that whatever the library does. */
static void zero_when_beta_zero(float beta, float *y, int n, int inc) {
    if (beta != 0.0f) return;
    for (int i = 0; i < n; i++) y[(long)i * inc] = 0.0f;
}

/* Row-major C (M x N) = alpha * op(A) op(B) + beta * C with M == 1 or N == 1, as one sgemv.
 * Real data: ConjTrans means Trans. */
static void sgemm_as_sgemv(int ta, int tb, int M, int N, int K, float alpha, const float *A,
                           int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    int a_trans = ta != CblasNoTrans, b_trans = tb != CblasNoTrans;
    if (M == 1) {
        /* c (N, contiguous) = alpha * op(B)^T a + beta * c, a = row 0 of op(A). With op(A) = A^T,
         * A is K x 1 and that row is A's column 0: stride lda. */
        int inc_a = a_trans ? lda : 1;
        zero_when_beta_zero(beta, C, N, 1);
        if (b_trans) /* B is N x K and op(B)^T = B */
            blas.sgemv(CblasRowMajor, CblasNoTrans, N, K, alpha, B, ldb, A, inc_a, beta, C, 1);
        else /* B is K x N */
            blas.sgemv(CblasRowMajor, CblasTrans, K, N, alpha, B, ldb, A, inc_a, beta, C, 1);
    } else {
        /* c (M, stride ldc) = alpha * op(A) b + beta * c, b = column 0 of op(B). With op(B) = B,
         * B is K x 1 and that column has stride ldb; with op(B) = B^T it is B's row 0. */
        int inc_b = b_trans ? 1 : ldb;
        zero_when_beta_zero(beta, C, M, ldc);
        if (a_trans) /* A is K x M */
            blas.sgemv(CblasRowMajor, CblasTrans, K, M, alpha, A, lda, B, inc_b, beta, C, ldc);
        else /* A is M x K */
            blas.sgemv(CblasRowMajor, CblasNoTrans, M, K, alpha, A, lda, B, inc_b, beta, C, ldc);
    }
}

void cblas_sgemm(const enum CBLAS_ORDER Order, const enum CBLAS_TRANSPOSE TransA,
                 const enum CBLAS_TRANSPOSE TransB, const int M, const int N, const int K,
                 const float alpha, const float *A, const int lda, const float *B, const int ldb,
                 const float beta, float *C, const int ldc) {
    ensure_loaded();
    /* K == 0 and alpha == 0 stay with sgemm: there C = beta * C, and sgemv returns early without
     * applying beta for K == 0. */
    if (blas.gemv && (M == 1 || N == 1) && K > 0 && alpha != 0.0f &&
        (Order == CblasRowMajor || Order == CblasColMajor)) {
        /* Column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T: swap the operands. */
        int row = Order == CblasRowMajor;
        int ta = row ? TransA : TransB, tb = row ? TransB : TransA;
        int m = row ? M : N, n = row ? N : M;
        const float *a = row ? A : B, *b = row ? B : A;
        int la = row ? lda : ldb, lb = row ? ldb : lda;
        if (valid_row_major(ta, tb, m, n, K, la, lb, ldc)) {
            count(COUNT_SGEMV);
            sgemm_as_sgemv(ta, tb, m, n, K, alpha, a, la, b, lb, beta, C, ldc);
            return;
        }
    }
    count(COUNT_SGEMM);
    blas.sgemm(Order, TransA, TransB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_dgemm(const enum CBLAS_ORDER Order, const enum CBLAS_TRANSPOSE TransA,
                 const enum CBLAS_TRANSPOSE TransB, const int M, const int N, const int K,
                 const double alpha, const double *A, const int lda, const double *B,
                 const int ldb, const double beta, double *C, const int ldc) {
    ensure_loaded();
    count(COUNT_DGEMM);
    blas.dgemm(Order, TransA, TransB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void cblas_cgemm(const enum CBLAS_ORDER Order, const enum CBLAS_TRANSPOSE TransA,
                 const enum CBLAS_TRANSPOSE TransB, const int M, const int N, const int K,
                 const void *alpha, const void *A, const int lda, const void *B, const int ldb,
                 const void *beta, void *C, const int ldc) {
    ensure_loaded();
    count(COUNT_CGEMM);
    blas.cgemm(Order, TransA, TransB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* Tab-separated key=value fields (lib, symbols, gemv, config), or "error=..." when the library
 * cannot be loaded; never aborts, so reporting works even on a misconfigured node. */
const char *flockblas_info(void) {
    pthread_once(&loaded, load);
    if (blas.error[0] != '\0') {
        static char error[800];
        snprintf(error, sizeof error, "error=%s", blas.error);
        return error;
    }
    return blas.info;
}

/* Calls so far: sgemm forwarded, sgemm answered by sgemv, dgemm, cgemm (tests and benchmarks). */
void flockblas_counts(unsigned long long out[4]) {
    for (int i = 0; i < COUNTS; i++) out[i] = __atomic_load_n(&counts[i], __ATOMIC_RELAXED);
}
