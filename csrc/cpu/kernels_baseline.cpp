// Baseline variant: the compiler's default target (SSE2 on x86-64, NEON on aarch64).
#include <cstdint>
#include <cstring>

#include "kernels_api.h"

namespace ortholora {
namespace cpu {
namespace baseline {
#define OL_VBYTES 16
#define OL_BLOCK 3
#include "kernels_body.inc"
#undef OL_VBYTES
#undef OL_BLOCK
}  // namespace baseline

const KernelTable kBaseline = {"baseline", &baseline::pairs_f32, &baseline::pairs_f64,
                               &baseline::combine_f32, &baseline::combine_f64};

}  // namespace cpu
}  // namespace ortholora
