// cuda_host_emu.h: just enough of the CUDA execution model, in host C++, to run fastbert's kernel
// sources (csrc/*.cu) unchanged on a CPU with g++. This is how the CUDA kernels are *executed* in CI
// (the `cuda_host` test backend); nvcc separately checks that the same sources compile for sm_80/sm_90.
//
// Model:
//  * __global__/__device__/__host__/__forceinline__ become plain (inline) C++ functions.
//  * emu::launch(kernel, grid, block, smem_bytes, args...) runs every block of the grid. Blocks are
//    independent, so several OS worker threads each take whole blocks (FASTBERT_EMU_WORKERS, default
//    min(4, cores)). Inside a block every CUDA thread is a fiber (ucontext) with its own stack; fibers
//    run cooperatively on the block's OS thread and switch only at barriers, which makes a block
//    deterministic (and cheap: no OS thread per CUDA thread).
//  * __syncthreads() is a real barrier: a fiber waits until every live thread of the block reached it.
//    __syncwarp() and the warp collectives (__shfl_*_sync, __ballot_sync, __any_sync, __all_sync) are
//    barriers over the live lanes of the warp, exchanging values through a double-buffered per-warp
//    buffer (one barrier per shuffle). Threads that already returned do not count (as on sm_70+);
//    a block in which live threads wait at different barriers is reported as a deadlock.
//  * threadIdx/blockIdx/blockDim/gridDim read the current fiber's coordinates (thread_local pointer).
//  * Shared memory: kernels declare it with FB_SHARED(T, name, count) / FB_DYNAMIC_SHARED(T, name)
//    (common.cuh), which here hand out per-block storage from an arena; every thread of the block
//    gets the same pointers because the declarations run in the same order in every thread.
//    Plain `__shared__ T x[N];` also works (mapped to `static thread_local`: one copy per worker OS
//    thread, which runs one block at a time) but is not poisoned in debug mode; `extern __shared__`
//    is not supported: use FB_DYNAMIC_SHARED.
//  * Debug mode (FASTBERT_EMU_DEBUG=1): fibers start and resume in a freshly shuffled order at every
//    scheduling round (seed FASTBERT_EMU_SEED), and the shared-memory arena, the dynamic shared
//    memory and the warp exchange buffers are filled with 0xFF bytes (NaN as float) before each block,
//    so a missing barrier or a read of never-written shared memory shows up as a wrong or NaN result.
//  * half / bfloat16: storage types with fp32 math and round-to-nearest-even conversions, under the
//    names of cuda_fp16.h / cuda_bf16.h that the kernels use.
// Errors (deadlock, an exception inside a kernel) stop the launch and make emu::launch throw
// std::runtime_error; the extern "C" entry points turn that into an error string for Python.
#pragma once
#ifndef FB_HOST_EMU
#define FB_HOST_EMU 1
#endif

#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------------------------
// qualifiers and builtin types
// ------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local
#define __constant__ static

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
static constexpr int warpSize = 32;

typedef void* cudaStream_t;
typedef int cudaError_t;
static constexpr cudaError_t cudaSuccess = 0;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error (host emulation)"; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, int = 0, cudaStream_t = nullptr) {
  if (n) std::memcpy(d, s, n);
  return cudaSuccess;
}
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? 4 : 227 * 1024;  // a small "GPU": few partial blocks
  return cudaSuccess;
}
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

// ------------------------------------------------------------------------------------------------
// the scheduler
// ------------------------------------------------------------------------------------------------
namespace emu {

enum class St : uint8_t { Ready, WaitBlock, WaitWarp, Done };

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0, warp = 0, lane = 0;
  St st = St::Ready;
  size_t smem_cursor = 0;  // next FB_SHARED offset for this thread
  int xchg_phase = 0;      // which half of the warp exchange buffer the next collective uses
};

struct Block {
  dim3 bdim, gdim;
  uint3 bid;
  int nthreads = 0, nwarps = 0;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  std::vector<unsigned char> arena;    // FB_SHARED storage
  std::vector<unsigned char> dyn;      // dynamic shared memory
  std::vector<uint64_t> xchg;          // [nwarps][2][32] warp exchange slots
  const std::function<void()>* body = nullptr;
  std::string error;
};

struct Config {
  bool debug = false;
  unsigned long seed = 12345;
  int workers = 1;
};

