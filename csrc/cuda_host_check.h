// cuda_host_check.h: the checking build of the host emulation (FB_EMU_CHECK; included by cuda_host_emu.h).
// The CPU counterpart of compute-sanitizer's racecheck / initcheck / memcheck for fastbert's kernels.
//
// Every memory access of the translation unit is observed: the build uses g++'s
// -fsanitize=kernel-address with --param asan-instrumentation-with-call-threshold=0, which makes the
// compiler call __asan_{load,store}{1,2,4,8,16,N}_noabort(addr) before each load and store, and this
// file defines those functions (there is no sanitizer runtime). The kernel sources stay unchanged:
// accesses through any pointer derived from a shared array (casts to vector types, ldmatrix rows) are
// seen as well. Two global range tests filter the accesses that matter: the emulated shared memory
// (all workers' slots are one reservation) and the guard zones the Python side registered around
// the tensors of the current call (fbh_memcheck_set).
//
// Shared memory: a shadow cell per 2 bytes holds the last writer (thread, barrier epoch, the warp's
// sync count), the reads since then (epoch, the warps that read, for a single reading warp the lanes
// and its sync count, two reader threads and their source locations), whether the bytes were written
// in this block, whether a cp.async to them is in flight, and whether they belong to a declared array.
// Two accesses by different threads conflict unless a __syncthreads() lies between them (the block's
// barrier epoch moved on), or both threads are lanes of one warp and a memory-ordering warp
// collective (__syncwarp, shuffles, votes) lies between them. Reported, each as the first error of
// the launch (the kernel keeps running; the launch then fails with the report):
//   * read-after-write, write-after-read, write-after-write hazards (racecheck);
//   * a read of shared memory never written in this block (initcheck: shared memory is undefined at
//     block start);
//   * a read or write of a cp.async destination before the issuing thread's matching cp_async_wait;
//   * an access outside every declared shared array, or into a guard zone next to a tensor
//     (memcheck, reads included, by construction rather than by what the neighbouring bytes hold).
// A report names the kernel, the block, both threads (threadIdx, warp, lane), the shared array and
// the offset, and both source locations with their inline chain (addr2line on the return address
// of the hook, so the library is built with -g).
//
// Scheduling: at every shared-memory access the thread yields to the scheduler with probability 1/2
// (seeded by FASTBERT_EMU_SEED), and each scheduling round runs the ready threads in a fresh random
// order, so a missing barrier also changes results.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>

#include <cstdio>
#include <map>

namespace emu {
namespace check {

constexpr size_t kGran = 2;

// Where an access happened: the code address after the hook call, and its function's return address
// (the build keeps frame pointers), so a report shows the kernel line even when a helper was not inlined.
struct Loc {
  const void* pc;
  const void* caller;
};  // bytes per shadow cell (two threads writing the two bytes of one cell: a false report)

struct Cell {
  uint32_t w_epoch, w_wep;  // barrier epoch and the writer's warp sync count at the last write
  uint32_t r_epoch;         // barrier epoch the read fields describe (stale when != the block's)
  uint32_t r_warps;         // warps that read since the last write, in r_epoch
  uint32_t r_wep, r_lanes;  // while one warp reads: its sync count at the latest read, and the lanes
  uint16_t w_tid1;          // last writer + 1 (0: never written in this block)
  uint16_t r_tid1[2];       // first reader + 1, and a reader that is another thread (preferably another warp)
  uint8_t alloc, pending;   // part of a declared array; a cp.async into it is in flight (by w_tid1 - 1)
  Loc w_loc, r_loc[2];
};

// Guard zones of the current call: [lo, hi) ranges no kernel may touch, right before (after = false)
// or right after (after = true) the tensor `what` describes.
struct Guard {
  uintptr_t lo, hi;
  bool after;
  std::string what;
};
inline std::vector<Guard>& guards() {
  static std::vector<Guard> g;
  return g;
}

// One worker's shadow of its shared-memory slot.
struct Shadow {
  std::vector<Cell> cells;
  uintptr_t lo = 0;
};
inline thread_local Shadow t_shadow_storage;
inline thread_local Shadow* t_shadow = nullptr;

}  // namespace check
}  // namespace emu

