#!/usr/bin/env bash
# A newcomer's first session, automated: copy the checkout to a temporary directory (no venv,
# no caches), then run only commands taken from the docs, verbatim:
#   1. README.md's quick-start demo command (a clean venv, `pip install -e '.[local]'`, the
#      demo);
#   2. the block under "Try them on the stand-in" in docs/operations.md, the page the README
#      sends an operator to (demo --detach, list, restore --verify, doctor, status, kill).
# It fails if a command fails or its output misses what the docs promise. .ci/run runs it
# after the test suite; pytest does not (it installs a package and starts servers).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/instance-agent-newcomer.XXXXXX")"
checkout="$work/instance-agent"
marker='<!-- tests/newcomer.sh runs the next block as it is -->'
operations=docs/operations.md

cleanup() {
    # A block that failed half-way may have left the stand-in running.
    if [[ -f "$checkout/demo.env" ]]; then
        pid="$(sed -n 's/^export DEMO_PID=//p' "$checkout/demo.env")"
        if [[ -n "$pid" ]]; then
            kill "$pid" 2>/dev/null || true
        fi
    fi
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "newcomer: FAILED: $*" >&2
    exit 1
}

expect() {  # expect FILE TEXT: the output must contain TEXT
    grep -qF -- "$2" "$1" || fail "expected '$2' in the output (see above)"
}

mkdir -p "$checkout"
tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude='*/__pycache__' \
    --exclude='*.egg-info' --exclude=./.pytest_cache --exclude=./.mypy_cache \
    --exclude=./.ruff_cache --exclude=./demo.env --exclude=./restored -cf - . |
    tar -C "$checkout" -xf -
cd "$checkout"

quick_start="$(grep -m1 -E '^python3 -m venv \.venv && .*instance-agent demo$' README.md)" ||
    fail "README.md has no quick-start demo command"
echo "newcomer: \$ $quick_start"
bash -euo pipefail -c "$quick_start" 2>&1 | tee "$work/quick-start.out"
expect "$work/quick-start.out" "demo passed"

block="$(awk -v marker="$marker" '
    $0 == marker { armed = 1; next }
    armed && /^```/ { if (inside) exit; inside = 1; next }
    inside { print }
' "$operations")"
[[ -n "$block" ]] || fail "$operations has no block after: $marker"
echo "newcomer: running the block of $operations:"
while IFS= read -r line; do
    echo "newcomer: | $line"
done <<<"$block"
bash -euo pipefail -c "$block" 2>&1 | tee "$work/stand-in.out"

out="$work/stand-in.out"
expect "$out" "stand-in running in the background"
expect "$out" '"group": "demo-asg"'                                  # list (JSON: not a TTY)
expect "$out" "against the manifest: identical"                     # restore --verify
expect "$out" "✓ s3 permissions"                                     # doctor
expect "$out" "✓ topic"
expect "$out" "nothing is broken"
expect "$out" "no watcher runs on the stand-in"                      # status exits 1
[[ -d restored ]] || fail "restore created no restored/ directory"
for _ in $(seq 300); do  # the stand-in removes demo.env as it stops
    [[ -e demo.env ]] || break
    sleep 0.1
done
[[ ! -e demo.env ]] || fail "the stand-in did not stop (demo.env is still there)"
echo "newcomer: passed"
