"""Optimizer and learning-rate schedule from configs/optimizer/ and configs/scheduler/.

Each file names a torch class with `_target_`; its other keys are that class's arguments, except
the few setrain options below, which change how the object is built rather than being passed on.
Add an optimizer or scheduler with one YAML file.
"""

import warnings

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LinearLR, LRScheduler, ReduceLROnPlateau, SequentialLR

from setrain.errors import SetrainError

# optimizer.reference_batch_size: `lr` is the rate for that batch, scaled linearly to the batch
#   actually used, batch_size x accumulation x processes (Goyal et al. 2017; the paper's 0.6 at 1024).
# optimizer.decay_norm_and_bias: false exempts BatchNorm weights and all biases from weight decay.
OPTIMIZER_OPTIONS = ("reference_batch_size", "decay_norm_and_bias")
# scheduler.warmup_epochs: raise the lr linearly from warmup_start_factor x lr over these epochs.
SCHEDULER_OPTIONS = ("warmup_epochs", "warmup_start_factor")


def _split(node: DictConfig, options: tuple[str, ...]) -> tuple[DictConfig, dict]:
    container = OmegaConf.to_container(node, resolve=True)
    own = {key: container.pop(key) for key in options if key in container}
    return OmegaConf.create(container), own


def _instantiate(group: str, node: DictConfig, *args):
    """Build torch's own class named by `_target_` on `args` (parameters, or the optimizer, which
    Hydra should pass through untouched: hence `_partial_`), turning a bad value into one sentence."""
    try:
        return instantiate(node, _partial_=True)(*args)
    except (InstantiationException, TypeError, ValueError) as error:
        cause = error.__cause__ or error
        raise SetrainError(
            f"Could not build the {group} {node.get('_target_')} from configs/{group}/: {cause}; "
            f"fix the {group}.* values."
        ) from error


def build_optimizer(node: DictConfig, model: nn.Module, effective_batch_size: int) -> Optimizer:
    """The optimizer of configs/optimizer/<name>.yaml over `model`'s parameters."""
    node, own = _split(node, OPTIMIZER_OPTIONS)
    if own.get("reference_batch_size"):
        node.lr = node.lr * effective_batch_size / own["reference_batch_size"]
    params = model.parameters()
    if own.get("decay_norm_and_bias", True) is False:
        # One-dimensional parameters are exactly the norm weights and the biases.
        decayed = [p for p in model.parameters() if p.ndim > 1]
        exempt = [p for p in model.parameters() if p.ndim <= 1]
        params = [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]
    return _instantiate("optimizer", node, params)


def build_scheduler(node: DictConfig, optimizer: Optimizer, epochs: int) -> LRScheduler | ReduceLROnPlateau:
    """The schedule of configs/scheduler/<name>.yaml, stepped once per epoch (as torchvision's
    reference does), after an optional linear warmup; its epoch counts exclude the warmup, and a
    cosine `T_max: null` spans the rest of the run."""
    node, own = _split(node, SCHEDULER_OPTIONS)
    warmup_epochs = own.get("warmup_epochs") or 0
    if "T_max" in node and node.T_max is None:
        node.T_max = max(1, epochs - warmup_epochs)
    scheduler = _instantiate("scheduler", node, optimizer)
    if warmup_epochs <= 0:
        return scheduler
    if isinstance(scheduler, ReduceLROnPlateau):
        raise SetrainError(
            "scheduler=plateau cannot follow a warmup (torch's SequentialLR does not chain it); "
            "set scheduler.warmup_epochs=0 or pick scheduler=step, multistep or cosine."
        )
    warmup = LinearLR(
        optimizer, start_factor=own.get("warmup_start_factor", 0.1), total_iters=warmup_epochs
    )
    return SequentialLR(optimizer, [warmup, scheduler], milestones=[warmup_epochs])


def continue_schedule(node: DictConfig, optimizer: Optimizer, epochs: int, epochs_done: int, base_lrs: list[float]):
    """The schedule of the current settings, advanced past `epochs_done` epochs: a resumed run
    whose learning rate, scheduler or length changed follows the new plan from where it stands
    (a plateau scheduler starts its patience afresh at the new rate)."""
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = group["initial_lr"] = lr
    scheduler = build_scheduler(node, optimizer, epochs)
    if not isinstance(scheduler, ReduceLROnPlateau):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # stepped without optimizer steps, on purpose
            for _ in range(epochs_done):
                scheduler.step()
    return scheduler