// Envelopes for the hooks' fast path (plain globals: one comparison each, no TLS lookup).
__attribute__((visibility("hidden"))) inline uintptr_t fb_chk_smem_lo = 0;
__attribute__((visibility("hidden"))) inline uintptr_t fb_chk_smem_span = 0;
__attribute__((visibility("hidden"))) inline uintptr_t fb_chk_guard_lo = 0;
__attribute__((visibility("hidden"))) inline uintptr_t fb_chk_guard_span = 0;

namespace emu {
namespace check {

// ---- reports ------------------------------------------------------------------------------------
// "file:line (function) <- file:line (function) ..." for a code address: the inline chain, innermost first.
FB_EMU_UNCHECKED inline std::string where(const void* pc) {
  static std::mutex mu;
  static std::map<const void*, std::string> cache;
  std::lock_guard<std::mutex> g(mu);
  auto it = cache.find(pc);
  if (it != cache.end()) return it->second;
  std::string out;
  Dl_info info;
  if (pc && dladdr(pc, &info) && info.dli_fname) {
    char cmd[1200];
    const uintptr_t off = reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
    std::snprintf(cmd, sizeof cmd, "addr2line -C -f -i -e '%s' 0x%lx 2>/dev/null", info.dli_fname, (unsigned long)off);
    if (FILE* p = popen(cmd, "r")) {
      char fn[4096], loc[4096];
      int frames = 0;
      while (frames < 5 && std::fgets(fn, sizeof fn, p) && std::fgets(loc, sizeof loc, p)) {
        std::string f(fn), l(loc);
        f.erase(f.find_last_not_of("\n") + 1);
        l.erase(l.find_last_not_of("\n") + 1);
        if (l.find(" (discriminator") != std::string::npos) l.erase(l.find(" (discriminator"));
        const size_t slash = l.rfind('/');
        if (slash != std::string::npos) {
          const size_t prev = l.rfind('/', slash - 1);
          l = l.substr(prev == std::string::npos ? 0 : prev + 1);  // "csrc/flash_attn.cu:98"
        }
        // the launch machinery above the kernel (std::invoke, std::apply, emu::launch) is noise
        if (frames && (l.find("bits/") == 0 || f.find("std::") == 0 || f.find("emu::") == 0 ||
                       l.find("cuda_host_emu.h") != std::string::npos || l.find("tuple:") == 0))
          break;
        if (f.size() > 60) f = f.substr(0, f.find('(') < 60 ? f.find('(') : 60);
        out += (frames ? " <- " : "") + l + " (" + f + ")";
        ++frames;
      }
      pclose(p);
    }
  }
  if (out.empty()) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "pc %p", pc);
    out = buf;
  }
  cache[pc] = out;
  return out;
}

FB_EMU_UNCHECKED inline std::string kernel_name(const void* fn) {
  Dl_info info;
  if (fn && dladdr(fn, &info) && info.dli_sname) {
    int st = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &st);
    std::string s = st == 0 && d ? d : info.dli_sname;
    std::free(d);
    return s;
  }
  return where(static_cast<const char*>(fn) + 1);
}

inline std::string thread_str(const Block& b, int t) {
  const uint3 c{(unsigned)t % b.bdim.x, (unsigned)(t / b.bdim.x) % b.bdim.y, (unsigned)(t / (b.bdim.x * b.bdim.y))};
  return "thread (" + std::to_string(c.x) + "," + std::to_string(c.y) + "," + std::to_string(c.z) + ") [warp " +
         std::to_string(t / 32) + ", lane " + std::to_string(t % 32) + "]";
}

// "sK[+1234 bytes = element 617]" for a shared-memory byte offset.
inline std::string smem_str(const Block& b, size_t off) {
  for (const SharedDecl& d : b.decls) {
    if (off >= d.off && off < d.off + d.bytes) {
      const size_t rel = off - d.off;
      return std::string(d.name) + "[+" + std::to_string(rel) + " bytes = element " + std::to_string(rel / d.elem) + "]";
    }
  }
  return std::string(off >= kStaticSmem ? "dynamic" : "static") + " shared memory at offset " +
         std::to_string(off >= kStaticSmem ? off - kStaticSmem : off) + " (outside every declared array)";
}

FB_EMU_UNCHECKED inline void report(Block& b, const std::string& what) {
  if (b.hazards++ > 0) return;  // the first report of the launch is the one shown
  const std::string head = "cuda_host check: " + what;
  b.error = head + "\n  kernel " + kernel_name(b.kernel) + ", block (" + std::to_string(b.bid.x) + "," +
            std::to_string(b.bid.y) + "," + std::to_string(b.bid.z) + "), barrier interval " + std::to_string(b.bar_epoch);
}

