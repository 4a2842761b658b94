// Argument handling shared by the CPU and CUDA implementations of the dbae:: fused-step ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <utility>
#include <vector>

#include "step_math.h"

namespace dbae::fused {

using NamedTensor = std::pair<const char*, const at::Tensor&>;

// The inputs of `op`, made contiguous (non-contiguous ones are copied), after checking that
// they agree in shape, dtype and device and that the dtype is float32, float16 or bfloat16.
std::vector<at::Tensor> contiguous_inputs(const char* op, std::initializer_list<NamedTensor> inputs);

// A fresh contiguous output shaped like `like`.
at::Tensor empty_output(const at::Tensor& like);

// The float32 coefficients of a step; clamp = false leaves D unclamped.
StepCoeffs step_coeffs(double c_skip, double c_out, double k_x, double k_D, double k_T, double dt, bool clamp);

// The Philox stream of a churn step; seed and offset must be non-negative.
NoiseParams noise_params(double noise_scale, int64_t seed, int64_t offset);

}  // namespace dbae::fused
