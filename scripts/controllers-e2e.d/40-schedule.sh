# shellcheck shell=bash disable=SC2154 # m, work, data and the helpers come from controllers-e2e.sh
# Node registration (Node, CSINode, CSIDriver, CSIStorageCapacity) and the scheduler: pods
# without a node are placed by their volumes (missing claims, volume node affinity,
# WaitForFirstConsumer binding of a local volume), with kube-scheduler's events and messages.

# --- Registration --------------------------------------------------------------------------------
eventually "schedule: this host is registered as a Ready Node" 15 '^True$' \
    jp nodes '{.items[0].status.conditions[?(@.type=="Ready")].status}'
node=$(jp nodes '{.items[0].metadata.name}')
expect "schedule: the Node is labelled with its hostname" "^$node\$" jp "node/$node" '{.metadata.labels.kubernetes\.io/hostname}'
eventually "schedule: ... and with the driver's topology segment" 10 "^$node\$" \
    jp "node/$node" '{.metadata.labels.topology\.berth\.dev/node}'
eventually "schedule: the CSINode lists csi.berth.dev with its node id and topology key" 10 \
    "^csi.berth.dev $node topology.berth.dev/node\$" \
    jp "csinode/$node" '{.spec.drivers[0].name} {.spec.drivers[0].nodeID} {.spec.drivers[0].topologyKeys[0]}'
expect "schedule: the CSINode is owned by the Node" "^Node $node\$" \
    jp "csinode/$node" '{.metadata.ownerReferences[0].kind} {.metadata.ownerReferences[0].name}'
eventually "schedule: the CSIDriver csi.berth.dev: attach required, capacity tracked, no pod info, persistent" 10 \
    '^true true false Persistent$' \
    jp csidriver/csi.berth.dev '{.spec.attachRequired} {.spec.storageCapacity} {.spec.podInfoOnMount} {.spec.volumeLifecycleModes[*]}'

# --- Capacity ------------------------------------------------------------------------------------
cat >"$m/sc-class.yaml" <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: sc-berth}
provisioner: csi.berth.dev
volumeBindingMode: WaitForFirstConsumer
YAML
capacity_of() {
    k get csistoragecapacities -n kube-system \
        -o jsonpath="{range .items[?(@.storageClassName==\"$1\")]}{.metadata.name} {.capacity} {.maximumVolumeSize} {.nodeTopology.matchLabels}{\"\\n\"}{end}"
}
expect "schedule: a WaitForFirstConsumer class of csi.berth.dev" 'created' k apply -f "$m/sc-class.yaml"
eventually "schedule: a CSIStorageCapacity in kube-system for the class and this node, capacity > 0" 10 \
    "^csisc-[0-9a-f]{16} [1-9][0-9]*([KMGTPE]i?)? [1-9][0-9]*([KMGTPE]i?)? .*topology.berth.dev/node.*$node" capacity_of sc-berth
expect "schedule: it is labelled with the driver and the manager" 'csi.berth.dev berth' \
    k get csistoragecapacities -n kube-system -l csi.storage.k8s.io/drivername=csi.berth.dev \
    -o jsonpath='{.items[0].metadata.labels.csi\.storage\.k8s\.io/drivername} {.items[0].metadata.labels.csi\.storage\.k8s\.io/managed-by}'
cap_name=$(capacity_of sc-berth | awk '{ print $1 }')
expect "schedule: a deleted capacity object is published again" 'deleted' k delete csistoragecapacity -n kube-system "$cap_name"
eventually "schedule: ... under the same name" 10 "^$cap_name " capacity_of sc-berth
expect "schedule: delete the class" 'deleted' k delete storageclass sc-berth
no_capacity_for() { if [[ -z $(capacity_of "$1") ]]; then echo none; else capacity_of "$1"; fi; }
eventually "schedule: its capacity goes with it" 10 '^none$' no_capacity_for sc-berth

# --- Scheduling ----------------------------------------------------------------------------------
cat >"$m/sc-plain.yaml" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: sc-plain, namespace: default}
spec:
  containers: [{name: c, image: busybox}]
YAML
expect "schedule: a pod without volumes" 'created' k apply -f "$m/sc-plain.yaml"
eventually "schedule: ... is placed on this node" 10 "^$node\$" jp pod/sc-plain '{.spec.nodeName}'
expect "schedule: ... its PodScheduled condition is True" '^True$' jp pod/sc-plain '{.status.conditions[?(@.type=="PodScheduled")].status}'
eventually "schedule: ... and the Scheduled event says where" 10 "Scheduled .*Successfully assigned default/sc-plain to $node" \
    k get events --field-selector involvedObject.name=sc-plain

cat >"$m/sc-noclaim.yaml" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: sc-noclaim, namespace: default}
spec:
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: sc-missing}}]
YAML
expect "schedule: a pod naming a claim that does not exist" 'created' k apply -f "$m/sc-noclaim.yaml"
eventually "schedule: ... gets FailedScheduling: persistentvolumeclaim not found" 10 \
    'FailedScheduling .*0/1 nodes are available: persistentvolumeclaim "sc-missing" not found\.' \
    k get events --field-selector involvedObject.name=sc-noclaim
