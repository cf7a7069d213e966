#!/usr/bin/env python3
"""Summarises a csi-sanity (Ginkgo v2) JUnit report for one kind.

Usage: sanity-report.py KIND JUNIT.xml OUT_DIR

Prints one line "csi-sanity KIND: specs run R, passed P, failed F, skipped S", then the failed
specs with their messages, and the skipped specs split into those whose capability belongs to the
pending upstream (allowed) and the others (a failure: the bar is every runnable spec run). Writes OUT_DIR/skipped.txt (every skipped spec and why) and OUT_DIR/counts.env
(run, passed, failed, skipped, skipped_other) for scripts/test.sh.
"""

import os
import re
import sys
import xml.etree.ElementTree as ET

def category(reason: str) -> str:
    """Every capability is implemented now: only the spec pending upstream may be skipped."""
    return "pending upstream" if reason == "pending" else ""


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    kind, junit, out_dir = sys.argv[1:]
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as err:
        print(f"csi-sanity {kind}: no usable JUnit report at {junit}: {err}")
        return 1

    passed, failed, skipped = [], [], []
    for case in root.iter("testcase"):
        name = " ".join(case.get("name", "?").split())
        status = case.get("status", "")
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skip = case.find("skipped")
        if failure is not None or status in ("failed", "panicked", "interrupted", "timedout", "aborted"):
            message = "" if failure is None else (failure.get("message") or failure.text or "")
            failed.append((name, " ".join(message.split())[:600]))
        elif skip is not None or status in ("skipped", "pending"):
            reason = "" if skip is None else (skip.get("message") or "")
            reason = reason.removeprefix("skipped - ").strip() or status
            skipped.append((name, reason))
        else:
            passed.append(name)

    # A failure the host forces, named by csi-sanity.sh (name and message must both match). It is
    # reported loudly, not hidden: see docs/testing.md.
    allowed = os.environ.get("SANITY_EXPECTED_FAILURE", "")
    expected = []
    if allowed:
        name_re, _, message_re = allowed.partition("::")
        expected = [(n, m) for n, m in failed if re.search(name_re, n) and re.search(message_re, m)]
        failed = [f for f in failed if f not in expected]
        passed_or_expected = len(passed) + len(expected)
    else:
        passed_or_expected = len(passed)
    run = passed_or_expected + len(failed)
    pending = sum(1 for _, r in skipped if r == "pending")
    print(
        f"csi-sanity {kind}: specs run {run}, passed {len(passed)}, failed {len(failed)}, "
        f"skipped {len(skipped) - pending} (+{pending} pending upstream, not runnable)"
    )
    for name, message in expected:
        print(f"  EXPECTED FAILURE ({os.environ.get('SANITY_EXPECTED_WHY', 'host restriction')}): {name}")
        print(f"          {message}")
    for name, message in failed:
        print(f"  FAILED: {name}")
        if message:
            print(f"          {message}")

    os.makedirs(out_dir, exist_ok=True)
    other = [(n, r) for n, r in skipped if not category(r)]
    skipped_path = os.path.join(out_dir, "skipped.txt")
    with open(skipped_path, "w", encoding="utf-8") as f:
        f.write(f"# csi-sanity {kind}: {len(skipped)} skipped specs ({len(skipped) - len(other)} allowed, {len(other)} other)\n")
        for name, reason in skipped:
            f.write(f"{category(reason) or 'OTHER'}\t{name}\t{reason}\n")
    print(f"  skipped {len(skipped)}: {len(skipped) - len(other)} for pending upstream, {len(other)} other; list in {skipped_path}")
    for name, reason in other:
        print(f"  SKIPPED (not allowed): {name}: {reason}")

    with open(os.path.join(out_dir, "counts.env"), "w", encoding="utf-8") as f:
        f.write(f"run={run}\npassed={len(passed)}\nfailed={len(failed)}\nexpected_failures={len(expected)}\n"
            f"skipped={len(skipped)}\nskipped_other={len(other)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
