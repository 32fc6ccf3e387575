// Input checks shared by every masked_act kernel, so the CPU, CUDA and Meta paths reject the same inputs.
#include "masked_act.h"

namespace fastmask {

at::ScalarType accumulate_type(at::ScalarType x_type) {
  return x_type == at::kDouble ? at::kDouble : at::kFloat;
}

MaskedActLayout check_masked_act(const char* op, const at::Tensor& x, const at::Tensor& mask,
                                 const std::optional<at::Tensor>& coeffs) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 4, op, ": x must be [G*N, C, H, W] or [G*N, D], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble,
              op, ": x must be fp32, fp16, bf16 or fp64, got ", x.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte, op,
              ": mask must be bool or uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == x.dim() && mask.sizes().slice(1) == x.sizes().slice(1), op, ": mask shape ",
              mask.sizes(), " does not match x ", x.sizes(), " (expected [G, ", x.sizes().slice(1), "])");
  const int64_t groups = mask.size(0);
  TORCH_CHECK(groups > 0 && x.size(0) % groups == 0, op, ": batch ", x.size(0), " is not a multiple of the ", groups,
              " mask groups");
  TORCH_CHECK(mask.device() == x.device(), op, ": mask is on ", mask.device(), " but x is on ", x.device());
  if (coeffs.has_value()) {
    TORCH_CHECK(coeffs->dim() == 2 && coeffs->size(0) == x.size(1) && coeffs->size(1) == 3, op,
                ": coeffs must be [", x.size(1), ", 3], got ", coeffs->sizes());
    TORCH_CHECK(at::isFloatingType(coeffs->scalar_type()), op, ": coeffs must be floating point, got ",
                coeffs->scalar_type());
    TORCH_CHECK(coeffs->device() == x.device(), op, ": coeffs is on ", coeffs->device(), " but x is on ",
                x.device());
  }
  MaskedActLayout layout;
  layout.images = x.size(0);
  layout.per_group = x.size(0) / groups;
  layout.channels = x.size(1);
  layout.inner = x.dim() == 4 ? x.size(2) * x.size(3) : 1;
  return layout;
}

MaskedActLayout check_masked_act_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                                          const std::optional<at::Tensor>& coeffs) {
  const MaskedActLayout layout = check_masked_act("masked_act_bwd", x, mask, coeffs);
  TORCH_CHECK(grad.sizes() == x.sizes(), "masked_act_bwd: grad shape ", grad.sizes(), " differs from x ", x.sizes());
  TORCH_CHECK(grad.device() == x.device(), "masked_act_bwd: grad is on ", grad.device(), " but x is on ", x.device());
  return layout;
}

}  // namespace fastmask
