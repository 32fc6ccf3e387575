// CPU kernels of torch.ops.fastmask_C.masked_act_fwd / masked_act_bwd.
//
// Work is split with at::parallel_for over spans that share one mask row and one channel: (image, channel) rows of
// H*W elements for a 4-D x, or whole images of D elements for a 2-D x (there every element is its own channel).
// The inner loops are branch-free selects over contiguous memory, so -O3 vectorizes them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "masked_act.h"

namespace fastmask {
namespace {

// Replacement where the mask is 0: identity, or the per-channel polynomial. `at(i)` gives the channel of element i
// of the current span: constant for a 4-D row, i itself for a 2-D image.
struct Identity {
  template <typename acc_t>
  acc_t value(acc_t v, int64_t) const { return v; }
  template <typename acc_t>
  acc_t slope(acc_t, int64_t) const { return acc_t(1); }
};

template <typename acc_t>
struct RowPolynomial {  // one channel for the whole span
  acc_t c0, c1, c2;
  acc_t value(acc_t v, int64_t) const { return c0 + c1 * v + c2 * v * v; }  // same order as the reference
  acc_t slope(acc_t v, int64_t) const { return c1 + acc_t(2) * c2 * v; }
};

template <typename acc_t>
struct ElementPolynomial {  // channel = position in the span (2-D x); coefficient planes are [3, D]
  const acc_t* __restrict__ c0;
  const acc_t* __restrict__ c1;
  const acc_t* __restrict__ c2;
  acc_t value(acc_t v, int64_t i) const { return c0[i] + c1[i] * v + c2[i] * v * v; }
  acc_t slope(acc_t v, int64_t i) const { return c1[i] + acc_t(2) * c2[i] * v; }
};

template <typename scalar_t, typename Replacement>
inline void forward_span(const scalar_t* __restrict__ x, const uint8_t* __restrict__ keep, scalar_t* __restrict__ out,
                         int64_t length, const Replacement& replacement) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < length; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    const acc_t relu = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN as NaN, like torch.relu
    out[i] = static_cast<scalar_t>(keep[i] ? relu : replacement.value(v, i));
  }
}

template <typename scalar_t, typename Replacement>
inline void backward_span(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                          const uint8_t* __restrict__ keep, scalar_t* __restrict__ dx, int64_t length,
                          const Replacement& replacement) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < length; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    const acc_t relu_slope = v > acc_t(0) ? acc_t(1) : acc_t(0);
    dx[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * (keep[i] ? relu_slope : replacement.slope(v, i)));
  }
}

// Calls body(x_offset, mask_offset, length, replacement) for every span, in parallel.
template <typename acc_t, typename Body>
void for_each_span(const MaskedActLayout& layout, const at::Tensor& planes, const Body& body) {
  const int64_t channels = layout.channels, inner = layout.inner, sample = layout.sample_size();
  const acc_t* coeff = planes.defined() ? planes.const_data_ptr<acc_t>() : nullptr;
  if (inner == 1) {  // 2-D: one span per image, channel = element
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(sample, 1));
    at::parallel_for(0, layout.images, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const int64_t x_offset = n * sample, mask_offset = (n / layout.per_group) * sample;
        if (coeff) {
          body(x_offset, mask_offset, sample, ElementPolynomial<acc_t>{coeff, coeff + channels, coeff + 2 * channels});
        } else {
          body(x_offset, mask_offset, sample, Identity{});
        }
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / inner);
  at::parallel_for(0, layout.images * channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / channels, c = row - n * channels;
      const int64_t x_offset = row * inner, mask_offset = ((n / layout.per_group) * channels + c) * inner;
      if (coeff) {
        body(x_offset, mask_offset, inner,
             RowPolynomial<acc_t>{coeff[c], coeff[channels + c], coeff[2 * channels + c]});
      } else {
        body(x_offset, mask_offset, inner, Identity{});
      }
    }
  });
}

