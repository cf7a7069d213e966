# shellcheck shell=bash disable=SC2154 # m, work, data and the helpers come from controllers-e2e.sh
# Static binding by the rules (smallest fit, access modes, class, selector, pre-bound both
# ways), phases, events, reclaim (Retain, Delete without a deleter, Recycle) and the
# pvc/pv-protection finalizers.
cat >"$m/static.yaml" <<'YAML'
apiVersion: v1
kind: PersistentVolume
metadata: {name: st-small, labels: {tier: gold}}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: manual
  hostPath: {path: /srv/st-small}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: st-big, labels: {tier: gold}}
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: manual
  hostPath: {path: /srv/st-big}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: st-rwx, labels: {tier: bronze}}
spec:
  capacity: {storage: 2Gi}
  accessModes: [ReadWriteOnce, ReadWriteMany]
  storageClassName: manual
  persistentVolumeReclaimPolicy: Delete
  hostPath: {path: /srv/st-rwx}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: st-reserved}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: manual
  persistentVolumeReclaimPolicy: Recycle
  claimRef: {namespace: default, name: st-wants-reserved}
  hostPath: {path: /srv/st-reserved}
YAML
cat >"$m/static-claims.yaml" <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: st-one, namespace: default}
spec:
  storageClassName: manual
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 500Mi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: st-shared, namespace: default}
spec:
  storageClassName: manual
  accessModes: [ReadWriteMany]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: st-wants-reserved, namespace: default}
spec:
  storageClassName: manual
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: st-named, namespace: default}
spec:
  storageClassName: manual
  volumeName: st-big
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 20Gi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: st-bronze, namespace: default}
spec:
  storageClassName: manual
  selector: {matchLabels: {tier: bronze}}
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
YAML
expect "static: PVs created" 'st-reserved created' k apply -f "$m/static.yaml"
eventually "static: free PVs become Available" 10 'st-big +10Gi .*Available' k get pv st-big
expect "static: claims created" 'st-bronze created' k apply -f "$m/static-claims.yaml"
eventually "static: smallest fit: the 500Mi RWO claim binds the 1Gi volume" 10 '^st-small$' jp pvc/st-one '{.spec.volumeName}'
eventually "static: the RWX claim binds the only RWX volume" 10 '^st-rwx$' jp pvc/st-shared '{.spec.volumeName}'
eventually "static: a claim binds the volume reserved for it by claimRef" 10 '^st-reserved$' jp pvc/st-wants-reserved '{.spec.volumeName}'
eventually "static: the volume reserved by the user gets the claim's UID" 10 '^[0-9a-f-]{36}$' jp pv/st-reserved '{.spec.claimRef.uid}'
expect "static: bound claims show Bound with the volume's capacity" 'st-one +Bound +st-small +1Gi +RWO +manual' k get pvc st-one
expect "static: bound volumes show the claim" 'st-small +1Gi +RWO +Retain +Bound +default/st-one' k get pv st-small
expect "static: the binding is marked bind-completed and bound-by-controller" 'bind-completed.*yes.*bound-by-controller.*yes|bound-by-controller.*yes.*bind-completed.*yes' \
    jp pvc/st-one '{.metadata.annotations}'
eventually "static: a claim naming a too-small volume stays Pending with VolumeMismatch" 10 'VolumeMismatch.*Cannot bind to requested volume "st-big": requested PV is too small' \
    k get events --field-selector involvedObject.name=st-named
expect "static: it is Pending" '^Pending$' jp pvc/st-named '{.status.phase}'
expect "static: a selector that matches no free volume leaves the claim Pending" '^Pending$' jp pvc/st-bronze '{.status.phase}'
expect "static: st-big stays Available (the named claim did not take it)" '^Available$' jp pv/st-big '{.status.phase}'

# Reclaim.
expect "static: delete a Retain claim" 'deleted' k delete pvc st-one --wait=false
eventually "static: Retain: the volume is Released and keeps its claimRef" 10 'Released default/st-one' jp pv/st-small '{.status.phase} {.spec.claimRef.namespace}/{.spec.claimRef.name}'
gone "static: the claim is gone (pvc-protection released, no pod uses it)" 10 pvc/st-one
expect "static: a Released Retain volume is not bound again" 'Released' jp pv/st-small '{.status.phase}'
expect "static: the admin clears claimRef" 'patched' k patch pv st-small --type json -p '[{"op":"remove","path":"/spec/claimRef"}]'
eventually "static: ... and it is Available again" 10 '^Available$' jp pv/st-small '{.status.phase}'
expect "static: delete a claim whose static volume says Delete" 'deleted' k delete pvc st-shared --wait=false
eventually "static: Delete without a deleter: the volume fails with Kubernetes' message" 10 'Failed.*no deletable volume plugin matched' \
    jp pv/st-rwx '{.status.phase} {.status.message}'
expect "static: delete the claim of a Recycle volume" 'deleted' k delete pvc st-wants-reserved --wait=false
eventually "static: Recycle: no recycler for the volume" 10 'Failed No recycler plugin found for the volume!' jp pv/st-reserved '{.status.phase} {.status.message}'

# pv-protection: a Bound volume stays Terminating until it is no longer Bound.
cat >"$m/static-prot.yaml" <<'YAML'
apiVersion: v1
kind: PersistentVolume
metadata: {name: st-prot}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: prot
  hostPath: {path: /srv/st-prot}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: st-prot, namespace: default}
spec:
  storageClassName: prot
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: st-user, namespace: default}
spec:
  nodeName: somewhere
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: st-prot}}]
YAML
expect "static: protection objects created" 'st-user created' k apply -f "$m/static-prot.yaml"
eventually "static: protection claim Bound" 10 '^Bound$' jp pvc/st-prot '{.status.phase}'
expect "static: delete a Bound volume" 'deleted' k delete pv st-prot --wait=false
stays "static: pv-protection keeps the Bound volume (Terminating)" 2 'st-prot' k get pv st-prot -o name
expect "static: delete the claim a scheduled pod uses" 'deleted' k delete pvc st-prot --wait=false
stays "static: pvc-protection keeps the claim while the pod exists" 2 'st-prot' k get pvc st-prot -o name
expect "static: delete the pod" 'deleted' k delete pod st-user --wait=false
gone "static: the claim goes once no pod uses it" 10 pvc/st-prot
gone "static: the volume goes once it is no longer Bound" 10 pv/st-prot
