#!/usr/bin/env bash
# Installs, idempotently, everything Berth's tests need on a Debian 12 machine (run as root):
# Debian packages, csi-sanity v5.5.0, rustfmt and clippy, Debian's kubectl 1.20 (unpacked
# privately), the GCE PD CSI driver on a fake cloud (scripts/gce-pd-driver), and the kernel
# modules for loop devices and the filesystems the engine uses. Fails loudly when something
# cannot be had.
set -euo pipefail

CSI_SANITY_MODULE=github.com/kubernetes-csi/csi-test/v5
CSI_SANITY_VERSION=v5.5.0

die() {
    echo "ci-install: ERROR: $*" >&2
    exit 1
}
say() { echo "ci-install: $*"; }

# --- Debian packages -------------------------------------------------------------------------
# util-linux: mount, umount, losetup; kmod: modprobe; python3: the junit summary; shellcheck:
# lints the scripts; procps: ps/kill; ca-certificates: HTTPS to the package registries.
# etcd-server: the store's etcd backend tests; protobuf-compiler: protoc for etcd-client's build,
# and libprotobuf-dev for the well-known .proto files it imports (only a recommendation of
# protobuf-compiler, which --no-install-recommends leaves out).
# curl: the API server e2e checks 401 without kubectl.
packages=(btrfs-progs xfsprogs e2fsprogs util-linux mount fio busybox-static kmod python3 shellcheck procps ca-certificates etcd-server protobuf-compiler libprotobuf-dev curl)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]} > 0)); then
    [[ $(id -u) -eq 0 ]] || die "missing Debian packages (${missing[*]}) and not root: run as root"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" || die "apt-get install ${missing[*]} failed"
else
    say "Debian packages present"
fi
for tool in mkfs.btrfs btrfs mkfs.xfs mkfs.ext4 losetup mount umount fio busybox python3 shellcheck etcd protoc; do
    command -v "$tool" >/dev/null || die "$tool not on PATH after installing packages"
done
[[ -f /usr/include/google/protobuf/descriptor.proto ]] || die "google/protobuf/descriptor.proto missing after installing libprotobuf-dev"

# --- kubectl from Debian's kubernetes-client (the API server's e2e client) --------------------
# It conflicts with the `kubectl` package some images carry (/usr/bin/kubectl), so it is never
# installed: the .deb is downloaded and unpacked under $KUBECTL_ROOT, and scripts/kubectl-e2e.sh
# uses $KUBECTL_ROOT/usr/bin/kubectl explicitly.
KUBECTL_ROOT=/opt/berth-ci/kubernetes-client
if [[ -x $KUBECTL_ROOT/usr/bin/kubectl ]] && "$KUBECTL_ROOT/usr/bin/kubectl" version --client >/dev/null 2>&1; then
    say "kubectl (kubernetes-client) present at $KUBECTL_ROOT/usr/bin/kubectl"
else
    say "fetching Debian's kubernetes-client into $KUBECTL_ROOT"
    dl=$(mktemp -d /tmp/berth-kubectl-deb.XXXXXX)
    chmod 0777 "$dl" # apt-get download runs as _apt
    if ! (cd "$dl" && apt-get download kubernetes-client); then
        apt-get update -q || die "apt-get update failed"
        (cd "$dl" && apt-get download kubernetes-client) || die "apt-get download kubernetes-client failed"
    fi
    deb=$(find "$dl" -maxdepth 1 -name "kubernetes-client_*.deb" | head -n 1)
    [[ -n $deb ]] || die "apt-get download left no kubernetes-client .deb in $dl"
    rm -rf "$KUBECTL_ROOT"
    mkdir -p "$KUBECTL_ROOT"
    dpkg-deb -x "$deb" "$KUBECTL_ROOT" || die "dpkg-deb -x $deb failed"
    rm -rf "$dl"
    "$KUBECTL_ROOT/usr/bin/kubectl" version --client >/dev/null 2>&1 ||
        die "$KUBECTL_ROOT/usr/bin/kubectl does not run after unpacking"
fi
command -v curl >/dev/null || die "curl not on PATH (scripts/kubectl-e2e.sh needs it)"

# --- Rust toolchain --------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) first"
if command -v rustup >/dev/null; then
    installed=$(rustup component list --installed)
    for comp in rustfmt clippy; do
        if ! grep -q "^$comp" <<<"$installed"; then
            say "adding rustup component $comp"
            rustup component add "$comp" || die "rustup component add $comp failed"
        fi
    done
fi
cargo fmt --version >/dev/null 2>&1 || die "cargo fmt is not available"
cargo clippy --version >/dev/null 2>&1 || die "cargo clippy is not available"

# --- csi-sanity ------------------------------------------------------------------------------
if ! command -v go >/dev/null && [[ -x /usr/local/go/bin/go ]]; then
    export PATH=/usr/local/go/bin:$PATH
