// CUDA kernels of torch.ops.fastmask_C.masked_act_fwd / masked_act_bwd.
//
// The op is memory-bound, so the elementwise kernels move 16 bytes per load/store when every pointer is aligned and
// one mask sample (C*H*W) is a multiple of the vector width (then a vector never straddles two images' masks), and
// walk the tensor grid-stride. The mask index of element e is group(e) * sample + e % sample, with both divisions
// done by magic-number IntDivider when indices fit in 32 bits. dcoeffs is a per-channel reduction into fp32 (fp64 for
// fp64 x) atomics: one atomicAdd per warp and channel for large maps, one per thread for small maps (few pixels per
// channel). Atomics make dcoeffs' last bits run-to-run nondeterministic; the Triton backward sums deterministically.
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h), so a minimal toolkit without the cuBLAS/cuSPARSE
// headers can build this file.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "masked_act.h"

namespace fastmask {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename index_t>
struct DeviceLayout {
  at::cuda::detail::IntDivider<index_t> sample;  // C * inner: position inside one image
  at::cuda::detail::IntDivider<index_t> group;   // N * C * inner: which mask an element uses
  at::cuda::detail::IntDivider<index_t> inner;   // H * W: channel of a position
  index_t sample_size;

  __device__ __forceinline__ index_t mask_offset(index_t e, index_t& position) const {
    position = sample.mod(e);
    return group.div(e) * sample_size + position;
  }
};

template <typename index_t>
DeviceLayout<index_t> device_layout(const MaskedActLayout& layout) {
  DeviceLayout<index_t> d;
  d.sample = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(layout.sample_size()));
  d.group = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(layout.per_group * layout.sample_size()));
  d.inner = at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(layout.inner));
  d.sample_size = static_cast<index_t>(layout.sample_size());
  return d;
}

template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN, like torch.relu
}

// Forward (kBackward = false): out = keep ? relu(x) : replacement(x).
// Backward without coeffs (kBackward = true): out = grad * (keep ? x > 0 : 1).
// planes is coeffs as [3, C] in acc_t, or null for the identity.
template <typename scalar_t, typename index_t, int kVec, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    masked_elementwise_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad,
                              const uint8_t* __restrict__ mask, const at::opmath_type<scalar_t>* __restrict__ planes,
                              scalar_t* __restrict__ out, index_t numel, DeviceLayout<index_t> layout,
                              index_t channels) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t vectors = numel / kVec;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t v = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; v < vectors; v += stride) {
    const index_t e = v * kVec;
    index_t position;
    const index_t m = layout.mask_offset(e, position);
    const Pack<scalar_t, kVec> xs = *reinterpret_cast<const Pack<scalar_t, kVec>*>(x + e);
    const Pack<uint8_t, kVec> keep = *reinterpret_cast<const Pack<uint8_t, kVec>*>(mask + m);
    Pack<scalar_t, kVec> gs;
    if constexpr (kBackward) gs = *reinterpret_cast<const Pack<scalar_t, kVec>*>(grad + e);
    Pack<scalar_t, kVec> result;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const acc_t xv = static_cast<acc_t>(xs.v[i]);
      if constexpr (kBackward) {
        const acc_t g = static_cast<acc_t>(gs.v[i]);
        result.v[i] = static_cast<scalar_t>(g * (keep.v[i] ? (xv > acc_t(0) ? acc_t(1) : acc_t(0)) : acc_t(1)));
      } else {
        acc_t replaced = xv;
        if (planes != nullptr) {
          const index_t c = layout.inner.div(position + i);
          replaced = planes[c] + planes[channels + c] * xv + planes[2 * channels + c] * xv * xv;
        }
        result.v[i] = static_cast<scalar_t>(keep.v[i] ? relu(xv) : replaced);
      }
    }
    *reinterpret_cast<Pack<scalar_t, kVec>*>(out + e) = result;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One replaced element of the backward with coeffs: writes dx, adds (g, g*x, g*x^2) to the running sums.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t backward_element(acc_t xv, acc_t g, bool keep, acc_t c1, acc_t c2, acc_t& s0,
                                                     acc_t& s1, acc_t& s2) {
  if (keep) return static_cast<scalar_t>(g * (xv > acc_t(0) ? acc_t(1) : acc_t(0)));
  const acc_t gv = g * xv;
  s0 += g;
  s1 += gv;
  s2 += gv * xv;
  return static_cast<scalar_t>(g * (c1 + acc_t(2) * c2 * xv));
}

