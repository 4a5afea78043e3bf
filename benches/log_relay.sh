#!/bin/sh
# By hand, not in `cargo test` (after `cargo build --release`): what relaying logs costs.
#  1. a quiet TCP app (2 Node workers) under a 4-client load of fresh connections, alone;
#  2. the same load next to an app logging 20 MB/s (a heavy but ordinary logger) and
#  3. next to an app flooding stdout at full speed, both through the relay (`time = true`,
#     rotated at 10M, 2 kept): requests/s and latency side by side, in alternating slices;
#  4. the flood alone: the master's CPU per MB relayed (CPU from /proc/<master>/stat, the relay
#     thread's from /proc/<master>/task/<tid>/stat; bytes from the flooding worker's own
#     /proc/<pid>/io `wchar`, i.e. what it wrote into its pipe).
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/balancer}
SECS=${SECS:-10}
D=$(mktemp -d)
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
cat > $D/balancer.toml <<TOML
[[app]]
name = "quiet"
script = "$ROOT/tests/workers/pid_server.js"
instances = 2
listen = ["tcp://127.0.0.1:$PORT"]
TOML
mkdir -p $D/flood $D/paced
cat > $D/paced/balancer.toml <<TOML
[[app]]
name = "paced"
script = "$ROOT/tests/workers/flood.py"
instances = 1
env = { FLOOD_MBPS = "20" }
time = true
log_max_size = "10M"
log_retain = 2
TOML
cat > $D/flood/balancer.toml <<TOML
[[app]]
name = "flood"
script = "$ROOT/tests/workers/flood.py"
instances = 1
time = true
log_max_size = "10M"
log_retain = 2
TOML
export BALANCER_HOME=$D/home NO_COLOR=1
$BIN run $D/balancer.toml 2>$D/master.log &
MASTER=$!
trap 'kill -TERM $MASTER 2>/dev/null; wait $MASTER 2>/dev/null; rm -rf $D' EXIT
for i in $(seq 1 300); do $BIN ping >/dev/null 2>&1 && break; sleep 0.2; done
sleep 2
HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
user() { awk '{print $14}' /proc/$1/stat; }
# Alternate short slices, so the other load on a shared machine weighs on both sides alike.
ROUNDS=${ROUNDS:-5}
SLICE=${SLICE:-3}
$BIN start $D/flood/balancer.toml >/dev/null
$BIN start $D/paced/balancer.toml >/dev/null
for r in $(seq 1 $ROUNDS); do
  $BIN stop flood >/dev/null; $BIN stop paced >/dev/null; sleep 1
  echo "alone $(python3 $ROOT/benches/tcp_load.py 127.0.0.1:$PORT $SLICE 4)" >> $D/slices
  $BIN start paced >/dev/null; sleep 0.5
  echo "paced $(python3 $ROOT/benches/tcp_load.py 127.0.0.1:$PORT $SLICE 4)" >> $D/slices
  $BIN stop paced >/dev/null; $BIN start flood >/dev/null; sleep 0.5
  echo "flood $(python3 $ROOT/benches/tcp_load.py 127.0.0.1:$PORT $SLICE 4)" >> $D/slices
done
$BIN delete paced >/dev/null
python3 - $D/slices $SLICE <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    kind, rest = line.split(" ", 1)
    rps = float(re.search(r"([\d.]+) req/s", rest).group(1))
    failed = int(re.search(r"(\d+) failed", rest).group(1))
    p50 = float(re.search(r"p50 ([\d.]+)", rest).group(1))
    p99 = float(re.search(r"p99 ([\d.]+)", rest).group(1))
    rows.setdefault(kind, []).append((rps, failed, p50, p99))
names = {"alone": "quiet app alone", "paced": "next to a 20 MB/s logger", "flood": "next to a full-speed flood"}
base = statistics.median(r[0] for r in rows["alone"])
for kind in ("alone", "paced", "flood"):
    r = rows[kind]
    rps = statistics.median(x[0] for x in r)
    print(f"{names[kind]:28} median {rps:6.0f} req/s ({100 * rps / base:3.0f} %), "
          f"p50 {statistics.median(x[2] for x in r):.2f} ms, p99 {statistics.median(x[3] for x in r):.2f} ms, "
          f"{sum(x[1] for x in r)} failed, {len(r)} slices of {sys.argv[2]} s")
PY
FLOOD=$($BIN jlist | python3 -c 'import json,sys; print([w["pid"] for w in json.load(sys.stdin) if w["app"]=="flood"][0])')
relay=$(for t in /proc/$MASTER/task/*; do [ "$(cat $t/comm)" = balancer-logs ] && basename $t; done; true)
wchar() { awk '/^wchar/ {print $2}' /proc/$FLOOD/io; }
b0=$(wchar); m0=$(ticks $MASTER); r0=$(ticks $MASTER/task/$relay); u0=$(user $MASTER/task/$relay); t0=$(date +%s.%N)
sleep $SECS
b1=$(wchar); m1=$(ticks $MASTER); r1=$(ticks $MASTER/task/$relay); u1=$(user $MASTER/task/$relay); t1=$(date +%s.%N)
python3 - <<PY
mb = ($b1 - $b0) / 1e6
wall = $t1 - $t0
master = ($m1 - $m0) / $HZ
relay = ($r1 - $r0) / $HZ
user = ($u1 - $u0) / $HZ
print(f"flood alone: {mb:.0f} MB relayed in {wall:.1f} s ({mb / wall:.0f} MB/s); master {master:.2f} CPU s "
      f"= {1e3 * master / mb:.2f} CPU ms per MB (relay thread {1e3 * relay / mb:.2f} ms/MB, of which "
      f"user {1e3 * user / mb:.2f}, kernel {1e3 * (relay - user) / mb:.2f})")
PY
ls $BALANCER_HOME/logs/ | sed 's/^/  /'
head -c 300 $BALANCER_HOME/logs/flood-0-out.log | head -2
