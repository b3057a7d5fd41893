// Allocation of CPU gradient buffers (see grad_buffer.cpp: huge pages, and the last freed
// large gradient kept for the next one).
#pragma once
#include "../torch_api.h"

namespace fastce::cpu {

// An uninitialized (rows, classes) tensor of `dtype` on the CPU.
Tensor new_grad_buffer(int64_t rows, int64_t classes, ScalarType dtype, const Tensor& like);

// An uninitialized contiguous tensor of per-row values (the lse), kept for reuse as gradients are.
Tensor new_row_buffer(IntArrayRef shape, ScalarType dtype, const Tensor& like);

// Unmaps the buffers kept for reuse, if any (fastce.empty_cache()).
void release_kept_buffer();

}  // namespace fastce::cpu
