// Host-side float64 sampler scalars of the VP bridge (SPEC sections 2-4, 6).
// The same math as dbae/bridge.py (the reference); tests compare the two.
#pragma once

#include <array>
#include <vector>

namespace dbae {

struct BridgeParams {
  double beta_d = 2.0;
  double beta_min = 0.1;
  double T = 1.0;
  double t_min = 1e-4;
  double start_offset = 1e-4;
  double rho = 7.0;
};

// t_0 = T - start_offset > ... > t_{n-1} = t_min, then t_n = 0 (n + 1 values).
std::vector<double> karras_grid(int n, const BridgeParams& p);

// {k_x, k_D, k_T, g} with drift = k_x x + k_D D + k_T x_T; mode 0 = ODE, 1 = SDE.
std::array<double, 4> drift_coefficients(double t, int mode, double w, const BridgeParams& p);

}  // namespace dbae
