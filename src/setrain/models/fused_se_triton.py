"""Triton kernels of the fused SE tail (`fused_se.TorchKernels` has the same five functions).

A feature map (N, C, H, W), contiguous or channels_last, is read as (N, L = H*W, C) through its
strides. The two reductions run one program per (n, block of channels) and walk L; the two
elementwise passes tile (n, L, C). Statistics and sums are in fp32. Tests run these kernels on
the CPU under TRITON_INTERPRET=1.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_L, BLOCK_C = 32, 64


def _flat(t: Tensor) -> tuple[Tensor, int, int, int]:
    """The map and its (n, l, c) strides; one stride walks L when rows of W follow each other."""
    if t.stride(2) != t.shape[3] * t.stride(3):
        t = t.contiguous(memory_format=torch.channels_last)
    return t, t.stride(0), t.stride(3), t.stride(1)


def _grid_reduce(x: Tensor) -> tuple[int, int]:
    return x.shape[0], triton.cdiv(x.shape[1], BLOCK_C)


def _grid_map(x: Tensor) -> tuple[int, int, int]:
    return x.shape[0], triton.cdiv(x.shape[2] * x.shape[3], BLOCK_L), triton.cdiv(x.shape[1], BLOCK_C)


@triton.jit
def _moments_kernel(x_ptr, mean_ptr, var_ptr, L, C, sn, sl, sc, BL: tl.constexpr, BC: tl.constexpr):
    n = tl.program_id(0)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    # Sums of x minus its first value, so the variance keeps its digits when the mean is large.
    shift = tl.load(x_ptr + n * sn + cs * sc, mask=cs < C, other=0.0).to(tl.float32)
    total = tl.zeros([BL, BC], tl.float32)
    squares = tl.zeros([BL, BC], tl.float32)
    for start in range(0, L, BL):
        ls = start + tl.arange(0, BL)
        mask = (ls[:, None] < L) & (cs[None, :] < C)
        offsets = n * sn + ls[:, None] * sl + cs[None, :] * sc
        d = tl.where(mask, tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - shift[None, :], 0.0)
        total += d
        squares += d * d
    mean = tl.sum(total, 0) / L
    tl.store(mean_ptr + n * C + cs, shift + mean, mask=cs < C)
    tl.store(var_ptr + n * C + cs, tl.sum(squares, 0) / L - mean * mean, mask=cs < C)


@triton.jit
def _scale_add_relu_kernel(
    x_ptr, a_ptr, b_ptr, id_ptr, out_ptr, L, C, sn, sl, sc, in_, il, ic, BL: tl.constexpr, BC: tl.constexpr
):
    n = tl.program_id(0)
    ls = tl.program_id(1) * BL + tl.arange(0, BL)
    cs = tl.program_id(2) * BC + tl.arange(0, BC)
    mask = (ls[:, None] < L) & (cs[None, :] < C)
    offsets = n * sn + ls[:, None] * sl + cs[None, :] * sc
    id_offsets = n * in_ + ls[:, None] * il + cs[None, :] * ic
    a = tl.load(a_ptr + n * C + cs, mask=cs < C, other=0.0)
    b = tl.load(b_ptr + n * C + cs, mask=cs < C, other=0.0)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    identity = tl.load(id_ptr + id_offsets, mask=mask, other=0.0).to(tl.float32)
    out = tl.maximum(x * a[None, :] + b[None, :] + identity, 0.0)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_grad_sums_kernel(
    grad_ptr, out_ptr, x_ptr, dz_ptr, t0_ptr, t1_ptr, L, C, sn, sl, sc, gn, gl, gc,
    BL: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    t0 = tl.zeros([BL, BC], tl.float32)
    t1 = tl.zeros([BL, BC], tl.float32)
    for start in range(0, L, BL):
        ls = start + tl.arange(0, BL)
        mask = (ls[:, None] < L) & (cs[None, :] < C)
        offsets = n * sn + ls[:, None] * sl + cs[None, :] * sc
        grad_offsets = n * gn + ls[:, None] * gl + cs[None, :] * gc
        out = tl.load(out_ptr + offsets, mask=mask, other=0.0)
        grad = tl.load(grad_ptr + grad_offsets, mask=mask, other=0.0)
        dz = tl.where(out > 0, grad, 0.0).to(dz_ptr.dtype.element_ty)
        tl.store(dz_ptr + offsets, dz, mask=mask)
        dz = dz.to(tl.float32)
        t0 += dz
        t1 += dz * tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(t0_ptr + n * C + cs, tl.sum(t0, 0), mask=cs < C)
    tl.store(t1_ptr + n * C + cs, tl.sum(t1, 0), mask=cs < C)


@triton.jit
def _input_grad_kernel(
    dz_ptr, a_ptr, x_ptr, p_ptr, r_ptr, dx_ptr, L, C, sn, sl, sc, BL: tl.constexpr, BC: tl.constexpr
):
    n = tl.program_id(0)
    ls = tl.program_id(1) * BL + tl.arange(0, BL)
    cs = tl.program_id(2) * BC + tl.arange(0, BC)
    mask = (ls[:, None] < L) & (cs[None, :] < C)
    offsets = n * sn + ls[:, None] * sl + cs[None, :] * sc
    a = tl.load(a_ptr + n * C + cs, mask=cs < C, other=0.0)
    r = tl.load(r_ptr + n * C + cs, mask=cs < C, other=0.0)
    p = tl.load(p_ptr + cs, mask=cs < C, other=0.0)
    dz = tl.load(dz_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dx = dz * a[None, :] + x * p[None, :] + r[None, :]
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _stats(x: Tensor) -> Tensor:
    return torch.empty(x.shape[:2], device=x.device, dtype=torch.float32)


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance over H, W."""
    x, *strides = _flat(x)
    mean, var = _stats(x), _stats(x)
    L, C = x.shape[2] * x.shape[3], x.shape[1]
    _moments_kernel[_grid_reduce(x)](x, mean, var, L, C, *strides, BL=BLOCK_L, BC=BLOCK_C)
    return mean, var


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-(n, c) means over H, W, and the batch's per-channel mean and biased variance, from the
    per-(n, c) moments of one pass by the law of total variance."""
    means, variances = moments(x)
    mean = means.mean(0)
    return means, mean, variances.mean(0) + (means - mean).square().mean(0)


def means(x: Tensor) -> Tensor:
    """Per-(n, c) mean over H, W: the variance comes from the same pass at no extra cost."""
    return moments(x)[0]


def scale_add_relu(x: Tensor, a: Tensor, b: Tensor, identity: Tensor) -> Tensor:
    """relu(x * a[n, c] + b[n, c] + identity)."""
    x, *strides = _flat(x)
    identity, *identity_strides = _flat(identity)
    out = torch.empty_like(x)
    L, C = x.shape[2] * x.shape[3], x.shape[1]
    _scale_add_relu_kernel[_grid_map(x)](
        x, a.contiguous(), b.contiguous(), identity, out, L, C, *strides, *identity_strides,
        BL=BLOCK_L, BC=BLOCK_C,
    )  # fmt: skip
    return out


def relu_grad_sums(grad: Tensor, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dz = grad where out > 0, and its per-(n, c) sums of dz and of dz * x."""
    x, *strides = _flat(x)
    grad, *grad_strides = _flat(grad)
    dz, t0, t1 = torch.empty_like(x, dtype=grad.dtype), _stats(x), _stats(x)
    L, C = x.shape[2] * x.shape[3], x.shape[1]
    _relu_grad_sums_kernel[_grid_reduce(x)](
        grad, out, x, dz, t0, t1, L, C, *strides, *grad_strides, BL=BLOCK_L, BC=BLOCK_C
    )
    return dz, t0, t1


def input_grad(dz: Tensor, a: Tensor, x: Tensor, p: Tensor, r: Tensor) -> Tensor:
    """dz * a[n, c] + x * p[c] + r[n, c]."""
    x, *strides = _flat(x)
    dx = torch.empty_like(x)
    L, C = x.shape[2] * x.shape[3], x.shape[1]
    _input_grad_kernel[_grid_map(x)](
        dz, a.contiguous(), x, p.contiguous(), r.contiguous(), dx, L, C, *strides, BL=BLOCK_L, BC=BLOCK_C
    )
    return dx
