"""The importer loads generated and real-format files once, and refuses bad files without writing."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pandas as pd
import pytest

from common.features import load_feature_config
from common.schema import CSV_COLUMNS, FEATURES
from common.store import RequestStore
from training import generate as gen
from training import import_csv as imp


@pytest.fixture
def small_csv(tmp_path):
    path = tmp_path / "cc.csv"
    gen.generate(rows=2_000, seed=1, out=path, fraud_rate=0.02)
    return path


@pytest.fixture
def paths(tmp_path):
    return tmp_path / "ref.db", tmp_path / "feature_config.json"


def _rows(db) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT request_id, Class, Amount_scaled FROM requests ORDER BY id").fetchall()


def test_round_trip_keeps_every_row_label_and_scales_amount(small_csv, paths):
    db, config = paths
    result = imp.import_csv(small_csv, str(db), config)
    source = pd.read_csv(small_csv)
    stored = RequestStore(str(db)).read_frame(("Time", "Amount", *FEATURES, "Class", "ts"))
    assert result.rows_read == result.rows_added == len(source) == len(stored)
    assert result.scaler_fitted
    assert stored["Class"].sum() == source["Class"].sum() == result.frauds
    np.testing.assert_allclose(stored["V14"], source["V14"])
    scaler = load_feature_config(config)
    assert scaler.mean == pytest.approx(source["Amount"].mean())
    np.testing.assert_allclose(stored["Amount_scaled"], (source["Amount"] - scaler.mean) / scaler.std)
    np.testing.assert_allclose(stored["ts"], source["Time"])


def test_reimporting_the_same_file_adds_nothing(small_csv, paths):
    db, config = paths
    imp.import_csv(small_csv, str(db), config)
    before = _rows(db)
    again = imp.import_csv(small_csv, str(db), config)
    assert again.rows_added == 0
    assert _rows(db) == before


def test_scaler_is_fitted_once_and_reused(small_csv, tmp_path, paths):
    db, config = paths
    imp.import_csv(small_csv, str(db), config)
    first = json.loads(config.read_text())
    other = tmp_path / "other.csv"
    gen.generate(rows=500, seed=9, out=other)
    assert not imp.import_csv(other, str(db), config).scaler_fitted
    assert json.loads(config.read_text()) == first


def test_real_format_with_quotes_and_float_time_is_accepted(tmp_path, paths):
    db, config = paths
    frame = gen.generate_frame(rows=300, fraud_rate=0.05, seed=2)
    lines = [",".join(f'"{c}"' for c in CSV_COLUMNS)]
    for row in frame.itertuples(index=False):
        values = [f"{row.Time:.1f}", *(f"{v!r}" for v in row[1:-1]), f'"{int(row.Class)}"']
        lines.append(",".join(values))
    real = tmp_path / "creditcard.csv"
    real.write_text("\n".join(lines) + "\n")
    result = imp.import_csv(real, str(db), config)
    assert result.rows_added == 300
    assert result.frauds == int(frame["Class"].sum())


def test_rows_repeated_within_a_file_are_kept(tmp_path, paths):
    db, config = paths
    frame = gen.generate_frame(rows=50, seed=3)
    doubled = pd.concat([frame, frame.iloc[:5]])
    path = tmp_path / "dup.csv"
    doubled.to_csv(path, index=False)
    assert imp.import_csv(path, str(db), config).rows_added == 55
    assert imp.import_csv(path, str(db), config).rows_added == 0


def _bad_files(good: str) -> dict[str, tuple[str, str]]:
    header, *rows = good.splitlines()
    first = rows[0].split(",")
    return {
        "empty": ("", "empty"),
        "header only": (header + "\n", "no rows"),
        "semicolons": (good.replace(",", ";"), "';'-delimited"),
        "missing column": ("\n".join(",".join(line.split(",")[:-1]) for line in [header, *rows]),
                           "missing column(s) Class"),
        "non-numeric": ("\n".join([header, ",".join(["abc", *first[1:]]), *rows[1:]]), "'abc' is not a number"),
        "nan value": ("\n".join([header, ",".join([first[0], "nan", *first[2:]]), *rows[1:]]), "line 2, column V1"),
        "label 2": ("\n".join([header, ",".join([*first[:-1], "2"]), *rows[1:]]), "expected 0 or 1"),
    }


@pytest.mark.parametrize("kind", list(_bad_files("a,b\n1,2").keys()))
def test_bad_file_is_refused_with_its_problem_named_and_database_unchanged(kind, small_csv, tmp_path, paths):
    db, config = paths
    imp.import_csv(small_csv, str(db), config)
    before = _rows(db)
    content, expected = _bad_files(small_csv.read_text())[kind]
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(imp.CsvImportError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        imp.import_csv(bad, str(db), config)
    assert _rows(db) == before


def test_cli_exit_code_and_message_for_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("")
    code = imp.main(["--csv", str(bad), "--db", str(tmp_path / "ref.db"),
                     "--feature-config", str(tmp_path / "fc.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "empty" in err and "left unchanged" in err
    assert not (tmp_path / "fc.json").exists()


def test_cli_imports_and_reports_counts(small_csv, tmp_path, capsys):
    code = imp.main(["--csv", str(small_csv), "--db", str(tmp_path / "ref.db"),
                     "--feature-config", str(tmp_path / "fc.json")])
    assert code == 0
    assert "added 2000 new rows" in capsys.readouterr().out
