"""PNG plots of an evaluation: PR curve, ROC curve, confusion matrix, feature importances.

Built with matplotlib's object API (`Figure` on the Agg canvas), so no pyplot state, no display
and no global backend switch are involved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

PLOT_FILES = ("pr_curve.png", "roc_curve.png", "confusion_matrix.png", "feature_importances.png")


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def pr_curve(y: np.ndarray, p: np.ndarray, threshold: float, metrics: dict, path: Path) -> Path:
    precision, recall, _ = precision_recall_curve(y, p)
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    ax.step(recall, precision, where="post", label=f"AP = {metrics['average_precision']:.3f}")
    ax.axhline(float(np.mean(y)), color="grey", linestyle=":", label=f"fraud rate {np.mean(y):.4f}")
    ax.plot([metrics["recall"]], [metrics["precision"]], "o", color="C3", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (evaluation set)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    return _save(fig, path)


def roc(y: np.ndarray, p: np.ndarray, metrics: dict, path: Path) -> Path:
    fpr, tpr, _ = roc_curve(y, p)
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, label=f"ROC AUC = {metrics['roc_auc']:.4f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    negatives = metrics["fp"] + metrics["tn"]
    ax.plot([metrics["fp"] / negatives if negatives else 0.0], [metrics["recall"]], "o", color="C3",
            label="operating point")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (evaluation set)")
    ax.legend(loc="lower right")
    return _save(fig, path)


def confusion(metrics: dict, threshold: float, path: Path) -> Path:
    counts = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
    fig = Figure(figsize=(4.5, 4))
    ax = fig.add_subplot()
    shade = np.log1p(counts)
    ax.imshow(shade, cmap="Blues")
    for (i, j), value in np.ndenumerate(counts):
        dark = shade[i, j] > shade.max() / 2
        ax.text(j, i, f"{value:,}", ha="center", va="center", color="white" if dark else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["legit", "fraud"], yticklabels=["legit", "fraud"],
           xlabel="predicted", ylabel="true", title=f"Confusion matrix at p >= {threshold:.3f}")
    return _save(fig, path)


def importances(names: Sequence[str], values: np.ndarray, path: Path) -> Path:
    order = np.argsort(values)
    fig = Figure(figsize=(6, 7))
    ax = fig.add_subplot()
    ax.barh(np.array(names)[order], np.asarray(values)[order])
    ax.set(xlabel="mean decrease in impurity", title="Feature importances")
    return _save(fig, path)


def write_plots(out_dir: Path, y: np.ndarray, p: np.ndarray, threshold: float, metrics: dict,
                feature_names: Sequence[str], feature_importances: np.ndarray) -> list[Path]:
    """Write the four PNGs (PLOT_FILES) into out_dir and return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        pr_curve(y, p, threshold, metrics, out_dir / PLOT_FILES[0]),
        roc(y, p, metrics, out_dir / PLOT_FILES[1]),
        confusion(metrics, threshold, out_dir / PLOT_FILES[2]),
        importances(feature_names, feature_importances, out_dir / PLOT_FILES[3]),
    ]
