#!/usr/bin/env bash
# Runs on the GPU machine (as root): all GPU tests, the transfer benchmark
# and the pool-registration timing, then prints `N passed, N failed`.
# Binaries come prebuilt in .carry/ (scripts/gpu-test.sh builds them; the
# GPU machine has no Rust toolchain). See docs/gpu.md.
#
# usage: scripts/gpu-remote.sh [tests] [bench] [register] [ptx]   (default: all)
#   env: OUT (where logs go, default /tmp/pegaflow-gpu-out)
#        REGISTER_GIB (default 64), BENCH_ARGS (extra transfer_bench args)
set -uo pipefail
cd "$(dirname "$0")/.."
C=.carry
export PEGAFLOW_OWNER_BIN="$PWD/$C/pegaflow-owner"
OUT=${OUT:-/tmp/pegaflow-gpu-out}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(ptx tests bench register)
want() { local s; for s in "${steps[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

passed=0
failed=0
failures=()
ok() { passed=$((passed + 1)); echo "PASS: $1"; }
bad() { failed=$((failed + 1)); failures+=("$1"); echo "FAIL: $1"; }

HUGE=/mnt/pegaflow-huge
huge_setup() { # $1 = pages wanted; prints pages got (0 if impossible)
  # Only on a GPU machine: reserving hugepages elsewhere takes memory from
  # whoever shares it.
  if ! command -v nvidia-smi >/dev/null || [ ! -w /proc/sys/vm/nr_hugepages ]; then echo 0; return; fi
  echo "$1" > /proc/sys/vm/nr_hugepages 2>/dev/null || true
  mkdir -p "$HUGE"
  mountpoint -q "$HUGE" || mount -t hugetlbfs -o pagesize=2M none "$HUGE" 2>/dev/null || { echo 0; return; }
  cat /proc/sys/vm/nr_hugepages
}
huge_teardown() {
  command -v nvidia-smi >/dev/null || return 0
  rm -f "$HUGE"/pegaflow-* 2>/dev/null
  mountpoint -q "$HUGE" && umount "$HUGE"
  [ -w /proc/sys/vm/nr_hugepages ] && echo 0 > /proc/sys/vm/nr_hugepages
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "cores: $(nproc), memory: $(free -g | awk '/Mem:/{print $2}') GiB"

if want ptx; then
  echo "=== ptx: regenerate kernels/copy.ptx with nvcc and compare with the committed one"
  if command -v nvcc >/dev/null; then
    if scripts/gen-ptx.sh "$OUT/copy.ptx" && cmp -s "$OUT/copy.ptx" pegaflow-core/kernels/copy.ptx; then
      ok "ptx up to date (nvcc + ptxas sm_80/sm_90)"
    else
      bad "ptx differs from nvcc's (new PTX in \$OUT/copy.ptx; commit it)"
    fi
  else
    echo "SKIPPED: no nvcc"
  fi
fi

if want tests; then
  echo "=== tests: .carry/gpu-tests"
  timeout 300 "$C/gpu-tests" --test-threads=1 --nocapture 2>&1 | tee "$OUT/tests.log"
  rc=${PIPESTATUS[0]}
  # libtest's summary: "test result: ok. N passed; M failed; ..."
  summary=$(grep -E '^test result:' "$OUT/tests.log" | tail -n 1)
  np=$(echo "$summary" | sed -n 's/.* \([0-9][0-9]*\) passed.*/\1/p'); np=${np:-0}
  nf=$(echo "$summary" | sed -n 's/.* \([0-9][0-9]*\) failed.*/\1/p'); nf=${nf:-0}
  passed=$((passed + np)); failed=$((failed + nf))
  sed -n '/^failures:$/,/^test result/p' "$OUT/tests.log" | grep -E '^    [a-z_]+$' | while read -r l; do echo "FAIL: test $l"; done
  if [ "$rc" -ne 0 ] && [ "$nf" -eq 0 ]; then bad "gpu-tests exited $rc (timeout or crash)"; fi
  grep -q SKIPPED "$OUT/tests.log" && echo "note: some tests printed SKIPPED (no driver?)"
fi

if want bench; then
  echo "=== bench: .carry/transfer_bench (shm, then hugetlbfs)"
  pages=$(huge_setup 6400)
  echo "hugepages reserved: $pages (need 6400 for the 12.5 GiB pool)"
  # shellcheck disable=SC2086
  if timeout 560 "$C/transfer_bench" --huge-dir "$HUGE" --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"; then
    ok "transfer_bench (every byte verified)"
  else
    bad "transfer_bench"
  fi
  huge_teardown
fi

if want register; then
  gib=${REGISTER_GIB:-64}
  echo "=== register: ${gib} GiB pool, /dev/shm then hugetlbfs"
  if timeout 150 "$C/transfer_bench" register --gib "$gib" --dir /dev/shm 2>&1 | tee "$OUT/register.log"; then
    ok "register ${gib} GiB /dev/shm"
  else
    bad "register ${gib} GiB /dev/shm"
  fi
  rm -f /dev/shm/pegaflow-bench-*
  want_pages=$((gib * 512))
  got=$(huge_setup "$want_pages")
  hg=$((got / 512))
  if [ "$hg" -lt "$gib" ]; then echo "note: only $got hugepages could be reserved; timing ${hg} GiB on hugetlbfs"; fi
  if [ "$hg" -gt 0 ] && timeout 150 "$C/transfer_bench" register --gib "$hg" --dir "$HUGE" 2>&1 | tee -a "$OUT/register.log"; then
    ok "register ${hg} GiB hugetlbfs"
  else
    bad "register on hugetlbfs (${got} pages)"
  fi
  huge_teardown
fi

echo
echo "${passed} passed, ${failed} failed"
for f in "${failures[@]}"; do echo "  failed: $f"; done
[ "$failed" -eq 0 ]
