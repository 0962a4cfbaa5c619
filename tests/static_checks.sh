#!/usr/bin/env bash
# Static security checks, run by CI after the tests:
#
# 1. bandit over the shipped code: no medium or high finding may stand unless it is
#    justified in place (`# nosec BXXX - reason` on the flagged line).
# 2. pip-audit over the runtime dependencies, pinned to the versions installed in the venv
#    (the closure of instance-agent's requirements, test tools excluded).
#
# pip-audit needs PyPI's vulnerability data (the JSON API's `vulnerabilities`) or OSV. When
# neither can be reached, the script says so and that check alone is skipped (exit 0); any
# other failure, and any known vulnerability, fails the script.
#
# Usage: tests/static_checks.sh            (PYTHON=/path/to/venv/bin/python to pick the venv)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
if [[ ! -x $PYTHON ]]; then
    PYTHON=$(command -v python3)
fi
for tool in bandit pip_audit; do
    if ! "$PYTHON" -c "import $tool" 2>/dev/null; then
        echo "static checks: $tool is not installed in $PYTHON's environment" >&2
        echo "  install it with: $PYTHON -m pip install bandit pip-audit" >&2
        exit 1
    fi
done

status=0

echo "== bandit: instance_agent lambda_trigger (medium and high severity)"
if "$PYTHON" -m bandit -r instance_agent lambda_trigger --severity-level medium -q; then
    echo "bandit: no medium or high findings"
else
    echo "bandit: FAILED — fix each finding above or justify it in place with" \
         "'# nosec BXXX - reason'" >&2
    status=1
fi

echo "== pip-audit: runtime dependencies"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The runtime closure, as installed: what an instance would run (boto3 and its
# dependencies, requests, watchdog, zstandard, tomli on 3.10), with exact versions.
"$PYTHON" - >"$work/requirements.txt" <<'EOF'
import importlib.metadata as md
import re

from packaging.requirements import Requirement


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


pins: dict[str, str] = {}
todo = [("instance-agent", frozenset())]
while todo:
    name, extras = todo.pop()
    dist = md.distribution(name)
    if norm(name) != "instance-agent":
        pins[norm(name)] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        markers = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is not None and not any(req.marker.evaluate(m) for m in markers):
            continue
        if norm(req.name) not in pins:
            todo.append((req.name, frozenset(req.extras)))
for name, version in sorted(pins.items()):
    print(f"{name}=={version}")
EOF
sed 's/^/  /' "$work/requirements.txt"

audit() {  # $1: vulnerability service (pypi or osv)
    "$PYTHON" -m pip_audit --disable-pip --no-deps --progress-spinner off \
        --vulnerability-service "$1" --format json --output "$work/audit-$1.json" \
        -r "$work/requirements.txt" 2>"$work/audit-$1.err"
}

# Reads one pip-audit JSON report; prints a summary and exits 0 clean, 1 vulnerable,
# 3 when no dependency could be audited (the advisory data was unreachable).
summarise() {
    "$PYTHON" - "$1" <<'EOF'
import json
import sys

report = json.load(open(sys.argv[1]))
deps = report.get("dependencies", [])
skipped = [d for d in deps if d.get("skip_reason")]
vulns = [(d["name"], d["version"], v["id"], ", ".join(v.get("fix_versions", [])))
         for d in deps for v in d.get("vulns", [])]
for name, version, vid, fixed in vulns:
    print(f"  VULNERABLE {name} {version}: {vid} (fixed in {fixed or 'no release yet'})")
if deps and len(skipped) == len(deps):
    print(f"  none of the {len(deps)} dependencies could be audited: "
          f"{skipped[0]['skip_reason']}")
    sys.exit(3)
for d in skipped:
    print(f"  NOT AUDITED {d['name']} {d['version']}: {d['skip_reason']}")
if vulns or skipped:
    sys.exit(1)
print(f"  {len(deps)} dependencies audited, no known vulnerabilities")
EOF
}

network_error='ConnectionError|Max retries exceeded|Name or service not known|Temporary failure in name resolution|Network is unreachable|timed out|getaddrinfo'
unreachable=()
audited=0
for service in pypi osv; do
    if audit "$service"; then rc=0; else rc=$?; fi
    if [[ -s $work/audit-$service.json ]]; then
        if summarise "$work/audit-$service.json"; then s=0; else s=$?; fi
        if ((s == 3)); then
            unreachable+=("$service: no vulnerability data served for these versions")
            continue
        fi
        audited=1
        if ((s != 0)); then status=1; fi
        echo "pip-audit ($service): $( ((s == 0)) && echo clean || echo FAILED)"
        break
    elif grep -Eq "$network_error" "$work/audit-$service.err"; then
        unreachable+=("$service: $(grep -Eo "$network_error" "$work/audit-$service.err" | head -1)")
    else
        echo "pip-audit ($service) failed (exit $rc):" >&2
        cat "$work/audit-$service.err" >&2
        status=1
        audited=1
        break
    fi
done
if ((!audited)); then
    reasons=$(printf '%s; ' "${unreachable[@]}")
    echo "pip-audit: NOT RUN — no vulnerability service is reachable from this machine" \
         "(${reasons%; }). The runtime dependencies above are unaudited; run" \
         "tests/static_checks.sh where pypi.org's JSON API or api.osv.dev answers."
fi

exit $status
