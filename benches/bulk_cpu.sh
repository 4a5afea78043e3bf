#!/usr/bin/env bash
# Master CPU per GiB of bulk transfer, and GB/s, for balancer builds (by hand; not part of CI).
#   benches/bulk_cpu.sh old=/path/to/balancer new=target/release/balancer
# Each NAME=BINARY runs `balancer run` with two node tcp-echo.js workers behind tcp://; each round
# echoes 1 GiB through each with the peers harness's echo-bench under `perf stat -p <master>`,
# alternating. Env: ROUNDS=3 PEERS=/tmp/peers (a copy of ../shared/peers, set up once by its
# run-all.sh or setup.sh). Needs perf (linux-perf). Ports 8480 and up must be free.
set -u
PEERS=${PEERS:-/tmp/peers}; EB=$PEERS/tools/echo-bench/target/release/echo-bench
[ -x "$EB" ] || { echo "build the peers harness's echo-bench in $PEERS first" >&2; exit 1; }
ROUNDS=${ROUNDS:-3}; port=8480; declare -A ADDR PID; names=()
out=$(mktemp -d)
trap 'for n in "${names[@]}"; do kill -TERM "${PID[$n]}" 2>/dev/null; done; wait; rm -rf "$out"' EXIT
for spec in "$@"; do
  n=${spec%%=*}; bin=$(realpath "${spec#*=}"); home=$out/home-$n; mkdir -p "$home"
  cat > "$home/balancer.toml" <<TOML
[[app]]
name = "e"
command = ["node", "$PEERS/tcp-echo.js"]
instances = 2
listen = ["tcp://127.0.0.1:$port"]
TOML
  BALANCER_HOME=$home "$bin" run "$home/balancer.toml" > "$home/out" 2>&1 < /dev/null &
  PID[$n]=$!; ADDR[$n]=127.0.0.1:$port; names+=("$n"); port=$((port+1))
done
sleep 3
for n in "${names[@]}"; do "$EB" bulk "${ADDR[$n]}" 104857600 > /dev/null 2>&1; done
for r in $(seq "$ROUNDS"); do for n in "${names[@]}"; do
  perf stat -e task-clock,context-switches -p "${PID[$n]}" -o "$out/perf" -- \
    "$EB" bulk "${ADDR[$n]}" 1073741824 > "$out/eb" 2>&1
  gbps=$(tr ' ' '\n' < "$out/eb" | awk -F= '$1=="gbps"{print $2}')
  ms=$(awk '/task-clock/{gsub(",","",$1); print $1; exit}' "$out/perf")
  cs=$(awk '/context-switches/{gsub(",","",$1); print $1; exit}' "$out/perf")
  echo "round $r $n gbps=$gbps master_cpu_ms_per_GiB=$ms context_switches=$cs"
done; done
