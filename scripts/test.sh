#!/usr/bin/env bash
# THE test command of Berth (what `.ci/run` runs). As root on Debian 12:
#   1. installs what the tests need (scripts/ci-install.sh) and clears what earlier runs left;
#   2. lints: shellcheck, cargo fmt --check, cargo clippy -D warnings;
#   3. builds `berth` and runs `cargo test --workspace` (the end-to-end tests need root);
#   4. runs csi-sanity v5.5.0 against `berth csi` for each kind: dir, fs-ext4, fs-xfs, block, tmpfs;
#   5. runs the docker e2e, and the kubectl session against `berth server` (Debian's kubectl 1.20,
#      then the preinstalled newer kubectl when there is one);
#   6. runs the storage controllers through kubectl with Berth's driver (controllers-e2e) and with
#      an independent one, the GCE PD driver on a fake cloud (anydriver-e2e).
# Every step runs even when an earlier one failed (unless the build failed), so one run shows
# everything. The last line is "N passed, N failed": cargo tests plus csi-sanity specs, plus one
# failure for each step that failed without counting tests (lint, build, a sanity run that broke).
# Exits non-zero on any failure.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
for dir in "$HOME/.cargo/bin" /usr/local/go/bin; do
    if [[ -d $dir && :$PATH: != *:$dir:* ]]; then
        PATH=$PATH:$dir
    fi
done
export PATH CARGO_TERM_COLOR=never NO_COLOR=1

started=$(date +%s)
passed=0
failed=0
summary=()
failed_steps=()

step_done() { # NAME STATUS DETAIL
    local secs=$(($(date +%s) - step_start))
    summary+=("$(printf '%-24s %-6s %4ss  %s' "$1" "$2" "$secs" "${3:-}")")
    if [[ $2 == FAIL ]]; then
        failed_steps+=("$1")
    fi
}
banner() {
    step_start=$(date +%s)
    echo
    echo "=== $* ($(date -u +%H:%M:%S))"
}

banner "install test dependencies"
if ! scripts/ci-install.sh; then
    echo "test.sh: scripts/ci-install.sh failed; nothing can be tested" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
step_done install ok

banner "clean up after earlier runs"
if scripts/teardown.sh --stray; then
    step_done stray-cleanup ok
else
    # Leftovers of another run are not this run's failure, but say so.
    step_done stray-cleanup warn "some earlier test dirs could not be removed"
fi

target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
logs=$target_dir/test-logs
mkdir -p "$logs"

banner "shellcheck"
if shellcheck -x scripts/*.sh scripts/controllers-e2e.d/*.sh .ci/run; then
    step_done shellcheck ok
else
    step_done shellcheck FAIL
    failed=$((failed + 1))
fi

banner "cargo fmt --check"
if cargo fmt --all -- --check; then
    step_done fmt ok
else
    step_done fmt FAIL "run: cargo fmt --all"
    failed=$((failed + 1))
fi

banner "cargo clippy -D warnings"
if cargo clippy --workspace --all-targets -- -D warnings; then
    step_done clippy ok
else
    step_done clippy FAIL
    failed=$((failed + 1))
fi

# Debug build: `cargo test` builds the same profile, so the binary comes for free there, and on 2
# cores a release build would cost more than csi-sanity gains from it.
banner "cargo build -p berth"
built=0
if cargo build -p berth; then
    built=1
    step_done build ok
else
    step_done build FAIL
    failed=$((failed + 1))
fi

banner "cargo test --workspace"
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$logs/cargo-test.log"
test_rc=${PIPESTATUS[0]}
set -e
read -r tp tf < <(awk '/^test result:/ {
        for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i }
    } END { print p + 0, f + 0 }' "$logs/cargo-test.log")
passed=$((passed + tp))
failed=$((failed + tf))
if ((test_rc == 0)); then
    step_done cargo-test ok "$tp passed, $tf failed"
elif ((tf > 0)); then
    step_done cargo-test FAIL "$tp passed, $tf failed"
else
    step_done cargo-test FAIL "cargo test exited $test_rc without a failed test (did it build?)"
    failed=$((failed + 1))
fi

for kind in dir fs-ext4 fs-xfs block tmpfs; do
    banner "csi-sanity $kind"
    if ((built == 0)); then
        step_done "csi-sanity $kind" FAIL "not run: the build failed"
        failed=$((failed + 1))
        continue
    fi
    out=$target_dir/csi-sanity
    rm -f "$out/$kind/counts.env"
    set +e
    BERTH_BIN=$target_dir/debug/berth SANITY_OUT_DIR=$out scripts/csi-sanity.sh "$kind"
    rc=$?
    set -e
    sp=0 sf=0 ss=0
    if [[ -r $out/$kind/counts.env ]]; then
        sp=$(sed -n 's/^passed=//p' "$out/$kind/counts.env")
        sf=$(sed -n 's/^failed=//p' "$out/$kind/counts.env")
        ss=$(sed -n 's/^skipped=//p' "$out/$kind/counts.env")
    fi
    passed=$((passed + sp))
    failed=$((failed + sf))
    if ((rc == 0)); then
        step_done "csi-sanity $kind" ok "$sp passed, $sf failed, $ss skipped"
    else
        step_done "csi-sanity $kind" FAIL "$sp passed, $sf failed, $ss skipped (see above)"
        if ((sf == 0)); then
            failed=$((failed + 1)) # a leak, a crash or a broken run: count it
        fi
    fi
done

banner "docker e2e (socket and managed plugins)"
if ((built == 0)); then
    step_done "docker e2e" FAIL "not run: the build failed"
    failed=$((failed + 1))
else
    set +e
    BERTH_BIN=$target_dir/debug/berth scripts/docker-e2e.sh | tee "$target_dir/docker-e2e.log"
    rc=${PIPESTATUS[0]}
    set -e
    counts=$(grep -E '^docker-e2e: [0-9]+ passed, [0-9]+ failed' "$target_dir/docker-e2e.log" | tail -n 1)
    dp=$(sed -E 's/^docker-e2e: ([0-9]+) passed.*/\1/' <<<"${counts:-docker-e2e: 0 passed}")
    df_=$(sed -E 's/^docker-e2e: [0-9]+ passed, ([0-9]+) failed.*/\1/' <<<"${counts:-docker-e2e: 0 passed, 0 failed}")
    passed=$((passed + dp))
    failed=$((failed + df_))
    if ((rc == 0)); then
        step_done "docker e2e" ok "$dp passed, $df_ failed"
    else
        step_done "docker e2e" FAIL "$dp passed, $df_ failed (exit $rc)"
        if ((df_ == 0)); then
            failed=$((failed + 1))
        fi
    fi
