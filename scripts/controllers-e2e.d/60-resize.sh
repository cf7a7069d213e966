# shellcheck shell=bash disable=SC2154 # m, work, data and the helpers come from controllers-e2e.sh
# Expansion: a bound, dynamically provisioned claim asks for more; the external resizer calls
# ControllerExpandVolume, the PV grows, the claim's status shows the new capacity (directory
# volumes need no node step), the events read as Kubernetes', and the volume's quota really
# grew: a write that the old quota refused now fits. A filesystem volume's claim waits for the
# node step. A class without allowVolumeExpansion refuses the resize at admission.
cat >"$m/rs.yaml" <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: rs-dir}
provisioner: csi.berth.dev
parameters: {kind: dir}
reclaimPolicy: Delete
allowVolumeExpansion: true
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: rs-fixed}
provisioner: csi.berth.dev
parameters: {kind: dir}
reclaimPolicy: Delete
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: rs-data, namespace: default}
spec:
  storageClassName: rs-dir
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 32Mi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: rs-fixed, namespace: default}
spec:
  storageClassName: rs-fixed
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
YAML
expect "resize: classes and claims created" 'rs-fixed created' k apply -f "$m/rs.yaml"
eventually "resize: the claim is Bound with 32Mi" 20 '^Bound 32Mi$' jp pvc/rs-data '{.status.phase} {.status.capacity.storage}'
pv=$(jp pvc/rs-data '{.spec.volumeName}')
handle=$(jp "pv/$pv" '{.spec.csi.volumeHandle}')
vdir=$(find "$data/pools" -maxdepth 4 -type d -name "*$handle*" -print -quit)
# fill FILE MIB: writes MIB MiB into the volume's directory; fails when the quota refuses it.
fill() { dd if=/dev/zero of="$vdir/$1" bs=1M count="$2" conv=fsync status=none 2>&1 && echo "wrote $2 MiB"; }
if [[ -n $vdir ]]; then pass "resize: the volume's directory is in the pool"; else fail "resize: the volume's directory is in the pool"; fi
expect_fail "resize: before: 48 MiB do not fit the 32Mi quota" 'quota exceeded|No space left' fill big 48
rm -f "$vdir/big"
sync

expect "resize: ask for 96Mi" 'patched' k patch pvc rs-data -p '{"spec":{"resources":{"requests":{"storage":"96Mi"}}}}'
eventually "resize: the PV grows to 96Mi" 20 '^96Mi$' jp "pv/$pv" '{.spec.capacity.storage}'
eventually "resize: the claim's status shows 96Mi (no node step for a directory volume)" 20 '^96Mi$' jp pvc/rs-data '{.status.capacity.storage}'
expect "resize: kubectl shows the new capacity" "rs-data +Bound +$pv +96Mi" k get pvc rs-data
expect "resize: no resize condition is left" '^none$' jp pvc/rs-data '{.status.conditions}{"none"}'
expect "resize: allocatedResources records the size" '^96Mi$' jp pvc/rs-data '{.status.allocatedResources.storage}'
expect "resize: the claim was handed to the driver" '^csi.berth.dev$' jp pvc/rs-data '{.metadata.annotations.volume\.kubernetes\.io/storage-resizer}'
expect "resize: ... and marked as needing no node expansion" '^true$' jp pvc/rs-data '{.metadata.annotations.volume\.kubernetes\.io/node-expansion-not-required}'
eventually "resize: events: ExternalExpanding, Resizing, VolumeResizeSuccessful" 10 \
    "ExternalExpanding.*waiting for an external controller to expand this PVC" k get events --field-selector involvedObject.name=rs-data
expect "resize: ... Resizing names the volume" "Resizing.*External resizer is resizing volume $pv" k get events --field-selector involvedObject.name=rs-data
expect "resize: ... VolumeResizeSuccessful" 'VolumeResizeSuccessful.*Resize volume succeeded' k get events --field-selector involvedObject.name=rs-data
expect "resize: after: 48 MiB fit the 96Mi quota" 'wrote 48 MiB' fill big 48
rm -f "$vdir/big"

# A filesystem volume (an ext4 image) needs the node step: the controller grows the image and the
# PV, and leaves the claim FileSystemResizePending for the node agent (NodeExpandVolume needs the
# volume staged; Berth's driver also grows an unstaged filesystem at its next stage).
cat >"$m/rs-fs.yaml" <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: rs-fs}
provisioner: csi.berth.dev
parameters: {kind: fs}
reclaimPolicy: Delete
allowVolumeExpansion: true
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: rs-fs, namespace: default}
spec:
  storageClassName: rs-fs
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 64Mi}}
YAML
expect "resize: a filesystem claim" 'rs-fs created' k apply -f "$m/rs-fs.yaml"
eventually "resize: it is Bound with 64Mi" 30 '^Bound 64Mi$' jp pvc/rs-fs '{.status.phase} {.status.capacity.storage}'
fs_pv=$(jp pvc/rs-fs '{.spec.volumeName}')
fs_handle=$(jp "pv/$fs_pv" '{.spec.csi.volumeHandle}')
expect "resize: ask for 128Mi" 'patched' k patch pvc rs-fs -p '{"spec":{"resources":{"requests":{"storage":"128Mi"}}}}'
eventually "resize: the PV grows to 128Mi" 20 '^128Mi$' jp "pv/$fs_pv" '{.spec.capacity.storage}'
eventually "resize: the claim waits for the node: FileSystemResizePending, NodeResizePending" 20 \
    "^FileSystemResizePending=True NodeResizePending 64Mi\$" \
    jp pvc/rs-fs '{range .status.conditions[?(@.type=="FileSystemResizePending")]}{.type}={.status}{end} {.status.allocatedResourceStatuses.storage} {.status.capacity.storage}'
expect "resize: ... with Kubernetes' message" 'Waiting for user to \(re-\)start a pod to finish file system resize of volume on node.' \
    jp pvc/rs-fs '{.status.conditions[?(@.type=="FileSystemResizePending")].message}'
expect "resize: ... and event" 'FileSystemResizeRequired.*Require file system resize of volume on node' k get events --field-selector involvedObject.name=rs-fs
image=$(find "$data/pools" -maxdepth 4 -type f -name "*$fs_handle*" -print -quit)
expect "resize: the volume's image really grew to 128 MiB" '^134217728$' stat -c %s "$image"
stays "resize: the controller leaves the node step alone" 2 '^64Mi$' jp pvc/rs-fs '{.status.capacity.storage}'

# Admission: a class that does not allow expansion.
eventually "resize: the fixed-size claim is Bound" 20 '^Bound$' jp pvc/rs-fixed '{.status.phase}'
expect_fail "resize: a class without allowVolumeExpansion refuses the resize" \
    'only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize' \
    k patch pvc rs-fixed -p '{"spec":{"resources":{"requests":{"storage":"32Mi"}}}}'
expect "resize: clean up" 'deleted' k delete pvc rs-data rs-fixed rs-fs --wait=false
gone "resize: the resized volume is deleted with its claim" 20 "pv/$pv"
