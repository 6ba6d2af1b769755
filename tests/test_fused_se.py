"""The fused SE tail computes the unfused block's function: outputs, gradients, running statistics."""

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import prune

from setrain.errors import SetrainError
from setrain.models import SEBlock, build_model, create_model, fused_se
from setrain.models.resnet import BasicBlock, Bottleneck

GATES = ["sigmoid", "tanh", "relu"]


def randomise_norms(model: nn.Module) -> None:
    """BN parameters and running statistics away from their initial 1s and 0s."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)


def fused_pair(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The block unfused and a copy of it fused, with the same weights."""
    torch.manual_seed(0)
    randomise_norms(block)
    block.fused = False
    fused = copy.deepcopy(block)
    for module in fused.modules():
        if hasattr(module, "fused"):
            module.fused = True
    return block, fused


def run(block: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    out = block(x)
    out.backward(grad)
    return out, x.grad


def assert_same_step(block, fused, x, tolerance=dict(rtol=1e-5, atol=1e-5)):
    """One forward and backward of each: equal outputs, input and parameter gradients, buffers."""
    grad = torch.randn_like(block(x.clone()))  # one step more on both, so also buffers in eval
    fused(x.clone())
    expected, expected_grad = run(block, x, grad)
    out, out_grad = run(fused, x, grad)
    torch.testing.assert_close(out, expected, **tolerance)
    assert out.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(
        memory_format=torch.channels_last
    )
    torch.testing.assert_close(out_grad, expected_grad, **tolerance)
    for (name, p), q in zip(block.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **tolerance, msg=name)
    for (name, b), c in zip(block.named_buffers(), fused.buffers()):
        torch.testing.assert_close(c, b, **tolerance, msg=name)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_basic_block_with_projection(gate, training, memory_format):
    block, fused = fused_pair(BasicBlock(8, 16, 2, se=dict(reduction=4, gate=gate)))
    block.train(training), fused.train(training)
    x = torch.randn(3, 8, 6, 5).to(memory_format=memory_format)
    assert_same_step(block, fused, x)


@pytest.mark.parametrize("groups", [1, 4])
def test_bottleneck_with_identity_shortcut(groups):
    block, fused = fused_pair(Bottleneck(32, 8, 1, se=dict(reduction=8), groups=groups, width_per_group=16))
    x = torch.randn(2, 32, 5, 5).to(memory_format=torch.channels_last)
    assert_same_step(block, fused, x)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_per_sample_backward_sums(monkeypatch, memory_format):
    """Large maps take the backward's per-(n, c) sums a sample at a time (BN's backward kernel)."""
    monkeypatch.setattr(fused_se, "PER_SAMPLE_SUMS_FROM", 0)
    sums, calls = fused_se._per_sample_sums, []
    monkeypatch.setattr(fused_se, "_per_sample_sums", lambda *args: calls.append(args) or sums(*args))
    block, fused = fused_pair(Bottleneck(32, 8, 1, se=dict(reduction=8)))
    x = torch.randn(3, 32, 5, 4).to(memory_format=memory_format)
    assert_same_step(block, fused, x)
    assert calls


def test_per_sample_sums_only_where_bn_backward_sums_in_fp32(monkeypatch):
    """BN's backward kernel takes one dtype, and sums in fp32 only in the NCHW and NHWC layouts."""
    monkeypatch.setattr(fused_se, "PER_SAMPLE_SUMS_FROM", 0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    assert fused_se._sums_per_sample(torch.randn_like(x), x)
    x = x.to(memory_format=torch.channels_last)
    assert fused_se._sums_per_sample(torch.randn_like(x), x)
    assert not fused_se._sums_per_sample(torch.randn_like(x, dtype=torch.float32), x)
    assert not fused_se._sums_per_sample(torch.randn_like(x)[..., ::2], x[..., ::2])


EVAL_BLOCKS = {  # the last conv 1x1 (the squeeze folds through it) or 3x3; identity or projection shortcut
    "bottleneck": lambda gate: Bottleneck(32, 8, 1, se=dict(reduction=8, gate=gate)),
    "bottleneck-grouped-strided": lambda gate: Bottleneck(
        16, 8, 2, se=dict(reduction=4, gate=gate), groups=4, width_per_group=16
    ),
    "basic-strided": lambda gate: BasicBlock(8, 16, 2, se=dict(reduction=4, gate=gate)),
}  # fmt: skip


@pytest.mark.parametrize("no_autograd", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("kind", EVAL_BLOCKS)
@pytest.mark.parametrize("batch", [3, 1])
def test_eval_without_autograd_folds_bn_into_the_conv(monkeypatch, no_autograd, memory_format, gate, kind, batch):
    block, fused = (model.eval() for model in fused_pair(EVAL_BLOCKS[kind](gate)))
    monkeypatch.setattr(fused_se, "fused_tail", lambda *a: _unreachable())  # not the custom op
    x = torch.randn(batch, block.conv1.in_channels, 6, 5).to(memory_format=memory_format)
    with no_autograd():
        out = fused(x)
        torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=memory_format)
    squeezed_through_the_conv = fused.fold_cache.constants.hidden_weight is not None
    assert squeezed_through_the_conv == kind.startswith("bottleneck")


def test_folded_constants_follow_the_weights_they_fold():
    """After an optimizer step and BN's running statistics moved by training, a loaded state dict and
    a change of dtype, the folded form still computes the unfused block's function."""
    block, fused = fused_pair(Bottleneck(32, 8, 1, se=dict(reduction=8)))
    x = torch.randn(2, 32, 5, 5)

    def assert_same_eval(x):
        block.eval(), fused.eval()
        with torch.inference_mode():
            out = fused(x)
            torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
        return out

    before = assert_same_eval(x)
    for model in (block, fused):
        optimizer = torch.optim.SGD(model.train().parameters(), lr=0.1)
        model(x).mean().backward()
        optimizer.step()
    assert not torch.allclose(assert_same_eval(x), before)
    block.load_state_dict(fused_pair(Bottleneck(32, 8, 1, se=dict(reduction=8)))[0].state_dict())
    fused.load_state_dict(block.state_dict())
    assert_same_eval(x)
    block.double(), fused.double()
    assert assert_same_eval(x.double()).dtype == torch.float64


def test_folded_constants_follow_running_statistics_that_bn_itself_updates():
    """BN's forward in training moves them without bumping their version counter; `auto` trains
    unfused on a CPU and evaluates folded."""
    torch.manual_seed(0)
    model = create_model("se_resnet20", num_classes=3)
    reference = fused_se.unfuse(copy.deepcopy(model))
    x = torch.randn(4, 3, 8, 8)

    def assert_same_eval():
        with torch.inference_mode():
            torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)
        assert model.layer1[0].fold_cache.constants is not None

    assert_same_eval()
    with torch.no_grad():
        model.train()(x * 3 + 1)  # the running statistics move, no parameter does
    reference.load_state_dict(model.state_dict())
    assert_same_eval()


def test_vmap_runs_the_block_unfused():
    block, fused = (model.eval() for model in fused_pair(Bottleneck(32, 8, 1, se=dict(reduction=8))))
    xs = torch.randn(3, 2, 32, 5, 5)
    with torch.inference_mode():
        torch.testing.assert_close(torch.func.vmap(fused)(xs), torch.func.vmap(block)(xs), rtol=1e-5, atol=1e-5)


def test_weights_made_under_inference_mode_run_the_tail_unfolded():
    """Their changes bump no version counter, so nothing folded from them is kept."""
    with torch.inference_mode():
        block, fused = (model.eval() for model in fused_pair(Bottleneck(32, 8, 1, se=dict(reduction=8))))
        x = torch.randn(2, 32, 5, 5)
        torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)
        fused.bn3.running_var.mul_(2), block.bn3.running_var.mul_(2)
        torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)
    assert fused.fold_cache.constants is None


