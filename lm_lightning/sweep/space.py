"""The search space: dotted config keys and their distributions, checked before any trial runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from lm_lightning.sweep.settings import SweepError

RANGE_FIELDS = {"low", "high", "log", "step"}
SPEC_HELP = 'give {"low": ..., "high": ...[, "log": true, "step": ...]} or {"choices": [...]}'


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def distribution(key: str, spec: Any) -> BaseDistribution:
    """The Optuna distribution of one ``sweep.space`` entry; a malformed one is a ``SweepError``."""
    where = f"sweep.space {key}"
    if not isinstance(spec, dict) or not spec:
        raise SweepError(f"{where}: {SPEC_HELP}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"} or not isinstance(choices, list):
            raise SweepError(f"{where}: {SPEC_HELP}")
        if not choices:
            raise SweepError(f"{where}: choices is empty")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise SweepError(f"{where}: choices must be numbers, strings, booleans or null")
        return CategoricalDistribution(choices)
    if not set(spec) <= RANGE_FIELDS or not {"low", "high"} <= set(spec):
        raise SweepError(f"{where}: {SPEC_HELP}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not (_is_number(low) and _is_number(high)) or not all(map(math.isfinite, (low, high))):
        raise SweepError(f"{where}: low and high must be numbers, got {low!r} and {high!r}")
    if low > high:
        raise SweepError(f"{where}: low {low} > high {high}")
    if log and low <= 0:
        raise SweepError(f"{where}: a log range needs low > 0, got {low}")
    if not isinstance(log, bool) or (step is not None and (not _is_number(step) or step <= 0)):
        raise SweepError(f"{where}: log must be true or false, step a positive number")
    if _is_int(low) and _is_int(high) and (step is None or _is_int(step)):
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(low, high, log=log, step=step)


def build_space(space: dict[str, Any]) -> dict[str, BaseDistribution]:
    """Every ``sweep.space`` entry as an Optuna distribution (before anything else runs)."""
    if not space:
        raise SweepError('sweep.space is empty: give e.g. {"model.learning_rate": {"low": 1e-4, "high": 1e-2, "log": true}}')
    return {key: distribution(key, spec) for key, spec in space.items()}


def lookup(config: dict, key: str) -> Any:
    """The value of a dotted ``key`` in a nested config; ``KeyError`` if it has none."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def check_keys(
    space: dict[str, BaseDistribution], base: dict, resolve: Callable[[dict[str, Any]], dict]
) -> None:
    """Each key must be in the resolved fit config ``base``; a range only on a number (of the right kind).

    ``resolve(overrides)`` resolves the config with values set: a key unset in ``base`` (``null``) can still be
    a number (``model.min_lr_ratio``), which only the fit parser's types tell.
    """
    unset = {}
    for key, dist in space.items():
        try:
            value = lookup(base, key)
        except KeyError:
            raise SweepError(f"sweep.space: {key} is not a config key (lm-lightning fit --help lists them)") from None
        if isinstance(dist, CategoricalDistribution):
            continue
        if value is None:
            unset[key] = dist.low
        elif not _is_number(value):
            raise SweepError(f"sweep.space: {key} is {value!r}, not a number: give it choices instead of a range")
        elif _is_int(value) and isinstance(dist, FloatDistribution):
            raise SweepError(f"sweep.space: {key} is an integer: give it integer bounds")
    if unset:
        resolved = resolve(unset)
        for key in unset:
            if not _is_number(lookup(resolved, key)):
                raise SweepError(f"sweep.space: {key} is not a number: give it choices instead of a range")
