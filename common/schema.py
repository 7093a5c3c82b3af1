"""The feature schema: one definition of the 29 model inputs and the raw CSV columns."""

from __future__ import annotations

V_COLUMNS: tuple[str, ...] = tuple(f"V{i}" for i in range(1, 29))
# The model's inputs, in the order the original service's `data` rows use.
FEATURES: tuple[str, ...] = (*V_COLUMNS, "Amount_scaled")
N_FEATURES = len(FEATURES)
# The public credit-card dataset's columns, in file order.
CSV_COLUMNS: tuple[str, ...] = ("Time", *V_COLUMNS, "Amount", "Class")
LABEL = "Class"
SCORE = "score"
