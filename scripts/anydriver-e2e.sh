#!/usr/bin/env bash
# "Any driver" end to end (issue 5, must-show 3): the same provisioning and attach flow as
# scripts/controllers-e2e.sh, through real kubectl against a real `berth server`, but with a CSI
# driver Berth did not write: Google's GCE Persistent Disk driver (pd.csi.storage.gke.io,
# v1.28.1 from the Go module proxy) served by scripts/gce-pd-driver on the driver's own
# in-memory GCE (see its main.go for what is fake). `berth server --csi-driver` takes it.
#
# Checks: registration (CSIDriver, CSINode, the Node's zone label); Immediate provisioning
# (pvc-<uid>, the driver's volume handle and zone affinity, the disk really in the driver);
# an error of the driver's own reaching the claim; attach and detach (VolumeAttachment
# csi-<sha256>, the disk attached to the instance in the driver); expansion; a snapshot and a
# claim restored from it; WaitForFirstConsumer; reclaim Delete and Retain. What the driver holds
# is asked of the driver itself, through CSI (`gce-pd-fake-csi volumes|snapshots`: ListVolumes,
# ListSnapshots); what it was asked is read from its call log.
#
# Needs root (the built-in engine's pool is a loop mount). Env: BERTH_BIN (default
# target/debug/berth), KUBECTL (default: Debian's kubernetes-client 1.20 unpacked by
# scripts/ci-install.sh), GCE_PD_CSI (default /opt/berth-ci/gce-pd-driver/gce-pd-fake-csi,
# built by scripts/ci-install.sh). Prints PASS/FAIL lines and "anydriver-e2e: N passed, N
# failed"; exits non-zero on any failure, keeping the work dir.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BERTH_BIN=${BERTH_BIN:-$root/target/debug/berth}
KUBECTL=${KUBECTL:-/opt/berth-ci/kubernetes-client/usr/bin/kubectl}
GCE_PD_CSI=${GCE_PD_CSI:-/opt/berth-ci/gce-pd-driver/gce-pd-fake-csi}
[[ -x $BERTH_BIN ]] || { echo "anydriver-e2e: $BERTH_BIN is not built" >&2; exit 2; }
[[ -x $KUBECTL ]] || { echo "anydriver-e2e: no kubectl at $KUBECTL (run scripts/ci-install.sh)" >&2; exit 2; }
[[ -x $GCE_PD_CSI ]] || { echo "anydriver-e2e: no GCE PD driver at $GCE_PD_CSI (run scripts/ci-install.sh)" >&2; exit 2; }
((EUID == 0)) || { echo "anydriver-e2e: needs root (the storage engine mounts)" >&2; exit 2; }

work=$(mktemp -d /var/tmp/berth-anydriver-e2e.XXXXXX)
data=$work/data
passed=0
failed=0
server_pid=
driver_pid=

# stop PID: SIGTERM, then wait for it.
stop() {
    if [[ -n $1 ]]; then
        kill "$1" 2>/dev/null || true
        wait "$1" 2>/dev/null || true
    fi
}
cleanup() {
    stop "$server_pid"
    stop "$driver_pid"
    "$BERTH_BIN" teardown --data-dir "$data" >/dev/null 2>&1 || true
    if ((failed == 0)); then
        rm -rf "$work"
    else
        echo "anydriver-e2e: kept $work (server log: $work/server.log, driver log: $work/driver.log)"
    fi
}
trap cleanup EXIT

# shellcheck source=scripts/e2e-lib.sh
source "$root/scripts/e2e-lib.sh"

