"""Build the wheel folders that the GPU check carries to an offline GPU machine (run where PyPI is reachable).

    python bench/build_gpu_wheels.py                      # both bundles: .gpu-wheels and .gpu-wheels-unsloth
    python bench/build_gpu_wheels.py --bundle unsloth --out DIR

The GPU machine runs Python 3.12 with torch 2.11, triton 3.6, transformers 5.17.0, accelerate 1.15.0, peft, pyarrow,
fsspec, pandas, xxhash, pytest, pytest-timeout and hypothesis, and nothing can be fetched there. Each bundle is the
exact pins below, downloaded with `pip download --no-deps` as Python 3.12 manylinux/pure wheels: no resolver runs
here or there, so no CUDA library or second torch is pulled in, and what is carried is exactly this list. Some wheels
are pruned of what an import never touches (Unsloth's web studio; bitsandbytes' libraries for other CUDA versions
than the machine's 13.0), their RECORD rewritten to match. Finally the folder plus the checkout's tracked files must
fit the 64 MiB that one launch carries, or the script fails. Both folders are git-ignored.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 * 2**20  # what one launch may carry: working tree and wheels together
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# Exact pins. trl 1.15.0 is the newest that Unsloth 2026.10 allows and works with the machine's transformers 5.17.0
# (the [unsloth] extra's stack); datasets 4.8.5 is the newest below 5 (Unsloth), dill and multiprocess the pair it
# accepts. Sizes are those measured by this script on 2026-12-07 (after pruning), for the CI check of the limit.
BUNDLES: dict[str, dict[str, int]] = {
    "main": {
        "trl==1.15.0": 945_812,
        "datasets==4.8.5": 528_973,
        "dill==0.4.0": 119_668,
        "multiprocess==0.70.18": 150_287,
        "liger-kernel==0.8.5": 910_117,
    },
    "unsloth": {},  # filled in below
}
BUNDLES["unsloth"] = {
    **{k: v for k, v in BUNDLES["main"].items() if not k.startswith("liger")},
    "unsloth==2026.10.9": 2_207_661,
    "unsloth-zoo==2026.10.9": 2_912_210,
    "bitsandbytes==0.50.2": 3_907_013,
    "tyro==1.0.17": 217_323,
    "docstring-parser==0.18.0": 22_484,
    "typeguard==4.6.1": 37_095,
    "shtab==1.13.0": 22_887,
    "msgspec==0.23.0": 236_624,
    "cut-cross-entropy==25.1.1": 22_672,
    "torchao==0.18.0": 3_372_585,
}
FOLDERS = {"main": ".gpu-wheels", "unsloth": ".gpu-wheels-unsloth"}
# wheel name prefix -> members to drop (regular expressions on the path inside the wheel)
PRUNE = {
    "unsloth-": [r"^studio/"],  # Unsloth Studio, a web app: never imported by `import unsloth`
    "bitsandbytes-": [
        r"^bitsandbytes/libbitsandbytes_(cuda(?!130)\d+|rocm\d+)\.so$"
    ],  # keep CUDA 13.0 (torch 2.11+cu130)
}


def download(pins: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    cmd += ["--implementation", "cp", "--dest", str(dest), *(a for p in PLATFORMS for a in ("--platform", p)), *pins]
    subprocess.run(cmd, check=True)


def prune(wheel: Path, patterns: list[str]) -> int:
    """Rewrite `wheel` without the members matching `patterns`, and its RECORD without their lines."""
    drop = re.compile("|".join(patterns))
    tmp = wheel.with_suffix(".tmp")
    removed = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop.search(item.filename):
                removed += 1
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(x for x in lines if not drop.search(x.split(",")[0])) + "\n").encode()
            dst.writestr(item, data)
    tmp.replace(wheel)
    return removed


def tracked_bytes() -> int:
    """The checkout's tracked files, which travel with every launch."""
    names = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    return sum((REPO / n).stat().st_size for n in names.decode().split("\0") if n and (REPO / n).is_file())


def sha256(path: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).decode().rstrip("=")


def build(bundle: str, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        download(list(BUNDLES[bundle]), Path(tmp))
        for wheel in Path(tmp).glob("*.whl"):
            for prefix, patterns in PRUNE.items():
                if wheel.name.startswith(prefix):
                    print(f"pruned {prune(wheel, patterns)} files from {wheel.name}")
            wheel.replace(out / wheel.name)
    wheels = sorted(out.glob("*.whl"))
    total, tree = sum(w.stat().st_size for w in wheels), tracked_bytes()
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    print(f"{total / 2**20:8.2f} MiB  {bundle} bundle in {out}; with the checkout's tracked files "
          f"{(total + tree) / 2**20:.2f} MiB of the {CARRY_LIMIT / 2**20:.0f} MiB a launch carries")  # fmt: skip
    if total + tree > CARRY_LIMIT:
        print(f"!!! too large: drop or prune wheels until it fits {CARRY_LIMIT / 2**20:.0f} MiB")
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", choices=[*BUNDLES, "all"], default="all")
    p.add_argument("--out", type=Path, help="folder for the wheels (default: .gpu-wheels[-unsloth] in the checkout)")
    args = p.parse_args(argv)
    bundles = list(BUNDLES) if args.bundle == "all" else [args.bundle]
    if args.out and len(bundles) > 1:
        p.error("--out needs one --bundle")
    return max(build(b, args.out or REPO / FOLDERS[b]) for b in bundles)


if __name__ == "__main__":
    sys.exit(main())
