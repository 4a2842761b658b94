// CPU implementation of the dbae:: fused-step ops: the tensor-facing side of cpu_kernels.cpp,
// splitting the elements across torch's intra-op threads (at::parallel_for).
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "ops.h"

namespace dbae::fused {
namespace {

cpu::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cpu::DType::kFloat32;
    case at::kHalf:
      return cpu::DType::kFloat16;
    case at::kBFloat16:
      return cpu::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "dbae fused step: unsupported dtype ", t.scalar_type());
  }
}

// body(begin, end) over [0, n) in pieces of whole Philox groups (multiples of 4 elements).
template <typename Body>
void parallel_groups(int64_t n, const Body& body) {
  at::parallel_for(0, (n + 3) / 4, at::internal::GRAIN_SIZE / 4,
                   [&](int64_t g0, int64_t g1) { body(4 * g0, std::min(4 * g1, n)); });
}

struct CpuKernels {
  static void euler_step(const at::Tensor& x, const at::Tensor& F, const at::Tensor& x_T, const at::Tensor& x_next,
                         const StepCoeffs& c) {
    parallel_groups(x.numel(), [&](int64_t begin, int64_t end) {
      cpu::euler_step(dtype_of(x), x.const_data_ptr(), F.const_data_ptr(), x_T.const_data_ptr(),
                      x_next.mutable_data_ptr(), begin, end, c);
    });
  }

  static void heun_predict(const at::Tensor& x, const at::Tensor& F, const at::Tensor& x_T, const at::Tensor& x_pred,
                           const at::Tensor& d, const StepCoeffs& c) {
    parallel_groups(x.numel(), [&](int64_t begin, int64_t end) {
      cpu::heun_predict(dtype_of(x), x.const_data_ptr(), F.const_data_ptr(), x_T.const_data_ptr(),
                        x_pred.mutable_data_ptr(), d.mutable_data_ptr(), begin, end, c);
    });
  }

  static void heun_correct(const at::Tensor& x_start, const at::Tensor& d1, const at::Tensor& x_pred,
                           const at::Tensor& F, const at::Tensor& x_T, const at::Tensor& x_next, const StepCoeffs& c) {
    parallel_groups(x_start.numel(), [&](int64_t begin, int64_t end) {
      cpu::heun_correct(dtype_of(x_start), x_start.const_data_ptr(), d1.const_data_ptr(), x_pred.const_data_ptr(),
                        F.const_data_ptr(), x_T.const_data_ptr(), x_next.mutable_data_ptr(), begin, end, c);
    });
  }

  static void churn_step(const at::Tensor& x, const at::Tensor& F, const at::Tensor& x_T, const at::Tensor& x_next,
                         const StepCoeffs& c, const NoiseParams& noise) {
    parallel_groups(x.numel(), [&](int64_t begin, int64_t end) {
      cpu::churn_step(dtype_of(x), x.const_data_ptr(), F.const_data_ptr(), x_T.const_data_ptr(),
                      x_next.mutable_data_ptr(), begin, end, c, noise);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(dbae, CPU, m) { Ops<CpuKernels>::register_kernels(m); }

}  // namespace dbae::fused
