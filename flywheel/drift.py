"""Monitor: drift of the served traffic against the model's reference profile.

`drift` (pure) compares a window of one version's logged predictions (predictions.py) with the
profile saved with it (models/profile.py): length and confidence PSI, label shift, OOV drift;
`monitor` reads the newest `monitor.window` and the profile, `write_report` writes
drift.{json,md,png,html}. Formulas and their reading: docs/serving.md; why:
docs/decisions/0009-serving-feedback-and-retrain-trigger.md.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel import predictions
from flywheel.config import Config, RetrainConfig
from flywheel.errors import FlywheelError
from flywheel.io import replace_dir_atomic, write_json
from flywheel.models.profile import ReferenceProfile, shares
from flywheel.tables import markdown_table

PSI_FLOOR = 1e-4  # an empty bin would make ln(w / r) infinite: shares are floored at this
# The statistics the retrain check judges: (name, Drift field, bound in retrain:).
JUDGED = (
    ("length PSI", "length_psi", "max_psi"),
    ("confidence PSI", "confidence_psi", "max_psi"),
    ("label shift", "label_shift", "max_label_shift"),
    ("OOV drift", "oov_drift", "max_oov_drift"),
)


class MonitorError(FlywheelError):
    """Drift cannot be computed for this version; the message says why and what to do."""


def psi(reference: Sequence[float], current: Sequence[float], floor: float = PSI_FLOOR) -> float:
    """Population Stability Index of two share vectors over the same bins."""
    r = np.maximum(np.asarray(reference, dtype=float), floor)
    c = np.maximum(np.asarray(current, dtype=float), floor)
    return float(np.sum((c - r) * np.log(c / r)))


def label_shift(reference: dict[str, float], current: dict[str, float]) -> float:
    """Total variation distance between two label distributions."""
    labels = set(reference) | set(current)
    return 0.5 * sum(abs(current.get(k, 0.0) - reference.get(k, 0.0)) for k in labels)


@dataclass(frozen=True)
class Drift:
    """Drift of one model version's window of predictions against its reference."""

    model_version: str
    rows: int
    judged: bool
    length_psi: float
    confidence_psi: float
    label_shift: float
    oov_drift: float
    oov_mean: float
    first: str | None  # created_at of the oldest prediction in the window
    last: str | None
    length_shares: list[float]
    confidence_shares: list[float]
    oov_shares: list[float]
    label_shares: dict[str, float]
    first_seq: int = 0  # prediction-log seq of the oldest prediction in the window (0: none)
    last_seq: int = 0

    def figures(self, rc: RetrainConfig) -> list[tuple[str, float, float, str]]:
        """(name, value, bound, the bound's key in retrain:) of each statistic the retrain check
        judges."""
        return [(name, getattr(self, field), getattr(rc, key), key) for name, field, key in JUDGED]

    def exceeded(self, rc: RetrainConfig) -> list[str]:
        """Each bound of retrain: the window is over, in words (none when not judged)."""
        if not self.judged:
            return []
        return [
            f"{name} {value:.3f} > retrain.{key} {bound:g}"
            for name, value, bound, key in self.figures(rc)
            if value > bound
        ]

    def to_dict(self) -> dict:
        """As JSON can hold it: a figure that could not be measured is null, not NaN."""
        return {
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in asdict(self).items()
        }


def drift(
    reference: ReferenceProfile, window: pd.DataFrame, model_version: str, min_window: int
) -> Drift:
    """The statistics of a window of logged predictions (pure)."""
    rows = len(window)
    lengths = window["length"].to_numpy(dtype=float)
    confidences = window["confidence"].to_numpy(dtype=float)
    oov = window["oov_rate"].dropna().to_numpy(dtype=float)
    counts = window["label"].value_counts()
    labels = {str(k): float(v) / rows for k, v in counts.items()} if rows else {}
    length_shares = shares(lengths, reference.length.cuts)
    confidence_shares = shares(confidences, reference.confidence.cuts)
    oov_shares = shares(oov, reference.oov.cuts)
    oov_mean = float(oov.mean()) if len(oov) else math.nan
    judged = rows >= min_window
    return Drift(
        model_version=model_version,
        rows=rows,
        judged=judged,
        length_psi=psi(reference.length.shares, length_shares) if rows else math.nan,
        confidence_psi=psi(reference.confidence.shares, confidence_shares) if rows else math.nan,
        label_shift=label_shift(reference.predicted_labels, labels) if rows else math.nan,
        oov_drift=oov_mean - reference.oov_mean if len(oov) else math.nan,
        oov_mean=oov_mean,
        first=str(window["created_at"].iloc[0]) if rows else None,
        last=str(window["created_at"].iloc[-1]) if rows else None,
        length_shares=length_shares,
        confidence_shares=confidence_shares,
        oov_shares=oov_shares,
        label_shares=labels,
        first_seq=int(window["seq"].iloc[0]) if rows else 0,
        last_seq=int(window["seq"].iloc[-1]) if rows else 0,
    )


