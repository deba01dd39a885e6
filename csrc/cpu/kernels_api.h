// The CPU kernels' interface: plain C++ on raw pointers, no torch headers.
//
// Each instruction-set variant (baseline, AVX2+FMA, AVX-512) is one translation unit
// that includes kernels_body.inc under its own `#pragma GCC target` and exports one
// KernelTable. The torch glue (ortholora_cpu.cpp) picks a table at run time, so a
// distributed build needs no -march flag and still uses the machine's widest vectors.
#pragma once

#include <cstdint>

// x86 with GCC/Clang: AVX2 and AVX-512 variants chosen at run time (__builtin_cpu_supports).
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define ORTHOLORA_X86_DISPATCH 1
#endif

namespace ortholora {
namespace cpu {

// One column range [lo, hi) of a row-major matrix with leading dimension ld.
//
// pairs_*:   out[i * rb + j] = sum_{c in [lo, hi)} a[i, c] * b[j, c] for i < ra, j < rb,
//            summed in float64. When sym (a == b, ra == rb, the Gram matrix) only j <= i
//            is written. Float64 products of the converted values, except the Gram of
//            float input: fp32 products summed in fp32 over one L1 tile per lane (<= 32
//            terms), flushed to float64, with a per-tile check that falls back to float64
//            products where a row's scale could overflow/underflow (|x| beyond ~2^+-40).
//            Lane partials are summed in a fixed order: deterministic.
// combine_*: out[r, c] = sum_k m1[r, k] * s1[k, c] + sum_k m2[r, k] * s2[k, c]
//            for r < rout, c in [lo, hi), accumulated in the input precision
//            (float for float, double for double); k2 may be 0 (s2, m2 unused).
struct KernelTable {
  const char* name;
  void (*pairs_f32)(const float* a, int ra, const float* b, int rb, bool sym, int64_t ld,
                    int64_t lo, int64_t hi, double* out);
  void (*pairs_f64)(const double* a, int ra, const double* b, int rb, bool sym, int64_t ld,
                    int64_t lo, int64_t hi, double* out);
  void (*combine_f32)(const float* s1, int k1, const float* m1, const float* s2, int k2,
                      const float* m2, int rout, int64_t ld, int64_t lo, int64_t hi, float* out,
                      int64_t ldo);
  void (*combine_f64)(const double* s1, int k1, const double* m1, const double* s2, int k2,
                      const double* m2, int rout, int64_t ld, int64_t lo, int64_t hi, double* out,
                      int64_t ldo);
};

extern const KernelTable kBaseline;
#if defined(ORTHOLORA_X86_DISPATCH)
extern const KernelTable kAvx2;
extern const KernelTable kAvx512;
#endif

// The CPU's best table (or the one forced with set_table_by_name / $ORTHOLORA_CPU_ISA).
const KernelTable& active_table();
// Force a variant ("baseline", "avx2", "avx512" or "auto"); returns false when the CPU
// (or the build) cannot run it.
bool set_table_by_name(const char* name);

}  // namespace cpu
}  // namespace ortholora
