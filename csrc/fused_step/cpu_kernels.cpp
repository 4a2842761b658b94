// Fused sampler-step CPU kernels: plain `omp simd` loops over step_math.h that the compiler
// vectorizes, one copy per x86-64 level (target_clones, chosen at load time). Built with
// -ffp-contract=off so that every copy, and the nvcc build with -fmad=false, rounds the same
// float32 expressions the same way.
#include "cpu_kernels.h"

#include <algorithm>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DBAE_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define DBAE_CPU_CLONES
#endif

// Everything a clone calls is inlined into it, so that it is compiled for the clone's target.
#if defined(__GNUC__)
#define DBAE_INLINE __attribute__((always_inline)) inline
#else
#define DBAE_INLINE inline
#endif

namespace dbae::fused::cpu {
namespace {

// Storage <-> float32, branch-free so that loops vectorize; rounding to nearest even, as torch.
struct Float32 {
  using T = float;
  DBAE_INLINE static float load(float v) { return v; }
  DBAE_INLINE static float store(float v) { return v; }
};

struct BFloat16 {
  using T = uint16_t;
  DBAE_INLINE static float load(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }
  DBAE_INLINE static uint16_t store(float f) {
    const uint32_t u = float_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
  }
};

// IEEE half: the branch-free conversions of the FP16 library (as in c10::Half).
struct Float16 {
  using T = uint16_t;
  DBAE_INLINE static float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normal = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1p-112f;
    const float subnormal = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_float(sign | float_bits((h & 0x7C00u) == 0 ? subnormal : normal));
  }
  DBAE_INLINE static uint16_t store(float f) {
    const uint32_t w = float_bits(f), sign = w & 0x80000000u;
    const int32_t exponent = static_cast<int32_t>((w >> 23) & 0xFFu);
    const uint32_t bias = static_cast<uint32_t>(exponent < 0x71 ? 0x71 : exponent) << 23;
    const uint32_t bits = float_bits(bits_float(bias + 0x07800000u) + (fabsf(f) * 0x1p+112f) * 0x1p-110f);
    const uint32_t magnitude = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return static_cast<uint16_t>((sign >> 16) | (f != f ? 0x7E00u : magnitude));
  }
};

template <typename S>
DBAE_INLINE const typename S::T* in(const void* p) {
  return static_cast<const typename S::T*>(p);
}

template <typename S>
DBAE_INLINE typename S::T* out(void* p) {
  return static_cast<typename S::T*>(p);
}

// The loops take the coefficients by value: loads through a reference inside the loop would
// keep the clamp's selects from being if-converted, and the loop from vectorizing.
template <typename S>
DBAE_INLINE void euler_loop(const void* x, const void* F, const void* x_T, void* x_next, int64_t begin,
                            int64_t end, StepCoeffs c) {
  const auto *px = in<S>(x), *pF = in<S>(F), *pT = in<S>(x_T);
  auto* po = out<S>(x_next);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float xi = S::load(px[i]);
    po[i] = S::store(euler_update(xi, drift(xi, S::load(pF[i]), S::load(pT[i]), c), c));
  }
}

template <typename S>
DBAE_INLINE void heun_predict_loop(const void* x, const void* F, const void* x_T, void* x_pred, void* d,
                                   int64_t begin, int64_t end, StepCoeffs c) {
  const auto *px = in<S>(x), *pF = in<S>(F), *pT = in<S>(x_T);
  auto *po = out<S>(x_pred), *pd = out<S>(d);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float xi = S::load(px[i]);
    const float di = drift(xi, S::load(pF[i]), S::load(pT[i]), c);
    po[i] = S::store(euler_update(xi, di, c));
    pd[i] = S::store(di);
  }
}

template <typename S>
DBAE_INLINE void heun_correct_loop(const void* x_start, const void* d1, const void* x_pred, const void* F,
                                   const void* x_T, void* x_next, int64_t begin, int64_t end, StepCoeffs c) {
  const auto *ps = in<S>(x_start), *pd = in<S>(d1), *pp = in<S>(x_pred), *pF = in<S>(F), *pT = in<S>(x_T);
  auto* po = out<S>(x_next);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    po[i] = S::store(
        heun_update(S::load(ps[i]), S::load(pd[i]), S::load(pp[i]), S::load(pF[i]), S::load(pT[i]), c));
  }
}

