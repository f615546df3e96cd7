// The one place where the CUDA sources differ between their two builds (besides
// Kept::shuffle_xor in batch_hard_kernels.cuh, which moves the same bits in one exchange):
//  - nvcc (setup.py, make cuda-check): the real CUDA runtime; kernels register under
//    the `tripletops` library at the CUDA dispatch key.
//  - g++ with -DTRIPLETOPS_EMU (make cuda-emu): tools/cuda_emu/simt.h runs the device
//    code on the CPU; the same launchers register under the test-only `tripletops_emu`
//    library at the CPU key, so the test suite drives them with CPU tensors.
// Launchers are written against ATen ops that work on any device (at::mm, at::empty,
// at::sort, ...) plus launch_kernel, a stream and a device guard from here.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstddef>
#include <utility>

#ifdef TRIPLETOPS_EMU
#include "simt.h"  // tools/cuda_emu, on the include path of the emulator build only
#define TRIPLETOPS_CUDA_LIBRARY tripletops_emu
#define TRIPLETOPS_CUDA_KEY CPU
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#define TRIPLETOPS_CUDA_LIBRARY tripletops
#define TRIPLETOPS_CUDA_KEY CUDA
#endif

namespace tripletops {
namespace cuda {

#ifdef TRIPLETOPS_EMU
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;  // the emulated kernels take CPU tensors
using Stream = cudaStream_t;
inline Stream current_stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
#else
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

inline bool on_kernel_device(const at::Tensor& t) { return t.device().type() == kDeviceType; }

// kernel<<<grid, block, shared_bytes, stream>>>(args...) and the launch check; under
// the emulator, every thread of the grid as a fiber. `name` feeds the emulator's count
// of launched kernels (make cuda-emu).
template <typename... Params, typename... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   Stream stream, Args&&... args) {
#ifdef TRIPLETOPS_EMU
  (void)stream;
  ::simt::launch(name, grid, block, shared_bytes, [&] { kernel(Params(args)...); });
#else
  (void)name;
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// The most dynamic shared memory one block may use on the current device once its kernel
// opts in (allow_dynamic_shared): H100/H200 227 KiB, A100 163 KiB, sm_86/89 99 KiB; the
// emulator's 48 KiB.
inline size_t max_dynamic_shared_bytes() {
#ifdef TRIPLETOPS_EMU
  return 48 * 1024;
#else
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return size_t(bytes);
#endif
}

// Lets `kernel` launch with `bytes` of dynamic shared memory: past 48 KiB a kernel must
// opt in.
template <typename... Params>
void allow_dynamic_shared(void (*kernel)(Params...), size_t bytes) {
#ifdef TRIPLETOPS_EMU
  (void)kernel, (void)bytes;
#else
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
#endif
}

// TRIPLETOPS_LAUNCH((kernel<T>), grid, block, shared_bytes, stream, args...): the kernel's
// name, without template arguments, comes from the expression itself.
#define TRIPLETOPS_LAUNCH(kernel, ...) ::tripletops::cuda::launch_kernel(#kernel, kernel, __VA_ARGS__)

}  // namespace cuda
}  // namespace tripletops
