# shellcheck shell=bash disable=SC2154 # m, work, data and the helpers come from controllers-e2e.sh
# Dynamic provisioning with Berth's own CSI driver: the default class, CreateVolume named
# pvc-<uid>, the PV written as external-provisioner writes it, Delete and Retain on claim
# deletion, and the backend volume really made and really removed.
cat >"$m/dyn.yaml" <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: berth-dir
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: csi.berth.dev
parameters: {kind: dir}
reclaimPolicy: Delete
allowVolumeExpansion: true
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: berth-keep}
provisioner: csi.berth.dev
parameters: {kind: dir}
reclaimPolicy: Retain
mountOptions: [noatime]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: dyn-default, namespace: default}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 64Mi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: dyn-keep, namespace: default}
spec:
  storageClassName: berth-keep
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 32Mi}}
YAML
expect "dynamic: classes and claims created" 'dyn-keep created' k apply -f "$m/dyn.yaml"
expect "dynamic: the default class is filled in" '^berth-dir$' jp pvc/dyn-default '{.spec.storageClassName}'
eventually "dynamic: a claim of the default class ends Bound" 20 '^Bound$' jp pvc/dyn-default '{.status.phase}'
uid=$(jp pvc/dyn-default '{.metadata.uid}')
expect "dynamic: its volume is pvc-<claim uid>" "^pvc-$uid\$" jp pvc/dyn-default '{.spec.volumeName}'
pv=pvc-$uid
expect "dynamic: the PV has the CSI source of Berth's driver" '^csi.berth.dev .+' jp "pv/$pv" '{.spec.csi.driver} {.spec.csi.volumeHandle}'
expect "dynamic: the PV says who provisioned it" '^csi.berth.dev$' jp "pv/$pv" '{.metadata.annotations.pv\.kubernetes\.io/provisioned-by}'
expect "dynamic: the PV records the provisioner's identity, <start ms>-<random>-<driver>" '^[0-9]{13}-[0-9]{1,4}-csi.berth.dev$' \
    jp "pv/$pv" '{.spec.csi.volumeAttributes.storage\.kubernetes\.io/csiProvisionerIdentity}'
expect "dynamic: the PV has the provisioner's finalizer and pv-protection" 'external-provisioner.volume.kubernetes.io/finalizer' jp "pv/$pv" '{.metadata.finalizers}'
expect "dynamic: capacity, reclaim policy, claimRef and class" "64Mi Delete dyn-default $uid berth-dir" \
    jp "pv/$pv" '{.spec.capacity.storage} {.spec.persistentVolumeReclaimPolicy} {.spec.claimRef.name} {.spec.claimRef.uid} {.spec.storageClassName}'
expect "dynamic: the claim was handed to the driver" '^csi.berth.dev$' jp pvc/dyn-default '{.metadata.annotations.volume\.kubernetes\.io/storage-provisioner}'
expect "dynamic: events tell the story" 'ExternalProvisioning.*|Provisioning.*|ProvisioningSucceeded' k get events --field-selector involvedObject.name=dyn-default
expect "dynamic: ProvisioningSucceeded recorded" "ProvisioningSucceeded.*Successfully provisioned volume $pv" k get events --field-selector involvedObject.name=dyn-default
expect_no_fin() { jp pvc/dyn-default '{.metadata.finalizers}'; }
expect "dynamic: the claim no longer carries the provisioning finalizer" '^\["kubernetes.io/pvc-protection"\]$' expect_no_fin
handle=$(jp "pv/$pv" '{.spec.csi.volumeHandle}')
eventually "dynamic: the Retain claim is Bound" 20 '^Bound$' jp pvc/dyn-keep '{.status.phase}'
keep_pv=$(jp pvc/dyn-keep '{.spec.volumeName}')
expect "dynamic: the Retain class's mount options reach the PV" 'noatime' jp "pv/$keep_pv" '{.spec.mountOptions}'

# The backend volumes exist in the pool (dir volumes are subvolumes named by their id).
backend_exists() { find "$data/pools" -maxdepth 4 -name "*$1*" -print -quit | grep -q .; }
if backend_exists "$handle"; then pass "dynamic: the backend volume exists in the pool"; else fail "dynamic: the backend volume exists in the pool"; fi

expect "dynamic: delete the Delete claim" 'deleted' k delete pvc dyn-default --wait=false
gone "dynamic: Delete: the PV is deleted" 20 "pv/$pv"
if ! backend_exists "$handle"; then pass "dynamic: Delete: the backend volume is gone"; else fail "dynamic: Delete: the backend volume is gone"; fi
expect "dynamic: delete the Retain claim" 'deleted' k delete pvc dyn-keep --wait=false
eventually "dynamic: Retain: the PV is Released and stays" 20 '^Released$' jp "pv/$keep_pv" '{.status.phase}'

# Errors: a claim with a selector cannot be provisioned; an unknown class parameter is refused.
cat >"$m/dyn-bad.yaml" <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: dyn-selector, namespace: default}
spec:
  storageClassName: berth-dir
  selector: {matchLabels: {a: b}}
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: berth-typo}
provisioner: csi.berth.dev
parameters: {kind: dir, csi.storage.k8s.io/fs-type: ext4}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: dyn-typo, namespace: default}
spec:
  storageClassName: berth-typo
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: dyn-huge, namespace: default}
spec:
  storageClassName: berth-dir
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 100Ti}}
YAML
expect "dynamic: bad claims created" 'dyn-huge created' k apply -f "$m/dyn-bad.yaml"
eventually "dynamic: a selector claim fails with Kubernetes' message" 20 'ProvisioningFailed.*claim Selector is not supported' k get events --field-selector involvedObject.name=dyn-selector
eventually "dynamic: an unknown csi.storage.k8s.io/ parameter is refused" 20 'ProvisioningFailed.*found unknown parameter key "csi.storage.k8s.io/fs-type"' k get events --field-selector involvedObject.name=dyn-typo
eventually "dynamic: a claim larger than the pool fails with the driver's error" 20 'ProvisioningFailed.*(OutOfRange|ResourceExhausted)' k get events --field-selector involvedObject.name=dyn-huge
expect "dynamic: failed claims stay Pending" '^Pending Pending Pending$' bash -c "$KUBECTL get pvc dyn-selector dyn-typo dyn-huge -o jsonpath='{.items[*].status.phase}'"
expect "dynamic: clean up the failed claims" 'deleted' k delete pvc dyn-selector dyn-typo dyn-huge --wait=false
gone "dynamic: a failed claim deletes (no volume was made)" 20 pvc/dyn-huge
