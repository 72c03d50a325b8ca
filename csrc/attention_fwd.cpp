// MiT attention forward on CPU.
//
// Two kernels, neither of which materialises K', V' or any (Lq, Lk) buffer:
//
// * prefill / training (fwd_blocked): one task per (b, KV head, block of queries). The task stacks the query blocks of
//   all Hq / Hkv query heads that share the KV head into one (G * rows, D) matrix, then walks the keys in blocks of
//   kBlockN: each key block is infused once (K', V' rows in a per-thread fp32 scratch, from the precomputed gate) and
//   serves all G heads; scores and P V' are BLAS GEMMs; softmax is online (flash attention).
// * decode (fwd_decode, few query rows): flash-decoding. Each (b, KV head) is split along the keys; every split reads
//   its raw K / V rows once, computes the gate and the infusion on the fly and does the (few) dot products directly,
//   keeping a partial (max, sum, unnormalised output) that a final pass combines.
#include "attention.h"

namespace mit {

namespace {

constexpr int64_t kBlockN = 256;        // keys per block (blocked kernel)
constexpr int64_t kTargetRows = 192;    // stacked query rows per task (blocked kernel)
constexpr int64_t kDecodeMaxRows = 32;  // G * Lq at or below this: decode kernel
constexpr int64_t kDecodeBlockN = 64;   // keys per block (decode kernel)
constexpr int64_t kDecodeMinSplit = 256;

// Online-softmax update of one row of scores s[0, n) (already scaled; -inf where masked), turning s into the
// probabilities p (unnormalised, relative to the new max) and rescaling the row's output accumulator o[0, D).
// Returns false when the row has still seen no key (then p = 0).
template <typename A>
inline bool online_softmax_row(A* s, int64_t n, A& m, A& l, A* o, int64_t D) {
  const A mx = row_max<A>(s, n);
  const A m_new = max_nan(m, mx);  // NaN scores make the row NaN (std::max would drop them)
  if (m_new == -std::numeric_limits<A>::infinity()) {
    fill<A>(s, A(0), n);
    return false;
  }
  const A sum = exp_sub_sum<A>(s, m_new, n);
  const A alpha = std::exp(m - m_new);  // 0 when m = -inf
  if (alpha != A(1)) scale_inplace<A>(o, alpha, D);
  l = l * alpha + sum;
  m = m_new;
  return true;
}

// Finalise a row: o /= l, lse = m + log l. A row that sees no key (sees_key false: every key is masked, a property of
// the masks alone) gets o = 0, lse = +inf. A row that sees keys keeps whatever its statistics give, like the
// reference's softmax: NaN scores or values give NaN (a NaN l or m is never read as "no key"), and a row whose
// visible scores are all -inf (l = 0) gives NaN.
template <typename A>
inline A finish_row(A* o, A m, A l, int64_t D, bool sees_key) {
  if (!sees_key) {
    fill<A>(o, A(0), D);
    return std::numeric_limits<A>::infinity();
  }
  if (l == A(0)) {
    fill<A>(o, std::numeric_limits<A>::quiet_NaN(), D);
    return std::numeric_limits<A>::quiet_NaN();
  }
  scale_inplace<A>(o, A(1) / l, D);
  return m + std::log(l);
}

// Whether query row i of sample b sees at least one key: first_key[b] is the first key kv_mask allows (0 without a
// mask, Lk when the sample is fully masked).
inline bool row_sees_key(const int64_t* first_key, int64_t b, int64_t i, const AttnShape& s, bool causal) {
  const int64_t last = causal ? std::min(s.Lk - 1, i + s.off) : s.Lk - 1;
  return first_key[b] <= last;
}

// Additive key mask of keys [n0, n0 + nb) of sample b: 0 where allowed, -inf where not. Returns the number allowed.
template <typename A>
inline int64_t key_mask_block(const bool* kv_mask, int64_t b, int64_t Lk, int64_t n0, int64_t nb, A* madd) {
  int64_t allowed = 0;
  const bool* row = kv_mask + b * Lk + n0;
  for (int64_t c = 0; c < nb; c++) {
    allowed += row[c] ? 1 : 0;
    madd[c] = row[c] ? A(0) : -std::numeric_limits<A>::infinity();
  }
  return allowed;
}

template <typename A>
inline void add_inplace(A* x, const A* y, int64_t n) {
  using V = Vectorized<A>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(x + i) + V::loadu(y + i)).store(x + i);
  for (; i < n; i++) x[i] += y[i];
}

struct FwdInputs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const InfusionParams& p;
  const bool* kv_mask;       // (B, Lk) or nullptr
  const int64_t* first_key;  // (B,) first key kv_mask allows (0 without a mask, Lk when none)
  const int64_t* key_end;    // (B,) one past the last key kv_mask allows (Lk without a mask, first_key when none)
  bool causal;
  double scale;
  bool rescale;
  AttnShape s;
};

