import pytest
import torch

from setrain.data import build_data
from setrain.data.shapes import CLASSES, build_shapes, make_shapes
from setrain.errors import SetrainError

from formats import write_cifar10, write_stl10

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
    assert data.num_classes == 10
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
    with pytest.raises(SetrainError, match="Unknown dataset 'mnist'.*cifar10, shapes, stl10"):
        build_data(data_config("mnist"), CPU)


def test_dataset_smaller_than_one_batch_is_refused():
    config = data_config("shapes", image_size=16, train_size=10, val_size=10, seed=0)
    with pytest.raises(SetrainError, match="fewer than one batch of 32"):
        build_data({**config, "batch_size": 32}, CPU)


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
