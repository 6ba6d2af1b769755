"""`data.pipeline=device`: batches decoded and augmented on the training device, so the GPU never
waits for CPU workers (the approach of NVIDIA DALI and airbench, with torch and torchvision alone).

Array datasets (CIFAR, STL10, shapes) live on the device as uint8 and are indexed there; image
folders are read as bytes by workers and decoded in batches on the device (nvJPEG on CUDA), with
the CPU (PIL) for what nvJPEG cannot read. The augmentation is the dataset's own torchvision v2
recipe (transforms.py) run on a whole batch, with random draws from a generator seeded by
(epoch seed, rank, batch): a rerun or a resumed run sees the same crops and erasures whatever the
timing. The policies have no batched form here (`unbatched_steps`): `data.pipeline=auto` loads
them with workers instead. A background thread prepares the next batches (on a side CUDA stream)
while the model trains.
"""

import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from setrain.data.sampling import repeated_order
from setrain.errors import SetrainError

PREFETCH_BATCHES = 3


GEOMETRY = (v2.Resize, v2.CenterCrop, v2.RandomResizedCrop, v2.RandomCrop, v2.RandomHorizontalFlip)


def recipe_steps(recipe: v2.Compose) -> tuple[list, v2.RandomErasing | None]:
    """A recipe's steps up to Normalize, and its RandomErasing after Normalize, if any."""
    steps = [step for step in recipe.transforms if not isinstance(step, (v2.ToImage, v2.ToDtype))]
    erasing = steps.pop() if steps and isinstance(steps[-1], v2.RandomErasing) else None
    return steps, erasing


def unbatched_steps(recipe: v2.Compose) -> list[str]:
    """What of a recipe BatchTransform has no batched form for. The policies (RandAugment,
    TrivialAugmentWide, AutoAugment) are among them: torchvision draws their operations from
    torch's global generator, which the prefetch thread cannot seed without racing the training
    loop's draws (MixUp, dropout), so on the device they would be neither seeded nor cheap."""
    steps, _ = recipe_steps(recipe)
    unsupported = [type(step).__name__ for step in steps if not isinstance(step, (*GEOMETRY, v2.Normalize))]
    return unsupported or ([] if steps and isinstance(steps[-1], v2.Normalize) else ["without Normalize"])


