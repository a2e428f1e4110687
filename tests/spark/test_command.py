"""`assess --engine spark` without what it needs: exit 2 with the reason; bad combinations refused. No Spark started."""

from __future__ import annotations

import sys

from fhir_aibl.cli import main


def test_without_pyspark_it_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # `import pyspark` raises ImportError
    code = main(["assess", str(tmp_path), "--engine", "spark", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "install fhir-aibl[spark]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_spark_engine_needs_an_output_folder(tmp_path, capsys):
    assert main(["assess", str(tmp_path), "--engine", "spark"]) == 2
    assert "--out DIR" in capsys.readouterr().err


def test_local_options_are_refused_with_the_spark_engine(tmp_path, capsys):
    for extra in (["--workers", "2"], ["--format", "json"], ["--worklist", str(tmp_path / "w.csv")]):
        assert main(["assess", str(tmp_path), "--engine", "spark", "--out", str(tmp_path / "o"), *extra]) == 2
        assert "do not apply" in capsys.readouterr().err


def test_a_spark_master_needs_the_spark_engine(tmp_path, capsys):
    assert main(["assess", str(tmp_path), "--spark-master", "local[2]"]) == 2
    assert "--engine spark" in capsys.readouterr().err
