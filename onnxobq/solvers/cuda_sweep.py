"""The in-block column loop of the sweep as one CUDA kernel (CuPy only).

On the GPU the plain sweep spends its time launching kernels: each column of a
block costs about ten small elementwise launches. Here one launch does a whole
block. Each row is independent within a block (all rows read the same U), so one
warp owns one row: lane l holds the row's block columns l, l+32, l+64, l+96 in
registers. For each column k of the block the warp broadcasts w_k from its owner
lane, rounds it to the row's grid, and every lane downdates its later columns by
``err * U[k, j]`` (Eqn. 12 with Eqn. 13 folded in, as in sweep.blocked_sweep).
The errors of the block come back so that the columns after it are updated by
one matrix product, exactly as in the NumPy path.

The arithmetic is the NumPy path's, operation for operation (division, rint
half-to-even, clip, no fused multiply-add), so both give the same codes up to
ties that the lazy block products may round differently.
"""
from __future__ import annotations

MAX_BLOCK = 128          # lanes x registers per lane: 32 x 4
_THREADS = 256           # 8 rows per thread block

_SOURCE = r"""
extern "C" __global__ void sweep_block(
    const T* __restrict__ W, T* __restrict__ codes, T* __restrict__ err_out,
    const T* __restrict__ U, const T* __restrict__ scale, const T* __restrict__ zero,
    const long long rows, const int R, const int C, const int i1, const int nb,
    const T qmin, const T qmax)
{
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;                      // whole warps leave together
    const long long g = row / R;
    const T* Wr = W + row * C + i1;
    const T* Ug = U + g * (long long)C * C;
    const T s = scale[row], z = zero[row];
    T w[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const int j = lane + 32 * t;
        w[t] = (j < nb) ? Wr[j] : (T)0;
    }
    for (int i = 0; i < nb; ++i) {
        const int k = i1 + i;
        T mine = (T)0;
#pragma unroll
        for (int t = 0; t < 4; ++t) if (t == (i >> 5)) mine = w[t];
        const T wi = __shfl_sync(0xffffffffu, mine, i & 31);
        T q = rint(wi / s) + z;
        q = fmin(fmax(q, qmin), qmax);
        const T deq = (q - z) * s;
        const T e = (wi - deq) / Ug[(long long)k * C + k];
        if (lane == 0) {
            codes[row * C + k] = q;
            err_out[row * nb + i] = e;
        }
        const T* Uk = Ug + (long long)k * C + i1;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const int j = lane + 32 * t;
            if (j > i && j < nb) w[t] = w[t] - __fmul_rn(e, Uk[j]);
        }
    }
}
"""

_kernels: dict = {}


def _kernel(xp, dtype):
    name = xp.dtype(dtype).name
    if name not in _kernels:
        ctype = {"float32": "float", "float64": "double"}[name]
        src = f"typedef {ctype} T;\n" + _SOURCE
        if ctype == "double":
            src = src.replace("__fmul_rn", "__dmul_rn")
        module = xp.RawModule(code=src, options=("--fmad=false",))
        _kernels[name] = module.get_function("sweep_block")
    return _kernels[name]


def supports(W, block: int) -> bool:
    """True when the kernel handles this sweep (float32/float64, blocks of at most 128 columns)."""
    return block <= MAX_BLOCK and W.dtype.name in ("float32", "float64")


def blocked_sweep_cuda(W, U, scale, zero, qmin: int, qmax: int, block: int, xp):
    """sweep.blocked_sweep on the GPU: one kernel launch and one matrix product per block.

    Same arguments and result as ``sweep.blocked_sweep``; ``xp`` is cupy.
    """
    G, R, C = W.shape
    dt = W.dtype.type
    W = xp.ascontiguousarray(W).copy()
    U = xp.ascontiguousarray(U, dtype=W.dtype)       # the kernel reads both as T
    scale = xp.ascontiguousarray(scale, dtype=W.dtype)
    zero = xp.ascontiguousarray(zero, dtype=W.dtype)
    codes = xp.empty_like(W)
    rows = G * R
    kernel = _kernel(xp, W.dtype)
    grid = ((rows * 32 + _THREADS - 1) // _THREADS,)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        err = xp.empty((G, R, i2 - i1), dtype=W.dtype)
        kernel(grid, (_THREADS,), (W, codes, err, U, scale, zero, xp.int64(rows), xp.int32(R),
                                   xp.int32(C), xp.int32(i1), xp.int32(i2 - i1), dt(qmin), dt(qmax)))
        if i2 < C:
            W[:, :, i2:] -= err @ U[:, i1:i2, i2:]    # lazy update of later columns
    return codes
