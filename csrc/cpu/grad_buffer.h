// Allocation of CPU gradient buffers (see grad_buffer.cpp: huge pages, and the last freed
// large gradient kept for the next one).
#pragma once
#include "../torch_api.h"

namespace fastce::cpu {

// An uninitialized (rows, classes) tensor of `dtype` on the CPU.
Tensor new_grad_buffer(int64_t rows, int64_t classes, ScalarType dtype, const Tensor& like);

// Unmaps the buffer kept for reuse, if any (fastce.empty_cache()).
void release_kept_buffer();

}  // namespace fastce::cpu