fi

# The kubectl session: Debian's kubectl 1.20 (ci-install.sh unpacks it), then, as a second
# client, a newer kubectl on PATH when the machine has one.
kubectls=(/opt/berth-ci/kubernetes-client/usr/bin/kubectl)
if [[ -x /usr/bin/kubectl ]]; then
    kubectls+=(/usr/bin/kubectl)
fi
# counted LABEL PREFIX CMD...: runs a script that ends with "PREFIX: N passed, N failed" and
# adds its counts to the totals.
counted() {
    local label=$1 prefix=$2
    shift 2
    banner "$label"
    if ((built == 0)); then
        step_done "$label" FAIL "not run: the build failed"
        failed=$((failed + 1))
        return 0
    fi
    local rc counts kp kf
    set +e
    "$@" | tee "$target_dir/$prefix.log"
    rc=${PIPESTATUS[0]}
    set -e
    counts=$(grep -E "^$prefix: [0-9]+ passed, [0-9]+ failed" "$target_dir/$prefix.log" | tail -n 1)
    kp=$(sed -E "s/^$prefix: ([0-9]+) passed.*/\1/" <<<"${counts:-$prefix: 0 passed}")
    kf=$(sed -E "s/^$prefix: [0-9]+ passed, ([0-9]+) failed.*/\1/" <<<"${counts:-$prefix: 0 passed, 0 failed}")
    passed=$((passed + kp))
    failed=$((failed + kf))
    if ((rc == 0)); then
        step_done "$label" ok "$kp passed, $kf failed"
    else
        step_done "$label" FAIL "$kp passed, $kf failed (exit $rc)"
        if ((kf == 0)); then
            failed=$((failed + 1))
        fi
    fi
}

for kc in "${kubectls[@]}"; do
    label="kubectl e2e $("$kc" version --client -o json 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])' 2>/dev/null || echo "?")"
    counted "$label" kubectl-e2e env BERTH_BIN="$target_dir/debug/berth" KUBECTL="$kc" scripts/kubectl-e2e.sh
done

# The storage control plane through kubectl, against the all-in-one server (issue 5).
counted "controllers e2e" controllers-e2e env BERTH_BIN="$target_dir/debug/berth" scripts/controllers-e2e.sh

# The same flow through a CSI driver Berth did not write: Google's GCE PD driver, from the Go
# module proxy, on its own fake cloud (issue 5, must-show 3; scripts/ci-install.sh builds it).
counted "anydriver e2e (GCE PD)" anydriver-e2e env BERTH_BIN="$target_dir/debug/berth" scripts/anydriver-e2e.sh

# Smoke runs of the benchmarks: they must keep working; figures at this size mean little.
for bench in api bind "bind --dynamic 100" csi snapshot fio; do
    banner "berth bench $bench --smoke"
    # shellcheck disable=SC2086 # "bind --dynamic 100" is a command and its flags
    if ((built == 0)); then
        step_done "bench $bench smoke" FAIL "not run: the build failed"
        failed=$((failed + 1))
    elif BERTH_LOG=warn "$target_dir/debug/berth" bench $bench --smoke; then
        step_done "bench $bench smoke" ok
    else
        step_done "bench $bench smoke" FAIL
        failed=$((failed + 1))
    fi
done

if [[ -s "$logs/cargo-test.log" ]] && grep -q '^---- .* stdout ----$' "$logs/cargo-test.log"; then
    # The panic message of each failed test, without backtraces, so the end of the log says why.
    echo
    echo "=== failed tests"
    awk '/^---- .* stdout ----$/ { keep = 1; n = 0; print; next }
         /^stack backtrace:/ || /^failures:$/ { keep = 0 }
         keep && n < 20 { print; n++ }' "$logs/cargo-test.log"
fi

echo
echo "=== summary ($(($(date +%s) - started)) s)"
printf '%s\n' "${summary[@]}"
if ((${#failed_steps[@]} > 0)); then
    echo "failed: ${failed_steps[*]}"
fi
echo "$passed passed, $failed failed"
if ((failed > 0)); then
    exit 1
fi
