// nvcc compile check of the cp.async wrappers (csrc/cp_async.cuh) through the kernels the host emulation's
// self-test runs: the same source must build for sm_80 and sm_90 with warnings as errors.
#include "async_kernels.cuh"
