# cap-seconds: 60
# on-failure: stop
# The carried wheels (WHEEL_DIRS) into SITE_DIR with pip --no-index --no-deps, one at a time, then the project made
# importable from SHIM_DIR without building it, then every import the later steps need, checked in a fresh
# process. Fails, and so stops the whole check, when a wheel does not install or the project's own head does not
# import; warns loudly, naming the package, when a competitor or the trainer does not import.
set -uo pipefail
# shellcheck disable=SC2086  # WHEEL_DIRS is a space-separated list of folders
exec "$PYTHON" "$REPO/bench/gpu_install.py" --site "$SITE_DIR" --shim "$SHIM_DIR" --work "$WORK" \
    --report "$RESULTS_DIR/environment.json" $WHEEL_DIRS
