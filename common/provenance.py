"""The promotion gate's record on a version it promoted, and the check each replica makes of it.

The gate (monitoring.gate, through monitoring.promotion.make_production) writes, before the
version's stage or alias changes, the version tag GATE_RECORD_TAG: JSON naming the model, the
version, the gate's MLflow run, and the sha256 of every file of the version's artifacts it checked:
each file of the scikit-learn model directory (`model/MLmodel`, `model/model.skops`, ...) and the
ONNX file (`onnx/model.onnx`). A replica that loads the champion (service.watcher) hashes the files
it downloaded and refuses the version when there is no record, when the record names another
version, or when a file differs from it (docs/decisions/025-gate-record-on-the-version.md).

The record proves that whoever held the pipeline's registry credentials recorded these digests,
not who that was: with basic auth on the tracking server (monitoring.access) only the pipeline and
the admin may write a version's tags.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from common.model import ModelLoadError

GATE_RECORD_TAG = "gate_record"
MODEL_PREFIX = "model/"
ONNX_KEY = "onnx/model.onnx"
# Written by MLflow's client into a downloaded registered model's folder; not an artifact of the run.
_LOCAL_ONLY = frozenset({"registered_model_meta"})
_CHUNK = 1 << 20


class UngatedModelError(ModelLoadError):
    """A champion without a gate record, or whose artifacts differ from the digests it records."""


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(model_dir: Path, onnx_file: Path | None = None) -> dict[str, str]:
    """{"model/<relative path>": sha256, ..., "onnx/model.onnx": sha256} of a downloaded version.

    Args:
        model_dir: the downloaded scikit-learn model directory (the folder holding MLmodel).
        onnx_file: the downloaded ONNX artifact, when there is one.
    """
    model_dir = Path(model_dir)
    digests = {f"{MODEL_PREFIX}{path.relative_to(model_dir).as_posix()}": sha256_file(path)
               for path in sorted(model_dir.rglob("*")) if path.is_file() and path.name not in _LOCAL_ONLY}
    if onnx_file is not None:
        digests[ONNX_KEY] = sha256_file(onnx_file)
    return digests


def record(name: str, version: str | int, run_id: str, digests: Mapping[str, str]) -> str:
    """The tag value the gate writes: the model, the version, the gate run and the digests, as JSON."""
    if not run_id:
        raise ValueError("a gate record needs the gate's run id")
    if not any(key.startswith(MODEL_PREFIX) for key in digests):
        raise ValueError("a gate record needs the digests of the model's files")
    body = {"model": name, "version": str(version), "run_id": run_id, "sha256": dict(sorted(digests.items()))}
    return json.dumps(body, separators=(",", ":"))


def check(raw: str | None, name: str, version: str | int, digests: Mapping[str, str], *,
          onnx_pending: bool = False) -> str:
    """Check a downloaded version against its gate record.

    Args:
        raw: the version's GATE_RECORD_TAG value (None when it has none).
        name, version: the version that was downloaded.
        digests: `file_digests` of what was downloaded.
        onnx_pending: the ONNX file could not be downloaded yet (it is checked when it is).

    Returns:
        The gate run id the record names.

    Raises:
        UngatedModelError: no record, an unreadable one, one of another version, or a file that is
            missing or differs from its digest (the message names the file, never its content).
    """
    label = f"{name} version {version}"
    if raw is None:
        raise UngatedModelError(f"{label} has no promotion record from the gate (version tag {GATE_RECORD_TAG}): "
                                "it was not promoted by monitoring.gate")
    try:
        body = json.loads(raw)
        recorded, run_id = dict(body["sha256"]), str(body["run_id"])
        of = (str(body["model"]), str(body["version"]))
    except (TypeError, ValueError, KeyError):
        raise UngatedModelError(f"{label}: its tag {GATE_RECORD_TAG} is not a gate record") from None
    if of != (name, str(version)):
        raise UngatedModelError(f"{label}: its gate record is for {of[0]} version {of[1]}")
    if not run_id or not any(key.startswith(MODEL_PREFIX) for key in recorded):
        raise UngatedModelError(f"{label}: its gate record names no gate run or no model files")
    for key in sorted(set(recorded) | set(digests)):
        if key == ONNX_KEY and onnx_pending and key not in digests:
            continue
        if key not in digests:
            raise UngatedModelError(f"{label}: {key}, recorded by gate run {run_id}, is missing from its artifacts")
        if key not in recorded:
            raise UngatedModelError(f"{label}: {key} was added after gate run {run_id} promoted it")
        if digests[key] != recorded[key]:
            raise UngatedModelError(f"{label}: {key} differs from what gate run {run_id} checked (sha256 "
                                    f"{digests[key][:12]}…, recorded {recorded[key][:12]}…)")
    return run_id
