"""Packaging: `kernels/` installs only as `sdpo_fast.kernels`; README Quick start and CI agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


def test_kernels_depend_on_nothing_in_sdpo_fast():
    """The arrows point one way: sdpo_fast imports the kernels, never the reverse, so the kernels stay usable
    and testable on their own."""
    import ast

    offenders = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                escapes = node.level > 1  # `from ..x` leaves the kernels package
            elif isinstance(node, ast.Import):
                names, escapes = [a.name for a in node.names], False
            else:
                continue
            if escapes or any(n == "sdpo_fast" or n.startswith("sdpo_fast.") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"kernels/ imports from sdpo_fast at {offenders}"


def test_every_subpackage_is_listed_for_setuptools():
    """`[tool.setuptools] packages` is an explicit list, so a subpackage missing from it is missing from the wheel
    (an editable install still finds it, which is how `sdpo_fast.teacher` once went unnoticed)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sdpo_fast").rglob("__init__.py")} | {
        "sdpo_fast.kernels"
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
