"""`run --bulk --incremental [--write-back]` against the real test FHIR server's $export with _since:
whole records from the store, only changed patients assessed and written back, the whole Group reported,
equal to a full export of the same server state; deletions; an interrupted run resumed."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import pytest
import requests

from fhir_aibl.bulk import incremental as incremental_module

from ..fhir.conftest import AS_OF, fresh_server, run_command, sekmet_seed  # noqa: F401

MEMBERS = [f"v{n:02d}" for n in range(1, 13)]
LATER = (dt.date.fromisoformat(AS_OF) + dt.timedelta(days=800)).isoformat()


class Spy:
    """Every request the command sends: (method, url, body)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str, str]] = []
        real = requests.Session.request

        def spy(session, method, url, *args, **kwargs):
            body = kwargs.get("data") or b""
            params = kwargs.get("params")
            where = url + (f" {params}" if params else "")
            self.calls.append((method, where, body.decode() if isinstance(body, bytes) else str(body)))
            return real(session, method, url, *args, **kwargs)

        monkeypatch.setattr(requests.Session, "request", spy)

    def clear(self) -> None:
        self.calls.clear()

    def exports(self) -> list[str]:
        return [url for method, url, _ in self.calls if "$export" in url]

    def writes(self) -> list[str]:
        return [body for method, _url, body in self.calls if method in ("POST", "PUT")]


