#!/usr/bin/env bash
# Build the application images into $CACHE_DIR/images/app/, each keyed by a content hash:
#   service     `crucible serve`: this project (wheel built from the checkout's HEAD) [hub,postgres]
#   singleuser  a JupyterHub user server: JupyterLab + this project (with its built
#               labextension) + jupyterhub (jupyterhub-singleuser)
#   hub         jupyterhub + jupyterhub-kubespawner (PyPI), configurable-http-proxy (npm)
# Prints one line per image: NAME ARCHIVE. No image is pulled and no registry host name is
# written anywhere: Python packages come through the host's own pip (its configuration
# chooses the index), npm packages through the host's npm; the images install them offline.
#
# Usage: build-app-images.sh [service|singleuser|hub ...]   (default: all three)
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
REPO=$(cd "$HERE/../.." && pwd)
# shellcheck source=../versions.env
. "$HERE/versions.env"
CACHE_DIR=${CRUCIBLE_CLUSTER_CACHE:-/var/cache/crucible-cluster}
APP=$CACHE_DIR/images/app
WORK=$APP/work
# The host Python that downloads and builds the wheels: same minor version (hence the same
# wheel tags) as the images' Debian python3, so that what it resolves installs there.
PY=${CRUCIBLE_IMAGES_PYTHON:-$REPO/.venv/bin/python}
log() { echo "[build-app-images $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
sha() { sha256sum | cut -c1-16; }
mkdir -p "$APP" "$WORK" "$CACHE_DIR/debs"

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
[ -x "$PY" ] || die "no Python at $PY (run dev/setup, or set CRUCIBLE_IMAGES_PYTHON)"
py_minor=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$py_minor" = "$APP_PYTHON" ] || die "$PY is Python $py_minor; the images' Debian python3 is $APP_PYTHON (set CRUCIBLE_IMAGES_PYTHON to a $APP_PYTHON)"
SCRIPT_HASH=$(cat "$0" "$HERE/lib/mkoci.py" | sha)

# --- base: Debian minbase + python3, venv, tini (shared by the three) -------------------
BASE_REVISION=1   # bump when the base section below changes
BASE=$APP/base-$DEBIAN_SUITE-$(echo "$APP_BASE_PACKAGES $BASE_REVISION" | sha).tar
if [ ! -f "$BASE" ]; then
  mirror=$("$HERE/lib/build-images.sh" --mirror)
  r=$WORK/base-rootfs; rm -rf "$r"
  log "debootstrap $DEBIAN_SUITE ($APP_BASE_PACKAGES)"
  debootstrap --variant=minbase --include="$APP_BASE_PACKAGES" --cache-dir="$CACHE_DIR/debs" \
    "$DEBIAN_SUITE" "$r" "$mirror" > "$WORK/debootstrap-base.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap-base.log" >&2; die "debootstrap failed"; }
  rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/usr/share/doc/* \
         "$r"/usr/share/man/* "$r"/usr/share/locale/* "$r"/var/log/* "$r"/debootstrap
  : > "$r/etc/apt/sources.list"
  : > "$r/etc/resolv.conf"
  img_py=$(chroot "$r" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$img_py" = "$APP_PYTHON" ] || die "Debian $DEBIAN_SUITE has python3 $img_py, versions.env says APP_PYTHON=$APP_PYTHON"
  chroot "$r" python3 -c 'import platform; print(platform.python_version())' > "$BASE.python"
  tar -C "$r" --numeric-owner -cf "$BASE.tmp" . && mv "$BASE.tmp" "$BASE"
  rm -rf "$r"
fi
# Wheels are chosen for the images' exact python3 (Requires-Python checks the patch level:
# Debian's 3.11.2 is older than the host's 3.11.x).
IMG_PYTHON=$(cat "$BASE.python")

# --- this project: a wheel of HEAD, with its labextension built from HEAD's sources --------
# Only committed code goes in (git archive): the working tree may hold others' half-done edits.
project_wheel() {
  [ -n "${WHEEL:-}" ] && return 0
  local src=$WORK/src rev labkey
  rev=$(git -C "$REPO" rev-parse HEAD)
  rm -rf "$src"; mkdir -p "$src"
  git -C "$REPO" archive HEAD | tar -C "$src" -x
  # The labextension, keyed by the tree hash of labextension/ (sources + lock file).
  labkey=$(git -C "$REPO" rev-parse HEAD:labextension)
  local lab=$APP/labextension-$labkey
  if [ ! -f "$lab/package.json" ]; then
    log "building the JupyterLab extension of $rev (npm ci, build:prod)"
    (cd "$src/labextension" && npm ci --no-audit --no-fund -s \
      && PATH="$(dirname "$PY"):$PATH" npm run -s build:prod) > "$WORK/labextension.log" 2>&1 \
      || { tail -30 "$WORK/labextension.log" >&2; die "labextension build failed"; }
    rm -rf "$lab.tmp"; cp -a "$src/crucible_jupyter/labextension" "$lab.tmp"
    rm -rf "$lab"; mv "$lab.tmp" "$lab"
  fi
  rm -rf "$src/crucible_jupyter/labextension" "$src/labextension/node_modules"
  cp -a "$lab" "$src/crucible_jupyter/labextension"
  rm -rf "$WORK/dist"
  log "building the crucible_jupyter wheel of $rev"
  "$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$src" > "$WORK/wheel.log" 2>&1 \
    || { tail -30 "$WORK/wheel.log" >&2; die "wheel build failed"; }
  WHEEL=$(ls "$WORK"/dist/crucible_jupyter-*.whl)
  WHEEL_HASH=$(sha < "$WHEEL")
  rm -rf "$src"
}

# Users: numeric ids in the image config (runAsNonRoot checks them without a passwd lookup).
add_user() { # rootfs name uid gid group home
  local r=$1 name=$2 uid=$3 gid=$4 group=$5 home=$6
  grep -q "^$group:" "$r/etc/group" || echo "$group:x:$gid:" >> "$r/etc/group"
  echo "$name:x:$uid:$gid::$home:/bin/bash" >> "$r/etc/passwd"
  echo "$name:*:19000:0:99999:7:::" >> "$r/etc/shadow"
  mkdir -p "$r$home"; chown "$uid:$gid" "$r$home"
}

# python_image name key "requirements..." : base + /opt/venv with the requirements, installed
# offline from a wheelhouse the host's pip resolved (wheels only). Leaves the rootfs in $R.
python_image() {
  local name=$1 key=$2; shift 2
  local wh=$WORK/wheels-$name
  rm -rf "$wh"; mkdir -p "$wh"
  log "$name: resolving and fetching wheels for Python $IMG_PYTHON ($*)"
  "$PY" -m pip download -q --only-binary=:all: --python-version "$IMG_PYTHON" -d "$wh" \
    --find-links "$WORK/dist" "$@" > "$WORK/$name-pip.log" 2>&1 \
    || { tail -30 "$WORK/$name-pip.log" >&2; die "$name: pip download failed"; }
  if [ -n "${WHEEL:-}" ] && [ ! -f "$wh/$(basename "$WHEEL")" ]; then cp "$WHEEL" "$wh/"; fi
  R=$WORK/rootfs-$name; rm -rf "$R"; mkdir -p "$R"
  tar -C "$R" -xf "$BASE"
  mkdir -p "$R/tmp/wheels"; cp "$wh"/*.whl "$R/tmp/wheels/"
  chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    python3 -m venv /opt/venv
  log "$name: installing $(find "$wh" -name '*.whl' | wc -l) wheels into the image (offline)"
  # (this project by name: the wheelhouse holds its wheel)
  local reqs=() a
  for a in "$@"; do
    case $a in "$WORK"/dist/*) reqs+=("crucible_jupyter${a#*.whl}") ;; *) reqs+=("$a") ;; esac
  done
  chroot "$R" /usr/bin/env -i PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    /opt/venv/bin/pip install -q --no-index --no-cache-dir --disable-pip-version-check \
    --find-links /tmp/wheels "${reqs[@]}" > "$WORK/$name-install.log" 2>&1 \
    || { tail -30 "$WORK/$name-install.log" >&2; die "$name: install failed"; }
  chroot "$R" /opt/venv/bin/pip freeze --all > "$APP/$name-$key.freeze.txt"
  rm -rf "$R/tmp/wheels" "$R/root/.cache" "$wh"
  chmod 1777 "$R/tmp"
}

pack() { # name key image [mkoci args]
  local name=$1 key=$2 image=$3; shift 3
  local out=$APP/$name-$key.tar
  python3 "$HERE/lib/mkoci.py" "$R" "$out" "$image" "$@"
  rm -rf "$R"
  # keep only this key's archive of that image
  find "$APP" -maxdepth 1 -name "$name-*.tar" ! -name "$name-$key.tar" -delete
  find "$APP" -maxdepth 1 -name "$name-*.freeze.txt" ! -name "$name-$key.freeze.txt" -delete
}

VENV_ENV=(--env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
          --env PYTHONUNBUFFERED=1 --env LANG=C.UTF-8)

build_service() {
  project_wheel
  local key; key=$(echo "service $WHEEL_HASH $JUPYTERHUB_VERSION $BASE $SCRIPT_HASH" | sha)
  if [ ! -f "$APP/service-$key.tar" ]; then
    python_image service "$key" "${WHEEL}[hub,postgres]" "jupyterhub==$JUPYTERHUB_VERSION"
    add_user "$R" crucible 1000 1000 crucible /home/crucible
    pack service "$key" "$SERVICE_IMAGE" "${VENV_ENV[@]}" --env HOME=/home/crucible \
      --user 1000:1000 --workdir /home/crucible \
      --entrypoint '["/usr/bin/tini", "-g", "--"]' --cmd crucible serve
  fi
  echo "$SERVICE_IMAGE $APP/service-$key.tar"
}

build_singleuser() {
  project_wheel
  local key; key=$(echo "singleuser $WHEEL_HASH $JUPYTERHUB_VERSION $BASE $SCRIPT_HASH" | sha)
  if [ ! -f "$APP/singleuser-$key.tar" ]; then
    python_image singleuser "$key" "${WHEEL}[lab,hub]" "jupyterhub==$JUPYTERHUB_VERSION"
    # z2jh's convention: jovyan, uid 1000, group users (100), home on the user's volume
    add_user "$R" jovyan 1000 100 users /home/jovyan
    pack singleuser "$key" "$SINGLEUSER_IMAGE" "${VENV_ENV[@]}" --env HOME=/home/jovyan \
      --env NB_USER=jovyan --env SHELL=/bin/bash --user 1000:100 --workdir /home/jovyan \
      --entrypoint '["/usr/bin/tini", "-g", "--"]' --cmd jupyterhub-singleuser
  fi
  echo "$SINGLEUSER_IMAGE $APP/singleuser-$key.tar"
}

build_hub() {
  # Node.js for configurable-http-proxy: Debian bookworm's nodejs is 18, CHP 5.3 needs
  # >= 20, so the image gets the host's node binary (version checked; it needs only libc
  # and libstdc++, both in the base).
  local node node_ver lock_hash key
  node=$(command -v node) || die "no node on the host (configurable-http-proxy needs Node.js >= 20)"
  node_ver=$("$node" --version)
  if ! [[ $node_ver =~ ^v([0-9]+)\. ]] || [ "${BASH_REMATCH[1]}" -lt 20 ]; then
    die "node $node_ver on the host; configurable-http-proxy $CHP_VERSION needs >= 20"
  fi
  lock_hash=$(cat "$REPO/dev/chp/package.json" "$REPO/dev/chp/package-lock.json" | sha)
  key=$(echo "hub $JUPYTERHUB_VERSION $KUBESPAWNER_VERSION $lock_hash $node_ver $BASE $SCRIPT_HASH" | sha)
  if [ ! -f "$APP/hub-$key.tar" ]; then
    local chp=$WORK/chp; rm -rf "$chp"; mkdir -p "$chp"
    cp "$REPO/dev/chp/package.json" "$REPO/dev/chp/package-lock.json" "$chp/"
    log "hub: npm ci (configurable-http-proxy, dev/chp/package-lock.json)"
    (cd "$chp" && npm ci --omit=dev --no-audit --no-fund -s) > "$WORK/chp.log" 2>&1 \
      || { tail -30 "$WORK/chp.log" >&2; die "npm ci failed"; }
    [ "$(cd "$chp" && node -p 'require("configurable-http-proxy/package.json").version')" = "$CHP_VERSION" ] \
      || die "dev/chp/package-lock.json does not hold configurable-http-proxy $CHP_VERSION (versions.env)"
    rm -f "$chp/node_modules/.package-lock.json"   # npm's record of where each package came from
    python_image hub "$key" "jupyterhub==$JUPYTERHUB_VERSION" \
      "jupyterhub-kubespawner==$KUBESPAWNER_VERSION"
    install -m 0755 "$node" "$R/usr/local/bin/node"
    mkdir -p "$R/opt/chp"; cp -a "$chp/node_modules" "$chp/package.json" "$R/opt/chp/"
    ln -s /opt/chp/node_modules/configurable-http-proxy/bin/configurable-http-proxy \
      "$R/usr/local/bin/configurable-http-proxy"
    chroot "$R" /usr/local/bin/configurable-http-proxy --version > /dev/null \
      || die "configurable-http-proxy does not run in the hub image"
    add_user "$R" jovyan 1000 1000 jovyan /home/jovyan
    mkdir -p "$R/srv/jupyterhub"; chown 1000:1000 "$R/srv/jupyterhub"
    rm -rf "$chp"
    pack hub "$key" "$HUB_IMAGE" "${VENV_ENV[@]}" --env HOME=/home/jovyan \
      --user 1000:1000 --workdir /srv/jupyterhub \
      --entrypoint '["/usr/bin/tini", "-g", "--"]' --cmd jupyterhub
  fi
  echo "$HUB_IMAGE $APP/hub-$key.tar"
}

which=("$@"); [ ${#which[@]} -gt 0 ] || which=(service singleuser hub)
for w in "${which[@]}"; do
  case $w in
    service) build_service ;;
    singleuser) build_singleuser ;;
    hub) build_hub ;;
    *) die "unknown image $w (service, singleuser, hub)" ;;
  esac
done
rm -rf "$WORK/dist"
