// pybind11 module dbae._C: host-side helpers of the samplers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "step_coefficients.h"

namespace py = pybind11;

namespace {

dbae::BridgeParams params(double beta_d, double beta_min, double T, double t_min, double start_offset, double rho) {
  dbae::BridgeParams p;
  p.beta_d = beta_d;
  p.beta_min = beta_min;
  p.T = T;
  p.t_min = t_min;
  p.start_offset = start_offset;
  p.rho = rho;
  return p;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dbae C++ extension: float64 sampler-step scalars";
  m.def(
      "karras_grid",
      [](int n, double beta_d, double beta_min, double T, double t_min, double start_offset, double rho) {
        return dbae::karras_grid(n, params(beta_d, beta_min, T, t_min, start_offset, rho));
      },
      py::arg("n"), py::arg("beta_d"), py::arg("beta_min"), py::arg("T"), py::arg("t_min"),
      py::arg("start_offset"), py::arg("rho"));
  m.def(
      "drift_coefficients",
      [](const std::vector<double>& ts, int mode, double w, double beta_d, double beta_min, double T, double t_min,
         double start_offset, double rho) {
        const auto p = params(beta_d, beta_min, T, t_min, start_offset, rho);
        std::vector<std::array<double, 4>> out;
        out.reserve(ts.size());
        for (double t : ts) out.push_back(dbae::drift_coefficients(t, mode, w, p));
        return out;
      },
      py::arg("ts"), py::arg("mode"), py::arg("w"), py::arg("beta_d"), py::arg("beta_min"), py::arg("T"),
      py::arg("t_min"), py::arg("start_offset"), py::arg("rho"),
      "k_x, k_D, k_T, g for each t (mode 0 = ODE, 1 = SDE)");
}
