// Where CPU gradients are allocated. A fresh N x C buffer costs more in page faults than
// the kernel's arithmetic: the first touch of freshly mapped memory runs at a few GB/s
// (4 KiB pages: ~10x slower than writing mapped memory; transparent huge pages cut the
// faults 512-fold, but the kernel still clears every page it hands out). So a large
// gradient is mapped with huge pages, and when it is freed its memory is kept — one buffer
// at a time — for the next gradient of a similar size: a training loop's gradient lands in
// memory that is already mapped. FASTCE_CPU_GRAD_CACHE=0 turns the keeping off.
#include "grad_buffer.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

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
// One mapping, its data aligned to a huge page (so that all of it can be backed by huge
// pages), this header just before the data.
struct Block {
  void* map;        // what mmap returned
  size_t map_size;
  size_t size;      // usable bytes from data()
  char* data() { return reinterpret_cast<char*>(this) + kHeader; }
  static Block* of(void* data) { return reinterpret_cast<Block*>(static_cast<char*>(data) - kHeader); }
  static constexpr size_t kHeader = 64;
};

Block* map_block(size_t n) {
  const size_t size = (n + kHugePage - 1) / kHugePage * kHugePage;
  const size_t map_size = size + kHugePage;  // room to align data and put the header before it
  void* map = mmap(nullptr, map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  FASTCE_CHECK(map != MAP_FAILED, "fastce: not enough memory: you tried to allocate ", n, " bytes.");
  const uintptr_t data =
      (reinterpret_cast<uintptr_t>(map) + Block::kHeader + kHugePage - 1) & ~(kHugePage - 1);
  Block* b = new (reinterpret_cast<void*>(data - Block::kHeader)) Block{map, map_size, size};
#if defined(MADV_HUGEPAGE)
  madvise(b->data(), size, MADV_HUGEPAGE);  // a hint only
#endif
  return b;
}

void unmap_block(Block* b) {
  if (b) munmap(b->map, b->map_size);  // the header goes with the mapping
}

// The latest freed buffer, kept for the next gradient of a similar size. Slot 0 holds
// gradients, slot 1 per-row values (the lanes path's lse): a step frees one of each.
template <int Slot>
class KeptBlock {
 public:
  static KeptBlock& instance() {
    static auto* kept = new KeptBlock();  // never destroyed: tensors may outlive exit
    return *kept;
  }
  // A block for n bytes: the kept one if it fits n without wasting more than half of it.
  Block* take(size_t n) {
    Block* b = exchange(nullptr);
    if (b && b->size >= n && b->size / 2 <= n) return b;
    unmap_block(b);
    return map_block(n);
  }
  // The deleter of every buffer: keeps the latest (the next step's likely size).
  static void release(void* data) {
    Block* b = Block::of(data);
    unmap_block(keeping_enabled() ? instance().exchange(b) : b);
  }
  void release_kept() { unmap_block(exchange(nullptr)); }

 private:
  Block* exchange(Block* b) {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(kept_, b);
  }
  std::mutex mu_;
  Block* kept_ = nullptr;
};
#endif

}  // namespace

namespace {
// A contiguous tensor of `shape` from slot Slot's kept memory when large enough, else torch's.
template <int Slot>
Tensor kept_or_new(IntArrayRef shape, ScalarType dtype, const Tensor& like) {
#if defined(__linux__)
  std::vector<int64_t> strides(shape.size());
  size_t numel = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    strides[d] = int64_t(numel);
    numel *= size_t(shape[d]);
  }
  const size_t nbytes = numel * element_size(dtype);
  if (nbytes >= kMinKept) {
    Block* b = KeptBlock<Slot>::instance().take(nbytes);
    return torch::stable::from_blob(b->data(), shape, IntArrayRef(strides), torch::stable::Device(DeviceType::CPU),
                                    dtype, &KeptBlock<Slot>::release);
  }
#endif
  return empty_on(like, shape, dtype);
}
}  // namespace

Tensor new_grad_buffer(int64_t rows, int64_t classes, ScalarType dtype, const Tensor& like) {
  return kept_or_new<0>({rows, classes}, dtype, like);
}

Tensor new_row_buffer(IntArrayRef shape, ScalarType dtype, const Tensor& like) {
  return kept_or_new<1>(shape, dtype, like);
}

void release_kept_buffer() {
#if defined(__linux__)
  KeptBlock<0>::instance().release_kept();
  KeptBlock<1>::instance().release_kept();
#endif
}

}  // namespace fastce::cpu
