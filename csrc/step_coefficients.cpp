#include "step_coefficients.h"

#include <cmath>
#include <stdexcept>

namespace dbae {
namespace {

double exponent(double t, const BridgeParams& p) { return 0.5 * p.beta_d * t * t + p.beta_min * t; }
double log_s(double t, const BridgeParams& p) { return -0.5 * exponent(t, p); }
double logsnr(double t, const BridgeParams& p) { return -std::log(std::expm1(exponent(t, p))); }
double sigma2(double t, const BridgeParams& p) { return -std::expm1(2.0 * log_s(t, p)); }

}  // namespace

std::vector<double> karras_grid(int n, const BridgeParams& p) {
  if (n < 1) throw std::invalid_argument("need at least one sampling step");
  const double t0 = p.T - p.start_offset;
  std::vector<double> ts;
  ts.reserve(n + 1);
  if (n == 1) {
    ts.push_back(t0);
  } else {
    const double inv = 1.0 / p.rho, lo = std::pow(p.t_min, inv), hi = std::pow(t0, inv);
    for (int i = 0; i < n; ++i) ts.push_back(std::pow(hi + double(i) / (n - 1) * (lo - hi), p.rho));
    ts.back() = p.t_min;
  }
  ts.push_back(0.0);
  return ts;
}

std::array<double, 4> drift_coefficients(double t, int mode, double w, const BridgeParams& p) {
  if (mode != 0 && mode != 1) throw std::invalid_argument("mode must be 0 (ODE) or 1 (SDE)");
  if (!(t > 0.0 && t < p.T)) throw std::invalid_argument("drift coefficients need 0 < t < T");
  const double lsnr_T = logsnr(p.T, p), lsnr = logsnr(t, p);
  const double ls = log_s(t, p), s = std::exp(ls);
  const double one_minus_rho = -std::expm1(lsnr_T - lsnr);
  const double rho = std::exp(lsnr_T - lsnr);
  const double s_ratio = std::exp(ls - log_s(p.T, p));
  const double a = rho * s_ratio, b = one_minus_rho * s, v = one_minus_rho * sigma2(t, p);
  const double beta = p.beta_min + p.beta_d * t;
  const double f = -0.5 * beta, g2 = beta;
  const double h = sigma2(t, p) * std::expm1(lsnr - lsnr_T);  // sigma^2 (1/rho - 1)
  const double q = mode == 0 ? 0.5 : 1.0;
  return {f + g2 * (q / v - w / h), -g2 * q * b / v, g2 * (-q * a / v + w * s_ratio / h), std::sqrt(g2)};
}

}  // namespace dbae
