// Host emulation of the part of the CUDA execution model fastce's kernels use: one
// std::thread per CUDA thread of a block, blocks one after another (so __shared__ can be static),
// barriers for __syncthreads, __syncwarp and the exchange of __shfl_xor_sync. A shuffle
// or __syncwarp that not all 32 lanes reach deadlocks here, as it is undefined on a GPU.
// Stricter than x86 where a GPU is: every vector access checks its alignment, and after
// every launch the harness checks the guard bytes around what the kernels may write (api.cpp).
#pragma once
#include <cstdint>
// The kernels' checks, counted (and reported by the harness) instead of trapping; launches
// cannot fail on the host.
void emu_assert_fail(const char* what);
#define FASTCE_KERNEL_ASSERT(cond) \
  do {                             \
    if (!(cond)) emu_assert_fail(#cond); \
  } while (0)
#define FASTCE_LAUNCH_CHECK() \
  do {                        \
  } while (0)
// A misaligned vector access: a fault on a GPU (misaligned address), counted here.
void emu_fault(const char* what, const char* file, int line);
#define FASTCE_ASSERT_ALIGNED(p, bytes)                                                        \
  do {                                                                                         \
    if (reinterpret_cast<std::uintptr_t>(p) % unsigned(bytes) != 0)                            \
      emu_fault("misaligned " #bytes "-byte vector access", __FILE__, __LINE__);               \
  } while (0)
// After every launch: the guard bytes of the watched buffers are unchanged (api.cpp).
void emu_after_launch(const char* kernel);

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#undef __grid_constant__
#define __shared__ static
#define __grid_constant__

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim gridDim, blockDim;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_bars;
inline std::unique_ptr<std::barrier<>> emu_block_bar;
alignas(8) inline unsigned char emu_xchg[32][32][8];  // [warp][lane][value]

inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_bars[threadIdx.x / 32]->arrive_and_wait(); }
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
template <class V>
V __shfl_xor_sync(unsigned, V v, int mask) {
  static_assert(sizeof(V) <= 8, "one value per lane");
  const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
  std::memcpy(emu_xchg[w][l], &v, sizeof(V));
  __syncwarp();
  V o;
  std::memcpy(&o, emu_xchg[w][l ^ unsigned(mask)], sizeof(V));
  __syncwarp();
  return o;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline double __hiloint2double(int hi, int lo) {
  const uint64_t b = uint64_t(uint32_t(hi)) << 32 | uint32_t(lo);
  double d;
  std::memcpy(&d, &b, 8);
  return d;
}
inline int __double2hiint(double d) { uint64_t b; std::memcpy(&b, &d, 8); return int(uint32_t(b >> 32)); }
inline int __double2loint(double d) { uint64_t b; std::memcpy(&b, &d, 8); return int(uint32_t(b)); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// kernel<<<grid, block, shmem, stream>>>(args...) becomes
// emu_launch("kernel", kernel, grid, block, shmem, stream, args...).
template <class K, class... Args>
void emu_launch(const char* name, K kernel, unsigned grid, unsigned block, int, cudaStream_t, Args... args) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  emu_block_bar = std::make_unique<std::barrier<>>(block);
  emu_warp_bars.clear();
  for (unsigned w = 0; w < block / 32; ++w) emu_warp_bars.push_back(std::make_unique<std::barrier<>>(32));
  // One thread per CUDA thread of a block, running the blocks one after another: a barrier
  // after each block keeps its static __shared__ arrays to itself.
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < block; ++t)
    threads.emplace_back([=] {
      threadIdx = {t, 0, 0};
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        kernel(args...);
        emu_block_bar->arrive_and_wait();
      }
    });
  for (auto& t : threads) t.join();
  emu_after_launch(name);
}
