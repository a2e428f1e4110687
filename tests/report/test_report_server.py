"""`run --worklist/--report` against the test FHIR server: REST (--all, --patients-file) and --bulk give the
worklist and report that `fhir-aibl report` makes of the assessments the same run printed."""

from __future__ import annotations

import json

from fhir_aibl.cli import main

from ..fhir.conftest import AS_OF, loaded_server, run_command, sekmet_seed  # noqa: F401


def outputs(folder, name: str) -> tuple[str, ...]:
    return ("--worklist", str(folder / f"{name}.csv"), "--report", str(folder / f"{name}.html"))


def from_saved(capsys, folder, name: str, stdout: str) -> None:
    (folder / f"{name}.json").write_text(stdout)
    capsys.readouterr()
    code = main(["report", str(folder / f"{name}.json"), "--as-of", AS_OF, *outputs(folder, f"{name}-saved")])
    assert code == 0, capsys.readouterr().err


def same(folder, name: str) -> None:
    for ext in ("csv", "html"):
        assert (folder / f"{name}.{ext}").read_text() == (folder / f"{name}-saved.{ext}").read_text(), (name, ext)


def test_run_all_writes_the_worklist_and_report_of_what_it_assessed(loaded_server, capsys, tmp_path):
    rest = run_command("--fhir-base", loaded_server, "--all", "--as-of", AS_OF, "--format", "json",
                       *outputs(tmp_path, "rest"))
    assert rest.code == 0, rest.stderr
    assert f"report: {len(rest.json())} patients, as of {AS_OF}, in {tmp_path / 'rest.html'}" in rest.stderr
    assert "worklist: " in rest.stderr
    from_saved(capsys, tmp_path, "rest", rest.stdout)
    same(tmp_path, "rest")
    rows = (tmp_path / "rest.csv").read_text().splitlines()[1:]
    assert rows and all(line.split(",")[3] in ("active", "planned") for line in rows)
    # the same from two worker processes, and from a list of patients
    two = run_command("--fhir-base", loaded_server, "--all", "--as-of", AS_OF, "--workers", "2",
                      *outputs(tmp_path, "two"))
    assert two.code == 0, two.stderr
    (tmp_path / "ids.txt").write_text("".join(a["patient"][8:] + "\n" for a in rest.json()))
    listed = run_command("--fhir-base", loaded_server, "--patients-file", str(tmp_path / "ids.txt"), "--as-of", AS_OF,
                         *outputs(tmp_path, "listed"))
    assert listed.code == 0, listed.stderr
    for name in ("two", "listed"):
        for ext in ("csv", "html"):
            assert (tmp_path / f"{name}.{ext}").read_text() == (tmp_path / f"rest.{ext}").read_text(), (name, ext)


def test_run_bulk_writes_the_worklist_and_report_of_what_it_assessed(loaded_server, capsys, tmp_path):
    bulk = run_command("--fhir-base", loaded_server, "--bulk", "--out", str(tmp_path / "export"), "--as-of", AS_OF,
                       "--format", "json", "--workers", "2", *outputs(tmp_path, "bulk"))
    assert bulk.code in (0, 1), bulk.stderr
    assert f"report: {len(bulk.json())} patients" in bulk.stderr
    from_saved(capsys, tmp_path, "bulk", bulk.stdout)
    same(tmp_path, "bulk")
    # every patient of the export is counted, whether on an aromatase inhibitor or not
    html = (tmp_path / "bulk.html").read_text()
    assert f'id="n-patients"><span class="n">{len(bulk.json())}<' in html
    assert json.loads(bulk.stdout)
