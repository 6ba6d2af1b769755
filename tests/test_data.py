import pickle

import pytest
import torch
from torchvision.transforms import v2

from setrain.data import build_data
from setrain.data.folders import load_rgb
from setrain.data.shapes import CLASSES, build_shapes, make_shapes
from setrain.data.transforms import AUGMENTATIONS, POLICIES
from setrain.errors import SetrainError
from setrain.testing import (
    IMAGENET_WNIDS,
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_imagenet,
    write_stl10,
)

CPU = torch.device("cpu")


def test_shapes_are_deterministic_per_seed():
    images, labels = make_shapes(200, 24, seed=3)
    again_images, again_labels = make_shapes(200, 24, seed=3)
    other_images, _ = make_shapes(200, 24, seed=4)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    assert not torch.equal(images, other_images)


def test_shapes_are_balanced_images_of_the_requested_size():
    images, labels = make_shapes(300, 20, seed=0)
    assert images.shape == (300, 3, 20, 20) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=len(CLASSES)).tolist() == [30] * len(CLASSES)


def test_every_shape_is_visible_against_its_background():
    images, _ = make_shapes(100, 32, seed=0)
    spread = images.float().amax(dim=(2, 3)) - images.float().amin(dim=(2, 3))
    assert (spread.max(dim=1).values > 60).all()


def test_shapes_train_and_val_are_different_images():
    train, val, num_classes = build_shapes(image_size=16, train_size=50, val_size=50, seed=0)
    assert num_classes == 10
    assert not torch.equal(train.images, val.images)
    image, label = train[0]
    assert image.dtype == torch.float32 and -1 <= image.min() and image.max() <= 1
    assert isinstance(label, int)


def data_config(name: str, **options) -> dict:
    return {"name": name, "batch_size": 4, "num_workers": 0, **options}


def test_cifar10_loads_from_real_format_files(tmp_path):
    write_cifar10(tmp_path)
    data = build_data(data_config("cifar10", root=str(tmp_path), download=False), CPU)
    assert data.num_classes == 10 and data.classes[:2] == ["airplane", "automobile"]
    assert len(data.train_loader.dataset) == 40 and len(data.val_loader.dataset) == 16
    images, labels = next(iter(data.train_loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64


def test_stl10_loads_from_real_format_files_and_resizes(tmp_path):
    write_stl10(tmp_path)
    data = build_data(data_config("stl10", root=str(tmp_path), download=False, image_size=48), CPU)
    assert len(data.train_loader.dataset) == 20 and len(data.val_loader.dataset) == 10
    images, labels = next(iter(data.val_loader))
    assert images.shape == (4, 3, 48, 48)
    assert 0 <= labels.min() and labels.max() <= 9


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("stl10", "stl10_binary")])
def test_missing_dataset_says_where_and_how(tmp_path, name, folder):
    with pytest.raises(SetrainError, match=f"not found in {tmp_path / folder}.*data.download=true"):
        build_data(data_config(name, root=str(tmp_path), download=False), CPU)


def test_truncated_cifar_batch_is_a_clear_error(tmp_path):
    folder = write_cifar10(tmp_path)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(SetrainError, match="Could not read CIFAR-10 in .*fresh copy"):
        build_data(data_config("cifar10", root=str(tmp_path), download=False), CPU)


def test_truncated_stl10_file_is_a_clear_error(tmp_path):
    folder = write_stl10(tmp_path)
    images = folder / "train_X.bin"
    images.write_bytes(images.read_bytes()[:-1000])
    with pytest.raises(SetrainError, match="STL10"):
        build_data(data_config("stl10", root=str(tmp_path), download=False), CPU)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(
        SetrainError, match="Unknown dataset 'mnist'.*cifar10, cifar100, folder, imagenet, shapes, stl10"
    ):
        build_data(data_config("mnist"), CPU)


def test_dataset_smaller_than_one_batch_is_refused():
    config = data_config("shapes", image_size=16, train_size=10, val_size=10, seed=0)
    with pytest.raises(SetrainError, match="fewer than one batch of 32"):
        build_data({**config, "batch_size": 32}, CPU)


