// AVX2 + FMA variant (x86 with GCC/Clang only), selected at run time when the CPU has it.
#include <cstdint>
#include <cstring>

#include "kernels_api.h"

#if defined(ORTHOLORA_X86_DISPATCH)
#include <immintrin.h>
#endif

#if defined(ORTHOLORA_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace ortholora {
namespace cpu {
namespace avx2 {
#define OL_VBYTES 32
#define OL_BLOCK 3
#include "kernels_body.inc"
#undef OL_VBYTES
#undef OL_BLOCK
}  // namespace avx2
}  // namespace cpu
}  // namespace ortholora
#pragma GCC pop_options

namespace ortholora {
namespace cpu {
const KernelTable kAvx2 = {"avx2", &avx2::pairs_f32, &avx2::pairs_f64, &avx2::combine_f32,
                           &avx2::combine_f64};
}  // namespace cpu
}  // namespace ortholora
#endif
