"""A fine-tuned quantized model with its weights stored as packed integer codes: the size the policy promises.

The model files of ``gmpq_core.export`` keep float weights (what the fine-tune trained): a 4-bit policy is as
large on disk as the FP model. ``save_integer_model(path, qmodel)`` writes each quantized layer's weight as
its integer codes, packed ``w_bits`` to a value, plus one float step per layer (METHOD.md 3: symmetric per
tensor, threshold t = max|W|)::

    w_bits >= 2:  n = 2^(w_bits-1) - 1,  step = t / n,  q = round(clamp(W, -t, t) / step) in [-n, n],
                  stored as u = q + n in w_bits bits;  W_q = q * step
    w_bits == 1:  step = mean|W|,  q = sign(W) in {-1, 0, 1} (a weight of exactly 0 stays 0), stored in 2 bits

Codes are packed little-endian: value i occupies bits [i*b, (i+1)*b) of the byte stream (bit 0 = the
least significant bit of byte 0). Everything else (biases, BatchNorm, the activation clips and signed flags,
layers kept in full precision) stays float32 in ``float_state``. With the activation codes of a layer's input,
``a = round(clip(x) / s_a)`` (PACT, ``s_a = clip / (2^a_bits - 1)``, or ``clip / (2^(a_bits-1) - 1)`` when
signed), a quantized layer is an integer product: ``conv(x_q, W_q) = s_a * step * conv(a, q)`` (+ bias).

``load_integer_model(path)`` (and ``export.load_quantized_model``, which reads either kind of file) unpacks
the codes to ``q * step`` and returns the same ``QuantizedModel`` as the float file: the same outputs, bit for
bit on the same device for 2..8-bit weights (the layers quantize their weight again in every forward, and
``(n * step) / n`` is ``step`` again in float32). A binary layer quantizes with ``mean|W|`` recomputed from its
weights: one of them is nudged until that mean is ``step`` again, which float sums do not always allow (a
rounding off then, which a quantized activation downstream can turn into another code).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .errors import CheckpointError, ConfigError
from .export import FORMAT, INT_FORMAT_FAMILY, QuantizedModel, arch_from_meta, load_quantized_model
from .fileio import QUANTIZED_MODEL_HINT, load_checkpoint, save_checkpoint
from .policy import QuantSpec
from .qmodules import quantized_layers
from .quantizers import levels_for, quantize_weight, weight_step

__all__ = ["INT_FORMAT", "pack_codes", "unpack_codes", "weight_codes", "dequantize", "save_integer_model",
           "load_integer_model", "integer_sizes"]

INT_FORMAT = f"{INT_FORMAT_FAMILY}1"


def storage_bits(w_bits: int) -> int:
    """Bits per stored weight code: ``w_bits``, but 2 for binary weights (their codes are -1, 0, 1)."""
    return max(int(w_bits), 2)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Unsigned integer ``codes`` (any shape, each < 2^bits) as a uint8 stream of ``bits`` bits per value."""
    if not 1 <= bits <= 8:
        raise ConfigError(f"pack_codes packs 1..8 bits per value, but got bits={bits}.")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise ConfigError(f"codes must lie in 0..{2 ** bits - 1} to pack in {bits} bits, but got "
                          f"{int(flat.min())}..{int(flat.max())}.")
    shifts = torch.arange(bits, dtype=torch.uint8)          # uint8 throughout: one byte per bit, not eight
    stream = ((flat.to(torch.uint8).unsqueeze(1) >> shifts) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8)).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first ``numel`` values of a ``pack_codes`` stream, as int64."""
    stream = ((packed.to(torch.uint8).unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    if stream.numel() < numel * bits:
        raise CheckpointError(f"a packed weight holds {stream.numel()} bits, fewer than the {numel} values x {bits} "
                              "bits its layer needs: the file is truncated or damaged.")
    fields = stream[: numel * bits].reshape(numel, bits)
    return (fields << torch.arange(bits, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8).to(torch.int64)


def weight_codes(weight: Tensor, w_bits: int) -> tuple[Tensor, float]:
    """``(q, step)`` with ``quantize_weight(weight, w_bits) == q * step``: the signed integer codes (int64,
    ``weight``'s shape) and the float32 step of a quantized layer's weight."""
    w = weight.detach().float().cpu()
    wq = quantize_weight(w, w_bits)
    step = weight_step(w, w_bits)
    q = torch.round(wq / step) if float(step) > 0 else torch.zeros_like(wq)
    return q.to(torch.int64), float(step)


def save_integer_model(path: str | os.PathLike, model: QuantizedModel) -> Path:
    """Write ``model`` (``export.load_quantized_model``'s result) with packed integer weights; returns the path."""
    net = model.model
    layers = quantized_layers(net)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    packed: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        w_bits = int(layer.w_bits)                      # 1..8 (QuantSpec): every quantized layer is packed
        q, step = weight_codes(layer.weight, w_bits)
        packed[name] = {"w_bits": w_bits, "shape": list(layer.weight.shape), "step": step,
                        "codes": pack_codes(q + levels_for(w_bits), storage_bits(w_bits))}
        del state[f"{name}.weight"]
    return save_checkpoint(path, {"format": INT_FORMAT, "arch": dict(model.arch), "policy_json": model.policy.to_json(),
                                  "quantized": {n: [int(s.w_bits), int(s.a_bits)] for n, s in model.quantized.items()},
                                  "packed": packed, "float_state": state, "results": dict(model.results),
                                  "preprocess": dict(model.preprocess),
                                  **({"model_source": model.model_source} if model.model_source else {})})


def load_integer_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                       blob: Mapping[str, Any] | None = None) -> QuantizedModel:
    """Rebuild a model written by ``save_integer_model`` (weights ``q * step``, float32, eval mode);
    ``export.load_quantized_model`` calls it for such a file. ``blob``: the file's content already read."""
    path = Path(path)
    blob = load_checkpoint(path, text_hint=QUANTIZED_MODEL_HINT) if blob is None else blob
    found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
    if isinstance(found, str) and found.startswith(INT_FORMAT_FAMILY) and found != INT_FORMAT:
        raise CheckpointError(f"'{path}' is a gmpq integer model of another version (format {found!r}; this gmpq "
                              f"reads {INT_FORMAT!r}); load it with the gmpq version that wrote it, or export the "
                              "float model again with this one ('gmpq export MODEL.pt').")
    if found != INT_FORMAT:
        raise CheckpointError(f"'{path}' is not a gmpq integer model (format {found!r}, expected {INT_FORMAT!r}). "
                              "Write one from a final model file with 'gmpq export MODEL.pt'.")
    missing = [k for k in ("arch", "policy_json", "quantized", "packed", "float_state") if k not in blob]
    if missing:
        raise CheckpointError(f"'{path}' lacks {missing} of a gmpq integer model: it is damaged or was edited. "
                              "Export the float model again ('gmpq export MODEL.pt').")
    state = dict(blob["float_state"])
    for name, entry in blob["packed"].items():
        w_bits, shape = int(entry["w_bits"]), [int(s) for s in entry["shape"]]
        q = unpack_codes(entry["codes"], storage_bits(w_bits), math.prod(shape)) - levels_for(w_bits)
        state[f"{name}.weight"] = dequantize(q, w_bits, entry).reshape(shape)
    as_float = {"format": FORMAT, "arch": arch_from_meta(blob["arch"]),
                "policy_json": blob["policy_json"], "quantized": blob["quantized"], "state_dict": state,
                "results": blob.get("results") or {}, "preprocess": blob.get("preprocess") or {},
                **({"model_source": blob["model_source"]} if blob.get("model_source") else {})}
    return load_quantized_model(path, device=device, blob=as_float)


def dequantize(q: Tensor, w_bits: int, entry: Mapping[str, Any]) -> Tensor:
    """The float32 weights ``q * step`` of a packed layer (a binary layer's nudged: ``_match_mean_``)."""
    step = torch.tensor(float(entry["step"]), dtype=torch.float32)
    w = q.to(torch.float32) * step
    if w_bits == 1:
        _match_mean_(w, q, step)
    return w


def _match_mean_(w: Tensor, q: Tensor, step: Tensor, tries: int = 8) -> None:
    """Nudge one nonzero weight of a binary layer towards ``w.abs().mean()`` (what its quantizer computes, on
    this device) being ``step`` exactly, as it was for the weights it came from; signs unchanged. Not always
    reachable (the means of float sums can skip a value): then it stays a float rounding off."""
    nonzero = torch.nonzero(q.reshape(-1)).flatten()
    if not len(nonzero):
        return
    flat, k = w.view(-1), int(nonzero[0])
    for _ in range(tries):
        gap = step - flat.abs().mean()
        if float(gap) == 0.0:
            return
        nudged = flat[k] + torch.sign(flat[k]) * gap * flat.numel()
        if torch.sign(nudged) != torch.sign(flat[k]):
            return
        flat[k] = nudged


def integer_sizes(model: QuantizedModel) -> dict[str, Any]:
    """Weight storage of ``model``'s layers: float32 bytes vs packed bytes, per quantized layer and in total."""
    rows, float_bytes, packed_bytes = [], 0, 0
    for name, m in model.model.named_modules():
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor) or not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        spec: QuantSpec | None = model.quantized.get(name)
        bits = storage_bits(spec.w_bits) if spec is not None else 32     # a layer kept in float32
        fb, pb = 4 * weight.numel(), (weight.numel() * bits + 7) // 8 + (4 if bits < 32 else 0)
        rows.append({"layer": name, "w_bits": spec.w_bits if spec else 32, "params": weight.numel(),
                     "float_bytes": fb, "packed_bytes": pb})
        float_bytes, packed_bytes = float_bytes + fb, packed_bytes + pb
    return {"layers": rows, "float_bytes": float_bytes, "packed_bytes": packed_bytes,
            "ratio": float_bytes / packed_bytes if packed_bytes else None}