def test_file_dataset_smaller_than_one_batch_names_its_root(tmp_path):
    write_cifar10(tmp_path)
    config = {**data_config("cifar10", root=str(tmp_path)), "batch_size": 64}
    with pytest.raises(
        SetrainError, match=f"training set in {tmp_path} has 40 images, fewer than one batch of 64"
    ):
        build_data(config, CPU)


def test_downloads_are_still_verified_against_the_official_checksum(tmp_path, monkeypatch):
    """Only local files skip the md5 check: a downloaded archive that does not match is refused."""
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tv_utils, "_urlretrieve", lambda url, path, *a, **k: open(path, "wb").write(b"junk"))
    with pytest.raises(SetrainError, match="Could not download CIFAR-10.*corrupted"):
        build_data(data_config("cifar10", root=str(tmp_path), download=True), CPU)


def test_local_files_are_used_without_downloading(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download although the files are present")

    monkeypatch.setattr(tv_utils, "_get_redirect_url", no_network)
    monkeypatch.setattr(tv_utils, "_urlretrieve", no_network)
    write_stl10(tmp_path)
    data = build_data(data_config("stl10", root=str(tmp_path), download=True), CPU)
    assert len(data.train_loader.dataset) == 20


def test_empty_validation_set_is_refused():
    config = data_config("shapes", image_size=16, train_size=10, val_size=0, seed=0)
    with pytest.raises(SetrainError, match="validation set is empty"):
        build_data(config, CPU)


def test_cifar100_has_100_classes_and_the_written_labels(tmp_path):
    folder = write_cifar100(tmp_path)
    written = pickle.loads((folder / "train").read_bytes())
    data = build_data(data_config("cifar100", root=str(tmp_path), augment="none"), CPU)
    assert data.num_classes == 100
    train = data.train_loader.dataset
    assert train.classes[7] == "fine_7" and len(train) == 40
    assert [train[i][1] for i in range(len(train))] == written["fine_labels"]
    image, _ = train[3]
    pixels = torch.tensor(written["data"][3]).view(3, 32, 32).float() / 255
    mean, std = (
        torch.tensor(train.transform.transforms[-1].mean),
        torch.tensor(train.transform.transforms[-1].std),
    )
    assert torch.allclose(image, (pixels - mean[:, None, None]) / std[:, None, None], atol=1e-5)


def test_cifar_recipe_augments_training_only(tmp_path):
    write_cifar10(tmp_path)
    data = build_data(data_config("cifar10", root=str(tmp_path)), CPU)
    train, val = data.train_loader.dataset, data.val_loader.dataset
    kinds = [type(step) for step in train.transform.transforms]
    assert v2.RandomCrop in kinds and v2.RandomHorizontalFlip in kinds
    assert train.transform.transforms[kinds.index(v2.RandomCrop)].padding == [4, 4, 4, 4]
    assert not any("Random" in type(step).__name__ for step in val.transform.transforms)
    torch.manual_seed(0)
    assert not all(torch.equal(train[0][0], train[0][0]) for _ in range(5))
    assert torch.equal(val[0][0], val[0][0])


def test_unknown_augmentation_lists_the_presets(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(
        SetrainError, match="Unknown data.augment='autoaugmnt'; choose one of: cifar, imagenet, .*, autoaugment"
    ):
        build_data(data_config("cifar10", root=str(tmp_path), augment="autoaugmnt"), CPU)


@pytest.mark.parametrize("augment", sorted([*AUGMENTATIONS, *POLICIES]))
def test_every_augmentation_gives_the_asked_size_from_any_image(tmp_path, augment):
    write_image_folder(tmp_path / "train", ["a", "b"], per_class=3)
    write_image_folder(tmp_path / "val", ["a", "b"], per_class=1, seed=1)
    data = build_data(data_config("folder", root=str(tmp_path), image_size=24, augment=augment), CPU)
    for loader in (data.train_loader, data.val_loader):
        images, _ = next(iter(loader))
        assert images.shape[1:] == (3, 24, 24) and images.dtype == torch.float32


def test_imagenet_recipe_random_crop_for_train_resize_centre_crop_for_val(tmp_path):
    write_imagenet(tmp_path)
    data = build_data(data_config("imagenet", root=str(tmp_path), image_size=32, val_image_size=48), CPU)
    train_steps = data.train_loader.dataset.transform.transforms
    val_steps = data.val_loader.dataset.transform.transforms
    assert any(isinstance(step, v2.RandomResizedCrop) and step.size == (32, 32) for step in train_steps)
    resize, crop = (step for step in val_steps if isinstance(step, (v2.Resize, v2.CenterCrop)))
    assert resize.size == [55] and crop.size == (48, 48)  # 48 / 0.875, as 256 for 224
    images, _ = next(iter(data.val_loader))
    assert images.shape == (4, 3, 48, 48)


@pytest.mark.parametrize("devkit", [False, True], ids=["val class folders", "devkit flat val"])
def test_imagenet_layouts_give_the_same_labels(tmp_path, devkit):
    write_imagenet(tmp_path, devkit=devkit)
    data = build_data(data_config("imagenet", root=str(tmp_path), image_size=32), CPU)
    assert data.num_classes == 3 and len(data.train_loader.dataset) == 18
    val = data.val_loader.dataset
    # write_imagenet labels val image number n with wnid (n - 1) % 3 in both layouts.
    labels = {path.rsplit("/", 1)[1]: label for path, label in val.samples}
    assert labels == {f"ILSVRC2012_val_{n:08d}.JPEG": (n - 1) % 3 for n in range(1, 7)}
    assert val.classes == IMAGENET_WNIDS


def test_imagenet_flat_val_without_devkit_says_what_to_add(tmp_path):
    write_imagenet(tmp_path, devkit=True)
    (tmp_path / "meta.bin").unlink()
    with pytest.raises(
        SetrainError, match=f"{tmp_path / 'val'} has images but no class folders.*ILSVRC2012_devkit_t12"
    ):
        build_data(data_config("imagenet", root=str(tmp_path)), CPU)


def test_imagenet_devkit_archive_is_verified_against_the_official_checksum(tmp_path):
    write_imagenet(tmp_path, devkit=True)
    (tmp_path / "meta.bin").unlink()
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"not the devkit")
    with pytest.raises(SetrainError, match="ILSVRC2012_devkit_t12.tar.gz is not the official .*md5 differs"):
        build_data(data_config("imagenet", root=str(tmp_path)), CPU)


def test_imagenet_without_train_says_how_to_extract_it(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(
        SetrainError, match=f"{tmp_path} has no train/ folder; extract ILSVRC2012_img_train.tar"
    ):
        build_data(data_config("imagenet", root=str(tmp_path)), CPU)


def test_imagenet_unreadable_meta_bin_says_to_delete_it(tmp_path):
    write_imagenet(tmp_path, devkit=True)
    (tmp_path / "meta.bin").write_bytes(b"junk")
    with pytest.raises(SetrainError, match=f"Could not read {tmp_path / 'meta.bin'} .*delete it"):
        build_data(data_config("imagenet", root=str(tmp_path)), CPU)


def test_folder_with_train_and_val(tmp_path):
    write_image_folder(tmp_path / "train", ["cat", "dog", "fox"], per_class=4)
    write_image_folder(tmp_path / "val", ["cat", "dog", "fox"], per_class=2, seed=1)
    data = build_data(data_config("folder", root=str(tmp_path), image_size=32), CPU)
    assert data.num_classes == 3
    assert len(data.train_loader.dataset) == 12 and len(data.val_loader.dataset) == 6
    assert {path.rsplit(".", 1)[1] for path, _ in data.train_loader.dataset.samples} == {"png", "jpg"}
    assert [label for _, label in data.val_loader.dataset.samples] == [0, 0, 1, 1, 2, 2]
    assert data.classes == ["cat", "dog", "fox"]
    path, _ = data.val_loader.dataset.samples[0]
    assert torch.equal(data.val_transform(load_rgb(path)), data.val_loader.dataset[0][0])


def test_val_fraction_is_a_disjoint_seeded_split_with_its_own_transform(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], per_class=10)

    def split(seed):
        data = build_data(
            data_config("folder", root=str(tmp_path), image_size=32, val_fraction=0.2, seed=seed), CPU
        )
        return data.train_loader.dataset, data.val_loader.dataset

    train, val = split(0)
    assert len(train) == 16 and len(val) == 4
    assert set(train.indices).isdisjoint(val.indices) and set(train.indices) | set(val.indices) == set(
        range(20)
    )
    again_train, again_val = split(0)
    assert again_val.indices == val.indices and again_train.indices == train.indices
    assert split(1)[1].indices != val.indices
    assert any(isinstance(step, v2.RandomResizedCrop) for step in train.dataset.transform.transforms)
    assert not any("Random" in type(step).__name__ for step in val.dataset.transform.transforms)
    assert torch.equal(val[0][0], val[0][0])


@pytest.mark.parametrize(
    "layout, message",
    [
        ("no root", "Dataset folder {root} does not exist; set data.root"),
        ("no train", "{root} has no train/ folder"),
        (
            "flat train",
            "{root}/train has no class folders; put each class's images in {root}/train/<class name>/",
        ),
        ("empty class", "Class folder {root}/train/b has no images"),
        ("no val", "{root} has no val/ folder; add root/val/<class>/<image>, or .*data.val_fraction=0.1"),
        (
            "other val classes",
            "class folders of {root}/val differ from those of train/ \\(missing: b; extra: c\\)",
        ),
    ],
)
def test_folder_layout_errors_name_the_path_and_the_fix(tmp_path, layout, message):
    root = tmp_path / "tree"
    if layout != "no root":
        (root / "other").mkdir(parents=True)
    if layout == "flat train":
        write_image_folder(root, ["train"], per_class=2)
    if layout in ("empty class", "no val", "other val classes"):
        write_image_folder(root / "train", ["a", "b"], per_class=2)
    if layout == "empty class":
        for image in (root / "train" / "b").iterdir():
            image.unlink()
    if layout == "other val classes":
        write_image_folder(root / "val", ["a", "c"], per_class=1)
    with pytest.raises(SetrainError, match=message.format(root=root)):
        build_data({**data_config("folder", root=str(root)), "batch_size": 2}, CPU)


def test_corrupt_image_in_a_worker_is_one_sentence_naming_the_file(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], per_class=4)
    broken = tmp_path / "train" / "b" / "b_1.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    config = {**data_config("folder", root=str(tmp_path), image_size=16, val_fraction=0.25), "num_workers": 1}
    data = build_data(config, CPU)
    with pytest.raises(SetrainError) as raised:
        for loader in (data.train_loader, data.val_loader):
            for _ in loader:
                pass
    message = str(raised.value)
    assert message.startswith(f"Image {broken} cannot be decoded (") and "\n" not in message
    assert message.endswith("; replace or delete the file.")


def test_workers_persist_and_pin_memory_only_on_cuda(tmp_path):
    write_cifar10(tmp_path)
    config = {**data_config("cifar10", root=str(tmp_path)), "num_workers": 2, "pipeline": "workers"}
    cpu = build_data(config, CPU).train_loader
    cuda = build_data(config, torch.device("cuda")).train_loader
    assert not cpu.persistent_workers and not cpu.pin_memory
    assert cuda.persistent_workers and cuda.pin_memory


def test_augmentation_with_workers_depends_only_on_the_shuffle_seed(tmp_path):
    """What exact resume needs: reseeding the generator replays an epoch's batches, augmentation included."""
    write_cifar10(tmp_path)
    data = build_data({**data_config("cifar10", root=str(tmp_path)), "num_workers": 2}, CPU)

    def epoch(seed):
        data.shuffle_generator.manual_seed(seed)
        return torch.cat([images for images, _ in data.train_loader])

    first = epoch(1)
    assert torch.equal(first, epoch(1)) and not torch.equal(first, epoch(2))
