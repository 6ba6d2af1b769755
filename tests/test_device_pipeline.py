"""data.pipeline=device: whole batches decoded and augmented on the training device. The same
code runs on CPU tensors, so everything but nvJPEG and the CUDA stream is tested here."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from conftest import compose_config, run_cli
from setrain.data import build_data
from setrain.data.on_device import (
    BatchTransform,
    crop_boxes,
    epoch_order,
    erasing_boxes,
    random_erasing,
    random_resized_crop,
)
from setrain.data.transforms import Augmentation, build_transforms, resize_centre_crop
from setrain.engine.checkpoint import load_checkpoint
from setrain.errors import SetrainError
from setrain.testing import write_cifar10, write_image, write_image_folder

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def photos(count: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 256, (3, int(rng.integers(40, 90)), int(rng.integers(40, 90))), dtype=np.uint8)) for _ in range(count)]  # fmt: skip


def test_validation_of_photos_equals_the_per_image_transform():
    _, val = build_transforms("imagenet", 32, [], MEAN, STD, val_base=resize_centre_crop(32, 0.875))
    images = photos(6)
    batch = BatchTransform(val)(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch, torch.stack([val(image) for image in images]), rtol=0, atol=1e-5)


def test_pad_crop_flip_takes_each_image_from_its_padded_copy():
    train_recipe, _ = build_transforms("cifar", 16, [], MEAN, STD)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    out = BatchTransform(train_recipe)(images, torch.Generator().manual_seed(1))
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2)).float()
    kinds = set()
    for image, result in zip(padded, pixels):
        matches = [
            (top, left, flipped)
            for top in range(5) for left in range(5) for flipped in (False, True)
            if torch.allclose(result, (image.flip(-1) if flipped else image)[:, top:top + 16, left:left + 16], atol=1e-3)
        ]  # fmt: skip
        assert matches, "a crop that is no window of the padded image"
        kinds.add(matches[0])
    assert len(kinds) > 10 and {flipped for *_, flipped in kinds} == {False, True}


def test_random_resized_crop_boxes_follow_torchvision_limits():
    step = v2.RandomResizedCrop(24, antialias=True)
    heights, widths = torch.randint(30, 200, (500,)), torch.randint(30, 200, (500,))
    top, left, h, w = crop_boxes(heights, widths, step, torch.Generator().manual_seed(0)).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    area = (h * w) / (heights * widths)
    assert area.min() >= 0.07 and area.max() <= 1 and area.std() > 0.15
    aspect = w / h
    assert aspect.min() > 0.7 and aspect.max() < 1.4


def test_random_resized_crop_matches_torchvision_on_batches_and_mixed_sizes():
    """roi_align, per group of same-sized images, against torchvision's resized_crop image by
    image with the same boxes; smooth images, so the two resampling filters agree closely."""
    step = v2.RandomResizedCrop(24, scale=(0.3, 1.0), antialias=True)

    def smooth(height, width):
        return (torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8), size=(height, width), mode="bilinear")[0] * 255).round().to(torch.uint8)

    for images in (torch.stack([smooth(64, 64) for _ in range(6)]), [smooth(64, 48), smooth(50, 70), smooth(64, 48)]):
        out = random_resized_crop(images, step, torch.Generator().manual_seed(3))
        sizes = torch.tensor([image.shape[-2:] for image in images])
        boxes = crop_boxes(sizes[:, 0], sizes[:, 1], step, torch.Generator().manual_seed(3))
        reference = torch.stack([F.resized_crop(image, *box.tolist(), size=[24, 24], antialias=True) for image, box in zip(images, boxes)])
        assert out.shape == (len(images), 3, 24, 24)
        assert (out - reference.float()).abs().mean() < 2.0 and (out - reference.float()).abs().max() < 40


@pytest.mark.slow  # 3000 draws of torchvision's, one by one; the boxes' bounds and erasure are checked fast below
def test_random_erasing_boxes_follow_torchvision_in_distribution():
    """The batched draws against torchvision's RandomErasing, image by image, on 3000 images:
    the share erased, the erased area and the aspect agree."""
    step, n = v2.RandomErasing(p=0.6), 3000
    top, left, h, w = erasing_boxes(n, 24, 40, step, torch.Generator().manual_seed(0)).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 24).all() and (left + w <= 40).all()
    torch.manual_seed(0)
    reference = [step.make_params([torch.zeros(3, 24, 40)]) if torch.rand(1) < step.p else None for _ in range(n)]
    ref_h = torch.tensor([0 if params is None or params["v"] is None else params["h"] for params in reference])
    ref_w = torch.tensor([0 if params is None or params["v"] is None else params["w"] for params in reference])
    erased, ref_erased = h > 0, ref_h > 0
    assert abs(erased.float().mean() - ref_erased.float().mean()) < 0.04
    area, ref_area = (h * w)[erased].double() / 960, (ref_h * ref_w)[ref_erased].double() / 960
    assert abs(area.mean() - ref_area.mean()) < 0.01 and abs(area.std() - ref_area.std()) < 0.01
    assert area.min() >= 0.015 and area.max() <= 0.36
    aspect, ref_aspect = (h / w)[erased].log(), (ref_h / ref_w)[ref_erased].log()
    assert abs(aspect.mean() - ref_aspect.mean()) < 0.06 and abs(aspect.std() - ref_aspect.std()) < 0.06


def test_random_erasing_equals_torchvision_erase_of_the_same_boxes():
    step = v2.RandomErasing(p=0.5, value=0.0)
    images = torch.randn(32, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    out = random_erasing(images, step, torch.Generator().manual_seed(4))
    boxes = erasing_boxes(32, 16, 20, step, torch.Generator().manual_seed(4))
    reference = torch.stack([F.erase(image, *box.tolist(), v=torch.zeros(3, 1, 1)) for image, box in zip(images, boxes)])
    assert torch.equal(out, reference) and 5 < (boxes[:, 2] > 0).sum() < 27


def test_device_pipeline_erases_after_normalisation():
    train_recipe, _ = build_transforms("none", 16, [], MEAN, STD, settings=Augmentation(random_erasing=1.0))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    out = BatchTransform(train_recipe)(images, torch.Generator().manual_seed(0))
    plain = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    blank = (out == 0).all(dim=1)
    assert blank.flatten(1).any(dim=1).all()  # one rectangle in every image, at the mean colour
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[~blank], plain.permute(0, 2, 3, 1)[~blank], rtol=0, atol=1e-5)


def test_epoch_order_shards_without_overlap_and_depends_on_the_epoch_seed():
    ranks = [torch.cat(epoch_order(103, 10, epoch_seed=7, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 50 and not set(ranks[0].tolist()) & set(ranks[1].tolist())
    assert torch.equal(torch.cat(epoch_order(103, 10, 7, 0, 1)), torch.cat(epoch_order(103, 10, 7, 0, 1)))
    assert not torch.equal(torch.cat(epoch_order(103, 10, 7, 0, 1)), torch.cat(epoch_order(103, 10, 8, 0, 1)))
    val = torch.cat(epoch_order(103, 10, None, 0, 1))
    assert torch.equal(val, torch.arange(103))


def shapes_data(pipeline: str, **options):
    config = {"name": "shapes", "image_size": 16, "train_size": 64, "val_size": 20, "seed": 0,
              "batch_size": 16, "num_workers": 0, "pipeline": pipeline, **options}  # fmt: skip
    return build_data(config, CPU)


def test_device_pipeline_gives_the_workers_images_without_augmentation():
    device, workers = shapes_data("device"), shapes_data("workers")
    device_val = torch.cat([images for images, _ in device.val_loader])
    workers_val = torch.cat([images for images, _ in workers.val_loader])
    torch.testing.assert_close(device_val, workers_val, rtol=0, atol=1e-5)
    assert len(device.train_loader) == len(workers.train_loader) == 4


def test_device_batches_depend_only_on_seed_epoch_and_index(tmp_path):
    root = write_cifar10(tmp_path / "datasets", train_per_batch=16)
    config = {"name": "cifar10", "root": str(root.parent), "batch_size": 8, "num_workers": 0, "pipeline": "device", "augment": "cifar", "image_size": 32}  # fmt: skip
    data = build_data(config, CPU)
    data.set_epoch(seed=0, epoch=1)
    epoch_1 = list(data.train_batches())
    assert [len(labels) for _, labels in epoch_1] == [8] * 10
    tail = list(data.train_batches(start=4))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch_1[4:], tail))
    data.set_epoch(seed=0, epoch=2)
    assert not torch.equal(next(iter(data.train_batches()))[0], epoch_1[0][0])


@pytest.mark.parametrize("decode", ["device", "workers"])
def test_files_of_every_kind_decode_and_a_corrupt_one_is_named(tmp_path, decode):
    root = write_image_folder(tmp_path / "tree" / "train", ["a", "b"], per_class=4)
    write_image_folder(tmp_path / "tree" / "val", ["a", "b"], per_class=2)
    Image.new("CMYK", (50, 40), (10, 200, 30, 0)).save(root / "a" / "cmyk.jpg")
    Image.new("L", (45, 60), 128).save(root / "b" / "gray.jpg")
    write_image(root / "b" / "photo.bmp", np.random.default_rng(0), (50, 50))
    config = {"name": "folder", "root": str(tmp_path / "tree"), "image_size": 24, "batch_size": 4, "num_workers": 0, "pipeline": "device", "decode": decode}  # fmt: skip
    data = build_data(config, CPU)
    data.set_epoch(0, 1)
    batches = list(data.train_batches())
    assert len(batches) == 2 and all(images.shape == (4, 3, 24, 24) for images, _ in batches)
    (root / "a" / "a_1.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    with pytest.raises(SetrainError, match="a_1.jpg.*cannot be decoded|a_1.jpg.*not an image"):
        for epoch in (2, 3, 4):
            data.set_epoch(0, epoch)
            list(data.train_batches())


def test_decoding_in_workers_gives_the_same_batches(tmp_path):
    write_image_folder(tmp_path / "tree" / "train", ["a", "b"], per_class=6)
    write_image_folder(tmp_path / "tree" / "val", ["a", "b"], per_class=2)
    config = {"name": "folder", "root": str(tmp_path / "tree"), "image_size": 24, "batch_size": 4, "num_workers": 1, "pipeline": "device"}  # fmt: skip
    batches = {}
    for decode in ("device", "workers"):
        data = build_data({**config, "decode": decode}, CPU)
        data.set_epoch(0, 1)
        batches[decode] = list(data.train_batches()) + list(data.val_loader)
    assert len(batches["device"]) == 4
    for (a, labels_a), (b, labels_b) in zip(batches["device"], batches["workers"]):
        assert torch.equal(a, b) and torch.equal(labels_a, labels_b)


def test_unsupported_recipe_says_to_use_workers(tmp_path):
    recipe = v2.Compose([v2.ToImage(), v2.ColorJitter(0.4), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])  # fmt: skip
    with pytest.raises(SetrainError, match="ColorJitter.*data.pipeline=workers"):
        BatchTransform(recipe)


def test_cpu_defaults_stay_fp32_nchw_workers(tiny_run):
    _, results = tiny_run
    assert results["precision"] == "32"
    config = compose_config()
    assert (config.trainer.precision, config.trainer.channels_last, config.data.pipeline) == ("auto", "auto", "auto")


@pytest.mark.slow
def test_image_folder_trains_through_the_cli_on_the_device_pipeline(tmp_path):
    write_image_folder(tmp_path / "tree" / "train", ["cat", "dog"], per_class=8)
    write_image_folder(tmp_path / "tree" / "val", ["cat", "dog"], per_class=3)
    result = run_cli(
        "data=folder", f"data.root={tmp_path / 'tree'}", "data.image_size=32", "data.batch_size=8",
        "data.pipeline=device", "data.num_workers=1", "model=resnet20", "trainer.epochs=1",
        "trainer.device=cpu", "hydra.run.dir=run", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["final"]["train_images_per_s"] > 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1
