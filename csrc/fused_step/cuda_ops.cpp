// CUDA implementation of the dbae:: fused-step ops: the tensor-facing side of cuda_kernels.cu,
// built only when the installed torch has CUDA. Kernels run on the current stream of the
// inputs' device, with no host synchronization (safe to capture in CUDA graphs).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_kernels.h"
#include "ops.h"

namespace dbae::fused {
namespace {

gpu::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return gpu::DType::kFloat32;
    case at::kHalf:
      return gpu::DType::kFloat16;
    case at::kBFloat16:
      return gpu::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "dbae fused step: unsupported dtype ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()); }

struct CudaKernels {
  static void euler_step(const at::Tensor& x, const at::Tensor& F, const at::Tensor& x_T, const at::Tensor& x_next,
                         const StepCoeffs& c) {
    const c10::cuda::CUDAGuard guard(x.device());
    check(gpu::euler_step(dtype_of(x), x.const_data_ptr(), F.const_data_ptr(), x_T.const_data_ptr(),
                          x_next.mutable_data_ptr(), x.numel(), c, stream_of(x)),
          "dbae::euler_step");
  }

  static void heun_predict(const at::Tensor& x, const at::Tensor& F, const at::Tensor& x_T, const at::Tensor& x_pred,
                           const at::Tensor& d, const StepCoeffs& c) {
    const c10::cuda::CUDAGuard guard(x.device());
    check(gpu::heun_predict(dtype_of(x), x.const_data_ptr(), F.const_data_ptr(), x_T.const_data_ptr(),
                            x_pred.mutable_data_ptr(), d.mutable_data_ptr(), x.numel(), c, stream_of(x)),
          "dbae::heun_predict");
  }

  static void heun_correct(const at::Tensor& x_start, const at::Tensor& d1, const at::Tensor& x_pred,
                           const at::Tensor& F, const at::Tensor& x_T, const at::Tensor& x_next, const StepCoeffs& c) {
    const c10::cuda::CUDAGuard guard(x_start.device());
    check(gpu::heun_correct(dtype_of(x_start), x_start.const_data_ptr(), d1.const_data_ptr(), x_pred.const_data_ptr(),
                            F.const_data_ptr(), x_T.const_data_ptr(), x_next.mutable_data_ptr(), x_start.numel(), c,
                            stream_of(x_start)),
          "dbae::heun_correct");
  }

  static void churn_step(const at::Tensor& x, const at::Tensor& F, const at::Tensor& x_T, const at::Tensor& x_next,
                         const StepCoeffs& c, const NoiseParams& noise) {
    const c10::cuda::CUDAGuard guard(x.device());
    check(gpu::churn_step(dtype_of(x), x.const_data_ptr(), F.const_data_ptr(), x_T.const_data_ptr(),
                          x_next.mutable_data_ptr(), x.numel(), c, noise, stream_of(x)),
          "dbae::churn_step");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(dbae, CUDA, m) { Ops<CudaKernels>::register_kernels(m); }

}  // namespace dbae::fused
