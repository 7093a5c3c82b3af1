"""The gate record and its check (common.provenance), on files and strings alone."""

from __future__ import annotations

import hashlib
import json

import pytest

from common import provenance
from common.provenance import UngatedModelError

DIGESTS = {"model/MLmodel": "a" * 64, "model/model.skops": "b" * 64, "onnx/model.onnx": "c" * 64}
RUN = "0123456789abcdef0123456789abcdef"


def test_file_digests_hash_every_model_file_and_the_onnx_file_but_not_mlflow_local_metadata(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "MLmodel").write_bytes(b"flavors: {}\n")
    (model / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (model / "registered_model_meta").write_text("model_name: x\n")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    digests = provenance.file_digests(model, onnx)
    assert digests == {"model/MLmodel": hashlib.sha256(b"flavors: {}\n").hexdigest(),
                       "model/sub/data.bin": hashlib.sha256(b"\x00\x01").hexdigest(),
                       "onnx/model.onnx": hashlib.sha256(b"onnx").hexdigest()}


def test_a_record_passes_the_check_of_the_same_files_and_names_its_run():
    raw = provenance.record("fraud-detector", 3, RUN, DIGESTS)
    assert provenance.check(raw, "fraud-detector", "3", DIGESTS) == RUN


@pytest.mark.parametrize(("raw", "message"), [
    (None, "has no promotion record from the gate"),
    ("not json", "is not a gate record"),
    (json.dumps({"model": "fraud-detector", "version": "3"}), "is not a gate record"),
    (provenance.record("fraud-detector", 2, RUN, DIGESTS), "its gate record is for fraud-detector version 2"),
    (provenance.record("other", 3, RUN, DIGESTS), "its gate record is for other version 3"),
])
def test_a_missing_unreadable_or_foreign_record_is_refused(raw, message):
    with pytest.raises(UngatedModelError, match=message):
        provenance.check(raw, "fraud-detector", "3", DIGESTS)


@pytest.mark.parametrize(("change", "message"), [
    ({"model/model.skops": "d" * 64}, "model/model.skops differs from what gate run"),
    ({"onnx/model.onnx": "d" * 64}, "onnx/model.onnx differs from what gate run"),
    ({"model/extra.py": "e" * 64}, "model/extra.py was added after gate run"),
])
def test_a_changed_or_added_file_is_refused(change, message):
    raw = provenance.record("fraud-detector", 3, RUN, DIGESTS)
    with pytest.raises(UngatedModelError, match=message):
        provenance.check(raw, "fraud-detector", "3", {**DIGESTS, **change})


def test_a_missing_file_is_refused_except_an_onnx_file_still_to_be_downloaded():
    raw = provenance.record("fraud-detector", 3, RUN, DIGESTS)
    without_onnx = {k: v for k, v in DIGESTS.items() if k != "onnx/model.onnx"}
    with pytest.raises(UngatedModelError, match=r"onnx/model.onnx, recorded by gate run \w+, is missing"):
        provenance.check(raw, "fraud-detector", "3", without_onnx)
    assert provenance.check(raw, "fraud-detector", "3", without_onnx, onnx_pending=True) == RUN
    with pytest.raises(UngatedModelError, match=r"model/MLmodel, recorded by gate run \w+, is missing"):
        provenance.check(raw, "fraud-detector", "3", {"model/model.skops": "b" * 64}, onnx_pending=True)


def test_a_record_needs_a_run_and_model_files():
    with pytest.raises(ValueError, match="run id"):
        provenance.record("fraud-detector", 3, "", DIGESTS)
    with pytest.raises(ValueError, match="model's files"):
        provenance.record("fraud-detector", 3, RUN, {"onnx/model.onnx": "c" * 64})
