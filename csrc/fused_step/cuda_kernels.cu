// Fused sampler-step CUDA kernels: one grid-stride pass, float32 math on fp32/fp16/bf16
// storage, 128-bit loads and stores when every array is 16-byte aligned (scalar otherwise and
// in the tail). Each thread handles chunks of 16 bytes per array: 4 fp32 or 8 fp16/bf16
// elements, always a whole number of the 4-element Philox groups of step_math.h.
#include "cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dbae::fused::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;
constexpr int kChunkBytes = 16;

template <typename T>
constexpr int kWidth = kChunkBytes / sizeof(T);

template <typename T>
struct alignas(kChunkBytes) Chunk {
  T v[kWidth<T>];
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, bool kAligned>
__device__ __forceinline__ void load(const T* __restrict__ p, int64_t i0, int64_t n, float (&v)[kWidth<T>]) {
  if (kAligned && i0 + kWidth<T> <= n) {
    const Chunk<T> c = *reinterpret_cast<const Chunk<T>*>(p + i0);
#pragma unroll
    for (int j = 0; j < kWidth<T>; ++j) v[j] = to_float(c.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kWidth<T>; ++j) v[j] = i0 + j < n ? to_float(p[i0 + j]) : 0.0f;
  }
}

template <typename T, bool kAligned>
__device__ __forceinline__ void store(T* __restrict__ p, int64_t i0, int64_t n, const float (&v)[kWidth<T>]) {
  if (kAligned && i0 + kWidth<T> <= n) {
    Chunk<T> c;
#pragma unroll
    for (int j = 0; j < kWidth<T>; ++j) c.v[j] = from_float<T>(v[j]);
    *reinterpret_cast<Chunk<T>*>(p + i0) = c;
  } else {
#pragma unroll
    for (int j = 0; j < kWidth<T>; ++j) {
      if (i0 + j < n) p[i0 + j] = from_float<T>(v[j]);
    }
  }
}

template <typename T, int NIn, int NOut>
struct Arrays {
  const T* in[NIn];
  T* out[NOut];
};

// The per-chunk work of each step: W elements starting at element i0 (a multiple of W).
struct EulerStep {
  StepCoeffs c;
  template <int W>
  __device__ void operator()(const float (&in)[3][W], float (&out)[1][W], int64_t) const {
#pragma unroll
    for (int j = 0; j < W; ++j) out[0][j] = euler_update(in[0][j], drift(in[0][j], in[1][j], in[2][j], c), c);
  }
};

struct HeunPredict {
  StepCoeffs c;
  template <int W>
  __device__ void operator()(const float (&in)[3][W], float (&out)[2][W], int64_t) const {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      out[1][j] = drift(in[0][j], in[1][j], in[2][j], c);
      out[0][j] = euler_update(in[0][j], out[1][j], c);
    }
  }
};

struct HeunCorrect {
  StepCoeffs c;
  template <int W>
  __device__ void operator()(const float (&in)[5][W], float (&out)[1][W], int64_t) const {
#pragma unroll
    for (int j = 0; j < W; ++j) out[0][j] = heun_update(in[0][j], in[1][j], in[2][j], in[3][j], in[4][j], c);
  }
};

struct ChurnStep {
  StepCoeffs c;
  NoiseParams noise;
  template <int W>
  __device__ void operator()(const float (&in)[3][W], float (&out)[1][W], int64_t i0) const {
#pragma unroll
    for (int g = 0; g < W / 4; ++g) {
      float eps[4];
      normal4(static_cast<uint64_t>(i0 / 4 + g), noise, eps);
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        const int j = 4 * g + l;
        out[0][j] = churn_update(in[0][j], in[1][j], in[2][j], eps[l], c, noise.scale);
      }
    }
  }
};

template <typename T, int NIn, int NOut, bool kAligned, typename Step>
__global__ void __launch_bounds__(kThreads) step_kernel(Arrays<T, NIn, NOut> a, int64_t n, Step step) {
  constexpr int W = kWidth<T>;
  const int64_t chunks = (n + W - 1) / W;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; chunk < chunks; chunk += stride) {
    const int64_t i0 = chunk * W;
    float in[NIn][W];
    float out[NOut][W];
#pragma unroll
    for (int k = 0; k < NIn; ++k) load<T, kAligned>(a.in[k], i0, n, in[k]);
    step(in, out, i0);
#pragma unroll
    for (int k = 0; k < NOut; ++k) store<T, kAligned>(a.out[k], i0, n, out[k]);
  }
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kChunkBytes == 0; }

template <typename T, int NIn, int NOut, typename Step>
cudaError_t launch(const void* const (&in)[NIn], void* const (&out)[NOut], int64_t n, const Step& step,
                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  Arrays<T, NIn, NOut> a;
  bool all_aligned = true;
  for (int k = 0; k < NIn; ++k) {
    a.in[k] = static_cast<const T*>(in[k]);
    all_aligned = all_aligned && aligned(in[k]);
  }
  for (int k = 0; k < NOut; ++k) {
    a.out[k] = static_cast<T*>(out[k]);
    all_aligned = all_aligned && aligned(out[k]);
  }
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t chunks = (n + kWidth<T> - 1) / kWidth<T>;
  const int64_t wanted = (chunks + kThreads - 1) / kThreads, most = int64_t{sms} * kBlocksPerSm;
  const unsigned blocks = static_cast<unsigned>(wanted < most ? wanted : most);
  if (all_aligned) {
    step_kernel<T, NIn, NOut, true><<<blocks, kThreads, 0, stream>>>(a, n, step);
  } else {
    step_kernel<T, NIn, NOut, false><<<blocks, kThreads, 0, stream>>>(a, n, step);
  }
  return cudaGetLastError();
}

template <int NIn, int NOut, typename Step>
cudaError_t dispatch(DType dtype, const void* const (&in)[NIn], void* const (&out)[NOut], int64_t n,
                     const Step& step, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(in, out, n, step, stream);
    case DType::kFloat16:
      return launch<__half>(in, out, n, step, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(in, out, n, step, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t euler_step(DType dtype, const void* x, const void* F, const void* x_T, void* x_next, int64_t n,
                       const StepCoeffs& c, cudaStream_t stream) {
  const void* const in[3] = {x, F, x_T};
  void* const out[1] = {x_next};
  return dispatch(dtype, in, out, n, EulerStep{c}, stream);
}

cudaError_t heun_predict(DType dtype, const void* x, const void* F, const void* x_T, void* x_pred, void* d,
                         int64_t n, const StepCoeffs& c, cudaStream_t stream) {
  const void* const in[3] = {x, F, x_T};
  void* const out[2] = {x_pred, d};
  return dispatch(dtype, in, out, n, HeunPredict{c}, stream);
}

cudaError_t heun_correct(DType dtype, const void* x_start, const void* d1, const void* x_pred, const void* F,
                         const void* x_T, void* x_next, int64_t n, const StepCoeffs& c, cudaStream_t stream) {
  const void* const in[5] = {x_start, d1, x_pred, F, x_T};
  void* const out[1] = {x_next};
  return dispatch(dtype, in, out, n, HeunCorrect{c}, stream);
}

cudaError_t churn_step(DType dtype, const void* x, const void* F, const void* x_T, void* x_next, int64_t n,
                       const StepCoeffs& c, const NoiseParams& noise, cudaStream_t stream) {
  const void* const in[3] = {x, F, x_T};
  void* const out[1] = {x_next};
  return dispatch(dtype, in, out, n, ChurnStep{c, noise}, stream);
}

}  // namespace dbae::fused::gpu
