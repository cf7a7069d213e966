# shellcheck shell=bash disable=SC2154 # m, work, data and the helpers come from controllers-e2e.sh
# Attach and detach: a pod scheduled to this node gets a VolumeAttachment for its dynamically
# provisioned CSI volume, named as Kubernetes names it, published by ControllerPublishVolume
# through Berth's driver (finalizers on the attachment and the volume); a second node is refused
# for a ReadWriteOnce volume; the attachment goes when the pod goes; CSIDriver attachRequired
# false means no attachment and a missing CSIDriver means one; a publish error lands in
# status.attachError.
driver=csi.berth.dev
# The driver reports the host name as its node id (NodeGetInfo); pods on that node are
# published without a CSINode yet.
node=$(uname -n)
cat >"$m/att.yaml" <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: att-dir}
provisioner: $driver
parameters: {kind: dir}
reclaimPolicy: Delete
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: att-data, namespace: default}
spec:
  storageClassName: att-dir
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 32Mi}}
YAML
cat >"$m/att-pod.yaml" <<YAML
apiVersion: v1
kind: Pod
metadata: {name: att-user, namespace: default}
spec:
  nodeName: $node
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: att-data}}]
YAML
expect "attach: class and claim created" 'att-data created' k apply -f "$m/att.yaml"
eventually "attach: the claim is Bound" 20 '^Bound$' jp pvc/att-data '{.status.phase}'
pv=$(jp pvc/att-data '{.spec.volumeName}')
handle=$(jp "pv/$pv" '{.spec.csi.volumeHandle}')
va=csi-$(printf %s "$handle$driver$node" | sha256sum | cut -d' ' -f1)
stays "attach: no attachment while no pod uses the volume" 1 '^0$' bash -c "$KUBECTL get volumeattachments -o name | grep -cF '$va' || true"
expect "attach: a pod on $node uses the claim" 'att-user created' k apply -f "$m/att-pod.yaml"
eventually "attach: VolumeAttachment csi-<sha256(handle+driver+node)> appears" 20 "^$driver $node $pv\$" \
    jp "volumeattachment/$va" '{.spec.attacher} {.spec.nodeName} {.spec.source.persistentVolumeName}'
eventually "attach: ControllerPublishVolume succeeded: status.attached is true" 20 '^true$' jp "volumeattachment/$va" '{.status.attached}'
expect "attach: kubectl shows it attached" "$va +$driver +$pv +$node +true" k get volumeattachment "$va"
expect "attach: the attachment carries external-attacher's finalizer" 'external-attacher/csi-berth-dev' jp "volumeattachment/$va" '{.metadata.finalizers}'
expect "attach: ... and the node id it was published to" "^$node\$" jp "volumeattachment/$va" '{.metadata.annotations.csi\.alpha\.kubernetes\.io/node-id}'
expect "attach: the volume carries the finalizer while attached" 'external-attacher/csi-berth-dev' jp "pv/$pv" '{.metadata.finalizers}'
eventually "attach: the pod's event says the attach succeeded" 10 "SuccessfulAttachVolume.*AttachVolume.Attach succeeded for volume \"$pv\"" \
    k get events --field-selector involvedObject.name=att-user

# A ReadWriteOnce volume is not attached to a second node.
cat >"$m/att-other.yaml" <<YAML
apiVersion: v1
kind: Pod
metadata: {name: att-elsewhere, namespace: default}
spec:
  nodeName: att-other-node
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: att-data}}]
YAML
va_other=csi-$(printf %s "${handle}${driver}att-other-node" | sha256sum | cut -d' ' -f1)
expect "attach: a pod on another node wants the same RWO claim" 'att-elsewhere created' k apply -f "$m/att-other.yaml"
eventually "attach: Multi-Attach error with Kubernetes' wording" 10 \
    "FailedAttachVolume.*Multi-Attach error for volume \"$pv\" Volume is already used by pod\(s\) att-user" \
    k get events --field-selector involvedObject.name=att-elsewhere
expect_fail "attach: no attachment for the second node" 'NotFound' k get volumeattachment "$va_other"
expect "attach: delete the second pod" 'deleted' k delete pod att-elsewhere

# Detach.
expect "attach: delete the pod" 'deleted' k delete pod att-user
gone "attach: the attachment is deleted (ControllerUnpublishVolume, finalizer off)" 20 "volumeattachment/$va"
expect "attach: delete the claim" 'deleted' k delete pvc att-data --wait=false
gone "attach: the volume is deleted too (no attachment holds it)" 20 "pv/$pv"

