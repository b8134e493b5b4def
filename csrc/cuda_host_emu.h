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
//    (common.cuh), which here hand out per-block storage from the worker's slot (64 KiB static, then
//    the dynamic bytes; all slots are one reservation); every thread of the block gets the same
//    pointers because the declarations run in the same order in every thread, and the names are kept
//    for reports. Plain `__shared__ T x[N];` also compiles (mapped to `static thread_local`) but is
//    invisible to the checks and not poisoned: use FB_SHARED. `extern __shared__`: use FB_DYNAMIC_SHARED.
//  * cp.async (csrc/cp_async.cuh): each thread queues its 16-byte copies; they land (zero-filled past
//    src_bytes) at its cp_async_wait<N>() for all but the N newest commit groups, or when it exits.
//  * Debug mode (FASTBERT_EMU_DEBUG=1): fibers start and resume in a freshly shuffled order at every
//    scheduling round (seed FASTBERT_EMU_SEED), and the shared memory and the warp exchange buffers
//    are filled with 0xFF bytes (NaN as float) before each block, so a missing barrier or a read of
//    never-written shared memory can show up as a wrong or NaN result.
//  * Checking build (-DFB_EMU_CHECK plus the hook flags of fastbert/cuda_host_backend.py FLAVORS):
//    cuda_host_check.h observes every memory access and reports shared-memory races, uninitialised
//    shared reads, out-of-bounds shared accesses, cp.async reads before the wait and touches of the
//    registered guard zones; threads switch at shared accesses (probability 1/2, seeded), rounds run in
//    shuffled order and one random warp lags in each barrier interval, so races change results too.
//    FASTBERT_EMU_REPORT=0 keeps that scheduling without the reports.
//  * ASan build (-DFB_EMU_ASAN with -fsanitize=address,undefined): fiber switches are announced to ASan.
//  * half / bfloat16: storage types with fp32 math and round-to-nearest-even conversions, under the
//    names of cuda_fp16.h / cuda_bf16.h that the kernels use.
// Errors (deadlock, an exception inside a kernel, a check's report) stop the launch and make emu::launch
// throw std::runtime_error; the extern "C" entry points turn that into an error string for Python.
// What no build here can show: the device-only inline PTX (mma.sync, ldmatrix, cp.async), real timing,
// and the hardware memory model outside shared memory (global-memory ordering between blocks).
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

#include "cuda_host_runtime.h"  // qualifiers, builtin types, runtime API stubs, intrinsics, half / bfloat16

// ------------------------------------------------------------------------------------------------
// the scheduler
// ------------------------------------------------------------------------------------------------
// Emulator internals that touch no kernel memory are left out of the sanitizer / checking
// instrumentation (cheaper, and the checks are about the kernels' accesses, not ours).
#define FB_EMU_UNCHECKED __attribute__((no_sanitize_address, no_sanitize_undefined))

#ifdef FB_EMU_ASAN  // the AddressSanitizer build: tell ASan which stack each fiber runs on
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#endif

namespace emu {

enum class St : uint8_t { Ready, WaitBlock, WaitWarp, Done };

constexpr size_t kStaticSmem = 64 * 1024;   // FB_SHARED arrays of one block
constexpr size_t kMaxDynSmem = 227 * 1024;  // sm_90's opt-in maximum of dynamic shared memory
constexpr size_t kSmemSlot = 320 * 1024;    // one worker's shared memory: static, then dynamic
constexpr int kMaxWorkers = 64;

// One 16-byte cp.async in flight (cp_async_16): lands in shared memory at the thread's matching wait.
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  int src_bytes;  // bytes read from src; the rest of the 16 are zero-filled
  int group;      // commit group (the thread's count of cp_async_commit() calls when it was issued)
  const void* where;
};

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0, warp = 0, lane = 0;
  St st = St::Ready;
  bool warp_orders = false;  // the warp collective it waits at orders memory (false: mma / ldmatrix)
  size_t smem_cursor = 0;    // next FB_SHARED offset for this thread
  int xchg_phase = 0;        // which half of the warp exchange buffer the next collective uses
  int async_group = 0;       // cp.async commit groups opened so far
  std::vector<AsyncCopy> async;
  void* stack = nullptr;
#ifdef FB_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

// A FB_SHARED / FB_DYNAMIC_SHARED declaration, for reports.
struct SharedDecl {
  size_t off, bytes, elem;
  const char* name;
};

