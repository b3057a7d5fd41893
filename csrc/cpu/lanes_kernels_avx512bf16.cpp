// The lanes kernels compiled for AVX-512 with AVX512-BF16: as avx512, but bfloat16
// gradients are rounded by vcvtneps2bf16 / vcvtne2ps2bf16 (see row_kernels_avx512bf16.cpp).
#define FASTCE_ISA avx512bf16
#define FASTCE_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c"
#define FASTCE_VW 16
#define FASTCE_F16C 1
#define FASTCE_BF16_CVT 1
#include "lanes_kernels_x86.h"
