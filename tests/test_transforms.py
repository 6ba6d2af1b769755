"""Augmentation policies (trivialaugment, randaugment, autoaugment), random erasing and repeated
augmentation, through build_data as a run uses them, on files in the official formats."""

import logging

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from conftest import assert_user_error, compose_config, run_cli
from setrain.data import build_data
from setrain.data.sampling import repeated_order
from setrain.errors import SetrainError
from setrain.testing import write_cifar10, write_cifar100, write_image_folder, write_stl10
from test_engine import resume_mid_epoch_and_compare

CPU = torch.device("cpu")


def data_config(name: str, root, **options) -> dict:
    return {"name": name, "root": str(root), "batch_size": 4, "num_workers": 0, **options}


def train_steps(data) -> list:
    return data.train_loader.dataset.transform.transforms


@pytest.mark.parametrize(
    "name, writer, size, policy",
    [
        ("cifar10", write_cifar10, 32, v2.AutoAugmentPolicy.CIFAR10),
        ("cifar100", write_cifar100, 32, v2.AutoAugmentPolicy.CIFAR10),
        ("stl10", write_stl10, 96, v2.AutoAugmentPolicy.IMAGENET),
    ],
)
def test_autoaugment_follows_the_datasets_crop_with_its_policy(tmp_path, name, writer, size, policy):
    writer(tmp_path)
    data = build_data(data_config(name, tmp_path, augment="autoaugment"), CPU)
    kinds = [type(step) for step in train_steps(data)]
    assert kinds[1:4] == [v2.RandomCrop, v2.RandomHorizontalFlip, v2.AutoAugment]
    assert train_steps(data)[3].policy == policy
    images, _ = next(iter(data.train_loader))
    assert images.shape == (4, 3, size, size) and images.dtype == torch.float32


def test_policies_on_photos_follow_the_random_resized_crop(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], per_class=3)
    write_image_folder(tmp_path / "val", ["a", "b"], per_class=1, seed=1)
    for augment, policy in (("autoaugment", v2.AutoAugment), ("trivialaugment", v2.TrivialAugmentWide)):
        data = build_data(data_config("folder", tmp_path, image_size=24, augment=augment), CPU)
        steps = train_steps(data)
        assert [type(step) for step in steps[1:4]] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip, policy]
        assert steps[3].interpolation == v2.InterpolationMode.BILINEAR  # as torchvision's reference


def test_randaugment_takes_its_number_and_magnitude_from_the_config(tmp_path):
    write_cifar10(tmp_path)
    data = build_data(data_config("cifar10", tmp_path, augment="randaugment", randaugment_n=3, randaugment_m=15), CPU)
    policy = train_steps(data)[3]
    assert isinstance(policy, v2.RandAugment) and (policy.num_ops, policy.magnitude) == (3, 15)


def test_random_erasing_blanks_one_rectangle_per_image_after_normalisation(tmp_path):
    write_cifar10(tmp_path)
    data = build_data(data_config("cifar10", tmp_path, augment="none", random_erasing=1.0), CPU)
    assert isinstance(train_steps(data)[-1], v2.RandomErasing) and isinstance(train_steps(data)[-2], v2.Normalize)
    plain = build_data(data_config("cifar10", tmp_path, augment="none"), CPU)
    assert not any(isinstance(step, v2.RandomErasing) for step in train_steps(plain))
    for index in range(8):
        erased, plain_image = data.train_loader.dataset[index][0], plain.train_loader.dataset[index][0]
        blank = (erased == 0).all(dim=0)  # 0 after Normalize: the mean colour, as in torchvision
        rows, cols = blank.any(dim=1).nonzero()[:, 0], blank.any(dim=0).nonzero()[:, 0]
        area = len(rows) * len(cols) / 32**2
        assert 0.015 <= area <= 0.36 and blank[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert torch.equal(erased[:, ~blank], plain_image[:, ~blank])
    assert not any(isinstance(step, v2.RandomErasing) for step in data.val_loader.dataset.transform.transforms)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(augment="cifar", randaugment_n=3), "randaugment_n=3 and data.randaugment_m=9 only act with data.augment=randaugment"),
        (dict(augment="randaugment", randaugment_m=31), "must be 1 or more and 0..30"),
        (dict(augment="randaugment", randaugment_n=0), "must be 1 or more and 0..30"),
        (dict(random_erasing=1.5), "data.random_erasing=1.5 is a probability"),
        (dict(augment="randaugment", pipeline="device"), "cannot run the transform\\(s\\) RandAugment on the device; use data.pipeline=workers"),
    ],
)  # fmt: skip
def test_bad_augmentation_settings_are_one_sentence(tmp_path, options, message):
    write_cifar10(tmp_path)
    with pytest.raises(SetrainError, match=message):
        build_data(data_config("cifar10", tmp_path, **options), CPU)


