# shellcheck shell=bash disable=SC2154 # m, work, data and the helpers come from controllers-e2e.sh
# Snapshots: a VolumeSnapshot of a provisioned claim gets the driver's default
# VolumeSnapshotClass, a VolumeSnapshotContent snapcontent-<uid> cut by CreateSnapshot, and
# becomes readyToUse with its restoreSize; claims restored from it and cloned from the source
# hold the source's data; deleting it (Delete policy) removes the content and the backend
# snapshot; a pre-provisioned content (Retain) is imported by its handle and outlives its
# snapshot.
cat >"$m/sn.yaml" <<'YAML'
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: sn-class
  annotations: {snapshot.storage.kubernetes.io/is-default-class: "true"}
driver: csi.berth.dev
deletionPolicy: Delete
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: sn-dir}
provisioner: csi.berth.dev
parameters: {kind: dir}
reclaimPolicy: Delete
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: sn-src, namespace: default}
spec:
  storageClassName: sn-dir
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 32Mi}}
YAML
cat >"$m/sn-snap.yaml" <<'YAML'
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: sn-snap, namespace: default}
spec:
  source: {persistentVolumeClaimName: sn-src}
YAML
expect "snapshot: class, storage class and claim created" 'sn-src created' k apply -f "$m/sn.yaml"
eventually "snapshot: the source claim is Bound" 20 '^Bound$' jp pvc/sn-src '{.status.phase}'
src_pv=$(jp pvc/sn-src '{.spec.volumeName}')
src_handle=$(jp "pv/$src_pv" '{.spec.csi.volumeHandle}')
# voldir HANDLE: the directory of a dir volume in the pool.
voldir() { find "$data/pools" -maxdepth 4 -type d -name "*$1*" -print -quit; }
src_dir=$(voldir "$src_handle")
echo "berth snapshot e2e $RANDOM" >"$src_dir/data.txt"
sync
want=$(cat "$src_dir/data.txt")

expect "snapshot: take a snapshot of the claim" 'sn-snap created' k apply -f "$m/sn-snap.yaml"
eventually "snapshot: the default class is filled in" 10 '^sn-class$' jp volumesnapshot/sn-snap '{.spec.volumeSnapshotClassName}'
eventually "snapshot: it becomes readyToUse" 20 '^true$' jp volumesnapshot/sn-snap '{.status.readyToUse}'
uid=$(jp volumesnapshot/sn-snap '{.metadata.uid}')
content=snapcontent-$uid
expect "snapshot: kubectl shows READYTOUSE true and RESTORESIZE" "sn-snap +true +sn-src +32Mi +sn-class +$content" k get volumesnapshot sn-snap
expect "snapshot: it is bound to snapcontent-<uid> and has a creation time" "^$content 20[0-9-]+T" \
    jp volumesnapshot/sn-snap '{.status.boundVolumeSnapshotContentName} {.status.creationTime}'
expect "snapshot: the content was cut by the driver" '^true csi.berth.dev Delete .+' \
    jp "volumesnapshotcontent/$content" '{.status.readyToUse} {.spec.driver} {.spec.deletionPolicy} {.status.snapshotHandle}'
expect "snapshot: the content records its source volume and class" "^$src_handle sn-class default/sn-snap $uid\$" \
    jp "volumesnapshotcontent/$content" '{.spec.source.volumeHandle} {.spec.volumeSnapshotClassName} {.spec.volumeSnapshotRef.namespace}/{.spec.volumeSnapshotRef.name} {.spec.volumeSnapshotRef.uid}'
expect "snapshot: kubectl shows the content ready" "$content +true +33554432 +Delete +csi.berth.dev +sn-class +sn-snap" k get volumesnapshotcontent "$content"
snap_handle=$(jp "volumesnapshotcontent/$content" '{.status.snapshotHandle}')
expect "snapshot: the snapshot carries both protection finalizers" \
    'volumesnapshot-as-source-protection.*volumesnapshot-bound-protection' jp volumesnapshot/sn-snap '{.metadata.finalizers}'
expect "snapshot: the content carries its bound protection" 'volumesnapshotcontent-bound-protection' jp "volumesnapshotcontent/$content" '{.metadata.finalizers}'
eventually "snapshot: the source claim's snapshot finalizer is gone once it is cut" 10 '^\["kubernetes.io/pvc-protection"\]$' jp pvc/sn-src '{.metadata.finalizers}'
eventually "snapshot: events: CreatingSnapshot, SnapshotCreated, SnapshotReady" 10 \
    "SnapshotReady.*Snapshot default/sn-snap is ready to use" k get events --field-selector involvedObject.name=sn-snap
expect "snapshot: ... SnapshotCreated" 'SnapshotCreated.*was successfully created by the CSI driver' k get events --field-selector involvedObject.name=sn-snap
expect "snapshot: ... CreatingSnapshot" 'CreatingSnapshot.*Waiting for a snapshot default/sn-snap to be created by the CSI driver' k get events --field-selector involvedObject.name=sn-snap

# Restore and clone (the provisioner's data sources).
cat >"$m/sn-restore.yaml" <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: sn-restored, namespace: default}
spec:
  storageClassName: sn-dir
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 32Mi}}
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: sn-snap}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: sn-clone, namespace: default}
spec:
  storageClassName: sn-dir
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 32Mi}}
  dataSource: {kind: PersistentVolumeClaim, name: sn-src}
