"""The Spark job: Bulk NDJSON -> lines keyed by patient -> one shuffle by patient -> assessed in the Python workers.

    summary = run(spark, ["s3a://bucket/export/"], "s3a://bucket/aibl-out", as_of=dt.date(2026, 6, 1))

Steps (docs/spark.md explains the choices):

1. List the NDJSON files of every path with Hadoop's FileSystem (so any scheme Spark reads:
   local, s3a://, abfss://, dbfs:/, hdfs://), sorted as the file reader sorts them, and read
   each as lines of bytes numbered from 1 (`file:line` in every problem, as `assess` says).
2. Key every line in the workers with the reader's own first pass (`sources.key_line`): a
   resource of a patient, a Medication/Substance (no patient), a Bundle (its patients), a
   type no rule reads, or a problem. The keyed lines are persisted: the next steps read them.
3. Medications and Substances are collected and broadcast (a formulary is small beside the
   population); each worker builds the reader's medication index from them once.
4. Resources filed under two patients (the same `Type/id`): found with one small aggregation
   by `Type/id`, and decided on the driver with the reader's own rule
   (`sources.decide_duplicates`), broadcast as {read order: position or drop}.
5. One shuffle: every resource line keyed (patient id, read order), hash-partitioned by the
   patient id alone (CRC-32, the same in every process) and sorted within partitions, so a
   partition streams its patients one at a time, each patient's lines in read order, and
   no patient is split. Then `worker.assess_partition` builds, assesses and turns each
   patient into output rows through `outcome.assess_patient`.
6. The rows are written in one pass, by kind: assessments/ (JSON lines), CarePlan/ and
   RiskAssessment/ (NDJSON, Bulk-import ready), problems/ (JSON lines), each a folder of
   `part-*.ndjson` files; then worklist.parquet (one file), from the worklist rows.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import posixpath
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import AiblError, InputError
from ..report.worklist import COLUMNS
from ..sources import decide_duplicates
from . import worker

#: Input bytes per shuffle partition, at most: a partition's sort stays small, and a large
#: population gets more partitions than the cluster has cores (balance, retries that cost little).
BYTES_PER_PARTITION = 64 << 20
#: Shuffle partitions per core of the cluster, at least.
PARTITIONS_PER_CORE = 4
#: Problems printed on stderr; all of them are in problems/.
PRINTED_PROBLEMS = 50
#: The output folders (and the Parquet worklist) written into the output folder.
OUTPUTS = ("assessments", "CarePlan", "RiskAssessment", "problems", "worklist.parquet")


@dataclass
class InputFile:
    name: str  #: as problems name it: the path given (plus the part below a folder), no file: scheme
    uri: str  #: what Spark reads
    size: int


@dataclass
class Summary:
    files: int = 0
    assessed: int = 0
    errors: int = 0
    warnings: int = 0
    worklist: int = 0
    careplans: int = 0
    printed: list[str] = field(default_factory=list)  #: the first problems, as `assess` prints them


def list_inputs(spark: Any, paths: Sequence[str]) -> tuple[list[InputFile], list[InputError]]:
    """The NDJSON files below `paths`, in the file reader's order; a path that is not there is a problem."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    files: list[InputFile] = []
    problems: list[InputError] = []
    for given in paths:
        path = jvm.org.apache.hadoop.fs.Path(given)
        fs = path.getFileSystem(conf)
        if not fs.exists(path):
            problems.append(InputError("no such file or directory", source=given))
            continue
        status = fs.getFileStatus(path)
        if not status.isDirectory():
            if given.endswith(".ndjson"):
                files.append(InputFile(given, status.getPath().toString(), status.getLen()))
            else:
                problems.append(InputError("not read: the Spark engine reads Bulk NDJSON (*.ndjson) files", source=given))
            continue
        base = status.getPath().toUri().getPath().rstrip("/")
        found = []
        listing = fs.listFiles(path, True)
        while listing.hasNext():
            item = listing.next()
            rel = item.getPath().toUri().getPath()[len(base) + 1:]
            parts = tuple(rel.split("/"))
            if any(part.startswith(".") for part in parts) or not item.isFile():
                continue
            name = posixpath.join(given.rstrip("/"), rel) if given.rstrip("/") else rel
            if rel.endswith(".ndjson"):
                found.append((parts, InputFile(name, item.getPath().toString(), item.getLen())))
            elif rel.endswith(".json"):
                found.append((parts, InputError("not read: the Spark engine reads Bulk NDJSON (*.ndjson) files", source=name)))
        for _parts, what in sorted(found, key=lambda f: f[0]):
            (files if isinstance(what, InputFile) else problems).append(what)
    return files, problems


