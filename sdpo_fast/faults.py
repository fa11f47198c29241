"""What a fault must not destroy: non-finite steps are skipped, teacher checkpoints are atomic and verified.

- `NonFiniteStepGuard`: a step whose gradients are not all finite never reaches the weights. HF's
  Trainer would apply it, turning the student into NaN (the next generation then dies with
  "probability tensor contains inf/nan", which does not name the cause) and, at the end of an EMA
  window, blending the NaN student into the teacher. The guard drops the step's gradients (an
  optimizer skips parameters without a gradient, momentum and step counts included), counts it,
  and warns once with the parameters concerned.
- `save_teacher` / `load_teacher`: `sdpo_teacher.pt` is written inside the checkpoint folder before
  HF writes `trainer_state.json` and rotates older checkpoints away, under a temporary name that is
  `os.replace`d into place, with a manifest (`sdpo_teacher.json`: kind, size, SHA-256). On resume a
  missing, truncated or altered file is an error that names the file and the choices.
- `check_checkpoint_matches`: a LoRA checkpoint resumed without `peft_config` (or the reverse) is
  reported before HF tries to load it and fails with an error that does not say what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

TEACHER_FILE = "sdpo_teacher.pt"
MANIFEST_FILE = "sdpo_teacher.json"
_FORMAT = 1
# v0.1.0 checkpoints: the kinds were named after the old layout, and the LoRA teacher was a second adapter.
_LEGACY_KINDS = {"ema-copy": "full-copy", "trust-region-copy": "trust-region/full-copy"}


# ---------------------------------------------------------------------------------------------- non-finite steps


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """Per tensor, whether all its entries are finite: one fused norm pass (any NaN or inf makes the norm so)."""
    if not tensors:
        return []
    norms = torch._foreach_norm(tensors)
    return torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).tolist()


class NonFiniteStepGuard(TrainerCallback):
    """Drops the update of any optimizer step whose gradients are not all finite.

    Args:
        named_gradients: returns `(name, grad)` for the student's trainable parameters that have one.
        drop_gradients: sets those gradients to None, so that `optimizer.step()` leaves the weights alone.
        all_reduce_flag: combines the per-process verdict (sharded gradients differ by rank).
        loss_scaling: fp16 loss scaling is on; its overflow steps are expected and the scaler skips them too.
    """

    def __init__(
        self,
        named_gradients: Callable[[], list[tuple[str, torch.Tensor]]],
        drop_gradients: Callable[[], None],
        all_reduce_flag: Callable[[bool], bool] | None = None,
        loss_scaling: bool = False,
        optimizer_skipped: Callable[[], bool] | None = None,
    ):
        self.named_gradients = named_gradients
        self.drop_gradients = drop_gradients
        self.all_reduce_flag = all_reduce_flag or (lambda flag: flag)
        self.loss_scaling = loss_scaling
        # DeepSpeed keeps gradients in its own buffers (p.grad is None) and steps inside `backward`, before this
        # callback: there its own overflow check is the verdict, which this reads.
        self.optimizer_skipped = optimizer_skipped
        self.skipped_at: list[int] = []
        self._verdict: tuple[int, bool, list[str]] | None = None
        self._warned = False

    def _check(self, step: int) -> tuple[bool, list[str]]:
        if self._verdict is None or self._verdict[0] != step:
            # local shards (FSDP2 DTensors): no collective per tensor; the verdict is combined across ranks below
            named = [(n, getattr(g, "_local_tensor", g)) for n, g in self.named_gradients() if g is not None]
            finite = finite_flags([g for _, g in named])
            bad = [name for (name, _), ok in zip(named, finite) if not ok]
            if not named and self.optimizer_skipped is not None and self.optimizer_skipped():
                bad = ["(the optimizer's own overflow check: it skipped the step)"]
            self._verdict = (step, self.all_reduce_flag(not bad), bad)
        return self._verdict[1], self._verdict[2]

    def step_is_finite(self, state) -> bool:
        """Whether the coming optimizer step's gradients are all finite (computed once per step)."""
        return self._check(state.global_step)[0]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        finite, bad = self._check(state.global_step)
        if finite:
            return
        self.drop_gradients()
        self.skipped_at.append(state.global_step + 1)
        if not self._warned:
            self._warned = True
            where = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") or "another process"
            cause = (
                "fp16 loss scaling overflowed (the scaler lowers its scale and skips the step too)"
                if self.loss_scaling
                else "a too-high learning rate, a non-finite reward or advantage, or an fp16/bf16 overflow"
            )
            warnings.warn(
                f"SDPO skipped optimizer step {state.global_step + 1}: non-finite gradients in {where}. Likely cause: "
                f"{cause}. The step's update is dropped, the weights and the teacher stay as they were, and "
                "training continues; `sdpo/nonfinite_steps_skipped` counts such steps (warned once).",
                stacklevel=2,
            )


