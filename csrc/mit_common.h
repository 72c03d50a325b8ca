// Shared helpers of the MiT CPU kernels: accumulation types, row conversion, small vector kernels, a row-major GEMM
// on top of the BLAS that torch links, and a deterministic dynamic task scheduler.
#pragma once

// ATen's per-operator headers, not <ATen/ATen.h>: every environment compiles these kernels at install (CI: three), and
// the few operators used here parse in a fraction of the time of all of them.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

// Fortran BLAS entry points. torch's x86-64 Linux wheels link MKL statically into libtorch_cpu and export these (ATen's
// own CPU flash attention calls them the same way); they are weak here so that the extension still loads against a
// torch built without them, and falls back to a plain loop GEMM (see blas_name()).
extern "C" {
__attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                                  const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                                  const float* beta, float* c, const int* ldc);
__attribute__((weak)) void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                                  const double* alpha, const double* a, const int* lda, const double* b,
                                  const int* ldb, const double* beta, double* c, const int* ldc);
}

namespace mit {

using at::vec::Vectorized;

// Accumulation type: fp32 for fp32/bf16/fp16, fp64 for fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

constexpr double kCosineEps = 1e-8;

inline const char* blas_name() {
  return (sgemm_ != nullptr && dgemm_ != nullptr) ? "BLAS sgemm_/dgemm_ exported by libtorch_cpu"
                                                  : "built-in loop GEMM (no BLAS symbols found in torch)";
}

// ---------------------------------------------------------------------------------------------------------------------
// Row conversion between the storage dtype and the accumulation dtype.
// ---------------------------------------------------------------------------------------------------------------------

template <typename T>
inline void to_acc(const T* src, acc_t<T>* dst, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    std::memcpy(dst, src, sizeof(T) * n);
  } else {
    using VT = Vectorized<T>;
    using VF = Vectorized<float>;
    int64_t i = 0;
    for (; i + VT::size() <= n; i += VT::size()) {
      auto [a, b] = at::vec::convert_to_float<T>(VT::loadu(src + i));
      a.store(dst + i);
      b.store(dst + i + VF::size());
    }
    for (; i < n; i++) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename T>
inline void from_acc(const acc_t<T>* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    std::memcpy(dst, src, sizeof(T) * n);
  } else {
    using VT = Vectorized<T>;
    using VF = Vectorized<float>;
    int64_t i = 0;
    for (; i + VT::size() <= n; i += VT::size()) {
      at::vec::convert_from_float<T>(VF::loadu(src + i), VF::loadu(src + i + VF::size())).store(dst + i);
    }
    for (; i < n; i++) dst[i] = static_cast<T>(src[i]);
  }
}

// A row as acc_t: the pointer itself when T is already the accumulation type, else converted into buf.
template <typename T>
inline const acc_t<T>* row_as_acc(const T* src, acc_t<T>* buf, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return src;
  } else {
    to_acc<T>(src, buf, n);
    return buf;
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Small vector kernels on acc_t rows (any length; tails handled with partial loads/stores).
// ---------------------------------------------------------------------------------------------------------------------

template <typename A>
inline A hsum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& x, Vectorized<A>& y) { return x + y; }, v);
}

template <typename A>
inline A dot(const A* a, const A* b, int64_t n) {
  using V = Vectorized<A>;
  V acc0(A(0)), acc1(A(0));
  int64_t i = 0;
  for (; i + 2 * V::size() <= n; i += 2 * V::size()) {
    acc0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(V::loadu(a + i + V::size()), V::loadu(b + i + V::size()), acc1);
  }
  for (; i + V::size() <= n; i += V::size()) acc0 = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), acc0);
  A s = hsum<A>(acc0 + acc1);
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

// x[i] *= s
template <typename A>
inline void scale_inplace(A* x, A s, int64_t n) {
  using V = Vectorized<A>;
  int64_t i = 0;
  const V vs(s);
  for (; i + V::size() <= n; i += V::size()) (V::loadu(x + i) * vs).store(x + i);
  for (; i < n; i++) x[i] *= s;
}

// y[i] += s * x[i]
template <typename A>
inline void axpy(A* y, A s, const A* x, int64_t n) {
  using V = Vectorized<A>;
  int64_t i = 0;
  const V vs(s);
  for (; i + V::size() <= n; i += V::size()) at::vec::fmadd(vs, V::loadu(x + i), V::loadu(y + i)).store(y + i);
  for (; i < n; i++) y[i] += s * x[i];
}

template <typename A>
inline void fill(A* x, A value, int64_t n) {
  std::fill(x, x + n, value);
}

