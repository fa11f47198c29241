# cap-seconds: 60
# What the GPU box lacks, from wheels brought along (pip --no-index: no network), then this checkout itself
# (editable, dependencies not resolved). Each package is installed on its own, so one missing wheel does not
# block the others; the versions found are printed at the end.
set -uo pipefail
cd "$REPO"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
for spec in transformers:transformers accelerate:accelerate datasets:datasets trl:trl liger_kernel:liger-kernel \
            pytest:pytest hypothesis:hypothesis tqdm:tqdm; do
    module="${spec%%:*}"
    package="${spec#*:}"
    if ! "$PYTHON" -c "import $module" 2>/dev/null; then
        if [ -d "$WHEEL_DIR" ]; then
            "$PYTHON" -m pip install -q --no-index --find-links "$WHEEL_DIR" "$package" \
                || echo "could not install $package from $WHEEL_DIR"
        else
            echo "missing $package, and no wheel folder at $WHEEL_DIR"
        fi
    fi
done
if ! "$PYTHON" -c "import sdpo_fast.kernels.triton_head" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e "$REPO"
fi
"$PYTHON" - <<'PY'
import importlib.metadata as md
for d in ("torch", "triton", "transformers", "trl", "accelerate", "datasets", "liger-kernel", "sdpo-fast"):
    try:
        print(f"{d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d} MISSING")
PY
