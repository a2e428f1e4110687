"""`fhir-aibl write-back` against `responses`: what the test server does not do (no transactions,
413, a refused patient inside a batch, a 200 with a failed entry, 401 mid-run)."""

from __future__ import annotations

import json

import pytest

from fhir_aibl.careplan import IDENTIFIER_SYSTEM
from fhir_aibl.writeback.batches import PROBES

from ..fhir.fakes import TYPES, FakeFhir, mock, outcome
from .outputs import make_outputs, on_ai, write_back


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs")
    return on_ai(folder) if make_outputs(folder) else [], folder / "explained.json"


def patients_of(transaction: dict) -> list[str]:
    return sorted({e["resource"]["subject"]["reference"] for e in transaction["entry"]
                   if e["resource"]["resourceType"] == "CarePlan"})


def against(server: FakeFhir, *argv):
    with mock() as rsps:
        server.install(rsps)
        return write_back("--fhir-base", server.base, *argv)


class Server(FakeFhir):
    """FakeFhir with plain creates and updates, and a hook that may refuse a transaction."""

    def refuse(self, body: dict) -> tuple[int, dict] | None:
        return None

    def handle(self, method, path, params, body):
        if method == "POST" and path == "" and (body or {}).get("type") == "transaction" and self.transaction:
            refused = self.refuse(body)
            if refused is not None:
                return refused
        rtype = path.split("/")[0]
        if method in ("POST", "PUT") and rtype in TYPES:
            self.transactions.append({"entry": [{"resource": body, "request": {"method": method, "url": path}}]})
            return 201, {**body, "id": body.get("id") or f"c{len(self.transactions)}"}
        return super().handle(method, path, params, body)


