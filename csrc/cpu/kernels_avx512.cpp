// AVX-512 (F/VL/DQ) variant (x86 with GCC/Clang only), selected at run time when the CPU has it.
#include <cstdint>
#include <cstring>

#include "kernels_api.h"

#if defined(ORTHOLORA_X86_DISPATCH)
#include <immintrin.h>
#endif

#if defined(ORTHOLORA_X86_DISPATCH)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
namespace ortholora {
namespace cpu {
namespace avx512 {
#define OL_VBYTES 64
#define OL_BLOCK 4
#include "kernels_body.inc"
#undef OL_VBYTES
#undef OL_BLOCK
}  // namespace avx512
}  // namespace cpu
}  // namespace ortholora
#pragma GCC pop_options

namespace ortholora {
namespace cpu {
const KernelTable kAvx512 = {"avx512", &avx512::pairs_f32, &avx512::pairs_f64, &avx512::combine_f32,
                             &avx512::combine_f64};
}  // namespace cpu
}  // namespace ortholora
#endif
