// Every attnseg op schema, in one place. Device kernels live in csrc/cpu and csrc/cuda
// (TORCH_LIBRARY_IMPL); fake kernels and autograd are registered from Python (attnseg/_ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import attnseg._C` loads this library, which runs the registrations below. The ops are
// reached through torch.ops.attnseg.*, not through this (empty) Python module.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(attnseg, m) {
  // Generic attention: out = softmax(q kᵀ · scale) v, lse = logsumexp(q kᵀ · scale) per row.
  //   q: batch x Nq x E, k: batch x Nk x E, v: batch x Nk x Ev (any strides)
  //   out: batch x Nq x Ev (contiguous, q's dtype), lse: batch x Nq (fp32; fp64 for fp64 inputs)
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  // Backward of attention_fwd. grad_lse (optional) is the gradient flowing into lse.
  m.def(
      "attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Channel attention without residual: y = A x with A = softmax(-E) (official) or softmax(E)
  // (paper), E = x xᵀ accumulated in fp32.
  //   x: batch x C x N (any strides); y: batch x C x N (contiguous); attn: batch x C x C (fp32/fp64)
  m.def("channel_attention_fwd(Tensor x, bool official) -> (Tensor y, Tensor attn)");
  m.def("channel_attention_bwd(Tensor grad_y, Tensor x, Tensor attn, bool official) -> Tensor");
  // How the fp32 CPU kernels split attention_fwd / attention_bwd for `threads` threads (csrc/cpu/
  // schedule.h), with channel-first q, k, v and grad_out (the modules' layout): [forward query block,
  // forward key parts, forward modelled idle share, the same for the unsplit forward, backward row
  // parts, backward modelled idle share, the same for the shape's own row parts].
  m.def("cpu_attention_plan(int batch, int nq, int nk, int e, int ev, int threads) -> float[]");
}