struct Block {
  dim3 bdim, gdim;
  uint3 bid;
  int nthreads = 0, nwarps = 0;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  unsigned char* smem = nullptr;  // [kStaticSmem of FB_SHARED arrays][dynamic shared memory]
  size_t dyn_bytes = 0;
  size_t static_hwm = 0;          // highest FB_SHARED offset handed out in this launch
  std::vector<SharedDecl> decls;  // this block's declarations, in order
  std::vector<uint64_t> xchg;     // [nwarps][2][32] warp exchange slots
  uint32_t bar_epoch = 1;                // __syncthreads() released so far (+1)
  std::vector<uint32_t> warp_epoch;      // per warp: memory-ordering warp barriers released so far (+1)
  const std::function<void()>* body = nullptr;
  const void* kernel = nullptr;
  std::mt19937* rng = nullptr;
  std::string error;
  long long hazards = 0;
  const void* sched_stack = nullptr;  // the scheduler's stack, for the ASan fiber annotations
  size_t sched_stack_size = 0;
  unsigned char* dyn() const { return smem + kStaticSmem; }
};

struct Config {
  bool debug = false;
  bool report = true;  // checking build: report hazards (0: only the interleaved scheduling)
  unsigned long seed = 12345;
  int workers = 1;
};

inline void read_env(Config& k) {
  const char* d = std::getenv("FASTBERT_EMU_DEBUG");
  k.debug = d && *d && std::strcmp(d, "0") != 0;
  const char* r = std::getenv("FASTBERT_EMU_REPORT");
  k.report = !(r && std::strcmp(r, "0") == 0);
  k.seed = 12345;
  if (const char* s = std::getenv("FASTBERT_EMU_SEED")) k.seed = std::strtoul(s, nullptr, 10);
  if (const char* w = std::getenv("FASTBERT_EMU_WORKERS")) k.workers = std::max(1, std::atoi(w));
}

inline Config& config() {
  static Config c = [] {
    Config k;
    unsigned hw = std::thread::hardware_concurrency();
    k.workers = (int)std::max(1u, std::min(4u, hw ? hw : 1u));
    read_env(k);
    return k;
  }();
  return c;
}

// Re-read the environment (the Python side calls this after changing FASTBERT_EMU_* variables).
inline void reload_config() { read_env(config()); }

#ifdef FB_EMU_CHECK
constexpr bool kCheck = true;
#else
constexpr bool kCheck = false;
#endif

// Threads start in a shuffled order every scheduling round and shared memory starts poisoned.
inline bool shuffled() { return kCheck || config().debug; }

inline thread_local Block* t_block = nullptr;
inline thread_local Fiber* t_fiber = nullptr;

[[noreturn]] inline void fail(const std::string& msg) { throw std::runtime_error("cuda_host emulation: " + msg); }

inline Fiber& self() {
  if (!t_fiber) fail("a device function was called outside a kernel launch");
  return *t_fiber;
}

// ---- shared memory slots: one per worker, all inside one reservation so the checking build can tell
// a shared-memory address from any other with one comparison.
struct SmemPool {
  unsigned char* base = nullptr;
  std::atomic<uint64_t> used{0};
  SmemPool() {
    void* p = mmap(nullptr, kSmemSlot * kMaxWorkers, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    base = p == MAP_FAILED ? nullptr : static_cast<unsigned char*>(p);
  }
  int acquire() {
    for (;;) {
      uint64_t u = used.load();
      if (~u == 0) fail("more than 64 concurrent emulated blocks");
      int i = __builtin_ctzll(~u);
      if (used.compare_exchange_weak(u, u | (1ull << i))) return i;
    }
  }
  void release(int i) { used.fetch_and(~(1ull << i)); }
};
inline SmemPool& smem_pool() {
  static SmemPool p;
  if (!p.base) fail("could not reserve the emulated shared memory");
  return p;
}

FB_EMU_UNCHECKED inline void switch_to_scheduler(Fiber& f);

}  // namespace emu

#ifdef FB_EMU_CHECK
#include "cuda_host_check.h"
#else
namespace emu::check {  // the fast build: no shadow state
inline void begin_launch(Block&) {}
inline void begin_block(Block&) {}
inline void declare(Block&, size_t, size_t) {}
inline void async_issue(const AsyncCopy&) {}
inline void async_land(const AsyncCopy&) {}
}  // namespace emu::check
#endif