inline Config& config() {
  static Config c = [] {
    Config k;
    const char* d = std::getenv("FASTBERT_EMU_DEBUG");
    k.debug = d && *d && std::strcmp(d, "0") != 0;
    if (const char* s = std::getenv("FASTBERT_EMU_SEED")) k.seed = std::strtoul(s, nullptr, 10);
    unsigned hw = std::thread::hardware_concurrency();
    k.workers = (int)std::max(1u, std::min(4u, hw ? hw : 1u));
    if (const char* w = std::getenv("FASTBERT_EMU_WORKERS")) k.workers = std::max(1, std::atoi(w));
    return k;
  }();
  return c;
}

// Re-read the environment (the Python side calls this after changing FASTBERT_EMU_* variables).
inline void reload_config() {
  Config& c = config();
  const char* d = std::getenv("FASTBERT_EMU_DEBUG");
  c.debug = d && *d && std::strcmp(d, "0") != 0;
  c.seed = 12345;
  if (const char* s = std::getenv("FASTBERT_EMU_SEED")) c.seed = std::strtoul(s, nullptr, 10);
  if (const char* w = std::getenv("FASTBERT_EMU_WORKERS")) c.workers = std::max(1, std::atoi(w));
}

inline thread_local Block* t_block = nullptr;
inline thread_local Fiber* t_fiber = nullptr;

[[noreturn]] inline void fail(const std::string& msg) { throw std::runtime_error("cuda_host emulation: " + msg); }

inline Fiber& self() {
  if (!t_fiber) fail("a device function was called outside a kernel launch");
  return *t_fiber;
}

inline void yield_to_scheduler(St why) {
  Fiber& f = self();
  f.st = why;
  swapcontext(&f.ctx, &t_block->sched);
}

inline void fiber_main() {
  Block* b = t_block;
  try {
    (*b->body)();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  } catch (...) {
    if (b->error.empty()) b->error = "unknown exception in kernel";
  }
  t_fiber->st = St::Done;
  // returning resumes uc_link = the scheduler
}

// A worker's reusable fiber stacks (mmap'd, only touched pages cost memory).
struct StackPool {
  static constexpr size_t kStack = 256 * 1024;
  std::vector<void*> stacks;
  void* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) fail("mmap of a fiber stack failed");
      stacks.push_back(p);
    }
    return stacks[i];
  }
  ~StackPool() {
    for (void* p : stacks) munmap(p, kStack);
  }
};

inline std::string state_summary(const Block& b) {
  int nb = 0, nw = 0, nd = 0;
  for (const Fiber& f : b.fibers) {
    nb += f.st == St::WaitBlock;
    nw += f.st == St::WaitWarp;
    nd += f.st == St::Done;
  }
  return std::to_string(nb) + " threads at __syncthreads, " + std::to_string(nw) + " at a warp collective, " +
         std::to_string(nd) + " exited";
}

inline void run_block(Block& b, StackPool& pool, std::mt19937& rng) {
  const Config& cfg = config();
  b.nthreads = (int)(b.bdim.x * b.bdim.y * b.bdim.z);
  b.nwarps = (b.nthreads + 31) / 32;
  b.fibers.assign(b.nthreads, Fiber{});
  b.xchg.assign((size_t)b.nwarps * 64, 0);
  b.error.clear();
  if (cfg.debug) {
    std::fill(b.arena.begin(), b.arena.end(), 0xFF);
    std::fill(b.dyn.begin(), b.dyn.end(), 0xFF);
    std::fill(b.xchg.begin(), b.xchg.end(), ~uint64_t(0));
  }
  for (int i = 0; i < b.nthreads; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = uint3{(unsigned)i % b.bdim.x, (unsigned)(i / b.bdim.x) % b.bdim.y, (unsigned)(i / (b.bdim.x * b.bdim.y))};
    f.warp = i / 32;
    f.lane = i % 32;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = pool.get(i);
    f.ctx.uc_stack.ss_size = StackPool::kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, (void (*)())fiber_main, 0);
  }
  std::vector<int> order(b.nthreads);
  for (int i = 0; i < b.nthreads; ++i) order[i] = i;
  for (;;) {
    if (cfg.debug) std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      Fiber& f = b.fibers[i];
      if (f.st != St::Ready) continue;
      t_fiber = &f;
      swapcontext(&b.sched, &f.ctx);
      t_fiber = nullptr;
      if (!b.error.empty()) return;  // abandon the other fibers: their stacks are simply reused
    }
    // Release barriers whose every live participant has arrived.
    bool released = false, all_done = true, all_block = true;
    for (int w = 0; w < b.nwarps; ++w) {
      int lo = w * 32, hi = std::min(b.nthreads, lo + 32);
      bool any_warp = false, full = true;
      for (int t = lo; t < hi; ++t) {
        St s = b.fibers[t].st;
        if (s != St::Done) all_done = false;
        if (s == St::WaitWarp) any_warp = true;
        else if (s != St::Done) full = false;
        if (s != St::Done && s != St::WaitBlock) all_block = false;
      }
      if (any_warp && full) {
        for (int t = lo; t < hi; ++t)
          if (b.fibers[t].st == St::WaitWarp) b.fibers[t].st = St::Ready;
        released = true;
      }
    }
    if (all_done) return;
    if (released) continue;
    if (all_block) {
      for (Fiber& f : b.fibers)
        if (f.st == St::WaitBlock) f.st = St::Ready;
      continue;
    }
    b.error = "deadlock in block (" + std::to_string(b.bid.x) + "," + std::to_string(b.bid.y) + "," +
              std::to_string(b.bid.z) + "): " + state_summary(b) +
              " (divergent barrier: live threads wait at different barriers)";
    return;
  }
}