def test_a_server_without_transactions_gets_each_patients_writes_one_by_one(outputs, tmp_path):
    patients, source = outputs
    server = Server(transaction=False, batch=False)
    run = against(server, source, "--state", tmp_path)
    assert run.code == 0, run.stderr
    assert f"written {len(patients)}, unchanged 0, failed 0" in run.stderr
    writes = [(m, u) for m, u in server.requests if m in ("POST", "PUT")]
    assert not [u for _m, u in writes if u.rstrip("/") == server.base]  # no Bundle was sent
    # each patient: the RiskAssessment, the CarePlan (a conditional create), the Provenance
    assert len(writes) == 3 * len(patients)
    batches = -(-len(patients) // 25)
    # one search a batch, and one patient asked alone while no answer has shown the batch search works
    assert len(server.searches_of("CarePlan")) == batches + min(batches, PROBES)


def test_a_batch_too_large_is_halved_for_the_rest_of_the_run(outputs, tmp_path):
    patients, source = outputs

    class Small(Server):
        def refuse(self, body):
            if len(patients_of(body)) > 4:
                self.too_large = getattr(self, "too_large", 0) + 1
                return 413, outcome("request entity too large", "too-costly")
            return None

    server = Small()
    run = against(server, source, "--state", tmp_path, "--batch-size", "10")
    assert run.code == 0, run.stderr
    assert f"written {len(patients)}, unchanged 0, failed 0" in run.stderr
    assert "note: the server refused a batch as too large: 5 patients a batch from then on" in run.stderr
    assert "note: the server refused a batch as too large: 2 patients a batch from then on" in run.stderr
    sizes = [len(patients_of(t)) for t in server.transactions]
    assert max(sizes) <= 4 and sum(sizes) == len(patients)
    assert server.too_large == 3  # 10, then each 5 (halved to 2 and 3), then never again: 2 a batch


def test_one_refused_patient_fails_alone_and_a_rerun_writes_it(outputs, tmp_path):
    patients, source = outputs
    bad = patients[7]

    class Refusing(Server):
        def refuse(self, body):
            if bad in patients_of(body):
                return 422, outcome("CarePlan.subject: this patient's record is locked", "business-rule")
            return None

    server = Refusing()
    run = against(server, source, "--state", tmp_path)
    assert run.code == 1, run.stderr
    assert f"written {len(patients) - 1}, unchanged 0, failed 1" in run.stderr
    assert f"failed: {bad}: write-back: " in run.stderr and "record is locked" in run.stderr
    written = sorted(p for t in server.transactions for p in patients_of(t))
    assert written == sorted(set(patients) - {bad})
    journal = [json.loads(x) for x in (tmp_path / "journal.ndjson").read_text().splitlines()]
    assert [r["patient"] for r in journal if r["outcome"] == "failed"] == [bad]

    server = Server()  # the lock lifted: only that patient is tried again
    rerun = against(server, source, "--state", tmp_path)
    assert rerun.code == 0, rerun.stderr
    assert f"written 1, unchanged {len(patients) - 1} ({len(patients) - 1} confirmed by the journal), failed 0" in rerun.stderr
    assert [patients_of(t) for t in server.transactions] == [[bad]]


def test_a_failed_entry_inside_a_200_fails_that_patient_only(outputs, tmp_path):
    patients, source = outputs
    bad = patients[3]

    class NotAtomic(Server):
        def handle(self, method, path, params, body):
            status, answer = super().handle(method, path, params, body)
            if method == "POST" and path == "" and body.get("type") == "transaction":
                for entry, resource_entry in zip(answer["entry"], body["entry"]):
                    if resource_entry["resource"].get("subject", {}).get("reference") == bad:
                        entry["response"] = {"status": "400 Bad Request", "outcome": outcome("refused")}
            return status, answer

    server = NotAtomic()
    run = against(server, source, "--state", tmp_path)
    assert run.code == 1, run.stderr
    assert f"written {len(patients) - 1}, unchanged 0, failed 1" in run.stderr
    assert f"failed: {bad}: write-back: write-back transaction entry" in run.stderr


def test_credentials_refused_mid_run_stop_it_and_nothing_more_is_attempted(outputs, tmp_path):
    patients, source = outputs

    class Expiring(Server):
        def refuse(self, body):
            if self.transactions:
                return 401, outcome("token expired", "login")
            return None

    server = Expiring()
    run = against(server, source, "--state", tmp_path, "--batch-size", "10")
    assert run.code == 2, run.stderr
    assert "fatal: the run stopped before every patient was attempted: the server refused the credentials" in run.stderr
    assert f"written 10, unchanged 0, failed {len(patients) - 10}" in run.stderr
    assert run.stderr.count("credentials refused: ") == 10  # the batch the 401 answered
    assert run.stderr.count("not attempted: the server refused the credentials") == len(patients) - 20
    assert server.requests[-1][0] == "POST"  # the refused transaction was the last request
    assert len(server.transactions) == 1


def test_a_server_refusing_several_patients_in_one_search_is_asked_one_a_patient(outputs, tmp_path):
    patients, source = outputs

    class OneAtATime(Server):
        def search(self, rtype, params):
            if any(name == "patient" and "," in value for name, value in params):
                return 400, outcome("one patient per search", "not-supported")
            return super().search(rtype, params)

    server = OneAtATime()
    run = against(server, source, "--state", tmp_path)
    assert run.code == 0, run.stderr
    assert "note: the server refused one search for several patients" in run.stderr
    assert len(server.searches_of("CarePlan")) == 1 + len(patients)  # the refused one, then one a patient


def test_a_patient_given_twice_is_written_once(outputs, tmp_path):
    patients, source = outputs
    server = Server()
    run = against(server, source, source, "--state", tmp_path)
    assert run.code == 1, run.stderr
    assert f"written {len(patients)}, unchanged 0, failed 0" in run.stderr
    assert f"error: {source}[0]: Patient/v01 was given before (at {source}[0]): this one is not written" in run.stderr


def test_a_server_that_misreads_several_patients_in_one_search_is_caught(outputs, tmp_path):
    """The fake server reads `patient=a,b` as one id named "a,b", and answers nothing: the earlier
    CarePlans would stay live beside the new ones. Asking one patient alone shows it."""
    patients, source = outputs
    old = [
        {"resourceType": "CarePlan", "id": f"old-{n}", "meta": {"versionId": "1"}, "status": "draft",
         "intent": "proposal", "subject": {"reference": p}, "identifier": [{"system": IDENTIFIER_SYSTEM, "value": "old"}]}
        for n, p in enumerate(patients)
    ]
    server = Server(resources=old)
    run = against(server, source, "--state", tmp_path)
    assert run.code == 0, run.stderr
    assert "note: the server's answer to one search for several patients missed CarePlans" in run.stderr
    revoked = sorted(e["resource"]["subject"]["reference"] for t in server.transactions for e in t["entry"]
                     if e["resource"]["resourceType"] == "CarePlan" and e["resource"]["status"] == "revoked")
    assert revoked == patients  # every earlier CarePlan revoked by the new one


def test_a_conflict_for_one_patient_is_read_and_decided_again_once(outputs, tmp_path):
    patients, source = outputs
    bad = patients[11]

    class Edited(Server):
        conflicts = 0

        def refuse(self, body):
            if bad not in patients_of(body):
                return None
            if len(patients_of(body)) == 1:  # the patient alone: refused once, then a fresh decision passes
                self.conflicts += 1
                if self.conflicts > 1:
                    return None
            return 412, outcome("version conflict: the CarePlan changed", "conflict")

    server = Edited()
    run = against(server, source, "--state", tmp_path)
    assert run.code == 0, run.stderr
    assert f"written {len(patients)}, unchanged 0, failed 0" in run.stderr
    assert [patients_of(t) for t in server.transactions].count([bad]) == 1  # written once, after reading again
    alone = [u for _m, u in server.requests if "CarePlan?" in u and f"patient={bad.split('/')[1]}&" in u]
    assert len(alone) == 1  # the patient's CarePlans read again

    class Always(Edited):
        def refuse(self, body):
            if bad in patients_of(body):
                return 412, outcome("version conflict: the CarePlan changed", "conflict")
            return None

    server = Always()
    run = against(server, source, "--state", tmp_path / "again")
    assert run.code == 1 and f"failed: {bad}: write-back: " in run.stderr and "version conflict" in run.stderr
