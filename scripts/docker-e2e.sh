#!/usr/bin/env bash
# End-to-end test of Berth's Docker volume plugin against a real dockerd (Debian's docker.io).
#
# Usage: scripts/docker-e2e.sh [--socket-only | --managed-only] [--keep]
# Environment: BERTH_BIN (a built berth; default: cargo build -p berth), CARGO_TARGET_DIR,
#              POOL_SIZE (each plugin's pool image, default 3G).
#
# Installs docker.io, busybox-static and curl if missing, starts a private dockerd
# (--bridge=none --iptables=false, its data/exec roots and API socket under a temp dir; refuses
# to run next to another dockerd), imports busybox:berth, then runs issue 6's must-show checks
# against the socket plugin (`berth docker-plugin`, driver "berth") and the managed plugin
# (scripts/docker-managed-plugin.sh, driver "berth-managed"):
#   1. size=64M: data is written and read back; writing past 64M fails with "No space left on device"
#   2. two containers share one volume with one backend mount, unmounted only after both are gone
#   3. kill -9 and restart of the plugin under a running container: stop, start, ls, inspect work
#   4. rm of a volume in use is refused; after use it goes, leaving nothing on disk or in mountinfo
#   5. snapshot (berth volume snapshot), change, restore (fromSnapshot=) and compare; the same for a clone (from=)
#   6. (socket plugin) dockerd restarted with --live-restore under a running container
# plus option validation and fast "not found" answers. Prints `docker-e2e: N passed, N failed, N skipped`
# and exits non-zero when a check failed. Stops dockerd and removes everything at the end
# (--keep leaves the temp dir for inspection).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
LIB_PREFIX=docker-e2e
# shellcheck source=scripts/docker-lib.sh
source "$REPO/scripts/docker-lib.sh"

run_socket=1
run_managed=1
keep=0
while (($# > 0)); do
    case $1 in
    --socket-only) run_managed=0 ;;
    --managed-only) run_socket=0 ;;
    --keep) keep=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) lib_die "unknown argument $1" ;;
    esac
    shift
done
[[ $(id -u) -eq 0 ]] || { echo "docker-e2e: SKIP: needs root (dockerd, mounts, loop devices)"; exit 0; }