// Backward with coeffs for 4-D x with H*W >= 32: one warp per (image, channel) row, so the row's channel sums are a
// warp reduction and one atomicAdd per coefficient. kVec > 1 needs H*W % kVec == 0 and aligned pointers.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad,
                         const uint8_t* __restrict__ mask, const at::opmath_type<scalar_t>* __restrict__ planes,
                         scalar_t* __restrict__ dx, at::opmath_type<scalar_t>* __restrict__ sums, int64_t rows,
                         int64_t channels, int64_t inner, int64_t per_group) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / kWarp);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp; row < rows;
       row += warps) {
    const int64_t n = row / channels, c = row - n * channels;
    const int64_t x_offset = row * inner, mask_offset = ((n / per_group) * channels + c) * inner;
    const acc_t c1 = planes[channels + c], c2 = planes[2 * channels + c];
    acc_t s0 = 0, s1 = 0, s2 = 0;
    for (int64_t i = static_cast<int64_t>(lane) * kVec; i < inner; i += kWarp * kVec) {
      const Pack<scalar_t, kVec> xs = *reinterpret_cast<const Pack<scalar_t, kVec>*>(x + x_offset + i);
      const Pack<scalar_t, kVec> gs = *reinterpret_cast<const Pack<scalar_t, kVec>*>(grad + x_offset + i);
      const Pack<uint8_t, kVec> keep = *reinterpret_cast<const Pack<uint8_t, kVec>*>(mask + mask_offset + i);
      Pack<scalar_t, kVec> result;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        result.v[k] = backward_element<scalar_t>(static_cast<acc_t>(xs.v[k]), static_cast<acc_t>(gs.v[k]),
                                                 keep.v[k] != 0, c1, c2, s0, s1, s2);
      }
      *reinterpret_cast<Pack<scalar_t, kVec>*>(dx + x_offset + i) = result;
    }
    s0 = warp_sum(s0);
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
    if (lane == 0) {
      atomicAdd(sums + 3 * c, s0);
      atomicAdd(sums + 3 * c + 1, s1);
      atomicAdd(sums + 3 * c + 2, s2);
    }
  }
}

// Backward with coeffs when H*W < 32 (small maps, or a 2-D x): one thread per position of an image, walking a chunk
// of images (blockIdx.y), so loads stay coalesced across the channel dimension; one atomicAdd per thread at the end.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    backward_columns_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad,
                            const uint8_t* __restrict__ mask, const at::opmath_type<scalar_t>* __restrict__ planes,
                            scalar_t* __restrict__ dx, at::opmath_type<scalar_t>* __restrict__ sums, int64_t images,
                            int64_t images_per_chunk, int64_t channels, int64_t inner, int64_t per_group) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t sample = channels * inner;
  const int64_t position = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (position >= sample) return;
  const int64_t c = position / inner;
  const acc_t c1 = planes[channels + c], c2 = planes[2 * channels + c];
  const int64_t first = static_cast<int64_t>(blockIdx.y) * images_per_chunk;
  const int64_t last = first + images_per_chunk < images ? first + images_per_chunk : images;
  acc_t s0 = 0, s1 = 0, s2 = 0;
  for (int64_t n = first; n < last; ++n) {
    const int64_t e = n * sample + position;
    const bool keep = mask[(n / per_group) * sample + position] != 0;
    dx[e] = backward_element<scalar_t>(static_cast<acc_t>(x[e]), static_cast<acc_t>(grad[e]), keep, c1, c2, s0, s1,
                                       s2);
  }
  atomicAdd(sums + 3 * c, s0);
  atomicAdd(sums + 3 * c + 1, s1);
  atomicAdd(sums + 3 * c + 2, s2);
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

int64_t multiprocessor_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int64_t grid_for(int64_t work_items) {
  // Enough resident blocks to saturate HBM; the kernels are grid-stride, so more would only add scheduling.
  const int64_t max_blocks = multiprocessor_count() * 32;
  return std::max<int64_t>(1, std::min<int64_t>((work_items + kThreads - 1) / kThreads, max_blocks));
}

template <typename scalar_t, typename index_t, int kVec, bool kBackward>
void launch_elementwise(const MaskedActLayout& layout, const scalar_t* x, const scalar_t* grad, const uint8_t* mask,
                        const at::opmath_type<scalar_t>* planes, scalar_t* out) {
  const int64_t numel = layout.numel();
  masked_elementwise_kernel<scalar_t, index_t, kVec, kBackward>
      <<<grid_for(numel / kVec), kThreads, 0, current_stream()>>>(
          x, grad, mask, planes, out, static_cast<index_t>(numel), device_layout<index_t>(layout),
          static_cast<index_t>(layout.channels));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the vector width (16 bytes when the layout and every pointer allow it) and the index width.
template <typename scalar_t, bool kBackward>
void dispatch_elementwise(const MaskedActLayout& layout, const scalar_t* x, const scalar_t* grad, const uint8_t* mask,
                          const at::opmath_type<scalar_t>* planes, scalar_t* out) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorize = layout.sample_size() % kVec == 0 && aligned(x, 16) && aligned(out, 16) &&
                         (!kBackward || aligned(grad, 16)) && aligned(mask, kVec);
  const bool small = layout.numel() < std::numeric_limits<int32_t>::max();
  if (vectorize && small) {
    launch_elementwise<scalar_t, uint32_t, kVec, kBackward>(layout, x, grad, mask, planes, out);
  } else if (vectorize) {
    launch_elementwise<scalar_t, uint64_t, kVec, kBackward>(layout, x, grad, mask, planes, out);
  } else if (small) {
    launch_elementwise<scalar_t, uint32_t, 1, kBackward>(layout, x, grad, mask, planes, out);
  } else {
    launch_elementwise<scalar_t, uint64_t, 1, kBackward>(layout, x, grad, mask, planes, out);
  }
}