YAML
echo "changed after the snapshot" >"$src_dir/later.txt"
expect "snapshot: claims restored from the snapshot and cloned from the source" 'sn-clone created' k apply -f "$m/sn-restore.yaml"
eventually "snapshot: the restored claim is Bound" 30 '^Bound$' jp pvc/sn-restored '{.status.phase}'
restored_handle=$(jp "pv/$(jp pvc/sn-restored '{.spec.volumeName}')" '{.spec.csi.volumeHandle}')
if [[ -n $restored_handle && $restored_handle != "$src_handle" ]]; then pass "snapshot: the restored volume is a new volume"; else fail "snapshot: the restored volume is a new volume"; fi
restored_dir=$(voldir "$restored_handle")
expect "snapshot: the restored volume holds the snapshot's data" "^$want\$" cat "$restored_dir/data.txt"
expect_fail "snapshot: ... and not what was written after it" 'No such file' cat "$restored_dir/later.txt"
eventually "snapshot: the clone is Bound" 30 '^Bound$' jp pvc/sn-clone '{.status.phase}'
clone_dir=$(voldir "$(jp "pv/$(jp pvc/sn-clone '{.spec.volumeName}')" '{.spec.csi.volumeHandle}')")
expect "snapshot: the clone holds the source's data" 'changed after the snapshot' cat "$clone_dir/later.txt"

# Delete: the content and the backend snapshot go (Delete policy).
backend_has() { find "$data/pools" -maxdepth 4 -name "*$1*" -print -quit | grep -q .; }
if backend_has "$snap_handle"; then pass "snapshot: the backend snapshot exists"; else fail "snapshot: the backend snapshot exists"; fi
expect "snapshot: delete the snapshot" 'deleted' k delete volumesnapshot sn-snap --wait=false
gone "snapshot: the snapshot is gone" 20 volumesnapshot/sn-snap
gone "snapshot: its content is gone (DeleteSnapshot, finalizer off)" 20 "volumesnapshotcontent/$content"
if ! backend_has "$snap_handle"; then pass "snapshot: the backend snapshot is gone"; else fail "snapshot: the backend snapshot is gone"; fi

# Pre-provisioned: import an existing snapshot by its handle with a Retain content.
cat >"$m/sn-two.yaml" <<'YAML'
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: sn-two, namespace: default}
spec:
  volumeSnapshotClassName: sn-class
  source: {persistentVolumeClaimName: sn-src}
YAML
expect "snapshot: a second snapshot" 'sn-two created' k apply -f "$m/sn-two.yaml"
eventually "snapshot: ... ready" 20 '^true$' jp volumesnapshot/sn-two '{.status.readyToUse}'
two_handle=$(jp "volumesnapshotcontent/$(jp volumesnapshot/sn-two '{.status.boundVolumeSnapshotContentName}')" '{.status.snapshotHandle}')
cat >"$m/sn-import.yaml" <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotContent
metadata: {name: sn-imported}
spec:
  deletionPolicy: Retain
  driver: csi.berth.dev
  source: {snapshotHandle: $two_handle}
  volumeSnapshotRef: {name: sn-import, namespace: default}
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: sn-import, namespace: default}
spec:
  source: {volumeSnapshotContentName: sn-imported}
YAML
expect "snapshot: a pre-provisioned content and a snapshot naming it" 'sn-import created' k apply -f "$m/sn-import.yaml"
eventually "snapshot: the imported snapshot becomes readyToUse" 20 '^true 32Mi sn-imported$' \
    jp volumesnapshot/sn-import '{.status.readyToUse} {.status.restoreSize} {.status.boundVolumeSnapshotContentName}'
import_uid=$(jp volumesnapshot/sn-import '{.metadata.uid}')
expect "snapshot: the content is bound to it by UID" "^$import_uid $two_handle\$" \
    jp volumesnapshotcontent/sn-imported '{.spec.volumeSnapshotRef.uid} {.status.snapshotHandle}'
expect "snapshot: delete the imported snapshot" 'deleted' k delete volumesnapshot sn-import --wait=false
gone "snapshot: ... it goes" 20 volumesnapshot/sn-import
stays "snapshot: Retain: its content stays" 2 '^sn-imported$' jp volumesnapshotcontent/sn-imported '{.metadata.name}'
expect "snapshot: delete the retained content by hand" 'deleted' k delete volumesnapshotcontent sn-imported --wait=false
gone "snapshot: ... it goes without DeleteSnapshot" 20 volumesnapshotcontent/sn-imported
if backend_has "$two_handle"; then pass "snapshot: Retain kept the backend snapshot"; else fail "snapshot: Retain kept the backend snapshot"; fi
expect "snapshot: clean up" 'deleted' k delete volumesnapshot sn-two --wait=false
gone "snapshot: the second snapshot is gone" 20 volumesnapshot/sn-two
if ! backend_has "$two_handle"; then pass "snapshot: ... and its backend snapshot"; else fail "snapshot: ... and its backend snapshot"; fi
expect "snapshot: delete the claims" 'deleted' k delete pvc sn-src sn-restored sn-clone --wait=false
gone "snapshot: the source claim is gone" 20 pvc/sn-src