// ---------------------------------------------------------------------------------------------------------------------
// Blocked (prefill / training) kernel
// ---------------------------------------------------------------------------------------------------------------------

template <typename T>
void fwd_blocked(const FwdInputs& in, at::Tensor& out, at::Tensor& lse) {
  using A = acc_t<T>;
  const AttnShape& s = in.s;
  const int64_t D = s.D, G = s.G;
  const at::Tensor gates = compute_gates<T>(in.v, in.p, in.rescale);

  // Query rows per head per task: ~kTargetRows stacked rows, fewer when that leaves too few tasks.
  int64_t qb = std::max<int64_t>(1, kTargetRows / G);
  const int64_t want_tasks = 4 * num_scratch_slots();
  while (qb > 16 && s.B * s.Hkv * ((s.Lq + qb - 1) / qb) < want_tasks) qb = (qb + 1) / 2;
  qb = std::min(qb, s.Lq);
  const int64_t nqb = (s.Lq + qb - 1) / qb;
  const int64_t R_max = G * qb;
  const int64_t nb_max = std::min(kBlockN, s.Lk);

  // Tasks (b, h, qblock), the most expensive (most keys seen) first.
  const int64_t num_tasks = s.B * s.Hkv * nqb;
  auto kv_end_of = [&](int64_t qi) -> int64_t {
    if (!in.causal) return s.Lk;
    const int64_t rows = std::min(qb, s.Lq - qi * qb);
    return std::clamp<int64_t>(qi * qb + rows + s.off, 0, s.Lk);
  };
  std::vector<int64_t> order(num_tasks);
  for (int64_t t = 0; t < num_tasks; t++) order[t] = t;
  if (in.causal) {
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t x, int64_t y) { return kv_end_of(x % nqb) > kv_end_of(y % nqb); });
  }

  // Per-thread scratch (acc_t): Qs, K', V', S/P, O, m, l, key mask, a conversion row.
  const int64_t per_thread = 2 * aligned(R_max * D) + 2 * aligned(nb_max * D) + aligned(R_max * nb_max) +
                             2 * aligned(R_max) + aligned(nb_max) + 2 * aligned(D);
  at::Tensor scratch = at::empty({num_scratch_slots(), per_thread}, gates.options());
  A* scratch_base = scratch.data_ptr<A>();

  const Strides4 sq = strides_of(in.q), sk = strides_of(in.k), sv = strides_of(in.v);
  const T* qd = in.q.const_data_ptr<T>();
  const T* kd = in.k.const_data_ptr<T>();
  const T* vd = in.v.const_data_ptr<T>();
  const A* gd = gates.const_data_ptr<A>();
  const A* km = in.p.k_mul.const_data_ptr<A>();
  const A* ka = in.p.k_add.const_data_ptr<A>();
  const A* vm = in.p.v_mul.const_data_ptr<A>();
  const A* va = in.p.v_add.const_data_ptr<A>();
  T* od = out.data_ptr<T>();
  A* ld = lse.data_ptr<A>();
  const A scale = static_cast<A>(in.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();

  const int64_t work = s.B * s.Hq * s.Lq * (in.causal ? std::min(s.Lk, s.Lq) : s.Lk) * D * 2;
  run_tasks(num_tasks, work, [&](int64_t task, int slot) {
    const int64_t t = order[task];
    const int64_t qi = t % nqb, bh = t / nqb, h = bh % s.Hkv, b = bh / s.Hkv;
    const int64_t m0 = qi * qb, rows = std::min(qb, s.Lq - m0), R = G * rows;
    Carver<A> carve{scratch_base + slot * per_thread};
    A* Qs = carve.take(R_max * D);
    A* Kp = carve.take(nb_max * D);
    A* Vp = carve.take(nb_max * D);
    A* S = carve.take(R_max * nb_max);
    A* O = carve.take(R_max * D);
    A* mrow = carve.take(R_max);
    A* lrow = carve.take(R_max);
    A* madd = carve.take(nb_max);
    A* conv = carve.take(D);
    A* conv2 = carve.take(D);

    for (int64_t g = 0; g < G; g++) {
      const T* qbase = qd + b * sq.b + (h * G + g) * sq.h + m0 * sq.l;
      for (int64_t r = 0; r < rows; r++) to_acc<T>(qbase + r * sq.l, Qs + (g * rows + r) * D, D);
    }
    fill<A>(mrow, neg_inf, R);
    fill<A>(lrow, A(0), R);
    fill<A>(O, A(0), R * D);

    const int64_t kv_end = kv_end_of(qi);
    const A* kmv = km + bh * D;
    const A* kav = ka + bh * D;
    const A* vmv = vm + bh * D;
    const A* vav = va + bh * D;
    for (int64_t n0 = 0; n0 < kv_end; n0 += kBlockN) {
      const int64_t nb = std::min(kBlockN, kv_end - n0);
      bool has_masked = false;
      if (in.kv_mask) {
        const int64_t allowed = key_mask_block<A>(in.kv_mask, b, s.Lk, n0, nb, madd);
        if (allowed == 0) continue;
        has_masked = allowed < nb;
      }
      for (int64_t c = 0; c < nb; c++) {
        const int64_t j = n0 + c;
        const A gj = gd[bh * s.Lk + j];
        const A* krow = row_as_acc<T>(kd + b * sk.b + h * sk.h + j * sk.l, conv, D);
        infuse_row<A>(krow, kmv, kav, gj, Kp + c * D, D);
        const A* vrow = row_as_acc<T>(vd + b * sv.b + h * sv.h + j * sv.l, conv2, D);
        infuse_row<A>(vrow, vmv, vav, gj, Vp + c * D, D);
      }
      // S = scale * Qs K'^T   (R x nb)
      gemm<A>(false, true, R, nb, D, scale, Qs, D, Kp, D, A(0), S, nb);
      for (int64_t r = 0; r < R; r++) {
        A* srow = S + r * nb;
        int64_t valid = nb;
        if (in.causal) {
          const int64_t i = m0 + r % rows;
          valid = std::clamp<int64_t>(i + s.off - n0 + 1, 0, nb);
          if (valid < nb) fill<A>(srow + valid, neg_inf, nb - valid);
        }
        if (has_masked && valid > 0) add_inplace<A>(srow, madd, valid);
        online_softmax_row<A>(srow, nb, mrow[r], lrow[r], O + r * D, D);
      }
      // O += P V'   (R x D). A masked key has p = 0, and 0 * NaN = NaN: when the block holds a non-finite V' row, the
      // keys a row does not see are skipped explicitly (a key a row does not see never reaches it, docs/semantics.md).
      if (all_finite<A>(Vp, nb * D)) {
        gemm<A>(false, false, R, D, nb, A(1), S, nb, Vp, D, A(1), O, D);
      } else {
        for (int64_t r = 0; r < R; r++) {
          const int64_t valid = in.causal ? std::clamp<int64_t>(m0 + r % rows + s.off - n0 + 1, 0, nb) : nb;
          for (int64_t c = 0; c < valid; c++) {
            if (!has_masked || madd[c] == A(0)) axpy<A>(O + r * D, S[r * nb + c], Vp + c * D, D);
          }
        }
      }
    }

    for (int64_t r = 0; r < R; r++) {
      const int64_t g = r / rows, i = m0 + r % rows;
      const int64_t row_index = (b * s.Hq + h * G + g) * s.Lq + i;
      ld[row_index] = finish_row<A>(O + r * D, mrow[r], lrow[r], D, row_sees_key(in.first_key, b, i, s, in.causal));
      from_acc<T>(O + r * D, od + row_index * D, D);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------------
// Decode kernel (few query rows): split the keys, infuse on the fly, combine partials.
// ---------------------------------------------------------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX2)
// The eight horizontal sums of a0..a7, as one vector [sum(a0), ..., sum(a7)].
inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
  const __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// <v_c, a> and |v_c|^2 for the rows v[0, n) (acc_t pointers); vectorised over 4 rows at a time with AVX2.
template <typename A>
inline void gate_dots(const A* const* v, int64_t n, const A* a, int64_t D, A* va, A* vv) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    if (D % 8 == 0) {
      alignas(32) float tmp[8];
      for (; c + 4 <= n; c += 4) {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, n0 = s0, n1 = s0, n2 = s0, n3 = s0;
        const float *r0 = v[c], *r1 = v[c + 1], *r2 = v[c + 2], *r3 = v[c + 3];
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 av = _mm256_loadu_ps(a + d);
          const __m256 x0 = _mm256_loadu_ps(r0 + d), x1 = _mm256_loadu_ps(r1 + d);
          const __m256 x2 = _mm256_loadu_ps(r2 + d), x3 = _mm256_loadu_ps(r3 + d);
          s0 = _mm256_fmadd_ps(x0, av, s0);
          s1 = _mm256_fmadd_ps(x1, av, s1);
          s2 = _mm256_fmadd_ps(x2, av, s2);
          s3 = _mm256_fmadd_ps(x3, av, s3);
          n0 = _mm256_fmadd_ps(x0, x0, n0);
          n1 = _mm256_fmadd_ps(x1, x1, n1);
          n2 = _mm256_fmadd_ps(x2, x2, n2);
          n3 = _mm256_fmadd_ps(x3, x3, n3);
        }
        _mm256_store_ps(tmp, hsum8(s0, s1, s2, s3, n0, n1, n2, n3));
        for (int j = 0; j < 4; j++) {
          va[c + j] = tmp[j];
          vv[c + j] = tmp[4 + j];
        }
      }
    }
  }
#endif
  for (; c < n; c++) {
    va[c] = dot<A>(v[c], a, D);
    vv[c] = dot<A>(v[c], v[c], D);
  }
}

// S[r * lds + c] = <Q_r, K_c> for r < R, c < n (K rows contiguous with stride D); 8 keys at a time with AVX2.
template <typename A>
inline void score_dots(const A* Q, int64_t R, const A* K, int64_t n, int64_t D, A* S, int64_t lds) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<A, float>) {
    if (D % 8 == 0) {
      for (; c + 8 <= n; c += 8) {
        const float* k0 = K + c * D;
        for (int64_t r = 0; r < R; r++) {
          const float* qr = Q + r * D;
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
          for (int64_t d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(qr + d);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + D + d), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * D + d), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * D + d), a3);
            a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 4 * D + d), a4);
            a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 5 * D + d), a5);
            a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 6 * D + d), a6);
            a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 7 * D + d), a7);
          }
          _mm256_storeu_ps(S + r * lds + c, hsum8(a0, a1, a2, a3, a4, a5, a6, a7));
        }
      }
    }
  }
