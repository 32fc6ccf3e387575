// fastmask._C as a Python module: importing it runs the TORCH_LIBRARY registrations of this library, and it tells
// fastmask.ops.backends whether the CUDA kernels were compiled in.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmask kernels; the ops live in torch.ops.fastmask_C";
  m.def(
      "built_with_cuda",
      []() {
#ifdef FASTMASK_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels of torch.ops.fastmask_C were compiled into this build.");
}
