#!/usr/bin/env bash
# Build the local OCI image archives (pause, executor, executor-ml) into
# $CACHE_DIR/images/rev-N/. Prints that directory. No registry is involved:
# the Debian root filesystems come from the Debian mirror configured for apt.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../versions.env
. "$HERE/versions.env"
CACHE_DIR=${CRUCIBLE_CLUSTER_CACHE:-/var/cache/crucible-cluster}
OUT=$CACHE_DIR/images/rev-$IMAGES_REVISION-$DEBIAN_SUITE
WORK=$CACHE_DIR/images/work
log() { echo "[build-images $(date +%T)] $*" >&2; }

# The Debian mirror apt uses for $DEBIAN_SUITE: /etc/apt/sources.list (one-line
# format), then deb822 files in /etc/apt/sources.list.d/.
debian_mirror() {
  if [ -n "${CRUCIBLE_DEBIAN_MIRROR:-}" ]; then echo "$CRUCIBLE_DEBIAN_MIRROR"; return; fi
  local m=""
  if [ -f /etc/apt/sources.list ]; then
    m=$(awk -v s="$DEBIAN_SUITE" '$1=="deb" { i=2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
          if ($(i+1)==s) { print $i; exit } }' /etc/apt/sources.list)
  fi
  if [ -z "$m" ]; then
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      m=$(awk -v s="$DEBIAN_SUITE" 'BEGIN{RS=""; FS="\n"} {
            uri=""; ok=0; deb=0
            for (i=1;i<=NF;i++) {
              if ($i ~ /^URIs:/)   { split($i,a,/[ \t]+/); uri=a[2] }
              if ($i ~ /^Types:/ && $i ~ /deb( |$)/) deb=1
              if ($i ~ /^Suites:/) { n=split($i,a,/[ \t]+/); for (j=2;j<=n;j++) if (a[j]==s) ok=1 }
            }
            if (ok && deb && uri!="") { print uri; exit } }' "$f")
      [ -n "$m" ] && break
    done
  fi
  for f in /etc/apt/sources.list.d/*.list; do
    [ -n "$m" ] && break
    [ -f "$f" ] || continue
    m=$(awk -v s="$DEBIAN_SUITE" '$1=="deb" && $3==s {print $2; exit}' "$f")
  done
  [ -n "$m" ] || { log "no Debian mirror for $DEBIAN_SUITE found in apt sources"; return 1; }
  echo "$m"
}

# `build-images.sh --mirror`: only print that mirror (build-app-images.sh uses it).
if [ "${1:-}" = "--mirror" ]; then debian_mirror; exit; fi

mkoci() { python3 "$HERE/lib/mkoci.py" "$@"; }

mkdir -p "$OUT" "$WORK" "$CACHE_DIR/debs"

# --- pause -------------------------------------------------------------------
if [ ! -f "$OUT/pause.tar" ]; then
  log "building pause image"
  r=$WORK/pause-rootfs; rm -rf "$r"; mkdir -p "$r"
  gcc -static -Os -s -o "$r/pause" "$HERE/lib/pause.c"
  mkoci "$r" "$OUT/pause.tar" "$PAUSE_IMAGE" --cmd /pause
  rm -rf "$r"
fi

# --- executor images (Debian minbase + python3 [+ numpy]) ---------------------
debootstrap_image() { # <out.tar> <name> <packages,comma,separated>
  local out=$1 name=$2 pkgs=$3 r
  [ -f "$out" ] && return 0
  local mirror; mirror=$(debian_mirror)
  r=$WORK/rootfs-$(basename "$out" .tar)
  rm -rf "$r"
  log "debootstrap $DEBIAN_SUITE ($pkgs) for $name"
  debootstrap --variant=minbase --include="$pkgs" --cache-dir="$CACHE_DIR/debs" \
    "$DEBIAN_SUITE" "$r" "$mirror" > "$WORK/debootstrap-$(basename "$out" .tar).log" 2>&1 || {
      log "debootstrap failed, see $WORK/debootstrap-$(basename "$out" .tar).log"
      tail -20 "$WORK/debootstrap-$(basename "$out" .tar).log" >&2; return 1; }
  # Keep the image small and free of this machine's apt configuration.
  rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/usr/share/doc/* \
         "$r"/usr/share/man/* "$r"/usr/share/locale/* "$r"/var/log/* "$r"/debootstrap
  : > "$r/etc/apt/sources.list"
  echo "executor" > "$r/etc/hostname"
  : > "$r/etc/resolv.conf"
  mkoci "$r" "$out" "$name" --cmd python3 --env PYTHONUNBUFFERED=1 --env LANG=C.UTF-8
  rm -rf "$r"
}
# Sequential on purpose: the second run reuses the .debs cached by the first.
debootstrap_image "$OUT/executor.tar" "$EXECUTOR_IMAGE" python3
debootstrap_image "$OUT/executor-ml.tar" "$EXECUTOR_ML_IMAGE" python3,python3-numpy
echo "$OUT"