// ---- shadow bookkeeping -------------------------------------------------------------------------
FB_EMU_UNCHECKED inline void begin_launch(Block& b) {
  t_shadow = &t_shadow_storage;
  t_shadow->lo = reinterpret_cast<uintptr_t>(b.smem);
  t_shadow->cells.assign((kStaticSmem + b.dyn_bytes) / kGran + 1, Cell{});
  SmemPool& p = smem_pool();
  fb_chk_smem_lo = reinterpret_cast<uintptr_t>(p.base);
  fb_chk_smem_span = kSmemSlot * kMaxWorkers;
}

FB_EMU_UNCHECKED inline void begin_block(Block& b) {
  Shadow& s = *t_shadow;
  const size_t st = (std::max(b.static_hwm, (size_t)16) + kGran - 1) / kGran;
  std::memset(static_cast<void*>(s.cells.data()), 0, st * sizeof(Cell));
  Cell* dyn = s.cells.data() + kStaticSmem / kGran;
  std::memset(static_cast<void*>(dyn), 0, (b.dyn_bytes / kGran + 1) * sizeof(Cell));
  for (size_t i = 0; i < (b.dyn_bytes + kGran - 1) / kGran; ++i) dyn[i].alloc = 1;
}

FB_EMU_UNCHECKED inline void declare(Block&, size_t off, size_t bytes) {
  Cell* c = t_shadow->cells.data();
  for (size_t i = off / kGran; i < (off + bytes + kGran - 1) / kGran; ++i) c[i].alloc = 1;
}

// Whether an earlier access by thread p (at barrier epoch e, its warp's sync count wep) happens
// before the current thread's access.
inline bool ordered(const Block& b, int a, int p, uint32_t e, uint32_t wep) {
  if (e != b.bar_epoch || a == p) return true;
  return a / 32 == p / 32 && wep != b.warp_epoch[a / 32];
}

inline std::string where(Loc l) {
  std::string inner = where(l.pc), outer = l.caller ? where(l.caller) : std::string();
  const bool noise = outer.empty() || outer.find("bits/") == 0 || outer.find("tuple:") == 0 ||
                     outer.find("cuda_host_emu.h") != std::string::npos || outer.find("(std::") != std::string::npos;
  return noise ? inner : inner + " <- " + outer;
}

inline std::string access_str(const Block& b, bool write, size_t off, int t, Loc loc) {
  return std::string(write ? "write of " : "read of ") + smem_str(b, off) + " by " + thread_str(b, t) + "\n    at " +
         where(loc);
}

