"""One Bulk Data export into a folder: what the rules read, checked against what came back, with state for `_since`.

    result = export_to(client, out, level="group", group="g1", incremental=True, warn=print)

The folder holds `state.json` (the last complete export: its `transactionTime`, level,
group, types and files folder) and one folder of NDJSON per export. With `incremental`,
the kick-off asks only for what changed since the last complete export's transaction time
(`_since`); a new `state.json` is written only when an export is complete (every file
downloaded), so an interrupted export is simply done again; but when its downloads did not
finish (a download failing after its attempts, a run stopped), the job is kept on the server
and named in `job.json`, and the next export of the same settings resumes it: the same
manifest, the files already downloaded kept, a file cut part-way resumed (`client`). An export of `run --bulk` is
marked `"run": "pending"` until that run is complete (`run_complete`); `pending_export` finds
it again for a run of the same settings, which then assesses it instead of exporting again.

The manifest is checked against the types asked for: a type the rules read that is not in
the output is a warning naming it and what its absence means for the assessments (a server
may leave a type out at one level and not another: one test server's `Patient/$export`
leaves out FamilyMemberHistory, and with it every parental hip fracture).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..sources import RELEVANT_TYPES
from ..fhir.errors import FhirError
from .client import BulkClient, DownloadFailed, Manifest

#: What the assessments lose when a type is missing from an export (for the operator).
CONSEQUENCES = {
    "Patient": "no patient's age or sex is known, so no patient can be assessed",
    "Observation": "no bone density (DXA) result, BMI, smoking status or laboratory value is seen, "
    "so categories rest on risk factors alone",
    "Condition": "no condition (rheumatoid arthritis, hypogonadism, a fragility fracture, kidney disease) is seen",
    "FamilyMemberHistory": "a parental hip fracture recorded as family history is not seen, "
    "so that risk factor cannot count",
    "MedicationStatement": "medications recorded as statements are not seen: an aromatase inhibitor, glucocorticoids "
    "or bone therapy recorded only this way is missed",
    "MedicationRequest": "prescriptions are not seen: an aromatase inhibitor, glucocorticoids or bone therapy "
    "prescribed is missed",
    "CarePlan": "earlier fhir-aibl CarePlans are not seen: a new one is still written once (conditional "
    "create), but an outdated one is not revoked",
    "MedicationAdministration": "administered medications (an infusion of zoledronic acid, denosumab injections) "
    "are not seen",
}

#: The resource types the rules read, in the order they are asked for.
RULE_TYPES = tuple(sorted(RELEVANT_TYPES))

STATE = "state.json"
#: The job of an export whose downloads did not finish: its status URL, for the next run to resume.
JOB = "job.json"


@dataclass
class ExportResult:
    folder: Path
    manifest: Manifest
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  #: messages of the manifest's error files
    since: str | None = None
    requests: int = 0  #: HTTP requests to the server for the whole export (kick-off to delete)
    client: object = None  #: the FhirClient that exported (the write-back uses it too)


def read_state(out: Path) -> dict | None:
    try:
        state = json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("transactionTime") else None


def _earlier_job(client: BulkClient, out: Path, job: dict, warn: Callable[[str], None]) -> tuple:
    """(status URL, manifest) of an earlier export of the same settings whose downloads did not finish,
    if the server still has it; else (None, None), and a new export is started."""
    try:
        saved = json.loads((out / JOB).read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(saved, dict) or not saved.get("status") or {k: saved.get(k) for k in job} != job:
        return None, None
    try:
        manifest = client.wait(saved["status"])
    except FhirError as exc:
        (out / JOB).unlink(missing_ok=True)
        warn(f"the earlier export job whose downloads did not finish is gone ({exc}); exporting again")
        return None, None
    return saved["status"], manifest


def missing_types(asked: tuple[str, ...], manifest: Manifest) -> list[str]:
    got = manifest.types()
    return [t for t in asked if t not in got]


def export_to(
    client: BulkClient,
    out: Path,
    *,
    level: str,
    group: str | None = None,
    types: tuple[str, ...] = RULE_TYPES,
    type_filters: tuple[str, ...] = (),
    since: str | None = None,
    incremental: bool = False,
    warn: Callable[[str], None] = lambda text: None,
    run: bool = False,
    warn_missing: bool = True,
) -> ExportResult:
    """Kick off, wait, download every file into a new folder of `out`, check, delete the job."""
    out.mkdir(parents=True, exist_ok=True)
    if incremental and since is None:
        state = read_state(out)
        if state is not None:
            since = state["transactionTime"]
    job = {"level": level, "group": group, "types": list(types), "since": since, "filters": list(type_filters)}
    status, manifest = _earlier_job(client, out, job, warn)
    if status is None:
        status = client.kick_off(level, group=group, types=types, since=since, type_filters=type_filters)
        (out / JOB).write_text(json.dumps({**job, "status": status}, indent=2) + "\n")
    keep = False  # keep the job on the server (and job.json) for the next run to resume its downloads
    try:
        if manifest is None:
            manifest = client.wait(status)
        folder = out / ("export-" + (re.sub(r"[^0-9A-Za-z]", "", manifest.transaction_time) or "unknown"))
        folder.mkdir(parents=True, exist_ok=True)
        result = ExportResult(folder=folder, manifest=manifest, since=since)
        counts: dict[str, int] = {}
        keep = True
        for item in manifest.output:
            rtype = str(item.get("type") or "unknown")
            if not re.fullmatch(r"[A-Za-z]{1,64}", rtype):
                rtype = "unknown"
            n = counts.get(rtype, 0)
            counts[rtype] = n + 1
            dest = folder / f"{rtype}.{n:03d}.ndjson"
            if not dest.is_file():  # a file of this job an earlier run downloaded whole is not fetched again
                try:
                    client.download(item["url"], dest, requires_token=manifest.requires_token)
                except DownloadFailed as exc:  # the network, not the export: worth resuming
                    raise DownloadFailed(
                        f"{exc}; the job and the bytes received are kept: the same command run again "
                        "resumes the downloads"
                    ) from exc
                except FhirError:  # refused (a token for another origin, an error status): not to be resumed
                    keep = False
                    raise
            result.files.append(dest)
        result.errors = client.error_messages(manifest, folder / "errors") if manifest.error else []
        keep = False
    finally:
        if not keep:  # done, or failed before the downloads: the job is deleted, as always
            (out / JOB).unlink(missing_ok=True)
            not_deleted = client.delete(status)
    if not_deleted:
        result.warnings.append(not_deleted)
        warn(not_deleted)
    for rtype in missing_types(types, manifest) if warn_missing else ():
        text = (
            f"the export has no {rtype}: either there is none"
            f"{' changed since ' + since if since else ''}, or the server left the type out"
            f"{' at this level (try a system-level export with _type)' if level != 'system' else ''}; "
            f"without it {CONSEQUENCES.get(rtype, 'the rules cannot read it')}"
        )
        result.warnings.append(text)
        warn(text)
    (out / STATE).write_text(
        json.dumps(
            {
                "transactionTime": manifest.transaction_time,
                "level": level,
                "group": group,
                "types": list(types),
                "since": since,
                "filters": list(type_filters),
                "folder": folder.name,
                "files": [p.name for p in result.files],
                # run --bulk: "pending" until the run that exported it is complete (`run_complete`)
                **({"run": "pending"} if run else {}),
            },
            indent=2,
        )
        + "\n"
    )
    return result


def pending_export(
    out: Path, *, level: str, group: str | None, types: tuple[str, ...], type_filters: tuple[str, ...] = (),
    since: str | None,
) -> ExportResult | None:
    """The last export in `out` if a `run --bulk` downloaded it completely and did not finish, with the
    same settings (and the same `_since`): that run is resumed from it instead of exporting again."""
    state = read_state(out)
    if state is None or state.get("run") != "pending":
        return None
    if (state.get("level"), state.get("group"), state.get("types"), state.get("since")) != (
        level, group, list(types), since
    ) or state.get("filters", []) != list(type_filters):
        return None
    folder = out / str(state.get("folder") or "")
    files = [folder / str(name) for name in state.get("files") or []]
    if not folder.is_dir() or not all(path.is_file() for path in files):
        return None
    manifest = Manifest(transaction_time=state["transactionTime"], request="", requires_token=False, output=[], error=[])
    result = ExportResult(folder=folder, manifest=manifest, files=files, since=since)
    from .client import _outcome_messages

    for path in sorted((folder / "errors").glob("error.*.ndjson")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            result.errors.extend(_outcome_messages(line))
    return result


def run_complete(out: Path) -> None:
    """The run that exported the last export is complete: a later run exports again."""
    state = read_state(out)
    if state is not None and state.get("run") == "pending":
        state["run"] = "done"
        (out / STATE).write_text(json.dumps(state, indent=2) + "\n")
