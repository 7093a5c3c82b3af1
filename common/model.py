"""The fraud model contract: how a trained forest is logged, registered and loaded for scoring.

Training writes, and the service and the promotion gate read, exactly this layout.

Logged artifacts of one training run, and the registered version:

- The scikit-learn `RandomForestClassifier` (classes 0 = legitimate, 1 = fraud), fitted on a
  DataFrame with the 29 columns of `common.schema.FEATURES`, logged with
  `mlflow.sklearn.log_model(name="model")` in the skops format with
  `skops_trusted_types=SKOPS_TRUSTED_TYPES`, a signature of 29 named float (double) inputs, an
  input example, and the metadata `{"threshold", "threshold_method", "onnx_artifact", "features"}`.
- Its ONNX export (skl2onnx, no ZipMap, one float32 input named `features` of shape (n, 29),
  output `probabilities` of shape (n, 2)), logged as the *run* artifact `onnx/model.onnx`
  (`ONNX_ARTIFACT`). Training checks max |p_onnx - p_sklearn| <= PARITY_TOLERANCE on its
  evaluation set before logging anything, and refuses otherwise.
- The registered version (model name from MODEL_NAME) carries the tags `threshold` (the decision
  threshold, the same value as the metadata), `threshold_method` and the evaluation metrics.

Decision rule: a row is fraud when its probability is >= the threshold (`is_fraud`). The service
uses the model's threshold unless FRAUD_THRESHOLD overrides it.

Loading (`load_bundle`, `load_bundle_from_uri`) returns a `ModelBundle` whose `predict_proba`
maps an (n, 29) array in FEATURES order to n fraud probabilities, and whose `predict_one` gives the
probability of a single row as a Python float (the service's hot path). With `flavor="auto"` it uses
ONNX Runtime when the ONNX artifact exists and agrees with the forest on a fixed probe set,
otherwise scikit-learn, and says why in `onnx_problem`; when the ONNX artifact could not be
downloaded (`onnx_retryable`, e.g. a registry or artifact store that failed for a moment),
`with_onnx` tries it again for the loaded bundle. A version that is
missing its model, has the wrong input schema or no valid threshold raises `ModelLoadError`;
so does an absent or disagreeing ONNX artifact when `flavor="onnx"` is demanded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import tempfile
import threading
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from common.registry import stages_api, version_in_stage
from common.schema import FEATURES, N_FEATURES
from common.text import first_line

MODEL_ARTIFACT = "model"
ONNX_ARTIFACT = "onnx/model.onnx"
ONNX_INPUT = "features"
ONNX_OUTPUT = "probabilities"
SKOPS_TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]
PARITY_TOLERANCE = 1e-5
THRESHOLD_TAG = "threshold"
THRESHOLD_METHOD_TAG = "threshold_method"
FLAVORS = ("auto", "onnx", "sklearn")

log = logging.getLogger(__name__)

# Runtime requirements of the logged model, pinned to what trained it. Given explicitly so that
# logging does not load the model in a subprocess to infer them.
_REQUIREMENT_PACKAGES = ("scikit-learn", "skops", "numpy", "scipy", "pandas")


class ModelLoadError(RuntimeError):
    """A registered version cannot be served: missing or corrupt artifacts, wrong schema, no threshold."""


class OnnxParityError(RuntimeError):
    """The ONNX export does not reproduce the forest's probabilities within PARITY_TOLERANCE."""


