// The start every masked_act entry point shares (input checks, contiguous inputs, the output, the coefficient
// planes), so the CPU, CUDA and Meta paths reject the same inputs and allocate the same outputs.
#include "masked_act.h"

namespace fastmask {
namespace {

at::Tensor coefficient_planes(const std::optional<at::Tensor>& coeffs, at::ScalarType x_type) {
  return coeffs.has_value() ? coeffs->to(accumulate_type(x_type)).t().contiguous() : at::Tensor();
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

}  // namespace

ForwardArgs prepare_forward(const at::Tensor& x, const at::Tensor& mask, const std::optional<at::Tensor>& coeffs) {
  ForwardArgs args;
  args.layout = check_masked_act("masked_act_fwd", x, mask, coeffs);
  args.x = x.contiguous();
  args.mask = mask.contiguous();
  args.out = at::empty_like(args.x, at::MemoryFormat::Contiguous);
  args.planes = coefficient_planes(coeffs, x.scalar_type());
  return args;
}

BackwardArgs prepare_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                              const std::optional<at::Tensor>& coeffs) {
  BackwardArgs args;
  args.layout = check_masked_act_backward(grad, x, mask, coeffs);
  args.x = x.contiguous();
  args.grad = grad.to(x.scalar_type()).contiguous();
  args.mask = mask.contiguous();
  args.dx = at::empty_like(args.x, at::MemoryFormat::Contiguous);
  args.planes = coefficient_planes(coeffs, x.scalar_type());
  return args;
}

at::Tensor no_dcoeffs(const at::Tensor& x) { return at::empty({0}, x.options().dtype(at::kFloat)); }

}  // namespace fastmask