template <typename scalar_t>
void launch_backward_with_coeffs(const MaskedActLayout& layout, const scalar_t* x, const scalar_t* grad,
                                 const uint8_t* mask, const at::opmath_type<scalar_t>* planes, scalar_t* dx,
                                 at::opmath_type<scalar_t>* sums) {
  const cudaStream_t stream = current_stream();
  if (layout.inner >= kWarp) {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int64_t rows = layout.images * layout.channels;
    const int64_t blocks = grid_for(rows * kWarp);
    if (layout.inner % kVec == 0 && aligned(x, 16) && aligned(grad, 16) && aligned(dx, 16) && aligned(mask, kVec)) {
      backward_rows_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(
          x, grad, mask, planes, dx, sums, rows, layout.channels, layout.inner, layout.per_group);
    } else {
      backward_rows_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(
          x, grad, mask, planes, dx, sums, rows, layout.channels, layout.inner, layout.per_group);
    }
  } else {
    const int64_t sample = layout.sample_size();
    const int64_t position_blocks = (sample + kThreads - 1) / kThreads;
    // Aim for about 64 blocks per SM in total; each chunk of images is one grid row.
    const int64_t target_blocks = multiprocessor_count() * 64;
    const int64_t chunks =
        std::clamp<int64_t>(target_blocks / position_blocks, 1, std::min<int64_t>(layout.images, 65535));
    const int64_t images_per_chunk = (layout.images + chunks - 1) / chunks;
    const dim3 grid(static_cast<unsigned>(position_blocks),
                    static_cast<unsigned>((layout.images + images_per_chunk - 1) / images_per_chunk));
    backward_columns_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(x, grad, mask, planes, dx, sums, layout.images,
                                                                     images_per_chunk, layout.channels, layout.inner,
                                                                     layout.per_group);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Kernels launch on x's GPU. A CPU x (with mask or coeffs on the GPU) gets no guard, so the shared checks reject it
// with their own message.
std::optional<c10::Device> launch_device(const at::Tensor& x) {
  return x.is_cuda() ? std::make_optional(x.device()) : std::nullopt;
}

at::Tensor masked_act_fwd_cuda(const at::Tensor& x_in, const at::Tensor& mask_in,
                               const std::optional<at::Tensor>& coeffs) {
  const c10::cuda::OptionalCUDAGuard guard(launch_device(x_in));
  const ForwardArgs args = prepare_forward(x_in, mask_in, coeffs);
  if (args.layout.numel() == 0) return args.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "masked_act_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_elementwise<scalar_t, false>(args.layout, args.x.const_data_ptr<scalar_t>(), nullptr,
                                          mask_bytes(args.mask),
                                          args.planes.defined() ? args.planes.const_data_ptr<acc_t>() : nullptr,
                                          args.out.mutable_data_ptr<scalar_t>());
  });
  return args.out;
}

std::tuple<at::Tensor, at::Tensor> masked_act_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                       const at::Tensor& mask_in,
                                                       const std::optional<at::Tensor>& coeffs) {
  const c10::cuda::OptionalCUDAGuard guard(launch_device(x_in));
  const BackwardArgs args = prepare_backward(grad_in, x_in, mask_in, coeffs);
  const MaskedActLayout& layout = args.layout;
  if (!coeffs.has_value()) {
    if (layout.numel() == 0) return {args.dx, no_dcoeffs(args.x)};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "masked_act_bwd_cuda", [&] {
      dispatch_elementwise<scalar_t, true>(layout, args.x.const_data_ptr<scalar_t>(),
                                           args.grad.const_data_ptr<scalar_t>(), mask_bytes(args.mask), nullptr,
                                           args.dx.mutable_data_ptr<scalar_t>());
    });
    return {args.dx, no_dcoeffs(args.x)};
  }
  // The channel sums accumulate in the arithmetic dtype: fp32 atomics, or fp64 for an fp64 x.
  at::Tensor sums = at::zeros({layout.channels, 3}, args.x.options().dtype(accumulate_type(args.x.scalar_type())));
  if (layout.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "masked_act_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch_backward_with_coeffs<scalar_t>(layout, args.x.const_data_ptr<scalar_t>(),
                                            args.grad.const_data_ptr<scalar_t>(), mask_bytes(args.mask),
                                            args.planes.const_data_ptr<acc_t>(), args.dx.mutable_data_ptr<scalar_t>(),
                                            sums.mutable_data_ptr<acc_t>());
    });
  }
  return {args.dx, sums.to(coeffs->scalar_type())};
}

}  // namespace
}  // namespace fastmask

TORCH_LIBRARY_IMPL(fastmask_C, CUDA, m) {
  m.impl("masked_act_fwd", &fastmask::masked_act_fwd_cuda);
  m.impl("masked_act_bwd", &fastmask::masked_act_bwd_cuda);
}