driver=pd.csi.storage.gke.io
project=berth-ci
zone=ci-central1-a
# The Node is named by Berth's own driver (its node id is the host name); the GCE driver's node
# id for it names the fake instance of the same name.
node=$(uname -n)
node_id=projects/$project/zones/$zone/instances/$node
sock=$work/gce.sock
# disks / snapshots: what the driver holds, asked through CSI (ListVolumes / ListSnapshots):
# "HANDLE NODE_ID,..." ("-" when attached nowhere) / "SNAPSHOT_ID SOURCE_VOLUME READY".
disks() { "$GCE_PD_CSI" volumes -endpoint "unix://$sock"; }
snapshots() { "$GCE_PD_CSI" snapshots -endpoint "unix://$sock"; }
# calls: the driver's call log ("METHOD ARGS -> OK ..." or "-> error CODE: ...").
calls() { grep -F ' /csi.v1.' "$work/driver.log"; }

"$GCE_PD_CSI" serve -endpoint "unix://$sock" -project "$project" -zone "$zone" -instance "$node" >"$work/driver.log" 2>&1 &
driver_pid=$!
for _ in $(seq 1 100); do [[ -S $sock ]] && break; sleep 0.1; done
[[ -S $sock ]] || { echo "anydriver-e2e: the GCE PD driver did not come up" >&2; cat "$work/driver.log" >&2; failed=1; exit 1; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BERTH_BIN" server --data-dir "$data" --listen "127.0.0.1:$port" --default-pool-size 1G \
    --csi-endpoint "unix://$work/csi.sock" --docker-socket "$work/docker.sock" \
    --csi-driver "unix://$sock" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 200); do
    if [[ -s $data/admin.kubeconfig ]] && curl -skf "https://127.0.0.1:$port/healthz" >/dev/null 2>&1; then break; fi
    sleep 0.1
done
export KUBECONFIG=$data/admin.kubeconfig HOME=$work
m=$work/manifests
mkdir -p "$m"
echo "anydriver-e2e: $driver $("$GCE_PD_CSI" version) (fake GCE) and $("$KUBECTL" version --client --short 2>/dev/null || "$KUBECTL" version --client 2>/dev/null | head -n 1) against https://127.0.0.1:$port"

# --- Registration ---------------------------------------------------------------------------------
echo "== registration"
eventually "registration: CSIDriver $driver: attach required (PUBLISH_UNPUBLISH_VOLUME), no capacity (no GET_CAPACITY), persistent" 20 \
    '^true false Persistent$' jp "csidriver/$driver" '{.spec.attachRequired} {.spec.storageCapacity} {.spec.volumeLifecycleModes[*]}'
eventually "registration: the CSINode lists the driver with its node id, zone key and volume limit" 20 \
    "^$node_id topology.gke.io/zone 127\$" \
    jp "csinode/$node" "{.spec.drivers[?(@.name==\"$driver\")].nodeID} {.spec.drivers[?(@.name==\"$driver\")].topologyKeys[*]} {.spec.drivers[?(@.name==\"$driver\")].allocatable.count}"
expect "registration: ... next to Berth's own driver" "^csi.berth.dev $driver\$" jp "csinode/$node" '{.spec.drivers[*].name}'
eventually "registration: the Node carries the driver's topology label" 10 "^$zone\$" jp "node/$node" '{.metadata.labels.topology\.gke\.io/zone}'
expect "registration: the driver answered NodeGetInfo with that node id and zone" \
    "NodeGetInfo  -> OK node=$node_id max_volumes=127 topology=\[topology.gke.io/zone=$zone\]" calls

# --- Immediate provisioning ---------------------------------------------------------------------------
echo "== provision"
cat >"$m/classes.yaml" <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: pd-immediate}
provisioner: $driver
parameters: {type: pd-balanced}
reclaimPolicy: Delete
volumeBindingMode: Immediate
allowVolumeExpansion: true
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: pd-retain}
provisioner: $driver
parameters: {type: pd-standard}
reclaimPolicy: Retain
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: pd-claim, namespace: default}
spec:
  storageClassName: pd-immediate
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 10Gi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: pd-keep, namespace: default}
spec:
  storageClassName: pd-retain
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 10Gi}}
YAML
expect "provision: classes and claims created" 'pd-keep created' k apply -f "$m/classes.yaml"
eventually "provision: the Immediate claim ends Bound" 20 '^Bound$' jp pvc/pd-claim '{.status.phase}'
uid=$(jp pvc/pd-claim '{.metadata.uid}')
pv=pvc-$uid
handle=projects/$project/zones/$zone/disks/$pv
expect "provision: its volume is pvc-<claim uid>" "^$pv\$" jp pvc/pd-claim '{.spec.volumeName}'
expect "provision: the PV's CSI source: the driver and its handle projects/P/zones/Z/disks/pvc-<uid>" "^$driver $handle\$" \
    jp "pv/$pv" '{.spec.csi.driver} {.spec.csi.volumeHandle}'