#endif
  for (; c < n; c++) {
    for (int64_t r = 0; r < R; r++) S[r * lds + c] = dot<A>(Q + r * D, K + c * D, D);
  }
}

// o[0, D) += sum_{c < n} p[c] V_c (V rows contiguous with stride D), keeping 64-wide slices of o in registers.
// min over a row of probabilities (vectorised; only compared with 0, so a NaN may be dropped).
template <typename A>
inline A row_min(const A* x, int64_t n) {
  using V = Vectorized<A>;
  A m = std::numeric_limits<A>::infinity();
  int64_t i = 0;
  if (n >= V::size()) {
    V vm(m);
    for (; i + V::size() <= n; i += V::size()) vm = at::vec::minimum(vm, V::loadu(x + i));
    m = at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return at::vec::minimum(a, b); }, vm);
  }
  for (; i < n; i++) m = std::min(m, x[i]);
  return m;
}

template <typename A>
inline void accumulate_pv(A* o, const A* p, const A* V, int64_t n, int64_t D) {
  using Vec = Vectorized<A>;
  constexpr int64_t W = 8 * Vec::size();
  int64_t d0 = 0;
  for (; d0 + W <= D; d0 += W) {
    Vec acc[8];
    for (int j = 0; j < 8; j++) acc[j] = Vec::loadu(o + d0 + j * Vec::size());
    for (int64_t c = 0; c < n; c++) {
      if (p[c] == A(0)) continue;
      const Vec pc(p[c]);
      const A* vr = V + c * D + d0;
      for (int j = 0; j < 8; j++) acc[j] = at::vec::fmadd(pc, Vec::loadu(vr + j * Vec::size()), acc[j]);
    }
    for (int j = 0; j < 8; j++) acc[j].store(o + d0 + j * Vec::size());
  }
  if (d0 < D) {
    for (int64_t c = 0; c < n; c++) {
      if (p[c] != A(0)) axpy<A>(o + d0, p[c], V + c * D + d0, D - d0);
    }
  }
}