// x' = x + g * (x * mul + add), written to dst (acc_t).
template <typename A>
inline void infuse_row(const A* x, const A* mul, const A* add, A g, A* dst, int64_t n) {
  using V = Vectorized<A>;
  const V vg(g);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V xv = V::loadu(x + i);
    at::vec::fmadd(vg, at::vec::fmadd(xv, V::loadu(mul + i), V::loadu(add + i)), xv).store(dst + i);
  }
  for (; i < n; i++) dst[i] = x[i] + g * (x[i] * mul[i] + add[i]);
}

// max(a, b) that propagates NaN (std::max(a, NaN) returns a): NaN if either is NaN, like at::vec::maximum and
// torch.max. One compare more than std::max, no branch on the data in vectorised code.
template <typename A>
inline A max_nan(A a, A b) {
  return (b > a || b != b) ? b : a;
}

// max over a row; NaN if any element is NaN (at::vec::maximum propagates NaN, and so does the scalar tail).
template <typename A>
inline A row_max(const A* x, int64_t n) {
  using V = Vectorized<A>;
  A m = -std::numeric_limits<A>::infinity();
  int64_t i = 0;
  if (n >= V::size()) {
    V vm(m);
    for (; i + V::size() <= n; i += V::size()) vm = at::vec::maximum(vm, V::loadu(x + i));
    m = at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; i < n; i++) m = max_nan(m, x[i]);
  return m;
}

// Every x[i] is finite (no NaN, no Inf): x * 0 + acc stays 0 for finite x and turns NaN otherwise, so one pass of
// FMAs, no branch; four independent accumulators keep it throughput-bound (it runs on every key block).
template <typename A>
inline bool all_finite(const A* x, int64_t n) {
  using V = Vectorized<A>;
  const V zero(A(0));
  V a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0));
  int64_t i = 0;
  for (; i + 4 * V::size() <= n; i += 4 * V::size()) {
    a0 = at::vec::fmadd(V::loadu(x + i), zero, a0);
    a1 = at::vec::fmadd(V::loadu(x + i + V::size()), zero, a1);
    a2 = at::vec::fmadd(V::loadu(x + i + 2 * V::size()), zero, a2);
    a3 = at::vec::fmadd(V::loadu(x + i + 3 * V::size()), zero, a3);
  }
  for (; i + V::size() <= n; i += V::size()) a0 = at::vec::fmadd(V::loadu(x + i), zero, a0);
  A s = hsum<A>((a0 + a1) + (a2 + a3));
  for (; i < n; i++) s += x[i] * A(0);
  return s == A(0);
}

// all_finite over `rows` rows of length n, ld elements apart.
template <typename A>
inline bool rows_finite(const A* x, int64_t rows, int64_t ld, int64_t n) {
  bool ok = true;
  for (int64_t r = 0; r < rows && ok; r++) ok = all_finite<A>(x + r * ld, n);
  return ok;
}

template <typename A>
inline Vectorized<A> vexp(const Vectorized<A>& x) {
  if constexpr (std::is_same_v<A, float>) {
    return x.exp_u20();  // the fast exp ATen's CPU flash attention uses (relative error ~1e-7)
  } else {
    return x.exp();
  }
}

// x[i] = exp(x[i] - m); returns the sum. exp(-inf - m) = 0.
template <typename A>
inline A exp_sub_sum(A* x, A m, int64_t n) {
  using V = Vectorized<A>;
  const V vm(m);
  V acc(A(0));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V e = vexp<A>(V::loadu(x + i) - vm);
    e.store(x + i);
    acc = acc + e;
  }
  A s = hsum<A>(acc);
  for (; i < n; i++) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}

// ---------------------------------------------------------------------------------------------------------------------
// Row-major GEMM: C (M x N, ldc) = alpha * op(A) op(B) + beta * C, op(A) M x K, op(B) K x N; ta / tb: A / B stored
// transposed (A is K x M with lda, B is N x K with ldb). Forwarded to column-major BLAS as C^T = op(B)^T op(A)^T.
// ---------------------------------------------------------------------------------------------------------------------