// Backward with coeffs: dx plus the per-channel sums of (g, g*x, g*x^2) over replaced elements. Parallel over
// channels so every channel's sums are made by one thread in a fixed order (deterministic), accumulated in double.
template <typename scalar_t>
void backward_with_coeffs(const MaskedActLayout& layout, const scalar_t* grad, const scalar_t* x,
                          const uint8_t* mask, scalar_t* dx, const at::Tensor& planes, double* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = layout.channels, inner = layout.inner;
  const acc_t* c1 = planes.const_data_ptr<acc_t>() + channels;
  const acc_t* c2 = planes.const_data_ptr<acc_t>() + 2 * channels;
  at::parallel_for(0, channels, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t n = 0; n < layout.images; ++n) {
      const int64_t group = n / layout.per_group;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t x_offset = (n * channels + c) * inner, mask_offset = (group * channels + c) * inner;
        double s0 = 0, s1 = 0, s2 = 0;
        for (int64_t i = 0; i < inner; ++i) {
          const acc_t v = static_cast<acc_t>(x[x_offset + i]);
          const acc_t g = static_cast<acc_t>(grad[x_offset + i]);
          if (mask[mask_offset + i]) {
            dx[x_offset + i] = static_cast<scalar_t>(g * (v > acc_t(0) ? acc_t(1) : acc_t(0)));
          } else {
            dx[x_offset + i] = static_cast<scalar_t>(g * (c1[c] + acc_t(2) * c2[c] * v));
            const acc_t gv = g * v;
            s0 += g;
            s1 += gv;
            s2 += gv * v;
          }
        }
        sums[3 * c] += s0;
        sums[3 * c + 1] += s1;
        sums[3 * c + 2] += s2;
      }
    }
  });
}

}  // namespace

at::Tensor masked_act_fwd_cpu(const at::Tensor& x_in, const at::Tensor& mask_in,
                              const std::optional<at::Tensor>& coeffs) {
  const ForwardArgs args = prepare_forward(x_in, mask_in, coeffs);
  if (args.layout.numel() == 0) return args.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "masked_act_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = args.x.const_data_ptr<scalar_t>();
    const uint8_t* keep = mask_bytes(args.mask);
    scalar_t* out_data = args.out.mutable_data_ptr<scalar_t>();
    for_each_span<acc_t>(args.layout, args.planes, [&](int64_t x_offset, int64_t mask_offset, int64_t length,
                                                       const auto& replacement) {
      forward_span(x_data + x_offset, keep + mask_offset, out_data + x_offset, length, replacement);
    });
  });
  return args.out;
}

std::tuple<at::Tensor, at::Tensor> masked_act_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                      const at::Tensor& mask_in,
                                                      const std::optional<at::Tensor>& coeffs) {
  const BackwardArgs args = prepare_backward(grad_in, x_in, mask_in, coeffs);
  const MaskedActLayout& layout = args.layout;
  if (!coeffs.has_value()) {
    if (layout.numel() == 0) return {args.dx, no_dcoeffs(args.x)};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "masked_act_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x_data = args.x.const_data_ptr<scalar_t>();
      const scalar_t* grad_data = args.grad.const_data_ptr<scalar_t>();
      const uint8_t* keep = mask_bytes(args.mask);
      scalar_t* dx_data = args.dx.mutable_data_ptr<scalar_t>();
      for_each_span<acc_t>(layout, at::Tensor(), [&](int64_t x_offset, int64_t mask_offset, int64_t length,
                                                     const auto& replacement) {
        backward_span(grad_data + x_offset, x_data + x_offset, keep + mask_offset, dx_data + x_offset, length,
                      replacement);
      });
    });
    return {args.dx, no_dcoeffs(args.x)};
  }
  at::Tensor sums = at::zeros({layout.channels, 3}, args.x.options().dtype(at::kDouble));
  if (layout.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "masked_act_bwd_cpu", [&] {
      backward_with_coeffs<scalar_t>(layout, args.grad.const_data_ptr<scalar_t>(), args.x.const_data_ptr<scalar_t>(),
                                     mask_bytes(args.mask), args.dx.mutable_data_ptr<scalar_t>(), args.planes,
                                     sums.mutable_data_ptr<double>());
    });
  }
  return {args.dx, sums.to(coeffs->scalar_type())};
}

}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask_C, CPU, m) {
  m.impl("masked_act_fwd", &fastmask::masked_act_fwd_cpu);
  m.impl("masked_act_bwd", &fastmask::masked_act_bwd_cpu);
}