# Whether attach is required is the CSIDriver's to say (a missing CSIDriver means it is): two
# static volumes of drivers this server does not run, one with attachRequired false.
cat >"$m/att-noattach.yaml" <<YAML
apiVersion: storage.k8s.io/v1
kind: CSIDriver
metadata: {name: noattach.berth.test}
spec: {attachRequired: false}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: att-noattach}
spec:
  capacity: {storage: 16Mi}
  accessModes: [ReadWriteOnce]
  storageClassName: att-foreign
  persistentVolumeReclaimPolicy: Retain
  csi: {driver: noattach.berth.test, volumeHandle: h-noattach}
  claimRef: {namespace: default, name: att-noattach}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: att-unknown}
spec:
  capacity: {storage: 16Mi}
  accessModes: [ReadWriteOnce]
  storageClassName: att-foreign
  persistentVolumeReclaimPolicy: Retain
  csi: {driver: unknown.berth.test, volumeHandle: h-unknown}
  claimRef: {namespace: default, name: att-unknown}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: att-noattach, namespace: default}
spec:
  storageClassName: att-foreign
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: att-unknown, namespace: default}
spec:
  storageClassName: att-foreign
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: att-foreign-user, namespace: default}
spec:
  nodeName: $node
  containers: [{name: c, image: busybox}]
  volumes:
  - {name: a, persistentVolumeClaim: {claimName: att-noattach}}
  - {name: b, persistentVolumeClaim: {claimName: att-unknown}}
YAML
va_unknown=csi-$(printf %s "h-unknownunknown.berth.test$node" | sha256sum | cut -d' ' -f1)
expect "attach: a CSIDriver with attachRequired false, two foreign volumes and a pod" 'att-foreign-user created' k apply -f "$m/att-noattach.yaml"
eventually "attach: both claims are Bound" 20 '^Bound Bound$' bash -c "$KUBECTL get pvc att-noattach att-unknown -o jsonpath='{.items[*].status.phase}'"
eventually "attach: no CSIDriver object means attach is required: an attachment appears" 20 "^unknown.berth.test $node att-unknown\$" \
    jp "volumeattachment/$va_unknown" '{.spec.attacher} {.spec.nodeName} {.spec.source.persistentVolumeName}'
stays "attach: ... it stays unattached, without a finalizer: no such driver is registered to attach it" 2 '^(false)? $' \
    jp "volumeattachment/$va_unknown" '{.status.attached} {.metadata.finalizers}'
stays "attach: attachRequired false: no attachment" 2 '^0$' \
    bash -c "$KUBECTL get volumeattachments -o jsonpath='{.items[*].spec.source.persistentVolumeName}' | grep -cw att-noattach || true"
expect "attach: delete the pod" 'deleted' k delete pod att-foreign-user
gone "attach: the unattached attachment goes at once" 20 "volumeattachment/$va_unknown"
expect "attach: clean up the foreign claims" 'deleted' k delete pvc att-noattach att-unknown --wait=false
expect "attach: ... their volumes" 'deleted' k delete pv att-noattach att-unknown --wait=false
expect "attach: ... and the CSIDriver" 'deleted' k delete csidriver noattach.berth.test
gone "attach: the foreign volumes are gone" 20 pv/att-unknown

# A publish error is reported in status.attachError and retried; the attachment still goes.
cat >"$m/att-bad.yaml" <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: att-missing}
spec:
  capacity: {storage: 16Mi}
  accessModes: [ReadWriteOnce]
  storageClassName: att-static
  persistentVolumeReclaimPolicy: Retain
  csi: {driver: $driver, volumeHandle: no-such-volume}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: att-missing, namespace: default}
spec:
  storageClassName: att-static
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: att-missing-user, namespace: default}
spec:
  nodeName: $node
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: att-missing}}]
YAML
va_bad=csi-$(printf %s "no-such-volume$driver$node" | sha256sum | cut -d' ' -f1)
expect "attach: a volume the driver does not have, and a pod" 'att-missing-user created' k apply -f "$m/att-bad.yaml"
eventually "attach: status.attachError has the driver's answer" 20 'rpc error: code = NotFound' \
    jp "volumeattachment/$va_bad" '{.status.attachError.message}'
expect "attach: it is not attached" '^false$' jp "volumeattachment/$va_bad" '{.status.attached}'
eventually "attach: the pod's event repeats the error" 10 'FailedAttachVolume.*AttachVolume.Attach failed for volume "att-missing" : rpc error: code = NotFound' \
    k get events --field-selector involvedObject.name=att-missing-user
expect "attach: delete that pod" 'deleted' k delete pod att-missing-user
gone "attach: the failed attachment is deleted too" 20 "volumeattachment/$va_bad"
expect "attach: clean up the static claim" 'deleted' k delete pvc att-missing --wait=false
eventually "attach: ... its volume is Released" 20 '^Released$' jp pv/att-missing '{.status.phase}'
expect "attach: ... and the volume (it names no backend volume)" 'deleted' k delete pv att-missing --wait=false
gone "attach: the volume goes: no attachment holds its finalizer any more" 20 pv/att-missing
