// MiT attention backward on CPU. Given dO, with delta_i = <O_i, dO_i>:
//
//   p_it = exp(s_it - lse_i)             s_it = scale q_i . K'_t (masked)
//   dV'_t = sum_i p_it dO_i               dP_it = dO_i . V'_t        dS_it = p_it (dP_it - delta_i)
//   dK'_t = scale sum_i dS_it q_i         dq_i  = scale sum_t dS_it K'_t
//
// then through the infusion (per key t of KV head h, fp32 / fp64):
//
//   dk_t = dK'_t (1 + g_t k_mul)          dv_t = dV'_t (1 + g_t v_mul) + dz_t (a / (n_v n_a) - c_t v_t / (|v_t| n_v))
//   dk_mul = sum_t g_t dK'_t k_t          dk_add = sum_t g_t dK'_t
//   dv_mul = sum_t g_t dV'_t v_t          dv_add = sum_t g_t dV'_t + dz_t (v_t / (n_v n_a) - c_t a / (|a| n_a))
//   dg_t = <dK'_t, k_t k_mul + k_add> + <dV'_t, v_t v_mul + v_add>,  dz_t = dg_t g_t (1 - g_t),  dlambda = sum dz_t
//
// with n_x = max(|x|, eps) and x / |x| read as 0 for x = 0: the exact gradient of torch's cosine_similarity.
//
// Parallel structure (no (Lq, Lk) buffer, no float atomics; bitwise reproducible run to run, whichever thread runs
// which task, for a given thread count):
// * main pass: one task per (b, query head). A task walks the keys in blocks; for each block it infuses K', V' once,
//   loops over the query blocks that can see it (five BLAS GEMMs per tile, as in flash-attention 2), owns its dq rows,
//   and accumulates the block's dK', dV' in a per-thread buffer. The G query heads sharing a KV head then add their
//   block contributions into one fp32 accumulator in a fixed order (slot 0 first), enforced by a per-block counter:
//   tasks are handed out slot-major, so the predecessor a task waits for is always already running.
// * infusion pass: one task per (b, KV head, key block) turns dK', dV' into dk, dv and per-block partial sums of the
//   vector gradients, which are then reduced in a fixed order.
#include "attention.h"

#include <memory>

