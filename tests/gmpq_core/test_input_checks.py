"""Core checks of sizes a user gives: image sides within bounds, resizes that fit in memory, subset sizes named
as the caller's flag."""
from __future__ import annotations

import pytest

from gmpq_core.data import load_dataset, proxy
from gmpq_core.data import registry
from gmpq_core.errors import ConfigError, DataError


@pytest.mark.parametrize("size", [4097, 100_000])
def test_image_sizes_past_4096_px_are_refused_before_a_resize(size):
    with pytest.raises(ConfigError, match=f"image_size.*but got image_size={size}"):
        load_dataset("digits", image_size=size)


def test_an_image_size_check_names_a_flag_as_typed():
    with pytest.raises(ConfigError, match="^--input-size must be at most 4096 pixels per side, but got --input-size "
                                          "5000 "):
        registry.check_image_size(5000, "--input-size")
    assert registry.check_image_size(4096, "--input-size") == 4096 and registry.check_image_size(None) is None


def test_a_resize_larger_than_the_machines_memory_fails_before_allocating(monkeypatch):
    # 1,797 digits at 1024x1024 are 1.8 GiB of uint8: more than a 1 GiB machine holds
    monkeypatch.setattr(registry, "_physical_memory", lambda: 2**30)
    with pytest.raises(DataError, match=r"Resizing digits \(1,797 images of 8x8\) to 1024x1024 needs 1\.8 GiB"
                                        r".*more than this machine has \(1\.0 GiB\)"):
        load_dataset("digits", image_size=1024)
    assert load_dataset("digits", image_size=16).info.image_size == 16          # small resizes still fit


def test_proxy_names_the_size_as_the_caller_calls_it():
    test = load_dataset("digits").test
    with pytest.raises(DataError, match=r"^--test-size 1000 is larger than the test split of digits \(360 images\)"):
        proxy(test, 1000, what="--test-size")
    with pytest.raises(ConfigError, match=r"^--test-size 5 is smaller than the number of classes"):
        proxy(test, 5, what="--test-size")
    with pytest.raises(DataError, match=r"^proxy size 1000 is larger"):                 # the default name
        proxy(test, 1000)
