#!/usr/bin/env bash
# Builds Berth as a Docker managed (v2) volume plugin and installs it.
#
# Usage: scripts/docker-managed-plugin.sh [--name NAME] [--dir DIR] [--binary PATH]
#                                        [--pool-size SIZE] [--build-only]
#   --name NAME       plugin name (default berth-managed); volumes use `-d NAME`
#   --dir DIR         where the plugin directory is built (default: a temp dir, removed after
#                     `docker plugin create` copied it)
#   --binary PATH     the berth binary to ship (default: build it; a static musl build when the
#                     x86_64-unknown-linux-musl target is installed, else the glibc build plus the
#                     shared libraries ldd lists)
#   --pool-size SIZE  size of the plugin's default pool image (default 4G; `docker plugin set
#                     NAME args="--default-pool-size 8G"` changes it later)
#   --build-only      build DIR and stop (no docker calls)
# Environment: DOCKER (the docker CLI, default: docker), CARGO_TARGET_DIR.
#
# The plugin directory holds config.json and rootfs/:
# - rootfs: berth, the mkfs/blkid tools the engine runs (with their libraries), busybox;
# - the plugin keeps its data dir at /data/berth, under the propagated mount /data, so the
#   mount points it returns are visible to dockerd (Docker maps them to
#   DATA_ROOT/plugins/ID/propagated-mount/...);
# - loop devices need the host's /dev (bind-mounted) and the device cgroup opened
#   (linux.allowAllDevices): devices made by LOOP_CTL_GET_FREE appear in the host's devtmpfs.
set -euo pipefail

die() {
    echo "docker-managed-plugin: ERROR: $*" >&2
    exit 1
}
say() { echo "docker-managed-plugin: $*"; }

repo=$(cd "$(dirname "$0")/.." && pwd)
name=berth-managed
dir=
binary=
pool_size=4G
build_only=0
while (($# > 0)); do
    case $1 in
    --name) name=${2:?}; shift 2 ;;
    --dir) dir=${2:?}; shift 2 ;;
    --binary) binary=${2:?}; shift 2 ;;
    --pool-size) pool_size=${2:?}; shift 2 ;;
    --build-only) build_only=1; shift ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done
DOCKER=${DOCKER:-docker}

cleanup_dir=
if [[ -z $dir ]]; then
    dir=$(mktemp -d "${TMPDIR:-/tmp}/berth-plugin.XXXXXX")
    ((build_only)) || cleanup_dir=$dir
fi
trap '[[ -n $cleanup_dir ]] && rm -rf "$cleanup_dir"' EXIT

# --- the binary --------------------------------------------------------------------------------
static=0
if [[ -z $binary ]]; then
    target_dir=${CARGO_TARGET_DIR:-$repo/target}
    if command -v rustup >/dev/null && rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
        say "building a static berth (musl)"
        (cd "$repo" && cargo build --release --target x86_64-unknown-linux-musl -p berth) >&2
        binary=$target_dir/x86_64-unknown-linux-musl/release/berth
        static=1
    else
        say "musl target not installed: shipping the glibc build with its libraries"
        (cd "$repo" && cargo build --release -p berth) >&2
        binary=$target_dir/release/berth
    fi
fi
[[ -x $binary ]] || die "$binary is not an executable"

# --- rootfs ------------------------------------------------------------------------------------
rootfs=$dir/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs"/{bin,usr/bin,usr/sbin,etc,dev,proc,sys,tmp,data,run/docker/plugins}
chmod 1777 "$rootfs/tmp"

# Copies a program (following symlinks) and, unless it is static, every library ldd names.
ship() {
    local src=$1 dest=$2 lib
    install -m 0755 "$(readlink -f "$src")" "$rootfs$dest"
    if ldd "$src" >/dev/null 2>&1; then
        while read -r lib; do
            [[ -n $lib && -e $lib ]] || continue
            mkdir -p "$rootfs$(dirname "$lib")"
            cp -L "$lib" "$rootfs$lib"
        done < <(ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
    fi
}

ship "$binary" /usr/bin/berth
if ((static)); then say "berth is static"; fi
# What the engine runs: mkfs for pools and fs volumes, blkid to never format over data, and the
# resize tools for expansion.
for tool in mkfs.ext4 mkfs.xfs mkfs.btrfs blkid resize2fs xfs_growfs; do
    path=$(PATH=/usr/sbin:/sbin:/usr/bin:/bin command -v "$tool" || true)
    if [[ -z $path ]]; then
        case $tool in
        resize2fs | xfs_growfs) say "optional $tool not found; volume expansion in the plugin will be limited" ;;
        *) die "$tool not found (install e2fsprogs, xfsprogs, btrfs-progs, util-linux)" ;;
        esac
        continue
    fi
    ship "$path" "/usr/sbin/$tool"
done
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$rootfs/etc/"
# A shell for `docker plugin` debugging; busybox-static needs no libraries.
if [[ -x /bin/busybox ]]; then
    install -m 0755 /bin/busybox "$rootfs/bin/busybox"
    ln -sf busybox "$rootfs/bin/sh"
fi
printf 'root:x:0:0:root:/:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\n' >"$rootfs/etc/group"

# --- config.json -------------------------------------------------------------------------------
cat >"$dir/config.json" <<EOF
{
  "description": "Berth: volumes with enforced sizes (dir, fs and tmpfs kinds) from Berth's storage engine",
  "documentation": "docs/docker.md in the Berth repository",
  "entrypoint": ["/usr/bin/berth", "docker-plugin", "--socket", "/run/docker/plugins/berth.sock", "--data-dir", "/data/berth"],
  "args": {
    "name": "args",
    "description": "extra berth docker-plugin flags, e.g. --default-pool-size 8G",
    "settable": ["value"],
    "value": ["--default-pool-size", "$pool_size"]
  },
  "env": [
    {"name": "BERTH_LOG", "description": "log filter", "settable": ["value"], "value": "info"},
    {"name": "PATH", "value": "/usr/sbin:/usr/bin:/sbin:/bin"}
  ],
  "interface": {"types": ["docker.volumedriver/1.0"], "socket": "berth.sock"},
  "network": {"type": "none"},
  "propagatedMount": "/data",
  "linux": {
    "capabilities": ["CAP_SYS_ADMIN"],
    "allowAllDevices": true
  },
  "mounts": [
    {"name": "dev", "description": "loop devices", "source": "/dev", "destination": "/dev", "type": "bind", "options": ["rbind"]}
  ],
  "workdir": "/"
}
EOF
say "plugin directory ready: $dir ($(du -sh "$rootfs" | cut -f1) rootfs)"
((build_only)) && exit 0

# --- install -----------------------------------------------------------------------------------
if $DOCKER plugin inspect "$name" >/dev/null 2>&1; then
    say "replacing the installed $name"
    $DOCKER plugin disable -f "$name" >/dev/null 2>&1 || true
    $DOCKER plugin rm -f "$name" >/dev/null
fi
$DOCKER plugin create "$name" "$dir" >/dev/null || die "docker plugin create $name failed"
$DOCKER plugin enable "$name" >/dev/null || die "docker plugin enable $name failed (see the dockerd log)"
say "installed and enabled $name: docker volume create -d $name -o size=1G NAME"
