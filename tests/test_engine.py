"""The engine in-process on tiny shapes runs: checkpoints, determinism, errors a user can cause."""

import errno
import json
import math
import pickle

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from setrain.engine import train, trainer
from setrain.engine.checkpoint import load_checkpoint, save_checkpoint
from setrain.engine.loop import topk_correct
from setrain.errors import SetrainError
from setrain.testing import write_cifar10

from conftest import compose_config


def test_topk_counts_targets_among_the_highest_logits():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    top1, top2 = topk_correct(logits, targets, ks=(1, 2))
    assert (top1.item(), top2.item()) == (1, 2)


def test_checkpoint_is_replaced_atomically(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1}, path)
    save_checkpoint({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"\x00\x13random bytes" * 10, "cannot be read"),
        (pickle.dumps({"epoch": 3}, protocol=2), "cannot be read"),
    ],
)
def test_unreadable_checkpoints_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SetrainError, match=message):
        load_checkpoint(path)


def test_truncated_checkpoint_and_foreign_dict_are_refused(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.zeros(1000)}, "optimizer": {}, "scheduler": {}, "epoch": 1}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(SetrainError, match="truncated, corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(SetrainError, match="not a setrain training checkpoint"):
        load_checkpoint(foreign)


class _RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsCode(), "optimizer": {}, "scheduler": {}, "epoch": 1}, path)
    with pytest.raises(SetrainError, match="holds pickled Python objects, which could run code"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_a_run_writes_checkpoints_curves_and_results(tiny_run):
    run_dir, results = tiny_run
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    written = json.loads((run_dir / "results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["model"] == "se_resnet20" and written["final"]["epoch"] == 2
    assert 0 <= written["best"]["val_top1"] <= 100 and written["params"] > 0
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["config"]["model"]["name"] == "se_resnet20"


def test_tensorboard_has_train_and_val_curves(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tiny_run
    train_run, val_run = (EventAccumulator(str(run_dir / "tb" / run)).Reload() for run in ("train", "val"))
    assert {"epoch/loss", "epoch/top1", "speed/images_per_s"} <= set(train_run.Tags()["scalars"])
    assert {"epoch/loss", "epoch/top1", "epoch/top5", "epoch/best_top1"} == set(val_run.Tags()["scalars"])
    assert [event.step for event in val_run.Scalars("epoch/loss")] == [4, 8]  # optimizer steps: 4 an epoch


@pytest.mark.slow
def test_same_seed_gives_bitwise_identical_weights(tiny_config, tmp_path):
    train(tiny_config(), tmp_path / "a")
    train(tiny_config(), tmp_path / "b")
    train(tiny_config("seed=1"), tmp_path / "c")
    a, b, c = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt")["model"] for run in "abc")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


class Interrupted(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["plateau", "step", "cosine"])
def test_resumed_run_ends_identical_to_an_uninterrupted_one(tiny_config, tmp_path, monkeypatch, scheduler):
    config = tiny_config(f"scheduler={scheduler}", "trainer.epochs=3")
    train(config, tmp_path / "whole")

    def save_then_stop_after_epoch_1(state, path):
        save_checkpoint(state, path)
        if state["epoch"] == 1 and path.name == "last.pt":
            raise Interrupted

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop_after_epoch_1)
    with pytest.raises(Interrupted):
        train(config, tmp_path / "split")
    monkeypatch.undo()
    train(tiny_config(f"scheduler={scheduler}", "trainer.epochs=3", "resume=auto"), tmp_path / "split")

    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert split["epoch"] == whole["epoch"] == 3
    assert all(torch.equal(whole["model"][key], split["model"][key]) for key in whole["model"])
    assert split["scheduler"] == whole["scheduler"]
    assert split["best"] == whole["best"]


def stop_after_saving_step(step: int):
    """A save_checkpoint that raises right after writing the step-`step` checkpoint, as if killed."""

    def save_then_stop(state, path):
        save_checkpoint(state, path)
        if state["global_step"] == step and state["epoch_progress"] is not None:
            raise Interrupted

    return save_then_stop


MID_EPOCH = [
    "trainer.epochs=3", "trainer.checkpoint_every_n_steps=3", "trainer.ema_decay=0.9",
    "trainer.mixup_alpha=0.4", "trainer.label_smoothing=0.1", "optimizer=adamw", "scheduler=multistep",
    "scheduler.milestones=[2]", "scheduler.warmup_epochs=1",
]  # fmt: skip


def resume_mid_epoch_and_compare(config, resumed_config, tmp_path, monkeypatch, step: int) -> dict:
    """Train whole; train again but stop right after the step-`step` checkpoint; resume; the
    final checkpoints must agree bitwise. Returns the interrupted checkpoint."""
    train(config, tmp_path / "whole")
    monkeypatch.setattr(trainer, "save_checkpoint", stop_after_saving_step(step))
    with pytest.raises(Interrupted):
        train(config, tmp_path / "split")
    monkeypatch.undo()
    interrupted = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    train(resumed_config, tmp_path / "split")
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    for part in {"model", "ema"} & whole.keys():
        assert all(torch.equal(whole[part][key], split[part][key]) for key in whole[part]), part
    assert split["metrics"] == whole["metrics"] | {"train_images_per_s": split["metrics"]["train_images_per_s"]}
    assert (split["global_step"], split["best"]) == (whole["global_step"], whole["best"])
    return interrupted


@pytest.mark.slow
def test_resume_inside_an_epoch_ends_identical_to_an_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    """4 batches per epoch: step 6 is halfway through epoch 2, with EMA, MixUp, warmup and all."""
    interrupted = resume_mid_epoch_and_compare(
        tiny_config(*MID_EPOCH), tiny_config(*MID_EPOCH, "resume=auto"), tmp_path, monkeypatch, step=6
    )
    assert (interrupted["epoch"], interrupted["epoch_progress"]["batches"]) == (1, 2)


@pytest.mark.slow
def test_a_checkpoint_write_cut_short_leaves_last_pt_to_resume_from(tiny_config, tmp_path):
    """kill -9 during torch.save leaves a partial last.pt.tmp beside the intact last.pt."""
    train(tiny_config("trainer.epochs=1"), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    (tmp_path / "checkpoints" / "last.pt.tmp").write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    results = train(tiny_config("resume=auto"), tmp_path)
    assert results["final"]["epoch"] == 2 and load_checkpoint(last)["epoch"] == 2
    assert sorted(path.name for path in last.parent.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_resume_from_a_run_dir_continues_its_last_checkpoint(tiny_config, tmp_path):
    """The run dir that a run's or a sweep's last lines print is enough for resume=."""
    train(tiny_config("trainer.epochs=1"), tmp_path / "first")
    results = train(tiny_config(f"resume={tmp_path / 'first'}"), tmp_path / "second")
    assert results["final"]["epoch"] == 2
    assert load_checkpoint(tmp_path / "second" / "checkpoints" / "last.pt")["global_step"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["data.pipeline=workers", "data.pipeline=device"])
def test_resume_inside_an_epoch_replays_the_augmentation(tmp_path, monkeypatch, pipeline):
    """CIFAR files with random crops and flips, by 2 workers or on the device: after resuming,
    the batches must be the same augmented images as in the uninterrupted run."""
    write_cifar10(tmp_path / "datasets", train_per_batch=16)
    cifar = [
        "data=cifar10", f"data.root={tmp_path / 'datasets'}", "data.num_workers=2", "data.batch_size=16", pipeline,
        "model=resnet20", "trainer.epochs=2", "trainer.checkpoint_every_n_steps=2", "trainer.device=cpu",
    ]  # fmt: skip
    interrupted = resume_mid_epoch_and_compare(
        compose_config(*cifar), compose_config(*cifar, "resume=auto"), tmp_path, monkeypatch, step=4
    )
    assert (interrupted["epoch"], interrupted["epoch_progress"]["batches"]) == (0, 4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=se_resnet21"], "Unknown model 'se_resnet21'"),
        (["model.se.reduction=32"], "too large for a layer of 16 channels"),
        (["model.se.reduction=0"], "must be a positive integer"),
        (["data.name=mnist"], "Unknown dataset 'mnist'"),
        (["trainer.device=tpu"], "trainer.device='tpu' is not supported"),
        (["optimizer.lr=-1"], "Could not build the optimizer torch.optim.SGD.*-1"),
        (["resume=missing.pt"], "Checkpoint missing.pt does not exist"),
    ],
)
def test_user_errors_are_one_clear_sentence(tiny_config, tmp_path, overrides, message):
    with pytest.raises(SetrainError, match=message):
        train(tiny_config(*overrides), tmp_path)


def test_missing_dataset_is_a_user_error(tmp_path):
    config = compose_config("data=stl10", "data.root=nowhere", "trainer.device=cpu")
    with pytest.raises(SetrainError, match="STL10 files not found in /.*/nowhere/stl10_binary"):
        train(config, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_user_error(tiny_config, tmp_path):
    with pytest.raises(SetrainError, match="sees no CUDA GPU"):
        train(tiny_config("trainer.device=cuda"), tmp_path)


@pytest.mark.slow
def test_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
    train(tiny_config("trainer.epochs=1"), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    good = last.read_bytes()
    with pytest.raises(SetrainError, match="training loss became (nan|inf).*lower the learning rate"):
        train(tiny_config("optimizer.lr=1e30"), tmp_path)
    assert last.read_bytes() == good


def test_a_full_disk_when_writing_results_is_one_sentence(tiny_config, tmp_path, monkeypatch):
    def disk_fills_midway(path, write, write_atomically=trainer.write_atomically):
        def half_then_full(file):
            file.write(b"{")
            raise OSError(errno.ENOSPC, "No space left on device")

        write_atomically(path, half_then_full)

    monkeypatch.setattr(trainer, "write_atomically", disk_fills_midway)  # only results.json uses it
    with pytest.raises(SetrainError, match="Could not write .*results.json \\(No space left on device\\); the checkpoints are saved"):
        train(tiny_config("trainer.epochs=1"), tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").is_file() and not list(tmp_path.glob("results.json*"))


@pytest.mark.slow
def test_a_best_checkpoint_that_could_not_be_written_is_written_on_resume(tiny_config, tmp_path, monkeypatch):
    """The disk fills while best.pt is written: after resume=auto, best.pt is the epoch results.json names."""

    def disk_full_for_the_first_best(state, path):
        if path.name == "best.pt" and not path.exists():
            raise SetrainError(f"The disk is full: could not write checkpoint {path}")
        save_checkpoint(state, path)

    monkeypatch.setattr(trainer, "save_checkpoint", disk_full_for_the_first_best)
    with pytest.raises(SetrainError, match="disk is full"):
        train(tiny_config(), tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # the epoch is redone on resume
    results = train(tiny_config("resume=auto"), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["epoch"] == results["best"]["epoch"] >= 1


@pytest.mark.slow
def test_resume_follows_a_changed_plan_and_refuses_fewer_epochs_than_done(tiny_config, tmp_path):
    """A longer run or a new lr on resume: the lr of its last epoch is that of a run started with
    those settings (a cosine of 2 epochs stretched to 4), not the old period's."""
    train(tiny_config("trainer.epochs=2"), tmp_path / "split")
    resumed = train(tiny_config("trainer.epochs=4", "optimizer.lr=0.2", "resume=auto"), tmp_path / "split")
    whole = train(tiny_config("trainer.epochs=4", "optimizer.lr=0.2"), tmp_path / "whole")
    assert resumed["final"]["lr"] == whole["final"]["lr"] == pytest.approx(0.2 * (1 + math.cos(math.pi * 3 / 4)) / 2)
    with pytest.raises(SetrainError, match="has trained 4 epochs, more than trainer.epochs=3"):
        train(tiny_config("trainer.epochs=3", "optimizer.lr=0.2", "resume=auto"), tmp_path / "split")


def test_curves_that_cannot_be_written_are_one_sentence_and_keep_the_checkpoints(tiny_config, tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tb").write_text("a file where the curves' folder goes")
    with pytest.raises(SetrainError, match=r"Could not write the TensorBoard curves in .*tb"):
        train(tiny_config(), tmp_path / "a")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full)
    with pytest.raises(SetrainError, match=r"curves in .*tb \(No space left on device\); free space"):
        train(tiny_config(), tmp_path / "b")
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["epoch"] == 1