namespace emu {

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

// ---- fiber switches ------------------------------------------------------------------------------
FB_EMU_UNCHECKED inline void switch_to_fiber(Block& b, Fiber& f) {
#ifdef FB_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, StackPool::kStack);
  swapcontext(&b.sched, &f.ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(&b.sched, &f.ctx);
#endif
}

FB_EMU_UNCHECKED inline void switch_to_scheduler(Fiber& f) {
#ifdef FB_EMU_ASAN
  __sanitizer_start_switch_fiber(&f.fake_stack, t_block->sched_stack, t_block->sched_stack_size);
  swapcontext(&f.ctx, &t_block->sched);
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#else
  swapcontext(&f.ctx, &t_block->sched);
#endif
}

inline void yield_to_scheduler(St why, bool orders = true) {
  Fiber& f = self();
  f.st = why;
  f.warp_orders = orders;
  switch_to_scheduler(f);
}

// ---- cp.async (sm_80): 16-byte copies global -> shared that land at the issuing thread's matching
// cp_async_wait<N>() (or when it exits), never earlier: a read before the wait sees the old contents.
FB_EMU_UNCHECKED inline void async_land_group(Fiber& f, int below_group) {
  size_t keep = 0;
  for (size_t i = 0; i < f.async.size(); ++i) {
    const AsyncCopy& c = f.async[i];
    if (c.group < below_group) {
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, (size_t)c.src_bytes);
      if (c.src_bytes < 16) std::memset(c.dst + c.src_bytes, 0, (size_t)(16 - c.src_bytes));
      check::async_land(c);
    } else {
      f.async[keep++] = c;
    }
  }
  f.async.resize(keep);
}

FB_EMU_UNCHECKED inline void cp_async_16(void* dst, const void* src, int src_bytes, const void* where) {
  Fiber& f = self();
  const Block& b = *t_block;
  unsigned char* d = static_cast<unsigned char*>(dst);
  const bool in_static = d >= b.smem && d + 16 <= b.smem + b.static_hwm;
  const bool in_dyn = d >= b.dyn() && d + 16 <= b.dyn() + b.dyn_bytes;
  if (!in_static && !in_dyn) fail("cp_async_16: the destination is not inside the block's shared memory");
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16 != 0)
    fail("cp_async_16: source and destination must be 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) fail("cp_async_16: src_bytes must be in [0, 16]");
  f.async.push_back(AsyncCopy{d, static_cast<const unsigned char*>(src), src_bytes, f.async_group, where});
  check::async_issue(f.async.back());
}
inline void cp_async_commit() { ++self().async_group; }
// Wait until at most `pending` of this thread's committed groups are still in flight.
inline void cp_async_wait(int pending) {
  Fiber& f = self();
  async_land_group(f, f.async_group - pending);
}

FB_EMU_UNCHECKED inline void fiber_main() {
  Block* b = t_block;
#ifdef FB_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b->sched_stack, &b->sched_stack_size);
#endif
  try {
    (*b->body)();
    async_land_group(*t_fiber, INT32_MAX);  // copies still in flight land after the thread exits
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  } catch (...) {
    if (b->error.empty()) b->error = "unknown exception in kernel";
  }
  t_fiber->st = St::Done;
#ifdef FB_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, b->sched_stack, b->sched_stack_size);
#endif
  // returning resumes uc_link = the scheduler
}


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

FB_EMU_UNCHECKED inline void run_block(Block& b, StackPool& pool, std::mt19937& rng) {
  b.nthreads = (int)(b.bdim.x * b.bdim.y * b.bdim.z);
  b.nwarps = (b.nthreads + 31) / 32;
  b.fibers.assign(b.nthreads, Fiber{});
  b.xchg.assign((size_t)b.nwarps * 64, 0);
  b.error.clear();
  b.decls.clear();
  b.bar_epoch = 1;
  b.warp_epoch.assign(b.nwarps, 1);
  b.rng = &rng;
  if (shuffled()) {  // shared memory is undefined at block start: make stale values visible
    std::memset(b.smem, 0xFF, kStaticSmem);
    std::memset(b.dyn(), 0xFF, b.dyn_bytes);
    std::fill(b.xchg.begin(), b.xchg.end(), ~uint64_t(0));
  }
  check::begin_block(b);
  for (int i = 0; i < b.nthreads; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = uint3{(unsigned)i % b.bdim.x, (unsigned)(i / b.bdim.x) % b.bdim.y, (unsigned)(i / (b.bdim.x * b.bdim.y))};
    f.warp = i / 32;
    f.lane = i % 32;
    f.stack = pool.get(i);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = StackPool::kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, (void (*)())fiber_main, 0);
#ifdef FB_EMU_ASAN
    // A fiber abandoned by an error may leave poisoned frames behind: start clean. Then hide the stack
    // from ASan's swapcontext interceptor, which would otherwise clear its whole shadow at every switch
    // (the switch annotations already tell ASan where each fiber's stack is).
    __asan_unpoison_memory_region(f.stack, StackPool::kStack);
    f.ctx.uc_stack.ss_sp = nullptr;
    f.ctx.uc_stack.ss_size = 0;
#endif
  }
  std::vector<int> order(b.nthreads);
  for (int i = 0; i < b.nthreads; ++i) order[i] = i;
  // Checking build: in every barrier interval one random warp lags (runs only when no other thread
  // can), so a thread reading what another warp writes in the same interval really sees stale data.
  auto pick_laggard = [&] { return kCheck && b.nwarps > 1 ? (int)(rng() % (unsigned)b.nwarps) : -1; };
  int laggard = pick_laggard();
  for (;;) {
    if (shuffled()) std::shuffle(order.begin(), order.end(), rng);
    bool others_ready = false;
    if (laggard >= 0)
      for (const Fiber& f : b.fibers) others_ready |= f.st == St::Ready && f.warp != laggard;
    for (int i : order) {
      Fiber& f = b.fibers[i];
      if (f.st != St::Ready || (others_ready && f.warp == laggard)) continue;
      t_fiber = &f;
      switch_to_fiber(b, f);
      t_fiber = nullptr;
      if (!b.error.empty()) return;  // abandon the other fibers: their stacks are simply reused
    }
    // Release barriers whose every live participant has arrived. A thread the checking build
    // preempted at a shared-memory access is still Ready and runs in the next round.
    bool released = false, all_done = true, all_block = true, any_ready = false;
    for (int w = 0; w < b.nwarps; ++w) {
      int lo = w * 32, hi = std::min(b.nthreads, lo + 32);
      bool any_warp = false, full = true, orders = false;
      for (int t = lo; t < hi; ++t) {
        const Fiber& f = b.fibers[t];
        if (f.st != St::Done) all_done = false;
        if (f.st == St::Ready) any_ready = true;
        if (f.st == St::WaitWarp) any_warp = true, orders |= f.warp_orders;
        else if (f.st != St::Done) full = false;
        if (f.st != St::Done && f.st != St::WaitBlock) all_block = false;
      }
      if (any_warp && full) {
        for (int t = lo; t < hi; ++t)
          if (b.fibers[t].st == St::WaitWarp) b.fibers[t].st = St::Ready;
        if (orders) ++b.warp_epoch[w];
        released = true;
      }
    }
    if (all_done) return;
    if (released || any_ready) continue;
    if (all_block) {
      for (Fiber& f : b.fibers)
        if (f.st == St::WaitBlock) f.st = St::Ready;
      ++b.bar_epoch;
      laggard = pick_laggard();
      continue;
    }
    b.error = "deadlock in block (" + std::to_string(b.bid.x) + "," + std::to_string(b.bid.y) + "," +
              std::to_string(b.bid.z) + "): " + state_summary(b) +
              " (divergent barrier: live threads wait at different barriers)";
    return;
  }
}