def test_shapes_take_repeated_augmentation_but_no_erasing():
    shapes = {"name": "shapes", "image_size": 16, "train_size": 32, "val_size": 8, "batch_size": 8, "num_workers": 0}
    assert len(build_data({**shapes, "repeated_augment": 2}, CPU).train_loader) == 4
    with pytest.raises(SetrainError, match="does not take the option\\(s\\) random_erasing"):
        build_data({**shapes, "random_erasing": 0.5}, CPU)


def test_auto_pipeline_on_cuda_loads_a_policy_with_workers_and_says_so(tmp_path, caplog):
    write_cifar10(tmp_path)
    with caplog.at_level(logging.INFO, logger="setrain.data"):
        data = build_data(data_config("cifar10", tmp_path, augment="trivialaugment", pipeline="auto"), torch.device("cuda"))
    assert isinstance(data.train_loader, DataLoader)
    [line] = [record.getMessage() for record in caplog.records]
    assert "data.augment=trivialaugment runs TrivialAugmentWide per image" in line and "with workers" in line


@pytest.mark.slow
def test_a_policy_on_the_device_pipeline_is_refused_through_the_cli(tmp_path):
    write_cifar10(tmp_path / "datasets")
    result = run_cli(
        "data=cifar10", f"data.root={tmp_path / 'datasets'}", "data.augment=autoaugment", "data.pipeline=device", "data.batch_size=8",
        "trainer.device=cpu", "hydra.run.dir=run", cwd=tmp_path,
    )  # fmt: skip
    assert_user_error(result, "data.pipeline=device cannot run the transform(s) AutoAugment on the device")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_repeated_order_repeats_each_image_across_processes_in_an_epoch_of_the_same_length(world_size):
    ranks = [repeated_order(30, 3, epoch_seed=5, rank=rank, world_size=world_size) for rank in range(world_size)]
    assert all(len(order) == 30 // world_size for order in ranks)
    dealt = torch.stack(ranks, dim=1).flatten()  # the order before dealing, cut to the epoch
    assert torch.equal(dealt, dealt.view(-1, 3)[:, :1].expand(-1, 3).flatten())  # each image 3 times in a row
    assert len(set(dealt.tolist())) == 10
    if world_size == 3:  # each process gets every image's own copy, in the same step
        assert torch.equal(ranks[0], ranks[1]) and torch.equal(ranks[1], ranks[2])
    assert torch.equal(ranks[0], repeated_order(30, 3, 5, 0, world_size))
    assert not torch.equal(ranks[0], repeated_order(30, 3, 6, 0, world_size))


@pytest.mark.parametrize("pipeline", ["workers", "device"])
def test_repeated_copies_share_the_image_and_differ_in_augmentation(tmp_path, pipeline):
    write_cifar10(tmp_path, train_per_batch=6)  # 30 images
    config = data_config("cifar10", tmp_path, batch_size=6, repeated_augment=3, pipeline=pipeline)
    torch.manual_seed(0)  # the draws of workers=0
    batches = {}
    for augment in ("none", "cifar"):
        data = build_data({**config, "augment": augment}, CPU)
        data.set_epoch(seed=0, epoch=1)
        batches[augment] = list(data.train_batches())
    assert len(batches["none"]) == 5  # the epoch keeps the dataset's length
    for (plain, labels), (augmented, augmented_labels) in zip(batches["none"], batches["cifar"]):
        assert torch.equal(labels, augmented_labels)
        copies, augmented = plain.view(2, 3, -1), augmented.view(2, 3, -1)
        assert torch.equal(copies, copies[:, :1].expand_as(copies))
        assert not torch.equal(augmented[:, 0], augmented[:, 1]) and not torch.equal(augmented[:, 1], augmented[:, 2])


@pytest.mark.parametrize("pipeline", ["workers", "device"])
def test_under_torchrun_each_process_trains_its_own_copy_of_the_same_images(tmp_path, pipeline):
    write_cifar10(tmp_path, train_per_batch=6)
    config = data_config("cifar10", tmp_path, batch_size=5, repeated_augment=2, pipeline=pipeline, augment="none")
    ranks = []
    for rank in (0, 1):
        data = build_data(config, CPU, rank=rank, world_size=2)
        data.set_epoch(seed=0, epoch=1)
        ranks.append(list(data.train_batches()))
    assert len(ranks[0]) == len(ranks[1]) == 3  # 15 images each, as without repeats
    for (images_0, labels_0), (images_1, labels_1) in zip(*ranks):
        assert torch.equal(images_0, images_1) and torch.equal(labels_0, labels_1)
    assert len({tuple(image.flatten()[:8].tolist()) for images, _ in ranks[0] for image in images}) == 15


def test_both_pipelines_take_the_same_repeated_order(tmp_path):
    write_cifar10(tmp_path, train_per_batch=6)
    labels = {}
    for pipeline in ("workers", "device"):
        data = build_data(data_config("cifar10", tmp_path, batch_size=6, repeated_augment=2, pipeline=pipeline), CPU)
        data.set_epoch(seed=1, epoch=3)
        labels[pipeline] = torch.cat([batch_labels for _, batch_labels in data.train_batches()])
    assert torch.equal(labels["workers"], labels["device"])


def test_a_resumed_epoch_replays_policies_erasing_and_repeats(tmp_path):
    """What exact resume needs from the workers: from batch 2 on, the same augmented images."""
    write_cifar10(tmp_path, train_per_batch=6)
    config = data_config("cifar10", tmp_path, batch_size=6, num_workers=1, augment="randaugment",
                         random_erasing=0.5, repeated_augment=2)  # fmt: skip
    data = build_data(config, CPU)
    data.set_epoch(seed=0, epoch=1)
    epoch = list(data.train_batches())
    data.set_epoch(seed=0, epoch=1)
    tail = list(data.train_batches(start=2))
    assert len(tail) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(epoch[2:], tail))
    data.set_epoch(seed=0, epoch=2)
    assert not torch.equal(next(data.train_batches())[0], epoch[0][0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["data.pipeline=workers", "data.augment=randaugment", "data.random_erasing=0.5", "data.repeated_augment=2"],
        ["data.pipeline=device", "data.random_erasing=0.5", "data.repeated_augment=2"],
    ],
)
def test_a_run_resumed_inside_an_epoch_ends_with_the_same_weights(tmp_path, monkeypatch, options):
    """CIFAR files, by a worker or on the device, with erasing and repeats (and a policy): the
    resumed run trains on the same augmented images as the uninterrupted one."""
    write_cifar10(tmp_path / "datasets", train_per_batch=8)
    cifar = [
        "data=cifar10", f"data.root={tmp_path / 'datasets'}", "data.num_workers=1", "data.batch_size=8", *options,
        "model=resnet20", "trainer.epochs=2", "trainer.checkpoint_every_n_steps=2", "trainer.device=cpu",
    ]  # fmt: skip
    interrupted = resume_mid_epoch_and_compare(
        compose_config(*cifar), compose_config(*cifar, "resume=auto"), tmp_path, monkeypatch, step=4
    )
    assert (interrupted["epoch"], interrupted["epoch_progress"]["batches"]) == (0, 4)
