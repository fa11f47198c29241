"""sdpo-fast: Self-Distillation Policy Optimization for Hugging Face TRL, with a fused top-K head.

    from sdpo_fast import SDPOConfig, SDPOTrainer

The heavy pieces (the trainer, which imports TRL, and the Triton kernels) are imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import SDPOConfig
from .head import SDPOHeadOutput, sdpo_head
from .loss import compute_self_distillation_loss

__version__ = "0.1.0"

__all__ = [
    "SDPOConfig",
    "SDPOHeadOutput",
    "SDPOTrainer",
    "__version__",
    "compute_self_distillation_loss",
    "preflight",
    "sdpo_head",
    "test_time_self_distill",
]

if TYPE_CHECKING:  # pragma: no cover
    from . import preflight
    from .test_time import test_time_self_distill
    from .trainer import SDPOTrainer


def __getattr__(name: str):
    if name == "SDPOTrainer":
        from .trainer import SDPOTrainer

        return SDPOTrainer
    if name == "preflight":  # the subpackage, itself callable as the function (see sdpo_fast/preflight)
        import importlib

        return importlib.import_module(".preflight", __name__)
    if name == "test_time_self_distill":
        from .test_time import test_time_self_distill

        return test_time_self_distill
    raise AttributeError(f"module 'sdpo_fast' has no attribute {name!r}")
