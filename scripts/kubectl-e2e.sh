#!/usr/bin/env bash
# A scripted kubectl session against a real `berth server` (issue 4, must-show 1).
#
# Starts `berth server` on a temporary data dir and a free loopback port, then drives it with
# real kubectl through DATA/admin.kubeconfig: apply (twice) of PV, PVC, StorageClass, Secret and
# Pod manifests written as for Kubernetes; get as a table, -o yaml, -o jsonpath and -w; describe;
# patch (merge, json, strategic); edit through KUBE_EDITOR; delete held by a finalizer until the
# finalizer is patched away; --selector; the read-only token; 401 without a token (curl).
#
# Env: BERTH_BIN (default target/debug/berth), KUBECTL (default: Debian's kubernetes-client
# 1.20 unpacked by scripts/ci-install.sh). Prints PASS/FAIL lines and "kubectl-e2e: N passed,
# N failed"; exits non-zero on any failure. Keeps the work dir on failure.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BERTH_BIN=${BERTH_BIN:-$root/target/debug/berth}
KUBECTL=${KUBECTL:-/opt/berth-ci/kubernetes-client/usr/bin/kubectl}
[[ -x $BERTH_BIN ]] || { echo "kubectl-e2e: $BERTH_BIN is not built" >&2; exit 2; }
[[ -x $KUBECTL ]] || { echo "kubectl-e2e: no kubectl at $KUBECTL (run scripts/ci-install.sh)" >&2; exit 2; }

work=$(mktemp -d /tmp/berth-kubectl-e2e.XXXXXX)
passed=0
failed=0
server_pid=
watch_pid=
aio_pid=

cleanup() {
    if [[ -n $watch_pid ]]; then kill "$watch_pid" 2>/dev/null || true; fi
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [[ -n $aio_pid ]]; then
        kill "$aio_pid" 2>/dev/null || true
        wait "$aio_pid" 2>/dev/null || true
    fi
    if [[ -d $work/aio ]]; then "$BERTH_BIN" teardown --data-dir "$work/aio" >/dev/null 2>&1 || true; fi
    if ((failed == 0)); then
        rm -rf "$work"
    else
        echo "kubectl-e2e: kept $work (server log: $work/server.log)"
    fi
}
trap cleanup EXIT

# shellcheck source=scripts/e2e-lib.sh
source "$root/scripts/e2e-lib.sh"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BERTH_BIN" server --api-only --no-controllers --data-dir "$work/data" --listen "127.0.0.1:$port" >"$work/server.log" 2>&1 &
server_pid=$!
url=https://127.0.0.1:$port
for _ in $(seq 1 100); do
    if [[ -s $work/data/admin.kubeconfig ]] && curl -skf "$url/healthz" >/dev/null 2>&1; then break; fi
    sleep 0.1
done
export KUBECONFIG=$work/data/admin.kubeconfig HOME=$work
echo "kubectl-e2e: $("$KUBECTL" version --client --short 2>/dev/null || "$KUBECTL" version --client 2>/dev/null | head -n 1) against $url"

m=$work/manifests
mkdir -p "$m"
cat >"$m/storageclass.yaml" <<'EOF'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: berth-fast
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: berth.dev
parameters:
  kind: dir
allowVolumeExpansion: true
volumeBindingMode: WaitForFirstConsumer
EOF
cat >"$m/pv.yaml" <<'EOF'
apiVersion: v1
kind: PersistentVolume
metadata:
  name: pv-e2e
  labels:
    tier: fast
spec:
  capacity:
    storage: 1Gi
  accessModes:
    - ReadWriteOnce
  persistentVolumeReclaimPolicy: Retain
  storageClassName: berth-fast
  hostPath:
    path: /srv/pv-e2e
EOF
cat >"$m/pv-slow.yaml" <<'EOF'
apiVersion: v1
kind: PersistentVolume
metadata:
  name: pv-slow
  labels:
    tier: slow
spec:
  capacity:
    storage: 5Gi
  accessModes: [ReadWriteMany]
  nfs:
    server: nfs.example.com
    path: /exports/slow
EOF
cat >"$m/pvc.yaml" <<'EOF'
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: data
  namespace: default
spec:
  accessModes:
    - ReadWriteOnce
  resources:
    requests:
      storage: 1Gi
  storageClassName: berth-fast
EOF
cat >"$m/secret.yaml" <<'EOF'
apiVersion: v1
kind: Secret
metadata:
  name: db-credentials
type: Opaque
data:
  password: c2VjcmV0
stringData:
  user: admin
EOF
cat >"$m/pod.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels:
    app: web
