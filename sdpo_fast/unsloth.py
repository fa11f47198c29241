"""Unsloth compatibility: build `SDPOTrainer` on whatever `trl.GRPOTrainer` is at construction time.

Unsloth rewrites TRL's `GRPOTrainer` into a patched *copy* (`UnslothGRPOTrainer`, not a subclass
of TRL's class) and rebinds `trl.GRPOTrainer` to it, but only if `unsloth` is imported before the
trainer. A class defined earlier keeps the pristine base and silently loses Unsloth's generation,
vLLM-LoRA and precision patches. So instead of trusting import order, `SDPOTrainer(...)` looks up
the current class and, when it changed, rebuilds itself on top of it.
"""

from __future__ import annotations

import sys
import warnings

_REBASED: dict[tuple[type, type], type] = {}

IMPORT_ORDER_FIX = (
    "Import Unsloth before TRL and sdpo_fast, i.e. put `import unsloth` (or `from unsloth import "
    "FastLanguageModel`) at the very top of your script."
)


def current_grpo_trainer() -> type:
    """The `GRPOTrainer` class TRL exposes right now (Unsloth's patched copy after it has run)."""
    module = sys.modules.get("trl.trainer.grpo_trainer")
    if module is None:
        from trl.trainer import grpo_trainer as module
    return module.GRPOTrainer


def is_unsloth_patched(cls: type) -> bool:
    """Whether `cls` (or a base) is one of Unsloth's generated trainer classes."""
    return any(k.__name__.startswith(("Unsloth", "_Unsloth")) for k in cls.__mro__)


class RebuiltOnCurrentGRPOTrainer(type):
    """Builds each `SDPOTrainer` on the `GRPOTrainer` that is current at construction time (Unsloth-safe).

    The class's first base is the mixin that holds all SDPO behaviour; it is recombined with the current base.
    """

    def __call__(cls, *args, **kwargs):
        base = current_grpo_trainer()
        if not issubclass(cls, base):
            mixin = next(k for k in cls.__mro__ if k.__name__ == "_SDPOTrainerMixin")
            cls = rebased_trainer_class(cls, mixin, base)
        return type.__call__(cls, *args, **kwargs)

    def __instancecheck__(cls, obj) -> bool:
        return type.__instancecheck__(cls, obj) or getattr(type(obj), "_sdpo_rebased_from", None) is cls

    def __subclasscheck__(cls, sub) -> bool:
        return type.__subclasscheck__(cls, sub) or getattr(sub, "_sdpo_rebased_from", None) is cls


def rebased_trainer_class(cls: type, mixin: type, base: type) -> type:
    """`cls` rebuilt as `class cls(mixin, base)`, cached; warns once, naming the fix.

    A user's own subclass of `SDPOTrainer` cannot be rebuilt safely (its methods' zero-argument
    `super()` is bound to the original class), so it keeps the pristine base and only gets the warning.
    """
    key = (cls, base)
    if key not in _REBASED:
        if cls.__bases__[0] is not mixin:
            warnings.warn(
                f"{cls.__name__} subclasses SDPOTrainer, but trl.GRPOTrainer was replaced by "
                f"{base.__qualname__} (Unsloth?) after it was defined, so it runs on TRL's unpatched trainer and "
                f"misses those patches. {IMPORT_ORDER_FIX}",
                stacklevel=3,
            )
            _REBASED[key] = cls
            return cls
        warnings.warn(
            f"trl.GRPOTrainer was replaced by {base.__module__}.{base.__qualname__} after sdpo_fast was imported; "
            f"{cls.__name__} has been rebuilt on the patched class so Unsloth's optimisations apply. "
            f"{IMPORT_ORDER_FIX} (to silence this warning)",
            stacklevel=3,
        )
        rebased = type(cls.__name__, (mixin, base), {"__module__": cls.__module__, "__doc__": cls.__doc__})
        rebased.__qualname__ = cls.__qualname__
        rebased._sdpo_rebased_from = cls
        _REBASED[key] = rebased
    return _REBASED[key]
