# shellcheck shell=bash disable=SC2154 # m, work, data and the helpers come from controllers-e2e.sh
# A start with claims and volumes written while no controller ran (as `berth bench bind` does):
# pre-bound pairs bind before the volumes' first sync, so their volumes go from Pending straight
# to Bound; the rest (a claim matched by the rules, a pre-bound claim whose volume is too small)
# end as the rules say, whatever the order.
cat >"$m/startup.yaml" <<'YAML'
apiVersion: v1
kind: PersistentVolume
metadata: {name: su-both}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: startup
  claimRef: {namespace: default, name: su-both}
  hostPath: {path: /srv/su-both}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: su-pv-names}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: startup
  claimRef: {namespace: default, name: su-pv-names}
  hostPath: {path: /srv/su-pv-names}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: su-claim-names}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: startup
  hostPath: {path: /srv/su-claim-names}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: su-small}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: startup
  hostPath: {path: /srv/su-small}
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: su-free}
spec:
  capacity: {storage: 5Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: startup
  hostPath: {path: /srv/su-free}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: su-both, namespace: default}
spec:
  storageClassName: startup
  volumeName: su-both
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: su-pv-names, namespace: default}
spec:
  storageClassName: startup
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: su-claim-names, namespace: default}
spec:
  storageClassName: startup
  volumeName: su-claim-names
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: su-too-big, namespace: default}
spec:
  storageClassName: startup
  volumeName: su-small
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 2Gi}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: su-matched, namespace: default}
spec:
  storageClassName: startup
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 3Gi}}
YAML
stop_server
start_server --no-controllers
expect "startup: objects written while no controller runs" 'persistentvolumeclaim/su-matched created' k create -f "$m/startup.yaml"
su_rev=$(k get --raw /api/v1/persistentvolumes?limit=1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["metadata"]["resourceVersion"])')
stop_server
start_server
for c in su-both su-pv-names su-claim-names; do
    eventually "startup: the pre-bound pair $c binds" 10 "^Bound $c\$" jp "pvc/$c" '{.status.phase} {.spec.volumeName}'
done
eventually "startup: the matched claim binds the only volume big enough" 10 '^Bound su-free$' jp pvc/su-matched '{.status.phase} {.spec.volumeName}'
eventually "startup: a pre-bound claim naming a too-small volume gets VolumeMismatch" 10 'VolumeMismatch.*"su-small": requested PV is too small' \
    k get events --field-selector involvedObject.name=su-too-big
expect "startup: ... and stays Pending" '^Pending$' jp pvc/su-too-big '{.status.phase}'
eventually "startup: the volume it named is Available" 10 '^Available$' jp pv/su-small '{.status.phase}'
# Every change to the volumes since the start, oldest first: the pre-bound ones were written once.
k get --raw "/api/v1/persistentvolumes?watch=1&resourceVersion=$su_rev&timeoutSeconds=1" \
    | python3 -c 'import json, sys
for line in sys.stdin:
    pv = json.loads(line)["object"]
    print(pv["metadata"]["name"], pv.get("status", {}).get("phase"))' >"$work/startup-phases.txt"
phases() { grep "^$1 " "$work/startup-phases.txt" | paste -sd,; }
for v in su-both su-pv-names su-claim-names; do
    expect "startup: $v went from Pending to Bound in one write (no Available first)" "^$v Bound\$" phases "$v"
done
expect "startup: the free volume went Available, then Bound" '^su-free Available,su-free Bound$' phases su-free
k delete pvc su-both su-pv-names su-claim-names su-too-big su-matched --wait=false >/dev/null
k delete pv su-both su-pv-names su-claim-names su-small su-free --wait=false >/dev/null
