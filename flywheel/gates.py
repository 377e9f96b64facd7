"""Promotion gates: is a candidate at least as good as the champion on the same test rows?

Pure functions of predictions and settings (no registry, no orchestrator): the registry calls
them and moves aliases on their verdict. The rule and its defaults: docs/decisions/0012.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from flywheel.config import RegistryConfig

OVERALL = "overall"
METRICS = ("accuracy", "macro-F1")
# Verdicts of one estimate (candidate minus champion, an interval around it)
BETTER, NOT_WORSE, UNDECIDED, WORSE, NOT_JUDGED = (
    "better",
    "not worse",
    "may be worse",
    "worse",
    "not judged",
)
CHUNK = 250  # bootstrap resamples per matrix product (memory: CHUNK x rows floats)
# Resamples beyond each end of the widest (Bonferroni) interval: fewer, and its ends would be
# set by a handful of draws (2,000 resamples put a 99.8 % end on the 4th most extreme one).
TAIL_DRAWS = 20


@dataclass(frozen=True)
class Check:
    """One gate: its name, whether it passed and what it measured, in words."""

    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'pass' if self.passed else 'FAIL'}: {self.detail}"


def lines(checks: Sequence[Check], notes: Sequence[str] = ()) -> list[str]:
    """Every gate with its figures and verdict, then what was reported but not judged."""
    return [c.line() for c in checks] + [f"note: {n}" for n in notes]


@dataclass(frozen=True)
class Estimate:
    """Candidate minus champion on one metric of one slice, with its confidence interval."""

    slice: str  # OVERALL or e.g. "source=feedback"
    metric: str  # "accuracy" or "macro-F1"
    rows: int
    candidate: float
    champion: float
    low: float  # the interval of (candidate - champion) at the configured confidence
    high: float
    verdict: str  # BETTER, NOT_WORSE, UNDECIDED, WORSE or NOT_JUDGED
    margin: float  # how much worse may still count as not worse (a fraction)
    adjusted: tuple[float, float] | None = None  # the interval corrected for multiple tests ...
    adjusted_level: float | None = None  # ... and its confidence (e.g. 0.996)

    @property
    def difference(self) -> float:
        return self.candidate - self.champion

    @property
    def judged(self) -> bool:
        return self.verdict != NOT_JUDGED

    @property
    def blocks(self) -> bool:
        return self.verdict in (WORSE, UNDECIDED)

    def text(self) -> str:
        """e.g. "source=feedback accuracy: +4.1 pts [+1.2, +7.0], 158 rows: better"."""
        where = self.slice if self.slice == OVERALL else f"{self.slice} slice"
        figures = (
            f"{100 * self.difference:+.1f} pts [{100 * self.low:+.1f}, {100 * self.high:+.1f}], "
            f"{self.rows:,} rows"
        )
        return f"{where} {self.metric}: {figures}: {self.verdict_text()}"

    def verdict_text(self) -> str:
        margin = f"{100 * self.margin:.3g} pts"
        significance = ""
        if self.adjusted is not None and self.adjusted_level is not None:
            low, high = self.adjusted
            significance = (
                f"[{100 * low:+.1f}, {100 * high:+.1f}] at {self.adjusted_level:.1%}, corrected "
                "for the number of estimates judged"
            )
        return {
            BETTER: f"better ({significance})",
            NOT_WORSE: f"not worse than -{margin}",
            UNDECIDED: f"may be worse by more than {margin} (not shown to be within the margin)",
            WORSE: f"worse (a significant loss: {significance})",
            NOT_JUDGED: "reported, not judged (too few rows)",
        }[self.verdict]

    def to_dict(self) -> dict[str, object]:
        return {
            "slice": self.slice,
            "metric": self.metric,
            "rows": self.rows,
            "candidate": round(self.candidate, 6),
            "champion": round(self.champion, 6),
            "low": round(self.low, 6),
            "high": round(self.high, 6),
            "verdict": self.verdict,
            "margin": self.margin,
            "adjusted": [round(v, 6) for v in self.adjusted] if self.adjusted else None,
            "adjusted_level": self.adjusted_level,
        }


@dataclass(frozen=True)
class Paired:
    """Both models' answers on the same rows, compared metric by metric and slice by slice."""

    estimates: list[Estimate]
    confidence: float
    resamples: int
    seed: int
    discordant: tuple[int, int]  # rows only the candidate gets right, rows only the champion does
    mcnemar_p: float  # exact McNemar test of the accuracies (two-sided)
    label_problem: str | None = None  # why the two models cannot be compared, if they cannot

    @property
    def judged(self) -> list[Estimate]:
        return [e for e in self.estimates if e.judged]


