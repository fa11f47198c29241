# cap-seconds: 60
# on-failure: stop
# The same install step as the main check (bench/gpu_check.d/00-install.sh), with the Unsloth bundle's wheels.
exec bash "$REPO/bench/gpu_check.d/00-install.sh"
