"""The sweep's Optuna sampler, chosen by name in the config: ``sampler: {name: tpe, kwargs: {...}}``.

Every sampler here handles the sweep's two objectives (transfer_top1 up, BitOPs down) and the space's ranges and
lists; each is seeded with the config's top-level ``seed``. ``kwargs`` takes the sampler's plain-valued arguments
(numbers, booleans, names); those that take Python objects (callables, other samplers) are not offered.
Samplers that are single-objective only (CMA-ES) or need the whole grid up front (grid, brute force) are not
offered either.

A sampler's first trials are random (TPE and GP: ``n_startup_trials``, default 10; NSGA-II: its first
``population_size`` trials, default 50); ``warmup`` says so for a sweep whose trials are all among them (unless
the config sets that count itself), in two parts (what happens, the fix) that ``warmup_text`` joins.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, NamedTuple

import optuna

from gmpq_core.errors import ConfigError, did_you_mean

__all__ = ["SAMPLERS", "DEFAULT_SAMPLER", "make_sampler", "sampler_text", "Warmup", "warmup", "warmup_text",
           "with_defaults", "random_first_trials"]

DEFAULT_SAMPLER = "tpe"
# name -> (Optuna class name, {argument: accepted type(s)}, what the name means)
SAMPLERS: dict[str, tuple[str, dict[str, tuple[type, ...]], str]] = {
    "tpe": ("TPESampler", {"n_startup_trials": (int,), "n_ei_candidates": (int,), "multivariate": (bool,),
                           "group": (bool,), "constant_liar": (bool,)},      # (not the ones Optuna 5 deprecates)
            "tree-structured Parzen estimator (the default)"),
    "random": ("RandomSampler", {}, "independent uniform draws"),
    "nsga2": ("NSGAIISampler", {"population_size": (int,), "mutation_prob": (int, float, type(None)),
                                "crossover_prob": (int, float), "swapping_prob": (int, float)},
              "the NSGA-II genetic algorithm"),
    "qmc": ("QMCSampler", {"qmc_type": (str,), "scramble": (bool,)}, "quasi-Monte Carlo (Sobol or Halton) points"),
    "gp": ("GPSampler", {"n_startup_trials": (int,), "deterministic_objective": (bool,)},
           "Gaussian-process Bayesian optimization"),
}
# the argument counting a sampler's random first trials (its default: Optuna's signature, ``with_defaults``)
_STARTUP_KEY = {"tpe": "n_startup_trials", "gp": "n_startup_trials", "nsga2": "population_size"}
# arguments whose signature default is a placeholder (None) that Optuna turns into a value inside, for the sweep's
# studies (always two objectives): (sampler, argument) -> that value, from the sampler's other arguments (defaults
# filled in). TPE's multivariate: TPESampler._is_multivariate: False for a multi-objective study, True with group
# (which needs it). NSGA-II's mutation_prob is not here: None means 1 / the parent trial's parameter count, trial by
# trial, which no written value equals; it compares as written.
_PLACEHOLDERS: dict[tuple[str, str], Callable[[Mapping[str, Any]], Any]] = {
    ("tpe", "multivariate"): lambda args: bool(args["group"]),
}


def _names() -> str:
    return ", ".join(f"{n} ({cls}: {what})" for n, (cls, _, what) in SAMPLERS.items())


def _check(name: Any, kwargs: Any) -> None:
    """The name and arguments as a config gives them: ConfigError naming the value and the fix."""
    if not isinstance(name, str) or name not in SAMPLERS:
        hint = did_you_mean([name], list(SAMPLERS)) if isinstance(name, str) else ""
        raise ConfigError(f"Unknown sampler {name!r}.{hint} Available samplers: {_names()}. Write it as "
                          "sampler: {name: tpe, kwargs: {n_startup_trials: 4}}.")
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"sampler.kwargs must be a mapping of the sampler's arguments, but got {kwargs!r}.")
    cls, accepted, _ = SAMPLERS[name]
    if "seed" in kwargs:
        raise ConfigError(f"sampler.kwargs.seed={kwargs['seed']!r}: the sampler is seeded with the sweep's own "
                          "'seed' (top level of the config, or --seed). Move the value there and delete "
                          "sampler.kwargs.seed.")
    unknown = sorted(set(kwargs) - set(accepted), key=str)
    if unknown:
        raise ConfigError(f"The '{name}' sampler ({cls}) takes no argument(s) {unknown} here."
                          f"{did_you_mean([str(u) for u in unknown], list(accepted))} Its arguments: "
                          f"{', '.join(accepted) or 'none'} (the seed is the config's top-level 'seed').")
    for key, value in kwargs.items():
        types = accepted[key]
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"sampler.kwargs.{key} must be {want}, but got {value!r} ({type(value).__name__}). "
                              "Write it unquoted in the YAML, e.g. "
                              f"{key}: {'true' if types == (bool,) else 4 if int in types else 'sobol'}.")


def make_sampler(name: str = DEFAULT_SAMPLER, kwargs: Mapping[str, Any] | None = None, *,
                 seed: int | None = None) -> optuna.samplers.BaseSampler:
    """``optuna.samplers.<Class>(seed=seed, **kwargs)`` for the sampler's config name; ConfigError on a bad name,
    argument or value (the one Optuna rejects as it builds, e.g. ``qmc_type: latin``)."""
    kwargs = dict(kwargs or {})
    _check(name, kwargs)
    cls = SAMPLERS[name][0]
    try:
        with warnings.catch_warnings():     # "QMCSampler is experimental": a notice for Optuna's API users
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return getattr(optuna.samplers, cls)(seed=seed, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Bad arguments for the '{name}' sampler ({cls}) {kwargs}: {str(e).rstrip('.')}. Its "
                          f"arguments: {', '.join(SAMPLERS[name][1]) or 'none'}.") from None


def sampler_text(name: str, kwargs: Mapping[str, Any], seed: int) -> str:
    """``TPESampler (seed 0, n_startup_trials=4)``: the sampler as the sweep's lines name it."""
    args = "".join(f", {k}={v}" for k, v in kwargs.items())
    return f"{SAMPLERS[name][0]} (seed {seed}{args})"