template <typename T>
void fwd_decode(const FwdInputs& in, at::Tensor& out, at::Tensor& lse) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr bool kSame = std::is_same_v<T, A>;
  constexpr int64_t NBK = kDecodeBlockN;
  const AttnShape& s = in.s;
  const int64_t D = s.D, G = s.G, R = G * s.Lq;
  const auto acc_dtype = c10::CppTypeToScalarType<A>::value;

  // The keys some row can see: [span_begin, span_end), the union over samples of [first_key[b], key_end[b]) (the
  // causal limit of the last row is key Lk - 1: no narrower). A static KV cache masks its unused tail and left
  // padding masks a sample's first keys: those keys are never read (a key a row does not see has no influence on it,
  // docs/semantics.md), so a cache of 4096 slots holding 100 keys costs what 100 keys cost.
  int64_t span_begin = s.Lk, span_end = 0;
  for (int64_t b = 0; b < s.B; b++) {
    if (in.first_key[b] >= in.key_end[b]) continue;
    span_begin = std::min(span_begin, in.first_key[b]);
    span_end = std::max(span_end, in.key_end[b]);
  }
  const int64_t span = std::max<int64_t>(0, span_end - span_begin);
  // Splits of the span of each (b, h): enough tasks to feed the threads, each split at least kDecodeMinSplit keys.
  const int64_t want_tasks = 4 * num_scratch_slots();
  int64_t nsplit = std::max<int64_t>(1, (want_tasks + s.B * s.Hkv - 1) / (s.B * s.Hkv));
  nsplit = std::min(nsplit, std::max<int64_t>(1, span / kDecodeMinSplit));
  int64_t split = std::max<int64_t>(1, (span + nsplit - 1) / nsplit);
  split = (split + NBK - 1) / NBK * NBK;
  nsplit = std::max<int64_t>(1, (span + split - 1) / split);
  const int64_t num_tasks = s.B * s.Hkv * nsplit;

  // Partials: per task and row the unnormalised output, running max and sum. Scratch per thread: Qs (R x D), S
  // (R x NBK), K' and V' (NBK x D each), converted K / V rows (NBK x D each, low precision only), gate work arrays
  // (3 x NBK). Both in one workspace (64-byte aligned pieces), kept by this thread between calls when small.
  const int64_t part_size = aligned(num_tasks * R * (D + 2));
  const int64_t per_thread =
      aligned(R * D) + aligned(R * NBK) + 2 * aligned(NBK * D) + (kSame ? 0 : 2 * aligned(NBK * D)) + 3 * NBK;
  const at::Tensor workspace = call_workspace(part_size + num_scratch_slots() * per_thread, acc_dtype);
  A* part_d = workspace.data_ptr<A>();
  A* scratch_base = part_d + part_size;

  const Strides4 sq = strides_of(in.q), sk = strides_of(in.k), sv = strides_of(in.v);
  const T* qd = in.q.const_data_ptr<T>();
  const T* kd = in.k.const_data_ptr<T>();
  const T* vd = in.v.const_data_ptr<T>();
  const A* km = in.p.k_mul.const_data_ptr<A>();
  const A* ka = in.p.k_add.const_data_ptr<A>();
  const A* vm = in.p.v_mul.const_data_ptr<A>();
  const A* va = in.p.v_add.const_data_ptr<A>();
  const A* na = in.p.norm_a.const_data_ptr<A>();
  const A* hl = in.p.head_logit.const_data_ptr<A>();
  const A scale = static_cast<A>(in.scale);
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const bool rescale = in.rescale;

  const int64_t work = s.B * s.Hkv * span * D * (6 + 2 * R);
  run_tasks(num_tasks, work, [&](int64_t task, int slot) {
    const int64_t j = task % nsplit, bh = task / nsplit, h = bh % s.Hkv, b = bh / s.Hkv;
    // this split's keys, narrowed to those sample b's rows may see (none: the partials stay empty)
    const int64_t t_begin = std::max(span_begin + j * split, in.first_key[b]);
    const int64_t t_end = std::min({span_begin + (j + 1) * split, span_end, in.key_end[b]});
    Carver<A> carve{scratch_base + slot * per_thread};
    A* Qs = carve.take(R * D);
    A* S = carve.take(R * NBK);
    A* Kb = carve.take(NBK * D);
    A* Vp = carve.take(NBK * D);
    A* Kc = kSame ? nullptr : carve.take(NBK * D);
    A* Vc = kSame ? nullptr : carve.take(NBK * D);
    A* gbuf = carve.take(NBK);
    A* vdot = carve.take(NBK);
    A* vnorm2 = carve.take(NBK);
    A* prow = part_d + task * R * (D + 2);  // R rows of [O (D), m, l]
    const A* krows[NBK];
    const A* vrows[NBK];

    for (int64_t g = 0; g < G; g++) {
      for (int64_t i = 0; i < s.Lq; i++) {
        A* dst = Qs + (g * s.Lq + i) * D;
        to_acc<T>(qd + b * sq.b + (h * G + g) * sq.h + i * sq.l, dst, D);
        scale_inplace<A>(dst, scale, D);
      }
    }
    for (int64_t r = 0; r < R; r++) {
      A* pr = prow + r * (D + 2);
      fill<A>(pr, A(0), D);
      pr[D] = neg_inf;
      pr[D + 1] = A(0);
    }
    const A* kmv = km + bh * D;
    const A* kav = ka + bh * D;
    const A* vmv = vm + bh * D;
    const A* vav = va + bh * D;
    const A cna = std::max(na[bh], A(kCosineEps));
    const A lambda = hl[h];
    const bool* mask_row = in.kv_mask ? in.kv_mask + b * s.Lk : nullptr;

    for (int64_t t0 = t_begin; t0 < t_end; t0 += NBK) {
      const int64_t nb = std::min(NBK, t_end - t0);
      // Raw rows as acc_t.
      for (int64_t c = 0; c < nb; c++) {
        const T* kr = kd + b * sk.b + h * sk.h + (t0 + c) * sk.l;
        const T* vr = vd + b * sv.b + h * sv.h + (t0 + c) * sv.l;
        if constexpr (kSame) {
          krows[c] = reinterpret_cast<const A*>(kr);
          vrows[c] = reinterpret_cast<const A*>(vr);
        } else {
          to_acc<T>(kr, Kc + c * D, D);
          to_acc<T>(vr, Vc + c * D, D);
          krows[c] = Kc + c * D;
          vrows[c] = Vc + c * D;
        }
      }
      // Gates of the block, vectorised over keys.
      if (rescale) {
        gate_dots<A>(vrows, nb, vav, D, vdot, vnorm2);
        const Vec eps = Vec(static_cast<A>(kCosineEps)), vcna = Vec(cna), vlam = Vec(lambda), one = Vec(A(1));
        for (int64_t c = 0; c < nb; c += Vec::size()) {
          const int64_t cnt = std::min<int64_t>(Vec::size(), nb - c);
          const Vec nv = at::vec::maximum(Vec::loadu(vnorm2 + c, cnt).sqrt(), eps);
          const Vec z = vlam + Vec::loadu(vdot + c, cnt) / (nv * vcna);
          (one / (one + z.neg().exp())).store(gbuf + c, cnt);
        }
      } else {
        fill<A>(gbuf, A(1), nb);
      }
      for (int64_t c = 0; c < nb; c++) {
        infuse_row<A>(krows[c], kmv, kav, gbuf[c], Kb + c * D, D);
        infuse_row<A>(vrows[c], vmv, vav, gbuf[c], Vp + c * D, D);
      }
      score_dots<A>(Qs, R, Kb, nb, D, S, NBK);
      for (int64_t r = 0; r < R; r++) {
        A* srow = S + r * NBK;
        A* pr = prow + r * (D + 2);
        int64_t valid = nb;
        if (in.causal) {
          const int64_t i = r % s.Lq;
          valid = std::clamp<int64_t>(i + s.off - t0 + 1, 0, nb);
          if (valid < nb) fill<A>(srow + valid, neg_inf, nb - valid);
        }
        if (mask_row) {
          for (int64_t c = 0; c < valid; c++) {
            if (!mask_row[t0 + c]) srow[c] = neg_inf;
          }
        }
        if (!online_softmax_row<A>(srow, nb, pr[D], pr[D + 1], pr, D)) continue;
        // Skips p = 0: exact for the keys the row does not see (they must not reach it, even a NaN V') and for
        // finite V'. A key the row sees whose p underflowed to 0 still counts when its V' is not finite (0 * Inf =
        // NaN, as in the reference): checked per such key only, so the common case costs one compare per key.
        accumulate_pv<A>(pr, srow, Vp, valid, D);
        if (valid > 0 && row_min<A>(srow, valid) == A(0)) {
          for (int64_t c = 0; c < valid; c++) {
            if (srow[c] == A(0) && (!mask_row || mask_row[t0 + c]) && !all_finite<A>(Vp + c * D, D)) {
              axpy<A>(pr, srow[c], Vp + c * D, D);
            }
          }
        }
      }
    }
  });

  // Combine the splits of every (b, h, row).
  const Strides4 so{s.Hq * s.Lq * D, s.Lq * D, D};
  T* od = out.data_ptr<T>();
  A* ld = lse.data_ptr<A>();
  at::parallel_for(0, s.B * s.Hkv * R, 64, [&](int64_t begin, int64_t end) {
    std::vector<A> o(D);
    for (int64_t x = begin; x < end; x++) {
      const int64_t r = x % R, bh = x / R, h = bh % s.Hkv, b = bh / s.Hkv;
      const int64_t g = r / s.Lq, i = r % s.Lq;
      A m = neg_inf;
      for (int64_t j = 0; j < nsplit; j++) m = max_nan(m, part_d[((bh * nsplit + j) * R + r) * (D + 2) + D]);
      A l = A(0);
      fill<A>(o.data(), A(0), D);
      if (m != neg_inf) {
        for (int64_t j = 0; j < nsplit; j++) {
          const A* pr = part_d + ((bh * nsplit + j) * R + r) * (D + 2);
          if (pr[D] == neg_inf) continue;
          const A w = std::exp(pr[D] - m);
          l += w * pr[D + 1];
          axpy<A>(o.data(), w, pr, D);
        }
      }
      const int64_t row_index = (b * s.Hq + h * G + g) * s.Lq + i;
      ld[row_index] = finish_row<A>(o.data(), m, l, D, row_sees_key(in.first_key, b, i, s, in.causal));
      from_acc<T>(o.data(), od + b * so.b + (h * G + g) * so.h + i * so.l, D);
    }
  });
}

}  // namespace