spec:
  containers:
    - name: nginx
      image: nginx:1.25
      ports:
        - containerPort: 80
      env:
        - name: PASSWORD
          valueFrom:
            secretKeyRef:
              name: db-credentials
              key: password
      volumeMounts:
        - name: data
          mountPath: /usr/share/nginx/html
    - name: sidecar
      image: busybox:1.36
      command: ["sleep", "infinity"]
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: data
EOF

# --- apply, twice ------------------------------------------------------------------------------
for f in storageclass pv pvc secret pod; do
    expect "apply -f $f.yaml creates" ' created$' k apply -f "$m/$f.yaml"
done
for f in storageclass pv pvc secret pod; do
    expect "apply -f $f.yaml again is unchanged or configured" ' (unchanged|configured)$' k apply -f "$m/$f.yaml"
done
expect "apply -f pv-slow.yaml creates" 'persistentvolume/pv-slow created' k apply -f "$m/pv-slow.yaml"
sed 's/capacity:/capacityy:/' "$m/pv.yaml" >"$m/bad.yaml"
expect_fail "client-side validation refuses an unknown field" 'unknown field "capacityy"' k apply -f "$m/bad.yaml"

# --- get ---------------------------------------------------------------------------------------
expect "get pv prints a table" '^NAME +.*AGE' k get pv
expect "get pv lists pv-e2e" '^pv-e2e ' k get pv
expect "get pv has Kubernetes' columns" '^NAME +CAPACITY +ACCESS MODES +RECLAIM POLICY +STATUS +CLAIM +STORAGECLASS .*REASON +AGE' k get pv
expect "get pv row shows capacity and access modes" '^pv-e2e +1Gi +RWO +Retain ' k get pv
expect "get pvc -A has a NAMESPACE column" '^NAMESPACE +NAME' k get pvc -A
expect "get pv -o yaml" '^  name: pv-e2e$' k get pv pv-e2e -o yaml
expect "get -o yaml has uid and resourceVersion" '^  resourceVersion: "[0-9]+"' k get pv pv-e2e -o yaml
expect "get -o jsonpath" '^1Gi$' k get pv pv-e2e -o 'jsonpath={.spec.capacity.storage}'
expect "get sc -o jsonpath" '^berth.dev$' k get storageclass berth-fast -o 'jsonpath={.provisioner}'
expect "get pod -o jsonpath lists both containers" '^nginx sidecar$' k get pod web -o 'jsonpath={.spec.containers[*].name}'
expect_fail "get of a missing object is NotFound" 'persistentvolumes "nope" not found' k get pv nope
expect "get ns lists the initial namespaces" 'kube-system' k get namespaces

# get -w in the background sees a claim created after it started.
k get pvc -w >"$work/watch.out" 2>&1 &
watch_pid=$!
sleep 1
sed 's/name: data$/name: data-watched/' "$m/pvc.yaml" | k apply -f - >/dev/null 2>&1 || true
for _ in $(seq 1 50); do
    grep -q '^data-watched' "$work/watch.out" && break
    sleep 0.1
done
cp "$work/watch.out" "$work/out"
if grep -q '^data-watched' "$work/watch.out"; then pass "get -w sees an ADDED event"; else fail "get -w sees an ADDED event"; fi
kill "$watch_pid" 2>/dev/null || true
wait "$watch_pid" 2>/dev/null || true
watch_pid=

# --- describe ----------------------------------------------------------------------------------
expect "describe pv" '^Name: +pv-e2e' k describe pv pv-e2e
expect "describe pvc" '^Namespace: +default' k describe pvc data

# --- patch -------------------------------------------------------------------------------------
expect "patch --type merge" 'patched' k patch pv pv-e2e --type merge -p '{"metadata":{"labels":{"patched":"merge"}}}'
expect "merge patch is stored" '^merge$' k get pv pv-e2e -o 'jsonpath={.metadata.labels.patched}'
expect "patch --type json" 'patched' k patch pv pv-e2e --type json -p '[{"op":"add","path":"/metadata/labels/jsonpatched","value":"yes"}]'
expect "json patch is stored" '^yes$' k get pv pv-e2e -o 'jsonpath={.metadata.labels.jsonpatched}'
expect "patch (strategic) of one container by name" 'patched' k patch pod web -p '{"spec":{"containers":[{"name":"nginx","image":"nginx:1.26"}]}}'
expect "strategic patch merged the container list by name" '^nginx:1.26 busybox:1.36$' k get pod web -o 'jsonpath={.spec.containers[*].image}'
expect_fail "patch of a missing object is NotFound" 'not found' k patch pv nope --type merge -p '{"metadata":{"labels":{"a":"b"}}}'

