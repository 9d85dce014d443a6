// f(σ + δ) for the spectral functions of source_fast/spectral.py in fp32, with the same branches and
// thresholds as spectral.evaluate, except the discrete forms, which use log1p/expm1 for stable steps
// (spectral.evaluate's 1 − (1 − ησ)^K loses all digits in fp32 for small ησ). Host and device.
#pragma once

#include <cmath>

#include "source_fast/common.h"

#if defined(__CUDACC__)
#define SF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SF_HOST_DEVICE inline
#endif

namespace sf {

// Plain-old-data copy of SpectralSpec that can be passed to kernels by value.
struct SpectralF32 {
  int kind;
  float c, damping, eta;
  float steps;        // K as float (for powf)
  float steps_eta;    // η K (limit of discrete_r at σ → 0)
  float small_scale;  // η max(K, 1) (discrete_r small-σ test)
  bool c_is_zero;
};

inline SpectralF32 to_f32_spec(const SpectralSpec& s) {
  SpectralF32 r;
  r.kind = s.kind;
  r.c = static_cast<float>(s.c);
  r.damping = static_cast<float>(s.damping);
  r.eta = static_cast<float>(s.eta);
  r.steps = static_cast<float>(s.steps);
  r.steps_eta = static_cast<float>(s.eta * static_cast<double>(s.steps));
  r.small_scale = static_cast<float>(s.eta * static_cast<double>(s.steps > 1 ? s.steps : 1));
  r.c_is_zero = (s.c == 0.0);
  return r;
}

SF_HOST_DEVICE float spectral_eval(const SpectralF32& f, float sigma) {
  if (f.kind == kIdentity) return 1.0f;
  // Clamp at 0 (NaN propagates like torch.clamp_min), then shift by δ: every kind but identity is evaluated on
  // the curvature H + δI (weight decay, damping).
  const float s = (sigma < 0.0f ? 0.0f : sigma) + f.damping;
  switch (f.kind) {
    case kInverse: return 1.0f / s;
    case kExp: return expf(-f.c * s);
    case kSourceR: {
      if (f.c_is_zero) return 0.0f;
      const float x = f.c * s;
      if (x < 1e-6f) return f.c * (1.0f - x / 2.0f + x * x / 6.0f);
      return -expm1f(-x) / s;
    }
    default: {
      // Discrete unrolling (1 − ησ)^K. For a stable step (ησ < 1) go through log1p/expm1: the torch
      // formula 1 − (1 − ησ)^K cancels in fp32 when ησ is small; this form keeps full precision.
      const float es = f.eta * s;
      if (es < 1.0f) {
        const float L = f.steps * log1pf(-es);
        if (f.kind == kDiscreteS) return expf(L);
        if (s * f.small_scale < 1e-8f) return f.steps_eta;
        return -expm1f(L) / s;
      }
      const float powered = powf(1.0f - es, f.steps);  // unstable step: no cancellation to avoid
      if (f.kind == kDiscreteS) return powered;
      return (1.0f - powered) / s;
    }
  }
}

}  // namespace sf
