"""`data.repeated_augment=<k>`: repeated augmentation (Hoffer et al. 2020, Berman et al. 2019),
sampled as torchvision's references and DeiT do (RASampler): each image k times in a row, dealt to
the processes in turn, so under DDP its augmented copies spread over the processes (with k
processes, one copy each in the same step); an epoch keeps the dataset's length, so it holds
about 1/k of the distinct images.
The order depends only on the epoch's seed, which exact resume needs (DataBundle.set_epoch).
"""

import torch
from torch import Tensor
from torch.utils.data import Sampler


def repeated_order(size: int, repeats: int, epoch_seed: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """This process's sample indices for an epoch: the shuffled dataset, each index `repeats` times
    in a row, every world_size-th from `rank`, cut to size // world_size (one repeat: a plain
    shuffle, as DistributedSampler deals it)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(epoch_seed))
    return order.repeat_interleave(repeats)[rank::world_size][: size // world_size]


class RepeatedAugmentSampler(Sampler[int]):
    """A DataLoader sampler of `repeated_order`, reseeded by `set_epoch` as DistributedSampler is."""

    def __init__(self, size: int, repeats: int, rank: int = 0, world_size: int = 1):
        self.size, self.repeats, self.rank, self.world_size = size, repeats, rank, world_size
        self.epoch_seed = 0

    def set_epoch(self, epoch_seed: int) -> None:
        self.epoch_seed = epoch_seed

    def __iter__(self):
        return iter(repeated_order(self.size, self.repeats, self.epoch_seed, self.rank, self.world_size).tolist())

    def __len__(self) -> int:
        return self.size // self.world_size