expect "provision: the PV is pinned to the disk's zone" "^topology.gke.io/zone In $zone\$" \
    jp "pv/$pv" '{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].key} {.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].operator} {.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[*]}'
expect "provision: capacity, reclaim policy, claimRef and class" "^10Gi Delete pd-claim $uid pd-immediate\$" \
    jp "pv/$pv" '{.spec.capacity.storage} {.spec.persistentVolumeReclaimPolicy} {.spec.claimRef.name} {.spec.claimRef.uid} {.spec.storageClassName}'
expect "provision: the PV says who provisioned it" "^$driver\$" jp "pv/$pv" '{.metadata.annotations.pv\.kubernetes\.io/provisioned-by}'
expect "provision: the PV records the provisioner's identity, <start ms>-<random>-<driver>" "^[0-9]{13}-[0-9]{1,4}-$driver\$" \
    jp "pv/$pv" '{.spec.csi.volumeAttributes.storage\.kubernetes\.io/csiProvisionerIdentity}'
expect "provision: ProvisioningSucceeded recorded" "ProvisioningSucceeded.*Successfully provisioned volume $pv" \
    k get events --field-selector involvedObject.name=pd-claim
expect "provision: the driver got CreateVolume pvc-<uid>, 10Gi, with the node's zone as requisite topology" \
    "CreateVolume name=$pv bytes=10737418240 requisite=\[topology.gke.io/zone=$zone\] -> OK volume=$handle" calls
expect "provision: the disk exists in the driver (ListVolumes), attached nowhere" "^$handle -\$" disks
eventually "provision: the Retain claim is Bound" 20 '^Bound$' jp pvc/pd-keep '{.status.phase}'
keep_pv=$(jp pvc/pd-keep '{.spec.volumeName}')
keep_handle=projects/$project/zones/$zone/disks/$keep_pv
expect "provision: ... its PV keeps Retain and the driver's handle" "^Retain $keep_handle\$" \
    jp "pv/$keep_pv" '{.spec.persistentVolumeReclaimPolicy} {.spec.csi.volumeHandle}'

# The driver's own refusal reaches the claim: a parameter the GCE PD driver does not know.
cat >"$m/bad.yaml" <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: pd-bad}
provisioner: $driver
parameters: {type: pd-balanced, no-such-option: "1"}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: pd-bad, namespace: default}
spec:
  storageClassName: pd-bad
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 10Gi}}
YAML
expect "provision: a class with a parameter the driver refuses, and a claim" 'pd-bad created' k apply -f "$m/bad.yaml"
eventually "provision: ProvisioningFailed carries the driver's InvalidArgument" 20 \
    'ProvisioningFailed.*InvalidArgument.*parameters contains invalid option .*no-such-option' k get events --field-selector involvedObject.name=pd-bad
bad_uid=$(jp pvc/pd-bad '{.metadata.uid}')
expect "provision: ... the claim stays Pending" '^Pending$' jp pvc/pd-bad '{.status.phase}'
expect_no "provision: ... and no disk was made for it" "pvc-$bad_uid" disks
expect "provision: clean up the refused claim" 'deleted' k delete pvc pd-bad --wait=false
gone "provision: ... it goes (no volume to delete)" 20 pvc/pd-bad