def make_group(base: str) -> None:
    group = {"resourceType": "Group", "id": "ai-cohort", "type": "person", "actual": True,
             "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in MEMBERS]}
    assert requests.put(f"{base}/Group/ai-cohort", json=group, timeout=30).status_code in (200, 201)


def bulk(base, out, *extra, as_of=AS_OF):
    return run_command("--fhir-base", base, "--bulk", "--group", "ai-cohort", "--out", str(out), "--as-of", as_of,
                       "--format", "json", "--workers", "1", *extra)


def lowest_dxa_of_v06(base: str) -> dict:
    found = []
    for oid in ("v06-dxa-ls", "v06-dxa-th", "v06-dxa-fn"):
        found.append(requests.get(f"{base}/Observation/{oid}", timeout=30).json())
    return min(found, key=lambda o: o["valueQuantity"]["value"])


def test_done_when_a_group_written_back_then_only_the_change(fresh_server, tmp_path, monkeypatch):
    make_group(fresh_server)
    spy = Spy(monkeypatch)
    first = bulk(fresh_server, tmp_path / "inc", "--incremental", "--write-back")
    assert first.code == 0, first.stderr
    everyone = first.json()
    assert sorted(a["patient"] for a in everyone) == sorted(f"Patient/{p}" for p in MEMBERS)
    on_ai = [a for a in everyone if a["ai_status"] in ("active", "planned")]
    assert f"write-back: written {len(on_ai)}, unchanged 0, failed 0" in first.stderr
    assert "a full export (no earlier complete run in this folder)" in first.stderr
    assert f"{len(MEMBERS)} patients changed, 0 re-assessed for the date, 0 reused" in first.stderr, first.stderr
    # the same as a plain run --bulk of the same data
    assert first.stdout == bulk(fresh_server, tmp_path / "full-1").stdout

    # one Observation of one patient changes: entered in error (an update, which must take effect)
    dxa = lowest_dxa_of_v06(fresh_server)
    dxa["status"] = "entered-in-error"
    assert requests.put(f"{fresh_server}/Observation/{dxa['id']}", json=dxa, timeout=30).status_code == 200
    spy.clear()
    second = bulk(fresh_server, tmp_path / "inc", "--incremental", "--write-back")
    assert second.code == 0, second.stderr
    assert len(spy.exports()) == 1 and "_since" in spy.exports()[0]
    # the change, and the CarePlans the first run wrote; nothing else was downloaded
    state = json.loads((tmp_path / "inc" / "state.json").read_text())
    assert set(state["files"]) <= {"Observation.000.ndjson", "CarePlan.000.ndjson"}
    assert f"1 patients changed, 0 re-assessed for the date, {len(MEMBERS) - 1} reused" in second.stderr
    # v06's assessment changed, so its CarePlan is written; nobody else is touched
    before = {a["patient"]: a for a in everyone}["Patient/v06"]
    after = {a["patient"]: a for a in second.json()}["Patient/v06"]
    assert (before["category"], after["category"]) == ("high", "moderate")  # the lowest T-score no longer counts
    assert "write-back: written 1, unchanged" in second.stderr
    writes = spy.writes()
    assert writes and all("Patient/v06" in body for body in writes)
    assert not any(f"Patient/{pid}\"" in body for body in writes for pid in MEMBERS if pid != "v06")
    # the whole Group reported, as a full export of the same server state reports it
    full = bulk(fresh_server, tmp_path / "full-2")
    assert second.stdout == full.stdout and full.json()

    # a run with nothing changed and the same date: every assessment reused, no write request at all
    spy.clear()
    third = bulk(fresh_server, tmp_path / "inc", "--incremental", "--write-back")
    assert third.code == 0, third.stderr
    assert f"0 patients changed, 0 re-assessed for the date, {len(MEMBERS)} reused" in third.stderr
    assert spy.writes() == [] and third.stdout == second.stdout
    assert "write-back: written 0" in third.stderr and "(0 requests)" in third.stderr

    # a later date: everyone re-assessed from the stored record (time alone changes assessments: a DXA
    # becomes stale), and only the patients whose CarePlan changes with it are written back
    spy.clear()
    later = bulk(fresh_server, tmp_path / "inc", "--incremental", "--write-back", as_of=LATER)
    assert later.code == 0, later.stderr
    assert f"0 patients changed, {len(MEMBERS)} re-assessed for the date, 0 reused" in later.stderr
    assert [m for m, url, _ in spy.calls if m == "GET" and "/Patient" in url] == []  # no per-patient request
    previous = {a["patient"]: a for a in second.json()}
    moved = sorted(a["patient"] for a in later.json() if a["ai_status"] in ("active", "planned")
                   and identity(a) != identity(previous[a["patient"]]))
    assert moved, "the later date changes some assessments"
    assert f"write-back: written {len(moved)}, unchanged {len(on_ai) - len(moved)}, failed 0" in later.stderr
    written = {pid for body in spy.writes() for pid in MEMBERS if f"Patient/{pid}\"" in body}
    assert written == {p[8:] for p in moved}
    assert later.stdout == bulk(fresh_server, tmp_path / "full-3", as_of=LATER).stdout


def identity(assessment: dict) -> tuple:
    """What a CarePlan's identifier is made of (careplan._identity_content): not the date."""
    return tuple(json.dumps(sorted(assessment[k]) if isinstance(assessment[k], list) else assessment[k])
                 for k in ("ai_status", "category", "risk_factors", "recommendations", "flags", "evidence"))


def test_a_deleted_aromatase_inhibitor_keeps_the_patient_listed_until_a_full_run(fresh_server, tmp_path):
    make_group(fresh_server)
    first = bulk(fresh_server, tmp_path, "--incremental")
    assert first.code == 0, first.stderr
    assert {a["patient"]: a for a in first.json()}["Patient/v07"]["ai_status"] == "active"
    assert requests.delete(f"{fresh_server}/MedicationStatement/v07-anastrozole", timeout=30).status_code in (200, 204)
    # R4's _since export does not report a deletion: the store keeps the statement, the patient stays listed
    kept = bulk(fresh_server, tmp_path, "--incremental")
    assert kept.code == 0, kept.stderr
    assert {a["patient"]: a for a in kept.json()}["Patient/v07"]["ai_status"] == "active"
    # --full exports everything and rebuilds the store: the deletion is seen
    full = bulk(fresh_server, tmp_path, "--incremental", "--full", "--workers", "2")
    assert full.code == 0, full.stderr
    assert "a full export (--full)" in full.stderr
    assert {a["patient"]: a for a in full.json()}["Patient/v07"]["ai_status"] != "active"
    assert full.stdout == bulk(fresh_server, tmp_path / "plain").stdout


def test_an_interrupted_run_keeps_the_store_and_resumes_without_exporting_again(fresh_server, tmp_path, monkeypatch):
    make_group(fresh_server)
    first = bulk(fresh_server, tmp_path, "--incremental")
    assert first.code == 0, first.stderr
    obs = {"resourceType": "Observation", "id": "new-bmi", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "39156-5"}]},
           "subject": {"reference": "Patient/v10"}, "effectiveDateTime": "2026-05-01",
           "valueQuantity": {"value": 18, "unit": "kg/m2", "system": "http://unitsofmeasure.org", "code": "kg/m2"}}
    assert requests.put(f"{fresh_server}/Observation/new-bmi", json=obs, timeout=30).status_code in (200, 201)
    committed = sqlite3.connect(tmp_path / "store.sqlite").execute(
        "SELECT value FROM meta WHERE key = 'transactionTime'").fetchone()

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # the run is stopped after the download

    with monkeypatch.context() as patch:
        patch.setattr(incremental_module.Incremental, "prepare", killed)
        with pytest.raises(KeyboardInterrupt):
            bulk(fresh_server, tmp_path, "--incremental")
    db = sqlite3.connect(tmp_path / "store.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key = 'transactionTime'").fetchone() == committed
    assert db.execute("SELECT count(*) FROM resources WHERE rid = 'new-bmi'").fetchone() == (0,)  # rolled back
    db.close()
    spy = Spy(monkeypatch)
    resumed = bulk(fresh_server, tmp_path, "--incremental")
    assert resumed.code == 0, resumed.stderr
    assert "resuming: the export of" in resumed.stderr and spy.exports() == []
    assert "1 patients changed" in resumed.stderr
    assert resumed.stdout == bulk(fresh_server, tmp_path / "plain").stdout
    # and now complete: the next run exports again, from the new transaction time
    spy.clear()
    again = bulk(fresh_server, tmp_path, "--incremental")
    assert again.code == 0 and len(spy.exports()) == 1 and "0 patients changed" in again.stderr


