#!/usr/bin/env bash
# A/B of balancer builds next to HAProxy, in one run, alternating (by hand; not part of CI).
#   benches/peers_ab.sh old=/path/to/balancer new=target/release/balancer
# Each NAME=BINARY runs `balancer run` with two node workers (the peers harness's app.js for the
# HTTP rows, tcp-echo.js for the echo rows); HAProxy fronts two standalone node backends.
# Rows per round: wrk -t1 -c50 keep-alive and `Connection: close` req/s, echo-bench ping-pong
# msg/s (50 x 64 B) and 1 GiB bulk GB/s. Env: ROUNDS=3 DUR=5 SCHEME=tcp|http POLICY=rr|reuseport
# PEERS=/tmp/peers (a copy of ../shared/peers, set up once by its run-all.sh or setup.sh).
# A binary may be a wrapper script that sets environment variables and execs the real one.
set -u
# Binaries as absolute paths: the script runs from $PEERS.
specs=(); for spec in "$@"; do specs+=("${spec%%=*}=$(realpath "${spec#*=}")"); done; set -- "${specs[@]}"
PEERS=${PEERS:-/tmp/peers}; cd "$PEERS" || { echo "copy ../shared/peers to $PEERS first" >&2; exit 1; }
export RUN=${RUN:-/tmp/ab-run} OUT=${OUT:-/tmp/ab-out}; rm -rf $RUN $OUT; mkdir -p $RUN $OUT
source ./lib.sh; source scenarios/configs.sh
trap cleanup EXIT
ROUNDS=${ROUNDS:-3}; DUR=${DUR:-5}; SCHEME=${SCHEME:-tcp}
PORT=3001 start_bg b1 node app.js; PORT=3002 start_bg b2 node app.js
PORT=4001 start_bg e1 node tcp-echo.js; PORT=4002 start_bg e2 node tcp-echo.js
haproxy_cfg $RUN/h.cfg $SCHEME 8181 3001 3002; start_bg hh haproxy -db -f $RUN/h.cfg
haproxy_cfg $RUN/he.cfg tcp 8182 4001 4002; start_bg he haproxy -db -f $RUN/he.cfg
wait_port 127.0.0.1 3001; wait_port 127.0.0.1 4001; wait_port 127.0.0.1 8181
names=(haproxy); declare -A HADDR=([haproxy]=127.0.0.1:8181) EADDR=([haproxy]=127.0.0.1:8182)
port=8280
for spec in "$@"; do
  n=${spec%%=*}; bin=${spec#*=}
  for ph in http echo; do
    home=$RUN/home-$n-$ph; mkdir -p $home
    script=app.js; [ $ph = echo ] && script=tcp-echo.js
    scheme=$SCHEME; [ $ph = echo ] && scheme=tcp
    cat > $home/balancer.toml <<TOML
[[app]]
name = "lb"
command = ["node", "$PEERS/$script"]
instances = 2
listen = ["$scheme://127.0.0.1:$port"]
policy = "${POLICY:-rr}"
TOML
    BALANCER_HOME=$home start_bg $n-$ph $bin run $home/balancer.toml
    wait_port 127.0.0.1 $port 15
    if [ $ph = http ]; then HADDR[$n]=127.0.0.1:$port; else EADDR[$n]=127.0.0.1:$port; fi
    port=$((port+1))
  done
  names+=($n)
done
sleep 2
for n in "${names[@]}"; do wrk -t1 -c50 -d2s http://${HADDR[$n]}/ >/dev/null 2>&1; $ECHO_BENCH pingpong ${EADDR[$n]} 50 1 64 >/dev/null 2>&1; done
for r in $(seq $ROUNDS); do
  for n in "${names[@]}"; do
    ka=$(wrk -t1 -c50 -d${DUR}s http://${HADDR[$n]}/ 2>&1 | awk '/Requests\/sec/{print $2}')
    cl=$(wrk -t1 -c50 -d${DUR}s -H 'Connection: close' http://${HADDR[$n]}/ 2>&1 | awk '/Requests\/sec/{print $2}')
    pp=$($ECHO_BENCH pingpong ${EADDR[$n]} 50 $DUR 64 2>&1 | tr ' ' '\n' | awk -F= '$1=="rate"{print $2}')
    bk=$($ECHO_BENCH bulk ${EADDR[$n]} 1073741824 2>&1 | tr ' ' '\n' | awk -F= '$1=="gbps"{print $2}')
    echo "round $r $n keepalive=$ka close=$cl pingpong=$pp bulk=$bk"
  done
done
