"""Objective names → classes. Torch-free, so that `SDPOConfig` can validate `objective=` without importing torch.

A new variant is one class plus one name: decorate it with `@register_objective("name")` (its module must be
imported before the config is built), then select it with `SDPOConfig(objective="name")`. The built-in
variants are listed here by import path and imported only when chosen.
"""

from __future__ import annotations

import importlib

_BUILTIN = {
    "sdpo": "sdpo_fast.objective.base:SDPOObjective",
    "sdpo_reference_norm": "sdpo_fast.objective.variants:ReferenceNormaliserObjective",
    "srpo": "sdpo_fast.objective.variants:SRPOObjective",
    "rlsd": "sdpo_fast.objective.rlsd:RLSDObjective",
    "sc_sdpo": "sdpo_fast.objective.variants:SCSDPOObjective",
    "group_fallback": "sdpo_fast.objective.variants:GroupFallbackObjective",
    "forward_kl_clip": "sdpo_fast.objective.variants:ForwardKLClipObjective",
}
_REGISTERED: dict[str, type] = {}


def register_objective(name: str):
    """Class decorator: make `SDPOConfig(objective=name)` build this `SDPOObjective` subclass."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"An objective name must be a non-empty string, got {name!r}.")

    def add(cls: type) -> type:
        if name in _BUILTIN or (name in _REGISTERED and _REGISTERED[name] is not cls):
            raise ValueError(f"An objective named {name!r} is already registered; choose another name.")
        _REGISTERED[name] = cls
        cls.name = name
        return cls

    return add


def objective_names() -> tuple[str, ...]:
    return (*_BUILTIN, *_REGISTERED)


def objective_class(name: str) -> type:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ValueError(f"Unknown objective={name!r}. Choose one of: {', '.join(map(repr, objective_names()))}.")
    module, attr = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)