void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_mul,
                          const at::Tensor& k_add, const at::Tensor& v_mul, const at::Tensor& v_add,
                          const at::Tensor& head_logit, const std::optional<at::Tensor>& kv_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "mit attention_cpu: q, k, v must be 4-d (B, H, L, D)");
  TORCH_CHECK(q.device().is_cpu(), "mit attention_cpu: tensors must be on the CPU, got ", q.device());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes(), "mit attention_cpu: bad k / v shapes");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "mit attention_cpu: Hq must be a multiple of Hkv");
  for (const at::Tensor* x : {&k, &v, &k_mul, &k_add, &v_mul, &v_add}) {
    TORCH_CHECK(x->scalar_type() == q.scalar_type(), "mit attention_cpu: all inputs must have q's dtype");
    TORCH_CHECK(x->device().is_cpu(), "mit attention_cpu: tensors must be on the CPU");
  }
  for (const at::Tensor* x : {&k_mul, &k_add, &v_mul, &v_add}) {
    TORCH_CHECK(x->dim() == 3 && x->size(0) == B && x->size(1) == Hkv && x->size(2) == D,
                "mit attention_cpu: infusion vectors must be (B, Hkv, D)");
  }
  TORCH_CHECK(head_logit.dim() == 1 && head_logit.size(0) == Hkv && at::isFloatingType(head_logit.scalar_type()),
              "mit attention_cpu: head_logit must be a float (Hkv,) tensor");
  if (kv_mask.has_value()) {
    TORCH_CHECK(kv_mask->scalar_type() == at::kBool && kv_mask->dim() == 2 && kv_mask->size(0) == B &&
                    kv_mask->size(1) == Lk,
                "mit attention_cpu: kv_mask must be a bool (B, Lk) tensor");
  }
}

