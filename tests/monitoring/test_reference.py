"""The drift reference file: atomic replacement, metadata, and which source a check uses."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from common.schema import FEATURES
from monitoring import gate, reference
from training import registration


def _frame(drift_world, rows=500, seed=0):
    return drift_world.batch(rows, 0, seed)


def test_artifact_names_match_what_training_logs():
    assert reference.TRAINING_FEATURES_ARTIFACT == registration.TRAINING_FEATURES_ARTIFACT
    assert gate.EVALUATION_ARTIFACT == registration.EVALUATION_ARTIFACT


def test_written_reference_reads_back_with_scores_and_metadata(drift_world, tmp_path):
    path = tmp_path / "ref.parquet"
    frame = _frame(drift_world)
    scores = np.linspace(0, 1, len(frame))
    reference.write_reference_file(frame, scores, path, model_name="m", model_version="3", run_id="abc", source="t")
    loaded = reference.read_reference_file(path)
    assert loaded.columns.shape == (len(FEATURES), len(frame)) and loaded.columns.dtype == np.float32
    np.testing.assert_allclose(loaded.scores, scores, rtol=1e-6)
    assert (loaded.model_name, loaded.model_version) == ("m", "3")
    assert reference.read_reference_metadata(path)["run_id"] == "abc"
    assert [p.name for p in tmp_path.iterdir()] == ["ref.parquet"]


def test_a_failed_write_leaves_the_old_reference_intact_and_no_temporary_file(drift_world, tmp_path, monkeypatch):
    path = tmp_path / "ref.parquet"
    reference.write_reference_file(_frame(drift_world), None, path, model_name="m", model_version="1", run_id=None,
                                   source="old")
    before = path.read_bytes()

    def fail_midway(table, where, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        reference.write_reference_file(_frame(drift_world, seed=1), None, path, model_name="m", model_version="2",
                                       run_id=None, source="new")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ref.parquet"]


def test_staged_reference_is_invisible_until_committed(drift_world, tmp_path):
    path = tmp_path / "ref.parquet"
    staged = reference.stage_reference_file(_frame(drift_world), None, path, model_name="m", model_version="5",
                                            run_id=None, source="t")
    assert not path.exists() and staged.parent == path.parent
    reference.commit_reference_file(staged, path)
    assert reference.read_reference_metadata(path)["model_version"] == "5" and not staged.exists()


def test_a_file_that_is_not_a_reference_is_reported(tmp_path):
    bogus = tmp_path / "bogus.parquet"
    bogus.write_text("hello")
    with pytest.raises(reference.ReferenceError, match="not a drift reference"):
        reference.read_reference_metadata(bogus)


def test_without_production_auto_uses_the_reference_database_without_scores(drift_world, tmp_path):
    loaded, notes = reference.load_reference("auto", mlflow_client=None, production=None,
                                             path=tmp_path / "absent.parquet",
                                             reference_db=str(drift_world.reference_db))
    assert loaded.rows == 4_000 and loaded.scores is None
    assert any("no Production model" in n for n in notes)
    with pytest.raises(reference.ReferenceError, match="needs a Production model"):
        reference.load_reference("production", mlflow_client=None, production=None, path=tmp_path / "absent.parquet")


def test_auto_prefers_the_file_only_when_it_belongs_to_the_production_version(drift_world, tmp_path):
    class Version:
        name, version, run_id = "m", 4, None

    path = tmp_path / "ref.parquet"
    reference.write_reference_file(_frame(drift_world), np.zeros(500), path, model_name="m", model_version="4",
                                   run_id=None, source="t")
    loaded, _ = reference.load_reference("auto", mlflow_client=None, production=Version(), path=path,
                                         reference_db=str(drift_world.reference_db))
    assert loaded.source.startswith("file") and loaded.rows == 500
    Version.version = 5
    loaded, notes = reference.load_reference("auto", mlflow_client=None, production=Version(), path=path,
                                             reference_db=str(drift_world.reference_db))
    assert loaded.source.startswith("reference database") and any("not the Production v5" in n for n in notes)