fi
command -v go >/dev/null || die "go not found: csi-sanity $CSI_SANITY_VERSION needs Go >= 1.25"
# Never download a Go toolchain; the local one must be new enough.
export GOTOOLCHAIN=local
gobin=$(go env GOBIN)
[[ -n $gobin ]] || gobin=$(go env GOPATH)/bin
sanity=$gobin/csi-sanity

sanity_version() {
    go version -m "$1" 2>/dev/null | awk -v m="$CSI_SANITY_MODULE" '$1 == "mod" && $2 == m { print $3 }'
}
if [[ -x $sanity && $(sanity_version "$sanity") == "$CSI_SANITY_VERSION" ]]; then
    say "csi-sanity $CSI_SANITY_VERSION present at $sanity"
else
    say "installing csi-sanity $CSI_SANITY_VERSION"
    go install "$CSI_SANITY_MODULE/cmd/csi-sanity@$CSI_SANITY_VERSION" ||
        die "go install csi-sanity@$CSI_SANITY_VERSION failed ($(go version))"
    [[ $(sanity_version "$sanity") == "$CSI_SANITY_VERSION" ]] ||
        die "$sanity does not report $CSI_SANITY_VERSION after go install"
fi

# --- The GCE PD CSI driver on a fake cloud (scripts/anydriver-e2e.sh) ------------------------
# An independent CSI driver for the "any driver" e2e: Google's pd.csi.storage.gke.io at the
# version scripts/gce-pd-driver/go.mod pins, served by the small wrapper there. Built from the
# module proxy only (no VCS fallback), with go.sum enforced; rebuilt only when the wrapper's
# sources or the Go toolchain change (a hash of both is kept next to the binary). A cold build
# takes minutes on 2 cores.
GCE_PD_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/gce-pd-driver
GCE_PD_DIR=/opt/berth-ci/gce-pd-driver
GCE_PD_BIN=$GCE_PD_DIR/gce-pd-fake-csi
GCE_PD_VERSION=$(awk '$1 == "sigs.k8s.io/gcp-compute-persistent-disk-csi-driver" { print $2 }' "$GCE_PD_SRC/go.mod")
[[ -n $GCE_PD_VERSION ]] || die "$GCE_PD_SRC/go.mod does not require sigs.k8s.io/gcp-compute-persistent-disk-csi-driver"
gce_pd_hash=$( (cd "$GCE_PD_SRC" && cat go.mod go.sum main.go && go version) | sha256sum | cut -d' ' -f1)
if [[ -x $GCE_PD_BIN && -r $GCE_PD_DIR/source.sha256 && $(<"$GCE_PD_DIR/source.sha256") == "$gce_pd_hash" ]] &&
    [[ $("$GCE_PD_BIN" version 2>/dev/null) == "$GCE_PD_VERSION" ]]; then
    say "GCE PD CSI driver $GCE_PD_VERSION (fake cloud) present at $GCE_PD_BIN"
else
    proxy=$(go env GOPROXY | sed -E 's/[,|]direct$//')
    [[ -n $proxy && $proxy != direct && $proxy != off ]] ||
        die "GOPROXY is '$(go env GOPROXY)': the GCE PD driver is built through a module proxy only"
    say "building the GCE PD CSI driver $GCE_PD_VERSION (fake cloud) into $GCE_PD_BIN through $proxy"
    mkdir -p "$GCE_PD_DIR"
    rm -f "$GCE_PD_DIR/source.sha256"
    (cd "$GCE_PD_SRC" && GOPROXY=$proxy GOFLAGS='-mod=readonly -buildvcs=false' \
        go build -o "$GCE_PD_BIN.new" .) ||
        die "go build of $GCE_PD_SRC (GCE PD driver $GCE_PD_VERSION) failed ($(go version), GOPROXY=$proxy)"
    got=$("$GCE_PD_BIN.new" version) || die "$GCE_PD_BIN.new does not run"
    [[ $got == "$GCE_PD_VERSION" ]] || die "$GCE_PD_BIN.new links the driver at '$got', go.mod says $GCE_PD_VERSION"
    mv -f "$GCE_PD_BIN.new" "$GCE_PD_BIN"
    echo "$gce_pd_hash" >"$GCE_PD_DIR/source.sha256"
fi

# --- Kernel: loop devices and filesystems ----------------------------------------------------
if [[ ! -e /dev/loop-control ]]; then
    say "loading the loop module"
    modprobe loop 2>/dev/null || true
fi
[[ -c /dev/loop-control ]] || die "/dev/loop-control is missing and 'modprobe loop' did not create it"
for fs in btrfs xfs ext4 tmpfs; do
    if ! grep -qw "$fs" /proc/filesystems; then
        modprobe "$fs" 2>/dev/null || true
        grep -qw "$fs" /proc/filesystems || die "the kernel does not support $fs (modprobe $fs failed)"
    fi
done
say "ready"
