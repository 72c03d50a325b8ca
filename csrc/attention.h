// MiT attention on CPU: shared declarations of the forward (attention_fwd.cpp) and backward (attention_bwd.cpp).
//
// Notation (mit_kernels/reference.py is the specification):
//   q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); k_mul, k_add, v_mul, v_add (B, Hkv, D); head_logit (Hkv,)
//   c_t = <v_t, a> / (max(|v_t|, eps) max(|a|, eps))      a = v_add, eps = 1e-8
//   g_t = sigmoid(lambda_h + c_t)                         (1 when rescale is off)
//   K'_t = k_t + g_t (k_t k_mul + k_add),  V'_t = v_t + g_t (v_t v_mul + v_add)
//   O = softmax(q K'^T scale + mask) V'                   query head j reads KV head j / (Hq / Hkv)
// causal is bottom-right aligned (query i sees key j iff j <= i + Lk - Lq); kv_mask (B, Lk) bool, True = may attend.
// The forward returns O and lse (B, Hq, Lq) = natural log-sum-exp of the scaled, masked scores, +inf for a row that
// sees no key (its output is 0, and exp(s - lse) = 0 gives it zero gradient), NaN for a row that sees keys whose
// scores are all -inf (softmax is NaN there). NaN / Inf propagate like the reference; a key a row does not see never
// reaches it, even a NaN one (docs/semantics.md): tiles holding a non-finite value take an exact pair-by-pair path.
#pragma once

#include <optional>
#include <tuple>

#include "mit_common.h"

namespace mit {

struct AttnShape {
  int64_t B, Hq, Hkv, G, Lq, Lk, D;
  int64_t off;  // Lk - Lq: query i sees keys j <= i + off under the causal mask
};

// Strides (in elements) of a (B, H, L, D) tensor whose last dim is contiguous.
struct Strides4 {
  int64_t b, h, l;
};

inline Strides4 strides_of(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2)};
}

// Last dim contiguous (what the kernels index), else a contiguous copy.
inline at::Tensor last_dim_contiguous(const at::Tensor& x) {
  return (x.size(-1) <= 1 || x.stride(-1) == 1) ? x : x.contiguous();
}

// x in dtype acc and contiguous: x itself when it already is (no dispatcher call: a decoding step passes vectors
// that already are, in every infused layer), else a converted copy.
inline at::Tensor as_contiguous(const at::Tensor& x, at::ScalarType acc) {
  return (x.scalar_type() == acc && x.is_contiguous()) ? x : x.to(acc).contiguous();
}

// The infusion vectors and gate parameters in the accumulation dtype, plus |v_add| per (b, h).
struct InfusionParams {
  at::Tensor k_mul, k_add, v_mul, v_add;  // (B, Hkv, D) acc, contiguous
  at::Tensor head_logit;                  // (Hkv,) acc
  at::Tensor norm_a;                      // (B * Hkv,) acc: |v_add|
};

inline InfusionParams make_infusion_params(const at::Tensor& k_mul, const at::Tensor& k_add, const at::Tensor& v_mul,
                                           const at::Tensor& v_add, const at::Tensor& head_logit,
                                           at::ScalarType acc) {
  InfusionParams p;
  p.k_mul = as_contiguous(k_mul, acc);
  p.k_add = as_contiguous(k_add, acc);
  p.v_mul = as_contiguous(v_mul, acc);
  p.v_add = as_contiguous(v_add, acc);
  p.head_logit = as_contiguous(head_logit, acc);
  const int64_t rows = p.v_add.numel() / std::max<int64_t>(p.v_add.size(-1), 1), D = p.v_add.size(-1);
  p.norm_a = at::empty({rows}, p.v_add.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "mit_norm_a", [&] {
    const scalar_t* a = p.v_add.const_data_ptr<scalar_t>();
    scalar_t* n = p.norm_a.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; r++) n[r] = std::sqrt(dot<scalar_t>(a + r * D, a + r * D, D));
  });
  return p;
}

template <typename A>
inline A sigmoid(A x) {
  return A(1) / (A(1) + std::exp(-x));
}

// Gate of one value row (acc_t): returns g and optionally c and |v|.
template <typename A>
inline A gate_of_row(const A* vrow, const A* a, A clamped_norm_a, A lambda, int64_t D, A* cos_out = nullptr,
                     A* norm_v_out = nullptr) {
  const A va = dot<A>(vrow, a, D);
  const A nv = std::sqrt(dot<A>(vrow, vrow, D));
  const A c = va / (std::max(nv, A(kCosineEps)) * clamped_norm_a);
  if (cos_out) *cos_out = c;
  if (norm_v_out) *norm_v_out = nv;
  return sigmoid<A>(lambda + c);
}

// g (B, Hkv, Lk) in acc_t for every key (all ones when rescale is off).
template <typename T>
at::Tensor compute_gates(const at::Tensor& v, const InfusionParams& p, bool rescale) {
  using A = acc_t<T>;
  const int64_t B = v.size(0), H = v.size(1), L = v.size(2), D = v.size(3);
  at::Tensor g = at::empty({B, H, L}, v.options().dtype(c10::CppTypeToScalarType<A>::value));
  if (!rescale) {
    g.fill_(1);
    return g;
  }
  const Strides4 sv = strides_of(v);
  const T* vd = v.const_data_ptr<T>();
  const A* va = p.v_add.const_data_ptr<A>();
  const A* na = p.norm_a.const_data_ptr<A>();
  const A* hl = p.head_logit.const_data_ptr<A>();
  A* gd = g.data_ptr<A>();
  const int64_t grain = std::max<int64_t>(256, kMinWorkPerThread / (2 * D + 1));
  at::parallel_for(0, B * H * L, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(D);
    for (int64_t r = begin; r < end; r++) {
      const int64_t t = r % L, bh = r / L, h = bh % H, b = bh / H;
      const A* vrow = row_as_acc<T>(vd + b * sv.b + h * sv.h + t * sv.l, buf.data(), D);
      const A cna = std::max(na[bh], A(kCosineEps));
      gd[r] = gate_of_row<A>(vrow, va + bh * D, cna, hl[h], D);
    }
  });
  return g;
}

std::tuple<at::Tensor, at::Tensor> attention_cpu_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& k_mul, const at::Tensor& k_add,
                                                     const at::Tensor& v_mul, const at::Tensor& v_add,
                                                     const at::Tensor& head_logit,
                                                     const std::optional<at::Tensor>& kv_mask, bool causal,
                                                     double scale, bool rescale);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
attention_cpu_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& k_mul, const at::Tensor& k_add, const at::Tensor& v_mul, const at::Tensor& v_add,
                  const at::Tensor& head_logit, const std::optional<at::Tensor>& kv_mask, const at::Tensor& out,
                  const at::Tensor& lse, bool causal, double scale, bool rescale);

at::Tensor ffn_gate_cpu_fwd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& ffn_mul);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_gate_cpu_bwd(const at::Tensor& grad_out, const at::Tensor& gate,
                                                                const at::Tensor& up, const at::Tensor& ffn_mul);

// Checks shared by the forward and backward entry points (the Python API validates first; these keep a direct call
// of the op from reading out of bounds).
void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_mul,
                          const at::Tensor& k_add, const at::Tensor& v_mul, const at::Tensor& v_add,
                          const at::Tensor& head_logit, const std::optional<at::Tensor>& kv_mask);

}  // namespace mit
