"""Review 18 (b): one subset-size check, one epochs-resume rule, one levels formula."""
from __future__ import annotations

import pytest

from gmpq_core.errors import ConfigError


def test_check_subset_size_says_larger_than_the_split_and_below_the_classes():
    from gmpq_core.data import check_subset_size

    check_subset_size(None, 10, 10, "proxy_size", "digits", "training")
    check_subset_size(10, 10, 10, "proxy_size", "digits", "training")
    check_subset_size(3, 10, None, "transfer.test_size", "digits", "test")      # classes not checked
    with pytest.raises(ConfigError, match=r"^proxy_size 11 is larger than the proxy dataset 'digits' \(10 training "
                                          r"images\); use at most 10"):
        check_subset_size(11, 10, 2, "proxy_size", "digits", "training", role="proxy")
    with pytest.raises(ConfigError, match=r"^test_size 3 is smaller than the 4 classes of 'digits'; use at least 4\."):
        check_subset_size(3, 10, 4, "test_size", "digits", "test")


@pytest.mark.parametrize("done,epochs,ok", [(2, 3, True), (3, 3, True), (4, 3, False), (2, 5, True), (3, 2, False)])
def test_epochs_left_ok_is_the_one_resume_rule(done, epochs, ok):
    # as many epochs as done keep a checkpoint as it is, finished or interrupted in a longer run (the final stage's rule)
    from gmpq_core.finetune import epochs_left_ok

    assert epochs_left_ok(done, epochs) is ok


def test_one_levels_formula_for_weights_activations_and_the_fused_kernels():
    from gmpq_core import fused, fused_kernels, quantizers

    assert fused.levels_for is fused_kernels.levels_for is quantizers.levels_for
    assert [quantizers.levels_for(b) for b in (1, 2, 3, 8)] == [1, 1, 3, 127]
    assert [quantizers.levels_for(b, False) for b in (1, 2, 8)] == [1, 3, 255]
