# shellcheck shell=bash disable=SC2154 # m, work, data and the helpers come from controllers-e2e.sh
# Crash safety (issue 5, must-show 4): SIGKILL the server during a burst of 500 dynamic
# provisions and 250 deletions, and again while it recovers; after the last restart every
# surviving claim is Bound, every deleted claim is gone, and the backend volumes in the pool are
# exactly the volumes of the PVs that exist (none leaked, none lost, none made twice).
crash_n=${CRASH_CLAIMS:-500}
{
    cat <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: crash-dir}
provisioner: csi.berth.dev
parameters: {kind: dir}
reclaimPolicy: Delete
YAML
    for i in $(seq 1 "$crash_n"); do
        doomed=no
        if ((i % 2 == 0)); then doomed=yes; fi
        cat <<YAML
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: crash-$i, namespace: default, labels: {crash: "yes", doomed: "$doomed"}}
spec:
  storageClassName: crash-dir
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 8Mi}}
YAML
    done
} >"$m/crash.yaml"

k create -f "$m/crash.yaml" >"$work/crash-create.log" 2>&1 &
creator=$!
sleep 1
k delete pvc -l doomed=yes --wait=false >"$work/crash-delete.log" 2>&1 &
deleter=$!
sleep 1
kill -9 "$server_pid"
wait "$server_pid" 2>/dev/null || true
server_pid=
wait "$creator" 2>/dev/null || true
wait "$deleter" 2>/dev/null || true
bound_before=$(grep -c . "$work/crash-create.log" || true)
echo "   (killed the server mid-burst; $bound_before create answers before the kill)"
start_server
# Finish what the kill interrupted: every claim the burst meant to make, every deletion.
k create -f "$m/crash.yaml" >/dev/null 2>&1 || true
k delete pvc -l doomed=yes --wait=false >/dev/null 2>&1 || true
sleep 1
kill -9 "$server_pid"
wait "$server_pid" 2>/dev/null || true
server_pid=
echo "   (killed it again while it recovered)"
start_server

survivors=$((crash_n - crash_n / 2))
count_bound() { k get pvc -l crash=yes,doomed=no -o 'jsonpath={range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Bound$'; }
eventually "crash: all $survivors surviving claims end Bound" 120 "^$survivors\$" count_bound
count_doomed() { k get pvc -l doomed=yes -o name | wc -l; }
eventually "crash: every deleted claim is gone" 120 '^0$' count_doomed
pv_count() { k get pv -o 'jsonpath={range .items[*]}{.spec.claimRef.name}{"\n"}{end}' | grep -c '^crash-'; }
eventually "crash: exactly one PV per surviving claim" 120 "^$survivors\$" pv_count
# Backend volumes in the pool vs the PVs' handles, for every PV of Berth's driver.
backend_ids() {
    local vols
    vols=$(find "$data/pools" -maxdepth 3 -type d -name volumes -print -quit)
    [[ -n $vols ]] && find "$vols" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort
}
pv_handles() {
    k get pv -o 'jsonpath={range .items[*]}{.spec.csi.driver} {.spec.csi.volumeHandle}{"\n"}{end}' | awk '$1 == "csi.berth.dev" { print $2 }' | sort
}
same_sets() {
    backend_ids >"$work/backend.txt"
    pv_handles >"$work/handles.txt"
    # A handle may carry more than the id (pool or kind); each id must appear in exactly one handle.
    local ids handles matched=0
    ids=$(wc -l <"$work/backend.txt")
    handles=$(wc -l <"$work/handles.txt")
    while read -r id; do
        if grep -q -- "$id" "$work/handles.txt"; then matched=$((matched + 1)); fi
    done <"$work/backend.txt"
    echo "backend=$ids pvs=$handles matched=$matched"
}
eventually "crash: backend volumes are exactly the PVs' volumes (no leak, none lost)" 60 '^backend=([0-9]+) pvs=\1 matched=\1$' same_sets
cat "$work/out"
