"""Final model files as ``gmpq finetune --sweep`` writes them (``DIR/models/<trial>.pt``), for the tests of the
commands that read them (export, evaluate)."""
from __future__ import annotations

import torch

from gmpq_core.export import save_quantized_model
from gmpq_core.finetune import prepare_quantized
from gmpq_core.layers import searchable_layers
from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy, QuantSpec

ARCH = {"model": "resnet20", "num_classes": 10, "in_channels": 1, "small_input": True, "input_size": 28}
PREPROCESS = {"dataset": "fashion_mnist", "image_size": 28, "mean": [0.286], "std": [0.353]}


def sweep_with_models(root, n=2, *, in_channels=1):
    """``root/models/t<i>.pt``: ``n`` seeded resnet20 models under 2/3/4-bit weight policies; returns ``root``."""
    arch = {**ARCH, "in_channels": in_channels}
    for i in range(n):
        torch.manual_seed(i)
        fp = build_model("resnet20", num_classes=10, in_channels=in_channels, small_input=True)
        policy = BitPolicy(layers={name: QuantSpec(w_bits=(2, 3, 4)[(i + j) % 3], a_bits=4)
                                   for j, name in enumerate(searchable_layers(fp))}, meta=dict(arch))
        q = prepare_quantized(fp, policy, torch.randn(4, in_channels, 28, 28)).eval()
        save_quantized_model(root / "models" / f"t{i}.pt", q, policy, arch=arch,
                             results={"top1": 70.0 + i, "trial_id": f"t{i}", "gbitops": 0.1 * (i + 1)},
                             preprocess=PREPROCESS)
    return root
