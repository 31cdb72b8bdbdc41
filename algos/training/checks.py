"""Validation of configuration dataclasses: small pure functions every Config's ``__post_init__`` uses.

Each check raises on the first bad field with one message format,
``"<ConfigClass>.<field>: expected <what>, got <value>"``, so a bad value from the command line, a
preset or a config file names the class, the field, the rule and the offending value:

    >>> VinePPOConfig(learning_rate=-1e-6)   # its __post_init__ calls check_positive(self, (..., "learning_rate"))
    ValueError: VinePPOConfig.learning_rate: expected a value > 0, got -1e-06

Typical order in a ``__post_init__``: `check_types` (so later comparisons never meet a string),
`check_finite` (NaN slips through ``x < 0`` tests, inf through ``x > 0``), then the range checks.

`check_run_config` applies the same checks to the shared run settings (`algos.training.config.RunConfig`),
so the command line can call it before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union

__all__ = [
    "check_at_least",
    "check_at_most",
    "check_finite",
    "check_fraction",
    "check_interval",
    "check_non_negative",
    "check_positive",
    "check_run_config",
    "check_top_p",
    "check_types",
]


def _get(cfg: Any, name: str) -> Any:
    """``cfg.<name>``, where ``name`` may be a dotted path into nested configs (``sampling.top_p``)."""
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _fail(cfg: Any, name: str, expected: str, exc: type[Exception] = ValueError):
    raise exc(f"{type(cfg).__name__}.{name}: expected {expected}, got {_get(cfg, name)!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------ types

@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return {int: "an int", float: "a number", bool: "a bool", str: "a string", Path: "a path"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits ``hint``; None when the hint is not one this module checks."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (Union, types.UnionType):
        results = [_matches(value, a) for a in typing.get_args(hint)]
        return None if None in results and not any(results) else any(results)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_real(value)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, (str, os.PathLike))
    return None


def check_types(cfg: Any) -> None:
    """Check every field of the dataclass ``cfg`` against its annotation.

    Checked annotations: ``int`` (an integer, not a bool), ``float`` (any real number, not a bool),
    ``bool``, ``str``, ``Path`` (a str or path-like), ``Literal[...]`` (one of the listed values,
    which the message lists), and ``X | None`` / unions of these. Other annotations are skipped.

    Raises:
        TypeError: a value of the wrong type, e.g. ``GRPOConfig.samples_per_prompt: expected an
            int, got '8'``.
        ValueError: a value outside a ``Literal``: ``GRPOConfig.aggregation: expected one of
            'token_mean', ..., got 'mean'``.
    """
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        hint = hints.get(f.name)
        value = getattr(cfg, f.name)
        if hint is None or _matches(value, hint) is not False:
            continue
        literal = typing.get_origin(hint) is Literal or (
            typing.get_origin(hint) in (Union, types.UnionType)
            and any(typing.get_origin(a) is Literal for a in typing.get_args(hint)))
        same_kind = literal and (isinstance(value, str) or value is None)
        _fail(cfg, f.name, _describe(hint), ValueError if same_kind else TypeError)


def check_finite(cfg: Any) -> None:
    """Every real-valued field of ``cfg`` is finite (no NaN, no ±inf; None and non-numbers are skipped).

    Raises:
        ValueError: ``RestEMConfig.reward_threshold: expected a finite number, got nan``.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _is_real(value) and not math.isfinite(value):
            _fail(cfg, f.name, "a finite number")


# ----------------------------------------------------------------------------------------- ranges

def check_positive(cfg: Any, names: Iterable[str]) -> None:
    """Each named field is > 0 (learning rates, batch sizes, clip ranges, K, ...).

    Raises:
        ValueError: ``VinePPOConfig.mc_rollouts: expected a value > 0, got 0``.
    """
    for name in names:
        value = _get(cfg, name)
        if not (_is_real(value) and value > 0):
            _fail(cfg, name, "a value > 0")


def check_non_negative(cfg: Any, names: Iterable[str]) -> None:
    """Each named field is >= 0, or None (for optional fields).

    Raises:
        ValueError: ``PPOConfig.kl_coef: expected a value >= 0, got -1.0``.
    """
    for name in names:
        value = _get(cfg, name)
        if value is not None and not (_is_real(value) and value >= 0):
            _fail(cfg, name, "a value >= 0" + (" or None" if _optional(cfg, name) else ""))


def check_at_least(cfg: Any, name: str, minimum: float, why: str = "") -> None:
    """The field is >= ``minimum`` (or None when the field is optional); ``why`` explains the bound.

    Raises:
        ValueError: ``GRPOConfig.samples_per_prompt: expected a value >= 2 (...), got 1``.
    """
    value = _get(cfg, name)
    optional = _optional(cfg, name)
    if value is None and optional:
        return
    if not (_is_real(value) and value >= minimum):
        _fail(cfg, name, f"a value >= {minimum}" + (" or None" if optional else "") + (f" ({why})" if why else ""))


def check_interval(cfg: Any, name: str, low: float, high: float, low_open: bool = False,
                   high_open: bool = False) -> None:
    """The field lies in the interval from ``low`` to ``high`` (each end closed unless ``*_open``).

    Raises:
        ValueError: ``PPOConfig.gamma: expected a value in [0, 1], got 1.5``.
    """
    value = _get(cfg, name)
    ok = _is_real(value) and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        _fail(cfg, name, f"a value in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def check_top_p(cfg: Any, names: Iterable[str] = ("top_p",)) -> None:
    """Nucleus masses are in (0, 1]."""
    for name in names:
        check_interval(cfg, name, 0, 1, low_open=True)


def check_fraction(cfg: Any, name: str, high_open: bool = True) -> None:
    """A fraction in [0, 1) (the default, e.g. ``warmup_ratio``) or [0, 1] (``high_open=False``)."""
    check_interval(cfg, name, 0, 1, high_open=high_open)


def check_at_most(cfg: Any, name: str, other: str) -> None:
    """Field ``name`` is <= field ``other`` (e.g. ``micro_batch_size`` <= ``minibatch_size``).

    Raises:
        ValueError: ``GRPOConfig.micro_batch_size: expected a value <= minibatch_size (32), got 64``.
    """
    if _get(cfg, name) > _get(cfg, other):
        _fail(cfg, name, f"a value <= {other} ({_get(cfg, other)!r})")


def _optional(cfg: Any, name: str) -> bool:
    hint = _hints(type(cfg)).get(name)
    return typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint)


# ------------------------------------------------------------------------------------------ runs

def check_run_config(run: Any) -> None:
    """Validate the shared run settings (`algos.training.config.RunConfig`) before anything is loaded.

    Complements ``RunConfig.__post_init__`` (iterations, eval_every, ... counts) with types,
    finiteness and the evaluation and sampler settings that are otherwise only checked (or not at
    all, e.g. ``eval_top_p`` under greedy evaluation) once the run has started writing.

    Raises:
        TypeError / ValueError: as the checks above, e.g. ``RunConfig.eval_top_p: expected a value
            in (0, 1], got 1.5``.
    """
    check_types(run)
    check_finite(run)
    check_non_negative(run, ("iterations", "eval_every", "eval_problems", "save_every", "eval_temperature"))
    check_positive(run, ("eval_samples", "sampler_batch_size"))
    check_top_p(run, ("eval_top_p",))
    check_at_least(run, "threads", 1)
    if run.rebuild_warm_start and run.model != "tiny":
        raise ValueError(f"RunConfig.rebuild_warm_start: only the offline --model tiny has a warm start to rebuild, "
                         f"got --model {run.model!r}")