expect "schedule: ... PodScheduled=False, Unschedulable" '^False Unschedulable 0/1 nodes are available: persistentvolumeclaim "sc-missing" not found.$' \
    jp pod/sc-noclaim '{.status.conditions[?(@.type=="PodScheduled")].status} {.status.conditions[?(@.type=="PodScheduled")].reason} {.status.conditions[?(@.type=="PodScheduled")].message}'
stays "schedule: ... and stays Pending without a node" 3 '^Pending//$' jp pod/sc-noclaim '{.status.phase}/{.spec.nodeName}/'
expect "schedule: ... with one event, not a storm" '^1$' \
    jp events '{range .items[?(@.involvedObject.name=="sc-noclaim")]}{.count}{"\n"}{end}'

cat >"$m/sc-far.yaml" <<'YAML'
apiVersion: v1
kind: PersistentVolume
metadata: {name: sc-far}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: sc-far
  hostPath: {path: /srv/sc-far}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [some-other-node]}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: sc-far, namespace: default}
spec:
  storageClassName: sc-far
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
YAML
cat >"$m/sc-far-pod.yaml" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: sc-far, namespace: default}
spec:
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: sc-far}}]
YAML
expect "schedule: a volume pinned to another node, and its claim" 'created' k apply -f "$m/sc-far.yaml"
eventually "schedule: ... the claim binds (Immediate)" 10 '^Bound$' jp pvc/sc-far '{.status.phase}'
expect "schedule: a pod using it" 'created' k apply -f "$m/sc-far-pod.yaml"
eventually "schedule: ... is unschedulable: volume node affinity conflict" 10 \
    'FailedScheduling .*0/1 nodes are available: 1 node\(s\) had volume node affinity conflict\.' \
    k get events --field-selector involvedObject.name=sc-far,involvedObject.kind=Pod
stays "schedule: ... and stays without a node" 2 '^Pending//$' jp pod/sc-far '{.status.phase}/{.spec.nodeName}/'

cat >"$m/sc-local.yaml" <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: sc-local}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: sc-local}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: sc-local
  local: {path: /srv/sc-local}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$node]}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: sc-local, namespace: default}
spec:
  storageClassName: sc-local
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 500Mi}}
YAML
cat >"$m/sc-local-pod.yaml" <<'YAML'
apiVersion: v1
kind: Pod
metadata: {name: sc-local, namespace: default}
spec:
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: sc-local}}]
YAML
expect "schedule: a WaitForFirstConsumer class, a local volume on this node and a claim" 'created' k apply -f "$m/sc-local.yaml"
eventually "schedule: ... the claim waits for its first consumer" 10 'WaitForFirstConsumer .*waiting for first consumer to be created before binding' \
    k get events --field-selector involvedObject.name=sc-local,involvedObject.kind=PersistentVolumeClaim
stays "schedule: ... and stays Pending while no pod uses it" 2 '^Pending$' jp pvc/sc-local '{.status.phase}'
expect "schedule: the first consumer" 'created' k apply -f "$m/sc-local-pod.yaml"
eventually "schedule: ... the claim binds the local volume" 10 '^Bound sc-local$' jp pvc/sc-local '{.status.phase} {.spec.volumeName}'
expect "schedule: ... the binding was the scheduler's (bound-by-controller)" 'bound-by-controller.*yes' jp pv/sc-local '{.metadata.annotations}'
eventually "schedule: ... and the pod is placed on this node" 10 "^$node\$" jp pod/sc-local '{.spec.nodeName}'
eventually "schedule: ... with the Scheduled event" 10 "Scheduled .*Successfully assigned default/sc-local to $node" \
    k get events --field-selector involvedObject.name=sc-local,involvedObject.kind=Pod

# Dynamic WaitForFirstConsumer provisioning, once the provisioner runs in berth server.
if [[ -e $root/crates/berth-controllers/src/provisioner.rs ]]; then
    cat >"$m/sc-dyn.yaml" <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: sc-dyn}
provisioner: csi.berth.dev
volumeBindingMode: WaitForFirstConsumer
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: sc-dyn, namespace: default}
spec:
  storageClassName: sc-dyn
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 64Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: sc-dyn, namespace: default}
spec:
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: sc-dyn}}]
YAML
    expect "schedule: dynamic: a class of csi.berth.dev, a claim and its pod" 'created' k apply -f "$m/sc-dyn.yaml"
    eventually "schedule: dynamic: the claim gets the selected node" 15 "^$node\$" \
        jp pvc/sc-dyn '{.metadata.annotations.volume\.kubernetes\.io/selected-node}'
    eventually "schedule: dynamic: it is provisioned and binds" 30 '^Bound pvc-' jp pvc/sc-dyn '{.status.phase} {.spec.volumeName}'
    eventually "schedule: dynamic: the pod is placed on this node" 15 "^$node\$" jp pod/sc-dyn '{.spec.nodeName}'
    k delete pod sc-dyn >/dev/null 2>&1 || true
    k delete pvc sc-dyn --wait=false >/dev/null 2>&1 || true
    k delete storageclass sc-dyn >/dev/null 2>&1 || true
fi

# Leave nothing behind for the next sections.
k delete pod sc-plain sc-noclaim sc-far sc-local >/dev/null 2>&1 || true
k delete pvc sc-far sc-local --wait=false >/dev/null 2>&1 || true
k delete pv sc-far sc-local --wait=false >/dev/null 2>&1 || true
k delete storageclass sc-local >/dev/null 2>&1 || true
