#!/bin/sh
# By hand, not in `cargo test` (after `cargo build --release`): the master's CPU while it samples
# 16 workers every second, over 60 s, from /proc/<master pid>/stat (and the sampler thread's share
# from /proc/<pid>/task/<tid>/stat), then `balancer ls` wall time with hyperfine.
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/balancer}
D=$(mktemp -d)
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
cat > $D/balancer.toml <<TOML
[balancer]
sample_interval = "1s"
[[app]]
name = "echo"
script = "$ROOT/examples/python/echo_server.py"
instances = 16
listen = ["tcp://127.0.0.1:$PORT"]
TOML
export BALANCER_HOME=$D/home NO_COLOR=1
$BIN run $D/balancer.toml 2>$D/master.log &
MASTER=$!
for i in $(seq 1 300); do
  n=$($BIN jlist 2>/dev/null | python3 -c 'import json,sys; print(sum(w["status"]=="ready" for w in json.load(sys.stdin)))' 2>/dev/null || echo 0)
  [ "$n" = 16 ] && break; sleep 0.2
done
echo "ready workers: $n (master pid $MASTER)"
sleep 3
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
stats_tid=$(for t in /proc/$MASTER/task/*; do [ "$(cat $t/comm)" = balancer-stats ] && basename $t; done; true)
HZ=$(getconf CLK_TCK)
m0=$(ticks $MASTER); s0=$(ticks $MASTER/task/$stats_tid); t0=$(date +%s.%N)
sleep 60
m1=$(ticks $MASTER); s1=$(ticks $MASTER/task/$stats_tid); t1=$(date +%s.%N)
python3 - <<PY
wall = $t1 - $t0
print(f"over {wall:.1f} s: master total {($m1-$m0)/$HZ:.2f} CPU s = {100*($m1-$m0)/$HZ/wall:.3f} % of a core; "
      f"sampler thread {($s1-$s0)/$HZ:.2f} CPU s = {100*($s1-$s0)/$HZ/wall:.3f} %")
PY
$BIN ls | head -6; echo "processes on the machine: $(ls /proc | grep -c "^[0-9]")"
PATH=$(dirname $BIN):$PATH hyperfine -w 3 --export-json $D/ls.json "balancer ls" 2>&1 | grep -v "^ *$"
PATH=$(dirname $BIN):$PATH hyperfine -N -w 3 --export-json $D/ls-N.json "balancer ls" 2>&1 | grep -v "^ *$"
for f in ls ls-N; do python3 -c "import json,sys; r=json.load(open(sys.argv[1]))[\"results\"][0]; print(sys.argv[2], \"median %.2f ms, mean %.2f ms\" % (r[\"median\"]*1e3, r[\"mean\"]*1e3))" $D/$f.json $f; done
kill -TERM $MASTER; wait $MASTER || true