def test_a_plain_run_bulk_killed_after_the_download_is_resumed(fresh_server, tmp_path, monkeypatch):
    make_group(fresh_server)
    import fhir_aibl.population as population

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(population, "one_process_items", killed)
        with pytest.raises(KeyboardInterrupt):
            bulk(fresh_server, tmp_path)
    spy = Spy(monkeypatch)
    resumed = bulk(fresh_server, tmp_path)
    assert resumed.code == 0, resumed.stderr
    assert "resuming:" in resumed.stderr and spy.exports() == []
    spy.clear()
    again = bulk(fresh_server, tmp_path)
    assert again.code == 0 and len(spy.exports()) == 1 and "resuming" not in again.stderr
    assert again.stdout == resumed.stdout


def test_an_export_with_error_files_is_not_committed(fresh_server, tmp_path, monkeypatch):
    """The server could not export everything: the changes since the last complete run are asked for again."""
    from fhir_aibl.bulk import export as export_module

    make_group(fresh_server)
    assert bulk(fresh_server, tmp_path, "--incremental").code == 0
    since = json.loads((tmp_path / "state.json").read_text())["transactionTime"]
    dxa = lowest_dxa_of_v06(fresh_server)
    dxa["status"] = "entered-in-error"
    assert requests.put(f"{fresh_server}/Observation/{dxa['id']}", json=dxa, timeout=30).status_code == 200
    real = export_module.export_to

    def with_errors(*args, **kwargs):
        result = real(*args, **kwargs)
        result.errors = ["error: Observation/x could not be exported"]
        return result

    with monkeypatch.context() as patch:
        patch.setattr(export_module, "export_to", with_errors)
        failed = bulk(fresh_server, tmp_path, "--incremental")
    assert failed.code == 1 and "incremental: not committed" in failed.stderr
    spy = Spy(monkeypatch)
    again = bulk(fresh_server, tmp_path, "--incremental")
    assert again.code == 0, again.stderr
    assert f"_since', '{since}'" in spy.exports()[0] and "1 patients changed" in again.stderr


def test_a_new_group_member_means_a_full_export(fresh_server, tmp_path):
    """A Group export with _since MAY leave out a new member's earlier records: never a partial record."""
    make_group(fresh_server)
    assert bulk(fresh_server, tmp_path, "--incremental").code == 0
    group = requests.get(f"{fresh_server}/Group/ai-cohort", timeout=30).json()
    group["member"].append({"entity": {"reference": "Patient/v13"}})
    assert requests.put(f"{fresh_server}/Group/ai-cohort", json=group, timeout=30).status_code == 200
    grown = bulk(fresh_server, tmp_path, "--incremental")
    assert grown.code == 0, grown.stderr
    assert "a full export (the Group's members changed)" in grown.stderr
    assert f"{len(MEMBERS) + 1} patients changed" in grown.stderr
    assert "Patient/v13" in {a["patient"] for a in grown.json()}
    assert grown.stdout == bulk(fresh_server, tmp_path / "plain").stdout
    # and the next run, with the same members, is incremental again
    same = bulk(fresh_server, tmp_path, "--incremental")
    assert "changes since" in same.stderr and f"{len(MEMBERS) + 1} reused" in same.stderr


def test_a_run_stopped_during_the_downloads_resumes_the_same_job(fresh_server, tmp_path, monkeypatch):
    from fhir_aibl.bulk.client import BulkClient

    make_group(fresh_server)
    real = BulkClient.download
    seen = []

    def stopped_at_the_second_file(self, url, dest, **kwargs):
        seen.append(url)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, url, dest, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(BulkClient, "download", stopped_at_the_second_file)
        with pytest.raises(KeyboardInterrupt):
            bulk(fresh_server, tmp_path, "--incremental")
    assert (tmp_path / "job.json").is_file()
    spy = Spy(monkeypatch)
    resumed = bulk(fresh_server, tmp_path, "--incremental")
    assert resumed.code == 0, resumed.stderr
    assert spy.exports() == []  # no new export: the job's manifest again, the first file not fetched again
    fetched = [url for method, url, _ in spy.calls if method == "GET" and url.split(" ")[0] == seen[0]]
    assert fetched == [] and not (tmp_path / "job.json").exists()
    assert resumed.stdout == bulk(fresh_server, tmp_path / "plain").stdout