# ---------------------------------------------------------------------------------------------- teacher files


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` then fsync and `os.replace`: a kill leaves either the old file or the new one, never half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(path) or ".")


def save_teacher(directory: str, kind: str, state: dict[str, torch.Tensor], *, peft: bool) -> None:
    """Write the teacher and its manifest into `directory`, each atomically; the manifest last."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TEACHER_FILE)
    _atomic_write(path, lambda tmp: torch.save({"kind": kind, "state": state}, tmp))
    manifest = {"format": _FORMAT, "kind": kind, "peft": peft, "bytes": os.path.getsize(path), "sha256": _sha256(path)}

    def write_manifest(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f)

    _atomic_write(os.path.join(directory, MANIFEST_FILE), write_manifest)


class TeacherCheckpointError(RuntimeError):
    """The checkpoint's teacher cannot be restored; the message names the file and the choices."""


def _choices(checkpoint: str) -> str:
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return (
        f"Resume from an earlier checkpoint in {parent}, or restart the teacher explicitly with "
        "SDPOConfig(resume_teacher_from='student') (a copy of the restored student weights) or "
        "resume_teacher_from='initial' (the model as passed to SDPOTrainer, i.e. before any training)."
    )


def load_teacher(checkpoint: str) -> dict:
    """The saved `{"kind", "state"}`, verified against its manifest; a clear error for anything else."""
    path = os.path.join(checkpoint, TEACHER_FILE)
    if not os.path.exists(path):
        raise TeacherCheckpointError(
            f"The checkpoint {checkpoint} has no SDPO teacher file {TEACHER_FILE}. {_choices(checkpoint)}"
        )
    manifest = read_manifest(checkpoint)
    if manifest is not None:
        size, digest = os.path.getsize(path), _sha256(path)
        if size != manifest.get("bytes") or digest != manifest.get("sha256"):
            raise TeacherCheckpointError(
                f"The SDPO teacher file {path} is damaged: {size} bytes with SHA-256 {digest[:12]}…, but "
                f"{MANIFEST_FILE} recorded {manifest.get('bytes')} bytes with {str(manifest.get('sha256'))[:12]}…. "
                f"{_choices(checkpoint)}"
            )
    else:
        logger.warning(
            "SDPO: %s has no %s (written before sdpo-fast 0.2); loading %s unverified.", checkpoint, MANIFEST_FILE, path
        )
    try:
        # mmap: every rank reads the file, and none needs a second copy of the teacher in host memory for it
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, empty file, unpickling garbage
        raise TeacherCheckpointError(
            f"The SDPO teacher file {path} cannot be read ({type(err).__name__}: {err}). {_choices(checkpoint)}"
        ) from err
    if not isinstance(saved, dict) or "kind" not in saved or "state" not in saved:
        raise TeacherCheckpointError(
            f"The SDPO teacher file {path} is not a teacher checkpoint. {_choices(checkpoint)}"
        )
    return saved


def upgrade_legacy(saved: dict, kind: str) -> dict:
    """A v0.1.0 teacher checkpoint in today's terms (kind names; adapter tensors named after the one adapter)."""
    old = saved["kind"]
    if old in _LEGACY_KINDS:
        return {**saved, "kind": _LEGACY_KINDS[old]}
    if old == "adapter" and kind.endswith("lora-snapshot"):
        state = {name.replace(".sdpo_teacher.", ".default."): t for name, t in saved["state"].items()}
        return {"kind": kind, "state": state}
    return saved


def read_manifest(checkpoint: str) -> dict | None:
    path = os.path.join(checkpoint, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise TeacherCheckpointError(
            f"The SDPO teacher manifest {path} cannot be read ({err}). {_choices(checkpoint)}"
        ) from err
    if not isinstance(manifest, dict):
        raise TeacherCheckpointError(f"The SDPO teacher manifest {path} is not a JSON object. {_choices(checkpoint)}")
    return manifest


def checkpoint_is_peft(checkpoint: str) -> bool:
    """A checkpoint HF saved from a PEFT model holds an adapter (PEFT saves one not named "default" a level down)."""
    if os.path.exists(os.path.join(checkpoint, "adapter_config.json")):
        return True
    return any(os.path.exists(os.path.join(checkpoint, d, "adapter_config.json")) for d in os.listdir(checkpoint))


def check_checkpoint_matches(checkpoint: str, *, peft: bool, kind: str) -> None:
    """Fail before HF loads anything when the checkpoint was saved by a differently configured run."""
    manifest = read_manifest(checkpoint)
    saved_peft = (
        bool(manifest["peft"]) if manifest is not None and "peft" in manifest else checkpoint_is_peft(checkpoint)
    )
    if saved_peft != peft:
        saved, this = (
            ("a LoRA/PEFT adapter", "the full model") if saved_peft else ("the full model", "a LoRA/PEFT adapter")
        )
        fix = "Pass the same peft_config" if saved_peft else "Drop peft_config"
        raise ValueError(
            f"The checkpoint {checkpoint} holds {saved} but this run trains {this}. {fix} as the run that saved it, "
            "or start a new run without resume_from_checkpoint."
        )
    if manifest is not None and manifest.get("kind") != kind:
        raise ValueError(
            f"The checkpoint {checkpoint} holds an SDPO teacher of kind {manifest.get('kind')!r} but this run's is "
            f"{kind!r}. Resume with the same PEFT and teacher_regularization settings as the run that saved it."
        )
