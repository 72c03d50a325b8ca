// Operator registration of the MiT CPU kernels (namespace mit_kernels): the CPU kernels, the autograd formulas (in
// C++, so that a call under no_grad, e.g. every decoding step, costs no Python), and the Python module of the
// extension: how it was built, and the direct entry points of decoding (attention_fwd_direct / ffn_gate_fwd_direct). Fake (meta) kernels and FLOP formulas are registered from Python in
// mit_kernels/cpu_backend.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "attention.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define MIT_STR_(...) #__VA_ARGS__
#define MIT_STR(...) MIT_STR_(__VA_ARGS__)

TORCH_LIBRARY_FRAGMENT(mit_kernels, m) {
  m.def(
      "attention_cpu_fwd(Tensor q, Tensor k, Tensor v, Tensor k_mul, Tensor k_add, Tensor v_mul, Tensor v_add, "
      "Tensor head_logit, Tensor? kv_mask, bool causal, float scale, bool rescale) -> (Tensor, Tensor)");
  m.def(
      "attention_cpu_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor k_mul, Tensor k_add, Tensor v_mul, "
      "Tensor v_add, Tensor head_logit, Tensor? kv_mask, Tensor out, Tensor lse, bool causal, float scale, "
      "bool rescale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ffn_gate_cpu_fwd(Tensor gate, Tensor up, Tensor ffn_mul) -> Tensor");
  m.def("ffn_gate_cpu_bwd(Tensor grad_out, Tensor gate, Tensor up, Tensor ffn_mul) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mit_kernels, CPU, m) {
  m.impl("attention_cpu_fwd", &mit::attention_cpu_fwd);
  m.impl("attention_cpu_bwd", &mit::attention_cpu_bwd);
  m.impl("ffn_gate_cpu_fwd", &mit::ffn_gate_cpu_fwd);
  m.impl("ffn_gate_cpu_bwd", &mit::ffn_gate_cpu_bwd);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using AttnFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&, bool, double, bool);
using AttnBwdSig =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
        const at::Tensor&, const at::Tensor&, bool, double, bool);
using FfnFwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
using FfnBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                  const at::Tensor&, const at::Tensor&);

// Typed handles: calls go through the dispatcher, so under torch.compile (fake tensors) they reach the fake kernels.
const c10::TypedOperatorHandle<AttnFwdSig>& attn_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mit_kernels::attention_cpu_fwd", "").typed<AttnFwdSig>();
  return op;
}
const c10::TypedOperatorHandle<AttnBwdSig>& attn_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mit_kernels::attention_cpu_bwd", "").typed<AttnBwdSig>();
  return op;
}
const c10::TypedOperatorHandle<FfnFwdSig>& ffn_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mit_kernels::ffn_gate_cpu_fwd", "").typed<FfnFwdSig>();
  return op;
}
const c10::TypedOperatorHandle<FfnBwdSig>& ffn_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mit_kernels::ffn_gate_cpu_bwd", "").typed<FfnBwdSig>();
  return op;
}

