#!/usr/bin/env bash
# Runs the CSI conformance suite (csi-sanity v5.5.0) against `berth csi` for one volume kind.
#
# Usage: scripts/csi-sanity.sh KIND        KIND is one of: dir fs-ext4 fs-xfs block tmpfs
#
# Builds nothing: the binary is $BERTH_BIN (default: the newer of target/release/berth and
# target/debug/berth under $CARGO_TARGET_DIR or ./target). csi-sanity is $CSI_SANITY (default:
# csi-sanity on PATH, else $(go env GOPATH)/bin/csi-sanity). Results go to $SANITY_OUT_DIR/KIND
# (default: TARGET/csi-sanity/KIND): junit.xml, skipped.txt, counts.env, berth.log, csi-sanity.log.
#
# Exits non-zero if a spec failed, a spec was skipped (only the one pending upstream may be),
# berth died or did not stop on SIGTERM, or anything was left behind: volumes, mounts, loop devices or btrfs qgroups while berth was stopped, or mounts and loop devices after
# the teardown.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
# shellcheck source=scripts/teardown.sh
source "$here/teardown.sh"

die() {
    echo "csi-sanity.sh: ERROR: $*" >&2
    exit 1
}

kind=${1:-}
size=67108864 # 64 MiB
access=mount
# Mutable parameters each kind honours (docs/volumes.md); csi-sanity applies them at create and modify.
case $kind in
dir)
    params=$'kind: dir\n'
    mutable=$'compression: zstd\n'
    ;;
fs-ext4)
    params=$'kind: fs\ncsi.storage.k8s.io/fstype: ext4\n'
    mutable=$'readOnly: "false"\n'
    ;;
fs-xfs)
    params=$'kind: fs\ncsi.storage.k8s.io/fstype: xfs\n'
    mutable=$'readOnly: "false"\n'
    size=314572800 # 300 MiB: mkfs.xfs refuses smaller filesystems
    ;;
block)
    params=$'kind: block\n'
    mutable=$'readOnly: "false"\n'
    access=block
    ;;
tmpfs)
    params=$'kind: tmpfs\n'
    mutable=$'inodeLimit: "100000"\n'
    ;;
*) die "usage: $0 dir|fs-ext4|fs-xfs|block|tmpfs" ;;
esac

[[ $(id -u) -eq 0 ]] || die "csi-sanity against berth needs root (mounts, loop devices, btrfs)"

target_dir=${CARGO_TARGET_DIR:-$repo/target}
if [[ -z ${BERTH_BIN:-} ]]; then
    release=$target_dir/release/berth debug=$target_dir/debug/berth
    if [[ -x $release && (! -x $debug || $release -nt $debug) ]]; then
        BERTH_BIN=$release
    else
        BERTH_BIN=$debug
    fi
fi
[[ -x $BERTH_BIN ]] || die "no berth binary at $BERTH_BIN: build it first (cargo build -p berth)"
BERTH_BIN=$(realpath "$BERTH_BIN")

if [[ -z ${CSI_SANITY:-} ]]; then
    if command -v csi-sanity >/dev/null; then
        CSI_SANITY=$(command -v csi-sanity)
    else
        PATH=$PATH:/usr/local/go/bin
        gobin=$(go env GOBIN 2>/dev/null || true)
        [[ -n $gobin ]] || gobin=$(go env GOPATH 2>/dev/null || echo /root/go)/bin
        CSI_SANITY=$gobin/csi-sanity
    fi
fi
[[ -x $CSI_SANITY ]] || die "csi-sanity not found at $CSI_SANITY: run scripts/ci-install.sh"

out=${SANITY_OUT_DIR:-$target_dir/csi-sanity}/$kind
rm -rf "$out"
mkdir -p "$out"
out=$(realpath "$out")

tmp=${TMPDIR:-/tmp}
work=$(mktemp -d "${tmp%/}/berth-sanity-$kind.XXXXXX")
work=$(realpath "$work")
write_owner "$work"
data=$work/data
sock=$work/csi.sock
printf '%s' "$params" >"$work/params.yaml"
# The key external-snapshotter adds with --extra-create-metadata; Berth snapshots take no other.
printf 'csi.storage.k8s.io/volumesnapshot/name: sanity\n' >"$work/snapshot-params.yaml"
printf '%s' "$mutable" >"$work/mutable-params.yaml"

