"""The fused squeeze-excite-residual tail of a residual block: relu(SE(BN(x)) + identity).

BatchNorm is affine per channel, y = k * x + h with k = gamma / sigma and h = beta - mu * k, so
SE's squeeze is mean_hw(y) = k * mean_hw(x) + h: the per-sample, per-channel means of x, taken
in the same pass as BN's batch statistics (their average), give it without reading BN's output.
With the gate g[n, c], the tail is then one pass, relu(x * (k * g) + h * g + identity), which
applies BN on the fly; BN's output and the scaled map are never stored. The backward reads the
gradient, the output and x to get dL/dpre and its per-(n, c) sums (all that the excitation, BN's
parameters and its batch statistics need, derived below), then writes dL/dx in one more pass.

Two sets of kernels do the passes: torch ops (the CPU, and under torch.compile, where inductor
fuses them into its own loops) and Triton kernels (CUDA, eager; `fused_se_triton`). Only the
standard placement with the average squeeze fuses; other variants run the block as written.
"""

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setrain.errors import SetrainError

log = logging.getLogger(__name__)

FUSED_CHOICES = ("auto", True, False)
# Where `fused: auto` takes the fused path, per (device type, under torch.compile); measured in
# docs/benchmarks.md (Fused SE). Compiled, inductor traces the torch-op kernels and keeps more
# tensors for the backward than the unfused block does, for a small gain in speed.
AUTO = {("cuda", False): True, ("cuda", True): False, ("cpu", False): False, ("cpu", True): False}


def fused_setting(fused, placement: str, squeeze: str):
    """The block's `fused` setting (True, False or "auto") for its SE variant: False, with a log
    line saying so, when only the unfused block computes it."""
    if fused not in FUSED_CHOICES:
        raise SetrainError(f"model.se.fused={fused!r} is not known; choose one of: auto, true, false.")
    if fused is not False and (placement, squeeze) != ("standard", "avg"):
        level = logging.WARNING if fused is True else logging.INFO
        log.log(
            level, "model.se.fused=%s: the fused SE path takes placement=standard and squeeze=avg; "
            "placement=%s, squeeze=%s run unfused.", fused, placement, squeeze,
        )  # fmt: skip
        return False
    return fused


def takes_fused_path(fused, x: Tensor, bn: nn.Module) -> bool:
    """Whether this call fuses: not with SyncBatchNorm (`trainer.sync_batchnorm`), whose batch
    statistics are those of all processes."""
    if isinstance(bn, nn.SyncBatchNorm):
        return False
    if fused == "auto":
        return AUTO.get((x.device.type, torch.compiler.is_compiling()), False)
    return fused


def unfuse(model: nn.Module) -> nn.Module:
    """`model` with every block on its unfused forward, the plain torch ops that exporters and
    other runtimes read (setrain.export); same parameters, same function."""
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = False
    return model


def se_residual_tail(x: Tensor, identity: Tensor, bn: nn.BatchNorm2d, se: nn.Module) -> Tensor:
    """relu(se(bn(x)) + identity) in few passes; `bn`'s running statistics are updated as BN's
    own forward updates them, and gradients reach the same parameters."""
    batch_stats = bn.training or bn.running_mean is None
    factor = 0.0
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    first, second = se.excitation[0], se.excitation[2]
    triton = x.is_cuda and x.dtype != torch.float64 and not torch.compiler.is_compiling()
    backend = "triton" if triton else "torch"
    out, mean, var = SEResidualTail.apply(
        x, identity, bn.weight, bn.bias, first.weight, first.bias, second.weight, second.bias,
        None if batch_stats else bn.running_mean, None if batch_stats else bn.running_var,
        bn.eps, se.gate, backend,
    )  # fmt: skip
    if bn.training and bn.track_running_stats:
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)
    return out


def kernels(backend: str):
    if backend == "triton":
        from setrain.models import fused_se_triton

        return fused_se_triton
    return TorchKernels


