#!/bin/sh
# The README's tour, run by itself: start the demo pool in the background,
# queue jobs, wait for them, show stats, stop. Exits non-zero on any failure.
#
# It runs in a folder of its own (a new one each time, under
# ${TMPDIR:-/tmp}), with its own database and workspace, so it never
# touches a pool started with `make run` (whose database is run/jobs.db).
set -eu
CLX_POOL=${CLX_POOL:-target/release/clx-pool}
CONFIG=${CONFIG:-config/pool.toml}
CLX_POOL=$(command -v "$CLX_POOL" || echo "$CLX_POOL")
case "$CLX_POOL" in /*) ;; *) CLX_POOL="$PWD/$CLX_POOL" ;; esac

demo_dir=$(mktemp -d "${TMPDIR:-/tmp}/clx-pool-demo.XXXXXX")
# The demo's own database, workspace and logs, whatever the config says.
export CLX_POOL_DB_PATH="$demo_dir/jobs.db"
export CLX_POOL_WORKSPACE_PATH="$demo_dir/workspace"
export CLX_POOL_LOG_DIR="$demo_dir/logs"
mkdir -p "$demo_dir/workspace"
clx() { "$CLX_POOL" "$@" --config "$CONFIG"; }

echo "== clx-pool start --config $CONFIG   (in the background; database, workspace and log in $demo_dir)"
"$CLX_POOL" start --config "$CONFIG" >"$demo_dir/supervisor.log" 2>&1 &
sup=$!
trap 'clx stop >/dev/null 2>&1 || kill "$sup" 2>/dev/null || true' EXIT

echo "== clx-pool wait --ready"
if ! clx wait --ready --timeout 30s; then
  echo "error: the demo pool did not start; its log ($demo_dir/supervisor.log):" >&2
  cat "$demo_dir/supervisor.log" >&2
  exit 1
fi

echo "== clx-pool submit (20 jobs)"
ids=""
for i in $(seq 1 10); do
  printf 'line %s of the clx-pool demo\nsecond line\n' "$i" >"$demo_dir/workspace/note$i.txt"
  ids="$ids $(clx submit upper "note$i.txt" "out/note$i.upper.txt")"
  ids="$ids $(clx submit wordcount "note$i.txt" "out/note$i.wc.txt")"
done

echo "== clx-pool wait --jobs <the 20 ids>"
# shellcheck disable=SC2086
clx wait --jobs $ids --timeout 60s
echo "-- $demo_dir/workspace/out/note1.upper.txt:"
cat "$demo_dir/workspace/out/note1.upper.txt"

echo "== clx-pool stats"
clx stats

echo "== clx-pool stop"
clx stop
wait "$sup"
trap - EXIT
rm -rf "$demo_dir"
echo "demo finished"
