// The lanes kernels compiled for AVX2 + FMA: 8 float lanes.
#define FASTCE_ISA avx2
#define FASTCE_TARGET "avx2,fma,f16c"
#define FASTCE_VW 8
#define FASTCE_F16C 1
#include "lanes_kernels_x86.h"