// Noise for kBlockGroups Philox groups at a time into a stack buffer, then the update.
constexpr int64_t kBlockGroups = 256;

template <typename S>
DBAE_INLINE void churn_loop(const void* x, const void* F, const void* x_T, void* x_next, int64_t begin,
                            int64_t end, StepCoeffs c, NoiseParams noise) {
  const auto *px = in<S>(x), *pF = in<S>(F), *pT = in<S>(x_T);
  auto* po = out<S>(x_next);
  float eps[4 * kBlockGroups];
  for (int64_t i0 = begin; i0 < end; i0 += 4 * kBlockGroups) {
    const int64_t i1 = std::min(i0 + 4 * kBlockGroups, end), g0 = i0 / 4, g1 = (i1 + 3) / 4;
#pragma omp simd
    for (int64_t g = g0; g < g1; ++g) normal4(static_cast<uint64_t>(g), noise, eps + 4 * (g - g0));
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      po[i] = S::store(churn_update(S::load(px[i]), S::load(pF[i]), S::load(pT[i]), eps[i - i0], c, noise.scale));
    }
  }
}

}  // namespace

DBAE_CPU_CLONES void euler_step(DType dtype, const void* x, const void* F, const void* x_T, void* x_next,
                                int64_t begin, int64_t end, const StepCoeffs& c) {
  switch (dtype) {
    case DType::kFloat32:
      return euler_loop<Float32>(x, F, x_T, x_next, begin, end, c);
    case DType::kFloat16:
      return euler_loop<Float16>(x, F, x_T, x_next, begin, end, c);
    case DType::kBFloat16:
      return euler_loop<BFloat16>(x, F, x_T, x_next, begin, end, c);
  }
}

DBAE_CPU_CLONES void heun_predict(DType dtype, const void* x, const void* F, const void* x_T, void* x_pred, void* d,
                                  int64_t begin, int64_t end, const StepCoeffs& c) {
  switch (dtype) {
    case DType::kFloat32:
      return heun_predict_loop<Float32>(x, F, x_T, x_pred, d, begin, end, c);
    case DType::kFloat16:
      return heun_predict_loop<Float16>(x, F, x_T, x_pred, d, begin, end, c);
    case DType::kBFloat16:
      return heun_predict_loop<BFloat16>(x, F, x_T, x_pred, d, begin, end, c);
  }
}

DBAE_CPU_CLONES void heun_correct(DType dtype, const void* x_start, const void* d1, const void* x_pred, const void* F,
                                  const void* x_T, void* x_next, int64_t begin, int64_t end, const StepCoeffs& c) {
  switch (dtype) {
    case DType::kFloat32:
      return heun_correct_loop<Float32>(x_start, d1, x_pred, F, x_T, x_next, begin, end, c);
    case DType::kFloat16:
      return heun_correct_loop<Float16>(x_start, d1, x_pred, F, x_T, x_next, begin, end, c);
    case DType::kBFloat16:
      return heun_correct_loop<BFloat16>(x_start, d1, x_pred, F, x_T, x_next, begin, end, c);
  }
}

DBAE_CPU_CLONES void churn_step(DType dtype, const void* x, const void* F, const void* x_T, void* x_next,
                                int64_t begin, int64_t end, const StepCoeffs& c, const NoiseParams& noise) {
  switch (dtype) {
    case DType::kFloat32:
      return churn_loop<Float32>(x, F, x_T, x_next, begin, end, c, noise);
    case DType::kFloat16:
      return churn_loop<Float16>(x, F, x_T, x_next, begin, end, c, noise);
    case DType::kBFloat16:
      return churn_loop<BFloat16>(x, F, x_T, x_next, begin, end, c, noise);
  }
}

}  // namespace dbae::fused::cpu
