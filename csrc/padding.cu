// padding.cu: unpad/repad row gather and scatter, dtype-agnostic (rows are copied as bytes).
//   gather:  out[t, :] = x[indices[t], :]          x [R, F] -> out [T, F]
//   scatter: out[indices[t], :] = x[t, :], zeros elsewhere   x [T, F] -> out [num_rows, F]
// Each row is moved in the widest chunk U (16/8/4/2/1 bytes) that the row size and the pointers
// allow. Block (32, 8): threadIdx.x over the chunks of a row, threadIdx.y over rows; grid-stride in both.
#include "common.cuh"

namespace fb {

// dst[dst_row(t)] = src[src_row(t)] for t in [0, T): gather reads src row indices[t], scatter writes
// dst row indices[t]. An index outside [0, rows of the indexed side) never reads or writes out of
// bounds: the scatter skips it, the gather writes a zero row.
template <typename U>
__global__ void __launch_bounds__(256)
copy_rows_kernel(const U* __restrict__ src, U* __restrict__ dst, const int64_t* __restrict__ indices, int64_t T,
                 int64_t chunks, int64_t indexed_rows, bool scatter) {
  for (int64_t t = (int64_t)blockIdx.y * 8 + threadIdx.y; t < T; t += (int64_t)gridDim.y * 8) {
    const int64_t idx = indices[t];
    if (idx < 0 || idx >= indexed_rows) {
      if (!scatter) {  // gather: a defined (zero) row rather than stale memory
        for (int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x; c < chunks; c += (int64_t)gridDim.x * 32)
          dst[t * chunks + c] = U{};
      }
      continue;
    }
    const U* s = src + (scatter ? t : idx) * chunks;
    U* d = dst + (scatter ? idx : t) * chunks;
    for (int64_t c = (int64_t)blockIdx.x * 32 + threadIdx.x; c < chunks; c += (int64_t)gridDim.x * 32) d[c] = s[c];
  }
}

template <typename U>
static void copy_rows(const void* src, void* dst, const int64_t* indices, int64_t T, int64_t row_bytes,
                      int64_t indexed_rows, bool scatter, cudaStream_t stream) {
  const int64_t chunks = row_bytes / (int64_t)sizeof(U);
  int64_t gx = (chunks + 31) / 32;
  int64_t gy = (T + 7) / 8;
  dim3 grid((unsigned)(gx < 64 ? gx : 64), (unsigned)(gy < 65535 ? gy : 65535));
  auto kern = copy_rows_kernel<U>;
  FB_LAUNCH(kern, grid, dim3(32, 8), 0, stream, static_cast<const U*>(src), static_cast<U*>(dst), indices, T, chunks,
            indexed_rows, scatter);
  check_launch("copy_rows_kernel");
}

static void copy_rows_any(const void* src, void* dst, const int64_t* indices, int64_t T, int64_t row_bytes,
                          int64_t indexed_rows, bool scatter, cudaStream_t stream) {
  if (T <= 0 || row_bytes <= 0) return;
  const uintptr_t align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) | (uintptr_t)row_bytes;
  if (align % 16 == 0) copy_rows<uint4>(src, dst, indices, T, row_bytes, indexed_rows, scatter, stream);
  else if (align % 8 == 0) copy_rows<uint2>(src, dst, indices, T, row_bytes, indexed_rows, scatter, stream);
  else if (align % 4 == 0) copy_rows<unsigned>(src, dst, indices, T, row_bytes, indexed_rows, scatter, stream);
  else if (align % 2 == 0) copy_rows<unsigned short>(src, dst, indices, T, row_bytes, indexed_rows, scatter, stream);
  else copy_rows<unsigned char>(src, dst, indices, T, row_bytes, indexed_rows, scatter, stream);
}

// out [T, row_bytes] = x [R, row_bytes] rows indices[0..T).
void launch_index_gather(const void* x, void* out, const int64_t* indices, int64_t T, int64_t R, int64_t row_bytes,
                         cudaStream_t stream) {
  copy_rows_any(x, out, indices, T, row_bytes, R, false, stream);
}

// out [num_rows, row_bytes] = zeros, then out[indices[t]] = x[t].
void launch_index_scatter(const void* x, void* out, const int64_t* indices, int64_t T, int64_t num_rows,
                          int64_t row_bytes, cudaStream_t stream) {
  if (num_rows > 0 && row_bytes > 0) cudaMemsetAsync(out, 0, (size_t)(num_rows * row_bytes), stream);
  copy_rows_any(x, out, indices, T, row_bytes, num_rows, true, stream);
}

}  // namespace fb