// Run body() as a kernel over grid x block.
inline void launch_body(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body,
                        const void* kernel) {
  const long long nblocks = (long long)grid.x * grid.y * grid.z;
  const long long nthreads = (long long)block.x * block.y * block.z;
  if (nthreads < 1 || nthreads > 1024) fail("invalid block size " + std::to_string(nthreads));
  if (block.z > 64 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) fail("invalid launch dimensions");
  if (smem_bytes > kMaxDynSmem) fail("dynamic shared memory of " + std::to_string(smem_bytes) + " bytes exceeds 227 KiB");
  // as on a GPU (cudaErrorInvalidConfiguration): a launcher must skip empty work, not launch zero blocks
  if (nblocks == 0) fail("invalid configuration argument: a grid of zero blocks");
  Config& cfg = config();
  const int nworkers = (int)std::min<long long>(cfg.workers, nblocks);
  std::atomic<long long> next{0};
  std::mutex err_mu;
  std::string first_error;
  long long hazards = 0;
  std::atomic<bool> stop{false};
  auto worker = [&](int wid) {
    StackPool pool;
    Block b;
    b.bdim = block;
    b.gdim = grid;
    b.body = &body;
    b.kernel = kernel;
    const int slot = smem_pool().acquire();
    b.smem = smem_pool().base + (size_t)slot * kSmemSlot;
    b.dyn_bytes = smem_bytes;
    std::memset(b.smem, 0, kStaticSmem + smem_bytes);
    std::mt19937 rng((unsigned)(cfg.seed * 7919u + (unsigned)wid));
    Block* prev_block = t_block;
    t_block = &b;
    check::begin_launch(b);
    for (;;) {
      long long i = next.fetch_add(1);
      if (i >= nblocks || stop.load()) break;
      b.bid = uint3{(unsigned)(i % grid.x), (unsigned)((i / grid.x) % grid.y), (unsigned)(i / ((long long)grid.x * grid.y))};
      try {
        run_block(b, pool, rng);
      } catch (const std::exception& e) {
        b.error = e.what();
      }
      if (!b.error.empty()) {
        std::lock_guard<std::mutex> g(err_mu);
        if (first_error.empty()) first_error = b.error;
        hazards += b.hazards;
        stop = true;
        break;
      }
    }
    t_block = prev_block;
    smem_pool().release(slot);
  };
  if (nworkers <= 1) {
    worker(0);
  } else {
    std::vector<std::thread> ts;
    for (int w = 0; w < nworkers; ++w) ts.emplace_back(worker, w);
    for (auto& t : ts) t.join();
  }
  if (!first_error.empty()) {
    if (hazards > 1) first_error += "\n(" + std::to_string(hazards - 1) + " more reports in this launch not shown)";
    throw std::runtime_error(first_error);
  }
}

