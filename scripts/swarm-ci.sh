#!/usr/bin/env bash
# A two-node Docker Swarm on this machine for the swarm tests: two private
# dockerds (manager on 127.0.0.3, worker on 127.0.0.4), each with its own
# data root, exec root, socket and pid file, so the machine's own engine is
# never touched (notes/swarm.md §8). Needs root and dockerd.
#
#   scripts/swarm-ci.sh up     start both, form the swarm, load the test images
#   scripts/swarm-ci.sh down   leave the swarm, stop both, remove everything
#   scripts/swarm-ci.sh env    print CLX_SWARM_HOST/CLX_SWARM_WORKER for the tests (if up)
#
# Images: IMAGES (default: the test images that exist on the main engine).
set -euo pipefail
R=${CLX_SWARM_ROOT:-/tmp/clx-swarm}
M=unix://$R/m/docker.sock
W=unix://$R/w/docker.sock

up() {
  command -v dockerd >/dev/null || { echo "swarm-ci: no dockerd; the swarm tests will be skipped" >&2; exit 0; }
  [ "$(id -u)" = 0 ] || { echo "swarm-ci: needs root (dockerd); the swarm tests will be skipped" >&2; exit 0; }
  if DOCKER_HOST=$M docker info >/dev/null 2>&1; then
    echo "swarm-ci: already up ($R)"
    return
  fi
  for n in m w; do
    mkdir -p "$R/$n/data" "$R/$n/exec"
    dockerd --data-root "$R/$n/data" --exec-root "$R/$n/exec" -H "unix://$R/$n/docker.sock" \
      --pidfile "$R/$n/docker.pid" --bridge none --iptables=false --ip-masq=false \
      >"$R/$n/dockerd.log" 2>&1 &
  done
  for n in m w; do
    for _ in $(seq 1 150); do
      DOCKER_HOST=unix://$R/$n/docker.sock docker info >/dev/null 2>&1 && break
      sleep 0.2
    done
    DOCKER_HOST=unix://$R/$n/docker.sock docker info >/dev/null 2>&1 ||
      { echo "swarm-ci: dockerd $n did not come up:"; tail -n 30 "$R/$n/dockerd.log"; exit 1; }
  done
  DOCKER_HOST=$M docker swarm init --advertise-addr 127.0.0.3 --listen-addr 127.0.0.3:2377 \
    --data-path-addr 127.0.0.3 >/dev/null
  DOCKER_HOST=$W docker swarm join --token "$(DOCKER_HOST=$M docker swarm join-token -q worker)" \
    --advertise-addr 127.0.0.4 --listen-addr 127.0.0.4:2377 --data-path-addr 127.0.0.4 127.0.0.3:2377 >/dev/null
  local images=${IMAGES:-}
  if [ -z "$images" ]; then
    for i in clx-pool/clm-test:1.35.0 clx-pool/test:0.1.0; do
      docker image inspect "$i" >/dev/null 2>&1 && images="$images $i"
    done
  fi
  if [ -n "$images" ]; then
    # shellcheck disable=SC2086
    docker save $images >"$R/images.tar"
    for n in $M $W; do DOCKER_HOST=$n docker load -q -i "$R/images.tar" >/dev/null; done
    rm -f "$R/images.tar"
  fi
  local i=0
  for id in $(DOCKER_HOST=$M docker node ls -q); do
    i=$((i + 1))
    DOCKER_HOST=$M docker node update --label-add clx-test=1 --label-add "clx-name=node$i" "$id" >/dev/null
  done
  echo "swarm-ci: up: manager $M, worker $W, images:${images:- none}"
}

down() {
  for h in $W $M; do
    DOCKER_HOST=$h docker swarm leave --force >/dev/null 2>&1 || true
  done
  for n in w m; do
    if [ -f "$R/$n/docker.pid" ]; then
      pid=$(cat "$R/$n/docker.pid")
      kill -CONT "$pid" 2>/dev/null || true
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  if [ -d "$R" ]; then
    grep " $R/" /proc/mounts | cut -d' ' -f2 | sort -r | xargs -r umount -l 2>/dev/null || true
    rm -rf "$R"
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env)
    # Only for a swarm that is up: without one the tests skip (or fail under CI).
    if DOCKER_HOST=$M docker info >/dev/null 2>&1; then
      echo "CLX_SWARM_HOST=$M CLX_SWARM_WORKER=$W"
    fi
    ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
