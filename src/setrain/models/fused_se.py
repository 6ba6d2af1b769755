"""The fused squeeze-excite-residual tail of a residual block: relu(SE(BN(x)) + identity).

BatchNorm is affine per channel, y = k * x + h with k = gamma / sigma and h = beta - mu * k, so
SE's squeeze is mean_hw(y) = k * mean_hw(x) + h: the per-sample, per-channel means of x, taken
in the same pass as BN's batch statistics (their average), give it without reading BN's output.
With the gate g[n, c], the tail is then one pass, relu(x * (k * g) + h * g + identity), which
applies BN on the fly; BN's output and the scaled map are never stored. The backward reads the
gradient, the output and x to get dL/dpre and its per-(n, c) sums (all that the excitation, BN's
parameters and its batch statistics need, derived below), then writes dL/dx in one more pass.

The tail and its backward are two `torch.library` custom ops, `setrain::se_residual_tail_v2` and
`setrain::se_residual_tail_backward_v2`: torch.compile and DDP see each as one opaque op, so a
compiled model keeps for the backward what eager keeps (x, the output, per-channel statistics)
and runs the same kernels. These are Triton's on CUDA (`fused_se_triton`) and torch ops elsewhere.
Only the standard placement with the average squeeze fuses; other variants run the block as written.

In eval mode without autograd (`inference_mode`, `no_grad`), where the passes are torch ops, the tail
takes a form with fewer passes still (`folded_tail`): BN folds into the last conv's weight and bias,
and when that conv is 1x1 (the bottleneck's) the squeeze folds through it too, since the mean of
conv(h) over H, W is the conv of h's mean: the excitation then reads h's per-channel means (a
quarter of the channels) through a small matrix, the first FC times the folded conv.
"""

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setrain.errors import SetrainError
from setrain.models.se import SEBlock

log = logging.getLogger(__name__)

FUSED_CHOICES = ("auto", True, False)
# Where `fused: auto` takes the fused path, per (device type, under torch.compile, eval without
# autograd); measured in docs/benchmarks.md (Fused SE). Compiled CUDA was measured when compile
# traced the fused tail into inductor's graph (more memory than unfused); the custom op is yet to be
# measured there. CUDA without autograd runs the Triton tail with BN's running statistics.
AUTO = {
    ("cuda", False, False): True, ("cuda", True, False): False, ("cuda", False, True): True, ("cuda", True, True): False,
    ("cpu", False, False): False, ("cpu", True, False): False, ("cpu", False, True): True, ("cpu", True, True): False,
}  # fmt: skip


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


def fused_form(fused, x: Tensor, conv: nn.Module, bn: nn.Module, se: nn.Module) -> str | None:
    """How this call runs the tail: "folded" (`folded_tail`) in eval mode with BN's running
    statistics, nothing recorded for autograd, in eager mode, where the passes are torch ops;
    otherwise "op" (the custom op). None (unfused) when not fused; with SyncBatchNorm
    (`trainer.sync_batchnorm`), whose batch statistics are those of all processes; with `se`
    replaced by another module; while hooks watch the last conv, its BN or an SE module (pruning,
    setrain.analyze, the gate histograms), which the fused forms do not call; and under torch.func
    transforms (vmap), which have no batching rule for them."""
    if isinstance(bn, nn.SyncBatchNorm) or not isinstance(se, SEBlock) or _hooked(conv, bn, se):
        return None
    compiling = torch.compiler.is_compiling()
    if not compiling and torch._C._functorch.is_functorch_wrapped_tensor(x):  # which dynamo cannot trace
        return None
    inference = not bn.training and not torch.is_grad_enabled()
    if fused == "auto":
        fused = AUTO.get((x.device.type, compiling, inference), False)
    if not fused:
        return None
    folds = inference and bn.running_mean is not None and not compiling and kernels(x) is TorchKernels
    return "folded" if folds else "op"


def _hooked(conv: nn.Module, bn: nn.Module, se: SEBlock) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in (conv, bn, se, se.excitation, *se.excitation)
    )  # fmt: skip


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
    out, mean, var, *_ = fused_tail(
        x, identity, bn.weight, bn.bias, first.weight, first.bias, second.weight, second.bias,
        None if batch_stats else bn.running_mean, None if batch_stats else bn.running_var, bn.eps, se.gate,
    )  # fmt: skip
    if bn.training and bn.track_running_stats:
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)
    return out