namespace mit {

namespace {

constexpr int64_t kBwdBlockN = 128;  // keys per block (main pass)
constexpr int64_t kBwdBlockM = 128;  // queries per tile (main pass)
constexpr int64_t kInfBlock = 128;   // keys per task (infusion pass)

template <typename A>
inline void add_rows(A* dst, const A* src, int64_t n, bool overwrite) {
  if (overwrite) {
    std::memcpy(dst, src, sizeof(A) * n);
    return;
  }
  using V = Vectorized<A>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(dst + i) + V::loadu(src + i)).store(dst + i);
  for (; i < n; i++) dst[i] += src[i];
}

template <typename T>
struct BwdResult {
  at::Tensor dq, dk, dv, dk_mul, dk_add, dv_mul, dv_add, dhead_logit;
};

template <typename T>
BwdResult<T> bwd_impl(const at::Tensor& dO, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const InfusionParams& p, const bool* kv_mask, const at::Tensor& out, const at::Tensor& lse,
                      bool causal, double scale_d, bool rescale, const AttnShape& s,
                      at::ScalarType head_logit_dtype) {
  using A = acc_t<T>;
  constexpr bool kSame = std::is_same_v<T, A>;
  const auto acc_dtype = c10::CppTypeToScalarType<A>::value;
  const int64_t D = s.D, G = s.G;
  const A scale = static_cast<A>(scale_d);
  const at::Tensor gates = compute_gates<T>(v, p, rescale);
  const auto acc_opts = q.options().dtype(acc_dtype);

  // delta_i = <O_i, dO_i>
  at::Tensor delta = at::empty({s.B, s.Hq, s.Lq}, acc_opts);
  {
    const Strides4 so = strides_of(out), sdo = strides_of(dO);
    const T* od = out.const_data_ptr<T>();
    const T* dod = dO.const_data_ptr<T>();
    A* dd = delta.data_ptr<A>();
    const int64_t grain = std::max<int64_t>(256, kMinWorkPerThread / D);
    at::parallel_for(0, s.B * s.Hq * s.Lq, grain, [&](int64_t begin, int64_t end) {
      std::vector<A> b1(D), b2(D);
      for (int64_t r = begin; r < end; r++) {
        const int64_t i = r % s.Lq, bh = r / s.Lq, h = bh % s.Hq, b = bh / s.Hq;
        const A* o = row_as_acc<T>(od + b * so.b + h * so.h + i * so.l, b1.data(), D);
        const A* g = row_as_acc<T>(dod + b * sdo.b + h * sdo.h + i * sdo.l, b2.data(), D);
        dd[r] = dot<A>(o, g, D);
      }
    });
  }

  BwdResult<T> res;
  const auto t_opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  res.dk = at::empty(k.sizes(), t_opts);
  res.dv = at::empty(v.sizes(), t_opts);
  // dK', dV' accumulators: the outputs themselves when they are already fp32 / fp64 (the infusion pass then rewrites
  // them in place, row by row), else fp32 buffers.
  at::Tensor dK_acc = kSame ? res.dk : at::empty(k.sizes(), acc_opts);
  at::Tensor dV_acc = kSame ? res.dv : at::empty(v.sizes(), acc_opts);
  res.dq = kSame ? at::zeros(q.sizes(), t_opts) : at::empty(q.sizes(), t_opts);

  const int64_t nb_max = std::min(kBwdBlockN, s.Lk);
  const int64_t qb_max = std::min(kBwdBlockM, s.Lq);
  const int64_t NB = (s.Lk + kBwdBlockN - 1) / kBwdBlockN;
  const int64_t per_thread = 4 * aligned(nb_max * D) + 2 * aligned(qb_max * nb_max) + 2 * aligned(qb_max * D) +
                             aligned(nb_max) + (kSame ? 0 : aligned(s.Lq * D));
  at::Tensor scratch = at::empty({num_scratch_slots(), per_thread}, acc_opts);
  A* scratch_base = scratch.data_ptr<A>();
  std::unique_ptr<std::atomic<int>[]> progress(new std::atomic<int>[s.B * s.Hkv * NB]);
  for (int64_t x = 0; x < s.B * s.Hkv * NB; x++) progress[x].store(0, std::memory_order_relaxed);

  const Strides4 sq = strides_of(q), sk = strides_of(k), sv = strides_of(v), sdo = strides_of(dO);
  const T* qd = q.const_data_ptr<T>();
  const T* kd = k.const_data_ptr<T>();
  const T* vd = v.const_data_ptr<T>();
  const T* dod = dO.const_data_ptr<T>();
  const A* gd = gates.const_data_ptr<A>();
  const A* lsed = lse.const_data_ptr<A>();
  const A* deltad = delta.const_data_ptr<A>();
  const A* km = p.k_mul.const_data_ptr<A>();
  const A* ka = p.k_add.const_data_ptr<A>();
  const A* vm = p.v_mul.const_data_ptr<A>();
  const A* va = p.v_add.const_data_ptr<A>();
  A* dKd = dK_acc.data_ptr<A>();
  A* dVd = dV_acc.data_ptr<A>();
  T* dqd = res.dq.template data_ptr<T>();
  const A inf = std::numeric_limits<A>::infinity();
  const bool q_direct = kSame && sq.l >= D;
  const bool do_direct = kSame && sdo.l >= D;

  // Main pass. Task t: slot g = t / (B Hkv) of the KV head bh = t % (B Hkv), i.e. query head h G + g.
  const int64_t work = s.B * s.Hq * s.Lq * (causal ? std::min(s.Lk, s.Lq) : s.Lk) * D * 5;
  run_tasks(s.B * s.Hkv * G, work, [&](int64_t task, int slot) {
    const int64_t g = task / (s.B * s.Hkv), bh = task % (s.B * s.Hkv), h = bh % s.Hkv, b = bh / s.Hkv;
    const int64_t hq = h * G + g, bhq = b * s.Hq + hq;
    Carver<A> carve{scratch_base + slot * per_thread};
    A* Kp = carve.take(nb_max * D);
    A* Vp = carve.take(nb_max * D);
    A* dKn = carve.take(nb_max * D);
    A* dVn = carve.take(nb_max * D);
    A* S = carve.take(qb_max * nb_max);
    A* dP = carve.take(qb_max * nb_max);
    A* Qc = carve.take(qb_max * D);
    A* dOc = carve.take(qb_max * D);
    A* madd = carve.take(nb_max);
    A* dq_acc = kSame ? reinterpret_cast<A*>(dqd) + bhq * s.Lq * D : carve.take(s.Lq * D);
    if constexpr (!kSame) fill<A>(dq_acc, A(0), s.Lq * D);
    const A* kmv = km + bh * D;
    const A* kav = ka + bh * D;
    const A* vmv = vm + bh * D;
    const A* vav = va + bh * D;
    const T* qbase = qd + b * sq.b + hq * sq.h;
    const T* dobase = dod + b * sdo.b + hq * sdo.h;

    for (int64_t n = 0; n < NB; n++) {
      const int64_t n0 = n * kBwdBlockN, nb = std::min(kBwdBlockN, s.Lk - n0);
      std::atomic<int>& turn = progress[bh * NB + n];
      A* dK_rows = dKd + (bh * s.Lk + n0) * D;
      A* dV_rows = dVd + (bh * s.Lk + n0) * D;
      bool has_masked = false;
      if (kv_mask) {
        int64_t allowed = 0;
        for (int64_t c = 0; c < nb; c++) {
          const bool keep = kv_mask[b * s.Lk + n0 + c];
          allowed += keep ? 1 : 0;
          madd[c] = keep ? A(0) : -inf;
        }
        has_masked = allowed < nb;
        if (allowed == 0) {  // nobody attends these keys: no contribution
          wait_for(turn, static_cast<int>(g));
          if (g == 0) {
            fill<A>(dK_rows, A(0), nb * D);
            fill<A>(dV_rows, A(0), nb * D);
          }
          turn.store(static_cast<int>(g) + 1, std::memory_order_release);
          continue;
        }
      }
      for (int64_t c = 0; c < nb; c++) {
        const int64_t j = n0 + c;
        const A gj = gd[bh * s.Lk + j];
        const A* krow = row_as_acc<T>(kd + b * sk.b + h * sk.h + j * sk.l, dKn, D);  // dKn as conversion space
        infuse_row<A>(krow, kmv, kav, gj, Kp + c * D, D);
        const A* vrow = row_as_acc<T>(vd + b * sv.b + h * sv.h + j * sv.l, dVn, D);
        infuse_row<A>(vrow, vmv, vav, gj, Vp + c * D, D);
      }
      fill<A>(dKn, A(0), nb * D);
      fill<A>(dVn, A(0), nb * D);
      // A tile with a non-finite q / dO row or K' / V' row takes an exact path that skips the (query, key) pairs the
      // masks hide: the GEMMs would turn their p = 0 into 0 * NaN = NaN.
      const bool kv_finite = all_finite<A>(Kp, nb * D) && all_finite<A>(Vp, nb * D);

      const int64_t m_lo = causal ? std::max<int64_t>(0, n0 - s.off) : 0;
      for (int64_t m0 = m_lo; m0 < s.Lq; m0 += kBwdBlockM) {
        const int64_t rows = std::min(kBwdBlockM, s.Lq - m0);
        const A* Qm;
        int64_t ldq;
        if (q_direct) {
          Qm = reinterpret_cast<const A*>(qbase + m0 * sq.l);
          ldq = sq.l;
        } else {
          for (int64_t r = 0; r < rows; r++) to_acc<T>(qbase + (m0 + r) * sq.l, Qc + r * D, D);
          Qm = Qc;
          ldq = D;
        }
        const A* dOm;
        int64_t lddo;
        if (do_direct) {
          dOm = reinterpret_cast<const A*>(dobase + m0 * sdo.l);
          lddo = sdo.l;
        } else {
          for (int64_t r = 0; r < rows; r++) to_acc<T>(dobase + (m0 + r) * sdo.l, dOc + r * D, D);
          dOm = dOc;
          lddo = D;
        }
        // S = scale Q K'^T -> P
        gemm<A>(false, true, rows, nb, D, scale, Qm, ldq, Kp, D, A(0), S, nb);
        const bool tile_finite = kv_finite && rows_finite<A>(Qm, rows, ldq, D) && rows_finite<A>(dOm, rows, lddo, D);
        if (!tile_finite) {
          // Exact path (non-finite values): the five products pair by pair, over the pairs the masks allow only.
          for (int64_t r = 0; r < rows; r++) {
            const int64_t i = m0 + r;
            const A L = lsed[bhq * s.Lq + i];
            if (L == inf) continue;  // the row sees no key
            const int64_t valid = causal ? std::clamp<int64_t>(i + s.off - n0 + 1, 0, nb) : nb;
            const A dl = deltad[bhq * s.Lq + i];
            const A* qr = Qm + r * ldq;
            const A* dor = dOm + r * lddo;
            A* dqr = dq_acc + i * D;
            for (int64_t c = 0; c < valid; c++) {
              if (has_masked && madd[c] != A(0)) continue;
              const A pv = std::exp(S[r * nb + c] - L);
              axpy<A>(dVn + c * D, pv, dor, D);
              const A ds = pv * (dot<A>(dor, Vp + c * D, D) - dl);
              axpy<A>(dKn + c * D, scale * ds, qr, D);
              axpy<A>(dqr, scale * ds, Kp + c * D, D);
            }
          }
          continue;
        }
        bool any = false;
        for (int64_t r = 0; r < rows; r++) {
          const int64_t i = m0 + r;
          A* srow = S + r * nb;
          const A L = lsed[bhq * s.Lq + i];
          const int64_t valid = causal ? std::clamp<int64_t>(i + s.off - n0 + 1, 0, nb) : nb;
          if (L == inf || valid == 0) {
            fill<A>(srow, A(0), nb);
            continue;
          }
          any = true;
          if (valid < nb) fill<A>(srow + valid, -inf, nb - valid);
          if (has_masked) {
            using V = Vectorized<A>;
            int64_t c = 0;
            for (; c + V::size() <= valid; c += V::size()) (V::loadu(srow + c) + V::loadu(madd + c)).store(srow + c);
            for (; c < valid; c++) srow[c] += madd[c];
          }
          exp_sub_sum<A>(srow, L, nb);
        }
        if (!any) continue;
        // dV' += P^T dO
        gemm<A>(true, false, nb, D, rows, A(1), S, nb, dOm, lddo, A(1), dVn, D);
        // dP = dO V'^T, dS = P (dP - delta)
        gemm<A>(false, true, rows, nb, D, A(1), dOm, lddo, Vp, D, A(0), dP, nb);
        for (int64_t r = 0; r < rows; r++) {
          using V = Vectorized<A>;
          const A dl = deltad[bhq * s.Lq + m0 + r];
          const V vdl(dl);
          A* prow = S + r * nb;
          A* dprow = dP + r * nb;
          int64_t c = 0;
          for (; c + V::size() <= nb; c += V::size()) {
            (V::loadu(prow + c) * (V::loadu(dprow + c) - vdl)).store(dprow + c);
          }
          for (; c < nb; c++) dprow[c] = prow[c] * (dprow[c] - dl);
        }
        // dK' += scale dS^T Q;  dq += scale dS K'
        gemm<A>(true, false, nb, D, rows, scale, dP, nb, Qm, ldq, A(1), dKn, D);
        gemm<A>(false, false, rows, D, nb, scale, dP, nb, Kp, D, A(1), dq_acc + m0 * D, D);
      }
      // Add this head's contribution to the shared accumulators, after the previous query head of the group.
      wait_for(turn, static_cast<int>(g));
      add_rows<A>(dK_rows, dKn, nb * D, g == 0);
      add_rows<A>(dV_rows, dVn, nb * D, g == 0);
      turn.store(static_cast<int>(g) + 1, std::memory_order_release);
    }
    if constexpr (!kSame) {
      T* dst = dqd + bhq * s.Lq * D;
      from_acc<T>(dq_acc, dst, s.Lq * D);
    }
  });

  // Infusion pass: dK', dV' -> dk, dv and per-block partial sums [dk_mul, dk_add, dv_mul, dv_add (D each), dlambda].
  const int64_t NI = (s.Lk + kInfBlock - 1) / kInfBlock;
  const int64_t part_w = 4 * D + 1;
  at::Tensor part = at::empty({s.B * s.Hkv, NI, part_w}, acc_opts);
  A* partd = part.data_ptr<A>();
  const A* nad = p.norm_a.const_data_ptr<A>();
  T* dkd = res.dk.template data_ptr<T>();
  T* dvd = res.dv.template data_ptr<T>();
  const int64_t inf_grain = std::max<int64_t>(1, kMinWorkPerThread / (kInfBlock * D * 12));
  at::parallel_for(0, s.B * s.Hkv * NI, inf_grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(6 * D);
    A* kc = buf.data();
    A* vc = kc + D;
    A* ek = vc + D;
    A* ev = ek + D;
    A* ok = ev + D;
    A* ov = ok + D;
    for (int64_t x = begin; x < end; x++) {
      const int64_t blk = x % NI, bh = x / NI, h = bh % s.Hkv, b = bh / s.Hkv;
      const int64_t t0 = blk * kInfBlock, t1 = std::min(s.Lk, t0 + kInfBlock);
      A* pr = partd + x * part_w;
      A* p_km = pr;
      A* p_ka = pr + D;
      A* p_vm = pr + 2 * D;
      A* p_va = pr + 3 * D;
      fill<A>(pr, A(0), part_w);
      const A* kmv = km + bh * D;
      const A* kav = ka + bh * D;
      const A* vmv = vm + bh * D;
      const A* vav = va + bh * D;
      const A norm_a = nad[bh];
      const A cna = std::max(norm_a, A(kCosineEps));
      const A lambda = p.head_logit.const_data_ptr<A>()[h];
      A sum_dz_c = A(0), sum_dz = A(0);
      for (int64_t t = t0; t < t1; t++) {
        const A* dKr = dKd + (bh * s.Lk + t) * D;
        const A* dVr = dVd + (bh * s.Lk + t) * D;
        to_acc<T>(kd + b * sk.b + h * sk.h + t * sk.l, kc, D);
        to_acc<T>(vd + b * sv.b + h * sv.h + t * sv.l, vc, D);
        const A gt = gd[bh * s.Lk + t];
        A dz = A(0), w = A(0), u = A(0);
        if (rescale) {
          for (int64_t d = 0; d < D; d++) {
            ek[d] = kc[d] * kmv[d] + kav[d];
            ev[d] = vc[d] * vmv[d] + vav[d];
          }
          const A dg = dot<A>(dKr, ek, D) + dot<A>(dVr, ev, D);
          A c, nv;
          gate_of_row<A>(vc, vav, cna, lambda, D, &c, &nv);
          dz = dg * gt * (A(1) - gt);
          const A cnv = std::max(nv, A(kCosineEps));
          w = dz / (cnv * cna);
          u = nv > A(0) ? dz * c / (nv * cnv) : A(0);
          sum_dz_c += dz * c;
          sum_dz += dz;
        }
        for (int64_t d = 0; d < D; d++) {
          const A gk = gt * dKr[d], gv = gt * dVr[d];
          p_km[d] += gk * kc[d];
          p_ka[d] += gk;
          p_vm[d] += gv * vc[d];
          // The cosine terms only exist with rescale (without it the gate is a constant: no 0 * Inf from them).
          p_va[d] += gv + (rescale ? w * vc[d] : A(0));
          ok[d] = dKr[d] + gk * kmv[d];
          ov[d] = dVr[d] + gv * vmv[d] + (rescale ? w * vav[d] - u * vc[d] : A(0));
        }
        from_acc<T>(ok, dkd + (bh * s.Lk + t) * D, D);  // may overwrite dKr (same row): it is no longer read
        from_acc<T>(ov, dvd + (bh * s.Lk + t) * D, D);
      }
      if (rescale) {
        const A coef = norm_a > A(0) ? sum_dz_c / (norm_a * cna) : A(0);
        for (int64_t d = 0; d < D; d++) p_va[d] -= coef * vav[d];
      }
      pr[4 * D] = sum_dz;
    }
  });