def is_fraud(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """The decision rule shared by training metrics and the service: p >= threshold is fraud."""
    return np.asarray(probabilities) >= threshold


# --- export and logging ----------------------------------------------------------------------------


def export_onnx(model) -> bytes:
    """Convert a fitted forest to ONNX: float32 input `features` (n, 29), output `probabilities` (n, 2).

    Raises:
        ValueError: the model does not take N_FEATURES inputs.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    if getattr(model, "n_features_in_", None) != N_FEATURES:
        raise ValueError(f"the model takes {getattr(model, 'n_features_in_', '?')} features, expected {N_FEATURES}")
    onx = convert_sklearn(
        model,
        initial_types=[(ONNX_INPUT, FloatTensorType([None, N_FEATURES]))],
        options={id(model): {"zipmap": False}},
    )
    names = [o.name for o in onx.graph.output]
    if ONNX_OUTPUT not in names:
        raise ValueError(f"unexpected ONNX outputs {names}; expected {ONNX_OUTPUT!r}")
    return onx.SerializeToString()


def onnx_session(onnx_bytes: bytes):
    """An ONNX Runtime session tuned for single-row latency (one intra-op thread, no spinning)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def sklearn_proba(model, X: np.ndarray) -> np.ndarray:
    """Fraud probabilities from the forest itself (named columns, as it was fitted)."""
    import pandas as pd

    frame = pd.DataFrame(np.asarray(X, dtype=np.float64), columns=list(FEATURES))
    return model.predict_proba(frame)[:, 1]


def onnx_max_abs_diff(model, session, X: np.ndarray, reference: np.ndarray | None = None) -> float:
    """max |p_onnx - p_sklearn| over the rows of X (reference: precomputed sklearn probabilities)."""
    expected = sklearn_proba(model, X) if reference is None else np.asarray(reference, dtype=np.float64)
    got = _OnnxScorer(session)(np.asarray(X))
    return float(np.max(np.abs(got - expected))) if len(expected) else 0.0


def model_signature():
    """29 named double inputs (FEATURES, in order); one int64 output (the predicted class, pyfunc's predict)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([ColSpec("double", name) for name in FEATURES]),
                          outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))


def pip_requirements() -> list[str]:
    """The logged model's requirements, pinned to the versions installed here (all runtime pins)."""
    return [f"{package}=={importlib_metadata.version(package)}" for package in _REQUIREMENT_PACKAGES]


@dataclass(frozen=True)
class LoggedFraudModel:
    model_uri: str
    model_id: str | None
    onnx_max_abs_diff: float
    onnx_size_bytes: int
    model_size_bytes: int | None


def log_fraud_model(model, X_eval: np.ndarray, threshold: float, threshold_method: str, *,
                    reference_proba: np.ndarray | None = None, onnx_bytes: bytes | None = None,
                    extra_metadata: dict | None = None) -> LoggedFraudModel:
    """Log the forest and its ONNX export to the active MLflow run, in the layout above.

    Does not register: training registers only after everything else was logged.

    Args:
        model: a fitted binary RandomForestClassifier over FEATURES.
        X_eval: (n, 29) evaluation rows; the parity check runs on them and the first five are
            the input example.
        threshold: the decision threshold, in [0, 1].
        threshold_method: how it was chosen (stored beside it).
        reference_proba: the forest's fraud probabilities for X_eval, when already computed.
        onnx_bytes: an existing export of `model`; exported here when None.
        extra_metadata: more keys for the model's metadata.

    Raises:
        OnnxParityError: the ONNX export disagrees with the forest; nothing was logged.
        ValueError: the threshold is not within [0, 1].
    """
    import mlflow
    import pandas as pd

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {threshold}")
    X_eval = np.asarray(X_eval, dtype=np.float64)
    onnx_bytes = onnx_bytes if onnx_bytes is not None else export_onnx(model)
    parity = onnx_max_abs_diff(model, onnx_session(onnx_bytes), X_eval, reference_proba)
    if not parity <= PARITY_TOLERANCE:
        raise OnnxParityError(f"ONNX export disagrees with scikit-learn: max |Δp| = {parity:.3g} "
                              f"> {PARITY_TOLERANCE:g} on {len(X_eval)} evaluation rows")
    metadata = {
        "threshold": float(threshold),
        "threshold_method": threshold_method,
        "onnx_artifact": ONNX_ARTIFACT,
        "onnx_max_abs_diff": parity,
        "features": list(FEATURES),
        **(extra_metadata or {}),
    }
    example = pd.DataFrame(X_eval[:5], columns=list(FEATURES))
    info = mlflow.sklearn.log_model(
        model,
        name=MODEL_ARTIFACT,
        signature=model_signature(),
        input_example=example,
        serialization_format="skops",
        skops_trusted_types=SKOPS_TRUSTED_TYPES,
        pip_requirements=pip_requirements(),
        metadata=metadata,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(ONNX_ARTIFACT).name
        path.write_bytes(onnx_bytes)
        mlflow.log_artifact(str(path), artifact_path=str(Path(ONNX_ARTIFACT).parent))
    size = mlflow.models.Model.load(info.model_uri).model_size_bytes  # MLflow records it in MLmodel
    return LoggedFraudModel(info.model_uri, getattr(info, "model_id", None), parity, len(onnx_bytes), size)


# --- loading ----------------------------------------------------------------------------------------


def probe_rows(n: int = 512) -> np.ndarray:
    """A fixed probe set for load-time parity: wide Gaussian rows reaching deep into both classes."""
    rng = np.random.default_rng(20_240_229)
    scales = np.repeat([0.5, 1.0, 2.0, 4.0, 8.0], math.ceil(n / 5))[:n, None]
    return rng.standard_normal((n, N_FEATURES)) * scales


class _OnnxScorer:
    """Thread-safe scoring through an ONNX session; single rows go through a per-thread I/O binding."""

    def __init__(self, session):
        inputs = session.get_inputs()
        outputs = [o.name for o in session.get_outputs()]
        if len(inputs) != 1:
            raise ModelLoadError(f"the ONNX model has {len(inputs)} inputs, expected 1 ({ONNX_INPUT})")
        shape = inputs[0].shape
        if inputs[0].type != "tensor(float)" or len(shape) != 2 or shape[1] != N_FEATURES:
            raise ModelLoadError(f"the ONNX input is {inputs[0].type} {shape}, "
                                 f"expected tensor(float) [n, {N_FEATURES}]")
        if ONNX_OUTPUT not in outputs:
            raise ModelLoadError(f"the ONNX model's outputs are {outputs}, expected {ONNX_OUTPUT!r}")
        self._session = session
        self._input = inputs[0].name
        self._outputs = [ONNX_OUTPUT]
        self._local = threading.local()
        self.bound = self._binding_agrees()

    def __call__(self, X: np.ndarray) -> np.ndarray:
        probabilities = self._session.run(self._outputs, {self._input: np.ascontiguousarray(X, dtype=np.float32)})[0]
        # ONNX Runtime sums the trees' votes in float32: a row every tree calls fraud can come out
        # as 1.0000001. A probability above 1 breaks the API's schema and the evaluation metrics.
        fraud = probabilities[:, 1].astype(np.float64)
        # np.clip's Python wrapper costs more than the two ufuncs.
        return np.minimum(np.maximum(fraud, 0.0, out=fraud), 1.0, out=fraud)

    def one(self, X: np.ndarray) -> float:
        """The value `self(X)[0]` for a (1, N_FEATURES) X, as a Python float, clamped in Python.

        The row is copied into this thread's input buffer and the session writes into this thread's
        output buffer, both bound once, so a request allocates no ONNX Runtime value
        (docs/decisions/007-single-row-fast-path.md).
        """
        local = self._local
        try:
            binding, row, out = local.binding
        except AttributeError:
            binding, row, out = local.binding = self._bind(self.bound)
        row[...] = X
        if binding is None:
            p = self._session.run(self._outputs, {self._input: row})[0].item(1)
        else:
            self._session.run_with_iobinding(binding)
            p = out.item(1)
        return 0.0 if p < 0.0 else 1.0 if p > 1.0 else p

    def _bind(self, bound: bool):
        """(binding, input row, output) for the calling thread; binding None: plain `run` with the row."""
        row = np.empty((1, N_FEATURES), dtype=np.float32)
        out = np.empty((1, 2), dtype=np.float32)
        if not bound:
            return None, row, out
        binding = self._session.io_binding()
        binding.bind_input(self._input, "cpu", 0, np.float32, list(row.shape), row.ctypes.data)
        binding.bind_output(ONNX_OUTPUT, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        return binding, row, out

    def _binding_agrees(self) -> bool:
        """Whether the bound path gives the plain path's probabilities on a few rows.

        A model whose output is not (1, 2) float32, or an ONNX Runtime whose binding behaves
        otherwise, falls back to `run`, which is slower but has no such assumption.
        """
        probe = probe_rows(8).astype(np.float32)
        try:
            binding, row, out = self._bind(True)
            bound = []
            for x in probe:
                row[...] = x
                self._session.run_with_iobinding(binding)
                bound.append(out.item(1))
        except Exception:  # any failure means: do not bind
            log.warning("the ONNX session cannot score through an I/O binding; single rows use run()", exc_info=True)
            return False
        plain = self._session.run(self._outputs, {self._input: probe})[0][:, 1]
        return bool(np.array_equal(np.asarray(bound, dtype=np.float32), plain))


class _SklearnScorer:
    """Scoring through the forest itself, when a version has no usable ONNX artifact."""

    def __init__(self, forest):
        self.forest = forest

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return sklearn_proba(self.forest, X)

    def one(self, X: np.ndarray) -> float:
        return float(sklearn_proba(self.forest, X)[0])


@dataclass(frozen=True)
class ModelBundle:
    """A registered version ready to score. Build with `load_bundle` or `load_bundle_from_uri`.

    `predict_proba(X)` takes an (n, 29) array in FEATURES order and returns n fraud probabilities.
    """

    name: str
    version: str
    stage: str | None
    run_id: str | None
    threshold: float
    threshold_method: str | None
    flavor: str
    parity_max_abs_diff: float | None
    onnx_problem: str | None
    features: tuple[str, ...] = FEATURES
    aliases: tuple[str, ...] = ()
    onnx_artifact: str = ONNX_ARTIFACT
    # The scikit-learn flavor because the ONNX artifact could not be downloaded: another try may get it.
    onnx_retryable: bool = False
    # sha256 of each downloaded artifact file (common.provenance.file_digests), and the version's gate
    # record tag as the registry gave it (None: the version has none).
    digests: dict[str, str] = field(default_factory=dict, compare=False)
    gate_record: str | None = None
    _scorer: _OnnxScorer | _SklearnScorer = field(default=None, repr=False, compare=False)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Fraud probabilities for each row of X.

        Raises:
            ValueError: X is not a 2-D array with 29 columns.
        """
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != N_FEATURES:
            raise ValueError(f"expected an array of shape (n, {N_FEATURES}), got {X.shape}")
        return self._scorer(X)

    def predict_one(self, X: np.ndarray) -> float:
        """The fraud probability of the single row of X, an array of shape (1, 29), as a Python float.

        The same value as `predict_proba(X)[0]`, for the service's common single-row request:
        after the model itself it takes no numpy call, where a one-row array pays numpy's fixed cost
        in every step (docs/decisions/007-single-row-fast-path.md).

        Raises:
            ValueError: X is not an array of shape (1, 29).
        """
        if X.shape != _ONE_ROW:
            raise ValueError(f"expected an array of shape {_ONE_ROW}, got {X.shape}")
        return self._scorer.one(X)

    def decide(self, probabilities: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """The decisions for these probabilities at `threshold` (default: the model's own)."""
        return is_fraud(probabilities, self.threshold if threshold is None else threshold)


_ONE_ROW = (1, N_FEATURES)
# One scikit-learn load at a time in a process. Loading parses Python source (ast), and CPython 3.11
# can fail two parses that run at once in different threads with "AST constructor recursion depth
# mismatch" (CPython gh-106905), as the champion's and the challenger's watchers did in one test
# process. Loads are rare, so the lock costs nothing that matters.
_SKLEARN_LOAD_LOCK = threading.Lock()
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))/?$")


def load_bundle_from_uri(uri: str, mlflow_client=None, *, flavor: str = "auto") -> ModelBundle:
    """Load `models:/<name>@<alias>`, `models:/<name>/<version>` or `models:/<name>/<stage>`.

    Args:
        uri: the model URI (e.g. MODEL_URI).
        mlflow_client: the registry client (default: one for MLFLOW_TRACKING_URI).
        flavor: see `load_bundle`.

    Raises:
        ModelLoadError: the URI is malformed, names nothing, or the version cannot be served.
    """
    from mlflow.exceptions import MlflowException

    from common.registry import client as registry_client

    match = _MODEL_URI.match(uri.strip())
    if not match:
        raise ModelLoadError(f"model URI {uri!r} is not models:/<name>@<alias> or models:/<name>/<version|stage>")
    mlflow_client = mlflow_client or registry_client()
    name, alias, ref = match["name"], match["alias"], match["ref"]
    try:
        if alias:
            version = mlflow_client.get_model_version_by_alias(name, alias).version
        elif ref.isdigit():
            version = ref
        else:
            found = version_in_stage(mlflow_client, name, ref)
            if found is None:
                raise ModelLoadError(f"model URI {uri!r}: {name!r} has no version in stage {ref!r}")
            version = found.version
    except MlflowException as exc:
        raise ModelLoadError(f"model URI {uri!r} names no model version: {first_line(exc)}") from None
    return load_bundle(mlflow_client, name, version, flavor=flavor)


def load_bundle(mlflow_client, name: str, version: str | int, *, flavor: str = "auto") -> ModelBundle:
    """Download, validate and prepare one registered version for scoring.

    Args:
        mlflow_client: an MlflowClient for the registry holding the version.
        name: the registered model name.
        version: its version number.
        flavor: "auto" (ONNX when present and at parity, else scikit-learn), "onnx" (required),
            or "sklearn".

    Raises:
        ModelLoadError: the version does not exist, its model artifact is missing or corrupt, its
            inputs are not the 29 FEATURES, it has no valid threshold, or (flavor="onnx") its ONNX
            artifact is missing or disagrees with the forest.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from common.provenance import GATE_RECORD_TAG, ONNX_KEY, file_digests

    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    version = str(version)
    label = f"{name} version {version}"
    try:
        with stages_api():
            mv = mlflow_client.get_model_version(name, version)
            stage = mv.current_stage
    except MlflowException as exc:
        raise ModelLoadError(f"{label} cannot be read from the registry: {first_line(exc)}") from None

    with tempfile.TemporaryDirectory(prefix="fraud-model-") as tmp:
        try:
            source = mlflow_client.get_model_version_download_uri(name, version)
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(Path(tmp) / "model"),
                                                        tracking_uri=mlflow_client.tracking_uri)
            mlmodel = Model.load(local)
        except Exception as exc:  # any download or parse failure means the same thing to a caller
            raise ModelLoadError(f"{label}: the model artifact is missing or unreadable: {first_line(exc)}") from None
        meta = mlmodel.metadata or {}
        digests = file_digests(Path(local))
        _check_signature(label, mlmodel)
        threshold = _threshold(label, mv.tags, meta)
        try:
            with _SKLEARN_LOAD_LOCK:
                forest = mlflow.sklearn.load_model(local)
        except Exception as exc:
            raise ModelLoadError(f"{label}: the scikit-learn model cannot be loaded: {first_line(exc)}") from None
        _check_forest(label, forest)
        if hasattr(forest, "n_jobs"):
            forest.n_jobs = 1  # a server scores small batches; a thread pool per call costs more than it saves

        session, parity, problem, retryable = None, None, None, False
        onnx_artifact = meta.get("onnx_artifact") or ONNX_ARTIFACT
        if flavor != "sklearn":
            session, parity, problem, retryable, onnx_digest = _load_onnx(mlflow_client, mv.run_id, onnx_artifact,
                                                                          forest, tmp)
            if onnx_digest is not None:
                digests[ONNX_KEY] = onnx_digest
            if problem and flavor == "onnx":
                raise ModelLoadError(f"{label}: {problem}")

    if session is not None:
        scorer, chosen = _OnnxScorer(session), "onnx"
    else:
        scorer, chosen = _SklearnScorer(forest), "sklearn"
    return ModelBundle(
        name=name, version=version, stage=stage, run_id=mv.run_id, threshold=threshold,
        threshold_method=mv.tags.get(THRESHOLD_METHOD_TAG) or meta.get("threshold_method"),
        flavor=chosen, parity_max_abs_diff=parity, onnx_problem=problem,
        aliases=tuple(getattr(mv, "aliases", ()) or ()), onnx_artifact=onnx_artifact, onnx_retryable=retryable,
        digests=digests, gate_record=(mv.tags or {}).get(GATE_RECORD_TAG), _scorer=scorer,
    )


def with_onnx(mlflow_client, bundle: ModelBundle) -> ModelBundle:
    """Try a scikit-learn bundle's ONNX artifact again, as `load_bundle` does.

    Returns:
        The bundle with the ONNX flavor when the artifact now downloads and agrees with the forest;
        else the bundle as it was, with the new `onnx_problem` and `onnx_retryable`. An ONNX
        bundle comes back as it is. A downloaded file's digest joins `digests` either way.
    """
    from common.provenance import ONNX_KEY

    if not isinstance(bundle._scorer, _SklearnScorer):
        return bundle
    with tempfile.TemporaryDirectory(prefix="fraud-model-") as tmp:
        session, parity, problem, retryable, digest = _load_onnx(mlflow_client, bundle.run_id, bundle.onnx_artifact,
                                                                 bundle._scorer.forest, tmp)
    digests = bundle.digests if digest is None else {**bundle.digests, ONNX_KEY: digest}
    if session is None:
        return dataclasses.replace(bundle, parity_max_abs_diff=parity, onnx_problem=problem, onnx_retryable=retryable,
                                   digests=digests)
    return dataclasses.replace(bundle, flavor="onnx", parity_max_abs_diff=parity, onnx_problem=None,
                               onnx_retryable=False, digests=digests, _scorer=_OnnxScorer(session))


def _check_signature(label: str, mlmodel) -> None:
    signature = mlmodel.signature
    if signature is None or signature.inputs is None:
        raise ModelLoadError(f"{label}: the model has no input signature; expected the {N_FEATURES} FEATURES")
    names = list(signature.inputs.input_names())
    if names != list(FEATURES):
        raise ModelLoadError(f"{label}: the model's inputs are {len(names)} columns {names[:3]}..., expected the "
                             f"{N_FEATURES} FEATURES V1..V28, Amount_scaled in order")


def _check_forest(label: str, forest) -> None:
    if not hasattr(forest, "predict_proba"):
        raise ModelLoadError(f"{label}: the model has no predict_proba")
    if getattr(forest, "n_features_in_", None) != N_FEATURES:
        raise ModelLoadError(f"{label}: the model takes {getattr(forest, 'n_features_in_', '?')} features, "
                             f"expected {N_FEATURES}")
    classes = [int(c) for c in getattr(forest, "classes_", [])]
    if classes != [0, 1]:
        raise ModelLoadError(f"{label}: the model's classes are {classes}, expected [0, 1]")


def _threshold(label: str, tags: dict, meta: dict) -> float:
    raw = tags.get(THRESHOLD_TAG, meta.get("threshold"))
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{label}: no decision threshold (version tag {THRESHOLD_TAG!r} or model metadata); "
                             f"got {raw!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ModelLoadError(f"{label}: threshold {value} is outside [0, 1]")
    return value


def _load_onnx(mlflow_client, run_id: str | None, artifact: str, forest, tmp: str):
    """(session, parity, problem, retryable, sha256): a session at parity, or None, the reason it is
    not used, whether another try may cure it (the download failed; not so a file that arrived and
    is corrupt, of another model, or of another input shape), and the downloaded file's digest."""
    import hashlib

    from mlflow.exceptions import MlflowException

    if not run_id:
        return None, None, "the version has no run, so no ONNX artifact", False, None
    try:
        path = mlflow_client.download_artifacts(run_id, artifact, str(Path(tmp) / "onnx"))
        onnx_bytes = Path(path).read_bytes()
    except (MlflowException, OSError) as exc:
        return None, None, f"ONNX artifact {artifact} is missing: {first_line(exc)}", True, None
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    try:
        session = onnx_session(onnx_bytes)
        parity = onnx_max_abs_diff(forest, session, probe_rows())
    except ModelLoadError as exc:
        return None, None, f"ONNX artifact {artifact} is incompatible: {exc}", False, digest
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt files
        return None, None, f"ONNX artifact {artifact} cannot be loaded: {first_line(exc)}", False, digest
    if not parity <= PARITY_TOLERANCE:
        return None, parity, (f"ONNX artifact {artifact} disagrees with the forest: max |Δp| = {parity:.3g} "
                              f"> {PARITY_TOLERANCE:g} on the probe set"), False, digest
    return session, parity, None, False, digest



def describe_bundle(bundle: ModelBundle) -> str:
    """One line for logs: name, version, stage, flavor and threshold."""
    return json.dumps({"name": bundle.name, "version": bundle.version, "stage": bundle.stage,
                       "flavor": bundle.flavor, "threshold": bundle.threshold, "onnx_problem": bundle.onnx_problem})
