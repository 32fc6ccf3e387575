// Schemas of torch.ops.fastmask_C.* and their Meta (shape-only) kernels. The CPU kernels register in
// masked_act_cpu.cpp and the CUDA kernels in masked_act_cuda.cu, each with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

#include "masked_act.h"

namespace fastmask {
namespace {

at::Tensor masked_act_fwd_meta(const at::Tensor& x, const at::Tensor& mask, const std::optional<at::Tensor>& coeffs) {
  return prepare_forward(x, mask, coeffs).out;
}

std::tuple<at::Tensor, at::Tensor> masked_act_bwd_meta(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& mask,
                                                       const std::optional<at::Tensor>& coeffs) {
  at::Tensor dx = prepare_backward(grad, x, mask, coeffs).dx;
  at::Tensor dcoeffs = coeffs.has_value() ? at::empty_like(*coeffs, at::MemoryFormat::Contiguous) : no_dcoeffs(x);
  return {dx, dcoeffs};
}

}  // namespace
}  // namespace fastmask

TORCH_LIBRARY(fastmask_C, m) {
  m.def("masked_act_fwd(Tensor x, Tensor mask, Tensor? coeffs) -> Tensor");
  m.def("masked_act_bwd(Tensor grad, Tensor x, Tensor mask, Tensor? coeffs) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmask_C, Meta, m) {
  m.impl("masked_act_fwd", &fastmask::masked_act_fwd_meta);
  m.impl("masked_act_bwd", &fastmask::masked_act_bwd_meta);
}