def test_folded_form_under_bf16_autocast_is_within_bf16_rounding_of_fp32():
    """And the constants folded under autocast are fp32's: an fp32 call after it is exact again."""
    block, fused = (model.eval() for model in fused_pair(Bottleneck(32, 8, 1, se=dict(reduction=8))))
    x = torch.randn(4, 32, 6, 6)
    with torch.inference_mode():
        reference = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = block(x), fused(x)
        assert fused.fold_cache.constants.weight.dtype == torch.float32
        torch.testing.assert_close(fused(x), reference, rtol=1e-5, atol=1e-5)
    assert all(out.dtype == torch.bfloat16 for out in outputs)
    unfused_error, fused_error = ((out.float() - reference).abs().max() for out in outputs)
    assert fused_error <= 2 * unfused_error


def test_fp64_is_exact_to_fp64_rounding():
    block, fused = fused_pair(Bottleneck(16, 4, 2, se=dict(reduction=4)).double())
    x = torch.randn(4, 16, 6, 6, dtype=torch.float64)
    assert_same_step(block, fused, x, tolerance=dict(rtol=1e-12, atol=1e-12))


@pytest.mark.parametrize("per_sample", [False, True], ids=["summed", "per-sample-sums"])
def test_bf16_autocast_is_within_bf16_rounding_of_fp32(monkeypatch, per_sample):
    """Fused under bf16 autocast is as close to the fp32 result as the unfused block is."""
    monkeypatch.setattr(fused_se, "PER_SAMPLE_SUMS_FROM", 0 if per_sample else fused_se.PER_SAMPLE_SUMS_FROM)
    block, fused = fused_pair(BasicBlock(16, 16, 1, se=dict(reduction=4)))
    x = torch.randn(4, 16, 6, 6)
    reference, reference_grad = run(copy.deepcopy(block), x, torch.ones(4, 16, 6, 6))
    errors = []
    for model in (block, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grad = run(model, x, torch.ones(4, 16, 6, 6))
        assert out.dtype == torch.bfloat16
        errors.append(((out.float() - reference).abs().max(), (grad - reference_grad).abs().max()))
    (unfused_out, unfused_grad), (fused_out, fused_grad) = errors
    assert fused_out <= 2 * unfused_out + 1e-2 and fused_grad <= 2 * unfused_grad + 1e-2


def test_whole_model_state_dict_and_training_steps_equal():
    """Same keys as the unfused model; three SGD steps in train mode give the same weights."""
    torch.manual_seed(0)
    unfused = create_model("se_resnet20", num_classes=5, fused=False)
    fused = create_model("se_resnet20", num_classes=5, fused=True)
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    fused.load_state_dict(unfused.state_dict())
    for model in (unfused, fused):
        torch.manual_seed(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 5, (4,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, expected), value in zip(unfused.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_training_is_deterministic():
    def weights_after_a_step():
        torch.manual_seed(0)
        model = create_model("se_resnet20", num_classes=5, fused=True)
        model(torch.randn(4, 3, 16, 16)).square().sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    assert torch.equal(weights_after_a_step(), weights_after_a_step())


def tail_arguments(shape, device="cpu", dtype=torch.float32, requires_grad=False) -> tuple:
    """Arguments of the fused tail op for a (N, C, H, W) map, channels_last, in train mode."""
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=torch.channels_last) + 3
    identity = torch.randn(shape, device=device, dtype=dtype)
    channels = shape[1]
    norm = (torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device))
    se = SEBlock(channels, reduction=7).to(device)
    tensors = [t.detach().clone().requires_grad_(requires_grad) for t in (x, identity, *norm, *se.parameters())]
    return (*tensors, None, None, 1e-5, "sigmoid")


def compare_backends(device: str, dtype: torch.dtype = torch.float32, shape=(2, 70, 5, 3), rtol=1e-5) -> None:
    """The fused tail's forward and backward with the Triton kernels equal them with the torch
    kernels (in fp32 to `rtol`: sums over many elements in another order differ by more than 1e-5)."""
    from setrain.models import fused_se_triton

    torch.manual_seed(0)
    arguments = tail_arguments(shape, device, dtype)
    x, _, *parameters = arguments[:8]
    grad = torch.randn(shape, device=device, dtype=dtype)
    results = {}
    for ops in (fused_se.TorchKernels, fused_se_triton):
        out, mean, var, means, hidden, g = fused_se._forward(ops, *arguments)
        grads = fused_se._backward(
            ops, grad, x, out, means, hidden, g, mean, var, *parameters, 1e-5, "sigmoid", True
        )
        results[ops] = [out, mean, var, means, hidden, g, *grads]
    tolerance = dict(rtol=rtol, atol=rtol) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for expected, value in zip(results[fused_se.TorchKernels], results[fused_se_triton]):
        torch.testing.assert_close(value, expected, **tolerance)


@pytest.mark.slow  # in the interpreter, in a fresh process: tens of seconds on a CPU
def test_triton_kernels_compute_the_torch_kernels():
    """On the GPU where there is one, else in Triton's interpreter, which must be switched on
    before triton is first imported: in a process of its own."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        compare_backends("cuda")
        return
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("training", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["train", "eval"])
def test_the_op_and_its_backward_pass_torch_library_opcheck(training):
    """Schema, autograd registration, fake kernels (shapes, strides, dtypes) and the op's results
    and gradients under AOT dispatch with dynamic shapes, as torch.library documents."""
    torch.manual_seed(0)
    arguments = list(tail_arguments((2, 14, 3, 4), requires_grad=True))
    if not training:
        arguments[8:10] = torch.randn(14) * 0.1, torch.rand(14) + 0.5
    torch.library.opcheck(fused_se.fused_tail, tuple(arguments))
    out, mean, var, means, hidden, g = fused_se.fused_tail(*arguments)
    x, _, *parameters = (t.detach() for t in arguments[:8])
    saved = (x, out.detach(), means, hidden, g, mean, var, *parameters)
    torch.library.opcheck(fused_se.fused_tail_backward, (torch.randn_like(out), *saved, 1e-5, "sigmoid", training))


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages that a forward keeps for the backward."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(storages.values())


def test_compiles_into_one_graph_of_the_opaque_ops_keeping_what_eager_keeps():
    """AOT autograd's forward graph calls the op once, its backward graph the backward op once,
    and the compiled block saves for the backward exactly the storages eager does."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def recorder(kind):
        def record(graph, example_inputs):
            graphs[kind].append(str(graph.code))
            return make_boxed_func(graph.forward)

        return record

    torch.manual_seed(0)
    block, fused = fused_pair(BasicBlock(8, 8, 1, se=dict(reduction=4)))
    x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    assert_same_step(block, compiled, x)
    assert graphs["backward"]
    assert all(graph.count("torch.ops.setrain.se_residual_tail_v2.default") == 1 for graph in graphs["forward"])
    backward_op = "torch.ops.setrain.se_residual_tail_backward_v2.default"
    assert all(graph.count(backward_op) == 1 for graph in graphs["backward"])
    assert saved_bytes(compiled, x) == saved_bytes(fused, x)


@pytest.mark.slow
def test_inductor_compiles_a_fused_se_resnet_whole_and_trains_it_as_eager_unfused():
    """fullgraph=True: no graph break; three SGD steps give the unfused model's weights, and the
    compiled model keeps no more for the backward than eager fused does."""
    torch.manual_seed(0)
    unfused = create_model("se_resnet20", num_classes=5, fused=False).to(memory_format=torch.channels_last)
    fused = create_model("se_resnet20", num_classes=5, fused=True).to(memory_format=torch.channels_last)
    fused.load_state_dict(unfused.state_dict())
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    compiled = torch.compile(fused, fullgraph=True)
    for model in (unfused, compiled):
        torch.manual_seed(1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 5, (4,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, expected), value in zip(unfused.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=name)
    assert saved_bytes(compiled, x) <= saved_bytes(fused, x)


def test_ddp_reduces_the_fused_gradients(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        block, fused = fused_pair(BasicBlock(8, 8, 1, se=dict(reduction=4)))
        assert_same_step(block, DistributedDataParallel(fused), torch.randn(2, 8, 4, 4))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fused_run_resumed_ends_identical_to_an_uninterrupted_one(tmp_path):
    """Through the CLI: 2 epochs, against 1 epoch and a resume to 2, fused; bitwise the same weights
    (a step schedule: the default cosine one depends on the number of epochs)."""
    from conftest import TINY, run_cli  # hydra, imported here: this file runs without it on a GPU

    from setrain.engine.checkpoint import load_checkpoint

    fused = [*TINY, "model.se.fused=true", "scheduler=step"]
    for run, epochs in (("whole", 2), ("split", 1), ("split", 2)):
        resume = ["resume=auto"] if run == "split" and epochs == 2 else []
        run_dir = f"hydra.run.dir={tmp_path / run}"
        done = run_cli(*fused, f"trainer.epochs={epochs}", *resume, run_dir, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    whole, split = (load_checkpoint(tmp_path / run / "checkpoints/last.pt")["model"] for run in ("whole", "split"))
    assert all(torch.equal(whole[key], split[key]) for key in whole)


def test_options_refused_and_variants_that_fall_back(caplog):
    with pytest.raises(SetrainError, match="model.se.fused='yes'"):
        create_model("se_resnet20", fused="yes")
    with pytest.raises(SetrainError, match="fused"):
        create_model("se_mobilenet_v1", fused=True)
    with caplog.at_level(logging.INFO):
        model = create_model("se_resnet20", fused=True, placement="pre")
    assert "placement=pre, squeeze=avg run unfused" in caplog.text
    assert not any(getattr(m, "fused", False) for m in model.modules())
    assert create_model("se_resnet20", fused=True, squeeze="max").layer1[0].fused is False


def test_configs_take_the_shared_se_options_and_fused_reaches_the_blocks():
    from conftest import compose_config  # hydra, imported here: this file runs without it on a GPU

    for name in ("se_resnet20", "senet18_cifar", "se_resnext50_32x4d", "senet154"):  # each kind of ResNet config
        assert compose_config(f"model={name}").model.se.fused == "auto", name
    cfg = compose_config("model=senet18_cifar", "model.se.fused=true", "model.se.reduction=8")
    model = build_model(cfg.model, num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert blocks and all(block.fused is True for block in blocks)
    assert blocks[0].se.excitation[0].out_features == 64 // 8


def test_sync_batchnorm_runs_unfused(monkeypatch):
    """Its batch statistics are all processes': the fused tail's would be this process's only."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(create_model("se_resnet20", fused=True))
    monkeypatch.setattr(fused_se, "fused_tail", lambda *a: _unreachable())
    model(torch.randn(2, 3, 8, 8))  # without a process group SyncBatchNorm computes BN


def test_hooks_on_the_last_conv_run_and_change_the_result_as_unfused():
    """Pruning works by such a hook (a forward pre-hook computing the weight), which the folded
    form would skip: the block runs unfused while one is there."""
    block, fused = (model.eval() for model in fused_pair(Bottleneck(32, 8, 1, se=dict(reduction=8))))
    for model in (block, fused):
        prune.l1_unstructured(model.conv3, "weight", amount=0.5)
        model.conv3.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    x = torch.randn(2, 32, 5, 5)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)
    assert fused.fold_cache.constants is None


def test_hooks_on_se_modules_see_the_gates_and_a_block_without_se_runs():
    """The fused forward calls no SE module: while a hook watches one, its block runs unfused."""
    model = create_model("se_resnet20", num_classes=3, fused=True)
    x = torch.randn(2, 3, 8, 8)
    gates = []
    handle = model.layer1[0].se.excitation.register_forward_hook(lambda module, inputs, gate: gates.append(gate))
    model(x)
    with torch.inference_mode():
        model.eval()(x)
    handle.remove()
    assert [gate.shape for gate in gates] == [(2, 16), (2, 16)]
    model.layer1[0].se = nn.Identity()  # SE taken out of a block by hand: it runs as a plain block
    with torch.inference_mode():
        model(x)


def test_auto_follows_the_device_table(monkeypatch):
    """Keyed by device type, compilation and inference (eval mode without autograd)."""
    model = create_model("se_resnet20", num_classes=3)
    x = torch.randn(1, 3, 8, 8)
    calls = []
    monkeypatch.setattr(fused_se, "fused_tail", lambda *a: calls.append(1) or _unreachable())
    monkeypatch.setattr(fused_se.FoldCache, "__call__", lambda *a: calls.append(1) or _unreachable())
    monkeypatch.setitem(fused_se.AUTO, ("cpu", False, False), False)
    monkeypatch.setitem(fused_se.AUTO, ("cpu", False, True), False)
    model(x)
    with torch.inference_mode():
        model.eval()(x)
    assert calls == []
    monkeypatch.setitem(fused_se.AUTO, ("cpu", False, True), True)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="fused path taken"):
        model(x)
    monkeypatch.setitem(fused_se.AUTO, ("cpu", False, False), True)
    with pytest.raises(RuntimeError, match="fused path taken"):
        model.train()(x)


def _unreachable():
    raise RuntimeError("fused path taken")


if __name__ == "__main__":  # the kernels on a GPU without pytest's conftest (hydra), or interpreted
    if torch.cuda.is_available():
        for dtype in (torch.float32, torch.bfloat16):
            compare_backends("cuda", dtype, shape=(64, 256, 28, 28), rtol=5e-4)
        print("Triton kernels equal the torch kernels on CUDA (fp32, bf16)")
        torch.library.opcheck(fused_se.fused_tail, tail_arguments((4, 64, 7, 7), "cuda", requires_grad=True))
        print("opcheck passes on CUDA: the Triton path's outputs match the fake kernels, eager and compiled")
    else:
        compare_backends("cpu")
        print("Triton kernels equal the torch kernels on the CPU (fp32)")
