"""`fhir-aibl export` and `run --bulk` against the real test FHIR server's $export (system, Patient, Group)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import requests

from fhir_aibl.fhir import command as fhir_command
from fhir_aibl.bulk.command import run_export
from fhir_aibl.report.worklist import gaps_of

from ..fhir.conftest import AS_OF, fresh_server, loaded_server, run_command, sekmet_base_url, sekmet_seed  # noqa: F401


def export(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    fhir_command.add_arguments(parser, run=False)
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = run_export(args, environ={}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def ndjson_ids(folder: Path, rtype: str) -> set[str]:
    ids = set()
    for path in folder.glob(f"{rtype}.*.ndjson"):
        ids |= {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}
    return ids


def test_system_export_of_what_the_rules_read(loaded_server, tmp_path):
    code, out, err = export("--fhir-base", loaded_server, "--out", str(tmp_path))
    assert code == 0, err
    state = json.loads((tmp_path / "state.json").read_text())
    folder = tmp_path / state["folder"]
    types = {p.name.split(".")[0] for p in folder.glob("*.ndjson")}
    assert types == {"Patient", "Observation", "MedicationStatement", "MedicationRequest", "Condition", "FamilyMemberHistory"} | (
        # present only where the loaded records have them
        types & {"MedicationAdministration", "Medication", "DiagnosticReport", "Procedure", "ServiceRequest"}
    )
    assert "Encounter" not in types  # _type: only what the rules read
    assert "Patient/v06" in {f"Patient/{i}" for i in ndjson_ids(folder, "Patient")}
    assert state["transactionTime"] and f"exported {len(state['files'])} files" in out


def test_the_job_is_deleted_when_done(loaded_server, tmp_path, monkeypatch):
    deleted = []
    real = requests.Session.request

    def spy(self, method, url, *args, **kwargs):
        resp = real(self, method, url, *args, **kwargs)
        if method == "DELETE":
            deleted.append((url, resp.status_code))
        return resp

    monkeypatch.setattr(requests.Session, "request", spy)
    code, _out, err = export("--fhir-base", loaded_server, "--out", str(tmp_path))
    assert code == 0, err
    assert len(deleted) == 1 and "bulk-status" in deleted[0][0] and deleted[0][1] == 202
    assert requests.get(deleted[0][0], timeout=10).status_code == 404


def test_patient_level_export_warns_about_what_is_missing(loaded_server, tmp_path):
    code, _out, err = export("--fhir-base", loaded_server, "--out", str(tmp_path), "--level", "patient")
    assert code == 0, err
    folder = tmp_path / json.loads((tmp_path / "state.json").read_text())["folder"]
    # this server's Patient/$export leaves FamilyMemberHistory out (a system export keeps it: the first
    # test): the operator is told, and told what it means
    assert not list(folder.glob("FamilyMemberHistory.*"))
    assert "warning: the export has no FamilyMemberHistory" in err
    assert "parental hip fracture" in err and "system-level export" in err


def test_group_export_and_incremental_since(fresh_server, tmp_path):
    group = {"resourceType": "Group", "id": "ai-cohort", "type": "person", "actual": True,
             "member": [{"entity": {"reference": "Patient/v06"}}, {"entity": {"reference": "Patient/v07"}}]}
    assert requests.put(f"{fresh_server}/Group/ai-cohort", json=group, timeout=30).status_code in (200, 201)
    code, _out, err = export("--fhir-base", fresh_server, "--out", str(tmp_path), "--group", "ai-cohort")
    assert code == 0, err
    state = json.loads((tmp_path / "state.json").read_text())
    assert ndjson_ids(tmp_path / state["folder"], "Patient") == {"v06", "v07"}
    # a change after the export, then an incremental export: only what changed
    obs = {"resourceType": "Observation", "id": "new-bmi", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "39156-5"}]},
           "subject": {"reference": "Patient/v06"}, "effectiveDateTime": "2026-05-01",
           "valueQuantity": {"value": 18, "unit": "kg/m2", "system": "http://unitsofmeasure.org", "code": "kg/m2"}}
    assert requests.put(f"{fresh_server}/Observation/new-bmi", json=obs, timeout=30).status_code in (200, 201)
    code, out, err = export("--fhir-base", fresh_server, "--out", str(tmp_path), "--group", "ai-cohort", "--incremental")
    assert code == 0, err
    again = json.loads((tmp_path / "state.json").read_text())
    assert again["since"] == state["transactionTime"] and f"changes since {state['transactionTime']}" in out
    assert ndjson_ids(tmp_path / again["folder"], "Observation") == {"new-bmi"}
    assert not ndjson_ids(tmp_path / again["folder"], "Patient")
    assert "the export has no Patient: either there is none changed since" in err


def test_run_bulk_gives_what_run_all_gives(loaded_server, tmp_path):
    worklist = tmp_path / "worklist.csv"
    bulk = run_command("--fhir-base", loaded_server, "--bulk", "--out", str(tmp_path), "--as-of", AS_OF,
                       "--format", "json", "--workers", "2", "--worklist", str(worklist))
    rest = run_command("--fhir-base", loaded_server, "--all", "--as-of", AS_OF, "--format", "json")
    assert bulk.code in (0, 1), bulk.stderr
    by_patient = {a["patient"]: a for a in bulk.json()}
    assert len(by_patient) >= len(rest.json())
    for item in rest.json():  # every patient on an aromatase inhibitor, assessed the same way
        assert by_patient[item["patient"]] == item
    # and the export assessed with `assess` (one process) gives the same bytes
    state = json.loads((tmp_path / "state.json").read_text())
    one = run_command("--fhir-base", loaded_server, "--bulk", "--out", str(tmp_path / "again"), "--as-of", AS_OF,
                      "--format", "json", "--workers", "1")
    assert one.stdout == bulk.stdout
    listed = [line.split(",")[1] for line in worklist.read_text().splitlines()[1:]]
    assert sorted(listed) == sorted(a["patient"][8:] for a in bulk.json() if gaps_of(a)) and listed
    assert state["folder"]


def test_run_bulk_write_back_is_the_rest_write_back_and_resumable(fresh_server, tmp_path):
    first = run_command("--fhir-base", fresh_server, "--bulk", "--out", str(tmp_path / "a"), "--as-of", AS_OF,
                        "--write-back", "--workers", "2", "--format", "json")
    assert first.code == 0, first.stderr
    on_ai = [a for a in first.json() if a["ai_status"] in ("active", "planned")]
    assert f"write-back: written {len(on_ai)}, unchanged 0, failed 0" in first.stderr
    # what the Bulk run wrote is what a REST run would write: it finds every patient unchanged
    rest = run_command("--fhir-base", fresh_server, "--all", "--as-of", AS_OF, "--write-back")
    assert rest.code == 0, rest.stderr
    assert f"patients found {len(on_ai)}, assessed 0, written 0, unchanged {len(on_ai)}, failed 0" in rest.stderr
    # and a second Bulk run reads the CarePlans from its export and writes nothing
    again = run_command("--fhir-base", fresh_server, "--bulk", "--out", str(tmp_path / "b"), "--as-of", AS_OF,
                        "--write-back", "--format", "json")
    assert again.code == 0, again.stderr
    assert f"write-back: written 0, unchanged {len(on_ai)}, failed 0 (0 requests)" in again.stderr
    assert again.stdout == first.stdout


def test_export_with_smart_backend_services_against_the_servers_token_endpoint(sekmet_seed, tmp_path):
    """The server requires a SMART token on every request, the manifest says requiresAccessToken: the
    connector's SMART authentication gets a token from the server's own token endpoint, and the
    downloads carry it."""
    from joserfc.jwk import ECKey

    from ..fhir_server import SekmetUnavailable, sekmet_server, unavailable

    key = ECKey.generate_key("P-384", private=True)
    private = {**key.as_dict(private=True), "kid": "aibl-test", "alg": "ES384"}
    public = {**key.as_dict(private=False), "kid": "aibl-test", "alg": "ES384"}
    key_file = tmp_path / "client-key.json"
    key_file.write_text(json.dumps({"keys": [private]}))
    config = {"server_auth": {"types": ["smart"], "smart_clients": [
        {"client_id": "fhir-aibl", "jwks": {"keys": [public]}, "scopes": "system/*.*"}]}}
    try:
        server = sekmet_server(tmp_path / "srv", seed=sekmet_seed.data_dir, extra_config=config)
        base = server.__enter__()
    except SekmetUnavailable as exc:
        unavailable(str(exc))
    try:
        assert requests.get(f"{base}/Patient/v06", timeout=30).status_code == 401  # no token, no data
        code, out, err = export("--fhir-base", base, "--out", str(tmp_path / "out"),
                                "--smart-client-id", "fhir-aibl", "--smart-key", str(key_file))
        assert code == 0, err
        state = json.loads((tmp_path / "out" / "state.json").read_text())
        assert "v06" in ndjson_ids(tmp_path / "out" / state["folder"], "Patient")
        assert "FamilyMemberHistory.000.ndjson" in state["files"]
        # the default scopes read and write back, not delete: this server refuses the job's DELETE,
        # which is a warning, not a failed export
        assert "warning: the server did not delete the export job" in err and "403" in err
    finally:
        server.__exit__(None, None, None)