std::tuple<at::Tensor, at::Tensor> attention_cpu_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const at::Tensor& k_mul,
                                                     const at::Tensor& k_add, const at::Tensor& v_mul,
                                                     const at::Tensor& v_add, const at::Tensor& head_logit,
                                                     const std::optional<at::Tensor>& kv_mask, bool causal,
                                                     double scale, bool rescale) {
  check_attention_args(q_in, k_in, v_in, k_mul, k_add, v_mul, v_add, head_logit, kv_mask);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  AttnShape s{q.size(0), q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), k.size(2), q.size(3), 0};
  s.off = s.Lk - s.Lq;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(acc));
  if (out.numel() == 0) return {out, lse};
  const InfusionParams p = make_infusion_params(k_mul, k_add, v_mul, v_add, head_logit, acc);
  at::Tensor mask;
  std::vector<int64_t> first_key(s.B, 0), key_end(s.B, s.Lk);
  if (kv_mask.has_value()) {
    mask = kv_mask->contiguous();
    const bool* md = mask.const_data_ptr<bool>();
    for (int64_t b = 0; b < s.B; b++) {
      int64_t j = 0, e = s.Lk;
      while (j < s.Lk && !md[b * s.Lk + j]) j++;
      while (e > j && !md[b * s.Lk + e - 1]) e--;
      first_key[b] = j;
      key_end[b] = e;
    }
  }
  FwdInputs in{q,
               k,
               v,
               p,
               kv_mask.has_value() ? mask.const_data_ptr<bool>() : nullptr,
               first_key.data(),
               key_end.data(),
               causal,
               scale,
               rescale,
               s};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mit_attention_cpu_fwd", [&] {
    if (s.G * s.Lq <= kDecodeMaxRows) {
      fwd_decode<scalar_t>(in, out, lse);
    } else {
      fwd_blocked<scalar_t>(in, out, lse);
    }
  });
  return {out, lse};
}

}  // namespace mit
