"""Packaging: `kernels/` installs only as `sdpo_fast.kernels`; README Quick start and CI agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_is_not_a_top_level_module(tmp_path):
    code = (
        "import importlib.util, sdpo_fast.kernels, pathlib;"
        "spec = importlib.util.find_spec('kernels');"
        "ours = spec is not None and pathlib.Path(spec.origin or '').parent.name == 'kernels' "
        "and (pathlib.Path(spec.origin).parent / 'function.py').exists();"
        "assert not ours, spec;"
        "print(pathlib.Path(sdpo_fast.kernels.__file__).parent)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == (ROOT / "kernels").resolve()


def _from_root(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_checkout_imports_with_hugging_faces_kernels():
    """From the repository root (on sys.path as '' for -c and -m), the root's kernels/ must not shadow HF `kernels`,
    which transformers >= 5.25 requires: the trainer imports, the CLI runs, and `import kernels` is HF's or absent."""
    from importlib.metadata import PackageNotFoundError, version

    out = _from_root("-c", "from sdpo_fast import SDPOTrainer, SDPOConfig; from trl import GRPOTrainer; print('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    out = _from_root("-m", "sdpo_fast.pretrained", "--help")
    assert out.returncode == 0 and "usage" in out.stdout, out.stderr[-2000:]
    probe = (
        "import pathlib, sys\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError:\n    print('absent'); sys.exit()\n"
        "print(pathlib.Path(kernels.__file__).resolve())\n"
    )
    out = _from_root("-c", probe)
    assert out.returncode == 0, out.stderr[-2000:]
    try:
        version("kernels")
    except PackageNotFoundError:
        assert out.stdout.strip() == "absent"
    else:
        where = Path(out.stdout.strip())
        assert ROOT not in where.parents, f"`import kernels` from the root found the checkout's folder: {where}"
    # and the project's own kernels stay reachable under their installed name from the root too
    out = _from_root("-c", "import sdpo_fast.kernels.function as f; print(f.__file__)")
    assert out.returncode == 0 and Path(out.stdout.strip()).resolve() == (ROOT / "kernels" / "function.py").resolve()


def test_newest_transformers_is_tested_with_hf_kernels():
    """transformers 5.25 made HF `kernels` a requirement; where it is installed, so must `kernels` be."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("transformers").split(".")[:2])
    if (major, minor) >= (5, 25):
        assert version("kernels")


def test_readme_quick_start_has_exactly_two_pip_install_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quick start.*?```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert block, "README.md needs a fenced Quick start block"
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("pip install") for line in lines)
    assert lines[1] == 'pip install -e ".[dev]" && pytest'
    script = re.search(r"python (\S+\.py)", lines[0])
    assert script and (ROOT / script.group(1)).exists()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci and "pytest" in ci and "torch==2.13.0" in ci


def test_license_is_the_full_apache_text():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_the_layering_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts: the teacher never imports the trainer, the objective and the
    teacher batch are testable without TRL, the sandbox imports nothing of training, the config imports no torch."""
    import shutil

    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is part of the dev extra: pip install -e '.[dev]'"
    out = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "0 broken" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
