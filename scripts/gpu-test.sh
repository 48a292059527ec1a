#!/usr/bin/env bash
# Builds the GPU test binary and the transfer benchmark here (release),
# stages them into .carry/ (git-ignored) and prints the device `run` call
# that executes scripts/gpu-remote.sh on the GPU machine. See docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -p pegaflow-benches --bin transfer_bench
# The IPC tests broker handles through a real owner.
cargo build --release -p pegaflow-owner --bin pegaflow-owner
test_bin=$(cargo test --release -p pegaflow-tests --test gpu --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | grep '/gpu-' | tail -n 1)
[ -n "$test_bin" ] || { echo "could not find the gpu test binary" >&2; exit 1; }
mkdir -p .carry
cp "$test_bin" .carry/gpu-tests
cp "$CARGO_TARGET_DIR/release/transfer_bench" .carry/transfer_bench
cp "$CARGO_TARGET_DIR/release/pegaflow-owner" .carry/pegaflow-owner
# Debug info is not needed there; keeps .carry well under the 64 MiB limit.
strip .carry/gpu-tests .carry/transfer_bench .carry/pegaflow-owner 2>/dev/null || true
du -sh .carry
cat <<'RUN'
Now call the device tool. The full benchmark alone takes ~7.5 minutes, so
use two calls (each under the 10-minute limit of one command):
  run(kind="nvidia-h200", timeout_s=600, carry=[".carry"],
      command="set -o pipefail; scripts/gpu-remote.sh ptx tests register 2>&1 | tee $OUT/log")
  run(kind="nvidia-h200", timeout_s=600, carry=[".carry"],
      command="set -o pipefail; scripts/gpu-remote.sh bench 2>&1 | tee $OUT/log")
Steps: ptx | tests | bench | register. REGISTER_GIB=32 for a smaller
registration test; BENCH_ARGS="--quick" (reference shape only, ~1.5 min)
or BENCH_ARGS="--backing shm|hugetlbfs".
RUN
