"""The stored feature transform: `Amount` to `Amount_scaled`, fitted once, applied everywhere.

Training, monitoring and the service all scale `Amount` with the parameters kept in
`data/feature_config.json`, so a raw amount means the same thing to every component.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common import settings


class FeatureConfigError(ValueError):
    """The feature config file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class AmountScaler:
    """Standard scaling of `Amount`, as the original service's `Amount_scaled` column used."""

    mean: float
    std: float
    fitted_rows: int = 0
    fitted_on: str = ""

    @classmethod
    def fit(cls, amounts: np.ndarray, fitted_on: str = "") -> AmountScaler:
        """Fit on raw amounts.

        Raises:
            FeatureConfigError: no amounts, or they have no spread.
        """
        amounts = np.asarray(amounts, dtype=np.float64)
        if amounts.size == 0:
            raise FeatureConfigError("cannot fit the Amount scaler on zero rows")
        std = float(amounts.std())
        if not math.isfinite(std) or std == 0.0:
            raise FeatureConfigError("cannot fit the Amount scaler: Amount has no spread")
        return cls(float(amounts.mean()), std, int(amounts.size), fitted_on)

    def transform(self, amounts: np.ndarray | float) -> np.ndarray:
        """Return (amount - mean) / std."""
        return (np.asarray(amounts, dtype=np.float64) - self.mean) / self.std


def load_feature_config(path: Path | None = None) -> AmountScaler:
    """Read the stored scaler (default: FEATURE_CONFIG).

    Raises:
        FeatureConfigError: the file is missing or malformed; the message names the file.
    """
    path = path or settings.feature_config_path()
    try:
        raw = json.loads(Path(path).read_text())
        scaler = raw["amount_scaler"]
        mean, std = float(scaler["mean"]), float(scaler["std"])
    except FileNotFoundError:
        raise FeatureConfigError(f"feature config {path} does not exist; import a CSV first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FeatureConfigError(f"feature config {path} is malformed: {exc}") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise FeatureConfigError(f"feature config {path} has an invalid scaler: mean={mean}, std={std}")
    return AmountScaler(mean, std, int(scaler.get("fitted_rows", 0)), str(scaler.get("fitted_on", "")))


def save_feature_config(scaler: AmountScaler, path: Path | None = None) -> Path:
    """Write the scaler atomically (a temporary file renamed over the old one)."""
    path = Path(path or settings.feature_config_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"amount_scaler": {"method": "standard", **asdict(scaler)}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; this is shared config, not a secret
    os.replace(tmp, path)
    return path
