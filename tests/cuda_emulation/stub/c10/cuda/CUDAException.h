// Emulation stub: launches cannot fail on the host.
#pragma once
#define C10_CUDA_KERNEL_LAUNCH_CHECK() do {} while (0)