// emu::launch(kernel, grid, block, smem_bytes, args...): the host form of kernel<<<grid, block, smem>>>(args...).
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "emu::launch: wrong number of kernel arguments");
  std::tuple<std::decay_t<KArgs>...> packed(static_cast<std::decay_t<KArgs>>(args)...);
  std::function<void()> body = [kernel, &packed]() { std::apply(kernel, packed); };
  launch_body(grid, block, smem_bytes, body, reinterpret_cast<const void*>(kernel));
}

// ---- shared memory ------------------------------------------------------------------------------
// Every thread runs the same FB_SHARED declarations in the same order, so each gets the same offsets.
inline void* shared_alloc(size_t bytes, size_t elem, const char* name) {
  Fiber& f = self();
  Block& b = *t_block;
  size_t off = (f.smem_cursor + 15) & ~size_t(15);
  if (off + bytes > kStaticSmem) fail("FB_SHARED arrays exceed the emulated 64 KiB of static shared memory");
  f.smem_cursor = off + bytes;
  if (f.smem_cursor > b.static_hwm) b.static_hwm = f.smem_cursor;
  if (std::none_of(b.decls.begin(), b.decls.end(), [&](const SharedDecl& d) { return d.off == off; })) {
    b.decls.push_back(SharedDecl{off, bytes, elem, name});
    check::declare(b, off, bytes);
  }
  return b.smem + off;
}
template <typename T>
inline T* shared_array(size_t count, const char* name) {
  return static_cast<T*>(shared_alloc(sizeof(T) * count, sizeof(T), name));
}
inline void* dynamic_shared(size_t elem, const char* name) {
  self();
  Block& b = *t_block;
  if (std::none_of(b.decls.begin(), b.decls.end(), [&](const SharedDecl& d) { return d.off == kStaticSmem; }))
    b.decls.push_back(SharedDecl{kStaticSmem, b.dyn_bytes, elem, name});
  return b.dyn();
}

// ---- barriers and warp collectives --------------------------------------------------------------
inline void syncthreads() { yield_to_scheduler(St::WaitBlock); }
inline void syncwarp() { yield_to_scheduler(St::WaitWarp); }

// Every live lane publishes `v`, waits for the warp, and returns a pointer to the warp's 32 slots.
// `orders`: whether the collective orders the lanes' memory accesses for the race check (shuffles,
// votes, __syncwarp: yes; the emulation's own exchanges inside mma / ldmatrix: no).
FB_EMU_UNCHECKED inline const uint64_t* warp_exchange(uint64_t v, bool orders = true) {
  Fiber& f = self();
  uint64_t* slots = t_block->xchg.data() + ((size_t)f.warp * 2 + f.xchg_phase) * 32;
  f.xchg_phase ^= 1;  // double buffer: the next collective cannot overwrite slots still being read
  slots[f.lane] = v;
  yield_to_scheduler(St::WaitWarp, orders);
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

