// Small kernels using the cp.async wrappers of csrc/cp_async.cuh. The same source is compiled by nvcc for
// sm_80 / sm_90 (async_kernels_nvcc.cu, tests/test_cuda_host_memcheck.py) and run on the host emulation
// by emu_selftest.cpp, which checks the results (fast build) and the reports (checking build).
#pragma once
#include "cp_async.cuh"

namespace fbtest {

constexpr int kAsyncRows = 64;  // one 16-byte row per thread

// tile[r] = src[r] for r < 64 (row 63 takes only `tail_bytes` bytes, the rest zero-filled); then every
// thread reads its neighbour's row: out[t] = tile[(t + 1) % 64].
__global__ void async_copy_kernel(const uint4* src, uint4* out, int tail_bytes) {
  FB_SHARED(uint4, tile, kAsyncRows);
  const int t = threadIdx.x;
  fb::cp_async_16(&tile[t], src + t, t == kAsyncRows - 1 ? tail_bytes : 16);
  fb::cp_async_commit();
  fb::cp_async_wait<0>();
  __syncthreads();
  out[t] = tile[(t + 1) % kAsyncRows];
}

// Two commit groups: after wait<1> the first has landed (tile a), after wait<0> both. plant = 1 reads
// tile b between the two waits (a cp.async destination read before its wait: a race).
__global__ void async_pipeline_kernel(const uint4* src, uint4* out, int plant) {
  FB_SHARED(uint4, a, kAsyncRows);
  FB_SHARED(uint4, b, kAsyncRows);
  const int t = threadIdx.x;
  fb::cp_async_16(&a[t], src + t, 16);
  fb::cp_async_commit();
  fb::cp_async_16(&b[t], src + kAsyncRows + t, 16);
  fb::cp_async_commit();
  fb::cp_async_wait<1>();
  __syncthreads();
  out[t] = a[(t + 5) % kAsyncRows];
  if (plant == 1) out[kAsyncRows + t] = b[t];  // too early: b is still in flight
  fb::cp_async_wait<0>();
  __syncthreads();
  if (plant != 1) out[kAsyncRows + t] = b[(t + 9) % kAsyncRows];
}

}  // namespace fbtest
