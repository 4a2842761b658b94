// Launchers of the fused sampler-step CUDA kernels (step_math.h) on raw device pointers.
// Nothing here needs torch, so CI compiles the kernels with nvcc next to a CPU build of torch;
// cuda_ops.cpp adapts them to tensors when torch itself has CUDA.
//
// Every pointer is a contiguous device array of n elements of one dtype; outputs must not
// overlap inputs. Each call enqueues one kernel on `stream` and returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "step_math.h"

namespace dbae::fused::gpu {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// x_next = x + dt drift(x)
cudaError_t euler_step(DType dtype, const void* x, const void* F, const void* x_T, void* x_next, int64_t n,
                       const StepCoeffs& c, cudaStream_t stream);

// Heun predictor: the Euler step that also writes its drift d for heun_correct.
cudaError_t heun_predict(DType dtype, const void* x, const void* F, const void* x_T, void* x_pred, void* d,
                         int64_t n, const StepCoeffs& c, cudaStream_t stream);

// x_next = x_start + dt/2 (d1 + drift(x_pred)), F evaluated at x_pred; c holds the scalars of t_next.
cudaError_t heun_correct(DType dtype, const void* x_start, const void* d1, const void* x_pred, const void* F,
                         const void* x_T, void* x_next, int64_t n, const StepCoeffs& c, cudaStream_t stream);

// x_next = x + dt drift(x) + noise.scale eps, eps ~ N(0, 1) drawn in-kernel from Philox.
cudaError_t churn_step(DType dtype, const void* x, const void* F, const void* x_T, void* x_next, int64_t n,
                       const StepCoeffs& c, const NoiseParams& noise, cudaStream_t stream);

}  // namespace dbae::fused::gpu