class TorchKernels:
    """The passes over the feature maps in torch ops; statistics and sums in fp32 (or fp64)."""

    @staticmethod
    def moments(x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-(n, c) mean and biased variance over H, W. Compiled, inductor computes var_mean in
        one pass; in eager ATen, two sums (of x and x**2) are several times faster than var_mean
        over H, W, and lose digits of the variance only for a mean far larger than the spread."""
        x = x.to(_accumulation(x))
        if torch.compiler.is_compiling():
            var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
            return mean, var
        area = x.shape[2] * x.shape[3]
        mean = x.sum((2, 3)) / area
        return mean, torch.clamp_min((x * x).sum((2, 3)) / area - mean * mean, 0)

    @staticmethod
    def scale_add_relu(x: Tensor, a: Tensor, b: Tensor, identity: Tensor) -> Tensor:
        """relu(x * a[n, c] + b[n, c] + identity)."""
        out = torch.addcmul(b[:, :, None, None], x, a[:, :, None, None]).add_(identity)
        return out.relu_().to(x.dtype)

    @staticmethod
    def relu_grad_sums(grad: Tensor, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """dz = grad where out > 0, and its per-(n, c) sums of dz and of dz * x."""
        dz = torch.ops.aten.threshold_backward(grad, out, 0)
        dtype = _accumulation(x)
        return dz, dz.sum((2, 3), dtype=dtype), (dz * x).sum((2, 3), dtype=dtype)

    @staticmethod
    def input_grad(dz: Tensor, a: Tensor, x: Tensor, p: Tensor, r: Tensor) -> Tensor:
        """dz * a[n, c] + x * p[c] + r[n, c]."""
        dx = torch.addcmul(r[:, :, None, None], dz, a[:, :, None, None])
        return dx.addcmul_(x, p[None, :, None, None]).to(x.dtype)


def _accumulation(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


_GATES = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}


def _gate_grad(gate: str, g: Tensor) -> Tensor:
    """d gate / d input, from the gate's output."""
    if gate == "sigmoid":
        return g * (1 - g)
    if gate == "tanh":
        return 1 - g * g
    return (g > 0).to(g.dtype)


class SEResidualTail(torch.autograd.Function):
    """relu(x * k * g + h * g + identity), with BN's (k, h) from batch statistics (or, given
    `mean` and `var`, the running ones) and g the excitation of the squeeze k * mean_hw(x) + h.

    Backward, with dz = dL/d(pre-ReLU), T0 = sum_hw dz, T1 = sum_hw dz * x per (n, c) and
    ds the gradient of the squeeze: dL/dg = k * T1 + h * T0; BN's output gets dy = dz * g + ds / HW,
    whose sums over (n, h, w) give dbeta and dgamma (sum dy * xhat) from T0, T1 and the means,
    and BN's backward, dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)), is then
    dz * (k * g) + x * p[c] + r[n, c].
    """

    @staticmethod
    def forward(ctx, x, identity, gamma, beta, w1, b1, w2, b2, mean, var, eps, gate, backend):
        ops = kernels(backend)
        batch_stats = mean is None
        with torch.autocast(x.device.type, enabled=False):
            means, variances = ops.moments(x)
            if batch_stats:  # the batch statistics, by the law of total variance
                mean = means.mean(0)
                var = variances.mean(0) + (means - mean).square().mean(0)
            else:  # outputs must not be inputs
                mean, var = mean.clone(), var.clone()
            dtype = means.dtype
            rstd = torch.rsqrt(var.to(dtype) + eps)
            k = gamma.to(dtype) * rstd
            h = beta.to(dtype) - mean.to(dtype) * k
            squeeze = means * k + h
            hidden = F.linear(squeeze, w1.to(dtype), b1.to(dtype))
            g = _GATES[gate](F.linear(hidden.relu(), w2.to(dtype), b2.to(dtype)))
            out = ops.scale_add_relu(x, k * g, h * g, identity)
        ctx.save_for_backward(x, out, means, mean.to(dtype), rstd, k, h, w1, w2, squeeze, hidden, g)
        ctx.gate, ctx.backend, ctx.batch_stats = gate, backend, batch_stats
        ctx.dtypes = identity.dtype, gamma.dtype
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad, _mean_grad, _var_grad):
        x, out, means, mean, rstd, k, h, w1, w2, squeeze, hidden, g = ctx.saved_tensors
        ops = kernels(ctx.backend)
        dz, t0, t1 = ops.relu_grad_sums(grad, out, x)
        with torch.autocast(x.device.type, enabled=False):
            ds, *excitation_grads = _excitation_backward(
                k * t1 + h * t0, ctx.gate, g, hidden, squeeze, w1.to(k.dtype), w2.to(k.dtype)
            )
            dbeta = (g * t0 + ds).sum(0)
            dgamma = ((g * (t1 - mean * t0) + ds * (means - mean)) * rstd).sum(0)
            area = x.shape[2] * x.shape[3]
            if ctx.batch_stats:  # BN's backward through the batch mean and variance
                count = x.shape[0] * area
                p = -k * rstd * dgamma / count
                r = k * (ds / area - dbeta / count + mean * rstd * dgamma / count)
            else:
                p, r = torch.zeros_like(k), k * ds / area
            dx = ops.input_grad(dz, k * g, x, p, r)
        identity_dtype, param_dtype = ctx.dtypes
        dw1, db1, dw2, db2 = (grad.to(param_dtype) for grad in excitation_grads)
        return (
            dx, dz.to(identity_dtype), dgamma.to(param_dtype), dbeta.to(param_dtype),
            dw1, db1, dw2, db2, None, None, None, None, None,
        )  # fmt: skip


def _excitation_backward(dg, gate, g, hidden, squeeze, w1, w2) -> tuple[Tensor, ...]:
    """Gradients of g = gate(w2 relu(w1 s + b1) + b2) for dL/dg: (ds, dw1, db1, dw2, db2)."""
    dpre = dg * _gate_grad(gate, g)
    dhidden = (dpre @ w2) * (hidden > 0)
    return dhidden @ w1, dhidden.T @ squeeze, dhidden.sum(0), dpre.T @ hidden.relu(), dpre.sum(0)
