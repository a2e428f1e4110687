"""One run at a time in a working folder: a second `export`, `run --bulk` or `write-back` in the
folder another run holds is refused at once, before any request, naming the holder; a holder
that was killed leaves nothing to clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import responses

from fhir_aibl.cli import main
from fhir_aibl.folderlock import NAME, FolderInUseError, folder_lock

from .conftest import ROOT

BASE = "https://ehr.example/fhir"


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "--fhir-base", BASE, "--out", "{folder}"],
        ["run", "--bulk", "--fhir-base", BASE, "--out", "{folder}"],
        ["run", "--bulk", "--incremental", "--fhir-base", BASE, "--out", "{folder}"],
        ["write-back", "--fhir-base", BASE, "--state", "{folder}", "{input}"],
    ],
    ids=["export", "run-bulk", "run-bulk-incremental", "write-back"],
)
@responses.activate  # no URL registered: any request would fail the test with a ConnectionError
def test_a_second_run_in_a_folder_in_use_is_refused_before_any_request(tmp_path, capsys, argv):
    folder = tmp_path / "out"
    given = tmp_path / "assessments.json"
    given.write_text("[]")
    with folder_lock(folder, "fhir-aibl run --bulk"):
        code = main([a.format(folder=folder, input=given) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert f"fatal: {folder} is in use by another run (fhir-aibl run --bulk, process {os.getpid()}, since " in err
    assert len(responses.calls) == 0
    assert not (folder / "store.sqlite").exists() and not (folder / "journal.ndjson").exists()


def test_the_lock_is_released_when_the_run_ends_and_when_its_process_is_killed(tmp_path):
    folder = tmp_path / "out"
    with folder_lock(folder, "first"):
        with pytest.raises(FolderInUseError, match=r"in use by another run \(first, process"):
            with folder_lock(folder, "second"):
                pass
    with folder_lock(folder, "after the first ended"):
        pass

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom pathlib import Path\nfrom fhir_aibl.folderlock import folder_lock\n"
         "with folder_lock(Path(sys.argv[1]), 'a nightly run'):\n    print('held', flush=True)\n    time.sleep(600)\n",
         str(folder)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=rf"a nightly run, process {holder.pid}, since "):
            with folder_lock(folder, "second"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel releases a killed process's lock when its files are closed
        try:
            with folder_lock(folder, "the next night"):
                break
        except FolderInUseError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert (folder / NAME).read_text().startswith("the next night, process ")


@responses.activate
def test_a_working_folder_that_cannot_be_created_is_a_clear_fatal_error(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    for argv in (["export", "--fhir-base", BASE, "--out", str(taken)],
                 ["run", "--bulk", "--fhir-base", BASE, "--out", str(taken / "sub")],
                 ["write-back", "--fhir-base", BASE, "--state", str(taken), str(taken)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "cannot be used as the working folder" in err and "Traceback" not in err
    assert len(responses.calls) == 0