def monitor(
    cfg: Config, version: str = "champion", window: int | None = None
) -> tuple[Drift, ReferenceProfile]:
    """Drift of a registered version (number or alias) over its newest logged predictions."""
    from flywheel.registry import ModelRegistry

    registry = ModelRegistry.of(cfg)
    number = registry.version(version).version
    reference = registry.reference(number)
    if reference is None:
        raise MonitorError(
            f"version {number} was exported before reference profiles existed, so its drift "
            "cannot be measured: run `flywheel run --force-from export` to export it again"
        )
    frame = predictions.read(
        cfg.resolve(cfg.monitor.predictions_path), number, window or cfg.monitor.window
    )
    return drift(reference, frame, number, cfg.monitor.min_window), reference


def table(result: Drift, rc: RetrainConfig, min_window: int) -> list[dict[str, str]]:
    """The statistics with their bounds and state, as rows (CLI and markdown)."""

    def state(value: float, bound: float) -> str:
        if math.isnan(value):  # no predictions, or a model served without its vocabulary
            return "not measured"
        if not result.judged:
            return f"not judged ({result.rows} < monitor.min_window {min_window})"
        return "over" if value > bound else "ok"

    return [
        {
            "statistic": name,
            "value": "-" if math.isnan(value) else f"{value:.4f}",
            "bound": f"{bound:g}",
            "state": state(value, bound),
        }
        for name, value, bound, _ in result.figures(rc)
    ]


def plot(result: Drift, reference: ReferenceProfile, path: Path) -> None:
    """Reference vs window shares per bin: lengths, confidences, OOV shares, labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("text length (chars)", reference.length, result.length_shares),
        ("confidence", reference.confidence, result.confidence_shares),
        ("OOV share", reference.oov, result.oov_shares),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (title, hist, window) in zip(axes, panels, strict=False):
        names = bin_names(hist.cuts)
        x = np.arange(len(names))
        ax.bar(x - 0.2, hist.shares, 0.4, label="reference")
        ax.bar(x + 0.2, window, 0.4, label="window")
        ax.set_xticks(x, names, rotation=60, fontsize=7)
        ax.set_title(title)
    labels = sorted(set(reference.predicted_labels) | set(result.label_shares))
    x = np.arange(len(labels))
    axes[3].bar(x - 0.2, [reference.predicted_labels.get(k, 0) for k in labels], 0.4)
    axes[3].bar(x + 0.2, [result.label_shares.get(k, 0) for k in labels], 0.4)
    axes[3].set_xticks(x, labels)
    axes[3].set_title("predicted label")
    axes[0].legend()
    fig.suptitle(f"version {result.model_version}: {result.rows} predictions vs reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bin_names(cuts: Sequence[float]) -> list[str]:
    """Axis labels of the bins split at `cuts`: a value v is in bin searchsorted(cuts, v,
    side="right"), so bins are [c_i, c_i+1), the first < c_0 and the last >= c_last."""
    if not len(cuts):
        return ["all"]
    edges = [f"{c:.3g}" for c in cuts]
    inner = [f"[{a}, {b})" for a, b in zip(edges, edges[1:], strict=False)]
    return [f"<{edges[0]}", *inner, f">={edges[-1]}"]


def markdown(result: Drift, rc: RetrainConfig, min_window: int) -> str:
    rows = table(result, rc, min_window)
    lines = [
        f"# Drift of version {result.model_version}",
        "",
        f"{result.rows} predictions from {result.first or '-'} to {result.last or '-'}.",
        "",
        markdown_table(["statistic", "value", "bound", "state"], [list(r.values()) for r in rows]),
    ]
    return "\n".join(lines) + "\n"


def write_report(result: Drift, reference: ReferenceProfile, cfg: Config, out_dir: Path) -> Path:
    """drift.json, drift.md, drift.png and drift.html in `out_dir` (replaced whole)."""
    rc, min_window = cfg.retrain, cfg.monitor.min_window

    def fill(staging: Path) -> None:
        write_json(staging / "drift.json", result.to_dict() | {"exceeded": result.exceeded(rc)})
        text = markdown(result, rc, min_window)
        (staging / "drift.md").write_text(text)
        plot(result, reference, staging / "drift.png")
        image = base64.b64encode((staging / "drift.png").read_bytes()).decode()
        rows = "".join(
            "<tr>" + "".join(f"<td>{v}</td>" for v in row.values()) + "</tr>"
            for row in table(result, rc, min_window)
        )
        (staging / "drift.html").write_text(
            "<!doctype html><meta charset='utf-8'><title>Flywheel drift</title>"
            f"<h1>Drift of version {result.model_version}</h1>"
            f"<p>{result.rows} predictions from {result.first or '-'} to {result.last or '-'}.</p>"
            "<table border=1 cellpadding=4><tr><th>statistic</th><th>value</th><th>bound</th>"
            f"<th>state</th></tr>{rows}</table>"
            f"<p><img alt='reference vs window' src='data:image/png;base64,{image}'></p>"
        )

    replace_dir_atomic(out_dir, fill)
    return out_dir
