// Schemas of the dbae:: fused sampler-step ops (kernels: cpu_ops.cpp, cuda_ops.cpp; fake
// implementations for torch.compile: dbae/fused_step.py). Every float is a host float64
// scalar of the step, rounded once to float32 for the per-element math of step_math.h.
#include <torch/library.h>

TORCH_LIBRARY(dbae, m) {
  m.set_python_module("dbae.fused_step");
  m.def(
      "euler_step(Tensor x, Tensor F, Tensor x_T, float c_skip, float c_out, float k_x, float k_D, float k_T, "
      "float dt, bool clamp=True) -> Tensor");
  m.def(
      "heun_predict(Tensor x, Tensor F, Tensor x_T, float c_skip, float c_out, float k_x, float k_D, float k_T, "
      "float dt, bool clamp=True) -> (Tensor x_pred, Tensor d)");
  m.def(
      "heun_correct(Tensor x_start, Tensor d1, Tensor x_pred, Tensor F, Tensor x_T, float c_skip, float c_out, "
      "float k_x, float k_D, float k_T, float dt, bool clamp=True) -> Tensor");
  m.def(
      "churn_step(Tensor x, Tensor F, Tensor x_T, float c_skip, float c_out, float k_x, float k_D, float k_T, "
      "float dt, float noise_scale, int seed, int offset, bool clamp=True) -> Tensor");
}
