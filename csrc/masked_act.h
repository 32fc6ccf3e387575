// The masked activation shared by the CPU and CUDA kernels: input checks, the layout every kernel walks, and the
// per-device entry points registered under torch.ops.fastmask_C.
//
// Semantics (same as fastmask/ops/reference.py): x is [G*N, C, H, W] or [G*N, D]; mask is [G, C, H, W] (or [G, D]),
// bool or uint8, and image n uses mask n / N. Where the mask is 1 the output is relu(x); where it is 0 it is x, or
// c0 + c1*x + c2*x^2 with per-channel coeffs [C, 3] (a 2-D x has channel = D). Arithmetic is done in fp32 (fp64 for
// fp64 inputs) and cast back to x's dtype.
#pragma once

#include <ATen/ATen.h>

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

// Checks shapes, dtypes and devices (raising a clear error naming `op`) and returns the layout.
MaskedActLayout check_masked_act(const char* op, const at::Tensor& x, const at::Tensor& mask,
                                 const std::optional<at::Tensor>& coeffs);

// check_masked_act plus the checks of the incoming gradient (same shape and device as x), for the backward.
MaskedActLayout check_masked_act_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                                          const std::optional<at::Tensor>& coeffs);

// The dtype the arithmetic runs in: fp32, or fp64 for an fp64 x.
at::ScalarType accumulate_type(at::ScalarType x_type);

at::Tensor masked_act_fwd_cpu(const at::Tensor& x, const at::Tensor& mask, const std::optional<at::Tensor>& coeffs);
std::tuple<at::Tensor, at::Tensor> masked_act_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                      const at::Tensor& mask,
                                                      const std::optional<at::Tensor>& coeffs);

}  // namespace fastmask