class FoldedConstants(NamedTuple):
    """The last conv's weight and bias with BN folded in, and (1x1 conv) the first FC folded through
    them, as (input channels, hidden) for the per-channel means of the conv's input; None for other
    convs."""

    weight: Tensor
    bias: Tensor
    hidden_weight: Tensor | None
    hidden_bias: Tensor | None


class FoldCache:
    """A block's `FoldedConstants`, computed again when a tensor they come from changes.

    Tensors are checked by identity and version counter, which in-place changes bump (an optimizer
    step, `load_state_dict`, EMA; not writes through `.data`). BN's own forward in training updates
    its running statistics without bumping theirs, but counts up `num_batches_tracked`, which is
    checked with them. None for tensors made under `inference_mode`, which have no version counter."""

    def __init__(self):
        self.key, self.constants = None, None

    def __call__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, first: nn.Linear) -> FoldedConstants | None:
        sources = (conv.weight, bn.weight, bn.bias, first.weight, first.bias)
        sources += (bn.running_mean, bn.running_var, bn.num_batches_tracked)
        try:
            key = (bn.eps, *((id(t), t.data_ptr(), t._version) for t in sources))
        except RuntimeError:  # "Inference tensors do not track version counter"
            return None
        if key != self.key:
            # fp32 constants whatever the caller's autocast; usable outside inference mode too
            no_autocast = torch.autocast(conv.weight.device.type, enabled=False)
            with torch.inference_mode(False), torch.no_grad(), no_autocast:
                self.constants = _fold(conv, bn, first)
            self.key = key
        return self.constants


def _squeezes_through(conv: nn.Conv2d) -> bool:
    """Whether mean_hw(conv(h)) = conv(mean_hw(h)): a 1x1 conv of stride 1, one group, no padding."""
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, first: nn.Linear) -> FoldedConstants:
    dtype = _accumulation(conv.weight)
    k = bn.weight.to(dtype) * torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    bias = bn.bias.to(dtype) - bn.running_mean.to(dtype) * k
    weight = conv.weight.to(dtype) * k[:, None, None, None]
    hidden_weight = hidden_bias = None
    if _squeezes_through(conv):
        hidden_weight = weight.flatten(1).T @ first.weight.to(dtype).T  # (input channels, hidden)
        hidden_bias = F.linear(bias, first.weight.to(dtype), first.bias.to(dtype))
    constants = (weight, bias, hidden_weight, hidden_bias)
    return FoldedConstants(*(None if t is None else t.to(conv.weight.dtype) for t in constants))


