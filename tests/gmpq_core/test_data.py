"""gmpq_core.data: registry, real datasets, stratified proxies and the loaders."""
from __future__ import annotations

import gzip
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gmpq_core.data import (DatasetInfo, FolderSplit, TensorSplit, class_counts, default_num_workers, list_datasets,
                            load_dataset, make_loader, proxy, proxy_indices)
from gmpq_core.data.sources import DEBIAN_FASHION_MNIST, find_fashion_mnist, read_idx
from gmpq_core.errors import ConfigError, DataError

FASHION_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture(scope="module")
def fashion():
    start = time.perf_counter()
    bundle = load_dataset("fashion_mnist")
    return bundle, time.perf_counter() - start


def _tiny_split(n_per_class=(5, 5, 5), size=6, channels=1, seed=0) -> tuple[TensorSplit, DatasetInfo]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(n_per_class)])
    images = torch.randint(0, 256, (len(labels), channels, size, size), generator=g, dtype=torch.uint8)
    info = DatasetInfo(name="tiny", num_classes=len(n_per_class), in_channels=channels, image_size=size,
                       mean=(0.5,) * channels, std=(0.25,) * channels, flip=True, crop_padding=2)
    return TensorSplit(images=images, labels=labels, dataset="tiny", split="train"), info


# ---------------------------------------------------------------- registry
def test_list_datasets_names_every_registered_dataset():
    assert list_datasets() == ["cifar10", "digits", "fashion_mnist", "imagefolder:PATH", "mnist5k"]


@pytest.mark.parametrize("name", ["imagenet", "fashion-mnist", ""])
def test_unknown_dataset_lists_the_available_ones(name):
    with pytest.raises(ConfigError) as exc:
        load_dataset(name)
    for known in list_datasets():
        assert known in str(exc.value)


def test_imagefolder_without_path_and_path_on_plain_dataset_are_config_errors():
    with pytest.raises(ConfigError, match="needs a path"):
        load_dataset("imagefolder")
    with pytest.raises(ConfigError, match="takes no path"):
        load_dataset("digits:/tmp")
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)


def test_dataset_info_validates_its_fields():
    with pytest.raises(ConfigError, match="one mean and one std per channel"):
        DatasetInfo(name="x", num_classes=10, in_channels=3, image_size=32, mean=(0.5,), std=(0.5,),
                    flip=True, crop_padding=4)
    with pytest.raises(ConfigError, match="num_classes"):
        DatasetInfo(name="x", num_classes=0, in_channels=1, image_size=8, mean=(0.5,), std=(0.5,),
                    flip=False, crop_padding=1)


# ---------------------------------------------------------------- real datasets
def test_fashion_mnist_loads_with_shapes_labels_and_balance(fashion):  # speed: benchmarks, not tests
    bundle, seconds = fashion
    info = bundle.info
    assert (info.num_classes, info.in_channels, info.image_size, info.flip, info.crop_padding) == (10, 1, 28, True, 2)
    assert bundle.train.images.shape == (60000, 1, 28, 28) and bundle.train.images.dtype == torch.uint8
    assert bundle.test.images.shape == (10000, 1, 28, 28) and bundle.test.labels.dtype == torch.int64
    assert class_counts(bundle.train.labels) == {c: 6000 for c in range(10)}
    assert class_counts(bundle.test.labels) == {c: 1000 for c in range(10)}
    # The stored constants are the real statistics of the training images.
    x = bundle.train.images[::5].float() / 255
    assert abs(float(x.mean()) - info.mean[0]) < 3e-3 and abs(float(x.std()) - info.std[0]) < 3e-3
    assert load_dataset("fashion_mnist") is bundle   # cached in-process


def test_fashion_mnist_is_found_in_root_directly_and_in_torchvision_layout(tmp_path):
    if not Path(DEBIAN_FASHION_MNIST).is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    flat, tv = tmp_path / "flat", tmp_path / "tv" / "FashionMNIST" / "raw"
    for d in (flat, tv):
        d.mkdir(parents=True)
        for f in FASHION_FILES:
            (d / f).symlink_to(f"{DEBIAN_FASHION_MNIST}/{f}")
    assert find_fashion_mnist(str(flat))["train_images"].parent == flat
    assert find_fashion_mnist(str(tmp_path / "tv"))["test_labels"].parent == tv


