// simt.cpp: the emulator's scheduler (see simt.h). CUDA threads are fibers on mmap'd
// stacks with a guard page; an x86-64 context switch saves the callee-saved registers
// only (~50 ns; glibc's swapcontext makes a signal-mask syscall, ~600 ns). Under
// AddressSanitizer every switch is announced with __sanitizer_{start,finish}_switch_fiber.
#include "simt.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#define SIMT_NO_ASAN __attribute__((no_sanitize_address))
#else
#define SIMT_ASAN 0
#define SIMT_NO_ASAN
#endif

#if !defined(__x86_64__)
#error "simt.cpp: the fiber switch is written for x86-64"
#endif

// switch_stack(&save, next): pushes the callee-saved registers, stores the stack pointer
// in *save, loads `next` and pops the registers saved there; `ret` resumes that fiber.
extern "C" void simt_switch_stack(void** save, void* next);
asm(R"(
.text
.globl simt_switch_stack
.type simt_switch_stack,@function
simt_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size simt_switch_stack, .-simt_switch_stack
.section .note.GNU-stack,"",@progbits
.text
)");

namespace simt {
namespace {

constexpr size_t kStackBytes = (SIMT_ASAN ? 512 : 128) * 1024;  // ASan frames are larger
constexpr size_t kTopBytes = 16 * 1024;

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  ThreadInfo info;
  State state = State::Ready;
  void* sp = nullptr;          // saved stack pointer while switched out
  char* stack = nullptr;       // lowest usable byte (above the guard page)
  void* fake_stack = nullptr;  // ASan's fake-stack handle while switched out
};

struct Warp {
  unsigned mask = 0;       // mask of the pending barrier (0: none pending)
  unsigned arrived = 0;    // lanes of it that have arrived
  unsigned episode = 0;    // completed barriers: the data bank in use is episode % 2
  size_t size = 0;         // bytes per lane in the pending exchange
  alignas(16) unsigned char bank[2][warpSize][kLaneBytes];
};

struct Launch {
  const char* name;
  dim3 grid, block;
  uint3 block_idx;
  const std::function<void()>* body;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned at_block_barrier = 0, done = 0;
  Fiber* running = nullptr;
  void* scheduler_sp = nullptr;
  const void* scheduler_stack_bottom = nullptr;  // the scheduler's stack, for ASan
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;
  std::vector<unsigned> ready;  // fibers that can run (from ready_head on, with seed 0)
  size_t ready_head = 0;
  std::unique_ptr<unsigned char[]> dynamic_shared;
  std::string error;  // set by a fiber that found a broken primitive
};

thread_local Launch* g_launch = nullptr;

// Stacks are kept across launches (mmap is slow); each has a PROT_NONE guard page below it.
thread_local std::vector<char*> g_stack_pool;

char* take_stack() {
  if (!g_stack_pool.empty()) {
    char* s = g_stack_pool.back();
    g_stack_pool.pop_back();
    return s;
  }
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
  mprotect(p, page, PROT_NONE);
  return static_cast<char*>(p) + page;
}

void give_stack(char* s) {
#if SIMT_ASAN
  // A finished fiber's frames have all returned (unpoisoning their redzones) except
  // fiber_main's, at the top of the stack: clear what it may have left there.
  __asan_unpoison_memory_region(s + kStackBytes - kTopBytes, kTopBytes);
#endif
  g_stack_pool.push_back(s);
}

// Fiber -> scheduler. `final` when the fiber will never run again (ASan drops its fake stack).
void to_scheduler(Fiber& f, bool final) {
  Launch& L = *g_launch;
#if SIMT_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &f.fake_stack, L.scheduler_stack_bottom, L.scheduler_stack_size);
#else
  (void)final;
#endif
  simt_switch_stack(&f.sp, L.scheduler_sp);
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

[[noreturn]] void fiber_main() {
  Launch& L = *g_launch;
  Fiber& f = *L.running;
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &L.scheduler_stack_bottom, &L.scheduler_stack_size);
#endif
  (*L.body)();
  f.state = State::Done;
  ++L.done;
  to_scheduler(f, /*final=*/true);
  __builtin_unreachable();
}

// A new fiber's stack: six zero registers for simt_switch_stack to pop, then fiber_main
// as the return address (and a dummy slot, so fiber_main starts with rsp = 8 mod 16).
void prepare_fiber(Fiber& f) {
  auto top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
  auto* slots = reinterpret_cast<void**>(top) - 8;
  for (int i = 0; i < 6; ++i) slots[i] = nullptr;
  slots[6] = reinterpret_cast<void*>(&fiber_main);
  slots[7] = nullptr;
  f.sp = slots;
}

// Scheduler -> fiber f, until it blocks or finishes.
void run_fiber(Launch& L, Fiber& f) {
  L.running = &f;
#if SIMT_ASAN
  __sanitizer_start_switch_fiber(&L.scheduler_fake_stack, f.stack, kStackBytes);
#endif
  simt_switch_stack(&L.scheduler_sp, f.sp);
#if SIMT_ASAN
  __sanitizer_finish_switch_fiber(L.scheduler_fake_stack, nullptr, nullptr);
#endif
  L.running = nullptr;
}

uint64_t seed_from_env() {
  const char* s = std::getenv("TRIPLETOPS_EMU_SEED");
  return s ? std::strtoull(s, nullptr, 10) : 1;
}

// Kernel names launched in this process, appended to $TRIPLETOPS_EMU_LAUNCH_LOG once each,
// and to $TRIPLETOPS_EMU_LAUNCH_TRACE at every launch (tools/count_launches.py).
// `name` is the launch expression, e.g. "(mine_kernel<float>)": the identifier is logged.
void log_launch(const char* expression) {
  static std::mutex mu;
  static std::set<std::string> seen;
  std::string name;
  for (const char* c = expression; *c && *c != '<'; ++c)
    if (std::isalnum(static_cast<unsigned char>(*c)) || *c == '_' || *c == ':') name += *c;
  std::lock_guard<std::mutex> lock(mu);
  if (const char* trace = std::getenv("TRIPLETOPS_EMU_LAUNCH_TRACE")) {
    if (FILE* f = std::fopen(trace, "a")) {
      std::fprintf(f, "%s\n", name.c_str());
      std::fclose(f);
    }
  }
  if (!seen.insert(name).second) return;
  if (const char* path = std::getenv("TRIPLETOPS_EMU_LAUNCH_LOG")) {
    if (FILE* f = std::fopen(path, "a")) {
      std::fprintf(f, "%s\n", name.c_str());
      std::fclose(f);
    }
  }
}

void make_ready(Launch& L, unsigned t) {
  L.fibers[t].state = State::Ready;
  L.ready.push_back(t);
}

// The next fiber to run: a random ready one (seeded), or the longest-waiting with seed 0.
unsigned next_ready(Launch& L, uint64_t& rng) {
  if (rng == 0) {
    const unsigned t = L.ready[L.ready_head++];
    if (L.ready_head == L.ready.size()) L.ready.clear(), L.ready_head = 0;
    return t;
  }
  rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;  // xorshift64
  const size_t k = rng % L.ready.size();
  const unsigned t = L.ready[k];
  L.ready[k] = L.ready.back();
  L.ready.pop_back();
  return t;
}

void run_block(Launch& L, uint64_t& rng) {
  const unsigned n = L.block.x * L.block.y * L.block.z;
  L.at_block_barrier = L.done = 0;
  L.error.clear();
  L.ready.clear();
  L.ready_head = 0;
  for (auto& w : L.warps) w = Warp();
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = L.fibers[t];
    f.info.linear = t;
    f.info.tid = {t % L.block.x, (t / L.block.x) % L.block.y, t / (L.block.x * L.block.y)};
    f.fake_stack = nullptr;
    prepare_fiber(f);
    make_ready(L, t);
  }
  while (L.done < n) {
    if (L.ready.size() == L.ready_head) {
      throw std::runtime_error(std::string("simt: kernel ") + L.name +
                               ": deadlock (threads wait at a barrier that the others never reach, or that "
                               "names exited lanes)");
    }
    run_fiber(L, L.fibers[next_ready(L, rng)]);
    if (!L.error.empty()) throw std::runtime_error(std::string("simt: kernel ") + L.name + ": " + L.error);
    // A block barrier opens once every thread that has not exited is waiting at it.
    if (L.at_block_barrier > 0 && L.at_block_barrier + L.done == n) {
      L.at_block_barrier = 0;
      for (unsigned t = 0; t < n; ++t)
        if (L.fibers[t].state == State::AtBlockBarrier) make_ready(L, t);
    }
  }
}

}  // namespace

