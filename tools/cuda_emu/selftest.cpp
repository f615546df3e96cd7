// The emulator's own tests (make cuda-emu runs them before the kernels' tests): every
// primitive against its CUDA definition, the failures it must report, and AddressSanitizer
// catching out-of-bounds accesses in each kind of memory a kernel touches.
#include "simt.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

template <typename... Args>
void run(const char* name, dim3 grid, dim3 block, size_t shared, void (*kernel)(Args...), Args... args) {
  simt::launch(name, grid, block, shared, [&] { kernel(args...); });
}

// ---- kernels ------------------------------------------------------------------------

__global__ void shuffle_kernel(int* out) {  // 6 results per thread
  const int t = threadIdx.x, v = 100 + t;
  out[t * 6 + 0] = __shfl_sync(0xffffffffu, v, 3);
  out[t * 6 + 1] = __shfl_sync(0xffffffffu, v, 5, 8);
  out[t * 6 + 2] = __shfl_up_sync(0xffffffffu, v, 2, 16);
  out[t * 6 + 3] = __shfl_down_sync(0xffffffffu, v, 3);
  out[t * 6 + 4] = __shfl_xor_sync(0xffffffffu, v, 9);
  out[t * 6 + 5] = int(__shfl_xor_sync(0xffffffffu, double(v) + 0.5, 1));
}

__global__ void vote_kernel(unsigned* out) {
  const int t = threadIdx.x;
  out[t * 3 + 0] = __ballot_sync(0xffffffffu, t % 3 == 0);
  out[t * 3 + 1] = unsigned(__any_sync(0xffffffffu, t == 7));
  out[t * 3 + 2] = t < 16 ? unsigned(__all_sync(0x0000ffffu, t != 3)) + 2u * unsigned(__all_sync(0x0000ffffu, 1)) : 7u;
}

__global__ void block_sum_kernel(const float* in, float* out) {  // static shared + barriers
  __shared__ float s[128];
  const int t = threadIdx.x;
  s[t] = in[blockIdx.x * 128 + t];
  __syncthreads();
  for (int w = 64; w > 0; w /= 2) {
    if (t < w) s[t] += s[t + w];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

__global__ void dynamic_shared_kernel(int* out, int n) {  // dynamic shared, read after a barrier
  int* s = static_cast<int*>(simt::dynamic_shared());
  const int t = threadIdx.x;
  s[t] = t * t;
  __syncthreads();
  out[t] = s[n - 1 - t];
}

__global__ void atomic_kernel(int* counter, int* maxval) {
  atomicAdd(counter, 1);
  atomicMax(maxval, int(threadIdx.x + blockIdx.x * blockDim.x));
}

__global__ void block_order_kernel(int* ticket, int* order) {  // which block ran when
  if (threadIdx.x == 0) order[atomicAdd(ticket, 1)] = int(blockIdx.x);
}

__global__ void missing_barrier_kernel(int* out) {  // reads a neighbour's slot with no barrier
  __shared__ int s[64];
  const int t = threadIdx.x;
  s[t] = t + 1;
  __syncwarp();  // only the warp: the other warp's slots may not be written yet
  out[t] = s[(t + 32) % 64];
  __syncthreads();
  s[t] = 0;  // static __shared__ outlives the block here (a GPU gives no such guarantee)
}

__global__ void exited_lane_kernel(int* out) {  // a full-mask shuffle after lane 5 returned
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, int(threadIdx.x), 0);
}

__global__ void divergent_kernel(int* out) {  // half a warp at a shuffle, half at a ballot
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
  else out[threadIdx.x] = int(__ballot_sync(0xffffffffu, 1));
}

// Planted out-of-bounds reads. UBSan is off in them: its bounds and object-size checks
// would report them before ASan does.
#define NO_UBSAN __attribute__((no_sanitize("undefined")))
NO_UBSAN __global__ void oob_global_kernel(int* p, int n) { p[threadIdx.x] = p[n]; }
NO_UBSAN __global__ void oob_static_shared_kernel(int* out) {
  __shared__ int s[32];
  int* p = s;
  p[threadIdx.x] = 1;
  __syncthreads();
  out[0] = p[threadIdx.x + 1];
}
NO_UBSAN __global__ void oob_dynamic_shared_kernel(int* out) {
  int* s = static_cast<int*>(simt::dynamic_shared());
  s[threadIdx.x] = 1;
  __syncthreads();
  out[0] = s[threadIdx.x + 1];
}
NO_UBSAN __global__ void oob_stack_kernel(int* out, int k) {
  int local[8];
  int* p = local;
  for (int i = 0; i < 8; ++i) p[i] = i;
  out[0] = p[k];
}

// Runs f in a child process; true when it died with an AddressSanitizer report.
template <typename F>
bool asan_catches(F f) {
  int pipefd[2];
  if (pipe(pipefd) != 0) return false;
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(pipefd[1], 2);
    close(pipefd[0]);
    f();
    std::_Exit(0);
  }
  close(pipefd[1]);
  std::string err;
  char buf[4096];
  for (ssize_t n; (n = read(pipefd[0], buf, sizeof buf)) > 0;) err.append(buf, size_t(n));
  close(pipefd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  const bool died = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  const bool caught = died && err.find("AddressSanitizer") != std::string::npos;
  if (!caught) std::printf("     child %s; stderr: %.300s\n", died ? "died" : "exited cleanly", err.c_str());
  return caught;
}

template <typename F>
bool throws(F f, const char* needle) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

}  // namespace