// Run body() as a kernel over grid x block.
inline void launch_body(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const long long nblocks = (long long)grid.x * grid.y * grid.z;
  const long long nthreads = (long long)block.x * block.y * block.z;
  if (nthreads < 1 || nthreads > 1024) fail("invalid block size " + std::to_string(nthreads));
  if (block.z > 64 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) fail("invalid launch dimensions");
  // as on a GPU (cudaErrorInvalidConfiguration): a launcher must skip empty work, not launch zero blocks
  if (nblocks == 0) fail("invalid configuration argument: a grid of zero blocks");
  Config& cfg = config();
  const int nworkers = (int)std::min<long long>(cfg.workers, nblocks);
  std::atomic<long long> next{0};
  std::mutex err_mu;
  std::string first_error;
  std::atomic<bool> stop{false};
  auto worker = [&](int wid) {
    StackPool pool;
    Block b;
    b.bdim = block;
    b.gdim = grid;
    b.body = &body;
    b.arena.assign(64 * 1024, 0);
    b.dyn.assign(smem_bytes, 0);
    std::mt19937 rng((unsigned)(cfg.seed * 7919u + (unsigned)wid));
    Block* prev_block = t_block;
    for (;;) {
      long long i = next.fetch_add(1);
      if (i >= nblocks || stop.load()) break;
      b.bid = uint3{(unsigned)(i % grid.x), (unsigned)((i / grid.x) % grid.y), (unsigned)(i / ((long long)grid.x * grid.y))};
      t_block = &b;
      try {
        run_block(b, pool, rng);
      } catch (const std::exception& e) {
        b.error = e.what();
      }
      t_block = prev_block;
      if (!b.error.empty()) {
        std::lock_guard<std::mutex> g(err_mu);
        if (first_error.empty()) first_error = b.error;
        stop = true;
        break;
      }
    }
  };
  if (nworkers <= 1) {
    worker(0);
  } else {
    std::vector<std::thread> ts;
    for (int w = 0; w < nworkers; ++w) ts.emplace_back(worker, w);
    for (auto& t : ts) t.join();
  }
  if (!first_error.empty()) throw std::runtime_error(first_error);
}

// emu::launch(kernel, grid, block, smem_bytes, args...): the host form of kernel<<<grid, block, smem>>>(args...).
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "emu::launch: wrong number of kernel arguments");
  std::tuple<std::decay_t<KArgs>...> packed(static_cast<std::decay_t<KArgs>>(args)...);
  std::function<void()> body = [kernel, &packed]() { std::apply(kernel, packed); };
  launch_body(grid, block, smem_bytes, body);
}

// ---- shared memory ------------------------------------------------------------------------------
inline void* shared_alloc(size_t bytes) {
  Fiber& f = self();
  Block& b = *t_block;
  size_t off = (f.smem_cursor + 15) & ~size_t(15);
  if (off + bytes > b.arena.size()) fail("FB_SHARED arrays exceed the emulated 64 KiB of static shared memory");
  f.smem_cursor = off + bytes;
  return b.arena.data() + off;
}
template <typename T>
inline T* shared_array(size_t count) { return static_cast<T*>(shared_alloc(sizeof(T) * count)); }
inline void* dynamic_shared() { self(); return t_block->dyn.data(); }

