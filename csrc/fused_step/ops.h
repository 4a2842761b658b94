// The dbae:: fused-step ops (schemas in schema.cpp) on top of one backend's kernels: input
// checks, contiguous copies, output allocation and float32 coefficients are shared by every
// device. Kernels provides static euler_step, heun_predict, heun_correct and churn_step that
// take the contiguous inputs, the preallocated outputs and the coefficients.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "inputs.h"

namespace dbae::fused {

template <typename Kernels>
struct Ops {
  static at::Tensor euler_step(const at::Tensor& x, const at::Tensor& F, const at::Tensor& x_T, double c_skip,
                               double c_out, double k_x, double k_D, double k_T, double dt, bool clamp) {
    const auto in = contiguous_inputs("dbae::euler_step", {{"x", x}, {"F", F}, {"x_T", x_T}});
    at::Tensor x_next = empty_output(in[0]);
    Kernels::euler_step(in[0], in[1], in[2], x_next, step_coeffs(c_skip, c_out, k_x, k_D, k_T, dt, clamp));
    return x_next;
  }

  static std::tuple<at::Tensor, at::Tensor> heun_predict(const at::Tensor& x, const at::Tensor& F,
                                                         const at::Tensor& x_T, double c_skip, double c_out,
                                                         double k_x, double k_D, double k_T, double dt, bool clamp) {
    const auto in = contiguous_inputs("dbae::heun_predict", {{"x", x}, {"F", F}, {"x_T", x_T}});
    at::Tensor x_pred = empty_output(in[0]);
    at::Tensor d = empty_output(in[0]);
    Kernels::heun_predict(in[0], in[1], in[2], x_pred, d, step_coeffs(c_skip, c_out, k_x, k_D, k_T, dt, clamp));
    return {x_pred, d};
  }

  static at::Tensor heun_correct(const at::Tensor& x_start, const at::Tensor& d1, const at::Tensor& x_pred,
                                 const at::Tensor& F, const at::Tensor& x_T, double c_skip, double c_out, double k_x,
                                 double k_D, double k_T, double dt, bool clamp) {
    const auto in = contiguous_inputs(
        "dbae::heun_correct", {{"x_start", x_start}, {"d1", d1}, {"x_pred", x_pred}, {"F", F}, {"x_T", x_T}});
    at::Tensor x_next = empty_output(in[0]);
    Kernels::heun_correct(in[0], in[1], in[2], in[3], in[4], x_next,
                          step_coeffs(c_skip, c_out, k_x, k_D, k_T, dt, clamp));
    return x_next;
  }

  static at::Tensor churn_step(const at::Tensor& x, const at::Tensor& F, const at::Tensor& x_T, double c_skip,
                               double c_out, double k_x, double k_D, double k_T, double dt, double noise_scale,
                               int64_t seed, int64_t offset, bool clamp) {
    const NoiseParams noise = noise_params(noise_scale, seed, offset);
    const auto in = contiguous_inputs("dbae::churn_step", {{"x", x}, {"F", F}, {"x_T", x_T}});
    at::Tensor x_next = empty_output(in[0]);
    Kernels::churn_step(in[0], in[1], in[2], x_next, step_coeffs(c_skip, c_out, k_x, k_D, k_T, dt, clamp), noise);
    return x_next;
  }

  static void register_kernels(torch::Library& m) {
    m.impl("euler_step", TORCH_FN(euler_step));
    m.impl("heun_predict", TORCH_FN(heun_predict));
    m.impl("heun_correct", TORCH_FN(heun_correct));
    m.impl("churn_step", TORCH_FN(churn_step));
  }
};

}  // namespace dbae::fused
