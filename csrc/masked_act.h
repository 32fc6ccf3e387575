// The masked activation shared by the CPU and CUDA kernels: input checks, the layout every kernel walks, the shared
// start of every entry point, and the per-device entry points registered under torch.ops.fastmask_C.
//
// Semantics (same as fastmask/ops/reference.py): x is [G*N, C, H, W] or [G*N, D]; mask is [G, C, H, W] (or [G, D]),
// bool or uint8, and image n uses mask n / N. Where the mask is 1 the output is relu(x); where it is 0 it is x, or
// c0 + c1*x + c2*x^2 with per-channel coeffs [C, 3] (a 2-D x has channel = D). Arithmetic is done in
// at::opmath_type<scalar_t> (fp32 for fp32/fp16/bf16, fp64 for fp64) and cast back to x's dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastmask {

// A contiguous x seen as rows (images) of `channels` x `inner` elements; `per_group` images share one mask.
struct MaskedActLayout {
  int64_t images = 0;     // G * N
  int64_t per_group = 0;  // N
  int64_t channels = 0;   // C (D for a 2-D x)
  int64_t inner = 1;      // H * W (1 for a 2-D x)

  int64_t sample_size() const { return channels * inner; }
  int64_t numel() const { return images * sample_size(); }
};

// The dtype the arithmetic runs in for an x of x_type: the kernels' at::opmath_type, so the planes match them.
inline at::ScalarType accumulate_type(at::ScalarType x_type) { return at::toOpMathType(x_type); }

// What a forward kernel starts from: the inputs checked (shapes, dtypes, devices; errors name the op) and made
// contiguous, the output allocated, and the coefficient planes ([3, C] in the accumulation dtype, undefined without
// coeffs) so a 2-D span reads them unit-stride.
struct ForwardArgs {
  MaskedActLayout layout;
  at::Tensor x, mask, out, planes;
};

// The same for a backward kernel: grad is cast to x's dtype and made contiguous, dx is allocated like x.
struct BackwardArgs {
  MaskedActLayout layout;
  at::Tensor grad, x, mask, dx, planes;
};

ForwardArgs prepare_forward(const at::Tensor& x, const at::Tensor& mask, const std::optional<at::Tensor>& coeffs);
BackwardArgs prepare_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                              const std::optional<at::Tensor>& coeffs);

// The dcoeffs a backward without coeffs returns: an empty fp32 tensor on x's device.
at::Tensor no_dcoeffs(const at::Tensor& x);

// bool and uint8 masks are both one byte a position; nonzero keeps the ReLU.
inline const uint8_t* mask_bytes(const at::Tensor& mask) {
  return static_cast<const uint8_t*>(mask.const_data_ptr());
}

at::Tensor masked_act_fwd_cpu(const at::Tensor& x, const at::Tensor& mask, const std::optional<at::Tensor>& coeffs);
std::tuple<at::Tensor, at::Tensor> masked_act_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                      const at::Tensor& mask,
                                                      const std::optional<at::Tensor>& coeffs);

}  // namespace fastmask