  // Fixed-order reduction of the partial sums.
  at::Tensor vec_sums = at::zeros({4, s.B, s.Hkv, D}, acc_opts);
  at::Tensor dl_sum = at::zeros({s.Hkv}, acc_opts);
  {
    A* vs = vec_sums.data_ptr<A>();
    A* dls = dl_sum.data_ptr<A>();
    for (int64_t bh = 0; bh < s.B * s.Hkv; bh++) {
      for (int64_t blk = 0; blk < NI; blk++) {
        const A* pr = partd + (bh * NI + blk) * part_w;
        for (int64_t which = 0; which < 4; which++) {
          add_rows<A>(vs + (which * s.B * s.Hkv + bh) * D, pr + which * D, D, false);
        }
      }
    }
    for (int64_t h = 0; h < s.Hkv; h++) {
      for (int64_t b = 0; b < s.B; b++) {
        for (int64_t blk = 0; blk < NI; blk++) dls[h] += partd[((b * s.Hkv + h) * NI + blk) * part_w + 4 * D];
      }
    }
  }
  const auto dt = q.scalar_type();
  res.dk_mul = vec_sums[0].to(dt);
  res.dk_add = vec_sums[1].to(dt);
  res.dv_mul = vec_sums[2].to(dt);
  res.dv_add = vec_sums[3].to(dt);
  res.dhead_logit = dl_sum.to(head_logit_dtype);
  return res;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_cpu_bwd(const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                  const at::Tensor& k_mul, const at::Tensor& k_add, const at::Tensor& v_mul, const at::Tensor& v_add,
                  const at::Tensor& head_logit, const std::optional<at::Tensor>& kv_mask, const at::Tensor& out,
                  const at::Tensor& lse, bool causal, double scale, bool rescale) {
  check_attention_args(q_in, k_in, v_in, k_mul, k_add, v_mul, v_add, head_logit, kv_mask);
  TORCH_CHECK(grad_out.sizes() == q_in.sizes() && out.sizes() == q_in.sizes(),
              "mit attention_cpu_bwd: grad_out and out must have q's shape");
  TORCH_CHECK(grad_out.scalar_type() == q_in.scalar_type() && out.scalar_type() == q_in.scalar_type(),
              "mit attention_cpu_bwd: grad_out and out must have q's dtype");
  const auto acc = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == acc && lse.dim() == 3 && lse.size(0) == q_in.size(0) &&
                  lse.size(1) == q_in.size(1) && lse.size(2) == q_in.size(2),
              "mit attention_cpu_bwd: lse must be (B, Hq, Lq) in the accumulation dtype");
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const at::Tensor dO = last_dim_contiguous(grad_out), o = last_dim_contiguous(out), l = lse.contiguous();
  AttnShape s{q.size(0), q.size(1), k.size(1), q.size(1) / k.size(1), q.size(2), k.size(2), q.size(3), 0};
  s.off = s.Lk - s.Lq;
  const InfusionParams p = make_infusion_params(k_mul, k_add, v_mul, v_add, head_logit, acc);
  at::Tensor mask;
  if (kv_mask.has_value()) mask = kv_mask->contiguous();
  const bool* mask_ptr = kv_mask.has_value() ? mask.const_data_ptr<bool>() : nullptr;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mit_attention_cpu_bwd", [&] {
    auto r = bwd_impl<scalar_t>(dO, q, k, v, p, mask_ptr, o, l, causal, scale, rescale, s, head_logit.scalar_type());
    result = {r.dq, r.dk, r.dv, r.dk_mul, r.dk_add, r.dv_mul, r.dv_add, r.dhead_logit};
  });
  return result;
}

}  // namespace mit
