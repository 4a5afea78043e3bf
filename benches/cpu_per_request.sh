#!/usr/bin/env bash
# CPU time and context switches per request of one process (a balancer master, haproxy, ...)
# under wrk -t1 -c50 (by hand; not part of CI). Steadier than req/s on a shared machine.
#   benches/cpu_per_request.sh PID URL [extra wrk args, e.g. -H 'Connection: close']
# Needs perf (linux-perf) and wrk.
set -u
pid=$1; url=$2; shift 2
out=$(mktemp -d)
wrk -t1 -c50 -d8s "$@" "$url" > "$out/wrk" 2>&1 &
w=$!
sleep 2
perf stat -e task-clock,context-switches,cpu-migrations -p "$pid" -o "$out/perf" -- sleep 4 2>/dev/null
wait $w
rps=$(awk '/Requests\/sec/{print $2}' "$out/wrk")
num() { awk -v k="$1" '$0 ~ k {gsub(",","",$1); print $1; exit}' "$out/perf"; }
python3 -c "r=$rps; n=r*4; print(f'req/s {r:.0f}  cpu/req {$(num task-clock)*1000/n:.1f} us  ctxsw/req {$(num context-switches)/n:.3f}  migrations/req {$(num cpu-migrations)/n:.4f}')"
rm -rf "$out"
