// PegaFlow gather/scatter copy kernel.
//
// One launch copies a list of pieces `{src, dst, len}` between GPU memory and
// device-mapped pinned host memory (the shm pool after cuMemHostRegister with
// DEVICEMAP; with unified addressing the host pointer is the device pointer).
// Reading/writing host memory from SMs is what lets small (16-64 KiB) pieces
// run at PCIe speed: the copy engines pay a per-piece setup cost, the SMs do
// not (see ../../docs/gpu.md and shared/BENCHMARKS.md for the numbers).
//
// Contract (checked on the host side by copy/kernel.rs before launch):
//   * src, dst and len are multiples of 16 bytes (layout validation enforces
//     16-byte alignment); a byte tail loop still handles other lengths so a
//     future relaxation cannot corrupt data, only slow it down;
//   * pieces do not overlap each other (layout planning guarantees it).
//
// The committed PTX (copy.ptx) is generated from this file; regenerate with
//   scripts/gen-ptx.sh   (needs nvcc; runs on the GPU machine)
// which runs `nvcc -ptx -arch=compute_80`, pins the PTX ISA version to 7.0 so
// CUDA 12.4+ drivers can JIT it (nvcc 13 writes .version 9.x, which a 12.x
// driver rejects), and checks the result with ptxas for sm_80 and sm_90.

struct PegaCopyDesc {
  unsigned long long src;
  unsigned long long dst;
  unsigned long long len;
};

extern "C" __global__ void __launch_bounds__(512)
pegaflow_copy_pieces(const PegaCopyDesc* __restrict__ descs,
                     unsigned long long n) {
  __shared__ PegaCopyDesc shared_desc;
  for (unsigned long long i = blockIdx.x; i < n; i += gridDim.x) {
    // One thread fetches the descriptor, the block reads it from shared
    // memory: 16 warps asking for the same 24 bytes would be 16 requests.
    if (threadIdx.x == 0) shared_desc = descs[i];
    __syncthreads();
    const PegaCopyDesc d = shared_desc;
    // Everyone has its copy before thread 0 may overwrite it next iteration.
    __syncthreads();

    const int4* s = reinterpret_cast<const int4*>(d.src);
    int4* t = reinterpret_cast<int4*>(d.dst);
    const unsigned long long n16 = d.len >> 4;
    const unsigned long long stride = blockDim.x;
    unsigned long long j = threadIdx.x;
    // Four independent 16-byte loads in flight per thread: reads of host
    // memory over PCIe are latency bound, so memory-level parallelism is
    // what fills the link.
    for (; j + 3 * stride < n16; j += 4 * stride) {
      const int4 a = s[j];
      const int4 b = s[j + stride];
      const int4 c = s[j + 2 * stride];
      const int4 e = s[j + 3 * stride];
      t[j] = a;
      t[j + stride] = b;
      t[j + 2 * stride] = c;
      t[j + 3 * stride] = e;
    }
    for (; j < n16; j += stride) t[j] = s[j];
    const char* sb = reinterpret_cast<const char*>(d.src);
    char* tb = reinterpret_cast<char*>(d.dst);
    for (unsigned long long k = (n16 << 4) + threadIdx.x; k < d.len; k += stride)
      tb[k] = sb[k];
  }
}
