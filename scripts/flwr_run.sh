#!/usr/bin/env bash
# `flwr run .` as a local simulation, with Flower's traps handled:
#   * settings live in a project-local FLWR_HOME (.flwr/, git-ignored), never in ~/.flwr;
#   * no telemetry, no update check, no run-time `pip install` of the app's dependencies;
#   * the local SuperLink is started here (own ports) and it and its children are stopped on exit, so
#     nothing is left running; `flwr run` finds it healthy and does not start a detached one;
#   * client resources are sized from this machine: num-cpus per ClientApp <= cores.
# Usage: scripts/flwr_run.sh [extra `flwr run` options, e.g. -c 'num-server-rounds=2']
# Env:   NUM_HOSPITALS (3), FLWR_HOME (.flwr), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT (39091: the one
#        port of the local SuperLink's HTTP APIs), RUN_TIMEOUT seconds (1800), FEDSAMATCH_ALLOCATOR
#        (auto: mimalloc keeping freed pages; system; jemalloc)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
[ -x "$BIN/flwr" ] || BIN="$(dirname "$(command -v flwr)")"

export PATH="$BIN:$PATH"  # SuperLink starts flower-superexec / flwr-simulation by name
export FLWR_HOME="${FLWR_HOME:-$ROOT/.flwr}"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}"
export RAY_DEDUP_LOGS=0
# Ray's start-up FutureWarning about a future default (that actors asking for no GPU will no longer have
# CUDA_VISIBLE_DEVICES emptied) is hidden; the current behaviour, which hides GPUs from them, is kept.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Tip:FutureWarning:ray._private.worker"
# Every process this run starts inherits this marker, also the ones Ray re-parents away from the
# SuperLink; on exit, stragglers carrying it are stopped by PID (and nothing else is).
export FEDSAMATCH_RUN_MARKER="flwr_run-$$-$RANDOM"
NUM_HOSPITALS="${NUM_HOSPITALS:-3}"
RUN_TIMEOUT="${RUN_TIMEOUT:-1800}"

mkdir -p "$FLWR_HOME/local-superlink"
if [ ! -f "$FLWR_HOME/config.toml" ]; then
    cat > "$FLWR_HOME/config.toml" <<'EOF'
[superlink]
default = "local"

[superlink.local]
address = ":local-in-memory:"
EOF
fi

CORES="$(nproc 2>/dev/null || echo 1)"
PER_CLIENT=$(( CORES / NUM_HOSPITALS ))
[ "$PER_CLIENT" -ge 1 ] || PER_CLIENT=1
# Ray's CPUs are logical: with fewer cores than hospitals, declare one per hospital so that all train
# at once (time-sliced) instead of in waves that leave cores idle while the last hospital trains.
RAY_CPUS=$(( NUM_HOSPITALS * PER_CLIENT ))
[ "$RAY_CPUS" -ge "$CORES" ] || RAY_CPUS=$CORES
FED_CFG="num-supernodes=$NUM_HOSPITALS client-resources-num-cpus=$PER_CLIENT init-args-num-cpus=$RAY_CPUS"

HEALTH="http://127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT/health"
if "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=0.5)" "$HEALTH" 2>/dev/null; then
    echo "flwr_run: a SuperLink already answers on port $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT;" \
         "stop it or set FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" >&2
    exit 2
fi

# The host allocator (samatch/allocator.py): the SuperLink's environment is its children's, Ray's and
# every ClientApp's, so they run on mimalloc keeping freed pages (FEDSAMATCH_ALLOCATOR=system: glibc's).
EXPORTS="$("$BIN/python" -m samatch.allocator)"  # an assignment: a bad choice stops the script here
eval "$EXPORTS"
LOG="$FLWR_HOME/local-superlink/superlink.log"
"$BIN/flower-superlink" --insecure --simulation --isolation subprocess \
    --disable-runtime-dependency-installation \
    --host 127.0.0.1 --port "$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" \
    --log-file "$LOG" >"$FLWR_HOME/local-superlink/stdout.log" 2>&1 &
LINK_PID=$!
descendants() {  # all PIDs below $1 (Flower starts its children in new sessions: no group kill)
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}
stop_superlink() {
    # SIGTERM the SuperLink and every process below it (SuperExec, simulation, Ray) by PID, then
    # SIGKILL whatever is left after 15 s.
    local pids
    pids="$LINK_PID $(descendants "$LINK_PID" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 30); do
        # shellcheck disable=SC2086
        kill -0 $pids 2>/dev/null || break
        sleep 0.5
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    local stragglers="" p
    for _ in $(seq 20); do
        stragglers=""
        for p in /proc/[0-9]*; do
            p=${p#/proc/}
            [ "$p" = "$$" ] && continue
            grep -qz "^FEDSAMATCH_RUN_MARKER=$FEDSAMATCH_RUN_MARKER\$" "/proc/$p/environ" 2>/dev/null \
                && stragglers="$stragglers $p"
        done
        [ -z "$stragglers" ] && break
        # shellcheck disable=SC2086
        kill -TERM $stragglers 2>/dev/null || true
        sleep 0.5
    done
    # shellcheck disable=SC2086
    [ -n "$stragglers" ] && kill -KILL $stragglers 2>/dev/null || true
}
trap stop_superlink EXIT INT TERM

for _ in $(seq 60); do
    "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=0.5)" "$HEALTH" \
        2>/dev/null && break
    kill -0 "$LINK_PID" 2>/dev/null || { echo "flwr_run: SuperLink exited; see $LOG" >&2; exit 1; }
    sleep 0.5
done

# Flower refuses a TOML file beside key=value overrides, and this script adds some: turn every
# `-c FILE.toml` into the equivalent key=value string.
ARGS=()
while [ $# -gt 0 ]; do
    if { [ "$1" = "-c" ] || [ "$1" = "--run-config" ]; } && [ $# -ge 2 ] && [[ "$2" == *.toml ]]; then
        LINE="$("$BIN/python" -c 'import sys; from federation.config import toml_as_config_line as f
try:
    print(f(sys.argv[1]))
except ValueError as e:
    sys.exit(f"flwr_run: {e}")' "$2")"
        ARGS+=("$1" "$LINE")
        shift 2
        continue
    fi
    ARGS+=("$1")
    shift
done

echo "flwr_run: $NUM_HOSPITALS hospitals, $PER_CLIENT CPU(s) each of $CORES, FLWR_HOME=$FLWR_HOME"
# Relative out-dir values are taken from this folder (the ServerApp runs elsewhere). SAM embeddings
# of the hospitals' slices are kept in runs/sam_cache: any worker (and the next run) reuses them;
# FedBN's site-local BatchNorm in runs/site_state (a resumed run continues with it).
timeout "$RUN_TIMEOUT" "$BIN/flwr" run . --stream --federation-config "$FED_CFG" \
    -c "out-dir=\"$ROOT/runs/federated\" sam.cache_dir=\"$ROOT/runs/sam_cache\"" \
    -c "site-state-dir=\"$ROOT/runs/site_state\"" "${ARGS[@]}"

# `flwr run --stream` returns 0 even when the run failed: ask the SuperLink.
STATUS="$("$BIN/flwr" ls --format json 2>/dev/null | "$BIN/python" -c '
import json, sys
runs = json.load(sys.stdin).get("runs", [])
print(runs[-1].get("status", "unknown") if runs else "none")')"
echo "flwr_run: run status: $STATUS"
case "$STATUS" in *completed*) exit 0 ;; *) exit 1 ;; esac