FB_EMU_UNCHECKED inline void shared_access(Block& b, size_t off, size_t n, bool write, Loc loc) {
  Fiber& f = *t_fiber;
  if (b.rng && ((*b.rng)() & 1)) {  // a scheduling point: let other threads run first
    f.st = St::Ready;
    switch_to_scheduler(f);
  }
  if (b.hazards || !config().report) return;
  Cell* cells = t_shadow->cells.data();
  const int a = f.linear, wa = f.warp;
  const uint32_t E = b.bar_epoch, W = b.warp_epoch[wa];
  for (size_t i = off / kGran; i <= (off + n - 1) / kGran; ++i) {
    Cell& c = cells[i];
    const size_t coff = i * kGran;
    if (!c.alloc) {
      report(b, std::string("out-of-bounds shared-memory access\n  ") + access_str(b, write, coff, a, loc));
      return;
    }
    if (c.pending) {
      report(b, std::string(write ? "write to" : "read of") +
                    " a cp.async destination before the cp_async_wait that completes it\n  " +
                    access_str(b, write, coff, a, loc) + "\n  cp.async issued by " + thread_str(b, c.w_tid1 - 1) +
                    " at " + where(c.w_loc));
      return;
    }
    const int w = (int)c.w_tid1 - 1;
    if (!write) {
      if (w < 0) {
        report(b, "read of uninitialised shared memory (never written in this block)\n  " +
                      access_str(b, false, coff, a, loc));
        return;
      }
      if (!ordered(b, a, w, c.w_epoch, c.w_wep)) {
        report(b, "read-after-write hazard on shared memory (no barrier orders the two accesses)\n  " +
                      access_str(b, false, coff, a, loc) + "\n  " + access_str(b, true, coff, w, c.w_loc));
        return;
      }
      if (c.r_epoch != E) {
        c.r_epoch = E, c.r_warps = 0, c.r_lanes = 0, c.r_tid1[0] = c.r_tid1[1] = 0;
      }
      if (c.r_warps == 0u || c.r_warps == (1u << wa)) {  // one reading warp: track its lanes
        if (c.r_wep != W || c.r_warps == 0u) c.r_wep = W, c.r_lanes = 0;
        c.r_lanes |= 1u << f.lane;
      }
      c.r_warps |= 1u << wa;
      const int r0 = (int)c.r_tid1[0] - 1, r1 = (int)c.r_tid1[1] - 1;
      if (r0 < 0) {
        c.r_tid1[0] = (uint16_t)(a + 1), c.r_loc[0] = loc;
      } else if (a != r0 && (r1 < 0 || (r1 / 32 == r0 / 32 && wa != r0 / 32))) {
        c.r_tid1[1] = (uint16_t)(a + 1), c.r_loc[1] = loc;
      }
      continue;
    }
    if (w >= 0 && !ordered(b, a, w, c.w_epoch, c.w_wep)) {
      report(b, "write-after-write hazard on shared memory (no barrier orders the two accesses)\n  " +
                    access_str(b, true, coff, a, loc) + "\n  " + access_str(b, true, coff, w, c.w_loc));
      return;
    }
    if (c.r_epoch == E && c.r_warps) {
      bool race = (c.r_warps & ~(1u << wa)) != 0;
      if (!race) race = c.r_wep == W && (c.r_lanes & ~(1u << f.lane)) != 0;
      if (race) {
        std::string other;
        for (int k = 0; k < 2 && other.empty(); ++k) {
          const int r = (int)c.r_tid1[k] - 1;
          if (r >= 0 && r != a && !(r / 32 == wa && c.r_wep != W)) other = access_str(b, false, coff, r, c.r_loc[k]);
        }
        if (other.empty()) {  // a same-warp reader whose location was not kept
          const int lane = __builtin_ctz(c.r_lanes & ~(1u << f.lane));
          other = "read of the same bytes by " + thread_str(b, wa * 32 + lane);
        }
        report(b, "write-after-read hazard on shared memory (no barrier orders the two accesses)\n  " +
                      access_str(b, true, coff, a, loc) + "\n  " + other);
        return;
      }
    }
    c.w_tid1 = (uint16_t)(a + 1), c.w_epoch = E, c.w_wep = W, c.w_loc = loc;
    c.r_warps = 0, c.r_lanes = 0, c.r_tid1[0] = c.r_tid1[1] = 0;
  }
}

FB_EMU_UNCHECKED inline void guard_access(Block& b, uintptr_t addr, size_t n, bool write, Loc loc) {
  if (!config().report) return;
  for (const Guard& g : guards()) {
    if (addr + n > g.lo && addr < g.hi) {
      const size_t dist = g.after ? (addr > g.lo ? addr - g.lo : 0) : (addr < g.hi ? g.hi - addr : 0);
      report(b, std::string("out-of-bounds global ") + (write ? "write" : "read") + " of " + std::to_string(n) +
                    " bytes, " + std::to_string(dist) + (g.after ? " bytes past the end of " : " bytes before the start of ") +
                    g.what + "\n  by " + thread_str(b, t_fiber->linear) + " at " + where(loc));
      return;
    }
  }
}

FB_EMU_UNCHECKED inline void access(uintptr_t addr, size_t n, bool write, Loc loc) {
  Block* b = t_block;
  if (!t_fiber || !b || !t_shadow) return;  // the host side of a launch, or the scheduler
  const uintptr_t off = addr - t_shadow->lo;
  if (addr - fb_chk_smem_lo < fb_chk_smem_span) {
    if (off + n <= kStaticSmem + b->dyn_bytes) {
      shared_access(*b, off, n, write, loc);
    } else if (!b->hazards) {
      report(*b, std::string("access outside this block's shared memory\n  ") + (write ? "write" : "read") + " by " +
                     thread_str(*b, t_fiber->linear) + " at " + where(loc));
    }
    return;
  }
  guard_access(*b, addr, n, write, loc);
}

