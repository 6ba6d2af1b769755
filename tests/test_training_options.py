"""The engine's optimisation and speed options (configs/trainer, optimizer, scheduler), each
checked for the fact it promises, on tiny models and runs."""

import logging
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from setrain.config_checks import check_trainer_options
from setrain.data.transforms import batch_mixing
from setrain.engine import runtime, train, trainer
from setrain.engine.checkpoint import load_checkpoint
from setrain.engine.loop import EpochTotals, StepSettings, train_steps
from setrain.engine.optim import build_optimizer, build_scheduler
from setrain.errors import SetrainError

CPU = torch.device("cpu")


def linear_batches(count: int, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, 1, 1, generator=generator), torch.randint(0, 3, (size,), generator=generator)) for _ in range(count)]


class Linear(nn.Module):
    """No BatchNorm: a batch of 2n equals two batches of n only without batch statistics."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def run_steps(model, settings, batches, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    totals = EpochTotals()
    losses = list(train_steps(model, settings, optimizer, iter(batches), len(batches), CPU, totals))
    return losses, totals


def test_accumulating_two_half_batches_is_one_step_on_the_whole_batch():
    halves = linear_batches(4, 8)
    wholes = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(halves[::2], halves[1::2])]
    accumulated, whole = Linear(), Linear()
    steps, totals = run_steps(accumulated, StepSettings(nn.CrossEntropyLoss(), accumulate=2), halves)
    run_steps(whole, StepSettings(nn.CrossEntropyLoss()), wholes)
    assert len(steps) == 2 and totals.batches == 4 and totals.seen == 32
    assert torch.allclose(accumulated.fc.weight, whole.fc.weight, atol=1e-6)


def test_an_epoch_that_does_not_divide_by_the_accumulation_still_steps_on_its_last_batches():
    steps, totals = run_steps(Linear(), StepSettings(nn.CrossEntropyLoss(), accumulate=2), linear_batches(5, 8))
    assert len(steps) == 3 and totals.batches == 5


def test_clipping_bounds_the_gradient_norm_of_each_step():
    model = Linear()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    run_steps(model, StepSettings(nn.CrossEntropyLoss(), clip_norm=1e-3), linear_batches(1, 8), lr=1.0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() == pytest.approx(1e-3, rel=1e-3)  # plain SGD moves lr x clipped grad


def test_mixup_and_cutmix_train_on_soft_targets():
    mix = batch_mixing(0.2, 1.0, num_classes=3)
    images, labels = linear_batches(1, 8)[0]
    mixed, targets = mix(images.expand(8, 4, 8, 8).contiguous(), labels)
    assert targets.shape == (8, 3) and torch.allclose(targets.sum(1), torch.ones(8))
    assert batch_mixing(0.0, 0.0, 3) is None
    with pytest.raises(SetrainError, match="mixup_alpha=-1"):
        batch_mixing(-1, 0, 3)


def test_weight_decay_can_spare_norm_weights_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    node = OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.1, "weight_decay": 1e-4, "decay_norm_and_bias": False})
    decayed, spared = build_optimizer(node, model, 8).param_groups
    assert [p.ndim for p in decayed["params"]] == [4, 2] and decayed["weight_decay"] == 1e-4
    assert all(p.ndim == 1 for p in spared["params"]) and spared["weight_decay"] == 0.0


def epoch_lrs(scheduler_cfg: dict, epochs: int) -> list[float]:
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    scheduler = build_scheduler(OmegaConf.create(scheduler_cfg), optimizer, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_rises_linearly_then_hands_over_to_the_schedule():
    step = {"_target_": "torch.optim.lr_scheduler.MultiStepLR", "milestones": [2], "gamma": 0.1,
            "warmup_epochs": 2, "warmup_start_factor": 0.1}  # fmt: skip
    assert epoch_lrs(step, 6) == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.1, 0.1])
    cosine = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": None, "warmup_epochs": 2}
    lrs = epoch_lrs(cosine, 6)
    assert lrs[2] == pytest.approx(1.0) and lrs[4] == pytest.approx(0.5)  # cosine over the 4 epochs left


def test_plateau_refuses_a_warmup():
    plateau = {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau", "warmup_epochs": 1}
    with pytest.raises(SetrainError, match="plateau cannot follow a warmup"):
        epoch_lrs(plateau, 2)


@pytest.mark.slow
def test_every_option_together_trains_and_checkpoints_its_state(tiny_config, tmp_path):
    config = tiny_config(
        "optimizer=adamw", "scheduler=multistep", "scheduler.milestones=[1]", "scheduler.warmup_epochs=1",
        "trainer.precision=16", "trainer.channels_last=true", "trainer.label_smoothing=0.1",
        "trainer.grad_clip_norm=5", "trainer.accumulate_grad_batches=2", "trainer.ema_decay=0.9",
        "trainer.mixup_alpha=0.2", "trainer.cutmix_alpha=1.0", "trainer.epochs=3",
    )  # fmt: skip
    results = train(config, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert results["global_step"] == 3 * 2  # 4 batches per epoch, a step per 2
    assert state["scaler"]["scale"] > 0 and state["ema_updates"] == 6
    assert state["model"]["conv1.weight"].is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(state["ema"]["fc.weight"], state["model"]["fc.weight"])
    assert {"val_ema_top1", "val_top1"} <= set(results["final"])


@pytest.mark.slow
def test_compiled_run_trains_like_the_eager_one(tiny_config, tmp_path):
    train(tiny_config("trainer.epochs=1"), tmp_path / "eager")
    train(tiny_config("trainer.epochs=1", "trainer.compile=aot_eager"), tmp_path / "compiled")
    eager, compiled = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["model"] for run in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    assert all(torch.allclose(eager[key].float(), compiled[key].float(), atol=1e-5) for key in eager)


def test_deterministic_mode_is_on_during_the_run_only(tiny_config, tmp_path, monkeypatch):
    seen, build_data = [], trainer.build_data

    def build_data_and_record(*args):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return build_data(*args)

    monkeypatch.setattr(trainer, "build_data", build_data_and_record)
    train(tiny_config("trainer.epochs=1", "trainer.deterministic=true", "data.train_size=32"), tmp_path)
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()


REFAULTS_OF_A_FREED_TENSOR = """
import resource, torch
from setrain.engine.runtime import freed_memory_kept

