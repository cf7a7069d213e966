#!/usr/bin/env bash
# The storage control plane end to end (issue 5, must-show 2): real kubectl against a real
# all-in-one `berth server` (API, controllers, built-in CSI driver on a loop-mounted pool).
#
# This file starts the server and defines the helpers; each scripts/controllers-e2e.d/*.sh
# section (sourced in name order) drives one capability: static binding, dynamic provisioning,
# reclaim, WaitForFirstConsumer, attach, resize, snapshots, ...
#
# Needs root (the storage engine mounts). Env: BERTH_BIN (default target/debug/berth), KUBECTL
# (default: Debian's kubernetes-client 1.20 unpacked by scripts/ci-install.sh), SECTIONS (a
# regex on section file names; default all). Prints PASS/FAIL lines and
# "controllers-e2e: N passed, N failed"; exits non-zero on any failure, keeping the work dir.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BERTH_BIN=${BERTH_BIN:-$root/target/debug/berth}
KUBECTL=${KUBECTL:-/opt/berth-ci/kubernetes-client/usr/bin/kubectl}
SECTIONS=${SECTIONS:-.}
[[ -x $BERTH_BIN ]] || { echo "controllers-e2e: $BERTH_BIN is not built" >&2; exit 2; }
[[ -x $KUBECTL ]] || { echo "controllers-e2e: no kubectl at $KUBECTL (run scripts/ci-install.sh)" >&2; exit 2; }
((EUID == 0)) || { echo "controllers-e2e: needs root (the storage engine mounts)" >&2; exit 2; }

work=$(mktemp -d /var/tmp/berth-controllers-e2e.XXXXXX)
data=$work/data
passed=0
failed=0
server_pid=

stop_server() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}

cleanup() {
    stop_server
    "$BERTH_BIN" teardown --data-dir "$data" >/dev/null 2>&1 || true
    if ((failed == 0)); then
        rm -rf "$work"
    else
        echo "controllers-e2e: kept $work (server log: $work/server.log)"
    fi
}
trap cleanup EXIT

# shellcheck source=scripts/e2e-lib.sh
source "$root/scripts/e2e-lib.sh"

# start_server: (re)starts berth server on $data (same port each time).
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# shellcheck disable=SC2120 # sections restart it with extra flags
start_server() {
    "$BERTH_BIN" server --data-dir "$data" --listen "127.0.0.1:$port" --default-pool-size 2G \
        --csi-endpoint "unix://$work/csi.sock" --docker-socket "$work/docker.sock" "$@" >>"$work/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 200); do
        if [[ -s $data/admin.kubeconfig ]] && curl -skf "https://127.0.0.1:$port/healthz" >/dev/null 2>&1 \
            && [[ -S $work/csi.sock ]]; then
            return 0
        fi
        sleep 0.1
    done
    echo "controllers-e2e: berth server did not come up" >&2
    tail -n 30 "$work/server.log" >&2
    return 1
}

start_server # no extra flags
export KUBECONFIG=$data/admin.kubeconfig HOME=$work
m=$work/manifests
mkdir -p "$m"
echo "controllers-e2e: $("$KUBECTL" version --client --short 2>/dev/null || "$KUBECTL" version --client 2>/dev/null | head -n 1) against https://127.0.0.1:$port"

for section in "$root"/scripts/controllers-e2e.d/*.sh; do
    name=$(basename "$section" .sh)
    [[ $name =~ $SECTIONS ]] || continue
    echo "== $name"
    # shellcheck source=/dev/null
    source "$section"
done

echo "controllers-e2e: $passed passed, $failed failed"
((failed == 0))
