"""The teacher's checkpoint file: atomic, verified, and checked against the resuming run.

- `save_teacher` / `load_teacher`: `sdpo_teacher.pt` is written inside the checkpoint folder before HF writes
  `trainer_state.json` and rotates older checkpoints away, under a temporary name that is `os.replace`d into
  place, with a manifest (`sdpo_teacher.json`: kind, size, SHA-256). On resume a missing, truncated or altered
  file is an error that names the file and the choices. A full disk is reported as such, naming the file, and the
  previous checkpoint is left intact.
- `check_checkpoint_matches`: a LoRA checkpoint resumed without `peft_config` (or the reverse) is reported before
  HF tries to load it and fails with an error that does not say what differs.
- `restore_teacher`: what `resume_teacher_from` asks for on resume; v0.1.0 checkpoints are upgraded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

TEACHER_FILE = "sdpo_teacher.pt"
MANIFEST_FILE = "sdpo_teacher.json"
_FORMAT = 1
# v0.1.0 checkpoints: the kinds were named after the old layout, and the LoRA teacher was a second adapter.
_LEGACY_KINDS = {"ema-copy": "full-copy", "trust-region-copy": "trust-region/full-copy"}
LEGACY_TEACHER_ADAPTER = "sdpo_teacher"  # v0.1.0's LoRA teacher adapter


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


class TeacherSaveError(OSError):
    """The teacher could not be written (e.g. a full disk); the message names the file and what is intact."""


def _disk_full(err: BaseException) -> bool:
    # torch.save reports a short write from its zip writer as a RuntimeError ("... unexpected pos ..."), not ENOSPC
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(err, RuntimeError) and "unexpected pos" in str(err)
    )


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` then fsync and `os.replace`: a kill leaves either the old file or the new one, never half."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if not _disk_full(err):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        raise TeacherSaveError(
            errno.ENOSPC,
            f"The disk is full: the SDPO teacher could not be written to {path} ({type(err).__name__}: {err}). "
            f"Nothing was replaced: the checkpoint being written ({folder}) is incomplete, and every earlier "
            "checkpoint is intact (HF rotates old checkpoints only after this save succeeds). Free disk space, or "
            "lower save_total_limit, and resume from the last complete checkpoint.",
        ) from err
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


def restore_teacher(
    teacher, checkpoint: str, source: str, *, copy_student: Callable[[], None], unwrapped_model
) -> None:
    """On resume: the teacher as `resume_teacher_from` (`source`) says, after HF restored the student."""
    if source == "student":
        logger.warning(
            "SDPO: resume_teacher_from='student': the teacher restarts as a copy of the student restored from %s; "
            "its EMA history is not used.",
            checkpoint,
        )
        copy_student()
        return
    if source == "initial":
        logger.warning(
            "SDPO: resume_teacher_from='initial': the teacher restarts from the model as passed to SDPOTrainer "
            "(before any training), not from %s.",
            checkpoint,
        )
        return
    saved = upgrade_legacy(load_teacher(checkpoint), teacher.kind)
    if saved["kind"] != teacher.kind:
        raise ValueError(
            f"The checkpoint's teacher is of kind {saved['kind']!r} but this run's is {teacher.kind!r}; "
            "resume with the same PEFT/teacher_regularization settings."
        )
    with torch.no_grad():
        teacher.load_state_dict(saved["state"])
    peft_config = getattr(unwrapped_model, "peft_config", None)
    if isinstance(peft_config, dict) and LEGACY_TEACHER_ADAPTER in peft_config:
        # v0.1.0 saved its teacher as a second adapter, which HF has just loaded back from the checkpoint: the
        # snapshot now holds it, and a second adapter is exactly what must not be in the model.
        unwrapped_model.delete_adapter(LEGACY_TEACHER_ADAPTER)
