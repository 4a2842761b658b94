// Per-element math of the fused sampler steps (SPEC section 6), shared by the CPU and the
// CUDA kernels so that both backends evaluate the same float32 expressions. No torch, no
// CUDA headers: plain C++17 that nvcc also compiles for the device.
//
//   D      = clamp(c_skip x + c_out F, lo, hi)        (lo, hi = -1, 1; +-inf: no clamp)
//   drift  = k_x x + k_D D + k_T x_T                  (drift() takes F and forms D itself)
//          = k_x (x - x_T) + k_D (D - x_T) + k_sum x_T  (how it is evaluated: k_sum = k_x + k_D + k_T
//            summed in float64 on the host; near t = T, k_x ~ -5e3 and k_T ~ +5e3 cancel, and
//            this form does not round them separately; see dbae/sampling.py)
//   Euler  : x + dt drift(x)
//   Heun   : x_start + (dt / 2) (d1 + drift(x_pred))
//   churn  : x + dt drift(x) + noise_scale eps,  eps ~ N(0, 1) from Philox4x32-10
//
// The noise uses its own log and sincos (only +, *, sqrt and selects), so that with FMA
// contraction off on both sides (-ffp-contract=off, nvcc -fmad=false) the CPU and CUDA
// kernels produce the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DBAE_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define DBAE_HD __attribute__((always_inline)) inline
#else
#define DBAE_HD inline
#endif

namespace dbae::fused {

// Float32 scalars of one step, each rounded once from the host's float64 value.
struct StepCoeffs {
  float c_skip, c_out;  // denoiser D = c_skip x + c_out F
  float lo, hi;         // clamp bounds of D
  float k_x, k_D, k_sum;  // drift = k_x (x - x_T) + k_D (D - x_T) + k_sum x_T
  float dt;             // step length (negative: the sampler runs from T down to 0)
};

// Philox stream of a churn step: element i draws from counter (i / 4, offset) under key seed.
struct NoiseParams {
  float scale;  // sqrt(|dt|) g
  uint64_t seed;
  uint64_t offset;
};

DBAE_HD float denoised(float x, float F, const StepCoeffs& c) {
  const float D = c.c_skip * x + c.c_out * F;
  return D < c.lo ? c.lo : (D > c.hi ? c.hi : D);  // NaN passes through, as in torch.clamp
}

DBAE_HD float drift(float x, float F, float x_T, const StepCoeffs& c) {
  return c.k_x * (x - x_T) + c.k_D * (denoised(x, F, c) - x_T) + c.k_sum * x_T;
}

DBAE_HD float euler_update(float x, float d, const StepCoeffs& c) { return x + c.dt * d; }

DBAE_HD float heun_update(float x_start, float d1, float x_pred, float F, float x_T, const StepCoeffs& c) {
  return x_start + (0.5f * c.dt) * (d1 + drift(x_pred, F, x_T, c));
}

// ----- Philox4x32-10 (Salmon et al. 2011; the Random123 / cuRAND constants) -----

DBAE_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t& hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

DBAE_HD void philox_round(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  uint32_t hi0, hi1;
  const uint32_t lo0 = mulhilo(0xD2511F53u, ctr[0], hi0);
  const uint32_t lo1 = mulhilo(0xCD9E8D57u, ctr[2], hi1);
  const uint32_t c1 = ctr[1], c3 = ctr[3];
  ctr[0] = hi1 ^ c1 ^ k0;
  ctr[1] = lo1;
  ctr[2] = hi0 ^ c3 ^ k1;
  ctr[3] = lo0;
}

// The four 32-bit outputs for counter ctr under key (k0, k1); round r uses the key bumped r times.
DBAE_HD void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__CUDACC__)
#pragma GCC unroll 10  // fully unrolled, the loops over elements vectorize
#endif
  for (uint32_t r = 0; r < 10; ++r) philox_round(ctr, k0 + r * 0x9E3779B9u, k1 + r * 0xBB67AE85u);
}

DBAE_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

DBAE_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// ln(u) for normal u > 0: the Cephes logf reduction and polynomial, branch-free (about 1 ulp).
DBAE_HD float log_normal(float u) {
  const uint32_t bits = float_bits(u);
  const float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);  // u = m 2^e, m in [0.5, 1)
  const bool low = m < 0.70710678f;
  const float fe = static_cast<float>(static_cast<int32_t>(bits >> 23) - (low ? 127 : 126));
  const float x = low ? (m + m) - 1.0f : m - 1.0f;  // exact; x in [sqrt(1/2) - 1, sqrt(2) - 1)
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z + -2.12194440e-4f * fe + -0.5f * z;
  return (x + y) + 0.693359375f * fe;
}

// sin and cos of 2 pi v for v in [0, 1) with 24 significant bits: an exact reduction to the
// nearest quarter turn, then the Cephes sinf/cosf polynomials on [-pi/4, pi/4] (about 1 ulp).
DBAE_HD void sincos_2pi(float v, float& s, float& c) {
  const int32_t q = static_cast<int32_t>(4.0f * v + 0.5f);
  const float t = (v - 0.25f * static_cast<float>(q)) * 6.283185307179586f;
  const float z = t * t;
  const float sin_t = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * t + t;
  const float cos_t = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                      0.5f * z + 1.0f;
  const float s0 = (q & 1) ? cos_t : sin_t;
  const float c0 = (q & 1) ? sin_t : cos_t;
  s = (q & 2) ? -s0 : s0;
  c = ((q + 1) & 2) ? -c0 : c0;
}

// Box-Muller on two 32-bit words: u = ((a >> 8) + 1) / 2^24 in (0, 1], v = (b >> 8) / 2^24 in
// [0, 1); both conversions are exact, so every backend sees the same u and v. |eps| <= 5.77.
DBAE_HD void box_muller(uint32_t a, uint32_t b, float& n0, float& n1) {
  const float u = static_cast<float>((a >> 8) + 1u) * 0x1p-24f;
  const float v = static_cast<float>(b >> 8) * 0x1p-24f;
  const float r = sqrtf(-2.0f * log_normal(u));
  float s, c;
  sincos_2pi(v, s, c);
  n0 = r * c;
  n1 = r * s;
}

// Standard normals of elements 4 group .. 4 group + 3 of the (seed, offset) stream.
DBAE_HD void normal4(uint64_t group, const NoiseParams& p, float eps[4]) {
  uint32_t ctr[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                     static_cast<uint32_t>(p.offset), static_cast<uint32_t>(p.offset >> 32)};
  philox4x32_10(ctr, static_cast<uint32_t>(p.seed), static_cast<uint32_t>(p.seed >> 32));
  box_muller(ctr[0], ctr[1], eps[0], eps[1]);
  box_muller(ctr[2], ctr[3], eps[2], eps[3]);
}

DBAE_HD float churn_update(float x, float F, float x_T, float eps, const StepCoeffs& c, float noise_scale) {
  return euler_update(x, drift(x, F, x_T, c), c) + noise_scale * eps;
}

}  // namespace dbae::fused
