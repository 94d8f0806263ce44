#!/bin/sh
# Builds the test/demo worker image without a registry or a base image: a
# root filesystem holding the statically linked clx-pool binary (entrypoint:
# `clx-pool`, so `worker -- CMD` runs the built-in worker) and a static
# busybox for the shell tools job commands use, loaded with `docker import`.
#
# usage: scripts/docker-image.sh STATIC_BINARY TAG
set -eu
bin=$1
tag=$2
busybox=${BUSYBOX:-/bin/busybox}
if ! ldd "$bin" 2>&1 | grep -q -e 'statically linked' -e 'not a dynamic executable'; then
  echo "error: $bin is not statically linked (build it with RUSTFLAGS='-C target-feature=+crt-static')" >&2
  exit 1
fi
if [ ! -x "$busybox" ]; then
  echo "error: $busybox not found; install it with: apt-get install busybox-static" >&2
  exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp" "$root/db" "$root/workspace"
chmod 1777 "$root/tmp"
cp "$bin" "$root/clx-pool"
cp "$busybox" "$root/bin/busybox"
for applet in sh cat cp mv rm mkdir touch echo printf tr wc head tail sleep true false ls dd sed grep seq env; do
  ln -s busybox "$root/bin/$applet"
done
tar -C "$root" -cf "$root.tar" .
docker import -c 'ENTRYPOINT ["/clx-pool"]' -c 'ENV PATH=/bin' "$root.tar" "$tag" >/dev/null
rm -f "$root.tar"
echo "built $tag"
