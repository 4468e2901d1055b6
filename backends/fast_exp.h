// exp(x) for x <= 0 (or NaN), written out so that GCC vectorises it, shared by
// the C++ kernels of this folder (native.py pastes this file in place of its
// #include line before hashing and compiling, so a changed header rebuilds).
// Cody-Waite range reduction, the degree-7 polynomial of Cephes expf (about
// 1 ulp, as a vectorised expf), the power of two assembled in the exponent
// bits.  The double overloads are std::exp.

#ifndef GMBENCH_FAST_EXP_H
#define GMBENCH_FAST_EXP_H

#include <cmath>
#include <cstdint>
#include <cstring>

// Below -87 it returns about 1e-38 instead of underflowing; NaN stays NaN.
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}
static inline double exp_nonpositive(double x) { return std::exp(x); }

// As exp_nonpositive, but exactly 0 below -87.3 (where expf underflows to
// denormals); NaN stays NaN.
static inline float exp_nonpositive_flushed(float x) {
    const bool underflow = x < -87.3f;
    const float e = exp_nonpositive(x);
    return underflow ? 0.0f : e;
}
static inline double exp_nonpositive_flushed(double x) { return std::exp(x); }

#endif  // GMBENCH_FAST_EXP_H
