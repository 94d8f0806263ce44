#!/bin/sh
# The README's tour, run by itself: start the demo pool in the background,
# queue jobs, wait for them, show stats, stop. Exits non-zero on any failure.
set -eu
CLX_POOL=${CLX_POOL:-target/release/clx-pool}
CONFIG=${CONFIG:-config/pool.toml}

# Where the demo config keeps its database and workspace.
run_dir=$(cd "$(dirname "$CONFIG")/../run" 2>/dev/null && pwd || echo run)
mkdir -p "$run_dir/workspace"

echo "== clx-pool start --config $CONFIG   (in the background, log in $run_dir/supervisor.log)"
"$CLX_POOL" start --config "$CONFIG" >"$run_dir/supervisor.log" 2>&1 &
sup=$!
trap '"$CLX_POOL" stop --config "$CONFIG" >/dev/null 2>&1 || kill "$sup" 2>/dev/null || true' EXIT

echo "== clx-pool wait --ready"
"$CLX_POOL" wait --ready --config "$CONFIG" --timeout 30s

echo "== clx-pool submit (20 jobs)"
for i in $(seq 1 10); do
  printf 'line %s of the clx-pool demo\nsecond line\n' "$i" >"$run_dir/workspace/note$i.txt"
  "$CLX_POOL" submit --config "$CONFIG" upper "note$i.txt" "out/note$i.upper.txt" >/dev/null
  "$CLX_POOL" submit --config "$CONFIG" wordcount "note$i.txt" "out/note$i.wc.txt" >/dev/null
done

echo "== clx-pool wait --drained"
"$CLX_POOL" wait --drained --config "$CONFIG" --timeout 60s
echo "-- $run_dir/workspace/out/note1.upper.txt:"
cat "$run_dir/workspace/out/note1.upper.txt"

echo "== clx-pool stats"
"$CLX_POOL" stats --config "$CONFIG"

echo "== clx-pool stop"
"$CLX_POOL" stop --config "$CONFIG"
wait "$sup"
trap - EXIT
echo "demo finished"
