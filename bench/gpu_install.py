"""The GPU check's install step: carried wheels, the project made importable without building it, imports checked.

    python bench/gpu_install.py --site SITE --shim SHIM --work WORK [--report env.json] [WHEEL_DIR ...]

1. Every wheel of the WHEEL_DIRs is installed into SITE with `pip --no-index --no-deps --target`, one at a time:
   nothing is resolved against the machine's packages (which fails offline, and says nothing useful), and a wheel
   that does not install stops the step with its package's name.
2. SHIM gets a `sdpo_fast` folder of links to the checkout's package files, with `kernels -> <checkout>/kernels`
   inside it: `import sdpo_fast.kernels` works from PYTHONPATH=SHIM:SITE without a build backend (no setuptools
   version is involved) and the checkout's `kernels/` never becomes the top-level `kernels`.
3. A fresh process imports what the later steps need. Exit status 1 (the check stops) when a wheel did not install
   or the project's own head does not import; a competitor, the trainer or a test tool that does not import is
   reported with a loud WARNING naming it, and the steps that need it record their own failure.
Prints the versions found and where each module came from; writes them to --report as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The project's own head: if any of these does not import, nothing the check measures would mean anything.
REQUIRED = ["torch", "sdpo_fast", "sdpo_fast.head", "sdpo_fast.kernels.function"]
REQUIRED_CUDA = ["triton", "sdpo_fast.kernels.triton_head"]
# name shown in the warning -> module the later steps import
OPTIONAL = {
    "competitor trl-chunked (TRL)": "trl.kernels.chunked_divergence",
    "competitor liger-jsd (Liger-Kernel)": "liger_kernel.transformers.fused_linear_jsd",
    "SDPOTrainer (TRL, datasets, accelerate)": "sdpo_fast.trainer",
    "the GPU tests (pytest, hypothesis)": "hypothesis",
    "the sweep's progress bar (tqdm)": "tqdm",
}
VERSIONS = ("torch", "triton", "transformers", "accelerate", "trl", "datasets", "liger-kernel", "peft")
VERSIONS += ("unsloth", "unsloth_zoo", "bitsandbytes", "pytest", "pytest-timeout", "sdpo-fast")
WHEEL_NAME = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)-")


def wheel_package(path: Path) -> tuple[str, str]:
    m = WHEEL_NAME.match(path.name)
    if not m:
        raise SystemExit(f"INSTALL FAILED: {path.name} is not a wheel file name (name-version-...-tag.whl)")
    return m["name"].lower().replace("_", "-").replace(".", "-"), m["version"]


def install_wheels(wheel_dirs: list[Path], site: Path) -> list[str]:
    """Install every wheel, or exit 1 naming the package that failed. Returns 'name version' lines."""
    wheels = sorted(w for d in wheel_dirs for w in d.glob("*.whl"))
    seen: dict[str, Path] = {}
    for wheel in wheels:
        name, _ = wheel_package(wheel)
        if name in seen:  # pip would install both, the last one silently winning
            fail(f"two wheels of {name}: {seen[name].name} and {wheel.name}; keep one", name)
        seen[name] = wheel
    installed = []
    for wheel in wheels:
        name, version = wheel_package(wheel)
        t0 = time.time()
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile"]
        cmd += ["--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(site), str(wheel)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            fail(f"pip could not install {wheel.name}: {tail}", name)
        installed.append(f"{name} {version}")
        print(f"installed {name} {version} ({time.time() - t0:.1f} s)", flush=True)
    return installed


def fail(message: str, package: str) -> None:
    print(f"!!! INSTALL FAILED: package {package}: {message}", flush=True)
    print("!!! the check stops here: rebuild the wheel folder with bench/build_gpu_wheels.py", flush=True)
    sys.exit(1)


def make_shim(shim: Path) -> None:
    """shim/sdpo_fast: links to the package's files, plus kernels -> <checkout>/kernels; a dist-info for metadata."""
    pkg = shim / "sdpo_fast"
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in pkg.iterdir():
        entry.unlink()
    for src in sorted((REPO / "sdpo_fast").iterdir()):
        if src.name != "__pycache__":
            (pkg / src.name).symlink_to(src)
    (pkg / "kernels").symlink_to(REPO / "kernels")
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    info = shim / f"sdpo_fast-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sdpo-fast\nVersion: {version}\n")


