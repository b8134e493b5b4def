// fastbert: the one tensor-core instruction the attention kernels use, and its host emulation.
//
//   mma_m16n8k16<Tag>(acc, a, b):  acc[16x8] += A[16x16] * B[16x8]   (fp32 accumulate)
//
// Tag is fb::mma_bf16 or fb::mma_f16 and selects the input type of A and B. Operands are
// the per-lane register fragments of PTX `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{..}.f32`
// (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"). With
// g = lane >> 2 (groupID) and t = lane % 4 (threadID_in_group), each lane holds:
//
//   a[0] = A[g    ][2t, 2t+1]     a[1] = A[g + 8][2t, 2t+1]
//   a[2] = A[g    ][2t+8, 2t+9]   a[3] = A[g + 8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]         b[1] = B[2t+8, 2t+9][g]          (B is K x N, "col": K-contiguous)
//   acc[0], acc[1] = C[g][2t, 2t+1]   acc[2], acc[3] = C[g + 8][2t, 2t+1]
//
// and in each 32-bit register the element with the smaller k (or column) index sits in the low half.
//
//   ldmatrix_x4<TRANS>(r, row):  r[i] = this lane's piece of 8x8 matrix i of 16-bit elements, loaded from
//   shared memory (PTX `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16`). Lane 8i + j passes the address
//   of row j of matrix i (16-byte aligned). Without .trans lane l receives M_i[l/4][2(l%4), 2(l%4)+1],
//   which is an A-fragment register (or a B register of a K-contiguous tile); with .trans it receives
//   M_i[2(l%4)][l/4] and M_i[2(l%4)+1][l/4], a B register of an N-contiguous tile.
//
// On the device these are single inline-PTX instructions (sm_80 and newer). In the host build
// (FB_HOST_EMU, through csrc/cuda_host_emu.h) every emulated lane deposits its fragments in a
// per-warp exchange buffer, the warp synchronises, and each lane computes its own four outputs from the
// whole 16x16 and 16x8 operands reassembled *by the layout above*. A kernel that puts a value in the
// wrong register or lane therefore gets the wrong answer on the host exactly as it would on a GPU,
// which is what lets the CPU tests check the fragment indexing of the attention kernels. The host
// ldmatrix likewise gathers the 32 row addresses over the warp and hands each lane the elements the
// PTX ISA assigns to it ("Warp-level matrix load instruction: ldmatrix").
#pragma once

#include <stdint.h>

#include <string>
#include <type_traits>

#include "common.cuh"

namespace fb {

struct mma_bf16 {};  // A, B hold bfloat16 pairs
struct mma_f16 {};   // A, B hold IEEE half pairs

#ifndef FB_HOST_EMU

template <typename Tag>
__device__ __forceinline__ void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<mma_bf16>(float (&acc)[4], const uint32_t (&a)[4],
                                                       const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "fastbert attention needs sm_80 or newer (mma.sync m16n8k16 with bf16)"
#endif
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<mma_f16>(float (&acc)[4], const uint32_t (&a)[4],
                                                      const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  if (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

#else  // FB_HOST_EMU: host emulation through the warp exchange of cuda_host_emu.h

namespace mma_detail {

// Exact widening of one 16-bit value to float (bit manipulation, so the emulation does not depend on
// how the emulation header implements its bf16/half types).
inline float bf16_bits_to_float(uint32_t h) {
  uint32_t u = (h & 0xffffu) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

inline float f16_bits_to_float(uint32_t h) {
  h &= 0xffffu;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    u = sign;  // +-0
  } else {     // subnormal: normalise
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while (!(man & 0x400u));
    u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

template <typename Tag>
inline float widen(uint32_t reg, int half) {
  const uint32_t bits = half ? (reg >> 16) : (reg & 0xffffu);
  return std::is_same<Tag, mma_bf16>::value ? bf16_bits_to_float(bits) : f16_bits_to_float(bits);
}

// mma.sync / ldmatrix.sync are warp-wide: a lane that already returned would leave a stale value behind.
inline void require_full_warp(const char* what) {
  const ::emu::Block& blk = *::emu::t_block;
  const int base = ::emu::self().warp * 32;
  for (int l = 0; l < 32; ++l)
    if (base + l >= blk.nthreads || blk.fibers[base + l].st == ::emu::St::Done)
      ::emu::fail(std::string(what) + " called with fewer than 32 live lanes in the warp");
}

}  // namespace mma_detail

template <typename Tag>
FB_EMU_UNCHECKED inline void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = (int)(threadIdx.x & 31);
  mma_detail::require_full_warp("mma_m16n8k16");
  // Each lane publishes its 6 input registers; after the warp barrier every lane can see the whole warp.
  // Three 64-bit exchanges (three warp barriers); each result is copied out before the next exchange,
  // since the emulator double-buffers its exchange slots.
  const uint64_t mine[3] = {a[0] | (uint64_t)a[1] << 32, a[2] | (uint64_t)a[3] << 32, b[0] | (uint64_t)b[1] << 32};
  uint32_t all[32][6];
  for (int x = 0; x < 3; ++x) {
    const uint64_t* slots = ::emu::warp_exchange(mine[x], /*orders=*/false);  // no memory involved
    for (int l = 0; l < 32; ++l) {
      all[l][2 * x] = (uint32_t)slots[l];
      all[l][2 * x + 1] = (uint32_t)(slots[l] >> 32);
    }
  }
  const int g = lane >> 2, t = lane & 3;
  // A[r][k] lives in lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 * (k >= 8), half k % 2.
  auto A = [&](int r, int k) {
    return mma_detail::widen<Tag>(all[(r & 7) * 4 + ((k & 7) >> 1)][(r >> 3) + 2 * (k >> 3)], k & 1);
  };
  // B[k][n] lives in lane n * 4 + (k % 8) / 2, register 4 + (k >= 8), half k % 2.
  auto B = [&](int k, int n) { return mma_detail::widen<Tag>(all[n * 4 + ((k & 7) >> 1)][4 + (k >> 3)], k & 1); };
  for (int e = 0; e < 4; ++e) {
    const int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    float s = 0.f;  // products of two bf16/f16 values are exact in fp32
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    acc[e] += s;
  }
}

template <bool TRANS>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const int lane = (int)(threadIdx.x & 31);
  mma_detail::require_full_warp("ldmatrix_x4");
  if (reinterpret_cast<uintptr_t>(smem_row) % 16 != 0) ::emu::fail("ldmatrix_x4: row address not 16-byte aligned");
  // The row-address exchange is the emulation's, not a memory barrier: the race check still wants a
  // __syncthreads / __syncwarp between the tile's stores and these reads.
  const uint64_t* slots = ::emu::warp_exchange((uint64_t)reinterpret_cast<uintptr_t>(smem_row), /*orders=*/false);
  const unsigned char* rows[32];
  for (int l = 0; l < 32; ++l) rows[l] = reinterpret_cast<const unsigned char*>((uintptr_t)slots[l]);
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const unsigned char* const* m = rows + 8 * i;  // row addresses of matrix i
    if (!TRANS) {
      __builtin_memcpy(&r[i], m[g] + 4 * t, 4);  // M[g][2t], M[g][2t+1]
    } else {
      uint16_t lo, hi;  // M[2t][g], M[2t+1][g]
      __builtin_memcpy(&lo, m[2 * t] + 2 * g, 2);
      __builtin_memcpy(&hi, m[2 * t + 1] + 2 * g, 2);
      r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
  }
}

#endif  // FB_HOST_EMU

}  // namespace fb
