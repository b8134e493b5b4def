// fastbert: the one tensor-core instruction the attention kernels use, and its host emulation.
//
//   mma_m16n8k16<Tag>(acc, a, b):  acc[16x8] += A[16x16] * B[16x8]   (fp32 accumulate)
//
// Tag is fastbert::mma_bf16 or fastbert::mma_f16 and selects the input type of A and B. Operands are
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
// On the device this is one inline-PTX instruction (sm_80 and newer). In the host build
// (FASTBERT_CUDA_HOST, through csrc/cuda_host_emu.h) every emulated lane deposits its fragments in a
// per-warp exchange buffer, the warp synchronises, and each lane computes its own four outputs from the
// whole 16x16 and 16x8 operands reassembled *by the layout above*. A kernel that puts a value in the
// wrong register or lane therefore gets the wrong answer on the host exactly as it would on a GPU,
// which is what lets the CPU tests check the fragment indexing of the attention kernels.
#pragma once

#include <stdint.h>

namespace fastbert {

struct mma_bf16 {};  // A, B hold bfloat16 pairs
struct mma_f16 {};   // A, B hold IEEE half pairs

#if !defined(FASTBERT_CUDA_HOST)

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

#else  // FASTBERT_CUDA_HOST: host emulation through the per-warp exchange

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

}  // namespace mma_detail

template <typename Tag>
inline void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = (int)(threadIdx.x & 31);
  // Each lane publishes its 6 input registers; after the warp barrier every lane can see the whole warp.
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  uint32_t all[32][6];
  emu::warp_allgather(mine, all);
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

#endif  // FASTBERT_CUDA_HOST

}  // namespace fastbert
