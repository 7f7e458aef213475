#!/usr/bin/env bash
# Builds ngx_http_sluicegate_module.so for the system's nginx, the way Debian builds third-party
# modules: against nginx-dev's configured source tree (/usr/share/nginx/src), with the
# distribution's configure flags (conf_flags) plus --add-dynamic-module, then `make modules`.
#
#   bash integrations/nginx/build.sh        # prints the path of the .so on its last line
#
# Needs: cargo, a C compiler, make, and Debian's nginx-dev (apt-get install nginx nginx-dev).
# NGINX_SRC overrides the source tree; CARGO_TARGET_DIR where cargo builds (default target/).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
src="${NGINX_SRC:-/usr/share/nginx/src}"

if [ ! -f "$src/conf_flags" ] || [ ! -x "$src/configure" ]; then
    echo "build.sh: no nginx source tree at $src (install Debian's nginx-dev: apt-get install nginx-dev)" >&2
    exit 2
fi

# 1. The C library, as a static archive (ffi/Cargo.toml: crate-type includes staticlib).
(cd "$root" && cargo build --release -p sluicegate-ffi)
lib="$CARGO_TARGET_DIR/release/libsluicegate.a"
[ -f "$lib" ] || { echo "build.sh: cargo built no $lib" >&2; exit 1; }

# 2. nginx's configured tree, copied (it is read-only under /usr/share), configured with the
#    distribution's flags plus this module.
out="$CARGO_TARGET_DIR/nginx-module"
build="$out/build"
rm -rf "$build"
mkdir -p "$build"
cp -a "$src/." "$build/"

# conf_flags defines NGX_CONF_FLAGS=( ... ), a bash array.
# shellcheck disable=SC1091
source "$src/conf_flags"

cd "$build"
SLUICEGATE_LIB_DIR="$CARGO_TARGET_DIR/release" \
    ./configure "${NGX_CONF_FLAGS[@]}" --add-dynamic-module="$here" > "$out/configure.log" 2>&1 \
    || { tail -n 40 "$out/configure.log" >&2; echo "build.sh: configure failed (log: $out/configure.log)" >&2; exit 1; }

# Debian's tree writes no top-level Makefile: objs/Makefile has the modules target.
make -j"$(nproc 2>/dev/null || echo 2)" -f objs/Makefile modules > "$out/make.log" 2>&1 \
    || { tail -n 60 "$out/make.log" >&2; echo "build.sh: make modules failed (log: $out/make.log)" >&2; exit 1; }

cp objs/ngx_http_sluicegate_module.so "$out/ngx_http_sluicegate_module.so"
echo "$out/ngx_http_sluicegate_module.so"
