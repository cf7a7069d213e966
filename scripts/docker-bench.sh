#!/usr/bin/env bash
# Benchmarks Berth's Docker volume plugin against Docker's built-in `local` driver, in one run
# on one private dockerd (issue 6, item 6). Prints figures; asserts nothing.
#
# Usage: scripts/docker-bench.sh [-n ITERATIONS]   (default 20)
# Environment: BERTH_BIN (default: cargo build -p berth), CARGO_TARGET_DIR, POOL_SIZE.
#
# Measured, interleaved so both drivers see the same machine state:
#   cycle   `docker volume create` + `docker create -v VOL:/etc` (Docker's copy-up: Mount, copy
#           /etc of the image into the empty volume, Unmount) + `docker rm` + `docker volume rm`:
#           the create, mount, unmount, remove cycle as Docker drives it;
#   start   `docker run --rm -v VOL:/data busybox true` on an existing volume: container start
#           and stop with the volume mounted and unmounted;
#   plugin  the same four calls straight on the plugin socket (curl), without Docker: what
#           Berth itself costs.
# Berth runs with kind=fs (the default: ext4 on a loop device, mkfs at first mount) and kind=dir
# (a btrfs subvolume with a qgroup limit).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
LIB_PREFIX=docker-bench
# shellcheck source=scripts/docker-lib.sh
source "$REPO/scripts/docker-lib.sh"

n=20
while (($# > 0)); do
    case $1 in
    -n) n=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) lib_die "unknown argument $1" ;;
    esac
done
[[ $(id -u) -eq 0 ]] || lib_die "needs root (dockerd, mounts, loop devices)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/berth-docker-bench.XXXXXX")
cleanup() {
    set +e
    [[ -n ${DOCKERD_PID:-} ]] && $DOCKER ps -aq | xargs -r "$DOCKER" rm -f >/dev/null 2>&1
    stop_socket_plugin
    stop_dockerd
    bash "$REPO/scripts/teardown.sh" "$WORK" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

install_docker_packages
build_berth
start_dockerd
import_busybox
start_socket_plugin
B=busybox:berth

now_us() { echo $((${EPOCHREALTIME/./})); }

# Appends the milliseconds COMMAND took (3 decimals) to the file $1.
timed() {
    local out=$1 t0 t1
    shift
    t0=$(now_us)
    "$@" >/dev/null
    t1=$(now_us)
    printf '%d.%03d\n' $(((t1 - t0) / 1000)) $(((t1 - t0) % 1000)) >>"$out"
}

cycle() {
    local driver=$1 name=$2
    shift 2
    $DOCKER volume create -d "$driver" "$@" "$name" >/dev/null
    # /etc exists in the image, so Docker copies it into the empty volume: Mount, copy, Unmount.
    $DOCKER create --name "$name-c" -v "$name:/etc" $B true >/dev/null
    $DOCKER rm "$name-c" >/dev/null
    $DOCKER volume rm "$name" >/dev/null
}

call() {
    local method=$1 body=$2 answer
    answer=$(curl -s --unix-socket "$BERTH_SOCKET" -X POST -d "$body" "http://p/VolumeDriver.$method")
    [[ $answer == *'"Err":""'* ]] || lib_die "$method: $answer"
}

plugin_cycle() {
    local name=$1 kind=$2 id=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
    call Create "{\"Name\":\"$name\",\"Opts\":{\"size\":\"64M\",\"kind\":\"$kind\"}}"
    call Mount "{\"Name\":\"$name\",\"ID\":\"$id\"}"
    call Unmount "{\"Name\":\"$name\",\"ID\":\"$id\"}"
    call Remove "{\"Name\":\"$name\"}"
}

# Median and p90 of a file of numbers.
stats() {
    sort -n "$1" | awk '{ v[NR] = $1 } END { m = v[int((NR + 1) / 2)]; p = v[int(NR * 0.9 + 0.999)]; printf "%.1f %.1f\n", m, p }'
}

lib_say "warming up"
cycle local warm-l
cycle berth warm-b -o size=64M
$DOCKER run --rm $B true

$DOCKER volume create st-local >/dev/null
$DOCKER volume create -d berth -o size=64M st-fs >/dev/null
$DOCKER volume create -d berth -o size=64M -o kind=dir st-dir >/dev/null
lib_say "$n iterations"
for i in $(seq 1 "$n"); do
    timed "$WORK/cycle-local" cycle local "cl-$i"
    timed "$WORK/cycle-fs" cycle berth "cf-$i" -o size=64M
    timed "$WORK/cycle-dir" cycle berth "cd-$i" -o size=64M -o kind=dir
    timed "$WORK/start-local" "$DOCKER" run --rm -v st-local:/data $B true
    timed "$WORK/start-fs" "$DOCKER" run --rm -v st-fs:/data $B true
    timed "$WORK/start-dir" "$DOCKER" run --rm -v st-dir:/data $B true
    timed "$WORK/start-none" "$DOCKER" run --rm $B true
    timed "$WORK/plugin-fs" plugin_cycle "pf-$i" fs
    timed "$WORK/plugin-dir" plugin_cycle "pd-$i" dir
done

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'
}
read -r cl_m cl_p < <(stats "$WORK/cycle-local")
read -r cf_m cf_p < <(stats "$WORK/cycle-fs")
read -r cd_m cd_p < <(stats "$WORK/cycle-dir")
read -r sl_m sl_p < <(stats "$WORK/start-local")
read -r sf_m sf_p < <(stats "$WORK/start-fs")
read -r sd_m sd_p < <(stats "$WORK/start-dir")
read -r sn_m sn_p < <(stats "$WORK/start-none")
read -r pf_m pf_p < <(stats "$WORK/plugin-fs")
read -r pd_m pd_p < <(stats "$WORK/plugin-dir")

echo
echo "docker-bench: $n iterations, dockerd $($DOCKER version -f '{{.Server.Version}}'), $(nproc) cores, kernel $(uname -r)"
printf '%-62s %10s %10s %8s\n' "measure" "median ms" "p90 ms" "vs local"
printf '%-62s %10s %10s %8s\n' "cycle: create+mount+unmount+remove, local driver" "$cl_m" "$cl_p" "1.00x"
printf '%-62s %10s %10s %8s\n' "cycle: create+mount+unmount+remove, berth kind=fs (default)" "$cf_m" "$cf_p" "$(ratio "$cf_m" "$cl_m")"
printf '%-62s %10s %10s %8s\n' "cycle: create+mount+unmount+remove, berth kind=dir" "$cd_m" "$cd_p" "$(ratio "$cd_m" "$cl_m")"
printf '%-62s %10s %10s %8s\n' "container start+stop, local volume" "$sl_m" "$sl_p" "1.00x"
printf '%-62s %10s %10s %8s\n' "container start+stop, berth kind=fs volume" "$sf_m" "$sf_p" "$(ratio "$sf_m" "$sl_m")"
printf '%-62s %10s %10s %8s\n' "container start+stop, berth kind=dir volume" "$sd_m" "$sd_p" "$(ratio "$sd_m" "$sl_m")"
printf '%-62s %10s %10s %8s\n' "container start+stop, no volume" "$sn_m" "$sn_p" "$(ratio "$sn_m" "$sl_m")"
printf '%-62s %10s %10s %8s\n' "plugin socket only: Create+Mount+Unmount+Remove, kind=fs" "$pf_m" "$pf_p" "-"
printf '%-62s %10s %10s %8s\n' "plugin socket only: Create+Mount+Unmount+Remove, kind=dir" "$pd_m" "$pd_p" "-"