# --- Attach and detach ----------------------------------------------------------------------------
echo "== attach"
cat >"$m/pod.yaml" <<YAML
apiVersion: v1
kind: Pod
metadata: {name: pd-user, namespace: default}
spec:
  nodeName: $node
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: pd-claim}}]
YAML
va=csi-$(printf %s "$handle$driver$node" | sha256sum | cut -d' ' -f1)
expect "attach: a pod on $node uses the claim" 'pd-user created' k apply -f "$m/pod.yaml"
eventually "attach: VolumeAttachment csi-<sha256(handle+driver+node)> appears" 20 "^$driver $node $pv\$" \
    jp "volumeattachment/$va" '{.spec.attacher} {.spec.nodeName} {.spec.source.persistentVolumeName}'
eventually "attach: ControllerPublishVolume succeeded: status.attached is true" 20 '^true$' jp "volumeattachment/$va" '{.status.attached}'
expect "attach: it was published to the driver's node id" "^$node_id\$" jp "volumeattachment/$va" '{.metadata.annotations.csi\.alpha\.kubernetes\.io/node-id}'
expect "attach: the attachment and the volume carry external-attacher's finalizer" \
    '^\["external-attacher/pd-csi-storage-gke-io"\] .*external-attacher/pd-csi-storage-gke-io' \
    bash -c "$KUBECTL get volumeattachment $va -o jsonpath='{.metadata.finalizers}'; echo -n ' '; $KUBECTL get pv $pv -o jsonpath='{.metadata.finalizers}'"
expect "attach: the driver got ControllerPublishVolume for the disk and the instance" \
    "ControllerPublishVolume volume=$handle node=$node_id -> OK" calls
expect "attach: the disk is attached to the instance in the driver (ListVolumes published nodes)" "^$handle $node_id\$" disks
eventually "attach: the pod's event says the attach succeeded" 10 "SuccessfulAttachVolume.*AttachVolume.Attach succeeded for volume \"$pv\"" \
    k get events --field-selector involvedObject.name=pd-user
expect "attach: delete the pod" 'deleted' k delete pod pd-user
gone "attach: the attachment is deleted" 20 "volumeattachment/$va"
expect "attach: the driver got ControllerUnpublishVolume" "ControllerUnpublishVolume volume=$handle node=$node_id -> OK" calls
expect "attach: the disk is detached in the driver" "^$handle -\$" disks
# As external-attacher: the volume's finalizer goes only when the volume is deleted and no
# attachment names it (see "reclaim: Delete: the PV is deleted" below).
expect "attach: the volume keeps the attacher's finalizer until it is deleted" 'external-attacher/pd-csi-storage-gke-io' \
    jp "pv/$pv" '{.metadata.finalizers}'

# --- Expansion --------------------------------------------------------------------------------------
# The driver grows the disk and asks for the node step (node_expansion_required), which needs a
# kubelet: the claim waits in FileSystemResizePending, as in Kubernetes.
echo "== expand"
expect "expand: ask for 12Gi" 'patched' k patch pvc pd-claim -p '{"spec":{"resources":{"requests":{"storage":"12Gi"}}}}'
eventually "expand: the PV grows to 12Gi" 20 '^12Gi$' jp "pv/$pv" '{.spec.capacity.storage}'
expect "expand: the driver resized the disk and asked for the node step" \
    "ControllerExpandVolume volume=$handle bytes=12884901888 -> OK bytes=12884901888 node_expansion_required=true" calls
eventually "expand: the claim waits for the node: FileSystemResizePending, NodeResizePending, capacity still 10Gi" 10 \
    '^True NodeResizePending 10Gi 12Gi$' \
    jp pvc/pd-claim '{.status.conditions[?(@.type=="FileSystemResizePending")].status} {.status.allocatedResourceStatuses.storage} {.status.capacity.storage} {.status.allocatedResources.storage}'

