"""SDPO's algorithm, apart from TRL: the objective (`base.SDPOObjective`) and its variants, by name.

    build_objective(config, teacher, head=..., grpo=..., runtime=...)  →  the class `config.objective` names

A variant is one class registered under one name (`register_objective`); see `base.py` for the hooks.
"""

from __future__ import annotations

from .registry import objective_class, objective_names, register_objective

__all__ = ["build_objective", "objective_class", "objective_names", "register_objective"]


def build_objective(config, teacher, **settings):
    """The objective `config.objective` names, built with `HeadSettings`, `GRPOSettings` and a `Runtime`."""
    return objective_class(config.objective)(config, teacher, **settings)