def faults_of_a_new_64mib_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB, written once and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_new_64mib_tensor()
default = faults_of_a_new_64mib_tensor()
with freed_memory_kept(True):
    for _ in range(2):  # the heap grows until a freed block fits the next aligned request
        faults_of_a_new_64mib_tensor()
    kept = sum(faults_of_a_new_64mib_tensor() for _ in range(3))
faults_of_a_new_64mib_tensor()
print(default, kept, faults_of_a_new_64mib_tensor())
"""


@pytest.mark.slow
def test_freed_tensor_memory_is_reused_without_page_faults_until_the_run_ends():
    """In a process of its own, as malloc's settings belong to the process."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages fault 2 MiB at a time: too few faults to compare")
    output = subprocess.run([sys.executable, "-c", REFAULTS_OF_A_FREED_TENSOR], capture_output=True, text=True)
    assert output.returncode == 0, output.stderr
    default, kept, after = map(int, output.stdout.split())
    pages = 64 * 2**20 // resource.getpagesize()
    if default >= pages and kept >= pages:
        pytest.skip("the C library is not glibc: malloc's settings were left alone")
    assert default >= pages and kept < pages // 100  # each page faults every time by default
    assert after >= pages  # and again once the run is over


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_runs_keep_freed_memory_unless_told_not_to(tiny_config, tmp_path, monkeypatch, keep):
    """And set malloc back to glibc's defaults, giving the kept memory back, when the run ends: for
    the next job of a sweep."""
    calls = []
    monkeypatch.setattr(runtime, "_mallopt", lambda *values: calls.append(values) or True)
    monkeypatch.setattr(runtime, "_trim_heap", lambda: calls.append("malloc_trim"))
    train(tiny_config("trainer.epochs=1", "data.train_size=32", f"trainer.keep_freed_memory={str(keep).lower()}"), tmp_path)
    assert calls == ([(-1, 0), (runtime.DEFAULT_TRIM_THRESHOLD, runtime.DEFAULT_MMAP_MAX), "malloc_trim"] if keep else [])