// ---- barriers and warp collectives --------------------------------------------------------------
inline void syncthreads() { yield_to_scheduler(St::WaitBlock); }
inline void syncwarp() { yield_to_scheduler(St::WaitWarp); }

// Every live lane publishes `v`, waits for the warp, and returns a pointer to the warp's 32 slots.
inline const uint64_t* warp_exchange(uint64_t v) {
  Fiber& f = self();
  uint64_t* slots = t_block->xchg.data() + ((size_t)f.warp * 2 + f.xchg_phase) * 32;
  f.xchg_phase ^= 1;  // double buffer: the next collective cannot overwrite slots still being read
  slots[f.lane] = v;
  syncwarp();
  return slots;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
inline int lane_id() { return self().lane; }

template <typename T>
inline T shfl_from(T v, int src_lane) {
  const uint64_t* s = warp_exchange(to_bits(v));
  return from_bits<T>(s[src_lane & 31]);
}

}  // namespace emu

#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::t_block->bid)
#define blockDim (::emu::t_block->bdim)
#define gridDim (::emu::t_block->gdim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
inline unsigned __activemask() { return 0xffffffffu; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Shuffles: `width` splits the warp into segments (a power of two <= 32), as in CUDA.
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  int lane = emu::lane_id();
  return emu::shfl_from(v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  int lane = emu::lane_id();
  int src = lane ^ mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return emu::shfl_from(v, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  int lane = emu::lane_id();
  int src = (lane % width) + (int)delta < width ? lane + (int)delta : lane;
  return emu::shfl_from(v, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  int lane = emu::lane_id();
  int src = (lane % width) >= (int)delta ? lane - (int)delta : lane;
  return emu::shfl_from(v, src);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  // Bits of lanes that exited are 0 (their slot still holds an old value, so mask by liveness).
  const uint64_t* s = emu::warp_exchange(pred ? 1u : 0u);
  unsigned bits = 0;
  const emu::Block& b = *emu::t_block;
  int base = emu::self().warp * 32;
  for (int l = 0; l < 32 && base + l < b.nthreads; ++l)
    if (b.fibers[base + l].st != emu::St::Done && s[l] == 1u) bits |= 1u << l;
  return bits;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) {
  const emu::Block& b = *emu::t_block;
  int base = emu::self().warp * 32;
  unsigned live = 0;
  for (int l = 0; l < 32 && base + l < b.nthreads; ++l)
    if (b.fibers[base + l].st != emu::St::Done) live |= 1u << l;
  return (__ballot_sync(m, pred) & live) == live;
}

// ---- atomics (blocks run concurrently on worker threads) ----------------------------------------
inline float atomicAdd(float* p, float v) {
  uint32_t* u = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(u, __ATOMIC_RELAXED), nw;
  do {
    float f;
    std::memcpy(&f, &old, 4);
    f += v;
    std::memcpy(&nw, &f, 4);
  } while (!__atomic_compare_exchange_n(u, &old, nw, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
  float r;
  std::memcpy(&r, &old, 4);
  return r;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

// ---- math intrinsics ----------------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
template <typename T>
inline T __ldg(const T* p) { return *p; }
// CUDA's global min/max overloads for device code.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

// ---- half and bfloat16 (cuda_fp16.h / cuda_bf16.h names) ----------------------------------------
// Storage types; arithmetic goes through float (as fastbert's kernels always do).
struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) { _Float16 h = (_Float16)f; std::memcpy(&__x, &h, 2); }  // round to nearest even
  operator float() const { _Float16 h; std::memcpy(&h, &__x, 2); return (float)h; }
};
struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      __x = (uint16_t)((u >> 16) | 0x40u);  // quiet NaN, sign kept
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
      __x = (uint16_t)(u >> 16);
    }
  }
  operator float() const { uint32_t u = (uint32_t)__x << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return (float)h; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline float2 __half22float2(__half2 h) { return float2{(float)h.x, (float)h.y}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{(float)h.x, (float)h.y}; }
inline float __low2float(__half2 h) { return (float)h.x; }
inline float __high2float(__half2 h) { return (float)h.y; }
inline float __low2float(__nv_bfloat162 h) { return (float)h.x; }
inline float __high2float(__nv_bfloat162 h) { return (float)h.y; }