// The backward ops have no derivative of their own. Under create_graph=True (grad mode on inside a backward) a
// second-order gradient through them would come back as exactly 0, silently; raise instead, naming the op.
void refuse_double_backward(const char* op, const variable_list& saved, const variable_list& grads) {
  if (!at::GradMode::is_enabled()) return;
  bool needs_graph = false;
  for (const auto& x : saved) needs_graph = needs_graph || (x.defined() && x.requires_grad());
  for (const auto& x : grads) needs_graph = needs_graph || (x.defined() && x.requires_grad());
  TORCH_CHECK(!needs_graph, op,
              " (backend='cpu') does not support double backward: its backward is not differentiable, so "
              "create_graph=True cannot give correct second-order gradients. Use backend='reference' for "
              "second-order gradients (gradient penalties, Hessian-vector products).");
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& k_mul, const at::Tensor& k_add, const at::Tensor& v_mul,
                               const at::Tensor& v_add, const at::Tensor& head_logit,
                               const std::optional<at::Tensor>& kv_mask, bool causal, double scale, bool rescale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attn_fwd_op().call(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale,
                                         rescale);
    ctx->save_for_backward({q, k, v, k_mul, k_add, v_mul, v_add, head_logit, out, lse});
    ctx->saved_data["kv_mask"] = kv_mask;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["rescale"] = rescale;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    refuse_double_backward("mit_kernels::attention_cpu_fwd", saved, grads);
    at::Tensor grad_out = grads[0];
    if (!grad_out.defined()) grad_out = at::zeros_like(saved[8]);
    const auto kv_mask = ctx->saved_data["kv_mask"].toOptional<at::Tensor>();
    auto [dq, dk, dv, dkm, dka, dvm, dva, dhl] = attn_bwd_op().call(
        grad_out, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7], kv_mask, saved[8],
        saved[9], ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["rescale"].toBool());
    return {dq, dk, dv, dkm, dka, dvm, dva, dhl, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class FfnGateFunction : public torch::autograd::Function<FfnGateFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up,
                            const at::Tensor& ffn_mul) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({gate, up, ffn_mul});  // the backward recomputes silu
    return ffn_fwd_op().call(gate, up, ffn_mul);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    refuse_double_backward("mit_kernels::ffn_gate_cpu_fwd", saved, grads);
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto [dg, du, dm] = ffn_bwd_op().call(grads[0], saved[0], saved[1], saved[2]);
    return {dg, du, dm};
  }
};

// Whether a call records a graph: grad mode on and some differentiable input requires grad. When none does (every
// decoding step, under no_grad), the autograd kernels call the forward op below autograd directly: no node, context
// or saved variables are made for a graph that would be thrown away (Function::apply makes them in any case).
bool records_graph(std::initializer_list<std::reference_wrapper<const at::Tensor>> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor& x : inputs) {
    if (x.defined() && x.requires_grad()) return true;
  }
  return false;
}

std::tuple<at::Tensor, at::Tensor> attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& k_mul, const at::Tensor& k_add,
                                                      const at::Tensor& v_mul, const at::Tensor& v_add,
                                                      const at::Tensor& head_logit,
                                                      const std::optional<at::Tensor>& kv_mask, bool causal,
                                                      double scale, bool rescale) {
  if (!records_graph({q, k, v, k_mul, k_add, v_mul, v_add, head_logit})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return attn_fwd_op().call(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale);
  }
  auto r = AttentionFunction::apply(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale);
  return {r[0], r[1]};
}

at::Tensor ffn_gate_autograd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& ffn_mul) {
  if (!records_graph({gate, up, ffn_mul})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ffn_fwd_op().call(gate, up, ffn_mul);
  }
  return FfnGateFunction::apply(gate, up, ffn_mul);
}

}  // namespace

TORCH_LIBRARY_IMPL(mit_kernels, Autograd, m) {
  m.impl("attention_cpu_fwd", &attention_autograd);
  m.impl("ffn_gate_cpu_fwd", &ffn_gate_autograd);
}