def test_a_data_root_without_the_files_is_named_in_a_warning(tmp_path, caplog):
    """A typo in --data-root used to fall back to another copy silently."""
    if not Path(DEBIAN_FASHION_MNIST).is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    with caplog.at_level("WARNING", logger="gmpq_core.data.sources"):
        found = find_fashion_mnist(str(tmp_path / "typo"))
    assert found["train_images"].parent == Path(DEBIAN_FASHION_MNIST)
    assert f"data root '{tmp_path / 'typo'}'" in caplog.text and DEBIAN_FASHION_MNIST in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gmpq_core.data.sources"):
        find_fashion_mnist(None)                       # no root given: no warning
    assert caplog.text == ""


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist", "digits"])
@pytest.mark.parametrize("under", ["", "sub"])
def test_a_data_root_that_is_a_file_is_a_config_error_before_any_read_or_download(name, under, tmp_path):
    """Fashion-MNIST passed over it with a warning; the CIFAR-10 download into it failed and blamed the network."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    root = str(afile / under) if under else str(afile)
    where = "is a file" if not under else f"lies under '{afile}', which is a file"
    with pytest.raises(ConfigError) as e:
        load_dataset(name, root=root)
    assert f"The data root '{root}' {where}, not a folder; pass the folder" in str(e.value)
    assert "data_root in a config file" in str(e.value) and "download" not in str(e.value)
    assert afile.read_text() == "keep me"


def test_check_data_root_names_the_flag_and_passes_folders_and_none(tmp_path):
    from gmpq_core.data.registry import check_data_root

    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="--data-root '.*afile' is a file, not a folder; pass --data-root the folder"):
        check_data_root(str(tmp_path / "afile"), "--data-root")
    assert check_data_root(None) is None and check_data_root(str(tmp_path)) == str(tmp_path)
    assert check_data_root(str(tmp_path / "new" / "sub")) == str(tmp_path / "new" / "sub")   # a download makes it


def test_read_idx_rejects_a_truncated_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + np.array([10, 28, 28], dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(100))
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_mnist5k_has_5000_real_images_500_per_class():
    bundle = load_dataset("mnist5k")
    assert len(bundle.train) == 4000 and len(bundle.test) == 1000
    assert bundle.train.images.shape[1:] == (1, 28, 28)
    labels = torch.cat([bundle.train.labels, bundle.test.labels])
    assert class_counts(labels) == {c: 500 for c in range(10)}
    assert class_counts(bundle.test.labels) == {c: 100 for c in range(10)}
    assert bundle.info.flip is False
    # Real digits: mostly black background with bright strokes (MNIST mean ~0.13).
    assert 0.10 < float(bundle.train.images.float().mean()) / 255 < 0.16
    assert int(bundle.train.images.max()) == 255
    # The split is deterministic and disjoint: reload from scratch gives the same tensors.
    from gmpq_core.data.sources import read_mnist5k
    train, test, _ = read_mnist5k()
    assert torch.equal(train.images, bundle.train.images) and torch.equal(test.labels, bundle.test.labels)


def test_digits_resized_to_28_pixels():
    native = load_dataset("digits")
    assert (len(native.train), len(native.test)) == (1437, 360)
    assert native.train.images.shape[1:] == (1, 8, 8) and int(native.train.images.max()) == 255
    big = load_dataset("digits", image_size=28)
    assert big.info.image_size == 28 and big.info.crop_padding == 2 and big.info.flip is False
    assert big.train.images.shape == (1437, 1, 28, 28) and big.train.images.dtype == torch.uint8
    assert torch.equal(big.train.labels, native.train.labels)
    # Bilinear upsampling keeps the overall brightness (within a few grey levels).
    assert abs(float(big.train.images.float().mean()) - float(native.train.images.float().mean())) < 4.0


def test_cifar10_without_network_raises_a_clear_data_error(tmp_path):
    try:
        socket.getaddrinfo("www.cs.toronto.edu", 443)
        pytest.skip("network available: the test would download 170 MB")
    except OSError:
        pass
    with pytest.raises(DataError, match="download"):
        load_dataset("cifar10", root=str(tmp_path))


# ---------------------------------------------------------------- proxy subsets
def test_proxy_indices_are_deterministic_sorted_and_seed_dependent(fashion):
    labels = fashion[0].train.labels
    a, b = proxy_indices(labels, 2000, seed=0), proxy_indices(labels, 2000, seed=0)
    c = proxy_indices(labels, 2000, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and torch.all(a[1:] > a[:-1])


@pytest.mark.parametrize("size", [10, 500, 1234, 2007])
def test_proxy_is_balanced_within_one_image_per_class(fashion, size):
    counts = class_counts(fashion[0].train.labels[proxy_indices(fashion[0].train.labels, size, seed=3)])
    assert sum(counts.values()) == size and len(counts) == 10
    assert max(counts.values()) - min(counts.values()) <= 1


def test_proxy_subsets_are_nested_for_one_seed(fashion):
    labels = fashion[0].train.labels
    small, large = set(proxy_indices(labels, 500, 7).tolist()), set(proxy_indices(labels, 2000, 7).tolist())
    assert small < large


def test_proxy_with_a_small_class_gives_it_everything_and_shares_the_rest():
    labels = torch.tensor([0] * 2 + [1] * 50 + [2] * 50)
    counts = class_counts(labels[proxy_indices(labels, 30, seed=0)])
    assert counts == {0: 2, 1: 14, 2: 14}


def test_proxy_returns_whole_split_for_none_and_full_size_and_errors_name_both_numbers(fashion):
    train = fashion[0].train
    assert proxy(train, None) is train and proxy(train, 60000) is train
    sub = proxy(train, 100, seed=0)
    assert isinstance(sub, TensorSplit) and len(sub) == 100 and sub.images.shape[1:] == (1, 28, 28)
    with pytest.raises(DataError) as exc:
        proxy(train, 70000)
    assert str(exc.value) == ("proxy size 70000 is larger than the training split of fashion_mnist "
                              "(60000 images); use at most 60000.")
    with pytest.raises(ConfigError, match="proxy size 5 is smaller.*10"):
        proxy(train, 5)


# ---------------------------------------------------------------- loaders
def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_train_loader_is_deterministic_in_seed_and_epoch():
    split, info = _tiny_split((20, 20, 20))
    loader = make_loader(split, info, batch_size=16, train=True, seed=5)
    assert len(loader) == 4 and loader.dataset_size == 60
    first, again, other = _epoch(loader, 1), _epoch(loader, 1), _epoch(loader, 2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], other[0][1])
    seeded = make_loader(split, info, batch_size=16, train=True, seed=6)
    assert not torch.equal(_epoch(seeded, 1)[0][0], first[0][0])
    # Every image is seen once per epoch.
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(split.labels.tolist())


def test_augmentation_is_a_zero_padded_crop_or_its_mirror():
    split, info = _tiny_split((4, 4), size=6, channels=3)
    loader = make_loader(split, info, batch_size=8, train=False, augment=True, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    pixels = ((x * std + mean) * 255).round()
    p = info.crop_padding
    padded = torch.nn.functional.pad(split.images.float(), (p, p, p, p))
    flipped = 0
    for i in range(8):   # reference: brute force over all (dy, dx, flip)
        matches = [(dy, dx, fl) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for fl in (False, True)
                   if torch.equal(pixels[i], (padded[i, :, dy:dy + 6, dx:dx + 6].flip(-1) if fl
                                              else padded[i, :, dy:dy + 6, dx:dx + 6]))]
        assert matches, f"image {i} is not a padded crop of the original"
        flipped += all(fl for *_, fl in matches)
    assert 0 < flipped < 8


def test_eval_loader_keeps_order_and_exact_pixels():
    split, info = _tiny_split((3, 4), size=6)
    loader = make_loader(split, info, batch_size=4, train=False)
    xs, ys = zip(*loader)
    assert [len(y) for y in ys] == [4, 3]
    assert torch.equal(torch.cat(ys), split.labels)
    restored = ((torch.cat(xs) * info.std[0] + info.mean[0]) * 255).round().to(torch.uint8)
    assert torch.equal(restored, split.images)


def test_loader_options_max_batches_drop_last_and_errors():
    split, info = _tiny_split((5, 5))
    assert len(make_loader(split, info, batch_size=3, train=True, drop_last=True)) == 3
    assert len(make_loader(split, info, batch_size=3, train=True, max_batches=2)) == 2
    assert len(list(make_loader(split, info, batch_size=3, train=True, max_batches=2))) == 2
    with pytest.raises(ConfigError, match="batch_size=32 is larger"):
        make_loader(split, info, batch_size=32, train=True, drop_last=True)
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(split, info, batch_size=0, train=True)
    assert 0 <= default_num_workers() <= 4


def test_fashion_mnist_normalisation_gives_zero_mean_unit_std(fashion):
    bundle = fashion[0]
    x = torch.cat([x for x, _ in make_loader(bundle.test, bundle.info, batch_size=2500, train=False)])
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05


# ---------------------------------------------------------------- imagefolder
@pytest.fixture
def image_tree(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path


def test_imagefolder_loads_a_tree_with_augmentation_and_eval_transforms(image_tree):
    bundle = load_dataset(f"imagefolder:{image_tree}", image_size=16)
    assert isinstance(bundle.train, FolderSplit) and (len(bundle.train), len(bundle.test)) == (8, 4)
    assert bundle.info.num_classes == 2 and bundle.info.in_channels == 3 and bundle.info.image_size == 16
    train = make_loader(bundle.train, bundle.info, batch_size=4, train=True, seed=1, num_workers=0)
    first, again = _epoch(train, 0), _epoch(train, 0)
    assert len(first) == 2 and first[0][0].shape == (4, 3, 16, 16) and first[0][0].dtype == torch.float32
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, _epoch(train, 1)))
    test = make_loader(bundle.test, bundle.info, batch_size=4, train=False, num_workers=0)
    (x, y), = list(test)
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]
    sub = proxy(bundle.train, 4, seed=0)
    assert isinstance(sub, FolderSplit) and class_counts(sub.labels) == {0: 2, 1: 2}


def test_imagefolder_without_val_folder_is_a_data_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="train/ and val/"):
        load_dataset(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize("name,says", [
    ("cifar100", "CIFAR-100 is not one of them (cifar10 is CIFAR-10, another dataset): give its images as "
                 "imagefolder:PATH"),
    ("CIFAR-100", "CIFAR-100 is not one of them (cifar10 is CIFAR-10, another dataset)"),
    ("mnist", "MNIST is not one of them (mnist5k holds 5,000 of its images): give its images as imagefolder:PATH"),
    ("svhn", "SVHN is not one of them: give its images as imagefolder:PATH")])
def test_a_well_known_dataset_that_is_not_registered_is_named_as_such(name, says):
    with pytest.raises(ConfigError) as exc:
        load_dataset(name)
    assert str(exc.value).startswith(f"Unknown dataset '{name}'. Available datasets: cifar10, digits, fashion_mnist, "
                                     "imagefolder:PATH, mnist5k.") and says in str(exc.value)


def test_load_dataset_without_download_names_the_folder_and_creates_nothing(tmp_path):
    from gmpq_core.errors import DatasetNotDownloadedError

    root = tmp_path / "cifar"
    with pytest.raises(DatasetNotDownloadedError, match="CIFAR-10 is not in") as caught:
        load_dataset("cifar10", root=str(root), image_size=40, download=False)
    e = caught.value
    assert e.folder == str(root) and e.sizes == (50_000, 10_000) and not root.exists()
    assert (e.info.num_classes, e.info.in_channels, e.info.image_size) == (10, 3, 40)     # at the image_size asked