def folded_tail(
    h: Tensor, identity: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, se: nn.Module, cache: FoldCache
) -> Tensor:
    """relu(se(bn(conv(h))) + identity) in eval without autograd: the conv with BN folded in, the
    gate from the squeeze (of h through the folded conv and first FC when the conv is 1x1), and one
    pass for scale and residual add before the ReLU. At batch 1 the small ops' dispatch costs as
    much as their arithmetic, so there are few of them (in place, the mean's division in addmm)."""
    first, second = se.excitation[0], se.excitation[2]
    constants = cache(conv, bn, first)
    if constants is None:
        return se_residual_tail(conv(h), identity, bn, se)
    z = F.conv2d(h, constants.weight, constants.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if constants.hidden_weight is None:  # the squeeze of z itself
        squeezed, weight, bias = z, first.weight.t(), first.bias
    else:
        squeezed, weight, bias = h, constants.hidden_weight, constants.hidden_bias
    hidden = torch.addmm(bias, squeezed.sum((2, 3)), weight, alpha=1 / (squeezed.shape[2] * squeezed.shape[3]))
    g = _GATES_IN_PLACE[se.gate](F.linear(hidden.relu_(), second.weight, second.bias))
    return torch.addcmul(identity, z, g.view(*g.shape, 1, 1), out=z).relu_()  # z's dtype, as `+=` unfused


def kernels(x: Tensor):
    """The passes over the feature maps: Triton's on CUDA (they compute in fp32, so not for fp64),
    torch's elsewhere."""
    if x.is_cuda and x.dtype != torch.float64:
        from setrain.models import fused_se_triton

        return fused_se_triton
    return TorchKernels


# The smallest sample map (C * H * W elements) whose backward sums `TorchKernels` takes per sample:
# below it, a call per sample costs more than the pass over the temporary dz * x that it saves
# (measured in docs/benchmarks.md, Fused SE).
PER_SAMPLE_SUMS_FROM = 2**16


class TorchKernels:
    """The passes over the feature maps in torch ops; statistics and sums in fp32 (or fp64). Maps
    are written into `empty_like(x)`, the layout the op's fake kernels promise."""

    @staticmethod
    def batch_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-(n, c) means over H, W, and the batch's per-channel mean and biased variance: ATen's
        batch-norm statistics read x without the temporary x * x that per-(n, c) variances need."""
        x = x.to(_accumulation(x))
        mean, var = torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0)
        return x.sum((2, 3)) / (x.shape[2] * x.shape[3]), mean, var

    @staticmethod
    def means(x: Tensor) -> Tensor:
        """Per-(n, c) mean over H, W."""
        return x.sum((2, 3), dtype=_accumulation(x)) / (x.shape[2] * x.shape[3])

    @staticmethod
    def scale_add_relu(x: Tensor, a: Tensor, b: Tensor, identity: Tensor) -> Tensor:
        """relu(x * a[n, c] + b[n, c] + identity)."""
        out = torch.addcmul(b[:, :, None, None], x, a[:, :, None, None], out=torch.empty_like(x))
        return _add_relu_(out, identity)

    @staticmethod
    def relu_grad_sums(grad: Tensor, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """dz = grad where out > 0, and its per-(n, c) sums of dz and of dz * x."""
        dz = torch.ops.aten.threshold_backward.grad_input(
            grad, out, 0, grad_input=torch.empty_like(x, dtype=grad.dtype)
        )
        dtype = _accumulation(x)
        if _sums_per_sample(dz, x):
            return dz, *_per_sample_sums(dz, x, dtype)
        return dz, dz.sum((2, 3), dtype=dtype), (dz * x).sum((2, 3), dtype=dtype)

    @staticmethod
    def input_grad(dz: Tensor, a: Tensor, x: Tensor, p: Tensor, r: Tensor) -> Tensor:
        """dz * a[n, c] + x * p[c] + r[n, c]."""
        dx = torch.addcmul(r[:, :, None, None], dz, a[:, :, None, None], out=torch.empty_like(x))
        return dx.addcmul_(x, p[None, :, None, None])


def _sums_per_sample(dz: Tensor, x: Tensor) -> bool:
    """Whether `_per_sample_sums` takes the sums: for large maps, of one dtype (BN's backward kernel
    takes no other), in the two layouts whose kernels sum in fp32 whatever the dtype."""
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return x[0].numel() >= PER_SAMPLE_SUMS_FROM and dz.dtype == x.dtype and dense


def _per_sample_sums(dz: Tensor, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-(n, c) sums of dz and of dz * x, a sample at a time: given mean 0 and rstd 1, BN's backward
    kernel sums both (its dbeta and dgamma) over all but the channels in one read, with no temporary."""
    zero, one = x.new_zeros(x.shape[1], dtype=dtype), x.new_ones(x.shape[1], dtype=dtype)
    sums = [
        torch.ops.aten.native_batch_norm_backward(
            dz_n, x_n, None, None, None, zero, one, True, 0.0, [False, True, True]
        )[1:]
        for dz_n, x_n in zip(dz.split(1), x.split(1))
    ]  # fmt: skip
    t1, t0 = (torch.stack(sum_n) for sum_n in zip(*sums))
    return t0, t1


def _add_relu_(out: Tensor, other: Tensor) -> Tensor:
    """relu(out + other) into `out`: one pass with ATen's fused CPU kernel, for the dtypes it takes."""
    if out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64) and other.dtype == out.dtype:
        return torch.ops.aten._add_relu_(out, other)
    return out.add_(other).relu_()


def _accumulation(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


_GATES = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}
_GATES_IN_PLACE = {"sigmoid": torch.sigmoid_, "tanh": torch.tanh_, "relu": torch.relu_}


def _relu_backward(grad: Tensor, out: Tensor) -> Tensor:
    return torch.ops.aten.threshold_backward(grad, out, 0)


