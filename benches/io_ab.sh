#!/usr/bin/env bash
# [balancer] io = "epoll" against io = "io_uring" (same binary) and HAProxy in tcp mode, each in
# front of two node workers, in rotation: CPU time and context switches per request (wrk -t1
# -c50 keep-alive through tcp://) and per message (echo-bench ping-pong, 50 x 64 B), from
# `perf stat` on the front's process. By hand, not part of CI; needs wrk, haproxy, perf, node
# and the peers harness's echo-bench (`../shared/peers`, copied to $PEERS with setup.sh run).
# With SCHEME=http the fronts are balancer's http:// listener and HAProxy in http mode, and
# only the keep-alive rotation runs.
#   benches/io_ab.sh [ROUNDS]        BALANCER_BIN=... PEERS=/tmp/peers SCHEME=tcp|http
set -u
rounds=${1:-3}
scheme=${SCHEME:-tcp}
bin=${BALANCER_BIN:-$(dirname "$0")/../target/release/balancer}
peers=${PEERS:-/tmp/peers}
bench=$peers/tools/echo-bench/target/release/echo-bench
run=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; sleep 1; rm -rf "$run"' EXIT

# front NAME PORT SCRIPT BACKEND_PORT... : a balancer (NAME = its io) or haproxy over node workers.
front() {
  local name=$1 port=$2 script=$3; shift 3
  mkdir -p "$run/$name"
  if [ "$name" = haproxy ]; then
    local p i=1
    for p in "$@"; do PORT=$p setsid node "$script" > /dev/null 2>&1 & pids+=($!); done
    { printf 'defaults\n  mode %s\n' "$scheme"; printf '  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n'
      printf 'frontend ft\n  bind 127.0.0.1:%s\n  default_backend bk\nbackend bk\n  balance roundrobin\n' "$port"
      for p in "$@"; do printf '  server s%s 127.0.0.1:%s\n' $i "$p"; i=$((i + 1)); done; } > "$run/$name/cfg"
    setsid haproxy -f "$run/$name/cfg" > /dev/null 2>&1 &
  else
    printf '[balancer]\nio = "%s"\n[[app]]\nname = "lb"\ncommand = ["node", "%s"]\ninstances = 2\nlisten = ["%s://127.0.0.1:%s"]\n' \
      "$name" "$script" "$scheme" "$port" > "$run/$name/balancer.toml"
    BALANCER_HOME=$run/$name setsid "$bin" run "$run/$name/balancer.toml" > "$run/$name/log" 2>&1 &
  fi
  pids+=($!); echo $! > "$run/$name/pid"
}

# measure NAME COUNT_PER_SECOND_CMD... : runs the load 8 s, perf-stats the front for 4 s of it.
measure() {
  local name=$1; shift
  "$@" > "$run/out" 2>&1 & local load=$!
  sleep 2
  perf stat -e task-clock,context-switches -p "$(cat "$run/$name/pid")" -o "$run/perf" -- sleep 4 2> /dev/null
  wait $load
  local rate cpu cs
  rate=$(grep -oE 'Requests/sec: *[0-9.]+|rate=[0-9]+' "$run/out" | grep -oE '[0-9.]+$')
  cpu=$(awk '/task-clock/ {gsub(",", "", $1); print $1}' "$run/perf")
  cs=$(awk '/context-switches/ {gsub(",", "", $1); print $1}' "$run/perf")
  python3 -c "r = $rate; n = r * 4; print(f'  {\"$name\":9} {r:9.0f}/s  cpu {$cpu * 1000 / n:5.1f} us  ctxsw {$cs / n:.3f}')"
}

# rotate TITLE BASE_PORT CMD... : ROUNDS rounds of each front (ports BASE+1..3), CMD with the
# front's address for @.
rotate() {
  local title=$1 base=$2; shift 2
  local r n port i
  for r in $(seq "$rounds"); do
    echo "$title, round $r"
    i=1
    for n in epoll io_uring haproxy; do
      port=$((base + i)); i=$((i + 1))
      measure $n "${@/@/127.0.0.1:$port}"
    done
  done
}

app=$peers/app.js echo=$peers/tcp-echo.js
front epoll 18181 "$app"; front io_uring 18182 "$app"; front haproxy 18183 "$app" 3181 3182
sleep 4
rotate "keep-alive requests ($scheme://)" 18180 wrk -t1 -c50 -d8s "http://@/"
[ "$scheme" = http ] && exit 0
kill "${pids[@]}" 2>/dev/null; pids=(); sleep 2
front epoll 18191 "$echo"; front io_uring 18192 "$echo"; front haproxy 18193 "$echo" 4181 4182
sleep 4
rotate "echo ping-pong messages" 18190 "$bench" pingpong @ 50 8 64
