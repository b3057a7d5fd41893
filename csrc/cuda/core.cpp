// The core both modules share (the options, the argument checks and the canonical view:
// problem.cpp), compiled into this module as well: fastce._C and fastce._C_cuda are separate
// libraries with hidden symbols, each with its own copy, and this module's sources stay the
// files of csrc/cuda/.
#include "../problem.cpp"
