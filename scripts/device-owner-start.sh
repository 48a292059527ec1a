#!/usr/bin/env bash
# Owner start-up on a large pool, as BENCHMARKS.md targets it: time from
# exec to "ready" for a fresh pool (prefault included) with hugepages and on
# /dev/shm, then for a restart that re-adopts the same segments.
#
#   scripts/device-owner-start.sh OWNER_BIN [POOL_GIB]
#
# Needs root (reserves huge pages). Prints one line per case and a JSON line.
set -euo pipefail
BIN="$1"
GIB="${2:-64}"
export PEGAFLOW_RUN_DIR="${TMPDIR:-/tmp}/pf-start"
mkdir -p "$PEGAFLOW_RUN_DIR"

ready_ms() { # name args... -> ms until the owner logs "ready", then stops it
    local name="$1"; shift
    local log="$PEGAFLOW_RUN_DIR/$name-$(date +%s%N).log"
    local t0; t0=$(date +%s%N)
    "$BIN" --name "$name" --metrics-addr '' --log-format text "$@" >"$log" 2>&1 &
    local pid=$!
    until grep -q "pegaflow-owner ready" "$log"; do
        if ! kill -0 "$pid" 2>/dev/null; then cat "$log" >&2; return 1; fi
        sleep 0.005
    done
    local t1; t1=$(date +%s%N)
    kill -TERM "$pid"; wait "$pid" || true
    echo $(( (t1 - t0) / 1000000 ))
}

pages=$(( GIB * 512 ))
echo "$pages" > /proc/sys/vm/nr_hugepages
have=$(awk '/HugePages_Total/ {print $2}' /proc/meminfo)
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs -o pagesize=2M none /dev/hugepages
echo "huge pages reserved: $have of $pages"

results=()
if (( have >= pages )); then
    fresh=$(ready_ms huge --pool-size "${GIB}gb" --use-hugepages --discard-existing)
    again=$(ready_ms huge --pool-size "${GIB}gb" --use-hugepages)
    echo "hugetlbfs ${GIB} GiB: fresh start ${fresh} ms (prefault included), restart (re-adopt) ${again} ms"
    results+=("\"hugetlbfs_fresh_ms\":$fresh,\"hugetlbfs_restart_ms\":$again")
    rm -f /dev/hugepages/pegaflow-huge.pool /dev/shm/pegaflow-huge.ctl
else
    echo "hugetlbfs: SKIPPED, only $have huge pages could be reserved"
fi
echo 0 > /proc/sys/vm/nr_hugepages

shm=$(( GIB > 1 ? GIB / 2 : 1 ))
fresh=$(ready_ms shm --pool-size "${shm}gb" --discard-existing)
again=$(ready_ms shm --pool-size "${shm}gb")
echo "/dev/shm ${shm} GiB: fresh start ${fresh} ms (prefault included), restart (re-adopt) ${again} ms"
results+=("\"shm_gib\":$shm,\"shm_fresh_ms\":$fresh,\"shm_restart_ms\":$again")
rm -f /dev/shm/pegaflow-shm.*
grep -h "prefaulted" "$PEGAFLOW_RUN_DIR"/*.log || true
( IFS=,; echo "{\"bench\":\"owner_start\",\"pool_gib\":$GIB,${results[*]}}" )