passed=0
failed=0
skipped=0
pass() {
    passed=$((passed + 1))
    echo "docker-e2e: PASS [$LABEL] $*"
}
fail() {
    failed=$((failed + 1))
    echo "docker-e2e: FAIL [$LABEL] $*"
}
skip() {
    skipped=$((skipped + 1))
    echo "docker-e2e: SKIP [$LABEL] $*"
}
# check DESCRIPTION COMMAND...: passes when COMMAND succeeds.
check() {
    local what=$1
    shift
    if "$@" >/dev/null; then pass "$what"; else fail "$what"; fi
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/berth-docker-e2e.XXXXXX")
cleanup() {
    set +e
    if [[ -n ${DOCKER_HOST:-} ]] && [[ -n ${DOCKERD_PID:-} ]]; then
        $DOCKER ps -aq | xargs -r "$DOCKER" rm -f >/dev/null 2>&1
        remove_managed_plugin
    fi
    stop_socket_plugin
    stop_dockerd
    [[ -d $WORK ]] && bash "$REPO/scripts/teardown.sh" "$WORK" >/dev/null 2>&1
    if ((keep)); then
        echo "docker-e2e: kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# --- helpers ---------------------------------------------------------------------------------
B=busybox:berth

# Number of mounts at exactly PATH in PID's mount namespace.
mounts_at() {
    local pid=$1 path=$2
    awk -v p="$path" '$5 == p { n++ } END { print n + 0 }' "/proc/$pid/mountinfo"
}

# The pid of the plugin under test (it changes when the plugin restarts).
plugin_pid() {
    if [[ $LABEL == socket ]]; then echo "${SOCKET_PID:-}"; else managed_pid; fi
}

# Waits until the plugin answers Docker again (List through `docker volume ls`).
wait_plugin() {
    local _
    for _ in $(seq 1 60); do
        [[ -n $(plugin_pid) ]] && $DOCKER volume ls -q >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    return 1
}

vol() { $DOCKER volume inspect -f "$2" "$1" 2>/dev/null; }

# The data dir of the plugin under test, as a host path.
host_data_dir() {
    if [[ $LABEL == socket ]]; then
        echo "$WORK/berth"
    else
        echo "$WORK/docker-root/plugins/$($DOCKER plugin inspect -f '{{.Id}}' "$MANAGED_NAME")/propagated-mount/berth"
    fi
}

# True when nothing of volume ID is left: no file, no mount (host and plugin), no loop device.
volume_gone() {
    local id=$1 dir leftovers pid
    dir=$(host_data_dir)
    leftovers=$(find "$dir" -name "*$id*" 2>/dev/null)
    [[ -z $leftovers ]] || { echo "  left on disk: $leftovers" >&2; return 1; }
    grep -q "$id" /proc/self/mountinfo && { echo "  left in host mountinfo" >&2; return 1; }
    pid=$(plugin_pid)
    [[ -n $pid ]] && grep -q "$id" "/proc/$pid/mountinfo" && { echo "  left in the plugin's mountinfo" >&2; return 1; }
    grep -qs "$id" /sys/block/loop*/loop/backing_file && { echo "  a loop device still uses it" >&2; return 1; }
    return 0
}

# --- the checks --------------------------------------------------------------------------------
run_checks() {
    local p=e2e-$LABEL
    echo "docker-e2e: --- $LABEL plugin (driver $DRIVER) ---"

    # 1. Enforced size.
    if $DOCKER volume create -d "$DRIVER" -o size=64M "$p-v1" >/dev/null; then
        local out
        out=$($DOCKER run --rm -v "$p-v1:/data" $B sh -c \
            'echo hello >/data/hello && dd if=/dev/zero of=/data/big bs=1M count=100 2>&1; df -k /data' 2>&1)
        check "1: writing past size=64M fails with ENOSPC" grep -q "No space left on device" <<<"$out"
        local written
        written=$($DOCKER run --rm -v "$p-v1:/data" $B sh -c 'cat /data/hello; du -k /data/big | cut -f1' 2>&1)
        check "1: data persists across containers (hello, $(sed -n 2p <<<"$written") KiB written)" \
            test "$(head -1 <<<"$written")" = hello
        check "1: at most 64 MiB could be written" test "$(sed -n 2p <<<"$written")" -le 65536
        # shellcheck disable=SC2016 # expanded by the inner bash
        check "1: inspect shows size and an RFC 3339 CreatedAt" \
            bash -c '[[ $1 == "64 MiB" && $2 =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z$ ]]' _ \
            "$(vol "$p-v1" '{{index .Status "size"}}')" "$(vol "$p-v1" '{{.CreatedAt}}')"
        $DOCKER volume rm "$p-v1" >/dev/null
    else
        fail "1: docker volume create -d $DRIVER -o size=64M"
    fi
    local err
    err=$($DOCKER volume create -d "$DRIVER" -o colour=red "$p-bad" 2>&1)
    check "options: an unknown option is refused, listing the valid ones" grep -q "valid options are size, kind" <<<"$err"
    # Docker asks every volume plugin about an anonymous local volume: Berth must not slow that
    # down (compared with the same run without a volume, so a loaded machine does not matter).
    local t0 t1 t2
    t0=$(date +%s%N)
    $DOCKER run --rm $B true >/dev/null 2>&1
    t1=$(date +%s%N)
    $DOCKER run --rm -v /anon $B true >/dev/null 2>&1
    t2=$(date +%s%N)
    check "names Berth does not own are answered fast (run with an anonymous volume $(((t2 - t1) / 1000000)) ms, without $(((t1 - t0) / 1000000)) ms)" \
        test $(((t2 - t1) / 1000000)) -lt $(((t1 - t0) * 2 / 1000000 + 2000))

    # 2. Two containers, one backend mount.
    $DOCKER volume create -d "$DRIVER" -o size=128M "$p-v2" >/dev/null
    $DOCKER run -d --name "$p-c1" -v "$p-v2:/data" $B sh -c 'echo shared >/data/s; sleep 600' >/dev/null
    $DOCKER run -d --name "$p-c2" -v "$p-v2:/data" $B sleep 600 >/dev/null
    sleep 0.5
    local mp pid
    mp=$(vol "$p-v2" '{{.Mountpoint}}')
    pid=$(plugin_pid)
    check "2: the second container sees the first one's data" \
        test "$($DOCKER exec "$p-c2" cat /data/s 2>&1)" = shared
    check "2: one backend mount for two containers ($mp)" test "$(mounts_at "$pid" "$mp")" = 1
    check "2: inspect counts two mounts" test "$(vol "$p-v2" '{{index .Status "mounts"}}')" = 2
    $DOCKER rm -f "$p-c1" >/dev/null
    check "2: still mounted while the second container runs" test "$(mounts_at "$pid" "$mp")" = 1
    $DOCKER rm -f "$p-c2" >/dev/null
    check "2: unmounted after both are gone" test "$(mounts_at "$pid" "$mp")" = 0
    check "2: inspect shows no mount point when unused" test -z "$(vol "$p-v2" '{{.Mountpoint}}')"
    $DOCKER volume rm "$p-v2" >/dev/null

    # 3. kill -9 and restart of the plugin under a running container.
    $DOCKER volume create -d "$DRIVER" -o size=64M "$p-v3" >/dev/null
    $DOCKER run -d --name "$p-c3" -v "$p-v3:/data" $B sh -c 'date >>/data/starts; sleep 600' >/dev/null
    sleep 0.5
    mp=$(vol "$p-v3" '{{.Mountpoint}}')
    pid=$(plugin_pid)
    kill -9 "$pid"
    if [[ $LABEL == socket ]]; then
        wait "$SOCKET_PID" 2>/dev/null
        start_socket_plugin
    fi
    # Docker restarts a managed plugin that died by itself.
    check "3: the plugin is back after kill -9" wait_plugin
    pid=$(plugin_pid)
    check "3: the volume stayed mounted across the restart" test "$(mounts_at "$pid" "$mp")" = 1
    check "3: docker volume ls lists the volume" bash -c "$DOCKER volume ls -q | grep -qx $p-v3"
    check "3: docker volume inspect works" test "$(vol "$p-v3" '{{index .Status "mounts"}}')" = 1
    check "3: docker stop works" "$DOCKER" stop -t 1 "$p-c3"
    check "3: the backend is unmounted after stop" test "$(mounts_at "$pid" "$mp")" = 0
    check "3: docker start works" "$DOCKER" start "$p-c3"
    sleep 0.5
    check "3: the data survived (two starts recorded)" test "$($DOCKER exec "$p-c3" sh -c 'wc -l </data/starts')" = 2
    $DOCKER rm -f "$p-c3" >/dev/null
    check "3: unmounted after the container is removed" test "$(mounts_at "$pid" "$mp")" = 0
    $DOCKER volume rm "$p-v3" >/dev/null

    # 4. rm of a volume in use; nothing left after removal.
    $DOCKER volume create -d "$DRIVER" -o size=64M "$p-v4" >/dev/null
    local id
    id=$(vol "$p-v4" '{{index .Status "volumeId"}}')
    $DOCKER run -d --name "$p-c4" -v "$p-v4:/data" $B sleep 600 >/dev/null
    check "4: docker volume rm of a volume in use is refused" bash -c "! $DOCKER volume rm $p-v4 >/dev/null 2>&1"
    if [[ $LABEL == socket ]]; then
        err=$(curl -s --unix-socket "$BERTH_SOCKET" -X POST -d "{\"Name\":\"$p-v4\"}" http://p/VolumeDriver.Remove)
        check "4: the plugin itself refuses Remove while mounted" grep -q "in use" <<<"$err"
    fi
    $DOCKER rm -f "$p-c4" >/dev/null
    check "4: docker volume rm works after use" "$DOCKER" volume rm "$p-v4"
    check "4: nothing of volume $id is left on disk, in mountinfo or on a loop device" volume_gone "$id"
    check "4: the plugin no longer lists it" bash -c "! $DOCKER volume ls -q | grep -qx $p-v4"

    # Other kinds serve Docker too.
    local k
    for k in dir tmpfs; do
        $DOCKER volume create -d "$DRIVER" -o kind=$k -o size=32M "$p-$k" >/dev/null
        out=$($DOCKER run --rm -v "$p-$k:/data" $B sh -c 'echo ok >/data/f && cat /data/f' 2>&1)
        check "kind=$k volumes mount and hold data" test "$out" = ok
        check "kind=$k: inspect shows the usage while unmounted" test -n "$(vol "$p-$k" '{{index .Status "usageBytes"}}')"
        $DOCKER volume rm "$p-$k" >/dev/null
    done

    # 5. Clones (and snapshots, once a command makes them for Docker volumes).
    $DOCKER volume create -d "$DRIVER" -o size=64M "$p-v5" >/dev/null
    $DOCKER run --rm -v "$p-v5:/data" $B sh -c 'echo original >/data/f; seq 1 1000 >/data/numbers' >/dev/null
    if $DOCKER volume create -d "$DRIVER" -o from="$p-v5" "$p-clone" >/dev/null; then
        $DOCKER run --rm -v "$p-v5:/data" $B sh -c 'echo changed >/data/f' >/dev/null
        check "5: a clone (from=) holds the source's data as it was" \
            test "$($DOCKER run --rm -v "$p-clone:/data" $B sh -c 'cat /data/f; md5sum </data/numbers')" = \
            "original
$(seq 1 1000 | md5sum)"
        check "5: the source keeps its own changes" \
            test "$($DOCKER run --rm -v "$p-v5:/data" $B cat /data/f)" = changed
        check "5: the clone has the source's kind and size" \
            test "$(vol "$p-clone" '{{index .Status "kind"}} {{index .Status "size"}}')" = "fs 64 MiB"
        $DOCKER volume rm "$p-clone" >/dev/null
    else
        fail "5: docker volume create -o from=$p-v5"
    fi
    err=$($DOCKER volume create -d "$DRIVER" -o fromSnapshot=no-such-snap "$p-restore" 2>&1)
    check "5: a restore from a missing snapshot says so" grep -q "no such snapshot: no-such-snap" <<<"$err"
    # Snapshot, change, restore, compare (berth volume … talks to the plugin's socket).
    local sock=$BERTH_SOCKET snap=$p-snap
    # dockerd keeps managed plugins' sockets under /run/docker/plugins/ID whatever its --exec-root.
    [[ $LABEL == managed ]] &&
        sock=/run/docker/plugins/$($DOCKER plugin inspect -f '{{.Id}}' "$MANAGED_NAME")/berth.sock
    $DOCKER run --rm -v "$p-v5:/data" $B sh -c 'echo before-snapshot >/data/f' >/dev/null
    if "$BERTH_BIN" volume snapshot "$p-v5" "$snap" --socket "$sock" >/dev/null; then
        $DOCKER run --rm -v "$p-v5:/data" $B sh -c 'echo after-snapshot >/data/f; rm /data/numbers' >/dev/null
        check "5: berth volume snapshots lists the snapshot" \
            bash -c "'$BERTH_BIN' volume snapshots '$p-v5' --socket '$sock' | grep -q '^$snap '"
        check "5: inspect shows the snapshot" \
            test "$(vol "$p-v5" '{{index .Status "snapshots"}}')" = "[$snap]"
        if $DOCKER volume create -d "$DRIVER" -o fromSnapshot="$snap" "$p-restore" >/dev/null; then
            check "5: a restore (fromSnapshot=) holds the data as it was at the snapshot" \
                test "$($DOCKER run --rm -v "$p-restore:/data" $B sh -c 'cat /data/f; md5sum </data/numbers')" = \
                "before-snapshot
$(seq 1 1000 | md5sum)"
            check "5: the volume keeps its later changes" \
                test "$($DOCKER run --rm -v "$p-v5:/data" $B sh -c 'cat /data/f; test -e /data/numbers || echo gone')" = \
                "after-snapshot
gone"
            $DOCKER volume rm "$p-restore" >/dev/null
        else
            fail "5: docker volume create -o fromSnapshot=$snap"
        fi
        check "5: berth volume rm-snapshot works" "$BERTH_BIN" volume rm-snapshot "$snap" --socket "$sock"
        check "5: the snapshot is gone" test "$(vol "$p-v5" '{{index .Status "snapshots"}}')" = "[]"
    else
        fail "5: berth volume snapshot $p-v5 $snap"
    fi
    $DOCKER volume rm "$p-v5" >/dev/null
    check "all test volumes are gone" test -z "$($DOCKER volume ls -q | grep "^$p-")"
}

# --- run -------------------------------------------------------------------------------------
install_docker_packages
build_berth
start_dockerd
import_busybox

# 6. dockerd restarted with --live-restore under a running container: the container keeps its
# volume, and Docker's unmount after the restart still takes the backend mount down (the
# plugin's refcount agrees with Docker's).
live_restore_checks() {
    local p=e2e-$LABEL-lr mp pid
    echo "docker-e2e: --- $LABEL plugin across a dockerd --live-restore restart ---"
    stop_dockerd
    DOCKERD_EXTRA=--live-restore start_dockerd
    wait_plugin || true
    $DOCKER volume create -d "$DRIVER" -o size=64M "$p-v6" >/dev/null
    $DOCKER run -d --name "$p-c6" -v "$p-v6:/data" $B sh -c 'while true; do date >>/data/ticks; sleep 0.2; done' >/dev/null
    sleep 0.5
    mp=$(vol "$p-v6" '{{.Mountpoint}}')
    pid=$(plugin_pid)
    stop_dockerd
    check "6: the container runs on while dockerd is down" pgrep -f 'date >>/data/ticks'
    DOCKERD_EXTRA=--live-restore start_dockerd
    check "6: docker sees the container still running" test "$($DOCKER inspect -f '{{.State.Running}}' "$p-c6")" = true
    check "6: the volume stayed mounted across the restart" test "$(mounts_at "$pid" "$mp")" = 1
    local a b
    a=$($DOCKER exec "$p-c6" sh -c 'wc -l </data/ticks')
    sleep 1
    b=$($DOCKER exec "$p-c6" sh -c 'wc -l </data/ticks')
    check "6: the container still writes to it ($a, then $b lines)" test "${b:-0}" -gt "${a:-0}"
    check "6: docker stop works" "$DOCKER" stop -t 1 "$p-c6"
    check "6: the backend is unmounted after stop" test "$(mounts_at "$pid" "$mp")" = 0
    $DOCKER rm -f "$p-c6" >/dev/null
    check "6: docker volume rm works" "$DOCKER" volume rm "$p-v6"
}

if ((run_socket)); then
    LABEL=socket
    DRIVER=berth
    start_socket_plugin
    run_checks
    live_restore_checks
    stop_socket_plugin
    check "no loop device of the socket plugin is left attached" \
        test "$(losetup -n -l -O BACK-FILE 2>/dev/null | grep -c "^$WORK/berth/")" = 0
fi
if ((run_managed)); then
    if ((run_socket)); then
        # dockerd remembers the socket plugin it discovered and keeps retrying it for every
        # volume lookup once it is gone: start afresh (images stay).
        stop_dockerd
        start_dockerd
    fi
    LABEL=managed
    DRIVER=$MANAGED_NAME
    if install_managed_plugin; then
        run_checks
        remove_managed_plugin
        check "no loop device of the managed plugin is left attached ($LEAKED_LOOPS were)" test "$LEAKED_LOOPS" = 0
    else
        fail "installing the managed plugin"
    fi
fi

echo "docker-e2e: $passed passed, $failed failed, $skipped skipped"
((failed == 0))
