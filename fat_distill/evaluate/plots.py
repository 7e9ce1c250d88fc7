"""PNG plots of evaluation results: CMC curves, confidence histograms, noise-detection PR curves.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, so no global
figure state and no display needed) and written atomically: to a temporary
file beside the target, then renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve

from fat_distill.atomic import atomic_write
from fat_distill.evaluate.retrieval import RetrievalResult

_DPI = 120


def _new_figure(width: float = 6.0, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="tight")
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` to ``path`` atomically (temp file + rename); returns the path."""
    return atomic_write(path, lambda handle: figure.savefig(handle, format="png"), fsync=False)


def _noise_arrays(confidence: Sequence[float] | np.ndarray, is_noisy: Sequence[bool] | np.ndarray):
    confidence = np.asarray(confidence, dtype=np.float64)
    is_noisy = np.asarray(is_noisy, dtype=bool)
    if confidence.ndim != 1 or confidence.shape != is_noisy.shape:
        raise ValueError(
            f"confidence and is_noisy must be 1-D of equal length, got {confidence.shape} and {is_noisy.shape}"
        )
    if len(confidence) == 0 or not np.isfinite(confidence).all():
        raise ValueError("confidence must be a non-empty array of finite values")
    return confidence, is_noisy


def plot_cmc(results: Mapping[str, RetrievalResult], path: str | Path) -> Path:
    """CMC curves of several evaluations on one axis, rank-1 and mAP in the legend.

    Args:
        results: ``{name: RetrievalResult}``, e.g. ``{"teacher": …, "student": …}``.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    if not results:
        raise ValueError("plot_cmc: results is empty; pass at least one {name: RetrievalResult}")
    figure = _new_figure()
    axes = figure.add_subplot()
    for name, result in results.items():
        ranks = np.arange(1, len(result.cmc) + 1)
        label = f"{name} (R1 {100 * result.rank1:.1f}%, mAP {100 * result.mAP:.1f}%)"
        axes.plot(ranks, 100 * result.cmc, marker="." if len(ranks) <= 20 else None, label=label)
    axes.set(xlabel="rank", ylabel="matching rate (%)", title="CMC", ylim=(0, 100.5))
    axes.set_xlim(left=1)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return _save_png(figure, path)


def plot_confidence_histogram(
    confidence: Sequence[float] | np.ndarray,
    is_noisy: Sequence[bool] | np.ndarray,
    path: str | Path,
    threshold: float | None = None,
) -> Path:
    """Overlaid histograms of the confidence of clean and of noisy samples.

    Two well-separated humps mean the score can find the noise; the threshold
    line shows where the ``confident`` flag cuts.

    Args:
        confidence: shape (N,), higher = more likely clean.
        is_noisy: shape (N,), bool ground truth.
        path: the PNG to write.
        threshold: confidence below which samples are flagged; drawn if given.

    Returns:
        ``path``.
    """
    confidence, is_noisy = _noise_arrays(confidence, is_noisy)
    return _overlaid_histograms(confidence, is_noisy, ("clean", "noisy"), path, threshold,
                                "Confidence of clean vs noisy labels")


def plot_confidence_flags(
    confidence: Sequence[float] | np.ndarray,
    flagged: Sequence[bool] | np.ndarray,
    path: str | Path,
    threshold: float | None = None,
) -> Path:
    """Overlaid histograms of the confidence of the rows the teacher kept and of those it flagged.

    The ground-truth-free view of :func:`plot_confidence_histogram`: on real data
    nobody knows which labels are noisy, only which ones the teacher distrusts.

    Args:
        confidence: shape (N,), the teacher's confidence in each given label.
        flagged: shape (N,), bool, True where the teacher does not trust the label.
        path: the PNG to write.
        threshold: confidence below which samples are flagged; drawn if given.

    Returns:
        ``path``.
    """
    confidence, flagged = _noise_arrays(confidence, flagged)
    return _overlaid_histograms(confidence, flagged, ("kept", "flagged"), path, threshold,
                                "Teacher confidence in the given labels")


def _overlaid_histograms(confidence: np.ndarray, second: np.ndarray, names: tuple[str, str], path: str | Path,
                         threshold: float | None, title: str) -> Path:
    figure = _new_figure()
    axes = figure.add_subplot()
    low, high = float(confidence.min()), float(confidence.max())
    bins = np.linspace(low, high if high > low else low + 1.0, 41)
    for name, mask, colour in ((names[0], ~second, "tab:blue"), (names[1], second, "tab:red")):
        if mask.any():
            axes.hist(confidence[mask], bins=bins, alpha=0.55, color=colour, label=f"{name} ({int(mask.sum())})")
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    axes.set(xlabel="confidence", ylabel="samples", title=title)
    axes.legend()
    return _save_png(figure, path)


def plot_noise_pr_curve(
    confidence: Sequence[float] | np.ndarray, is_noisy: Sequence[bool] | np.ndarray, path: str | Path
) -> Path:
    """Precision–recall curve of detecting noisy samples by ``1 − confidence``, AP in the legend.

    The dashed line is the noise rate: the precision of flagging at random.

    Args:
        confidence: shape (N,), higher = more likely clean.
        is_noisy: shape (N,), bool ground truth; needs at least one noisy sample.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    confidence, is_noisy = _noise_arrays(confidence, is_noisy)
    if not is_noisy.any():
        raise ValueError("plot_noise_pr_curve: no sample is noisy, so precision and recall are undefined")
    precision, recall, _ = precision_recall_curve(is_noisy, 1.0 - confidence)
    average_precision = average_precision_score(is_noisy, 1.0 - confidence)
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.step(recall, precision, where="post", label=f"AP {average_precision:.3f}")
    axes.axhline(is_noisy.mean(), color="grey", linestyle="--", label=f"noise rate {is_noisy.mean():.3f}")
    axes.set(xlabel="recall (noisy found)", ylabel="precision", title="Noise detection", xlim=(0, 1), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    return _save_png(figure, path)
