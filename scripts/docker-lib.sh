#!/usr/bin/env bash
# Functions shared by docker-e2e.sh and docker-bench.sh: a private dockerd, a busybox image,
# Berth's socket plugin and its managed plugin. Source it; it runs nothing by itself.
#
# Every function works under $WORK (a temp dir the caller made) and sets:
#   DOCKER        the docker CLI of Debian's docker.io (/usr/bin/docker, talking API 1.41)
#   DOCKER_HOST   unix://$WORK/docker.sock, so the machine's own daemon (if any) is never touched
#   SOCKET_PID    the socket plugin's pid, while it runs
# Only processes these functions started are ever signalled, by their pid.

DOCKER=${DOCKER:-/usr/bin/docker}
BERTH_SOCKET=/run/docker/plugins/berth.sock
MANAGED_NAME=${MANAGED_NAME:-berth-managed}
# The managed plugin's command line, as config.json writes it; it tells its process apart.
MANAGED_CMD='berth docker-plugin --socket /run/docker/plugins/berth.sock --data-dir /data/berth'

lib_die() {
    echo "${LIB_PREFIX:-docker}: ERROR: $*" >&2
    exit 1
}
lib_say() { echo "${LIB_PREFIX:-docker}: $*"; }

# Installs Debian's docker.io, busybox-static and curl when missing (idempotent).
install_docker_packages() {
    local pkg missing=()
    for pkg in docker.io busybox-static curl util-linux; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if ((${#missing[@]} > 0)); then
        [[ $(id -u) -eq 0 ]] || lib_die "missing packages ${missing[*]} and not root"
        lib_say "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || lib_die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
            lib_die "apt-get install ${missing[*]} failed"
    fi
    [[ -x $DOCKER ]] || lib_die "$DOCKER missing after installing docker.io"
    command -v dockerd >/dev/null || lib_die "dockerd missing after installing docker.io"
    [[ -x /bin/busybox ]] || lib_die "/bin/busybox missing after installing busybox-static"
}

# Starts a private dockerd under $WORK; refuses if another dockerd runs (two daemons would share
# /run/docker/plugins and fight over containerd). DOCKERD_EXTRA adds flags (--live-restore).
start_dockerd() {
    local other
    other=$(pgrep -x dockerd | head -1 || true)
    [[ -z $other ]] || lib_die "another dockerd (pid $other) is running; stop it first"
    mkdir -p "$WORK/docker-root" "$WORK/docker-exec"
    export DOCKER_HOST=unix://$WORK/docker.sock
    # shellcheck disable=SC2086 # DOCKERD_EXTRA holds flags, one word each
    dockerd --bridge=none --iptables=false --ip6tables=false ${DOCKERD_EXTRA:-} \
        --data-root "$WORK/docker-root" --exec-root "$WORK/docker-exec" \
        --pidfile "$WORK/docker.pid" -H "$DOCKER_HOST" >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    local _
    for _ in $(seq 1 120); do
        if $DOCKER version >/dev/null 2>&1; then
            lib_say "dockerd $($DOCKER version -f '{{.Server.Version}}') up (pid $DOCKERD_PID)"
            return 0
        fi
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    tail -20 "$WORK/dockerd.log" >&2
    lib_die "dockerd did not come up"
}

# Stops the dockerd start_dockerd started (and with it the containerd it spawned).
stop_dockerd() {
    [[ -n ${DOCKERD_PID:-} ]] || return 0
    kill -TERM "$DOCKERD_PID" 2>/dev/null || true
    local _
    for _ in $(seq 1 60); do
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID" 2>/dev/null
    wait "$DOCKERD_PID" 2>/dev/null || true
    DOCKERD_PID=
}

# Imports busybox:berth: /bin/busybox from busybox-static and its applet links.
import_busybox() {
    local root=$WORK/busybox-root applet
    mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev"
    cp /bin/busybox "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/:/bin/sh\n' >"$root/etc/passwd"
    tar -C "$root" -c . | $DOCKER import - busybox:berth >/dev/null || lib_die "docker import failed"
}

# Builds berth (debug) unless BERTH_BIN names one; sets BERTH_BIN.
build_berth() {
    if [[ -z ${BERTH_BIN:-} ]]; then
        local target=${CARGO_TARGET_DIR:-$REPO/target}
        (cd "$REPO" && cargo build -q -p berth) || lib_die "cargo build -p berth failed"
        BERTH_BIN=$target/debug/berth
    fi
    [[ -x $BERTH_BIN ]] || lib_die "$BERTH_BIN is not executable"
}

# Starts `berth docker-plugin` on $BERTH_SOCKET with its data dir under $WORK.
start_socket_plugin() {
    if [[ -S $BERTH_SOCKET ]] && curl -s -m 2 --unix-socket "$BERTH_SOCKET" -X POST http://p/Plugin.Activate >/dev/null; then
        lib_die "a berth plugin already answers on $BERTH_SOCKET; stop it first"
    fi
    "$BERTH_BIN" docker-plugin --socket "$BERTH_SOCKET" --data-dir "$WORK/berth" \
        --default-pool-size "${POOL_SIZE:-3G}" >>"$WORK/plugin.log" 2>&1 &
    SOCKET_PID=$!
    local _
    for _ in $(seq 1 100); do
        curl -s -m 2 --unix-socket "$BERTH_SOCKET" -X POST http://p/Plugin.Activate 2>/dev/null | grep -q VolumeDriver && return 0
        kill -0 "$SOCKET_PID" 2>/dev/null || break
        sleep 0.2
    done
    tail -20 "$WORK/plugin.log" >&2
    lib_die "berth docker-plugin did not answer on $BERTH_SOCKET"
}

# Stops the socket plugin with SIGTERM (mounts stay) and takes its pool off the machine.
stop_socket_plugin() {
    [[ -n ${SOCKET_PID:-} ]] || return 0
    kill -TERM "$SOCKET_PID" 2>/dev/null || true
    wait "$SOCKET_PID" 2>/dev/null || true
    SOCKET_PID=
    [[ -d $WORK/berth ]] && "$BERTH_BIN" teardown --data-dir "$WORK/berth" >/dev/null 2>&1
    return 0
}

# The managed plugin's pid (seen from the host), or nothing.
managed_pid() {
    pgrep -f -- "$MANAGED_CMD" | head -1
}

# Installs the managed plugin from scripts/docker-managed-plugin.sh with $BERTH_BIN.
install_managed_plugin() {
    DOCKER=$DOCKER "$REPO/scripts/docker-managed-plugin.sh" --name "$MANAGED_NAME" --binary "$BERTH_BIN" \
        --dir "$WORK/managed-plugin" --pool-size "${POOL_SIZE:-3G}" >>"$WORK/managed-install.log" 2>&1 ||
        { tail -20 "$WORK/managed-install.log" >&2; lib_say "installing the managed plugin failed"; return 1; }
}

# Unmounts what the managed plugin mounted (from inside its mount and pid namespaces, where its
# paths mean something), then disables and removes it. Loop devices whose backing file lives in
# the plugin's pool image or pool filesystem and that are still attached afterwards are
# detached and counted in LEAKED_LOOPS (matched by device and inode: their paths are
# meaningless outside the mount namespace that attached them).
remove_managed_plugin() {
    LEAKED_LOOPS=0
    $DOCKER plugin inspect "$MANAGED_NAME" >/dev/null 2>&1 || return 0
    local pid id prop pool_img='' pool_fs='' dev ino name
    id=$($DOCKER plugin inspect -f '{{.Id}}' "$MANAGED_NAME")
    prop=$WORK/docker-root/plugins/$id/propagated-mount/berth/pools/default
    [[ -f $prop/pool.img ]] && pool_img=$(stat -c '%Hd:%Ld %i' "$prop/pool.img")
    [[ -d $prop/fs ]] && pool_fs=$(stat -c '%Hd:%Ld' "$prop/fs")
    pid=$(managed_pid)
    if [[ -n $pid ]]; then
        nsenter -t "$pid" -m -p -r -- /usr/bin/berth teardown --data-dir /data/berth >>"$WORK/managed-install.log" 2>&1 ||
            lib_say "teardown inside the managed plugin failed (see $WORK/managed-install.log)"
    fi
    $DOCKER plugin disable -f "$MANAGED_NAME" >/dev/null 2>&1 || true
    while read -r name dev ino; do
        if [[ "$dev $ino" == "$pool_img" || ( -n $pool_fs && $dev == "$pool_fs" ) ]]; then
            lib_say "loop device $name of the managed plugin was left attached; detaching it"
            LEAKED_LOOPS=$((LEAKED_LOOPS + 1))
            losetup -d "$name" 2>/dev/null || true
        fi
    done < <(losetup -n -l -O NAME,BACK-MAJ:MIN,BACK-INO 2>/dev/null)
    $DOCKER plugin rm -f "$MANAGED_NAME" >/dev/null 2>&1 || true
}
