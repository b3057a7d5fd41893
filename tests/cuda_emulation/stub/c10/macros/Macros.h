// Emulation stub: a failed device assert is counted (and reported by the harness).
#pragma once
void emu_assert_fail(const char* what);
#define CUDA_KERNEL_ASSERT(cond) if (!(cond)) { emu_assert_fail(#cond); }
