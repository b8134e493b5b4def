// Self-test of csrc/cuda_host_emu.h: the emulated CUDA semantics the kernels rely on (warp shuffles with
// widths, ballot, __syncthreads, shared memory, dynamic shared memory, atomics across blocks, deadlock
// detection, the debug mode catching a race, bf16/half rounding, cp.async with commit groups and
// zero-fill). Built three ways by the tests: the fast build (tests/test_cuda_host.py), the checking build
// (-DFB_EMU_CHECK + the hook flags, tests/test_cuda_host_memcheck.py), which must report each planted
// kind (RAW, WAR, uninitialised read, out-of-bounds shared and global access, cp.async read before its
// wait, a missing __syncwarp) and stay silent on correct kernels, and the ASan build, run with the
// argument "asan-oob" (a kernel reading past a heap buffer: ASan must abort naming this file).
// Prints "PASS <name>" or "FAIL <name>: <detail>" per check.
#include "cuda_host_emu.h"
#include "common.cuh"
#include "async_kernels.cuh"

#include <cstdio>
#include <string>
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

// ---- kernels with one planted bug each (the checking build must name it) ---------------------------
__global__ void war_kernel(int* out) {
  FB_SHARED(int, buf, 256);
  const int t = threadIdx.x;
  buf[t] = t;
  __syncthreads();
  const int v = buf[(t + 37) % 256];
  buf[t] = v + 1;  // missing __syncthreads(): thread t - 37 may not have read buf[t] yet
  __syncthreads();
  out[t] = buf[t];
}

__global__ void uninit_kernel(float* out) {
  FB_SHARED(float, partial, 64);
  const int t = threadIdx.x;
  if (t < 32) partial[t] = 1.f;  // the second warp's slots are never written
  __syncthreads();
  out[t] = partial[t];
}

__global__ void shared_oob_kernel(int* out) {
  FB_SHARED(int, row, 32);
  const int t = threadIdx.x;
  row[t] = t;
  __syncthreads();
  out[t] = row[t + 1];  // thread 31 reads one element past the array
}

__global__ void global_oob_kernel(const float* x, float* out, int n) {
  const int t = threadIdx.x;
  out[t] = x[t + 1 < n + 1 ? t + 1 : 0];  // reads x[n]: one element past the end
}

// Lane t writes s[t] and then reads s[t ^ dist]: ordered by __syncwarp (sync = 1) for lanes of one warp,
// never across warps (dist = 32 needs __syncthreads).
__global__ void warp_order_kernel(int* out, int sync, int dist) {
  FB_SHARED(int, s, 64);
  const int t = threadIdx.x;
  s[t] = t;
  if (sync == 1) __syncwarp();
  if (sync == 2) (void)__shfl_xor_sync(0xffffffffu, t, 1);  // a warp collective orders its lanes too
  out[t] = s[t ^ dist];
}

static std::string launch_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

[[maybe_unused]] static bool has(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }
// A race is reported as a hazard, or, when the schedule ran the read before the write, as a read of
// never-written shared memory: both name the same bug.
[[maybe_unused]] static bool racy(const std::string& e) {
  return has(e, "hazard on shared memory") || has(e, "uninitialised shared memory");
}

static void cp_async_checks() {
  std::vector<uint4> src(2 * fbtest::kAsyncRows), out(2 * fbtest::kAsyncRows);
  for (size_t i = 0; i < src.size(); ++i) src[i] = uint4{(unsigned)i, (unsigned)i + 1000, (unsigned)i + 2000, (unsigned)i + 3000};
  auto same = [](uint4 a, uint4 b) { return a.x == b.x && a.y == b.y && a.z == b.z && a.w == b.w; };
  emu::launch(fbtest::async_copy_kernel, dim3(2), dim3(fbtest::kAsyncRows), 0, src.data(), out.data(), 6);
  bool ok = true;
  for (int t = 0; t < fbtest::kAsyncRows; ++t) {
    const int r = (t + 1) % fbtest::kAsyncRows;
    uint4 want = src[r];
    if (r == fbtest::kAsyncRows - 1) want = uint4{want.x, want.y & 0xffffu, 0u, 0u};  // 6 bytes, then zeros
    ok &= same(out[t], want);
  }
  check(ok, "cp_async_copy_and_zero_fill");
  std::string err = launch_error([&] {
    emu::launch(fbtest::async_pipeline_kernel, dim3(1), dim3(fbtest::kAsyncRows), 0, src.data(), out.data(), 0);
  });
  ok = err.empty();
  for (int t = 0; t < fbtest::kAsyncRows && ok; ++t)
    ok = same(out[t], src[(t + 5) % 64]) && same(out[64 + t], src[64 + (t + 9) % 64]);
  check(ok, "cp_async_commit_groups_wait_n", err);
  err = launch_error([&] {
    emu::launch(fbtest::async_pipeline_kernel, dim3(1), dim3(fbtest::kAsyncRows), 0, src.data(), out.data(), 1);
  });
#ifdef FB_EMU_CHECK
  check(has(err, "cp.async destination before the cp_async_wait") && has(err, "b[+") &&
            has(err, "async_kernels.cuh:"),
        "check_reports_cp_async_read_before_wait", err);
#else
  int stale = 0;  // the copy lands at the wait, so the early read sees what was there before
  for (int t = 0; t < 64; ++t) stale += !same(out[64 + t], src[64 + t]);
  check(err.empty() && stale == 64, "cp_async_lands_at_wait_not_before", err);
#endif
}

