"""The hostile-input corpus: malformed and hostile variants of one patient's DXA T-score.

Generated, never hand-kept: `cases(resource)` turns one valid resource (a dict) into the
bytes of every kind of bad input this project must survive, each a JSON document meant to
stand where that resource stood (a file, an NDJSON line, a Bundle entry, a prefetch entry, a
server's search result). `python tests/hostile/generate.py OUT` writes them as files, to try
by hand (`fhir-aibl assess OUT/...`); the tests build them at test time.

Each case says how it must be met:

- `not-json`: the bytes are not JSON; the document that holds them (file, line, request body,
  server answer) is refused as a whole;
- `refused`: JSON that FHIR JSON forbids and `fhir_aibl.jsoninput` refuses as it enters
  (duplicate keys, nesting deeper than its bound); a file Bundle loses that resource only;
- `invalid`: parsed, but not a valid FHIR resource (wrong JSON types, null, a 2 MB string,
  not an object, no or an unknown resourceType, an element the model does not know);
- `benign`: odd but allowed (a byte order mark at the start of a file): used as if clean.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

#: Nesting the project refuses (jsoninput.MAX_DEPTH is 64) and nesting orjson refuses (1,024).
DEEP_EXTENSIONS = 150
DEEP_ARRAYS = 5_000


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  #: not-json, refused, invalid, benign
    data: bytes  #: one JSON document (or what should have been one)
    #: the bytes can be spliced into a larger JSON document as a value
    spliceable: bool = True


def _dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _with(resource: dict, **changes) -> dict:
    out = copy.deepcopy(resource)
    for dotted, value in changes.items():
        holder = out
        *parents, leaf = dotted.split("__")
        for name in parents:
            holder = holder.setdefault(name, {})
        holder[leaf] = value
    return out


def _nested_extension(levels: int) -> dict:
    ext: dict = {"url": "http://example.org/leaf", "valueString": "x"}
    for _ in range(levels):
        ext = {"url": "http://example.org/node", "extension": [ext]}
    return ext


def cases(resource: dict, other_patient: str = "Patient/someone-else") -> list[Case]:
    """Every hostile variant of `resource` (an Observation with valueQuantity, effectiveDateTime, subject)."""
    good = _dumps(resource)
    assert good.endswith(b"}")
    value = resource["valueQuantity"]["value"]
    out = [
        # -- not JSON at all
        Case("truncated", "not-json", good[: len(good) // 2], spliceable=False),
        Case("trailing-garbage", "not-json", good + b"}", spliceable=False),
        Case("nan", "not-json", good.replace(_dumps(value), b"NaN", 1)),
        Case("infinity", "not-json", good.replace(_dumps(value), b"-Infinity", 1)),
        Case("number-out-of-range", "not-json", good.replace(_dumps(value), b"1e400", 1)),
        Case("invalid-utf8", "not-json", good.replace(b'"final"', b'"fin\xffal"', 1)),
        Case("lone-surrogate", "not-json", good.replace(b'"final"', b'"fin\\ud800al"', 1)),
        Case("single-quotes", "not-json", good.replace(b'"final"', b"'final'", 1)),
        Case("arrays-beyond-1024", "not-json", good[:-1] + b',"extension":' + b"[" * DEEP_ARRAYS + b"]" * DEEP_ARRAYS + b"}"),
        Case("bom-inside", "not-json", b"{\xef\xbb\xbf" + good[1:]),
        Case("empty", "not-json", b"", spliceable=False),
        # -- JSON that FHIR JSON forbids, refused where it enters
        Case("duplicate-value", "refused",
             good.replace(_dumps(resource["valueQuantity"])[:-1], _dumps(resource["valueQuantity"])[:-1] + b',"value":1.0', 1)),
        Case("duplicate-subject", "refused", good[:-1] + b',"subject":' + _dumps({"reference": other_patient}) + b"}"),
        Case("duplicate-escaped-colon", "refused", good[:-1] + b',"note":[{"text":"a\\u003ab"}],"status":"final"}'),
        Case("deep-extension", "refused", _dumps(_with(resource, extension=[_nested_extension(DEEP_EXTENSIONS)]))),
        # -- parsed, but not a valid FHIR resource
        Case("value-as-string", "invalid", _dumps(_with(resource, valueQuantity__value=str(value)))),
        Case("date-as-integer", "invalid", _dumps(_with(resource, effectiveDateTime=20250110))),
        Case("status-as-boolean", "invalid", _dumps(_with(resource, status=True))),
        Case("unit-as-number", "invalid", _dumps(_with(resource, valueQuantity__unit=1))),
        Case("code-as-list", "invalid", _dumps(_with(resource, code=[resource["code"]]))),
        Case("category-as-object", "invalid", _dumps(_with(resource, category={"text": "imaging"}))),
        Case("value-null", "invalid", _dumps(_with(resource, valueQuantity__value=None))),
        Case("subject-null", "invalid", _dumps(_with(resource, subject=None))),
        Case("value-as-boolean", "invalid", _dumps(_with(resource, valueQuantity__value=True))),
        Case("huge-string", "invalid", _dumps(_with(resource, valueQuantity__unit="x" * (2 * 1024 * 1024)))),
        Case("unknown-element", "invalid", _dumps(_with(resource, patient={"reference": other_patient}))),
        Case("top-level-array", "invalid", _dumps([resource]), spliceable=False),
        Case("top-level-string", "invalid", b'"Observation"', spliceable=False),
        Case("top-level-null", "invalid", b"null", spliceable=False),
        Case("no-resource-type", "invalid", _dumps({k: v for k, v in resource.items() if k != "resourceType"}), spliceable=False),
        # -- allowed
        Case("bom-at-start", "benign", b"\xef\xbb\xbf" + good, spliceable=False),
    ]
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/hostile/generate.py OUT_DIR", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.fhir.fakes import observation

    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for case in cases(observation("hostile-ls", "p2", "38267-1", -2.8)):
        (out / f"{case.expect}-{case.name}.json").write_bytes(case.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
