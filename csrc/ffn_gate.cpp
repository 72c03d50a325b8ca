// MiT FFN infusion gate on CPU:  y = silu(gate) * up * (1 + m),  m = ffn_mul[b] broadcast over the sequence.
//
//   s = sigmoid(gate),  silu = gate s,  silu' = s (1 + gate (1 - s))
//   d gate = dy (1 + m) up silu',  d up = dy (1 + m) silu,  d m = sum over L of dy silu up
//
// Elementwise in fp32 (fp64 for fp64 inputs). d m is reduced deterministically: per-(b, chunk of kRowChunk rows)
// partial sums, then summed over the chunks in order.
#include "attention.h"

namespace mit {

namespace {

constexpr int64_t kColChunk = 1024;  // features per work item
constexpr int64_t kRowChunk = 64;    // rows per d ffn_mul partial sum

template <typename A>
inline Vectorized<A> vsigmoid(const Vectorized<A>& x) {
  using V = Vectorized<A>;
  return (V(A(1)) + x.neg().exp()).reciprocal();
}

struct Rows3 {
  int64_t b, l;
};

// Forward. ``m`` is ffn_mul in acc_t, contiguous (B, F); 1 + m is formed per element (the same fp32 / fp64 sum as
// torch's m + 1), so a call allocates nothing but y: a decoding step calls this once per infused layer with one row, and
// there an extra op, allocation or zero-filled buffer costs more than the arithmetic.
template <typename T>
void ffn_fwd_impl(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& m, at::Tensor& y) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr bool kSame = std::is_same_v<T, A>;
  const int64_t B = gate.size(0), L = gate.size(1), F = gate.size(2);
  const Rows3 sg{gate.stride(0), gate.stride(1)}, su{up.stride(0), up.stride(1)};
  const T* gd = gate.const_data_ptr<T>();
  const T* ud = up.const_data_ptr<T>();
  const A* md = m.const_data_ptr<A>();
  T* yd = y.data_ptr<T>();
  const int64_t nchunk = (F + kColChunk - 1) / kColChunk;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / (8 * kColChunk));
  at::parallel_for(0, B * L * nchunk, grain, [&](int64_t begin, int64_t end) {
    // low precision: the rows converted to acc_t and the output before its conversion (uninitialised: every element
    // used is written first); acc_t: rows read and the output written in place
    A buf[kSame ? 1 : 3 * kColChunk];
    A* g = buf;
    A* u = g + (kSame ? 0 : kColChunk);
    for (int64_t x = begin; x < end; x++) {
      const int64_t c = x % nchunk, row = x / nchunk, l = row % L, b = row / L;
      const int64_t f0 = c * kColChunk, n = std::min(kColChunk, F - f0);
      const A* gr = row_as_acc<T>(gd + b * sg.b + l * sg.l + f0, g, n);
      const A* ur = row_as_acc<T>(ud + b * su.b + l * su.l + f0, u, n);
      const A* mr = md + b * F + f0;
      T* yr = yd + (b * L + l) * F + f0;
      A* o;
      if constexpr (kSame) {
        o = yr;
      } else {
        o = u + kColChunk;
      }
      const V one(A(1));
      int64_t i = 0;
      for (; i + V::size() <= n; i += V::size()) {
        const V xv = V::loadu(gr + i);
        (xv * vsigmoid<A>(xv) * V::loadu(ur + i) * (V::loadu(mr + i) + one)).store(o + i);
      }
      for (; i < n; i++) o[i] = gr[i] / (A(1) + std::exp(-gr[i])) * ur[i] * (mr[i] + A(1));
      if constexpr (!kSame) from_acc<T>(o, yr, n);
    }
  });
}

