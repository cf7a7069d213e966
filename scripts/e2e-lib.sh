# shellcheck shell=bash
# Checks shared by the kubectl sessions (scripts/kubectl-e2e.sh, scripts/controllers-e2e.sh,
# scripts/anydriver-e2e.sh). The sourcing script sets `work` (its temp dir), `KUBECTL` and the
# counters `passed` and `failed`.
# shellcheck disable=SC2154 # work is the sourcing script's

pass() { passed=$((passed + 1)); echo "PASS $1"; }
fail() {
    failed=$((failed + 1))
    echo "FAIL $1"
    if [[ -s $work/out ]]; then head -n 20 "$work/out" | awk '{ print "    | " $0 }'; fi
}

# expect NAME REGEX CMD...: CMD succeeds and its output (stdout+stderr) matches REGEX.
expect() {
    local name=$1 re=$2
    shift 2
    if "$@" >"$work/out" 2>&1 && grep -Eq -- "$re" "$work/out"; then pass "$name"; else fail "$name"; fi
}
# expect_fail NAME REGEX CMD...: CMD fails and its output matches REGEX.
expect_fail() {
    local name=$1 re=$2
    shift 2
    if ! "$@" >"$work/out" 2>&1 && grep -Eq -- "$re" "$work/out"; then pass "$name"; else fail "$name"; fi
}
# expect_no NAME REGEX CMD...: CMD succeeds and its output does not match REGEX.
expect_no() {
    local name=$1 re=$2
    shift 2
    if "$@" >"$work/out" 2>&1 && ! grep -Eq -- "$re" "$work/out"; then pass "$name"; else fail "$name"; fi
}
# eventually NAME SECONDS REGEX CMD...: CMD's output matches REGEX within SECONDS (polled).
eventually() {
    local name=$1 secs=$2 re=$3
    shift 3
    local deadline=$((SECONDS + secs))
    while :; do
        if "$@" >"$work/out" 2>&1 && grep -Eq -- "$re" "$work/out"; then
            pass "$name"
            return 0
        fi
        if ((SECONDS >= deadline)); then
            fail "$name (not within ${secs}s)"
            return 0
        fi
        sleep 0.2
    done
}
# gone NAME SECONDS OBJECT: `kubectl get OBJECT` answers NotFound within SECONDS.
gone() { eventually "$1" "$2" 'NotFound' missing "$3"; }
# missing OBJECT: succeeds (with kubectl's answer as output) when `kubectl get OBJECT` fails.
missing() { ! "$KUBECTL" get "$1"; }
# stays NAME SECONDS REGEX CMD...: CMD's output keeps matching REGEX for SECONDS.
stays() {
    local name=$1 secs=$2 re=$3
    shift 3
    local deadline=$((SECONDS + secs))
    while ((SECONDS < deadline)); do
        if ! { "$@" >"$work/out" 2>&1 && grep -Eq -- "$re" "$work/out"; }; then
            fail "$name"
            return 0
        fi
        sleep 0.5
    done
    pass "$name"
}
# k ARGS...: kubectl. jp OBJ JSONPATH: kubectl get OBJ -o jsonpath=JSONPATH.
k() { "$KUBECTL" "$@"; }
jp() { "$KUBECTL" get "$1" -o "jsonpath=$2"; }