def _lines(spark: Any, files: list[InputFile]) -> Any:
    """(file index, line number, file name, line bytes) of every line of every file."""
    sc = spark.sparkContext
    parts = []
    for index, file in enumerate(files):
        # bytes, as the file reader reads them (a line that is not UTF-8 is reported, not repaired);
        # a file is split only when large (numbering the lines of a split file costs one more job)
        text = sc.textFile(file.uri, minPartitions=1, use_unicode=False)
        parts.append(text.zipWithIndex().map(lambda t, i=index, n=file.name: (i, t[1] + 1, n, t[0])))
    return sc.union(parts) if parts else sc.emptyRDD()


def _first_pass(keyed: Any) -> tuple[list, set[str], bool]:
    """One job over the keyed lines: the Medications in read order; the `Type/id`s found under more
    than one patient; and whether one of those is inside a Bundle."""

    def emit(row: tuple) -> list[tuple]:
        seq, _name, _line, raw, kind, patient, key, keyed = row
        if kind == "resource":
            return [(key, (patient, False))] if key else []
        if kind == "medication":
            return [(_MEDICATION, (seq, [raw]))]
        if kind == "bundle":
            return [(k, (pid, True)) for k, pid in keyed.keys] + [(_MEDICATION, (seq, list(keyed.medications)))]
        return []

    def merge(a: tuple, b: tuple) -> tuple:
        if isinstance(a[0], int):  # medications: every group, in any order (sorted on the driver)
            return _meds(a, b)
        return (a[0] if a[0] == b[0] else None, a[1] or b[1])

    found = keyed.flatMap(emit).reduceByKey(merge).filter(lambda kv: kv[0] == _MEDICATION or kv[1][0] is None).collect()
    medications: list = []
    cross: set[str] = set()
    in_bundle = False
    for key, value in found:
        if key == _MEDICATION:
            groups = value[1] if value[0] == -1 else [value]
            medications = [m for _seq, group in sorted(groups, key=lambda g: g[0]) for m in group]
        else:
            cross.add(key)
            in_bundle |= value[1]
    return medications, cross, in_bundle


#: The key under which the first pass gathers the Medications (no `Type/id` has a space).
_MEDICATION = "medications "


def _meds(a: tuple, b: tuple) -> tuple:
    """(seq, lines) groups merged into (-1, [groups])."""
    left = a[1] if a[0] == -1 else [a]
    right = b[1] if b[0] == -1 else [b]
    return (-1, left + right)


def run(
    spark: Any,
    paths: Sequence[str],
    out: str,
    *,
    as_of: dt.date,
    rules_path: str | None = None,
    mode: str = "default",
    explain: bool = False,
    partitions: int | None = None,
) -> Summary:
    """Assess every patient of `paths` into the folder `out` (see the module docstring)."""
    from pyspark import StorageLevel

    sc = spark.sparkContext
    summary = Summary()
    files, listing_problems = list_inputs(spark, paths)
    summary.files = len(files)
    settings = worker.RunSettings(
        as_of=as_of, rules_path=rules_path, mode=mode, explain=explain,
        created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0), token=uuid.uuid4().hex,
    )

    keyed = _lines(spark, files).map(worker.key).filter(lambda r: r is not None)
    keyed.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        meds, cross, in_bundle = _first_pass(keyed)
        medications = sc.broadcast(meds)
        decisions: dict[int, int] = {}
        if cross:
            occurrences: dict[str, list[tuple[int, str, dict]]] = {}
            for key, seq, pid, raw in keyed.filter(lambda r: r[4] == "resource" and r[6] in cross).map(
                lambda r: (r[6], r[0], r[5], r[3])
            ).collect():
                occurrences.setdefault(key, []).append((seq, pid, json.loads(raw)))
            for occ in occurrences.values():
                decisions.update(decide_duplicates(occ))
        decided = sc.broadcast(decisions)

        total = sum(f.size for f in files)
        n = partitions or max(sc.defaultParallelism * PARTITIONS_PER_CORE, math.ceil(total / BYTES_PER_PARTITION), 1)

        def by_patient(r: tuple) -> list[tuple[tuple[str, int], tuple]]:
            seq, name, lineno, raw, kind, patient, _key, keyed = r
            if kind == "resource":
                return [((patient, seq), (name, lineno, raw))]
            if keyed is None:  # a Medication: in the broadcast
                return []
            out = [((worker.READING, seq), worker.problem_row(p)) for p in keyed.problems]
            if kind == "bundle":  # the whole Bundle goes to each of its patients: its urn: references need it whole
                out += [((pid, seq), (name, lineno, raw)) for pid in keyed.patients]
            return out

        counts = {name: sc.accumulator(0) for name in ("assessed", "careplans", "worklist", "errors", "warnings")}

        def assess(part: Any) -> Any:
            for kind, text in worker.assess_partition(part, settings, medications, decided):
                _count(counts, kind, text)
                yield kind, text

        rows = keyed.flatMap(by_patient).repartitionAndSortWithinPartitions(
            n, partitionFunc=lambda key: worker.partition_of(key, n)
        ).mapPartitions(assess)
        extra = [worker.problem_row(p) for p in listing_problems]
        if cross and in_bundle:
            extra.append(worker.problem_row(AiblError(
                f"{len(cross)} resource(s) filed under two patients, one of them inside a Bundle: each was assessed "
                "under every patient that has it; assess this input with the local engine to keep only the newest",
                resource=", ".join(sorted(cross)[:5]),
            )))
        for kind, text in extra:
            _count(counts, kind, text)
        if extra:
            rows = rows.union(sc.parallelize(extra, 1))
        _write(spark, rows, out)
    finally:
        keyed.unpersist()
    summary.assessed, summary.careplans, summary.worklist, summary.errors, summary.warnings = (
        counts[name].value for name in ("assessed", "careplans", "worklist", "errors", "warnings")
    )
    if summary.errors + summary.warnings:
        texts = spark.read.text(f"{out.rstrip('/')}/problems").limit(PRINTED_PROBLEMS).collect()
        summary.printed = [json.loads(row[0])["text"] for row in texts]
    return summary


