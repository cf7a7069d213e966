#!/usr/bin/env bash
# Tears down what a Berth test run left under a directory, and checks that nothing is left.
#
# Usage:
#   scripts/teardown.sh DIR       unmount everything under DIR, detach loop devices whose backing file
#                                 is under DIR, verify none remain; exit 1 if something could not go.
#   scripts/teardown.sh --stray   find test dirs of earlier runs (TMPDIR/berth-sanity-*, TMPDIR/berth-e2e-*)
#                                 whose owning process is gone, stop the berth processes that use them,
#                                 tear them down and remove them. Dirs of live runs are left alone.
#   source scripts/teardown.sh    to get the functions (mounts_under, loops_under, teardown_dir, ...).
#
# Never unmounts or detaches anything outside the given directory.
set -euo pipefail

# Prints the mount points (one per line, unescaped) at or below DIR, deepest first.
mounts_under() {
    local dir=${1%/}
    awk '{ print $5 }' /proc/self/mountinfo | while IFS= read -r mp; do
        # mountinfo escapes space, tab, newline and backslash as octal.
        mp=$(printf '%b' "$mp")
        if [[ $mp == "$dir" || $mp == "$dir"/* ]]; then
            printf '%s\n' "$mp"
        fi
    done | sort -r
}

# Prints "DEVICE BACKING_FILE" for every loop device whose backing file is at or below DIR.
loops_under() {
    local dir=${1%/} f dev backing
    for f in /sys/block/loop*/loop/backing_file; do
        [[ -r $f ]] || continue
        backing=$(<"$f") || continue
        backing=${backing% (deleted)}
        if [[ $backing == "$dir"/* ]]; then
            dev=${f#/sys/block/}
            dev=/dev/${dev%%/*}
            printf '%s %s\n' "$dev" "$backing"
        fi
    done
}

# Unmounts everything under DIR (deepest first) and detaches its loop devices, in rounds, because a
# loop device cannot go while its filesystem is mounted and a pool cannot go while its images are
# attached. Returns 0 when nothing is left.
teardown_dir() {
    local dir=${1%/} round mp dev _backing
    for round in 1 2 3 4 5 6; do
        while IFS= read -r mp; do
            [[ -n $mp ]] || continue
            umount "$mp" 2>/dev/null || true
        done < <(mounts_under "$dir")
        while read -r dev _backing; do
            [[ -n $dev ]] || continue
            losetup -d "$dev" 2>/dev/null || true
        done < <(loops_under "$dir")
        if [[ -z $(mounts_under "$dir") && -z $(loops_under "$dir") ]]; then
            return 0
        fi
        sleep "0.$round"
    done
    # Last resort so that the next run is not blocked; still reported as a failure.
    while IFS= read -r mp; do
        [[ -n $mp ]] || continue
        echo "teardown: $mp is busy; detaching it lazily" >&2
        umount -l "$mp" 2>/dev/null || true
    done < <(mounts_under "$dir")
    while read -r dev _backing; do
        [[ -n $dev ]] || continue
        losetup -d "$dev" 2>/dev/null || true
    done < <(loops_under "$dir")
    return 1
}

# Prints what is still mounted or attached under DIR; returns 1 if anything is.
report_left() {
    local dir=${1%/} mounts loops mp
    mounts=$(mounts_under "$dir")
    loops=$(loops_under "$dir")
    if [[ -n $mounts ]]; then
        echo "left mounted under $dir:" >&2
        while IFS= read -r mp; do echo "  $mp" >&2; done <<<"$mounts"
    fi
    if [[ -n $loops ]]; then
        echo "left attached (loop device, backing file) under $dir:" >&2
        while IFS= read -r mp; do echo "  $mp" >&2; done <<<"$loops"
    fi
    [[ -z $mounts && -z $loops ]]
}

# Writes "PID STARTTIME" of PID (default: this shell) to DIR/.owner, so that a later run can tell
# whether the dir still belongs to a live process.
write_owner() {
    local dir=$1 pid=${2:-$$} stat
    stat=$(<"/proc/$pid/stat")
    # Field 22 (start time) counted after the ")" that closes the command name.
    stat=${stat##*) }
    # shellcheck disable=SC2086 # word splitting of the stat fields is intended
    set -- $stat
    printf '%s %s\n' "$pid" "${20}" >"$dir/.owner"
}

# Returns 0 when the process recorded in DIR/.owner is still running.
owner_alive() {
    local dir=$1 pid start stat
    [[ -r $dir/.owner ]] || return 1
    read -r pid start <"$dir/.owner" || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/stat ]] || return 1
    stat=$(<"/proc/$pid/stat") || return 1
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    [[ ${20} == "$start" ]]
}

# PIDs of berth processes whose command line names a path under DIR.
berth_pids_using() {
    local dir=${1%/} p pid exe
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        exe=$(readlink "$p/exe" 2>/dev/null) || continue
        exe=${exe% (deleted)}
        [[ ${exe##*/} == berth ]] || continue
        if tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qF -- "$dir/"; then
            printf '%s\n' "$pid"
        fi
    done
}

# Stops, tears down and removes test dirs left by earlier runs whose owner is gone.
clean_stray() {
    local tmp=${TMPDIR:-/tmp} dir pid ok=0
    tmp=${tmp%/}
    shopt -s nullglob
    for dir in "$tmp"/berth-sanity-* "$tmp"/berth-e2e-*; do
        [[ -d $dir && ! -L $dir ]] || continue
        if owner_alive "$dir"; then
            continue
        fi
        echo "cleaning up stray test dir $dir" >&2
        for pid in $(berth_pids_using "$dir"); do
            echo "  stopping stray berth process $pid" >&2
            kill -TERM "$pid" 2>/dev/null || true
        done
        for _ in $(seq 1 50); do
            [[ -z $(berth_pids_using "$dir") ]] && break
            sleep 0.1
        done
        for pid in $(berth_pids_using "$dir"); do
            kill -KILL "$pid" 2>/dev/null || true
        done
        if teardown_dir "$dir"; then
            rm -rf --one-file-system -- "$dir"
        else
            report_left "$dir" || true
            ok=1
        fi
    done
    shopt -u nullglob
    return "$ok"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    case ${1:-} in
    --stray)
        clean_stray
        ;;
    "" | -h | --help)
        sed -n '2,13p' "$0"
        exit 2
        ;;
    *)
        target=$(realpath -- "$1")
        teardown_dir "$target" || true
        report_left "$target"
        ;;
    esac
fi
