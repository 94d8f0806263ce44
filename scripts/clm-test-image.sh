#!/usr/bin/env bash
# Builds the CLM test image without any registry: a Debian root filesystem
# (debootstrap --variant=minbase, a release with Python >= 3.12) from the
# apt mirror this machine already uses, CLM 1.35 from PyPI in a venv, and
# the tests' small CLM worker (tests/fixtures/clm-image), loaded with
# `docker import`. Built once; an image already there is reused.
#
# Usage: scripts/clm-test-image.sh [IMAGE]   (root; needs debootstrap, docker)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${1:-clx-pool/clm-test:1.35.0}
PACKAGE='coding-academy-lecture-manager==1.35.0'
RELEASE=${CLM_IMAGE_RELEASE:-trixie}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE is already built"
  exit 0
fi
for tool in debootstrap docker chroot; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing (apt-get install -y debootstrap docker.io)" >&2; exit 1; }
done

# The first Debian mirror of the machine's apt sources (deb822 or one-line).
mirror() {
  local m
  m=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n 1 || true)
  if [ -z "$m" ]; then
    m=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | grep -i debian | grep -v security | head -n 1 || true)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}
MIRROR=$(mirror)

ROOT=$(mktemp -d /var/tmp/clm-test-root.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
echo "debootstrap $RELEASE from $MIRROR into $ROOT"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$RELEASE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 \
  || { tail -n 30 "$ROOT.log" >&2; echo "error: debootstrap failed (log: $ROOT.log)" >&2; exit 1; }
rm -f "$ROOT.log"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
chroot "$ROOT" python3 -m venv /opt/clm
echo "installing $PACKAGE in the image"
# pip inside trusts what the host trusts (a proxy's CA, say), for the
# install only: the host's bundle stands in for the image's meanwhile.
BUNDLE="$ROOT/etc/ssl/certs/ca-certificates.crt"
cp "$BUNDLE" "$BUNDLE.image"
cat /etc/ssl/certs/ca-certificates.crt >> "$BUNDLE"
chroot "$ROOT" env -u PIP_FIND_LINKS -u PIP_CERT HOME=/root \
  /opt/clm/bin/pip install --quiet --no-cache-dir --disable-pip-version-check "$PACKAGE"
mv "$BUNDLE.image" "$BUNDLE"
mkdir -p "$ROOT/opt/clx-test"
cp tests/fixtures/clm-image/clx_test_worker.py "$ROOT/opt/clx-test/"
chroot "$ROOT" /opt/clm/bin/python -c 'import clm.infrastructure.workers.worker_base, clm.infrastructure.api.client'
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc "$ROOT"/usr/share/man
: > "$ROOT/etc/resolv.conf"

# The image's own user is 1000:1000 (as CLM's images run non-root), so
# `user = "image"` and `user = "auto"` give visibly different owners.
tar -C "$ROOT" --numeric-owner -c . | docker import \
  -c 'ENV PATH=/opt/clm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV HOME=/tmp' \
  -c 'ENV PYTHONDONTWRITEBYTECODE=1' \
  -c 'USER 1000:1000' \
  -c 'ENTRYPOINT ["/opt/clm/bin/python", "/opt/clx-test/clx_test_worker.py"]' \
  -c "LABEL org.clx-pool.clm-package=$PACKAGE" \
  - "$IMAGE" >/dev/null
echo "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
