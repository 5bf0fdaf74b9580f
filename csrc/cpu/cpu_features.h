// Run-time CPU feature probe shared by the CPU kernels whose hot loops have an
// AVX2 copy (compiled with __attribute__((target(...))), chosen per call): one
// probe, cached, instead of one per kernel file.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
namespace dnr {

// AVX2, FMA and F16C together (every x86 CPU with AVX2 so far has all three): the
// target set of the kernels' "avx2,fma,f16c" copies.
inline bool cpu_has_avx2_fma_f16c() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c");
  return yes;
}

}  // namespace dnr
#endif
