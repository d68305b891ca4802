"""Decoded copies of gzip dataset files in the model cache (gmpq_core.data.decoded)."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from gmpq_core.data.decoded import cached_array, data_cache_dir, decoded_path
from gmpq_core.data.sources import find_fashion_mnist, read_fashion_mnist, read_idx


def _idx_gz(path, values: np.ndarray):
    header = bytes([0, 0, 0x08, values.ndim]) + np.array(values.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + values.astype(np.uint8).tobytes())
    return path


class CountingDecode:
    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        return read_idx(path)


def test_decoded_once_then_read_back(tmp_path):
    src = _idx_gz(tmp_path / "x-idx3-ubyte.gz", np.arange(2 * 3 * 4).reshape(2, 3, 4))
    decode = CountingDecode()
    first = cached_array(src, decode, cache_dir=tmp_path / "cache")
    again = cached_array(src, decode, cache_dir=tmp_path / "cache")
    assert decode.calls == 1
    np.testing.assert_array_equal(first, read_idx(src))
    np.testing.assert_array_equal(again, first)
    assert again.dtype == np.uint8 and again.shape == (2, 3, 4)
    assert decoded_path(src, tmp_path / "cache").name.startswith("x-idx3-ubyte-")


def test_a_changed_source_is_decoded_again_and_its_old_copy_removed(tmp_path):
    src = _idx_gz(tmp_path / "x-idx1-ubyte.gz", np.arange(5))
    decode = CountingDecode()
    cached_array(src, decode, cache_dir=tmp_path / "c")
    first_copy = decoded_path(src, tmp_path / "c")
    _idx_gz(src, np.arange(5)[::-1])                    # same size: only the content and mtime differ
    os.utime(src, ns=(1, 1))
    out = cached_array(src, decode, cache_dir=tmp_path / "c")
    assert decode.calls == 2
    np.testing.assert_array_equal(out, np.arange(5)[::-1])
    assert not first_copy.exists()
    assert [p.name for p in (tmp_path / "c").iterdir()] == [decoded_path(src, tmp_path / "c").name]


def test_copies_of_another_file_with_the_same_name_are_kept(tmp_path):
    a = _idx_gz((tmp_path / "a").mkdir() or tmp_path / "a" / "x-idx1-ubyte.gz", np.arange(3))
    b = _idx_gz((tmp_path / "b").mkdir() or tmp_path / "b" / "x-idx1-ubyte.gz", np.arange(4))
    decode = CountingDecode()
    for src in (a, b, a, b):
        cached_array(src, decode, cache_dir=tmp_path / "c")
    assert decode.calls == 2 and len(list((tmp_path / "c").glob("*.npy"))) == 2


@pytest.mark.parametrize("value", ["", "off", "0"])
def test_the_copies_can_be_switched_off(tmp_path, monkeypatch, value):
    monkeypatch.setenv("GMPQ_DATA_CACHE_DIR", value)
    assert data_cache_dir() is None
    src = _idx_gz(tmp_path / "x-idx1-ubyte.gz", np.arange(3))
    decode = CountingDecode()
    cached_array(src, decode)
    cached_array(src, decode)
    assert decode.calls == 2 and list(tmp_path.glob("**/*.npy")) == []


def test_the_default_folder_is_local_whatever_the_model_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("GMPQ_DATA_CACHE_DIR")
    monkeypatch.setenv("GMPQ_CACHE_DIR", str(tmp_path / "shared"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_cache_dir() == tmp_path / "home" / ".cache" / "gmpq" / "data"


def test_no_home_directory_still_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("GMPQ_DATA_CACHE_DIR")
    monkeypatch.delenv("HOME", raising=False)
    import pwd

    def no_user(uid):
        raise KeyError(uid)
    monkeypatch.setattr(pwd, "getpwuid", no_user)        # a container user with no passwd entry
    src = _idx_gz(tmp_path / "x-idx1-ubyte.gz", np.arange(3))
    np.testing.assert_array_equal(cached_array(src, CountingDecode()), np.arange(3))


@pytest.mark.parametrize("damage", [b"", b"\x93NUMPY garbage", None])
def test_a_damaged_copy_is_decoded_again_and_rewritten(tmp_path, damage):
    src = _idx_gz(tmp_path / "x-idx1-ubyte.gz", np.arange(9))
    decode = CountingDecode()
    cached_array(src, decode, cache_dir=tmp_path / "c")
    copy = decoded_path(src, tmp_path / "c")
    copy.write_bytes(copy.read_bytes()[:-4] if damage is None else damage)    # None: truncated
    np.testing.assert_array_equal(cached_array(src, decode, cache_dir=tmp_path / "c"), np.arange(9))
    assert decode.calls == 2
    np.testing.assert_array_equal(np.load(copy), np.arange(9))              # the copy was rewritten


def test_an_unwritable_cache_still_returns_the_data(tmp_path):
    src = _idx_gz(tmp_path / "x-idx1-ubyte.gz", np.arange(4))
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    out = cached_array(src, CountingDecode(), cache_dir=blocker / "data")
    np.testing.assert_array_equal(out, np.arange(4))


@pytest.mark.skipif(find_fashion_mnist(None) is None, reason="Fashion-MNIST not installed")
def test_fashion_mnist_reads_the_same_from_its_decoded_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("GMPQ_DATA_CACHE_DIR", str(tmp_path))
    decoded = read_fashion_mnist(None)                  # writes the copies
    assert len(list(tmp_path.glob("*.npy"))) == (4 if find_fashion_mnist(None)["train_images"].suffix == ".gz" else 0)
    again = read_fashion_mnist(None)                    # reads them
    for a, b in zip(decoded[:2], again[:2]):
        assert a.images.equal(b.images) and a.labels.equal(b.labels)
    assert tuple(again[0].images.shape) == (60000, 1, 28, 28) and again[0].images.is_contiguous()
    files = find_fashion_mnist(None)
    np.testing.assert_array_equal(again[1].images[:, 0].numpy(), read_idx(files["test_images"]))
