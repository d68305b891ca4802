"""User-facing choices about bits: candidates, per-layer specs and versioned bit policies."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .errors import ConfigError, PolicyMismatchError
from .fileio import atomic_write_json
from .layers import fingerprint, searchable_layers, stem_and_classifier

__all__ = ["MIN_BITS", "MAX_BITS", "STEM_BITS", "QuantSpec", "BitCandidates", "BitPolicy", "POLICY_VERSION"]

MIN_BITS, MAX_BITS = 1, 8
POLICY_VERSION = 1
STEM_BITS = 8           # bits of a stem / classifier quantized with no stem_bits given (SearchConfig's default)


def _check_bits(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, but got {what}={value!r}.")
    return value


_SHAPE = ("A bit policy must be a JSON object with 'version' and 'layers' ({layer: {\"w_bits\": W, \"a_bits\": A}}, "
          "as 'gmpq search' writes to DIR/policy.json),")


def _kind(value: Any) -> str:
    """What a JSON value is, in words: "a list of 20 entries", "a string"."""
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} entries"
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), f"a {type(value).__name__}")


_RESULT_FIX = "pass the policy.json of the same folder (written by 'gmpq search', copied by 'gmpq finetune --policy')."


def _result_hint(d: Any) -> str:
    """For a result file of gmpq (finetune_result.json, result.json: they record the policy they used): where the
    policy itself is."""
    if isinstance(d, Mapping) and ("top1" in d or "policy" in d or "history" in d):
        return f" This looks like a result file of gmpq, not a policy: {_RESULT_FIX}"
    return ""


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """Bitwidths of one layer: its weight and its input activation."""
    w_bits: int
    a_bits: int

    def __post_init__(self) -> None:
        _check_bits(self.w_bits, "w_bits")
        _check_bits(self.a_bits, "a_bits")


@dataclass(frozen=True, kw_only=True)
class BitCandidates:
    """Candidate bitwidths of the search, for weights and for activations (official: {2,3,4,6})."""
    w_bits: tuple[int, ...] = (2, 3, 4, 6)
    a_bits: tuple[int, ...] = (2, 3, 4, 6)

    def __post_init__(self) -> None:
        for what in ("w_bits", "a_bits"):
            vals = tuple(getattr(self, what))
            if not vals:
                raise ConfigError(f"The bit candidates' {what} is empty: a search needs at least one bitwidth. In "
                                  "the YAML write 'candidates: [2, 3, 4, 6]' (both) or 'candidates: {w_bits: [2, 3, 4, "
                                  "6], a_bits: [2, 3, 4, 6]}'.")
            for v in vals:
                _check_bits(v, f"candidate {what}")
            if len(set(vals)) != len(vals):
                raise ConfigError(f"candidate {what} must not repeat a value, but got {what}: {list(vals)}. List "
                                  "each bitwidth once.")
            object.__setattr__(self, what, tuple(sorted(vals)))

    @classmethod
    def from_any(cls, value: Any) -> "BitCandidates":
        """Accept a BitCandidates, a list (same for both) or a dict {w_bits: [...], a_bits: [...]}."""
        if isinstance(value, BitCandidates):
            return value
        if isinstance(value, Mapping):
            return cls(w_bits=tuple(value.get("w_bits", (2, 3, 4, 6))), a_bits=tuple(value.get("a_bits", (2, 3, 4, 6))))
        if isinstance(value, (list, tuple)):
            return cls(w_bits=tuple(value), a_bits=tuple(value))
        raise ConfigError(f"candidates must be a list of bitwidths or {{w_bits: [...], a_bits: [...]}}, but got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class BitPolicy:
    """Per-layer bitwidths keyed by fully qualified module name, tied to an architecture fingerprint.

    JSON form: ``{"version": 1, "fingerprint": "...", "layers": {"layer1.0.conv1": {"w_bits": 4,
    "a_bits": 4}, ...}, "meta": {...}}``.
    """
    layers: Mapping[str, QuantSpec]
    fingerprint: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise PolicyMismatchError(f"{_SHAPE} 'layers' must map each layer name to {{w_bits, a_bits}}, but got "
                                      f"{_kind(self.layers)}.")
        if not isinstance(self.meta, Mapping):
            raise PolicyMismatchError(f"{_SHAPE} 'meta' must be an object, but got {_kind(self.meta)}.")
        fixed = {}
        for name, spec in dict(self.layers).items():
            if isinstance(spec, Mapping):
                spec = QuantSpec(w_bits=spec.get("w_bits"), a_bits=spec.get("a_bits"))
            elif isinstance(spec, (tuple, list)) and len(spec) == 2:
                spec = QuantSpec(w_bits=spec[0], a_bits=spec[1])
            if not isinstance(spec, QuantSpec):
                raise PolicyMismatchError(f"layer '{name}' must map to {{w_bits, a_bits}}, but got {spec!r}.")
            fixed[name] = spec
        object.__setattr__(self, "layers", fixed)
        object.__setattr__(self, "meta", dict(self.meta))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def uniform(cls, model: nn.Module, w_bits: int, a_bits: int, **scope: bool) -> "BitPolicy":
        spec = QuantSpec(w_bits=w_bits, a_bits=a_bits)
        return cls(layers={n: spec for n in searchable_layers(model, **scope)},
                   fingerprint=fingerprint(model, **scope), meta={"kind": f"uniform W{w_bits}A{a_bits}"})

    # -- views --------------------------------------------------------------------------------
    def average_bits(self) -> tuple[float, float]:
        """Plain (unweighted) mean weight and activation bits over layers."""
        n = max(len(self.layers), 1)
        return (sum(s.w_bits for s in self.layers.values()) / n, sum(s.a_bits for s in self.layers.values()) / n)

    def quant_scope(self) -> dict[str, Any]:
        """What the meta says of the stem and classifier (``gmpq search --include-stem --stem-bits B`` records it):
        ``{"include_stem": bool, "include_classifier": bool, "stem_bits": int}``, full precision when it says
        nothing. Every use of the policy (fine-tune, export, BitOPs) quantizes them the same way."""
        meta = self.meta or {}
        include = {"include_stem": bool(meta.get("include_stem")),
                   "include_classifier": bool(meta.get("include_classifier"))}
        bits = meta.get("stem_bits")
        bits = STEM_BITS if bits is None or not any(include.values()) else bits   # unused: not checked
        if isinstance(bits, float) and bits.is_integer() or type(bits).__name__.startswith(("int", "uint")):
            bits = int(bits)                 # 8.0, numpy ints: as the old int(...) read them
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise PolicyMismatchError(f"The policy's meta gives stem_bits={bits!r}, but the stem / classifier bits "
                                      f"must be a whole number in {MIN_BITS}..{MAX_BITS}. Fix 'stem_bits' in the "
                                      "policy file's meta, or search the policy again with 'gmpq search "
                                      "--stem-bits B'.")
        return {**include, "stem_bits": bits}

    def quantized_specs(self, model: nn.Module) -> dict[str, QuantSpec]:
        """The bits of every layer of ``model`` this policy quantizes (FQN -> QuantSpec): its layers, plus the stem
        and / or classifier its meta quantizes at ``stem_bits`` (``quant_scope``) unless the policy names them."""
        scope = self.quant_scope()
        stem, classifier = stem_and_classifier(model)
        specs = dict(self.layers)
        spec = QuantSpec(w_bits=scope["stem_bits"], a_bits=scope["stem_bits"])
        for name, on in ((stem, scope["include_stem"]), (classifier, scope["include_classifier"])):
            if on and name is not None:
                specs.setdefault(name, spec)
        return specs

    # -- validation ---------------------------------------------------------------------------
    def check_fits(self, model: nn.Module, *, fix: str | None = None, **scope: bool) -> None:
        """Raise PolicyMismatchError naming the first offending layers if this policy does not fit; ``fix`` (a
        caller that knows which model it built) replaces the general advice that ends the message."""
        layers = searchable_layers(model, **scope)
        missing = [n for n in layers if n not in self.layers]
        extra = [n for n in self.layers if n not in layers]
        stem, classifier = stem_and_classifier(model)
        conv_classifier = extra == [classifier] and isinstance(model.get_submodule(classifier), nn.Conv2d)
        fixed = [] if conv_classifier else [n for n in extra if n in (stem, classifier)]
        extra = [n for n in extra if n not in fixed]
        problems = []
        if missing:
            problems.append(f"missing layers {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if extra:
            problems.append(f"layers not in the model {extra[:3]}{' ...' if len(extra) > 3 else ''}")
        if fixed:                            # in the model, but never one of the policy's layers
            named = " and ".join(f"{n!r} (its {'stem' if n == stem else 'classifier'})" for n in fixed)
            problems.append(f"{named} {'is' if len(fixed) == 1 else 'are'} in the network but never among a "
                            "policy's layers: the stem and classifier stay full precision unless the policy's meta "
                            "quantizes them at a fixed width; drop them from 'layers' and set include_stem / "
                            "include_classifier and stem_bits in 'meta' (what 'gmpq search --include-stem "
                            "--include-classifier --stem-bits B' writes)")
        if not problems and self.fingerprint is not None:
            fp = fingerprint(model, **scope)
            if fp != self.fingerprint:
                problems.append(f"weight shapes differ (policy fingerprint {self.fingerprint}, model {fp})")
        if conv_classifier:
            problems.append(f"'{classifier}' is this network's classifier (it has no nn.Linear: its last Conv2d "
                            "stays full precision, as a Linear classifier does, since 2026-11-29; a policy searched "
                            "before names it). Search the policy again, or drop that layer from the policy's JSON "
                            "and quantize the classifier with include_classifier")
        if problems:
            raise PolicyMismatchError(
                "The bit policy does not fit this model: " + "; ".join(problems)
                + (" " if problems[-1].endswith("...") else ". ") + ("" if fixed and not (missing or extra)
                                                                     else fix or "Use a policy "
                "searched for the same model, input channels and number of classes (see the policy's meta), or "
                "derive a new one with 'gmpq search'."))

    # -- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": POLICY_VERSION, "fingerprint": self.fingerprint,
                "layers": {n: {"w_bits": s.w_bits, "a_bits": s.a_bits} for n, s in self.layers.items()},
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BitPolicy":
        if not isinstance(d, Mapping) or "layers" not in d:
            raise PolicyMismatchError(f"{_SHAPE} but got "
                                      f"{'keys ' + str(sorted(d)) if isinstance(d, Mapping) else type(d).__name__}."
                                      f"{_result_hint(d)}")
        if not isinstance(d["layers"], Mapping) or not isinstance(d.get("meta", {}), Mapping):
            key = "layers" if not isinstance(d["layers"], Mapping) else "meta"
            raise PolicyMismatchError(f"{_SHAPE} but its '{key}' is {_kind(d[key])}, not an object."
                                      f"{_result_hint(d)}")
        version = d.get("version", POLICY_VERSION)
        if version != POLICY_VERSION:
            raise PolicyMismatchError(f"Unsupported policy version {version!r}; this tool reads version "
                                      f"{POLICY_VERSION}. Re-export the policy with this version of gmpq.")
        try:
            return cls(layers=d["layers"], fingerprint=d.get("fingerprint"), meta=d.get("meta", {}))
        except ConfigError as e:
            raise PolicyMismatchError(f"Invalid bits in the policy: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "BitPolicy":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PolicyMismatchError(f"The policy is not valid JSON ({e}).") from None

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitPolicy":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PolicyMismatchError(f"The policy file '{p}' is not text (a binary file, e.g. a checkpoint or a "
                                      "pickle?). Policies are JSON only: pass DIR/policy.json from 'gmpq search', or "
                                      "a sweep's DIR/policies/<trial_id>.json (one per policy on the front, written "
                                      f"by 'gmpq pareto'){_sweep_policy_hint(p)}.") from None
        except OSError as e:
            raise PolicyMismatchError(f"Cannot read the policy file '{p}' ({e.strerror}). Check the path; "
                                      "'gmpq search --out DIR' writes DIR/policy.json.") from None
        try:
            return cls.from_json(text)
        except PolicyMismatchError as e:
            msg, beside = str(e), p.with_name("policy.json")
            if _RESULT_FIX in msg and p.name != beside.name and beside.is_file():
                msg = msg.replace(_RESULT_FIX, f"pass {beside}, beside it.")
            raise PolicyMismatchError(f"Policy file '{p}': {msg}") from None


def _sweep_policy_hint(path: Path) -> str:
    """``: here, SWEEP/policies/<id>.json`` for a binary file of a sweep folder (its pareto.parquet, a model file
    models/<id>.pt: that trial's policy when its file is there); else nothing."""
    for sweep in (path.parent, path.parent.parent):
        policies = sweep / "policies"
        if policies.is_dir():
            own = policies / f"{path.name.split('.')[0]}.json"
            return f": here, {own if own.is_file() else policies / '<trial_id>.json'}"
    return ""
