# shellcheck shell=bash
# Process helpers shared by the benchmark scripts (bench.sh, flood.sh, mqtt_bench.sh, churn.sh). Source it.
# Every process a script starts goes into PIDS; kill_all ends them all (call it from the script's EXIT trap).
#
#   kill_all          TERM to every PID in PIDS, up to 5 s each to go, then KILL
#   stop PID          ends one process started here and forgets it
#   wait_tcp HOST PORT   up to 10 s for a listener

PIDS=()

kill_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
}

stop() {
  local pid=$1 keep=() p
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

wait_tcp() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}
