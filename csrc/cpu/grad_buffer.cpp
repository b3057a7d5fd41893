// Where CPU gradients are allocated. A fresh N x C buffer costs more in page faults than
// the kernel's arithmetic: the first touch of freshly mapped memory runs at a few GB/s
// (4 KiB pages: ~10x slower than writing mapped memory; transparent huge pages cut the
// faults 512-fold, but the kernel still clears every page it hands out). So a large
// gradient is mapped with huge pages, and when it is freed its memory is kept — one buffer
// at a time — for the next gradient of a similar size: a training loop's gradient lands in
// memory that is already mapped. FASTCE_CPU_GRAD_CACHE=0 turns the keeping off.
#include "grad_buffer.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastce::cpu {
namespace {

// Gradients smaller than this go to torch's allocator (malloc keeps small blocks anyway).
constexpr size_t kMinKept = size_t(4) << 20;
constexpr size_t kHugePage = size_t(2) << 20;

bool keeping_enabled() {
  const char* v = std::getenv("FASTCE_CPU_GRAD_CACHE");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

#if defined(__linux__)
// One mapping, aligned to a huge page so that all of it can be backed by huge pages.
struct Block {
  void* map = nullptr;  // what mmap returned
  size_t map_size = 0;
  void* data = nullptr;  // 2 MiB aligned
  size_t size = 0;       // usable bytes from data
};

Block* map_block(size_t n) {
  const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
  const size_t map_size = size + kHugePage;
  void* map = mmap(nullptr, map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (map == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t aligned = (reinterpret_cast<uintptr_t>(map) + kHugePage - 1) & ~(kHugePage - 1);
  void* data = reinterpret_cast<void*>(aligned);
#if defined(MADV_HUGEPAGE)
  madvise(data, size, MADV_HUGEPAGE);  // a hint only
#endif
  return new Block{map, map_size, data, size};
}

void unmap_block(Block* b) {
  if (!b) return;
  munmap(b->map, b->map_size);
  delete b;
}

class KeepingAllocator final : public c10::Allocator {
 public:
  static KeepingAllocator& instance() {
    static auto* allocator = new KeepingAllocator();  // never destroyed: tensors may outlive exit
    return *allocator;
  }
  c10::DataPtr allocate(size_t n) override {
    Block* b = take(n);
    if (!b) b = map_block(n);
    return {b->data, b, &KeepingAllocator::release, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
  void release_kept() { unmap_block(exchange_kept(nullptr)); }

 private:
  Block* exchange_kept(Block* b) {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(kept_, b);
  }
  // The kept block if it fits n without wasting more than half of it; else unmaps it.
  Block* take(size_t n) {
    Block* b = exchange_kept(nullptr);
    if (b && b->size >= n && b->size / 2 <= n) return b;
    unmap_block(b);
    return nullptr;
  }
  // The deleter of every buffer: keeps the latest (the next step's likely size).
  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    unmap_block(keeping_enabled() ? instance().exchange_kept(b) : b);
  }

  std::mutex mu_;
  Block* kept_ = nullptr;
};
#endif

}  // namespace

at::Tensor new_grad_buffer(int64_t rows, int64_t classes, const at::TensorOptions& options) {
#if defined(__linux__)
  const size_t nbytes = size_t(rows) * size_t(classes) * options.dtype().itemsize();
  if (nbytes >= kMinKept) {
    return at::detail::empty_generic({rows, classes}, &KeepingAllocator::instance(),
                                     c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), std::nullopt);
  }
#endif
  return at::empty({rows, classes}, options);
}

void release_kept_buffer() {
#if defined(__linux__)
  KeepingAllocator::instance().release_kept();
#endif
}

}  // namespace fastce::cpu