ThreadInfo& self() { return g_launch->running->info; }
const uint3& block_idx() { return g_launch->block_idx; }
const dim3& block_dim() { return g_launch->block; }
const dim3& grid_dim() { return g_launch->grid; }
void* dynamic_shared() { return g_launch->dynamic_shared.get(); }

void fail(const char* what) {
  Launch& L = *g_launch;
  L.error = what;
  Fiber& f = *L.running;
  f.state = State::Done;  // never resumed: the scheduler throws
  to_scheduler(f, /*final=*/false);
  __builtin_unreachable();
}

void sync_block() {
  Launch& L = *g_launch;
  Fiber& f = *L.running;
  f.state = State::AtBlockBarrier;
  ++L.at_block_barrier;
  to_scheduler(f, false);
}

// Not instrumented: the emulator's own bookkeeping, on every shuffle (the kernels' accesses stay checked).
SIMT_NO_ASAN const unsigned char* warp_exchange(unsigned mask, const void* in, size_t size) {
  Launch& L = *g_launch;
  Fiber& f = *L.running;
  const unsigned lane = f.info.linear % warpSize;
  const unsigned warp_base = f.info.linear - lane;
  Warp& w = L.warps[f.info.linear / warpSize];
  if (size > kLaneBytes) fail("warp primitive on a value wider than kLaneBytes");
  if (!(mask >> lane & 1u)) fail("a warp primitive's mask does not include the calling lane");
  if (w.arrived == 0) {  // the first lane to arrive checks the mask for the others
    const unsigned n = L.block.x * L.block.y * L.block.z;
    for (unsigned l = 0; l < warpSize; ++l) {
      if (!(mask >> l & 1u)) continue;
      if (warp_base + l >= n) fail("a warp primitive's mask names a lane beyond blockDim");
      if (L.fibers[warp_base + l].state == State::Done) fail("a warp primitive's mask names a lane that has exited");
    }
    w.mask = mask;
    w.size = size;
  } else if (w.mask != mask || w.size != size) {
    fail("lanes of one warp reached different warp primitives (masks or value sizes differ)");
  }
  const unsigned bank = w.episode % 2;
  for (size_t b = 0; b < size; ++b) w.bank[bank][lane][b] = static_cast<const unsigned char*>(in)[b];
  w.arrived |= 1u << lane;
  if (w.arrived == mask) {  // the last lane to arrive opens the barrier for the others
    w.arrived = 0;
    ++w.episode;
    for (unsigned l = 0; l < warpSize; ++l)
      if ((mask >> l & 1u) && l != lane) make_ready(L, warp_base + l);
  } else {
    f.state = State::AtWarpBarrier;
    to_scheduler(f, false);  // a lane that exits meanwhile leaves us here: the scheduler reports the deadlock
  }
  // The next exchange writes the other bank, and cannot complete before every lane has
  // read this one: it stays valid without a second barrier.
  return &w.bank[bank][0][0];
}