# --- Snapshot and restore -----------------------------------------------------------------------------
echo "== snapshot"
cat >"$m/snap.yaml" <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata: {name: pd-snapshots}
driver: $driver
deletionPolicy: Delete
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: pd-snap, namespace: default}
spec:
  volumeSnapshotClassName: pd-snapshots
  source: {persistentVolumeClaimName: pd-claim}
YAML
expect "snapshot: a class and a snapshot of the claim" 'pd-snap created' k apply -f "$m/snap.yaml"
eventually "snapshot: it becomes readyToUse" 20 '^true$' jp volumesnapshot/pd-snap '{.status.readyToUse}'
snap_uid=$(jp volumesnapshot/pd-snap '{.metadata.uid}')
content=snapcontent-$snap_uid
snap_handle=projects/$project/global/snapshots/snapshot-$snap_uid
expect "snapshot: the content has the driver's snapshot id and the source disk" "^true $driver $snap_handle $handle\$" \
    jp "volumesnapshotcontent/$content" '{.status.readyToUse} {.spec.driver} {.status.snapshotHandle} {.spec.source.volumeHandle}'
# The fake cloud reports a new snapshot UPLOADING, then READY: the snapshotter must ask again.
# ready_answers: what CreateSnapshot answered for it, in order.
ready_answers() { calls | grep -F "CreateSnapshot name=snapshot-$snap_uid source=$handle -> OK snapshot=$snap_handle " | sed -E 's/.* ready=//' | tr '\n' ' '; }
expect "snapshot: CreateSnapshot was repeated until the driver said ready" '^false (false )*true $' ready_answers
expect "snapshot: the driver lists it, cut from the disk" "^$snap_handle $handle true\$" snapshots
cat >"$m/restore.yaml" <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: pd-restored, namespace: default}
spec:
  storageClassName: pd-immediate
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 10Gi}}
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: pd-snap}
YAML
expect "snapshot: a claim restored from it" 'pd-restored created' k apply -f "$m/restore.yaml"
eventually "snapshot: the restored claim is Bound" 20 '^Bound$' jp pvc/pd-restored '{.status.phase}'
restored_pv=$(jp pvc/pd-restored '{.spec.volumeName}')
restored_handle=projects/$project/zones/$zone/disks/$restored_pv
expect "snapshot: CreateVolume carried the snapshot as its source" "CreateVolume name=$restored_pv .*from-snapshot=$snap_handle -> OK" calls
expect "snapshot: the restored disk exists in the driver" "^$restored_handle -\$" disks
expect "snapshot: delete the restored claim" 'deleted' k delete pvc pd-restored --wait=false
gone "snapshot: ... its PV goes" 20 "pv/$restored_pv"
expect_no "snapshot: ... and its disk" "^$restored_handle " disks
expect "snapshot: delete the snapshot" 'deleted' k delete volumesnapshot pd-snap --wait=false
gone "snapshot: the content goes (Delete policy)" 20 "volumesnapshotcontent/$content"
expect "snapshot: the driver got DeleteSnapshot" "DeleteSnapshot snapshot=$snap_handle -> OK" calls
expect_no "snapshot: the driver no longer lists it" "$snap_handle" snapshots

# --- WaitForFirstConsumer -------------------------------------------------------------------------
echo "== wait for first consumer"
cat >"$m/wffc.yaml" <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: pd-wffc}
provisioner: $driver
parameters: {type: pd-balanced}
reclaimPolicy: Delete
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: pd-wffc, namespace: default}
spec:
  storageClassName: pd-wffc
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 10Gi}}
YAML
cat >"$m/wffc-pod.yaml" <<YAML
apiVersion: v1
kind: Pod
metadata: {name: pd-wffc-user, namespace: default}
spec:
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: pd-wffc}}]
YAML
expect "wffc: class and claim created" 'pd-wffc created' k apply -f "$m/wffc.yaml"
wuid=$(jp pvc/pd-wffc '{.metadata.uid}')
wpv=pvc-$wuid
whandle=projects/$project/zones/$zone/disks/$wpv
stays "wffc: the claim stays Pending while no pod uses it" 3 '^Pending$' jp pvc/pd-wffc '{.status.phase}'
expect "wffc: ... with Kubernetes' WaitForFirstConsumer event" 'WaitForFirstConsumer.*waiting for first consumer to be created before binding' \
    k get events --field-selector involvedObject.name=pd-wffc
