// The fused sampler-step CPU kernels (step_math.h) on raw pointers, over one range of elements
// [begin, end) so that callers can split the work across threads. No torch: cpu_ops.cpp adapts
// them to tensors. The arguments mean what they mean in cuda_kernels.h.
#pragma once

#include <cstdint>

#include "step_math.h"

namespace dbae::fused::cpu {

enum class DType { kFloat32, kFloat16, kBFloat16 };

void euler_step(DType dtype, const void* x, const void* F, const void* x_T, void* x_next, int64_t begin, int64_t end,
                const StepCoeffs& c);

void heun_predict(DType dtype, const void* x, const void* F, const void* x_T, void* x_pred, void* d, int64_t begin,
                  int64_t end, const StepCoeffs& c);

void heun_correct(DType dtype, const void* x_start, const void* d1, const void* x_pred, const void* F,
                  const void* x_T, void* x_next, int64_t begin, int64_t end, const StepCoeffs& c);

// begin must be a multiple of 4 (a Philox group boundary).
void churn_step(DType dtype, const void* x, const void* F, const void* x_T, void* x_next, int64_t begin, int64_t end,
                const StepCoeffs& c, const NoiseParams& noise);

}  // namespace dbae::fused::cpu