int main() {
  {  // shuffles, with widths
    std::vector<int> out(64 * 6);
    run("shuffle", 1, 64, 0, shuffle_kernel, out.data());
    bool ok = true;
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32, base = t - lane;
      const int up = (lane % 16) >= 2 ? t - 2 : t, down = lane + 3 < 32 ? t + 3 : t;
      const int expect[6] = {100 + base + 3, 100 + base + (lane & ~7) + 5, 100 + up, 100 + down,
                             100 + base + (lane ^ 9), 100 + base + (lane ^ 1)};
      for (int k = 0; k < 6; ++k) ok &= out[t * 6 + k] == expect[k];
    }
    check(ok, "__shfl_sync / _up / _down / _xor with widths, int and double");
  }
  {  // votes
    std::vector<unsigned> out(32 * 3);
    run("vote", 1, 32, 0, vote_kernel, out.data());
    bool ok = true;
    for (int t = 0; t < 32; ++t) {
      ok &= out[t * 3] == 0x49249249u && out[t * 3 + 1] == 1u;
      ok &= out[t * 3 + 2] == (t < 16 ? 2u : 7u);
    }
    check(ok, "__ballot_sync / __any_sync / __all_sync (partial mask)");
  }
  {  // static shared memory and __syncthreads, several blocks
    std::vector<float> in(3 * 128), out(3);
    for (size_t i = 0; i < in.size(); ++i) in[i] = float(i % 7);
    run("block_sum", 3, 128, 0, block_sum_kernel, static_cast<const float*>(in.data()), out.data());
    bool ok = true;
    for (int b = 0; b < 3; ++b) {
      float s = 0;
      for (int t = 0; t < 128; ++t) s += in[b * 128 + t];
      ok &= out[b] == s;
    }
    check(ok, "__shared__ + __syncthreads tree reduction over 3 blocks");
  }
  {
    std::vector<int> out(96);
    run("dynamic_shared", 1, 96, 96 * sizeof(int), dynamic_shared_kernel, out.data(), 96);
    bool ok = true;
    for (int t = 0; t < 96; ++t) ok &= out[t] == (95 - t) * (95 - t);
    check(ok, "dynamic shared memory");
  }
  {
    int counter = 0, maxval = -1;
    run("atomic", 4, 64, 0, atomic_kernel, &counter, &maxval);
    check(counter == 256 && maxval == 255, "atomicAdd / atomicMax");
  }
  {  // blocks run in a shuffled order (so "the last block" is any of them)
    int ticket = 0;
    std::vector<int> order(16);
    run("block_order", 16, 32, 0, block_order_kernel, &ticket, order.data());
    bool shuffled = false;
    for (int b = 0; b < 16; ++b) shuffled |= order[b] != b;
    check(ticket == 16 && shuffled, "blocks run one at a time in a shuffled order");
  }
  {  // the shuffled thread order exposes a missing barrier (in thread order it would hide)
    int wrong_seeds = 0;
    for (int seed = 1; seed <= 8; ++seed) {
      setenv("TRIPLETOPS_EMU_SEED", std::to_string(seed).c_str(), 1);
      std::vector<int> out(64, 0);
      run("missing_barrier", 1, 64, 0, missing_barrier_kernel, out.data());
      bool right = true;
      for (int t = 0; t < 64; ++t) right &= out[t] == (t + 32) % 64 + 1;
      wrong_seeds += !right;
    }
    setenv("TRIPLETOPS_EMU_SEED", "0", 1);
    std::vector<int> out(64, 0);
    run("missing_barrier", 1, 64, 0, missing_barrier_kernel, out.data());
    unsetenv("TRIPLETOPS_EMU_SEED");
    check(wrong_seeds > 0, "a missing __syncthreads gives wrong results under shuffled orders (" +
                               std::to_string(wrong_seeds) + " of 8 seeds)");
  }
  {
    std::vector<int> out(32);
    check(throws([&] { run("exited_lane", 1, 32, 0, exited_lane_kernel, out.data()); }, "exited"),
          "a full-mask shuffle naming an exited lane is reported");
    check(throws([&] { run("divergent", 1, 32, 0, divergent_kernel, out.data()); }, "different warp primitives"),
          "lanes of one warp at different primitives are reported");
    check(throws([&] { run("too_big", 1, 1025, 0, exited_lane_kernel, out.data()); }, "blockDim"),
          "a block of 1025 threads is refused");
    check(throws([&] { run("too_much_shared", 1, 32, 64 * 1024, exited_lane_kernel, out.data()); }, "48 KiB"),
          "more than 48 KiB of dynamic shared memory is refused");
  }
#if defined(__SANITIZE_ADDRESS__)
  {
    check(asan_catches([] {
            std::vector<int> v(32);
            run("oob_global", 1, 32, 0, oob_global_kernel, v.data(), 32);
          }), "ASan: out-of-bounds read of global (heap) memory");
    check(asan_catches([] {
            int o = 0;
            run("oob_static_shared", 1, 32, 0, oob_static_shared_kernel, &o);
          }), "ASan: out-of-bounds read of static shared memory");
    check(asan_catches([] {
            int o = 0;
            run("oob_dynamic_shared", 1, 32, 32 * sizeof(int), oob_dynamic_shared_kernel, &o);
          }), "ASan: out-of-bounds read of dynamic shared memory");
    check(asan_catches([] {
            int o = 0;
            run("oob_stack", 1, 32, 0, oob_stack_kernel, &o, 8);
          }), "ASan: out-of-bounds read of a thread's stack array");
  }
#else
  check(false, "built without AddressSanitizer");
#endif
  std::printf("simt selftest: %s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
