"""GMPQ core: pure PyTorch (never imports ray, optuna, mlflow or pyarrow).

The names below are imported from their modules on first use (PEP 562), so ``import gmpq_core.errors``
(what the ``gmpq`` command needs to print its help or an error) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "bitops": ("BitOpsReport", "LayerCost", "count_bitops", "layer_macs"),
    "errors": ("BudgetInfeasibleError", "CheckpointError", "ConfigError", "DataError", "GMPQError",
               "PolicyMismatchError"),
    "layers": ("fingerprint", "searchable_layers", "swap_module"),
    "models": ("build_model", "list_models"),
    "policy": ("BitCandidates", "BitPolicy", "QuantSpec"),
    "precision": ("PRECISIONS", "resolve_precision"),
    "qmodules": ("QuantConv2d", "QuantLinear", "apply_policy_", "calibrate_", "set_quant_impl_"),
    "reporting": ("ListReporter", "NullReporter", "Reporter"),
    "search": ("Budget", "SearchConfig", "SearchResult", "build_supernet", "derive_policy", "search_policy"),
    "supernet": ("MixedConv2d", "MixedLinear"),
    "jobs": ("SearchJob", "Teacher", "load_teacher", "get_teacher", "run_search_job"),
    "export": ("QuantizedModel", "load_quantized_model", "save_quantized_model"),
    "integer_model": ("load_integer_model", "save_integer_model"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'gmpq_core' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