def _count(counts: dict[str, Any], kind: str, text: str) -> None:
    if kind == worker.PROBLEM:
        counts["errors" if text.startswith('{"severity": "error"') else "warnings"].add(1)
    elif kind == worker.ASSESSMENT:
        counts["assessed"].add(1)
    elif kind == worker.CAREPLAN:
        counts["careplans"].add(1)
    elif kind == worker.WORKLIST:
        counts["worklist"].add(1)


#: Output folder of each row kind.
FOLDERS = {worker.ASSESSMENT: "assessments", worker.CAREPLAN: "CarePlan", worker.RISK: "RiskAssessment",
           worker.PROBLEM: "problems", worker.WORKLIST: ".worklist-rows"}


def _write(spark: Any, rows: Any, out: str) -> None:
    """Every output in one pass over the patients: rows written by kind, then each kind's folder moved to its name."""
    from pyspark.sql.types import IntegerType, StringType, StructField, StructType

    base = out.rstrip("/")
    staging = f"{base}/.rows"
    frame = spark.createDataFrame(rows, StructType([StructField("kind", StringType()), StructField("text", StringType())]))
    frame.write.partitionBy("kind").text(staging)
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    fs = jvm.org.apache.hadoop.fs.Path(base).getFileSystem(conf)
    for kind, folder in FOLDERS.items():
        source = jvm.org.apache.hadoop.fs.Path(f"{staging}/kind={kind}")
        target = jvm.org.apache.hadoop.fs.Path(f"{base}/{folder}")
        if fs.exists(source):
            fs.rename(source, target)
            for status in fs.listStatus(target):  # part-*.txt: JSON lines, named so
                name = status.getPath().getName()
                if name.endswith(".txt"):
                    fs.rename(status.getPath(), jvm.org.apache.hadoop.fs.Path(target, name[:-4] + ".ndjson"))
        else:
            fs.mkdirs(target)  # nothing of that kind: an empty folder says so
    fs.delete(jvm.org.apache.hadoop.fs.Path(staging), True)
    schema = StructType(
        [StructField(COLUMNS[0], IntegerType(), False)] + [StructField(c, StringType(), False) for c in COLUMNS[1:]]
    )
    table = spark.read.text(f"{base}/{FOLDERS[worker.WORKLIST]}").rdd.map(lambda r: _worklist_row(r[0]))
    (
        spark.createDataFrame(table, schema)
        .coalesce(1)  # one file: the worklist is a small share of the population
        .sortWithinPartitions(COLUMNS[0], COLUMNS[1])  # most urgent first, as the CSV worklist
        .write.parquet(f"{base}/worklist.parquet")
    )
    fs.delete(jvm.org.apache.hadoop.fs.Path(f"{base}/{FOLDERS[worker.WORKLIST]}"), True)


def _worklist_row(text: str) -> tuple:
    cells = json.loads(text)
    return (int(cells[0]), *cells[1:])


def existing_outputs(spark: Any, out: str) -> list[str]:
    """The outputs already in `out`: a run never writes over another's."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    found = []
    for name in OUTPUTS:
        path = jvm.org.apache.hadoop.fs.Path(f"{out.rstrip('/')}/{name}")
        if path.getFileSystem(conf).exists(path):
            found.append(name)
    return found
