#!/usr/bin/env bash
# Build the sdist and the wheel (the wheel from the sdist, so both are complete), install the
# wheel into a fresh virtual environment outside the checkout, and from another folder run what
# a hospital would: demo, assess on a worked example, rules check, rules doc, and serve (CDS
# Hooks discovery and one patient-view call on a free port of 127.0.0.1).
# Usage: bash scripts/check_wheel.sh [PYTHON]   (default: python3). CI runs it (.ci/run).
set -euo pipefail
PYTHON="${1:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
step() { echo "check_wheel: $*"; }

step "building the sdist and the wheel"
"$PYTHON" -m venv "$WORK/build-env"
"$WORK/build-env/bin/pip" install -q build
"$WORK/build-env/bin/python" -m build --outdir "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
ls "$WORK/dist"
SDIST=$(ls "$WORK"/dist/*.tar.gz)
WHEEL=$(ls "$WORK"/dist/*.whl)
tar -tzf "$SDIST" > "$WORK/sdist.txt"
for member in rules/aibl.yaml rules/recommendations.yaml rules/valuesets/medications.yaml fixtures/bundles/V06.json fixtures/expected.json LICENSE; do
    grep -q "/$member\$" "$WORK/sdist.txt" || { echo "check_wheel: the sdist lacks $member"; exit 1; }
done

step "installing the wheel into a fresh environment"
"$PYTHON" -m venv "$WORK/env"
"$WORK/env/bin/pip" install -q "$WHEEL"
BIN="$WORK/env/bin"
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"   # not the checkout: nothing may be found relative to it

PKG=$("$BIN/python" -c 'import fhir_aibl, pathlib; print(pathlib.Path(fhir_aibl.__file__).parent)')
case "$PKG" in "$WORK"/env/*) ;; *) echo "check_wheel: fhir_aibl imported from $PKG, not the wheel"; exit 1;; esac
EXAMPLES=$("$BIN/python" -c 'from fhir_aibl.resources import examples_dir; print(examples_dir())')
case "$EXAMPLES" in "$PKG"/*) ;; *) echo "check_wheel: worked examples at $EXAMPLES, not in the package"; exit 1;; esac
test -f "$PKG/rules/aibl.yaml" && test -d "$PKG/rules/valuesets" && test -f "$PKG/rules/recommendations.yaml"
test -n "$(find "$WORK"/env/lib/python*/site-packages/fhir_aibl-*.dist-info -name LICENSE)" \
    || { echo "check_wheel: the wheel carries no LICENSE"; exit 1; }

"$BIN/fhir-aibl" --version

step "demo"
"$BIN/fhir-aibl" demo --out "$WORK/demo" > "$WORK/demo.txt"
tail -3 "$WORK/demo.txt"
N=$(find "$EXAMPLES/bundles" -name '*.json' | wc -l)
grep -q "^$N patients assessed, 0 inputs rejected.$" "$WORK/demo.txt" || { echo "check_wheel: the demo did not assess the $N worked examples"; exit 1; }
test -s "$WORK/demo/careplans-bundle.json" && test -s "$WORK/demo/assessments.json"

step "assess a worked example"
"$BIN/fhir-aibl" assess "$EXAMPLES/bundles/V06.json" --as-of 2026-06-01 --format json > "$WORK/v06.json"
"$BIN/python" - "$WORK/v06.json" <<'EOF'
import json, sys
[result] = json.load(open(sys.argv[1]))
assert (result["patient"], result["category"]) == ("Patient/v06", "high"), result
EOF
"$BIN/fhir-aibl" assess "$EXAMPLES/bundles/V06.json" --as-of 2026-06-01 --format fhir > "$WORK/v06-fhir.json"
grep -q '"resourceType": "CarePlan"' "$WORK/v06-fhir.json"

step "the worklist and the population report (their templates are package data)"
"$BIN/fhir-aibl" assess "$EXAMPLES/bundles" --as-of 2026-06-01 --format json --worklist "$WORK/worklist.csv" \
    --report "$WORK/report.html" > "$WORK/examples.json"
grep -q '<svg id="category-chart"' "$WORK/report.html" && grep -q '^priority,patient,' "$WORK/worklist.csv"
"$BIN/fhir-aibl" report "$WORK/examples.json" --as-of 2026-06-01 --report "$WORK/report-again.html"
cmp "$WORK/report.html" "$WORK/report-again.html"

step "rules check"
"$BIN/fhir-aibl" rules check | tail -2

step "rules doc"
"$BIN/fhir-aibl" rules doc > /dev/null
test -s rules.md && test -s rules.html
test ! -e "$PKG/docs" && test ! -e "$(dirname "$PKG")/docs" || { echo "check_wheel: rules doc wrote into the installed package"; exit 1; }

step "serve"
PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'as_of: 2026-06-01\nfeedback: {database: %s/cds.sqlite3}\n' "$WORK" > cds.yaml
"$BIN/fhir-aibl" serve --allow-unsigned --config cds.yaml --host 127.0.0.1 --port "$PORT" --log-level warning 2> "$WORK/serve.log" &
SERVER_PID=$!
"$BIN/python" - "$PORT" "$EXAMPLES/bundles/V06.json" <<'EOF'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}/cds-services"
deadline = time.monotonic() + 60
while True:
    try:
        discovery = json.load(urllib.request.urlopen(base, timeout=5))
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("check_wheel: the service did not answer discovery within 60 s")
        time.sleep(0.5)
ids = sorted(s["id"] for s in discovery["services"])
assert ids == ["aibl-order-select", "aibl-patient-view"], ids
from fhir_aibl.cds import patient_view_request
body = json.dumps(patient_view_request(json.load(open(sys.argv[2])))).encode()
request = urllib.request.Request(f"{base}/aibl-patient-view", data=body, headers={"Content-Type": "application/json"})
cards = json.load(urllib.request.urlopen(request, timeout=30))["cards"]
assert cards and "high risk" in cards[0]["summary"].lower(), cards
print(f"discovery: {', '.join(ids)}; patient-view: {cards[0]['summary']}")
EOF
kill "$SERVER_PID"
# uvicorn shuts down on SIGTERM and then re-raises it: 143 (128 + 15) is a clean stop too.
STATUS=0; wait "$SERVER_PID" || STATUS=$?
SERVER_PID=""
if [ "$STATUS" != 0 ] && [ "$STATUS" != 143 ]; then echo "check_wheel: serve stopped with $STATUS"; cat "$WORK/serve.log"; exit 1; fi

step "OK: the wheel works outside the checkout"
