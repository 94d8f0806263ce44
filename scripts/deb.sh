#!/usr/bin/env bash
# Builds the Debian package of clx-pool from a binary already built, with
# dpkg-deb alone: no cargo-deb, no debhelper, nothing that must be compiled
# first. `make deb` passes the release binary; tests/package.rs passes the
# one cargo built for the tests, so the test needs no second build.
#
# The package: /usr/bin/clx-pool, its man pages and bash/zsh/fish
# completions (written by the binary itself, so they always match it), the
# systemd unit template clx-pool@.service (dist/), an example pool for it
# (config/system.toml), README and copyright, and an empty /etc/clx-pool
# for the pools' configs.
#
# Usage: scripts/deb.sh BINARY [OUTDIR]   (OUTDIR: target/deb)
# Prints the path of the .deb it wrote (dpkg-deb's chatter goes to stderr).
# DEB_MAINTAINER overrides the Maintainer field, DEB_XZ_LEVEL (0-9, default
# 6) the compression level.
set -euo pipefail

[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 BINARY [OUTDIR]" >&2; exit 2; }
# Both paths as the caller meant them, before moving to the repository.
bin=$(realpath "$1")
out=$(realpath -m "${2:-target/deb}")
cd "$(dirname "$0")/.."

for tool in dpkg-deb dpkg strip gzip md5sum; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing (apt-get install dpkg-dev)" >&2; exit 1; }
done
[ -x "$bin" ] || { echo "error: $bin is not an executable (build it first: cargo build --release)" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
license=$(sed -n 's/^license = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
# A stale binary would be packaged under the wrong version: refuse it.
have=$("$bin" --version)
[ "$have" = "clx-pool $version" ] || { echo "error: $bin says '$have', Cargo.toml says $version (rebuild it)" >&2; exit 1; }
# Semver's pre-release dash means a Debian revision; a tilde sorts before
# the release as semver does (0.2.0~rc.1 < 0.2.0).
debversion=${version/-/\~}
arch=$(dpkg --print-architecture)
maintainer=${DEB_MAINTAINER:-clx-pool maintainers <maintainers@users.noreply.r-seed-008730bc.example>}
# Timestamps from the last commit, so two builds of one commit are the same
# package (dpkg-deb clamps file times to it; gzip -n leaves names and times out).
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH

umask 022
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# The layout dpkg-shlibdeps expects: the package's tree in debian/<package>,
# with its DEBIAN folder.
root=$stage/debian/clx-pool
mkdir -p "$stage/debian"
mkdir -m 755 "$root"
install -d "$root/DEBIAN"

# Debian strips its binaries (dh_strip); the release build already is, the
# test build loses its debug info here.
install -Dm755 "$bin" "$root/usr/bin/clx-pool"
strip --remove-section=.comment --remove-section=.note --strip-unneeded "$root/usr/bin/clx-pool"

# Man pages: clx-pool.1 and one per command, compressed as Debian wants.
man1=$root/usr/share/man/man1
"$bin" man --out "$stage/man" >/dev/null
install -d "$man1"
install -m644 "$stage"/man/*.1 "$man1/"
gzip -9n "$man1"/*.1

# Completions where each shell looks for those of packages (not /usr/local).
install -d "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
"$bin" completions bash > "$root/usr/share/bash-completion/completions/clx-pool"
"$bin" completions zsh > "$root/usr/share/zsh/vendor-completions/_clx-pool"
"$bin" completions fish > "$root/usr/share/fish/vendor_completions.d/clx-pool.fish"

# The unit under /usr/lib, not /lib: the same folder on merged-/usr systems
# (Debian 12 and later), and the one Debian 13 wants packages to ship into
# (files under /lib are aliases dpkg cannot track).
install -Dm644 "dist/clx-pool@.service" "$root/usr/lib/systemd/system/clx-pool@.service"
install -d "$root/etc/clx-pool"

doc=$root/usr/share/doc/clx-pool
install -Dm644 config/system.toml "$doc/examples/pool.toml"
gzip -9n -c README.md > "$doc/README.md.gz"
chmod 644 "$doc/README.md.gz"
# Debian's machine-readable copyright file, with the license's full text.
case $license in
  MIT) license_text=$(cat <<'EOF'
 Permission is hereby granted, free of charge, to any person obtaining a
 copy of this software and associated documentation files (the "Software"),
 to deal in the Software without restriction, including without limitation
 the rights to use, copy, modify, merge, publish, distribute, sublicense,
 and/or sell copies of the Software, and to permit persons to whom the
 Software is furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included
 in all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS
 OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
 MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.
 IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY
 CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT,
 TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
 SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
EOF
) ;;
  *) echo "error: Cargo.toml's license is '$license'; add its text to $0" >&2; exit 1 ;;
esac
cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: clx-pool

Files: *
Copyright: the clx-pool authors
License: $license
$license_text
EOF
chmod 644 "$doc/copyright"

# Depends: what the binary links against, at the versions its symbols need.
# dpkg-shlibdeps (dpkg-dev) knows every library's package and symbol
# versions; it wants a source package's debian/control, a minimal one does.
depends() {
  local elf=$root/usr/bin/clx-pool
  if command -v dpkg-shlibdeps >/dev/null; then
    printf 'Source: clx-pool\n\nPackage: clx-pool\nArchitecture: any\n' > "$stage/debian/control"
    (cd "$stage" && dpkg-shlibdeps -O debian/clx-pool/usr/bin/clx-pool) | sed -n 's/^shlibs:Depends=//p'
    return
  fi
  # Without it: the libraries the binary needs, and for each the newest
  # symbol version it uses (what dpkg-shlibdeps would derive from glibc's
  # and libgcc's symbol files). Anything else needs dpkg-shlibdeps.
  local lib glibc="" gcc=""
  for lib in $(objdump -p "$elf" | awk '$1 == "NEEDED" { print $2 }'); do
    case $lib in
      libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | libutil.so.1 | ld-linux*.so.*)
        glibc=$(objdump -T "$elf" | grep -o 'GLIBC_[0-9.]*' | sed 's/^GLIBC_//' | sort -uV | tail -n 1) ;;
      libgcc_s.so.1)
        gcc=$(objdump -T "$elf" | grep -o 'GCC_[0-9.]*' | sed 's/^GCC_//' | sort -uV | tail -n 1 | cut -d. -f1-2) ;;
      *) echo "error: the binary needs $lib; install dpkg-dev for dpkg-shlibdeps" >&2; return 1 ;;
    esac
  done
  [ -n "$glibc" ] || { echo "error: no glibc symbol versions found in $elf" >&2; return 1; }
  printf 'libc6 (>= %s)%s\n' "$glibc" "${gcc:+, libgcc-s1 (>= $gcc)}"
}
deps=$(depends)
[ -n "$deps" ] || { echo "error: could not work out the package's Depends" >&2; exit 1; }

(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: clx-pool
Version: $debversion
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $deps
Section: admin
Priority: optional
Description: pool supervisor for CLX and CLM workers
 clx-pool starts the long-lived workers that turn course material
 (notebooks, Draw.io and PlantUML diagrams) into output files, as
 subprocesses, Docker containers or Docker Swarm services sharing one
 SQLite job queue. It replaces workers that die or hang, puts their jobs
 back in the queue, reports on them and stops them cleanly.
 .
 This package ships a systemd unit template, clx-pool@.service, that runs
 the pool of /etc/clx-pool/<instance>.toml.
EOF
chmod 644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb=$out/clx-pool_${debversion}_${arch}.deb
# Owned by root whoever builds it; xz, Debian's default, at its default
# level unless DEB_XZ_LEVEL says (the test's 1: a fifth larger, ten times
# faster).
dpkg-deb --root-owner-group -Zxz -z"${DEB_XZ_LEVEL:-6}" --build "$root" "$deb" >&2
echo "$deb"