class BatchTransform:
    """A v2 recipe (ToImage, geometric steps, ToDtype, Normalize, RandomErasing) applied to a batch
    at once.

    Images may arrive as a list of differently sized (C, H, W) uint8 tensors (decoded files):
    steps run per image until one makes them one size, then on the stacked batch.
    """

    def __init__(self, recipe: v2.Compose):
        unsupported = unbatched_steps(recipe)
        if unsupported:
            raise SetrainError(
                f"data.pipeline=device cannot run the transform(s) {', '.join(unsupported)} on the device; "
                "use data.pipeline=workers (or auto, which switches to it)."
            )
        steps, self.erasing = recipe_steps(recipe)
        self.steps, normalize = steps[:-1], steps[-1]
        self.mean = torch.tensor(normalize.mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(normalize.std).view(1, -1, 1, 1) * 255

    def __call__(self, images: Tensor | list[Tensor], generator: torch.Generator) -> Tensor:
        """Float (N, C, H, W) normalised images; `images` are uint8 in [0, 255]."""
        for step in self.steps:
            if isinstance(step, (v2.Resize, v2.CenterCrop)):
                images = [step(image) for image in images] if isinstance(images, list) else step(images)
            elif isinstance(step, v2.RandomResizedCrop):
                images = random_resized_crop(images, step, generator)
            elif isinstance(step, v2.RandomCrop):
                images = random_crop(_stack(images), step, generator)
            else:
                flips = torch.rand(len(images), generator=generator) < step.p
                images = _stack(images)
                images = torch.where(flips.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)
        images = _stack(images).float()
        images = (images - self.mean.to(images.device)) / self.std.to(images.device)
        return images if self.erasing is None else random_erasing(images, self.erasing, generator)


def _stack(images: Tensor | list[Tensor]) -> Tensor:
    if isinstance(images, Tensor):
        return images
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise SetrainError(
            "data.pipeline=device needs a resize or crop to one size before this step of data.augment; "
            "use data.pipeline=workers."
        )
    return torch.stack(images)


def crop_boxes(heights: Tensor, widths: Tensor, step: v2.RandomResizedCrop, generator: torch.Generator) -> Tensor:
    """(N, 4) boxes (top, left, height, width) drawn as torchvision's RandomResizedCrop draws one:
    up to 10 tries of area and aspect per image, else the centre crop of the clamped aspect."""
    tries, n = 10, len(heights)
    area = (heights * widths).double()[:, None]
    target = area * torch.empty(n, tries).uniform_(*step.scale, generator=generator).double()
    log_ratio = torch.log(torch.tensor(step.ratio, dtype=torch.float64))
    aspect = torch.exp(torch.empty(n, tries, dtype=torch.float64).uniform_(*log_ratio, generator=generator))
    w = torch.sqrt(target * aspect).round().long()
    h = torch.sqrt(target / aspect).round().long()
    fits = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = fits.long().argmax(dim=1)
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    found = fits.any(dim=1)
    # torchvision's fallback: the whole image, cropped to the nearest allowed aspect.
    aspect = (widths / heights).clamp(min(step.ratio), max(step.ratio))
    w = torch.where(found, w, torch.minimum(widths, (heights * aspect).round().long()))
    h = torch.where(found, h, torch.minimum(heights, (widths / aspect).round().long()))
    top = (torch.rand(n, generator=generator) * (heights - h + 1)).long()
    left = (torch.rand(n, generator=generator) * (widths - w + 1)).long()
    top = torch.where(found, top, (heights - h) // 2)
    left = torch.where(found, left, (widths - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def random_resized_crop(images: Tensor | list[Tensor], step, generator) -> Tensor:
    """A random crop of each image resized to step.size, by roi_align: one call per group of
    same-sized images (a stacked batch is one group). Its adaptive sampling averages the pixels
    that fall in each output cell, which antialiases as torchvision's resize does."""
    sizes = [tuple(image.shape[-2:]) for image in images]
    heights, widths = torch.tensor(sizes).unbind(1)
    top, left, h, w = crop_boxes(heights, widths, step, generator).double().unbind(1)
    boxes = torch.stack([left, top, left + w, top + h], dim=1)  # roi_align's (x1, y1, x2, y2)
    groups: dict[tuple, list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    device = images[0].device
    out = torch.empty(len(images), images[0].shape[0], *step.size, device=device)
    for members in groups.values():
        group = images if len(members) == len(images) and isinstance(images, Tensor) else torch.stack([images[i] for i in members])
        rois = torch.cat([torch.arange(len(members), dtype=torch.float64)[:, None], boxes[members]], dim=1)
        crops = roi_align(group.float(), rois.to(device, torch.float32), list(step.size), sampling_ratio=-1, aligned=True)
        out[torch.tensor(members, device=device)] = crops
    return out


def erasing_boxes(n: int, height: int, width: int, step: v2.RandomErasing, generator: torch.Generator) -> Tensor:
    """(N, 4) boxes (top, left, height, width) drawn as torchvision's RandomErasing draws one: with
    probability p, up to 10 tries of area and aspect, the first that fits; 0 x 0 for an image
    left whole."""
    tries = 10
    erase = torch.rand(n, generator=generator) < step.p
    area = height * width * torch.empty(n, tries, dtype=torch.float64).uniform_(*step.scale, generator=generator)
    log_ratio = torch.log(torch.tensor(step.ratio, dtype=torch.float64))
    aspect = torch.exp(torch.empty(n, tries, dtype=torch.float64).uniform_(*log_ratio, generator=generator))
    h = torch.sqrt(area * aspect).round().long()
    w = torch.sqrt(area / aspect).round().long()
    fits = (h < height) & (w < width)
    first = fits.long().argmax(dim=1)
    found = fits.any(dim=1) & erase
    h = torch.where(found, h.gather(1, first[:, None])[:, 0], 0)
    w = torch.where(found, w.gather(1, first[:, None])[:, 0], 0)
    top = (torch.rand(n, generator=generator) * (height - h + 1)).long()
    left = (torch.rand(n, generator=generator) * (width - w + 1)).long()
    return torch.stack([top, left, h, w], dim=1)


def random_erasing(images: Tensor, step: v2.RandomErasing, generator: torch.Generator) -> Tensor:
    """Each image's rectangle of `erasing_boxes` set to step.value (0: the mean, after Normalize)."""
    n, channels, height, width = images.shape
    top, left, h, w = erasing_boxes(n, height, width, step, generator).to(images.device).unbind(1)
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    inside_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    inside_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    inside = inside_rows[:, None, :, None] & inside_cols[:, None, None, :]
    value = torch.tensor(step.value, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return torch.where(inside, value.expand(1, channels, 1, 1), images)


def random_crop(images: Tensor, step: v2.RandomCrop, generator: torch.Generator) -> Tensor:
    """Pad the batch, then one gather takes each image's own random crop of step.size."""
    if step.padding is not None:
        left, top, right, bottom = step.padding
        images = nnf.pad(images, (left, right, top, bottom), mode="constant", value=0)
    n, _, height, width = images.shape
    out_h, out_w = step.size
    top = (torch.rand(n, generator=generator) * (height - out_h + 1)).long().to(images.device)
    left = (torch.rand(n, generator=generator) * (width - out_w + 1)).long().to(images.device)
    rows = (top[:, None] + torch.arange(out_h, device=images.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(out_w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return images[batch, channels, rows, cols]


def epoch_order(size: int, batch_size: int, epoch_seed: int | None, rank: int, world_size: int,
                repeats: int = 1) -> list[Tensor]:  # fmt: skip
    """This process's index batches of an epoch: shuffled by `epoch_seed` (each index `repeats`
    times, sampling.repeated_order) and only full batches (training), or in order with a last
    partial batch (None: validation); under torchrun every world_size-th index, so each sample
    (each repeat) is seen once across processes."""
    if epoch_seed is None:
        return list(torch.arange(rank, size, world_size).split(batch_size))
    order = repeated_order(size, repeats, epoch_seed, rank, world_size)
    full = len(order) // batch_size * batch_size
    return list(order[:full].split(batch_size))


def batch_generator(epoch_seed: int, rank: int, index: int) -> torch.Generator:
    """The augmentation draws of one batch depend on nothing but its place in the run."""
    return torch.Generator().manual_seed((epoch_seed * 1009 + rank) * 1_000_003 + index)


def decode_images(encoded: list[Tensor], paths: list[str], device: torch.device) -> list[Tensor]:
    """uint8 RGB (3, H, W) images on `device`: JPEGs in one batched call (nvJPEG on CUDA); a file
    that fails there (CMYK, damaged) or is no JPEG is read by PIL, which names a corrupt file."""
    jpegs = [i for i, data in enumerate(encoded) if data[:2].tolist() == [0xFF, 0xD8]]
    images: list[Tensor | None] = [None] * len(encoded)
    try:
        decoded = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
        for i, image in zip(jpegs, decoded):
            images[i] = image
    except RuntimeError:
        pass  # one file the batch decoder cannot read fails the batch: PIL takes the others too
    for i, image in enumerate(images):
        if image is None:
            images[i] = read_with_pil(paths[i]).to(device)
    return images


def read_with_pil(path: str) -> Tensor:
    from setrain.data.folders import load_rgb  # folders imports this module

    return F.pil_to_tensor(load_rgb(path))


class EncodedFiles(Dataset):
    """(file bytes, label, path) of an image folder: all a worker does when the device decodes;
    with `decode`, (uint8 RGB image, label, path), decoded by libjpeg-turbo (PIL for other files)."""

    def __init__(self, samples: list[tuple[str, int]], decode: bool = False):
        self.samples, self.decode = samples, decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        path, label = self.samples[index]
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        if self.decode:
            data = decode_images([data], [path], torch.device("cpu"))[0]
        return data, label, path


def collate_files(items: list) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """A batch's files (or decoded images) as one flat uint8 tensor and each one's shape: one
    shared-memory block from a worker, and one copy to the device, instead of one per file."""
    data, labels, paths = zip(*items)
    shapes = torch.tensor([item.shape for item in data])
    return torch.cat([item.flatten() for item in data]), shapes, torch.tensor(labels), list(paths)


class ChangingBatches:
    """A batch sampler whose batches the main process swaps between epochs, so the byte-reading
    workers can stay alive (the loader's sampler is iterated in the main process)."""

    def __init__(self):
        self.batches: list[Tensor] = []

    def __iter__(self):
        return (batch.tolist() for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class DeviceBatches:
    """An epoch of (images, labels) on the device, used like a DataLoader: len(), iteration,
    and `batches(start)` that begins an epoch at a batch without preparing the ones before."""

    def __init__(self, dataset: Dataset, batch_size: int, device: torch.device, train: bool,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1, decode: str = "device",
                 repeats: int = 1):  # fmt: skip
        self.device, self.train, self.rank, self.world_size = device, train, rank, world_size
        self.batch_size, self.epoch_seed, self.repeats = batch_size, 0, repeats
        inner, indices = _unwrap(dataset)
        self.transform = BatchTransform(inner.transform)
        self.files = hasattr(inner, "samples")
        if self.files:
            self.samples = [inner.samples[i] for i in indices]
            self.sampler, self.decode_in_workers = ChangingBatches(), decode == "workers"
            self.reader = DataLoader(
                EncodedFiles(self.samples, self.decode_in_workers), batch_sampler=self.sampler,
                num_workers=num_workers, collate_fn=collate_files, persistent_workers=num_workers > 0,
                pin_memory=self.decode_in_workers and device.type == "cuda",
            )  # fmt: skip
        else:
            images, labels = _arrays(inner)
            if indices != list(range(len(images))):  # a split: copy its images; the whole set goes as it is
                images, labels = images[indices], labels[indices]
            self.images, self.labels = images.to(device), labels.to(device)
        self.size = len(indices)
        self._order_of_seed: tuple[int | None, list[Tensor]] | None = None

    def set_epoch(self, epoch_seed: int) -> None:
        self.epoch_seed = epoch_seed

    def _order(self) -> list[Tensor]:
        """The epoch's batches of indices, drawn once per epoch seed (len() and iteration share them)."""
        seed = self.epoch_seed if self.train else None
        if self._order_of_seed is None or self._order_of_seed[0] != seed:
            order = epoch_order(self.size, self.batch_size, seed, self.rank, self.world_size, self.repeats)
            self._order_of_seed = (seed, order)
        return self._order_of_seed[1]

    def __len__(self) -> int:
        return len(self._order())

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.batches(0)

    def batches(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._order()[start:]
        if self.files:
            self.sampler.batches = order
            raw = iter(self.reader)
        else:
            raw = ((self.images[batch.to(self.device)], self.labels[batch.to(self.device)]) for batch in order)
        return prefetched((self._prepare(item, start + offset) for offset, item in enumerate(raw)), self.device)

    def _prepare(self, item, index: int) -> tuple[Tensor, Tensor]:
        if self.files:
            flat, shapes, labels, paths = item
            if self.decode_in_workers:
                flat = flat.to(self.device, non_blocking=True)
                images = [part.view(shape) for part, shape in zip(flat.split(shapes.prod(1).tolist()), shapes.tolist())]
            else:
                images = decode_images(list(flat.split(shapes[:, 0].tolist())), paths, self.device)
            labels = labels.to(self.device)
        else:
            images, labels = item
        return self.transform(images, batch_generator(self.epoch_seed, self.rank, index)), labels


def _unwrap(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset under any Subsets (a held-out split, a process's share) and the indices into it."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def _arrays(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """uint8 (N, C, H, W) images and labels of an in-memory dataset (torchvision's CIFAR and STL10, shapes)."""
    images = torch.as_tensor(dataset.images if hasattr(dataset, "images") else dataset.data)
    if images.shape[-1] == 3:  # CIFAR stores (N, H, W, C)
        images = images.permute(0, 3, 1, 2)
    labels = getattr(dataset, "targets", None)
    labels = dataset.labels if labels is None else labels
    return images.contiguous(), torch.as_tensor(labels, dtype=torch.long)


def prefetched(batches: Iterator, device: torch.device) -> Iterator:
    """Prepare up to PREFETCH_BATCHES batches ahead in a thread, on a side CUDA stream when on
    CUDA; a batch is handed over only once its work is done, and an error is raised here."""
    handover: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop = threading.Event()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def offer(item) -> bool:
        """Hand `item` over unless the consumer has stopped; True when the producer may go on."""
        while not stop.is_set():
            try:
                handover.put(item, timeout=0.1)
                return item[0] is not None and not isinstance(item[0], BaseException)
            except queue.Full:
                continue
        return False

    def produce():
        try:
            going = True
            while going:
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    batch = next(batches, None)
                    event = stream.record_event() if stream is not None else None
                going = offer((batch, event))
        except BaseException as error:  # re-raised in the consuming thread
            offer((error, None))

    worker = threading.Thread(target=produce, daemon=True, name="setrain-prefetch")
    worker.start()
    try:
        while (item := handover.get())[0] is not None:
            batch, event = item
            if isinstance(batch, BaseException):
                raise batch
            if event is not None:
                main = torch.cuda.current_stream(device)
                main.wait_event(event)
                for tensor in batch:
                    tensor.record_stream(main)
            yield batch
    finally:
        stop.set()
        worker.join()