#ifdef FB_EMU_CHECK
static void checking_build_checks() {
  std::vector<int> iout(512);
  std::vector<float> fout(64);
  std::string e = launch_error([&] { emu::launch(racy_kernel, dim3(1), dim3(256), 0, iout.data()); });
  check(racy(e) && has(e, "buf[+") &&
            has(e, "emu_selftest.cpp:") && has(e, "racy_kernel"),
        "check_reports_missing_barrier_before_reads", e);
  e = launch_error([&] { emu::launch(war_kernel, dim3(1), dim3(256), 0, iout.data()); });
  check(racy(e) && has(e, "buf[+") && has(e, "war_kernel"),
        "check_reports_missing_barrier_before_writes", e);
  e = launch_error([&] { emu::launch(uninit_kernel, dim3(1), dim3(64), 0, fout.data()); });
  check(has(e, "uninitialised shared memory") && has(e, "partial[+") && has(e, "[warp 1,"),
        "check_reports_uninitialised_shared_read", e);
  e = launch_error([&] { emu::launch(shared_oob_kernel, dim3(1), dim3(32), 0, iout.data()); });
  check(has(e, "out-of-bounds shared-memory access") && has(e, "lane 31"), "check_reports_shared_oob", e);
  {
    std::vector<float> buf(64 + 16, 0.f);  // x = buf[0..32), guard zone buf[32..48)
    const uint64_t zone[2] = {(uint64_t)(uintptr_t)(buf.data() + 32), (uint64_t)(uintptr_t)(buf.data() + 48)};
    const int after = 1;
    const char* what = "'x' [32] float";
    emu::check::set_guards(zone, &after, &what, 1);
    e = launch_error([&] { emu::launch(global_oob_kernel, dim3(1), dim3(32), 0, buf.data(), fout.data(), 32); });
    emu::check::set_guards(nullptr, nullptr, nullptr, 0);
    check(has(e, "out-of-bounds global read of 4 bytes, 0 bytes past the end of 'x' [32] float") &&
              has(e, "emu_selftest.cpp:"),
          "check_reports_guard_zone_read", e);
  }
  e = launch_error([&] { emu::launch(warp_order_kernel, dim3(1), dim3(64), 0, iout.data(), 0, 1); });
  check(racy(e), "check_reports_missing_syncwarp", e);
  e = launch_error([&] { emu::launch(warp_order_kernel, dim3(1), dim3(64), 0, iout.data(), 1, 1); });
  check(e.empty(), "check_syncwarp_orders_its_lanes", e);
  e = launch_error([&] { emu::launch(warp_order_kernel, dim3(1), dim3(64), 0, iout.data(), 2, 1); });
  check(e.empty(), "check_shuffle_orders_its_lanes", e);
  e = launch_error([&] { emu::launch(warp_order_kernel, dim3(1), dim3(64), 0, iout.data(), 1, 32); });
  check(racy(e), "check_syncwarp_does_not_order_other_warps", e);
  e = launch_error([&] { emu::launch(barrier_kernel, dim3(3), dim3(256), 0, iout.data()); });
  check(e.empty(), "check_silent_on_correct_kernel", e);
}
#endif

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "asan-oob") {  // the ASan build must abort here
    std::vector<float>* x = new std::vector<float>(32, 1.f);
    std::vector<float> out(32);
    emu::launch(global_oob_kernel, dim3(1), dim3(32), 0, x->data(), out.data(), 32);
    std::printf("ASAN DID NOT REPORT\n");
    return 0;
  }
  cp_async_checks();
#ifdef FB_EMU_CHECK
  checking_build_checks();
#endif
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
#ifndef FB_EMU_CHECK
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
#endif
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