def _scores(weights: np.ndarray, truth: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """Accuracy and macro-F1 over the `k` labels (scikit-learn's, zero_division=0) for each row
    of `weights` (how many times each row is drawn): shape (resamples, 2)."""
    n = len(truth)
    true_1h, pred_1h = np.eye(k)[truth], np.eye(k)[predicted]
    correct = (truth == predicted).astype(float)
    tp, in_truth, in_pred = weights @ (true_1h * pred_1h), weights @ true_1h, weights @ pred_1h
    denominator = in_truth + in_pred  # 2 TP + FP + FN
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return np.stack([(weights @ correct) / n, f1.mean(axis=1)], axis=1)


def bootstrap(
    truth: Sequence[str],
    candidate: Sequence[str],
    champion: Sequence[str],
    labels: Sequence[str],
    resamples: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paired bootstrap: the same resampled rows score both models. Macro-F1 averages over
    `labels` (which must hold every label of the truth and the answers). Returns the
    candidate's and the champion's (accuracy, macro-F1) and the resampled differences, shape
    (resamples, 2)."""
    codes = {label: i for i, label in enumerate(labels)}
    missing = sorted({*truth, *candidate, *champion} - set(codes))
    if missing:
        raise ValueError(f"labels {missing} are not in the label set {list(labels)}")
    y, a, b = (np.array([codes[v] for v in values]) for values in (truth, candidate, champion))
    k, n = len(labels), len(y)
    everything = np.ones((1, n))
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, resamples, CHUNK):
        weights = rng.multinomial(n, np.full(n, 1 / n), size=min(CHUNK, resamples - start))
        weights = weights.astype(float)
        out.append(_scores(weights, y, a, k) - _scores(weights, y, b, k))
    return _scores(everything, y, a, k)[0], _scores(everything, y, b, k)[0], np.concatenate(out)


def exact_mcnemar(only_candidate: int, only_champion: int) -> float:
    """Two-sided exact McNemar p-value: the discordant rows as a fair coin's tosses."""
    from scipy.stats import binomtest

    n = only_candidate + only_champion
    return 1.0 if n == 0 else float(binomtest(only_candidate, n, 0.5).pvalue)


def slice_margin(rc: RegistryConfig, rows: int, total: int) -> float:
    """The non-inferiority margin of a slice of `rows` of `total` test rows: registry.slice_margin,
    or (null) the overall margin scaled as the interval widens, by sqrt(total / rows)."""
    if rc.slice_margin is not None:
        return rc.slice_margin
    return rc.margin * math.sqrt(total / rows)


def _verdict(low: float, adjusted: tuple[float, float], margin: float) -> str:
    if adjusted[1] < 0:
        return WORSE
    if low < -margin:
        return UNDECIDED
    return BETTER if adjusted[0] > 0 else NOT_WORSE


def _label_set_problem(
    candidate_labels: Sequence[str] | None, champion_labels: Sequence[str] | None
) -> str | None:
    """Why two models cannot be compared (they predict different label sets), or None."""
    if candidate_labels is None or champion_labels is None:
        return None
    if set(candidate_labels) == set(champion_labels):
        return None
    return (
        f"the models predict different label sets (candidate: "
        f"{', '.join(sorted(candidate_labels))}; champion: "
        f"{', '.join(sorted(champion_labels))}): they cannot be compared"
    )


def _estimates(
    name: str,
    rows: np.ndarray,
    answers: tuple[list[str], list[str], list[str]],
    labels: list[str],
    judged: bool,
    margin: float,
    rc: RegistryConfig,
    tail: float,
    resamples: int,
    seed: int,
) -> list[Estimate]:
    """The intervals of one group of rows (overall or a slice), one estimate per metric."""
    truth, candidate, champion = ([a[i] for i in rows] for a in answers)
    ours, theirs, resampled = bootstrap(truth, candidate, champion, labels, resamples, seed)
    alpha = 1 - rc.confidence
    interval = np.quantile(resampled, [alpha / 2, 1 - alpha / 2], axis=0)
    wide = np.quantile(resampled, [tail, 1 - tail], axis=0)
    out = []
    for j, metric in enumerate(METRICS):
        low, high = float(interval[0, j]), float(interval[1, j])
        adjusted = (float(wide[0, j]), float(wide[1, j]))
        verdict = _verdict(low, adjusted, margin) if judged else NOT_JUDGED
        out.append(
            Estimate(
                name,
                metric,
                len(rows),
                float(ours[j]),
                float(theirs[j]),
                low,
                high,
                verdict,
                margin,
                adjusted,
                1 - 2 * tail,
            )
        )
    return out


def compare(
    truth: Sequence[str],
    candidate: Sequence[str],
    champion: Sequence[str],
    slices: Mapping[str, np.ndarray],
    rc: RegistryConfig,
    seed: int,
    candidate_labels: Sequence[str] | None = None,
    champion_labels: Sequence[str] | None = None,
) -> Paired:
    """Candidate against champion on the same rows: accuracy and macro-F1, overall and on each
    slice (boolean row masks), as paired-bootstrap intervals of the difference.

    A slice is judged when it has at least `rc.min_slice_rows` rows. Non-inferiority uses the
    intervals at `rc.confidence`; a significant loss or gain is judged on intervals widened for
    the number of judged estimates (Bonferroni), so ten slices of two equal models do not
    produce a "significant" loss one time in two by chance."""
    answers = (list(truth), list(candidate), list(champion))
    truth, candidate, champion = answers
    if not len(truth) == len(candidate) == len(champion):
        raise ValueError(
            f"truth, candidate and champion answers differ in length "
            f"({len(truth)}, {len(candidate)}, {len(champion)})"
        )
    labels = sorted({*truth, *candidate, *champion, *(candidate_labels or ())})
    groups = {
        name: rows
        for name, mask in {OVERALL: np.ones(len(truth), dtype=bool), **dict(slices)}.items()
        if len(rows := np.flatnonzero(mask))
    }
    judged = {name: name == OVERALL or len(r) >= rc.min_slice_rows for name, r in groups.items()}
    tail = (1 - rc.confidence) / (2 * max(1, len(METRICS) * sum(judged.values())))  # Bonferroni
    resamples = max(rc.bootstrap_resamples, math.ceil(TAIL_DRAWS / tail))
    estimates = []
    for offset, (name, rows) in enumerate(groups.items()):
        margin = slice_margin(rc, len(rows), len(truth)) if name != OVERALL else rc.margin
        estimates += _estimates(
            name, rows, answers, labels, judged[name], margin, rc, tail, resamples, seed + offset
        )
    right_a = np.array([t == c for t, c in zip(truth, candidate, strict=True)])
    right_b = np.array([t == c for t, c in zip(truth, champion, strict=True)])
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    return Paired(
        estimates,
        rc.confidence,
        resamples,
        seed,
        (only_a, only_b),
        exact_mcnemar(only_a, only_b),
        _label_set_problem(candidate_labels, champion_labels),
    )


@dataclass(frozen=True)
class Candidate:
    """A model version as the absolute gates see it."""

    version: str
    macro_f1: float  # on the current test split
    p95_ms: float | None  # single-text latency; None: not measured (that gate is not run)


@dataclass(frozen=True)
class Verdict:
    """Every gate's check, and the paired comparison they came from (None: no champion)."""

    checks: list[Check]
    paired: Paired | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [c.detail for c in self.checks if not c.passed]

    def lines(self) -> list[str]:
        return lines(self.checks, self.notes)


def judge(candidate: Candidate, paired: Paired | None, rc: RegistryConfig) -> Verdict:
    """The promotion rule: the absolute floor and latency bound; with a champion, no judged
    estimate worse (a significant loss blocks) or possibly worse than its margin; and, when
    `rc.promote_without_gain` is false, at least one significant gain."""
    checks = [
        Check(
            "min_test_macro_f1",
            candidate.macro_f1 >= rc.min_test_macro_f1,
            f"test macro-F1 {candidate.macro_f1:.4f} vs minimum {rc.min_test_macro_f1:.4f}",
        )
    ]
    if candidate.p95_ms is not None:
        checks.append(
            Check(
                "max_p95_latency_ms",
                candidate.p95_ms <= rc.max_p95_latency_ms,
                f"p95 latency {candidate.p95_ms:.1f} ms vs bound {rc.max_p95_latency_ms:.1f} ms",
            )
        )
    if paired is None:
        return Verdict(checks)
    if paired.label_problem is not None:
        return Verdict([*checks, Check("same labels", False, paired.label_problem)], paired)
    for estimate in paired.estimates:
        if estimate.judged:
            checks.append(
                Check(f"{estimate.slice} {estimate.metric}", not estimate.blocks, estimate.text())
            )
    notes = [e.text() for e in paired.estimates if not e.judged]
    gains = [e for e in paired.judged if e.verdict == BETTER]
    if not rc.promote_without_gain:
        checks.append(
            Check(
                "significant gain",
                bool(gains),
                f"significantly better on {', '.join(f'{e.slice} {e.metric}' for e in gains)}"
                if gains
                else "no judged estimate is significantly better "
                "(registry.promote_without_gain is false)",
            )
        )
    return Verdict(checks, paired, notes)
