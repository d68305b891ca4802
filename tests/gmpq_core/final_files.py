"""A small quantized model file as ``gmpq finetune`` writes one, for the gmpq_core tests of reading model files."""
from __future__ import annotations

import torch

from gmpq_core.export import save_quantized_model
from gmpq_core.finetune import prepare_quantized
from gmpq_core.layers import searchable_layers
from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy, QuantSpec

ARCH = {"model": "resnet20", "num_classes": 10, "in_channels": 1, "small_input": True, "input_size": 28}


def quantized_model_file(path):
    """``path``: a seeded resnet20 under a 2/3/4-bit policy, top-1 81.5 recorded; returns ``path``."""
    torch.manual_seed(0)
    fp = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    policy = BitPolicy(layers={n: QuantSpec(w_bits=2 + i % 3, a_bits=4) for i, n in enumerate(searchable_layers(fp))},
                       meta=dict(ARCH))
    q = prepare_quantized(fp, policy, torch.randn(4, 1, 28, 28)).eval()
    return save_quantized_model(path, q, policy, arch=ARCH, results={"top1": 81.5},
                                preprocess={"dataset": "fashion_mnist", "image_size": 28, "mean": [0.286],
                                            "std": [0.353]})