expect_no "wffc: ... and no disk in the driver yet" "$wpv" disks
expect "wffc: a pod without a node uses it" 'pd-wffc-user created' k apply -f "$m/wffc-pod.yaml"
eventually "wffc: the pod is scheduled to $node" 20 "^$node\$" jp pod/pd-wffc-user '{.spec.nodeName}'
eventually "wffc: the claim binds to pvc-<uid>" 20 "^Bound $wpv\$" jp pvc/pd-wffc '{.status.phase} {.spec.volumeName}'
expect "wffc: the claim carries the selected node" "^$node\$" jp pvc/pd-wffc '{.metadata.annotations.volume\.kubernetes\.io/selected-node}'
expect "wffc: CreateVolume asked for the selected node's zone" "CreateVolume name=$wpv bytes=10737418240 requisite=\[topology.gke.io/zone=$zone\] -> OK volume=$whandle" calls
expect "wffc: the PV is pinned to the zone" "^topology.gke.io/zone $zone\$" \
    jp "pv/$wpv" '{.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].key} {.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[*]}'
wva=csi-$(printf %s "$whandle$driver$node" | sha256sum | cut -d' ' -f1)
eventually "wffc: the volume is attached for the pod" 20 '^true$' jp "volumeattachment/$wva" '{.status.attached}'
eventually "wffc: ... and the disk is attached to the instance in the driver" 10 "^$whandle $node_id\$" disks
expect "wffc: delete the pod" 'deleted' k delete pod pd-wffc-user
gone "wffc: the attachment goes" 20 "volumeattachment/$wva"
expect "wffc: the disk is detached in the driver" "^$whandle -\$" disks
expect "wffc: delete the claim" 'deleted' k delete pvc pd-wffc --wait=false
gone "wffc: the PV goes" 20 "pv/$wpv"
expect_no "wffc: ... and the disk" "$wpv" disks

# --- Reclaim ------------------------------------------------------------------------------------
echo "== reclaim"
expect "reclaim: delete the Delete claim" 'deleted' k delete pvc pd-claim --wait=false
gone "reclaim: Delete: the PV is deleted" 20 "pv/$pv"
expect "reclaim: Delete: the driver got DeleteVolume" "DeleteVolume volume=$handle -> OK" calls
expect_no "reclaim: Delete: the disk is gone from the driver" "^$handle " disks
expect "reclaim: delete the Retain claim" 'deleted' k delete pvc pd-keep --wait=false
eventually "reclaim: Retain: the PV is Released" 20 '^Released$' jp "pv/$keep_pv" '{.status.phase}'
stays "reclaim: Retain: ... and stays" 2 '^Released$' jp "pv/$keep_pv" '{.status.phase}'
expect "reclaim: Retain: the disk stays in the driver" "^$keep_handle -\$" disks
expect "reclaim: Retain: deleting the PV by hand" 'deleted' k delete pv "$keep_pv" --wait=false
gone "reclaim: Retain: ... removes it" 20 "pv/$keep_pv"
expect "reclaim: Retain: ... and leaves the disk to its owner" "^$keep_handle -\$" disks
expect_no "reclaim: Retain: no DeleteVolume was sent for it" "DeleteVolume volume=$keep_handle" calls

# Every call the driver answered succeeded, but for the refused class's CreateVolume.
expect_no "the driver answered every other call without error" '-> error' \
    bash -c "grep -F ' /csi.v1.' '$work/driver.log' | grep -vF 'CreateVolume name=pvc-$bad_uid '"

echo "anydriver-e2e: $passed passed, $failed failed"
((failed == 0))