def test_early_stop_ends_the_run_after_patience_epochs_without_a_better_top1(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: {"loss": 1.0, "top1": 50.0, "top5": 90.0})
    results = train(tiny_config("trainer.epochs=10", "trainer.early_stop_patience=2", "data.train_size=32"), tmp_path)
    assert results["stopped_early_at"] == 3 and results["final"]["epoch"] == 3
    assert results["best"]["epoch"] == 1


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.precision=8", "trainer.precision=8 is not known; use auto, 32, bf16 or 16"),
        ("trainer.accumulate_grad_batches=0", "accumulate_grad_batches=0 must be a positive integer"),
        ("trainer.ema_decay=1.5", "ema_decay=1.5 must be between 0 and 1"),
        ("trainer.grad_clip_norm=0", "grad_clip_norm=0 must be positive"),
        ("trainer.label_smoothing=1", "label_smoothing=1 must be in"),
        ("trainer.epochs=0", "trainer.epochs=0 must be at least 1"),
    ],
)
def test_option_values_that_cannot_work_are_refused(tiny_config, override, message):
    """By the config checks, before the run dir exists (python train.py and setrain.train run them)."""
    with pytest.raises(SetrainError, match=message):
        check_trainer_options(tiny_config(override).trainer)


def test_tensorboard_shows_steps_excitations_and_images(tiny_config, tmp_path):
    train(tiny_config("trainer.log_every_n_steps=2"), tmp_path)
    train_run = EventAccumulator(str(tmp_path / "tb" / "train")).Reload()
    assert [event.step for event in train_run.Scalars("step/loss")] == [2, 4, 6, 8]
    assert [event.step for event in train_run.Scalars("step/lr")] == [2, 4, 6, 8]
    assert [event.step for event in train_run.Scalars("epoch/loss")] == [4, 8]  # one x axis: optimizer steps
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    tags = events.Tags()
    assert {"se_gates/stage_2", "se_gates/stage_3", "se_gates/stage_4"} == set(tags["histograms"])
    gates = events.Histograms("se_gates/stage_2")
    assert [event.step for event in gates] == [4, 8] and 0 <= gates[0].histogram_value.min <= gates[0].histogram_value.max <= 1
    assert tags["images"] == ["samples/train_batch"]
    assert tags["scalars"] == []  # every curve is in tb/train or tb/val


def test_without_a_terminal_progress_is_logged_every_n_steps(tiny_config, tmp_path, caplog):
    """Under SLURM or nohup the bar is off: a line per log_every_n_steps with loss, lr and speed."""
    with caplog.at_level(logging.INFO, logger="setrain.engine.trainer"):
        train(tiny_config("trainer.epochs=1", "trainer.log_every_n_steps=2"), tmp_path)
    lines = [record.getMessage() for record in caplog.records if " step " in record.getMessage()]
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/1 step 2/4", "epoch 1/1 step 4/4"]
    assert all(line.endswith("img/s") and float(line.split()[-2]) > 0 for line in lines)


def test_auto_speed_settings_are_gpu_first_and_leave_the_cpu_as_it_was(monkeypatch):
    from setrain.engine.runtime import resolve_channels_last, resolve_compile, resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (resolve_precision("auto", cpu), resolve_channels_last("auto", cpu), resolve_compile("auto", cpu)) == ("32", False, None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert (resolve_precision("auto", cuda), resolve_channels_last("auto", cuda), resolve_compile("auto", cuda)) == ("bf16", True, "inductor")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", cuda) == "16"
    assert (resolve_precision("bf16", cpu), resolve_channels_last(True, cpu), resolve_compile(False, cuda)) == ("bf16", True, None)
    assert resolve_compile("aot_eager", cpu) == "aot_eager"


@pytest.mark.parametrize("visible, local_rank, index", [(8, 3, 3), (1, 3, 0), (4, 5, 1)])
def test_each_process_takes_the_gpu_it_sees(monkeypatch, visible, local_rank, index):
    """All of the node's GPUs (torchrun, gpus_per_node) or one per task (SLURM's gpus_per_task=1)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert runtime.process_gpu(local_rank) == torch.device("cuda", index)
