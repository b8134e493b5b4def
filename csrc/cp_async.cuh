// cp_async.cuh: asynchronous 16-byte copies global -> shared memory (sm_80 `cp.async`), one definition for
// nvcc (inline PTX) and one for the host emulation (csrc/cuda_host_emu.h), so a kernel uses the same calls.
//
//   cp_async_16(dst, src, src_bytes)  copy src_bytes (0..16) bytes from global src to shared dst and
//                                     zero-fill the rest of the 16 (tail rows of a tile without a branch).
//                                     dst and src 16-byte aligned; src must be a valid address even when
//                                     src_bytes is 0 (clamp it to the tensor's start).
//   cp_async_commit()                 close the group of this thread's copies issued since the last commit
//   cp_async_wait<N>()                wait until at most N of this thread's committed groups are in flight
//
// A destination may be read by the issuing thread only after its matching wait, and by other threads only
// after a __syncthreads() that follows that wait (PTX ISA: cp.async, cp.async.commit_group,
// cp.async.wait_group). In the host emulation a copy lands at the issuing thread's wait, never earlier, so
// reading too early sees stale data; the checking build (FB_EMU_CHECK) reports such a read as a race.
#pragma once

#include "common.cuh"

namespace fb {

#ifndef FB_HOST_EMU

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "cp.async needs sm_80 or newer"
#endif
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#else  // FB_HOST_EMU

// noinline: the return address names the kernel line that issued the copy in the checker's reports.
__attribute__((noinline)) inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  ::emu::cp_async_16(dst, src, src_bytes, __builtin_return_address(0));
}
inline void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp_async_wait<N>: N >= 0");
  ::emu::cp_async_wait(N);
}

#endif

}  // namespace fb