# The gradient through each gate, from the gate's output: one op each
_GATE_BACKWARDS = {
    "sigmoid": torch.ops.aten.sigmoid_backward, "tanh": torch.ops.aten.tanh_backward, "relu": _relu_backward
}  # fmt: skip


class Excitation(NamedTuple):
    """BN as y = k * x + h per channel (k = gamma * rstd), SE's squeeze k * mean_hw(x) + h, the
    excitation's hidden layer (before its ReLU) and its gate g; all (C) or (N, C)."""

    rstd: Tensor
    k: Tensor
    h: Tensor
    squeeze: Tensor
    hidden: Tensor
    g: Tensor


def _normalization(means, mean, var, gamma, beta, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """rstd, k, h and the squeeze of `Excitation`: a few (C) and (N, C) ops, which the backward
    recomputes; it keeps the excitation's hidden layer and gate, whose matrix products cost more."""
    rstd = torch.rsqrt(var + eps)
    k = gamma.to(means.dtype) * rstd
    h = beta.to(means.dtype) - mean * k
    return rstd, k, h, torch.addcmul(h, means, k)


def _excitation(means, mean, var, gamma, beta, w1, b1, w2, b2, eps: float, gate: str) -> Excitation:
    """From the per-(n, c) means of x and BN's statistics."""
    rstd, k, h, squeeze = _normalization(means, mean, var, gamma, beta, eps)
    hidden = F.linear(squeeze, w1.to(means.dtype), b1.to(means.dtype))
    g = _GATES[gate](F.linear(hidden.relu(), w2.to(means.dtype), b2.to(means.dtype)))
    return Excitation(rstd, k, h, squeeze, hidden, g)


def _forward(ops, x, identity, gamma, beta, w1, b1, w2, b2, running_mean, running_var, eps, gate):
    """(out, mean, var, means, hidden, g): the tail's output, BN's statistics (the batch's, or the
    running ones given), the per-(n, c) means of x, and the excitation's hidden layer (before its
    ReLU) and gate, in the passes of `ops`."""
    if running_mean is None:
        means, mean, var = ops.batch_moments(x)
    else:  # the running statistics: only the squeeze reads x; outputs must not be inputs
        means = ops.means(x)
        mean, var = (stat.to(means.dtype, copy=True) for stat in (running_mean, running_var))
    e = _excitation(means, mean, var, gamma, beta, w1, b1, w2, b2, eps, gate)
    return ops.scale_add_relu(x, e.k * e.g, e.h * e.g, identity), mean, var, means, e.hidden, e.g


def _backward(ops, grad, x, out, means, hidden, g, mean, var, gamma, beta, w1, b1, w2, b2, eps, gate, batch_stats):
    """(dx, d identity, dgamma, dbeta, dw1, db1, dw2, db2) for dL/dout = `grad`.

    With dz = dL/d(pre-ReLU), T0 = sum_hw dz, T1 = sum_hw dz * x per (n, c) and ds the gradient
    of the squeeze: dL/dg = k * T1 + h * T0; BN's output gets dy = dz * g + ds / HW, whose sums
    over (n, h, w) give dbeta and dgamma (sum dy * xhat) from T0, T1 and the means, and BN's
    backward, dx = k * (dy - mean(dy) - xhat * mean(dy * xhat)), is then dz * (k * g) + x * p[c] + r[n, c].
    """
    e = Excitation(*_normalization(means, mean, var, gamma, beta, eps), hidden, g)
    dz, t0, t1 = ops.relu_grad_sums(grad, out, x)
    ds, dw1, db1, dw2, db2 = _excitation_backward(
        torch.addcmul(e.h * t0, e.k, t1), gate, e.g, e.hidden, e.squeeze, w1.to(e.k.dtype), w2.to(e.k.dtype)
    )  # (N, C) ops in few calls: at small maps and large C they cost as much as the passes
    dbeta = torch.addcmul(ds, e.g, t0).sum(0)
    centered_t1 = torch.addcmul(t1, t0, mean, value=-1)  # sum_hw dz * (x - mean)
    dgamma = torch.addcmul(e.g * centered_t1, ds, means - mean).sum(0) * e.rstd
    area = x.shape[2] * x.shape[3]
    if batch_stats:  # BN's backward through the batch mean and variance
        count = x.shape[0] * area
        p = -e.k * e.rstd * dgamma / count
        r = torch.addcmul(e.k * (mean * e.rstd * dgamma - dbeta) / count, ds, e.k, value=1 / area)
    else:
        p, r = torch.zeros_like(e.k), ds * (e.k / area)
    dx = ops.input_grad(dz, e.k * e.g, x, p, r)
    small = zip((dgamma, dbeta, dw1, db1, dw2, db2), (gamma, beta, w1, b1, w2, b2))
    return dx, dz, *(value.to(parameter.dtype) for value, parameter in small)


def _excitation_backward(dg, gate, g, hidden, squeeze, w1, w2) -> tuple[Tensor, ...]:
    """Gradients of g = gate(w2 relu(w1 s + b1) + b2) for dL/dg: (ds, dw1, db1, dw2, db2)."""
    dpre = _GATE_BACKWARDS[gate](dg, g)
    dhidden = _relu_backward(dpre @ w2, hidden)
    return dhidden @ w1, dhidden.T @ squeeze, dhidden.sum(0), dpre.T @ hidden.relu(), dpre.sum(0)


@torch.library.custom_op("setrain::se_residual_tail_v2", mutates_args=())
def fused_tail(
    x: Tensor, identity: Tensor, gamma: Tensor, beta: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    running_mean: Tensor | None, running_var: Tensor | None, eps: float, gate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(out, mean, var, means, hidden, g) of `_forward`; BN's running statistics, given, replace the batch's."""
    with torch.autocast(x.device.type, enabled=False):
        return _forward(kernels(x), x, identity, gamma, beta, w1, b1, w2, b2, running_mean, running_var, eps, gate)


@fused_tail.register_fake
def _(x, identity, gamma, beta, w1, b1, w2, b2, running_mean, running_var, eps, gate):
    stats = x.new_empty(x.shape[1], dtype=_accumulation(x))
    means = x.new_empty(x.shape[:2], dtype=stats.dtype)
    hidden = x.new_empty((x.shape[0], w1.shape[0]), dtype=stats.dtype)
    return torch.empty_like(x), stats, torch.empty_like(stats), means, hidden, torch.empty_like(means)


@torch.library.custom_op("setrain::se_residual_tail_backward_v2", mutates_args=())
def fused_tail_backward(
    grad: Tensor, x: Tensor, out: Tensor, means: Tensor, hidden: Tensor, g: Tensor, mean: Tensor, var: Tensor,
    gamma: Tensor, beta: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    eps: float, gate: str, batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of `_backward`."""
    with torch.autocast(x.device.type, enabled=False):
        ops = kernels(x)
        return _backward(
            ops, grad, x, out, means, hidden, g, mean, var, gamma, beta, w1, b1, w2, b2, eps, gate, batch_stats
        )


@fused_tail_backward.register_fake
def _(grad, x, out, means, hidden, g, mean, var, gamma, beta, w1, b1, w2, b2, eps, gate, batch_stats):
    return (
        torch.empty_like(x), torch.empty_like(x, dtype=grad.dtype),
        *(torch.empty_like(parameter) for parameter in (gamma, beta, w1, b1, w2, b2)),
    )  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    x, identity, gamma, beta, w1, b1, w2, b2, running_mean, _, eps, gate = inputs
    out, mean, var, means, hidden, g = output
    ctx.save_for_backward(x, out, means, hidden, g, mean, var, gamma, beta, w1, b1, w2, b2)
    ctx.eps, ctx.gate, ctx.batch_stats, ctx.identity_dtype = eps, gate, running_mean is None, identity.dtype
    ctx.mark_non_differentiable(mean, var, means, hidden, g)
    ctx.set_materialize_grads(False)  # no zeros for the statistics' gradients, which are never read


def _fused_tail_grads(ctx, grad, *_statistics):
    dx, dz, *parameter_grads = fused_tail_backward(grad, *ctx.saved_tensors, ctx.eps, ctx.gate, ctx.batch_stats)
    return dx, dz.to(ctx.identity_dtype), *parameter_grads, None, None, None, None


fused_tail.register_autograd(_fused_tail_grads, setup_context=_setup_context)