def random_first_trials(name: str, kwargs: Mapping[str, Any]) -> tuple[str, int] | None:
    """The argument counting the sampler's random first trials and its value (set in ``kwargs``, else Optuna's
    default): ``("n_startup_trials", 10)``; None for a sampler without one (random, qmc)."""
    key = _STARTUP_KEY.get(name)
    return None if key is None else (key, int(with_defaults(name, kwargs)[key]))


class Warmup(NamedTuple):
    """``warmup``'s two parts: ``fact`` (what the sampler does with the sweep's trials, no full stop) and ``fix``
    (the sentence that makes it guided), each usable alone (``sweep_grow`` says the fact only)."""
    fact: str
    fix: str


def warmup(name: str, kwargs: Mapping[str, Any], n_trials: int) -> Warmup | None:
    """When every one of the sweep's ``n_trials`` is among the sampler's random first trials (then the sampler never
    uses what earlier trials found): what it does and the fix, else None; None too when ``kwargs`` sets that count
    (the config chose it knowingly, as the demo preset does)."""
    key = _STARTUP_KEY.get(name)
    if key is None or key in kwargs:
        return None
    first = with_defaults(name, {})[key]
    if n_trials > first:
        return None
    suggested = max(2 if name == "nsga2" else 1, min(first, n_trials // 2))
    return Warmup(fact=f"the {SAMPLERS[name][0]}'s first {first} trials are random ({key}={first}) and this sweep "
                       f"has {n_trials}: every trial is drawn at random, none guided by earlier ones",
                  fix=f"For guided suggestions set sampler: {{name: {name}, kwargs: {{{key}: {suggested}}}}} or more "
                      "n_trials.")


def warmup_text(name: str, kwargs: Mapping[str, Any], n_trials: int) -> str | None:
    """``warmup``'s line (its fact and its fix), or None."""
    said = warmup(name, kwargs, n_trials)
    return None if said is None else f"{said.fact}. {said.fix}"


def with_defaults(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every argument ``kwargs`` may set, at its Optuna default unless set: two configs that differ only by
    writing a default out (``n_startup_trials: 10`` for TPE) run the same sampler (a resume compares these). An
    argument whose signature default is a placeholder (None: Optuna picks the value inside) gets the value Optuna
    picks for the sweep's two objectives where ``_PLACEHOLDERS`` knows it (TPE's ``multivariate: false``, or true
    with ``group: true``); otherwise it stays as written."""
    import inspect

    if name not in SAMPLERS:
        return dict(kwargs)
    params = inspect.signature(getattr(optuna.samplers, SAMPLERS[name][0])).parameters
    args = {k: params[k].default for k in SAMPLERS[name][1] if params[k].default is not None} | dict(kwargs)
    for (sampler, key), effective in _PLACEHOLDERS.items():
        if sampler == name and args.get(key) is None and params[key].default is None:
            args[key] = effective(args)
    return args