template <typename T>
void ffn_bwd_impl(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& one_plus_m,
                  at::Tensor& dgate, at::Tensor& dup, at::Tensor& dm_acc) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const int64_t B = gate.size(0), L = gate.size(1), F = gate.size(2);
  const Rows3 sg{gate.stride(0), gate.stride(1)}, su{up.stride(0), up.stride(1)}, sd{dy.stride(0), dy.stride(1)};
  const T* gd = gate.const_data_ptr<T>();
  const T* ud = up.const_data_ptr<T>();
  const T* dyd = dy.const_data_ptr<T>();
  const A* md = one_plus_m.const_data_ptr<A>();
  T* dgd = dgate.data_ptr<T>();
  T* dud = dup.data_ptr<T>();
  const int64_t nrc = (L + kRowChunk - 1) / kRowChunk;
  const int64_t ncc = (F + kColChunk - 1) / kColChunk;
  at::Tensor part = at::empty({B, nrc, F}, dm_acc.options());
  A* pd = part.data_ptr<A>();
  // Work item: (b, row chunk, column chunk); it owns the partial sum part[b, row chunk, column chunk].
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / (16 * kRowChunk * kColChunk));
  at::parallel_for(0, B * nrc * ncc, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> buf(5 * kColChunk);
    A* g = buf.data();
    A* u = g + kColChunk;
    A* d = u + kColChunk;
    A* og = d + kColChunk;
    A* ou = og + kColChunk;
    for (int64_t x = begin; x < end; x++) {
      const int64_t cc = x % ncc, rc = (x / ncc) % nrc, b = x / (ncc * nrc);
      const int64_t f0 = cc * kColChunk, n = std::min(kColChunk, F - f0);
      A* acc = pd + (b * nrc + rc) * F + f0;
      fill<A>(acc, A(0), n);
      const A* mr = md + b * F + f0;
      const int64_t l1 = std::min(L, (rc + 1) * kRowChunk);
      for (int64_t l = rc * kRowChunk; l < l1; l++) {
        const A* gr = row_as_acc<T>(gd + b * sg.b + l * sg.l + f0, g, n);
        const A* ur = row_as_acc<T>(ud + b * su.b + l * su.l + f0, u, n);
        const A* dr = row_as_acc<T>(dyd + b * sd.b + l * sd.l + f0, d, n);
        int64_t i = 0;
        for (; i + V::size() <= n; i += V::size()) {
          const V xv = V::loadu(gr + i), uv = V::loadu(ur + i), dv = V::loadu(dr + i);
          const V sv = vsigmoid<A>(xv);
          const V silu = xv * sv;
          const V dym = dv * V::loadu(mr + i);
          (dym * uv * sv * (V(A(1)) + xv * (V(A(1)) - sv))).store(og + i);
          (dym * silu).store(ou + i);
          at::vec::fmadd(dv * silu, uv, V::loadu(acc + i)).store(acc + i);
        }
        for (; i < n; i++) {
          const A s = A(1) / (A(1) + std::exp(-gr[i]));
          const A silu = gr[i] * s;
          const A dym = dr[i] * mr[i];
          og[i] = dym * ur[i] * s * (A(1) + gr[i] * (A(1) - s));
          ou[i] = dym * silu;
          acc[i] += dr[i] * silu * ur[i];
        }
        from_acc<T>(og, dgd + (b * L + l) * F + f0, n);
        from_acc<T>(ou, dud + (b * L + l) * F + f0, n);
      }
    }
  });
  A* dmd = dm_acc.data_ptr<A>();
  const int64_t sum_grain = std::max<int64_t>(1, kMinWorkPerThread / (nrc * kColChunk));
  at::parallel_for(0, B * ncc, sum_grain, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; x++) {
      const int64_t cc = x % ncc, b = x / ncc;
      const int64_t f0 = cc * kColChunk, n = std::min(kColChunk, F - f0);
      A* dst = dmd + b * F + f0;
      fill<A>(dst, A(0), n);
      for (int64_t rc = 0; rc < nrc; rc++) {
        const A* src = pd + (b * nrc + rc) * F + f0;
        int64_t i = 0;
        for (; i + V::size() <= n; i += V::size()) (V::loadu(dst + i) + V::loadu(src + i)).store(dst + i);
        for (; i < n; i++) dst[i] += src[i];
      }
    }
  });
}

void check_ffn_args(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& ffn_mul) {
  TORCH_CHECK(gate.dim() == 3 && up.sizes() == gate.sizes(), "mit ffn_gate_cpu: gate and up must be (B, L, F)");
  TORCH_CHECK(ffn_mul.dim() == 2 && ffn_mul.size(0) == gate.size(0) && ffn_mul.size(1) == gate.size(2),
              "mit ffn_gate_cpu: ffn_mul must be (B, F)");
  TORCH_CHECK(up.scalar_type() == gate.scalar_type() && ffn_mul.scalar_type() == gate.scalar_type(),
              "mit ffn_gate_cpu: gate, up and ffn_mul must share a dtype");
  TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu() && ffn_mul.device().is_cpu(),
              "mit ffn_gate_cpu: tensors must be on the CPU");
}

}  // namespace

at::Tensor ffn_gate_cpu_fwd(const at::Tensor& gate_in, const at::Tensor& up_in, const at::Tensor& ffn_mul) {
  check_ffn_args(gate_in, up_in, ffn_mul);
  const at::Tensor gate = last_dim_contiguous(gate_in), up = last_dim_contiguous(up_in);
  at::Tensor y = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const auto acc = gate.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor m = as_contiguous(ffn_mul, acc);  // no copy when ffn_mul is already acc_t and contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "mit_ffn_gate_cpu_fwd",
                                  [&] { ffn_fwd_impl<scalar_t>(gate, up, m, y); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ffn_gate_cpu_bwd(const at::Tensor& grad_out, const at::Tensor& gate_in,
                                                                const at::Tensor& up_in, const at::Tensor& ffn_mul) {
  check_ffn_args(gate_in, up_in, ffn_mul);
  TORCH_CHECK(grad_out.sizes() == gate_in.sizes() && grad_out.scalar_type() == gate_in.scalar_type(),
              "mit ffn_gate_cpu_bwd: grad_out must match gate");
  const at::Tensor gate = last_dim_contiguous(gate_in), up = last_dim_contiguous(up_in);
  const at::Tensor dy = last_dim_contiguous(grad_out);
  const auto opts = gate.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dgate = at::empty(gate.sizes(), opts), dup = at::empty(gate.sizes(), opts);
  const auto acc = gate.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dm = at::zeros(ffn_mul.sizes(), gate.options().dtype(acc));
  if (gate.numel() > 0) {
    const at::Tensor one_plus_m = (ffn_mul.to(acc) + 1).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "mit_ffn_gate_cpu_bwd",
                                    [&] { ffn_bwd_impl<scalar_t>(dy, gate, up, one_plus_m, dgate, dup, dm); });
  }
  return {dgate, dup, dm.to(ffn_mul.scalar_type())};
}

}  // namespace mit
