"""The experiment's arms: each a small config of the trainer, read by `run.py`.

`sdpo`: SDPOConfig fields (None: the arm trains plain GRPO, `SDPOConfig(enabled=False)`); `grpo`: GRPOConfig
overrides; `feedback`: whether the reward returns its feedback; `anchor`: GRPO's KL penalty to a slowly
moving reference (TRL's `beta` with its `sync_ref_model` rule, applied to PEFT's `ref` adapter because TRL
refuses `sync_ref_model` with PEFT). Every arm samples at temperature 1.0, as the SDPO reference does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# SDPO on success only: the tasks' partial credit is a reward, not a success, so a demonstration must score 1.
SUCCESS = {"success_reward_threshold": 1.0}


@dataclass(frozen=True)
class Arm:
    name: str
    sdpo: dict[str, Any] | None = None
    grpo: dict[str, Any] = field(default_factory=dict)
    feedback: bool = True
    anchor: bool = False
    note: str = ""


ARMS = {
    a.name: a
    for a in (
        Arm("grpo", None, {"beta": 0.0}, feedback=False, note="TRL's GRPO loss, beta = 0 (the paper's baseline)"),
        Arm("grpo_anchored", None, {"beta": 0.04}, feedback=False, anchor=True,
            note="GRPO with a KL penalty to a reference that follows the policy at EMA rate 0.05 every step"),
        Arm("sdpo", {**SUCCESS}, note="SDPO, the reference's defaults (demonstrations + feedback), temperature 1.0"),
        Arm("sdpo_demos", {**SUCCESS}, feedback=False, note="SDPO with demonstrations only (the reward's feedback off)"),
        Arm("hybrid", {**SUCCESS, "grpo_weight": 0.5}, note="(1 - 0.5)·SDPO + 0.5·GRPO"),
        Arm("srpo", {**SUCCESS, "objective": "srpo"}, note="SRPO routing (arXiv 2604.02288)"),
        Arm("rlsd", {**SUCCESS, "objective": "rlsd"}, note="RLSD advantages (arXiv 2604.03128)"),
        Arm("sc_sdpo", {**SUCCESS, "objective": "sc_sdpo"}, note="SC-SDPO question weights (arXiv 2605.27765)"),
        Arm("group_fallback", {**SUCCESS, "objective": "group_fallback"},
            note="SDPO, with GRPO's term for groups without a success"),
    )
}  # fmt: skip


def sdpo_config(arm: Arm):
    """The arm's SDPOConfig, or a clear error when this checkout's SDPOConfig lacks a field the arm needs."""
    from sdpo_fast import SDPOConfig

    if arm.sdpo is None:
        return SDPOConfig(enabled=False)
    try:
        return SDPOConfig(**arm.sdpo)
    except TypeError as err:
        raise SystemExit(
            f"Arm {arm.name!r} needs SDPOConfig({', '.join(f'{k}={v!r}' for k, v in arm.sdpo.items())}), which this "
            f"checkout's SDPOConfig does not accept ({err}). The stability variants arrive with SDPOConfig.objective."
        ) from None
