// Run-time choice of the CPU kernel variant (no torch headers).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels_api.h"

namespace ortholora {
namespace cpu {
namespace {

bool supported(const KernelTable* t) {
#if defined(ORTHOLORA_X86_DISPATCH)
  if (t == &kAvx512) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }
  if (t == &kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return t == &kBaseline;
}

const KernelTable* by_name(const char* name) {
  if (std::strcmp(name, "baseline") == 0) return &kBaseline;
#if defined(ORTHOLORA_X86_DISPATCH)
  if (std::strcmp(name, "avx2") == 0) return &kAvx2;
  if (std::strcmp(name, "avx512") == 0) return &kAvx512;
#endif
  return nullptr;
}

const KernelTable* best() {
#if defined(ORTHOLORA_X86_DISPATCH)
  __builtin_cpu_init();
  if (supported(&kAvx512)) return &kAvx512;
  if (supported(&kAvx2)) return &kAvx2;
#endif
  return &kBaseline;
}

const KernelTable* initial() {
  const char* env = std::getenv("ORTHOLORA_CPU_ISA");
  if (env && *env && std::strcmp(env, "auto") != 0) {
    const KernelTable* t = by_name(env);
    if (t && supported(t)) return t;
  }
  return best();
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

const KernelTable& active_table() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (!t) {
    t = initial();
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

bool set_table_by_name(const char* name) {
  const KernelTable* t = std::strcmp(name, "auto") == 0 ? best() : by_name(name);
  if (!t || !supported(t)) return false;
  g_active.store(t, std::memory_order_release);
  return true;
}

}  // namespace cpu
}  // namespace ortholora