template <typename A>
inline void gemm_fallback(bool ta, bool tb, int64_t M, int64_t N, int64_t K, A alpha, const A* a, int64_t lda,
                          const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  for (int64_t i = 0; i < M; i++) {
    A* crow = c + i * ldc;
    if (beta == A(0)) {
      std::fill(crow, crow + N, A(0));
    } else if (beta != A(1)) {
      scale_inplace<A>(crow, beta, N);
    }
    for (int64_t p = 0; p < K; p++) {
      const A aval = alpha * (ta ? a[p * lda + i] : a[i * lda + p]);
      if (aval == A(0)) continue;
      if (!tb) {
        axpy<A>(crow, aval, b + p * ldb, N);
      } else {
        for (int64_t j = 0; j < N; j++) crow[j] += aval * b[j * ldb + p];
      }
    }
  }
}

template <typename A>
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, A alpha, const A* a, int64_t lda, const A* b,
                 int64_t ldb, A beta, A* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; i++) {
      if (beta == A(0)) {
        std::fill(c + i * ldc, c + i * ldc + N, A(0));
      } else {
        scale_inplace<A>(c + i * ldc, beta, N);
      }
    }
    return;
  }
  const char ca = ta ? 'T' : 'N';
  const char cb = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(std::max<int64_t>(ldb, 1)), lb = static_cast<int>(std::max<int64_t>(lda, 1));
  const int lc = static_cast<int>(std::max<int64_t>(ldc, 1));
  if constexpr (std::is_same_v<A, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&cb, &ca, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&cb, &ca, &m, &n, &k, &alpha, b, &la, a, &lb, &beta, c, &lc);
      return;
    }
  }
  gemm_fallback<A>(ta, tb, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---------------------------------------------------------------------------------------------------------------------
// Scheduling
// ---------------------------------------------------------------------------------------------------------------------

// Runs fn(task, thread_slot) for task in [0, num_tasks) on at::parallel_for's threads, handing tasks out dynamically in
// increasing order (threads take the next task number from a shared counter). Results must not depend on which thread
// runs a task; thread_slot < at::get_num_threads() only indexes per-thread scratch. total_work (multiply-adds, rough)
// caps the number of threads for small problems.
// Work (in multiply-adds) below which a kernel runs on the calling thread: waking a team of threads costs more than
// that, and far more when the machine is oversubscribed.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 17;

template <typename F>
inline void run_tasks(int64_t num_tasks, int64_t total_work, const F& fn) {
  if (num_tasks <= 0) return;
  const int64_t by_work = std::max<int64_t>(1, total_work / kMinWorkPerThread);
  const int64_t workers = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), num_tasks, by_work});
  if (workers <= 1 || at::in_parallel_region()) {
    // Sequential (one thread, or called from inside a parallel region): every task on this thread, scratch slot 0.
    for (int64_t t = 0; t < num_tasks; t++) fn(t, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    const int slot = at::get_thread_num();
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < num_tasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(t, slot);
    }
  });
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

// Spin until *flag == expected (acquire), yielding to the OS scheduler while waiting.
inline void wait_for(const std::atomic<int>& flag, int expected) {
  int spins = 0;
  while (flag.load(std::memory_order_acquire) != expected) {
    if (++spins < 64) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

// Per-thread scratch is carved into sub-buffers that all start on 64-byte boundaries, whichever thread slot runs a
// task: MKL's GEMM results depend on operand alignment (it is bitwise reproducible only for identical alignment), and
// tasks are handed to threads dynamically.
constexpr int64_t kAlignElems = 16;

inline int64_t aligned(int64_t n) {
  return (n + kAlignElems - 1) / kAlignElems * kAlignElems;
}

template <typename A>
struct Carver {
  A* p;
  A* take(int64_t n) {
    A* r = p;
    p += aligned(n);
    return r;
  }
};

inline int num_scratch_slots() {
  return std::max(1, at::get_num_threads());
}

// A buffer of n elements of dtype for one kernel call, from a buffer the calling thread keeps between calls: a decoding
// step calls the decode kernel once per infused layer, and its partials and scratch are small, so they cost no
// allocator round trip per call. Requests above
// kKeptWorkspaceBytes (long contexts with many key splits) get a buffer of their own, which is not kept. The buffer is
// valid until the calling thread's next call; contents are unspecified (every kernel writes what it reads).
constexpr int64_t kKeptWorkspaceBytes = int64_t(1) << 20;

inline at::Tensor call_workspace(int64_t n, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  if (n * element > kKeptWorkspaceBytes) return at::empty({n}, opts);
  thread_local at::Tensor kept_float, kept_double;  // one per accumulation dtype (fp32, fp64)
  at::Tensor& kept = dtype == at::kDouble ? kept_double : kept_float;
  if (!kept.defined() || kept.scalar_type() != dtype) kept = at::empty({kKeptWorkspaceBytes / element}, opts);
  return kept;
}

}  // namespace mit
