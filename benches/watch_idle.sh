#!/usr/bin/env bash
# The cost of `watch` on a big tree: the time the master takes to set its watches up, and its
# CPU while idle, next to the same master without `watch`, back to back (so the machine's load
# weighs on both alike). Not run by CI: it is a measurement, not a test.
#
#   benches/watch_idle.sh [BINARY]          (default target/release/balancer)
#   FILES=50000 NODE_MODULES=20000 SECS=60 benches/watch_idle.sh
#
# The tree: FILES files, 50 per directory, two levels deep (FILES/50 directories), plus a
# node_modules of NODE_MODULES files that `watch` ignores by default. The app is `sleep`: the
# workers' own CPU is not the master's.
set -euo pipefail

BIN=$(realpath "${1:-target/release/balancer}")
FILES=${FILES:-50000}
NODE_MODULES=${NODE_MODULES:-20000}
SECS=${SECS:-60}
HZ=$(getconf CLK_TCK)

dir=$(mktemp -d)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT

python3 - "$dir/app" "$FILES" "$NODE_MODULES" <<'EOF'
import os, sys
root, files, deps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def tree(base, n):
    for i in range(n):
        d = os.path.join(base, f"d{i // 2500}", f"e{(i // 50) % 50}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}.js"), "w") as f:
            f.write("// x\n")
tree(os.path.join(root, "src"), files)
tree(os.path.join(root, "node_modules"), deps)
EOF
echo "tree: $(find "$dir/app" -type f | wc -l) files, $(find "$dir/app" -type d | wc -l) directories (node_modules: $NODE_MODULES files)"

# Runs the master on a one-app file with `$1` as extra keys; prints CPU over SECS idle.
measure() {
    local label=$1 extra=$2 home="$dir/home-$1"
    printf '[[app]]\nname = "big"\ncommand = "sleep 100000"\ncwd = "%s"\n%s\n' "$dir/app" "$extra" \
        > "$dir/$label.toml"
    BALANCER_HOME="$home" BALANCER_LOG=info NO_COLOR=1 "$BIN" run "$dir/$label.toml" \
        2> "$dir/$label.log" &
    pid=$!
    local deadline=$((SECONDS + 120))
    until grep -qs "master running" "$dir/$label.log"; do
        [ $SECONDS -lt $deadline ] || { echo "no start: $(cat "$dir/$label.log")"; exit 1; }
        sleep 0.2
    done
    if [ -n "$extra" ]; then
        until grep -qs "watching for changes" "$dir/$label.log"; do
            [ $SECONDS -lt $deadline ] || { echo "no watch: $(cat "$dir/$label.log")"; exit 1; }
            sleep 0.2
        done
        grep "watching for changes" "$dir/$label.log" | sed 's/.*watching/  watching/'
    fi
    sleep 2
    local t0 t1
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    sleep "$SECS"
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    awk -v label="$label" -v d=$((t1 - t0)) -v hz="$HZ" -v s="$SECS" -v rss="$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")" \
        'BEGIN { printf "  %-8s master CPU over %ds idle: %d ticks = %.3f%% of one core; RSS %d KiB\n", label, s, d, 100 * d / hz / s, rss }'
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=
}

measure plain ""
measure watched "watch = true"
