"""Sweep building blocks for a config's ``get_hyper(h)``, in the style of big_vision's configs.

A config file may define, beside ``get_config``::

    def get_hyper(h):
        return h.product([
            h.sweep("config.rpo.learning_rate", [2.5e-4, 5e-4, 1e-3]),
            h.zipit([h.sweep("config.rpo.kl_type", ["k1", "gaussian"]),
                     h.sweep("config.rpo.lose_penalty", [0.1, 1.0])]),
            h.fixed("config.rpo.iterations", 100),
            h.sweep("config.seed", [0, 1]),
        ])

``h`` is this module. Every function returns a *sweep*: a list of points, each point a dict
``{config key: value}``. Keys are dotted config paths with or without big_vision's leading
``config.`` (it is dropped). ``python -m arr_jax.sweep`` turns the points into runs.

The semantics follow big_vision's configs (``big_vision/configs/proj/...``, whose ``hyper``
module is not public): ``sweep`` is one key over values, ``product`` the cartesian product
(the last factor varies fastest), ``zipit`` walks equal-length sweeps in lockstep, ``fixed``
repeats one value, ``chainit`` concatenates. ``discrete`` and ``categorical`` return their
values unchanged, so big_vision-style ``h.sweep(k, h.discrete([...]))`` reads the same. Random
search (``uniform``, ``loguniform``) is not offered.

Errors (``ValueError``) name the offending keys: an empty sweep, a key that is not a dotted
name, a key set twice within one point, sweeps of unequal length in ``zipit``.
"""
from __future__ import annotations

import itertools
import re
from typing import Any, Iterable, Sequence

Point = dict[str, Any]
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def normalize_key(key: str) -> str:
    """``"config.rpo.kl_beta"`` -> ``"rpo.kl_beta"``; raises ValueError for a non-dotted-name key."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"sweep key {key!r} is not a dotted config path such as 'config.rpo.kl_beta'")
    k = key[len("config."):] if key.startswith("config.") else key
    if k == "config":
        raise ValueError("sweep key 'config' names the whole config; sweep its fields")
    return k


def sweep(key: str, values: Iterable[Any]) -> list[Point]:
    """One point per value: ``[{key: v} for v in values]``; an empty ``values`` is an error."""
    k = normalize_key(key)
    if isinstance(values, (str, bytes)):
        raise ValueError(f"sweep {key}: values must be a list, got the string {values!r}")
    vals = list(values)
    if not vals:
        raise ValueError(f"sweep {key}: no values")
    return [{k: v} for v in vals]


def fixed(key: str, value: Any, length: int = 1) -> list[Point]:
    """``length`` copies of ``{key: value}`` (a constant factor of a product, or a zipit column)."""
    if length < 1:
        raise ValueError(f"fixed {key}: length {length} < 1")
    return [{normalize_key(key): value} for _ in range(length)]


def _merge(parts: Sequence[Point]) -> Point:
    out: Point = {}
    for p in parts:
        for k, v in p.items():
            if k in out:
                raise ValueError(f"sweep key {k} is set twice in one point ({out[k]!r} and {v!r})")
            out[k] = v
    return out


def _keys(s: list[Point]) -> str:
    return ",".join(sorted({k for p in s for k in p})) or "(no keys)"


def product(sweeps: Sequence[list[Point]]) -> list[Point]:
    """Cartesian product of ``sweeps`` (last varies fastest); ``product([])`` is one empty point."""
    return [_merge(parts) for parts in itertools.product(*sweeps)]


def zipit(sweeps: Sequence[list[Point]]) -> list[Point]:
    """Point ``i`` merges point ``i`` of every sweep; all sweeps must have the same length."""
    sweeps = list(sweeps)
    lengths = [len(s) for s in sweeps]
    if len(set(lengths)) > 1:
        desc = "; ".join(f"{_keys(s)}: {len(s)}" for s in sweeps)
        raise ValueError(f"zipit of sweeps of different lengths ({desc}); put constants in a product or "
                         f"use fixed(key, value, length=n)")
    return [_merge(parts) for parts in zip(*sweeps)]


def chainit(sweeps: Sequence[list[Point]]) -> list[Point]:
    """The points of each sweep, one sweep after the other."""
    return [dict(p) for s in sweeps for p in s]


def discrete(values: Iterable[Any]) -> list[Any]:
    """``values`` as a list (big_vision spells swept lists ``h.discrete([...])``)."""
    return list(values)


categorical = discrete
