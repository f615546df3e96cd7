// simt.h: a small SIMT emulator, so that CUDA device code compiled by g++ runs on the CPU.
//
// Test infrastructure only (never installed): `make cuda-emu` compiles csrc/cuda/*.cu as
// C++ with -DTRIPLETOPS_EMU, which includes this header instead of the CUDA runtime.
// Every CUDA thread of a block is a fiber with its own stack; one block runs at a time,
// on the calling thread, the blocks in a seeded random order. A fiber runs until it reaches a synchronising primitive
// (__syncthreads, __syncwarp, a shuffle, a vote), then another ready one runs, picked at
// random from a seed (TRIPLETOPS_EMU_SEED, default 1; 0 = first come, first served), so
// that a missing barrier changes results instead of hiding. Static __shared__ arrays
// are function-local statics: they keep their contents from one block to the next;
// dynamic shared memory is fresh and filled with 0xff for every block.
//
// Not modelled: inline PTX, wmma/mma, cp.async/TMA, CUB/Thrust, races between blocks,
// the memory model, FMA contraction, occupancy. nvcc (make cuda-check) and a real GPU
// (make gpu-check) cover those.
#pragma once

#include <math.h>  // the C++ wrapper: float and double overloads of sqrt, fmax, ... in ::

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>

// ---- Qualifiers: plain C++ under g++ ------------------------------------------------
#define __global__                   // a kernel: launched through simt::launch
#define __device__                   // device function: an ordinary function here
#define __host__                     // host function
#define __forceinline__ inline       // inlining is only a hint on the CPU
#define __noinline__                 // idem
#define __launch_bounds__(...)       // occupancy hints mean nothing here
#define __shared__ static            // one block runs at a time: a function-local static is that block's shared memory

// ---- Launch geometry types ----------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
constexpr int warpSize = 32;

namespace simt {

// The CUDA thread that is running (a fiber of the current block).
struct ThreadInfo {
  uint3 tid;         // threadIdx
  unsigned linear;   // threadIdx in x-fastest order
};
ThreadInfo& self();
const uint3& block_idx();   // blockIdx of the running block
const dim3& block_dim();    // blockDim of the running launch
const dim3& grid_dim();     // gridDim of the running launch
void* dynamic_shared();     // this block's dynamic shared memory (heap: ASan sees overruns)

// Block barrier: every thread that has not exited must arrive.
void sync_block();
// Warp barrier over the lanes in `mask` (the caller must be one of them): `in` is this
// lane's `size` bytes (<= kLaneBytes); returns the 32 lanes' values, lane l at byte
// kLaneBytes * l, valid until this lane's next warp primitive. (A GPU shuffles 4 or 8
// bytes; wider values let a kernel move a small record in one exchange under the
// emulator, where each exchange is 32 fiber switches: see Kept::shuffle_xor.)
constexpr size_t kLaneBytes = 64;
const unsigned char* warp_exchange(unsigned mask, const void* in, size_t size);

// Runs `body` as every thread of every block of the grid. Throws std::runtime_error on a
// deadlock, a broken warp primitive or a launch beyond CUDA's limits.
void launch(const char* name, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

inline unsigned lane_id() { return self().linear % warpSize; }

// The value of lane `src` (when `src` is in range and in the mask; else the caller's own).
template <typename T>
inline T shuffle_from(unsigned mask, T v, int src) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= kLaneBytes, "shuffles move small plain values");
  const unsigned char* all = warp_exchange(mask, &v, sizeof(T));
  if (!(src >= 0 && src < warpSize && (mask >> src & 1u))) return v;
  T out;
  std::memcpy(&out, all + kLaneBytes * src, sizeof(T));
  return out;
}

[[noreturn]] void fail(const char* what);  // a broken primitive: abort the launch

}  // namespace simt

#define threadIdx (::simt::self().tid)
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())

// ---- Synchronisation ----------------------------------------------------------------
inline void __syncthreads() { ::simt::sync_block(); }  // block barrier
inline void __syncwarp(unsigned mask = 0xffffffffu) {  // warp barrier over `mask`
  const char none = 0;
  ::simt::warp_exchange(mask, &none, 1);
}
inline void __threadfence() {}        // one block at a time on one CPU thread: memory is coherent
inline void __threadfence_block() {}  // idem

// ---- Shuffles (width: a power of two <= 32 splitting the warp into segments) ---------
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {  // lane `src` of my segment
  const int lane = int(::simt::lane_id());
  return ::simt::shuffle_from(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {  // lane - delta, else my own
  const int lane = int(::simt::lane_id());
  const int src = (lane % width) >= int(delta) ? lane - int(delta) : lane;
  return ::simt::shuffle_from(mask, v, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {  // lane + delta, else my own
  const int lane = int(::simt::lane_id());
  const int src = (lane % width) + int(delta) < width ? lane + int(delta) : lane;
  return ::simt::shuffle_from(mask, v, src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {  // lane ^ lane_mask in my segment
  const int lane = int(::simt::lane_id());
  const int src = lane ^ lane_mask;
  return ::simt::shuffle_from(mask, v, (src / width) == (lane / width) ? src : lane);
}

// ---- Votes --------------------------------------------------------------------------
inline unsigned __ballot_sync(unsigned mask, int pred) {  // bit l set when lane l (in mask) has pred != 0
  const char p = pred != 0;
  const unsigned char* all = ::simt::warp_exchange(mask, &p, 1);
  unsigned bits = 0;
  for (int l = 0; l < warpSize; ++l) bits |= (mask >> l & 1u) && all[::simt::kLaneBytes * l] ? 1u << l : 0u;
  return bits;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }      // some lane
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }   // every lane

// ---- Atomics: one CPU thread runs the block and never switches inside one -----------
template <typename T>
inline T atomicAdd(T* p, T v) {  // *p += v, returns the old value
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {  // *p = max(*p, v)
  const T old = *p;
  *p = old < v ? v : old;
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {  // *p = min(*p, v)
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
inline T atomicExch(T* p, T v) {  // *p = v
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {  // *p = (*p == compare) ? v : *p
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

// ---- Intrinsics ---------------------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) { return *p; }                               // read-only cache load
inline int __popc(unsigned x) { return __builtin_popcount(x); }        // bits set
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }                   // 1 + lowest set bit, 0 if none
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }  // leading zeros