void launch(const char* name, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024) throw std::runtime_error(std::string("simt: ") + name + ": blockDim out of range");
  if (block.z > 64) throw std::runtime_error(std::string("simt: ") + name + ": blockDim.z > 64");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error(std::string("simt: ") + name + ": gridDim out of range");
  if (shared_bytes > 48 * 1024)
    throw std::runtime_error(std::string("simt: ") + name + ": more than 48 KiB of dynamic shared memory");
  if (g_launch != nullptr) throw std::runtime_error("simt: a kernel launched another kernel");
  log_launch(name);
  Launch L;
  L.name = name;
  L.grid = grid;
  L.block = block;
  L.body = &body;
  L.fibers.resize(threads);
  L.warps.resize((threads + warpSize - 1) / warpSize);
  uint64_t rng = seed_from_env();
  for (auto& f : L.fibers) f.stack = take_stack();
  g_launch = &L;
  try {
    // Blocks run one at a time, in a seeded random order (in order with seed 0): a kernel
    // that assumes an order among its blocks fails.
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    std::vector<uint64_t> order(blocks);
    for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
    for (uint64_t b = blocks; rng && b > 1; --b) {
      rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
      std::swap(order[b - 1], order[rng % b]);
    }
    for (uint64_t b : order) {
      L.block_idx = {unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
      // Fresh dynamic shared memory for each block, exactly as large as requested, and
      // filled with a NaN-ish pattern: a read before a write shows.
      L.dynamic_shared.reset(shared_bytes ? new unsigned char[shared_bytes] : nullptr);
      if (shared_bytes) std::memset(L.dynamic_shared.get(), 0xff, shared_bytes);
      run_block(L, rng);
    }
  } catch (...) {
    // Fibers left mid-kernel are abandoned with their stacks (the stacks are not reused).
    g_launch = nullptr;
    throw;
  }
  g_launch = nullptr;
  for (auto& f : L.fibers) give_stack(f.stack);
}

}  // namespace simt
