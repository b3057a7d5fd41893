// The lanes kernels compiled for AVX-512 (F, BW, DQ, VL): 16 float lanes.
#define FASTCE_ISA avx512
#define FASTCE_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"
#define FASTCE_VW 16
#define FASTCE_F16C 1
#include "lanes_kernels_x86.h"