namespace {

pybind11::dict extension_info() {
  pybind11::dict info;
  info["built"] = true;
  info["num_threads"] = at::get_num_threads();
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<int>(_OPENMP);
#else
  info["openmp"] = false;
  info["openmp_version"] = 0;
#endif
#ifdef MIT_COMPILE_FLAGS
  info["compile_flags"] = std::string(MIT_STR(MIT_COMPILE_FLAGS));
#else
  info["compile_flags"] = std::string("");
#endif
#if defined(CPU_CAPABILITY_AVX2)
  info["vector_isa"] = "AVX2";
#else
  info["vector_isa"] = "DEFAULT";
#endif
  info["blas"] = mit::blas_name();
  return info;
}

// ---------------------------------------------------------------------------------------------------------------------
// Direct entry points (decoding)
// ---------------------------------------------------------------------------------------------------------------------
//
// A call through torch.ops from Python goes through torch/_ops.py, the boxed calling convention (the arguments parsed
// against the schema into a stack of IValues) and the dispatcher twice (the autograd kernel, then the CPU kernel).
// Alone that costs ~1-2 us; inside a decoding step, where every piece of code that runs once per infused layer has been
// evicted from the caches by the layers' weights since its last use, it cost ~25 us per call (SmolLM2 on 2 cores; the
// frozen model's own ops are reached through torch's generated bindings, which every layer keeps warm). The direct
// entries below are pybind functions that call the CPU kernel itself when the dispatcher would do nothing else:
// CPU tensors with no other dispatch key (no tensor subclass, functorch wrapper, conjugate / negative view), nothing
// that records a graph, no dispatch mode (FakeTensorMode, FlopCounterMode, ...) and no key forced on by the thread
// (tracing, functionalization, vmap). Anything else goes through the dispatcher, exactly as a torch.ops call would. The
// profiler still sees the operator by name (RecordFunction, as the dispatcher records it).

bool plain_cpu_tensor(const at::Tensor& x) {
  static const c10::DispatchKeySet plain(c10::DispatchKey::CPU);
  return (x.key_set() - c10::autograd_dispatch_keyset_with_ADInplaceOrView) == plain;
}

bool dispatcher_adds_nothing(std::initializer_list<std::reference_wrapper<const at::Tensor>> inputs) {
  if (!c10::impl::tls_local_dispatch_key_set().included_.empty()) return false;
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0) return false;
  if (records_graph(inputs)) return false;
  for (const at::Tensor& x : inputs) {
    if (x.defined() && !plain_cpu_tensor(x)) return false;
  }
  return true;
}

at::Tensor attention_fwd_direct(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_mul,
                                const at::Tensor& k_add, const at::Tensor& v_mul, const at::Tensor& v_add,
                                const at::Tensor& head_logit, const std::optional<at::Tensor>& kv_mask, bool causal,
                                double scale, bool rescale) {
  const at::Tensor mask = kv_mask.has_value() ? *kv_mask : at::Tensor();  // (undefined: skipped by the checks)
  if (!dispatcher_adds_nothing({q, k, v, k_mul, k_add, v_mul, v_add, head_logit, mask})) {
    return std::get<0>(
        attn_fwd_op().call(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale));
  }
  RECORD_FUNCTION("mit_kernels::attention_cpu_fwd",
                  std::vector<c10::IValue>({q, k, v, k_mul, k_add, v_mul, v_add, head_logit}));
  return std::get<0>(
      mit::attention_cpu_fwd(q, k, v, k_mul, k_add, v_mul, v_add, head_logit, kv_mask, causal, scale, rescale));
}

at::Tensor ffn_gate_fwd_direct(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& ffn_mul) {
  if (!dispatcher_adds_nothing({gate, up, ffn_mul})) return ffn_fwd_op().call(gate, up, ffn_mul);
  RECORD_FUNCTION("mit_kernels::ffn_gate_cpu_fwd", std::vector<c10::IValue>({gate, up, ffn_mul}));
  return mit::ffn_gate_cpu_fwd(gate, up, ffn_mul);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "MiT fused CPU kernels (ops registered under torch.ops.mit_kernels)";
  m.def("extension_info", &extension_info, "How the extension was built and how many threads ATen uses");
  // The GIL is released around the kernels, as torch.ops releases it.
  m.def("attention_fwd_direct", &attention_fwd_direct, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "mit_kernels::attention_cpu_fwd's output, the CPU kernel called directly when the dispatcher would add "
        "nothing (decoding), else through the dispatcher");
  m.def("ffn_gate_fwd_direct", &ffn_gate_fwd_direct, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "mit_kernels::ffn_gate_cpu_fwd, the CPU kernel called directly when the dispatcher would add nothing "
        "(decoding), else through the dispatcher");
}