PROBE = r"""
import importlib, importlib.metadata as md, importlib.util, json, sys, traceback
required, optional, versions = json.loads(sys.argv[1])
out = {"modules": {}, "versions": {}}
def attempt(module):
    try:
        mod = importlib.import_module(module)
        return {"ok": True, "file": getattr(mod, "__file__", None)}
    except BaseException as err:  # noqa: BLE001 - a SystemExit inside a broken package is a failure too
        return {"ok": False, "error": f"{type(err).__name__}: {err}".strip()[:400]}
for module in required + list(optional.values()):
    out["modules"][module] = attempt(module)
try:
    import torch
    out["cuda"] = bool(torch.cuda.is_available())
    out["device_name"] = torch.cuda.get_device_name() if out["cuda"] else None
except BaseException as err:  # noqa: BLE001
    out["cuda"], out["cuda_error"] = False, str(err)
spec = importlib.util.find_spec("kernels") if "kernels" not in sys.modules else None
out["top_level_kernels"] = getattr(sys.modules.get("kernels"), "__file__", None) or (spec and spec.origin)
for dist in versions:
    try:
        out["versions"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        out["versions"][dist] = None
print("PROBE " + json.dumps(out))
"""


def probe(required: list[str], optional: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([required, optional, VERSIONS])], capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    print(f"!!! the import check itself crashed (exit {proc.returncode}): {tail}", flush=True)
    sys.exit(1)


def check_imports(shim: Path, work: Path, unsloth: bool) -> dict:
    env = probe(REQUIRED + REQUIRED_CUDA, OPTIONAL)
    if not env["cuda"]:  # the CPU dry run: Triton kernels are never run there, so they are not required
        env["modules"] = {m: r for m, r in env["modules"].items() if m not in REQUIRED_CUDA}
    (work / "cuda").write_text("yes" if env["cuda"] else "no")
    if unsloth:  # in its own process: importing Unsloth rewrites TRL's trainers
        env["modules"]["unsloth"] = probe(["unsloth"], {})["modules"]["unsloth"]
    print(f"CUDA: {env['cuda']} {env.get('device_name') or env.get('cuda_error') or ''}".rstrip())
    for dist, version in env["versions"].items():
        print(f"{dist} {version or 'MISSING'}")
    broken = [m for m in REQUIRED + REQUIRED_CUDA if m in env["modules"] and not env["modules"][m]["ok"]]
    head = env["modules"]["sdpo_fast"]
    if head["ok"] and not str(head["file"]).startswith(str(shim)):
        broken.append(f"sdpo_fast (imported from {head['file']}, not the checkout's shim {shim})")
    if str(REPO / "kernels") in str(env.get("top_level_kernels")):
        broken.append(f"the checkout's kernels/ is importable as a top-level `kernels` ({env['top_level_kernels']})")
    warnings = []
    for what, module in [*OPTIONAL.items(), *(("Unsloth", "unsloth"),)]:
        res = env["modules"].get(module)
        if res is not None and not res["ok"]:
            warnings.append(f"{what} does not import ({module}): {res['error']}")
    for line in warnings:
        print(f"!!! WARNING: {line}", flush=True)
    env.update(broken=broken, warnings=warnings)
    for module in broken:
        res = env["modules"].get(module, {})
        print(f"!!! HEAD DOES NOT IMPORT: {module}: {res.get('error', '')}".rstrip(": "), flush=True)
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", type=Path, required=True)
    p.add_argument("--shim", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--report", type=Path)
    p.add_argument("wheel_dirs", nargs="*", type=Path)
    args = p.parse_args(argv)
    args.site.mkdir(parents=True, exist_ok=True)
    missing = [str(d) for d in args.wheel_dirs if not d.is_dir()]
    if missing:
        fail(f"no wheel folder at {', '.join(missing)}", "(wheel folder)")
    installed = install_wheels(args.wheel_dirs, args.site)
    make_shim(args.shim)
    path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(args.shim) not in path or str(args.site) not in path:
        print(f"!!! PYTHONPATH must hold {args.shim} and {args.site} (bench/gpu_check.sh sets it): {path}")
        return 1
    unsloth = any(line.startswith("unsloth ") for line in installed)
    env = check_imports(args.shim, args.work, unsloth)
    env["installed"] = installed
    if args.report:
        args.report.write_text(json.dumps(env, indent=1) + "\n")
    return 1 if env["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
