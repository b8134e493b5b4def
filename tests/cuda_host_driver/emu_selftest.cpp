// Self-test of csrc/cuda_host_emu.h: the emulated CUDA semantics the kernels rely on (warp shuffles with
// widths, ballot, __syncthreads, shared memory, dynamic shared memory, atomics across blocks, deadlock
// detection, the debug mode catching a race, bf16/half rounding). Prints "PASS <name>" or
// "FAIL <name>: <detail>" per check; run by tests/test_cuda_host.py.
#include "cuda_host_emu.h"
#include "common.cuh"

#include <cstdio>
#include <vector>

static int failures = 0;
static void check(bool ok, const char* name, const std::string& detail = "") {
  std::printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name, ok ? "" : ": ", ok ? "" : detail.c_str());
  failures += !ok;
}

__global__ void shuffle_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int v = lane * 10 + warp;
  int* o = out + t * 6;
  o[0] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[1] = __shfl_down_sync(0xffffffffu, v, 3);
  o[2] = __shfl_up_sync(0xffffffffu, v, 2);
  o[3] = __shfl_sync(0xffffffffu, v, 7, 16);
  o[4] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
  o[5] = (int)fb::warp_sum((float)lane);
}

__global__ void barrier_kernel(int* out) {
  FB_SHARED(int, buf, 256);
  const int t = threadIdx.x;
  buf[t] = t * 3;
  __syncthreads();
  out[t] = buf[(t + 37) % 256];
  __syncthreads();
  buf[t] = -1;  // a second phase reusing the same memory
  __syncthreads();
  out[256 + t] = buf[(t + 1) % 256];
}

__global__ void racy_kernel(int* out) {
  FB_SHARED(int, buf, 256);
  const int t = threadIdx.x;
  buf[t] = t * 3;
  out[t] = buf[(t + 37) % 256];  // missing __syncthreads(): a race
}

__global__ void divergent_kernel(int* out) {
  if (threadIdx.x % 32 < 16) __syncthreads();
  else __syncwarp();
  out[threadIdx.x] = 1;
}

__global__ void dyn_atomic_kernel(float* counter, int* out) {
  FB_DYNAMIC_SHARED(int, dyn);
  dyn[threadIdx.x + threadIdx.y * blockDim.x] = (int)blockIdx.x;
  __syncthreads();
  atomicAdd(counter, 1.0f);
  if (threadIdx.x == 0 && threadIdx.y == 0) out[blockIdx.x + blockIdx.y * gridDim.x] = dyn[blockDim.x * blockDim.y - 1];
}

int main() {
  {
    std::vector<int> out(64 * 6);
    emu::launch(shuffle_kernel, dim3(1), dim3(64), 0, out.data());
    std::string bad;
    for (int t = 0; t < 64 && bad.empty(); ++t) {
      int lane = t % 32, warp = t / 32;
      auto val = [&](int l) { return l * 10 + warp; };
      int want[6] = {val(lane ^ 5), val(lane + 3 < 32 ? lane + 3 : lane), val(lane >= 2 ? lane - 2 : lane),
                     val((lane & ~15) + 7), (int)0x49249249u, 496};
      for (int j = 0; j < 6; ++j)
        if (out[t * 6 + j] != want[j]) bad = "thread " + std::to_string(t) + " op " + std::to_string(j) + ": got " +
                                             std::to_string(out[t * 6 + j]) + " want " + std::to_string(want[j]);
    }
    check(bad.empty(), "warp_shuffles", bad);
  }
  {
    std::vector<int> out(512);
    emu::launch(barrier_kernel, dim3(3), dim3(256), 0, out.data());
    bool ok = true;
    for (int t = 0; t < 256; ++t) ok &= out[t] == ((t + 37) % 256) * 3 && out[256 + t] == -1;
    check(ok, "syncthreads_shared_memory");
  }
  {
    bool threw = false;
    std::string msg;
    std::vector<int> out(64);
    try {
      emu::launch(divergent_kernel, dim3(1), dim3(64), 0, out.data());
    } catch (const std::exception& e) {
      threw = true;
      msg = e.what();
    }
    check(threw && msg.find("deadlock") != std::string::npos, "divergent_barrier_reported", msg);
  }
  {
    float counter = 0.f;
    std::vector<int> out(12, -5);
    emu::launch(dyn_atomic_kernel, dim3(4, 3), dim3(16, 4), 16 * 4 * sizeof(int), &counter, out.data());
    bool ok = counter == 12.f * 64.f;
    for (int b = 0; b < 12; ++b) ok &= out[b] == b % 4;
    check(ok, "dynamic_smem_atomics_multi_block", "counter " + std::to_string(counter));
  }
  {
    // Normal mode runs a block's threads in order until a barrier, so the race may go unseen; debug
    // mode (shuffled order, poisoned shared memory) must expose it.
    setenv("FASTBERT_EMU_DEBUG", "1", 1);
    emu::reload_config();
    std::vector<int> out(256);
    emu::launch(racy_kernel, dim3(1), dim3(256), 0, out.data());
    int wrong = 0;
    for (int t = 0; t < 256; ++t) wrong += out[t] != ((t + 37) % 256) * 3;
    check(wrong > 0, "debug_mode_exposes_race", "no wrong value in debug mode");
    std::vector<int> out2(512);
    emu::launch(barrier_kernel, dim3(2), dim3(256), 0, out2.data());
    bool ok = true;
    for (int t = 0; t < 256; ++t) ok &= out2[t] == ((t + 37) % 256) * 3 && out2[256 + t] == -1;
    check(ok, "debug_mode_correct_kernel_still_correct");
    unsetenv("FASTBERT_EMU_DEBUG");
    emu::reload_config();
  }
  {
    auto bf = [](float f) { return (float)__float2bfloat16_rn(f); };
    auto hf = [](float f) { return __half2float(__float2half_rn(f)); };
    bool ok = bf(1.00390625f) == 1.0f && bf(1.01171875f) == 1.015625f && std::isnan(bf(NAN)) &&
              bf(-2.5f) == -2.5f && hf(2049.f) == 2048.f && hf(2051.f) == 2052.f && std::isinf(hf(65520.f)) &&
              hf(65519.f) == 65504.f && hf(5.96e-8f) > 0.f;
    check(ok, "bf16_half_round_to_nearest_even");
  }
  std::printf("%s\n", failures ? "SELFTEST FAILED" : "SELFTEST OK");
  return failures ? 1 : 0;
}