# --- edit --------------------------------------------------------------------------------------
expect "edit through KUBE_EDITOR" 'edited' env KUBE_EDITOR="sed -i -e s/tier:\ fast/tier:\ edited/" "$KUBECTL" edit pv pv-e2e
expect "edit is stored" '^edited$' k get pv pv-e2e -o 'jsonpath={.metadata.labels.tier}'

# --- selectors ---------------------------------------------------------------------------------
expect "--selector picks the matching PV" '^persistentvolume/pv-slow$' k get pv --selector tier=slow -o name
expect_no "--selector leaves the others out" 'pv-e2e' k get pv --selector tier=slow -o name
expect "-l with != picks the other PV" 'pv-e2e' k get pv -l 'tier!=slow' -o name

# --- delete with a finalizer -------------------------------------------------------------------
cat >"$m/held.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: held
  finalizers:
    - example.com/hold
data:
  a: b
EOF
expect "create a ConfigMap with a finalizer" 'configmap/held created' k create -f "$m/held.yaml"
expect "delete --wait=false answers deleted" 'configmap "held" deleted' k delete configmap held --wait=false
expect "it stays, Terminating (deletionTimestamp set)" '^20[0-9]{2}-' k get configmap held -o 'jsonpath={.metadata.deletionTimestamp}'
expect "patch the finalizer away" 'patched' k patch configmap held --type merge -p '{"metadata":{"finalizers":null}}'
expect_fail "then it is gone" 'configmaps "held" not found' k get configmap held
expect "delete pod" 'pod "web" deleted' k delete pod web
expect_fail "deleted pod is gone" 'pods "web" not found' k get pod web

# --- errors and security -----------------------------------------------------------------------
expect_fail "create in a missing namespace is NotFound" 'namespaces "nowhere" not found' k -n nowhere create -f "$m/secret.yaml"
expect_fail "create twice is AlreadyExists" 'already exists' k create -f "$m/pv.yaml"
code=$(curl -sk -o "$work/out" -w '%{http_code}' "$url/api/v1/persistentvolumes" || true)
if [[ $code == 401 ]] && grep -q '"reason":"Unauthorized"' "$work/out"; then pass "no token: 401 Status"; else fail "no token: 401 Status (got $code)"; fi
code=$(curl -sk -o "$work/out" -w '%{http_code}' -H 'Authorization: Bearer wrong' "$url/api/v1/persistentvolumes" || true)
if [[ $code == 401 ]]; then pass "wrong token: 401"; else fail "wrong token: 401 (got $code)"; fi
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/api" || true)
if [[ $code != 200 ]]; then pass "plain HTTP is not served"; else fail "plain HTTP is not served"; fi
expect "read-only token can get" 'pv-e2e' "$KUBECTL" --kubeconfig "$work/data/readonly.kubeconfig" get pv
expect_fail "read-only token cannot delete (Forbidden)" 'Forbidden|forbidden' "$KUBECTL" --kubeconfig "$work/data/readonly.kubeconfig" delete pv pv-slow

# --- all in one: berth server with its storage roles (root only) ----------------------------------
# Without --api-only the server also makes the storage engine's default pool and serves the CSI
# driver and the Docker plugin; sockets go to the work dir here instead of /run.
if [[ $(id -u) -eq 0 ]]; then
    aio=$work/aio
    port2=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$BERTH_BIN" server --data-dir "$aio" --listen "127.0.0.1:$port2" --default-pool-size 1G \
        --csi-endpoint "unix://$work/aio-csi.sock" --docker-socket "$work/aio-docker.sock" >"$work/aio.log" 2>&1 &
    aio_pid=$!
    for _ in $(seq 1 150); do
        if [[ -s $aio/admin.kubeconfig ]] && curl -skf "https://127.0.0.1:$port2/healthz" >/dev/null 2>&1; then break; fi
        sleep 0.1
    done
    expect "all in one: kubectl get pv answers" 'No resources found' "$KUBECTL" --kubeconfig "$aio/admin.kubeconfig" get pv
    if [[ -f $aio/pools/default/pool.img ]]; then pass "all in one: the default pool was made"; else fail "all in one: the default pool was made"; fi
    if [[ -S $work/aio-csi.sock && $(stat -c %a "$work/aio-csi.sock") == 600 ]]; then
        pass "all in one: the CSI socket is there, mode 0600"
    else
        fail "all in one: the CSI socket is there, mode 0600"
    fi
    expect "all in one: the Docker plugin answers" 'VolumeDriver' curl -s --unix-socket "$work/aio-docker.sock" -X POST http://p/Plugin.Activate
    kill "$aio_pid" 2>/dev/null || true
    wait "$aio_pid" 2>/dev/null || true
    aio_pid=
fi

echo "kubectl-e2e: $passed passed, $failed failed"
((failed == 0))
