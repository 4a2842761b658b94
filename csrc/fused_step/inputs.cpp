#include "inputs.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <limits>

namespace dbae::fused {

std::vector<at::Tensor> contiguous_inputs(const char* op, std::initializer_list<NamedTensor> inputs) {
  const auto& [first_name, first] = *inputs.begin();
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": supports float32, float16 and bfloat16 tensors, got ", first_name, " of dtype ", dtype);
  std::vector<at::Tensor> out;
  out.reserve(inputs.size());
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK(t.device() == first.device(), op, ": ", name, " is on ", t.device(), " but ", first_name,
                " is on ", first.device());
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), " but ", first_name,
                " has dtype ", dtype);
    TORCH_CHECK(t.sizes() == first.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", first_name,
                " has shape ", first.sizes());
    out.push_back(t.contiguous());
  }
  return out;
}

at::Tensor empty_output(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

StepCoeffs step_coeffs(double c_skip, double c_out, double k_x, double k_D, double k_T, double dt, bool clamp) {
  const float bound = clamp ? 1.0f : std::numeric_limits<float>::infinity();
  return {static_cast<float>(c_skip), static_cast<float>(c_out), -bound, bound, static_cast<float>(k_x),
          static_cast<float>(k_D), static_cast<float>(k_x + k_D + k_T), static_cast<float>(dt)};
}

NoiseParams noise_params(double noise_scale, int64_t seed, int64_t offset) {
  TORCH_CHECK(seed >= 0 && offset >= 0, "dbae::churn_step: seed and offset must be non-negative, got seed=", seed,
              ", offset=", offset);
  return {static_cast<float>(noise_scale), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

}  // namespace dbae::fused