// A cp.async was issued: its 16 destination bytes are in flight until the matching wait.
FB_EMU_UNCHECKED inline void async_issue(const AsyncCopy& c) {
  const Loc at{c.where, nullptr};
  access(reinterpret_cast<uintptr_t>(c.dst), 16, true, at);  // ordered like a write by the issuer
  if (c.src_bytes > 0) access(reinterpret_cast<uintptr_t>(c.src), (size_t)c.src_bytes, false, at);
  Cell* cells = t_shadow->cells.data();
  const size_t off = reinterpret_cast<uintptr_t>(c.dst) - t_shadow->lo;
  for (size_t i = off / kGran; i < (off + 16) / kGran; ++i) cells[i].pending = 1;
}

// The copy landed (the issuing thread's wait): the bytes count as written by it now.
FB_EMU_UNCHECKED inline void async_land(const AsyncCopy& c) {
  Cell* cells = t_shadow->cells.data();
  const size_t off = reinterpret_cast<uintptr_t>(c.dst) - t_shadow->lo;
  const Block& b = *t_block;
  const Fiber& f = *t_fiber;
  for (size_t i = off / kGran; i < (off + 16) / kGran; ++i) {
    Cell& x = cells[i];
    x.pending = 0;
    x.w_tid1 = (uint16_t)(f.linear + 1), x.w_epoch = b.bar_epoch, x.w_wep = b.warp_epoch[f.warp];
    x.w_loc = Loc{c.where, nullptr};
    x.r_warps = 0, x.r_lanes = 0, x.r_tid1[0] = x.r_tid1[1] = 0;
  }
}

}  // namespace check
}  // namespace emu

// ---- the instrumentation hooks (called by -fsanitize=kernel-address code) ------------------------
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wframe-address"  // level 1 is safe: every function here keeps its frame pointer
#define FB_CHK_HOOK extern "C" __attribute__((visibility("hidden"), no_sanitize_address, used))
#define FB_CHK_HIT(a, n) \
  (__builtin_expect((a) - fb_chk_smem_lo < fb_chk_smem_span || (a) - fb_chk_guard_lo < fb_chk_guard_span, 0))
#define FB_CHK_LOC (::emu::check::Loc{__builtin_return_address(0), __builtin_return_address(1)})
#define FB_CHK_SIZED(n)                                                                              \
  FB_CHK_HOOK void __asan_load##n##_noabort(uintptr_t a) {                                           \
    if (FB_CHK_HIT(a, n)) ::emu::check::access(a, n, false, FB_CHK_LOC);            \
  }                                                                                                  \
  FB_CHK_HOOK void __asan_store##n##_noabort(uintptr_t a) {                                          \
    if (FB_CHK_HIT(a, n)) ::emu::check::access(a, n, true, FB_CHK_LOC);             \
  }
FB_CHK_SIZED(1)
FB_CHK_SIZED(2)
FB_CHK_SIZED(4)
FB_CHK_SIZED(8)
FB_CHK_SIZED(16)
FB_CHK_HOOK void __asan_loadN_noabort(uintptr_t a, size_t n) {
  if (FB_CHK_HIT(a, n)) ::emu::check::access(a, n, false, FB_CHK_LOC);
}
FB_CHK_HOOK void __asan_storeN_noabort(uintptr_t a, size_t n) {
  if (FB_CHK_HIT(a, n)) ::emu::check::access(a, n, true, FB_CHK_LOC);
}
FB_CHK_HOOK void __asan_handle_no_return() {}
#pragma GCC diagnostic pop
#undef FB_CHK_SIZED

namespace emu {
namespace check {
// Register the guard zones of the next calls: n ranges [lo_hi[2i], lo_hi[2i+1]), after[i], what[i].
inline void set_guards(const uint64_t* lo_hi, const int* after, const char* const* what, int n) {
  std::vector<Guard>& g = guards();
  g.clear();
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  for (int i = 0; i < n; ++i) {
    g.push_back(Guard{(uintptr_t)lo_hi[2 * i], (uintptr_t)lo_hi[2 * i + 1], after[i] != 0,
                      what[i] ? what[i] : "a tensor"});
    lo = std::min(lo, (uintptr_t)lo_hi[2 * i]);
    hi = std::max(hi, (uintptr_t)lo_hi[2 * i + 1]);
  }
  fb_chk_guard_lo = n ? lo : 0;
  fb_chk_guard_span = n ? hi - lo : 0;
}
}  // namespace check
}  // namespace emu