berth_pid=
problems=()

stop_berth() {
    [[ -n $berth_pid ]] || return 0
    if ! kill -0 "$berth_pid" 2>/dev/null; then
        wait "$berth_pid" 2>/dev/null && rc=0 || rc=$?
        problems+=("berth exited during the run (status $rc); see $out/berth.log")
        berth_pid=
        return 0
    fi
    kill -TERM "$berth_pid"
    for _ in $(seq 1 100); do
        kill -0 "$berth_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$berth_pid" 2>/dev/null; then
        problems+=("berth did not exit within 10 s of SIGTERM; killed")
        kill -KILL "$berth_pid" 2>/dev/null || true
    fi
    wait "$berth_pid" 2>/dev/null && rc=0 || rc=$?
    if ((rc != 0)); then
        problems+=("berth exited with status $rc after SIGTERM; see $out/berth.log")
    fi
    berth_pid=
}

cleanup() {
    stop_berth
    if [[ -d $work ]]; then
        if "$BERTH_BIN" teardown --help >/dev/null 2>&1; then
            "$BERTH_BIN" teardown --data-dir "$data" >>"$out/berth.log" 2>&1 ||
                echo "csi-sanity.sh: berth teardown --data-dir $data failed; see $out/berth.log" >&2
        fi
        teardown_dir "$work" || true
        if report_left "$work"; then
            rm -rf --one-file-system -- "$work"
        else
            echo "csi-sanity.sh: leaving $work in place" >&2
            return 1
        fi
    fi
}
on_exit() {
    local rc=$?
    cleanup || rc=1
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# Prints, one per line, what a stopped berth left under the data dir that is not a pool: mounts,
# loop devices, volume files and dirs, and btrfs subvolumes or qgroups. csi-sanity deletes every
# volume it creates, so all of it is a leak. A pool is a loop device whose image lies on no mount
# under the work dir and whose filesystem is mounted there.
leaks_in_data_dir() {
    local mp src dev backing pool entry line id ids inside
    local -A source_of=() pool_dev=()
    local -a pools=()
    while IFS=' ' read -r mp src; do
        source_of[$mp]=$src
    done < <(awk -v dir="$work" '{ split($0, halves, " - "); split(halves[2], tail, " ");
        mp = $5; if (index(mp, dir "/") == 1) print mp, tail[2] }' /proc/self/mountinfo)
    while read -r dev backing; do
        [[ -n $dev ]] || continue
        inside=0
        for mp in "${!source_of[@]}"; do
            [[ $backing == "$mp"/* ]] && inside=1
        done
        if ((inside == 0)); then
            for mp in "${!source_of[@]}"; do
                if [[ ${source_of[$mp]} == "$dev" ]]; then
                    pool_dev[$dev]=1
                    pools+=("$mp")
                fi
            done
        fi
        [[ -n ${pool_dev[$dev]:-} ]] || echo "loop device $dev backed by $backing"
    done < <(loops_under "$work")
    for mp in "${!source_of[@]}"; do
        [[ -n ${pool_dev[${source_of[$mp]}]:-} ]] || echo "mount $mp (from ${source_of[$mp]})"
    done
    shopt -s nullglob
    for entry in "$data"/tmpfs/* "$data"/staged/*; do
        echo "volume leftover $entry"
    done
    for pool in "${pools[@]}"; do
        for entry in "$pool"/images/* "$pool"/volumes/*; do
            echo "volume leftover $entry"
        done
        btrfs filesystem sync "$pool" >/dev/null 2>&1 || true
        btrfs subvolume sync "$pool" >/dev/null 2>&1 || true
        ids=" "
        while read -r line; do
            id=$(awk '{ print $2 }' <<<"$line")
            ids+="$id "
            echo "btrfs subvolume ${line##* path } (id $id) in $pool"
        done < <(btrfs subvolume list "$pool" 2>/dev/null)
        while read -r id; do
            [[ $id == 0/5 ]] && continue
            [[ $ids == *" ${id#0/} "* ]] && continue
            echo "btrfs qgroup $id without a subvolume in $pool"
        done < <(btrfs qgroup show --raw "$pool" 2>/dev/null | awk '$1 ~ /^0\/[0-9]+$/ { print $1 }')
    done
    if ((${#pools[@]} == 0)); then
        echo "no pool filesystem was mounted under $data"
    fi
    shopt -u nullglob
}

echo "=== csi-sanity $kind: $BERTH_BIN, data dir $data"
env -u BERTH_CONFIG -u BERTH_CRASH_AT NO_COLOR=1 "$BERTH_BIN" csi --endpoint "unix://$sock" --node-id "sanity-$kind" --data-dir "$data" \
    --default-pool-size 8589934592 --max-volumes-per-node 8 >"$out/berth.log" 2>&1 &
berth_pid=$!

for _ in $(seq 1 600); do
    [[ -S $sock ]] && break
    kill -0 "$berth_pid" 2>/dev/null || break
    sleep 0.1
done
if [[ ! -S $sock ]]; then
    tail -n 30 "$out/berth.log" >&2 || true
    stop_berth
    die "berth csi did not create $sock within 60 s"
fi

sanity_args=(
    "--csi.endpoint=unix://$sock"
    "--csi.mountdir=$work/mnt"
    "--csi.stagingdir=$work/staging"
    "--csi.testvolumesize=$size"
    "--csi.testvolumeexpandsize=$((2 * size))"
    "--csi.testvolumeparameters=$work/params.yaml"
    "--csi.testsnapshotparameters=$work/snapshot-params.yaml"
    "--csi.testvolumemutableparameters=$work/mutable-params.yaml"
    "--csi.testnodevolumeattachlimit"
    "--csi.testvolumeaccesstype=$access"
    "--ginkgo.junit-report=$out/junit.xml"
    "--ginkgo.timeout=15m"
    "--ginkgo.no-color"
)
sanity_rc=0
timeout --kill-after=30s 20m "$CSI_SANITY" "${sanity_args[@]}" >"$out/csi-sanity.log" 2>&1 || sanity_rc=$?
stop_berth

# This sandbox drops CAP_SYS_RESOURCE even for root, and the kernel needs it to grow a mounted
# ext4 (EXT4_IOC_RESIZE_FS). Berth then answers NodeExpandVolume with FAILED_PRECONDITION and grows
# the filesystem offline at the next stage (tested in crates/berth/tests). Exactly that spec, with
# exactly that message, is accepted and printed as an expected failure; on a host with the
# capability nothing is accepted.
cap_eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
if [[ $kind == fs-ext4 ]] && (((16#$cap_eff >> 24) % 2 == 0)); then
    export SANITY_EXPECTED_FAILURE='NodeExpandVolume should work if node-expand is called after node-publish::FailedPrecondition.*CAP_SYS_RESOURCE|CAP_SYS_RESOURCE'
    export SANITY_EXPECTED_WHY='this host lacks CAP_SYS_RESOURCE, so a mounted ext4 cannot grow'
fi
counts_ok=0 failed=0 expected_failures=0 skipped_other=0
if python3 "$here/sanity-report.py" "$kind" "$out/junit.xml" "$out"; then
    counts_ok=1
    # shellcheck source=/dev/null
    source "$out/counts.env"
    if ((failed > 0)); then
        problems+=("$failed specs failed; full log in $out/csi-sanity.log")
    fi
    if ((skipped_other > 0)); then
        problems+=("$skipped_other specs skipped (only the one pending upstream may be)")
    fi
fi
# csi-sanity exits 1 for an expected failure too; anything else unexplained is a problem.
if ((sanity_rc != 0)) && { ((counts_ok == 0)) || { ((failed == 0)) && ((expected_failures == 0)); }; }; then
    tail -n 40 "$out/csi-sanity.log" >&2 || true
    problems+=("csi-sanity exited with status $sanity_rc")
fi

leaks=$(leaks_in_data_dir)
if [[ -n $leaks ]]; then
    echo "  left behind by berth after csi-sanity deleted its volumes:"
    while IFS= read -r line; do
        echo "    $line"
    done <<<"$leaks"
    problems+=("berth left volumes, mounts, loop devices or qgroups behind")
fi

trap - EXIT
if ! cleanup; then
    problems+=("mounts or loop devices under $work survived the teardown")
fi

if ((${#problems[@]} > 0)); then
    for problem in "${problems[@]}"; do
        echo "csi-sanity $kind: FAILED: $problem"
    done
    exit 1
fi
echo "csi-sanity $kind: OK (nothing left behind)"
