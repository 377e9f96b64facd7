"""`flywheel demo feedback`: the whole loop on real text the champion was not trained for.

VADER's rated Amazon snippets (flywheel/datasets/vader_amazon) are cut in two by a stable hash:
one half goes to a served champion's /feedback (the pipeline runs first if there is none), then
`flywheel retrain --if-needed`; the held-back half is scored before and after. Report:
reports/demo/feedback.{json,md}. Steps and figures: docs/serving.md (the demo section).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flywheel.cli.common import ParamsOption, user_errors
from flywheel.config import DEFAULT_PARAMS, Config, ConfigError, load_config
from flywheel.errors import FlywheelError
from flywheel.tables import markdown_table

if TYPE_CHECKING:  # what the demo needs loads when it runs, not with every command
    import pandas as pd

    from flywheel.registry import ModelRegistry

log = logging.getLogger(__name__)

REPORT_DIR = Path("reports/demo")
RELOAD_SECONDS = 1.0


class DemoError(FlywheelError):
    """The demo cannot go on; the message says why and what to do."""


demo_app = typer.Typer(
    help="Scripted demonstrations on real data.", no_args_is_help=True, add_completion=False
)


@demo_app.command("feedback")
def demo_feedback(
    params: ParamsOption = DEFAULT_PARAMS,
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Server port (0: a free one).")
    ] = 0,
    limit: Annotated[
        int | None,
        typer.Option(
            "--snippets", min=10, help="Use this many snippets (seeded sample), not all of them."
        ),
    ] = None,
) -> None:
    """The feedback loop end to end: serve the champion, send it VADER's human-rated Amazon
    product review snippets, give half of them as feedback, let `flywheel retrain --if-needed`
    decide, and compare the old and the new champion on the held-back half.

    Needs a champion with a reference profile (runs `flywheel run` first if there is no
    champion). Takes about as long as one pipeline run. Writes reports/demo/feedback.json and
    feedback.md. The feedback rows stay in the project's feedback store (data/feedback/); the
    demo's ids make a second run add none.
    """
    with user_errors(params):
        report = feedback_demo(params.resolve(), port, limit)
    typer.echo(
        f"old champion {report['old_champion']}: accuracy {report['old_accuracy']:.4f} on the "
        f"{report['held_back_rows']:,} held-back snippets"
    )
    if report["new_accuracy"] is not None:
        who = "new champion" if report["promoted"] else "candidate (not promoted)"
        typer.echo(
            f"{who} {report['candidate']}: accuracy {report['new_accuracy']:.4f} on the same"
        )
    if report["promotion"]:
        typer.echo(f"promotion: {report['promotion']}")
        for line in report["gates"]:
            typer.echo(f"  {line}")
    typer.echo(f"outcome: {report['outcome'] or 'not fired'}")
    typer.echo("report: reports/demo/feedback.md")


@dataclass(frozen=True)
class Halves:
    feedback: pd.DataFrame
    held_back: pd.DataFrame
    dropped_conflicting: int  # snippets whose text occurs with both labels
    dropped_duplicates: int  # repeats of a text already kept
    dropped_seen: int  # held-back snippets whose text is already in the feedback store


def snippet_key(text: str, pii: Sequence[str] = ()) -> str:
    """What makes two snippets the same text: the clean stage's key (cleaned, the `pii` kinds
    masked, normalised)."""
    from flywheel.pii import clean_and_mask
    from flywheel.text import normalised_key

    return normalised_key(clean_and_mask(text, pii)[0])


def split_halves(
    frame: pd.DataFrame,
    seed: int,
    limit: int | None = None,
    seen: frozenset[str] = frozenset(),
    pii: Sequence[str] = (),
) -> Halves:
    """Feedback and held-back halves by a stable hash of each snippet's text and the seed.

    A text is in the same half whatever `limit` is (with `limit`: the `limit` snippets first in
    a hash order, the same for every run), a text and its near-duplicates are never in both
    halves (one is kept; texts seen with both labels are dropped), and a held-back snippet whose
    text is already feedback (`seen`: keys of the feedback store, e.g. from an earlier demo) is
    dropped: the held-back half is never training data.
    """
    keyed = frame.assign(key=frame["text"].map(lambda t: snippet_key(t, pii)))
    conflicting = keyed.groupby("key")["label"].transform("nunique") > 1
    kept = keyed[~conflicting]
    unique = kept.drop_duplicates("key")
    duplicates = len(kept) - len(unique)
    digests = unique["key"].map(
        lambda k: hashlib.sha256(f"{seed}\x1fdemo\x1f{k}".encode()).digest()
    )
    unique = unique.assign(
        order=digests.map(lambda d: int.from_bytes(d[:8], "big")),
        to_feedback=digests.map(lambda d: d[8] % 2 == 0),
    ).sort_values("order", kind="stable")
    if limit is not None:
        unique = unique.head(limit)
    held_back = unique[~unique["to_feedback"]]
    fresh = ~held_back["key"].isin(seen)
    columns = list(frame.columns)
    return Halves(
        unique[unique["to_feedback"]][columns].reset_index(drop=True),
        held_back[fresh][columns].reset_index(drop=True),
        int(conflicting.sum()),
        duplicates,
        int((~fresh).sum()),
    )


class Client:
    """The demo's HTTP client of `flywheel serve`."""

    def __init__(self, url: str, token: str, batch: int):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120)
        self.token, self.batch = token, batch

    def predict(self, texts: Sequence[str], description: str = "predict") -> list[dict]:
        """Answers for every text, in order (sent in batches of serve.max_batch)."""
        from flywheel.progress import progress

        answers: list[dict] = []
        with progress(f"demo: {description}", len(texts), unit="text", logger=log) as bar:
            for start in range(0, len(texts), self.batch):
                response = self.http.post(
                    "/predict", json={"texts": list(texts[start : start + self.batch])}
                )
                response.raise_for_status()
                body = response.json()
                version = body["model_version"]
                answers += [p | {"model_version": version} for p in body["predictions"]]
                bar.advance(len(body["predictions"]))
        return answers

    def feedback(self, rows: pd.DataFrame, answers: Sequence[dict]) -> int:
        """Send each row's true label (one request each); returns how many the server stored
        as new."""
        from flywheel.progress import progress

        created = 0
        headers = {"Authorization": f"Bearer {self.token}"}
        with progress("demo: feedback", len(rows), unit="request", logger=log) as bar:
            for (_, row), answer in zip(rows.iterrows(), answers, strict=True):
                payload = {
                    "id": f"demo-{row['origin']}".replace(":", "-"),
                    "text": row["text"],
                    "label": row["label"],
                    "prediction_id": answer["id"],
                }
                response = self.http.post("/feedback", json=payload, headers=headers)
                response.raise_for_status()
                created += response.json()["created"]
                bar.advance(new=created)
        return created

    def model(self) -> dict:
        response = self.http.get("/model")
        response.raise_for_status()
        return response.json()


def accuracy(answers: Sequence[dict], labels: Sequence[str]) -> float:
    import numpy as np

    return float(np.mean([a["label"] == y for a, y in zip(answers, labels, strict=True)]))


@contextmanager
def served(params: Path, port: int, token: str, tracking_uri: str) -> Iterator[str]:
    """`flywheel serve` on 127.0.0.1:port over the registry at `tracking_uri`, polling the
    champion every second; stopped at the end (its process group, by its own id)."""
    from flywheel import servers

    log_path = params.parent / REPORT_DIR / "serve.log"
    env = {"FLYWHEEL_API_TOKEN": token, "MLFLOW_TRACKING_URI": tracking_uri}
    spec = servers.serve_spec(params, port, RELOAD_SECONDS, log_path, env)
    try:
        with servers.running([spec]):
            yield spec.url
    except servers.ServerError as exc:
        raise DemoError(str(exc)) from None


def wait_for_version(client: Client, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.model()["version"] != version:
        if time.monotonic() > deadline:
            raise DemoError(f"the server did not switch to version {version} in {timeout:.0f} s")
        time.sleep(RELOAD_SECONDS)


def snippets(cfg: Config) -> pd.DataFrame:
    """The Amazon snippets with the configured positive/negative labels."""
    from flywheel.datasets.amazon_snippets import read_amazon_snippets

    ec = cfg.evaluate
    if ec.positive_label is None or ec.negative_label is None:
        raise ConfigError(
            "the demo maps positive/negative Amazon ratings to evaluate.positive_label and "
            "evaluate.negative_label: set both in params.yaml"
        )
    return read_amazon_snippets(ec.positive_label, ec.negative_label)


def feedback_demo(params: Path, port: int = 0, limit: int | None = None) -> dict:
    """Run the demo on the project at `params` (with `limit`: on that many snippets, the same
    ones every time); returns (and writes) the report."""
    from flywheel.flows.retrain import retrain
    from flywheel.registry import CHAMPION, ModelRegistry
    from flywheel.servers import free_port

    started = time.monotonic()
    cfg = load_config(params)
    registry = ModelRegistry.of(cfg)
    old = ready_champion(params, registry)
    halves = demo_halves(cfg, limit)
    token = secrets.token_hex(16)
    port = port or free_port()
    with served(params, port, token, registry.uri) as url:
        client = Client(url, token, cfg.serve.max_batch)
        print(f"serving champion {old} at {url}")
        answers = client.predict(halves.feedback["text"].tolist(), "predict the feedback half")
        before = client.predict(halves.held_back["text"].tolist(), "predict the held-back half")
        old_accuracy = accuracy(before, halves.held_back["label"].tolist())
        print(f"champion {old} on the held-back half: accuracy {old_accuracy:.4f}")
        stored = client.feedback(halves.feedback, answers)
        print(f"feedback sent: {len(halves.feedback):,} rows ({stored:,} new)")
        print("flywheel retrain --if-needed ...")
        result = retrain(params_path=params, if_needed=True)
        decision = result.decision
        print(decision.headline())
        new = registry.alias(CHAMPION)
        candidate = (
            result.pipeline.registered.version
            if result.pipeline and result.pipeline.registered
            else None
        )
        new_accuracy = rescored(client, registry, old, new, candidate, halves.held_back)
    promotion = result.pipeline.promotion if result.pipeline else None
    report = {
        "snippets": len(halves.feedback) + len(halves.held_back),
        "feedback_rows": len(halves.feedback),
        "held_back_rows": len(halves.held_back),
        "feedback_new": stored,
        "dropped_duplicates": halves.dropped_duplicates,
        "dropped_conflicting": halves.dropped_conflicting,
        "dropped_seen": halves.dropped_seen,
        "seconds": round(time.monotonic() - started, 1),
        "old_champion": old,
        "old_accuracy": old_accuracy,
        "retrain_fired": decision.fire,
        "retrain_reasons": decision.reasons,
        "retrain_blocked": decision.blocked,
        "candidate": candidate,
        "promoted": result.promoted,
        "outcome": result.outcome,
        "promotion": promotion.summary() if promotion else None,
        "gates": promotion.gate_lines() if promotion else [],
        "new_champion": new,
        "new_accuracy": new_accuracy,
        "checks": [asdict(c) for c in decision.checks],
    }
    write_report(cfg.resolve(REPORT_DIR), report)
    return report


def ready_champion(params: Path, registry: ModelRegistry) -> str:
    """The champion the demo starts from (the pipeline runs first if there is none); it must
    have a reference profile, or drift cannot be judged."""
    from flywheel.flows.pipeline import pipeline
    from flywheel.registry import CHAMPION

    if registry.alias(CHAMPION) is None:
        print("no champion yet: running the pipeline first (flywheel run)")
        pipeline(params_path=params)
    old = registry.alias(CHAMPION)
    if old is None:
        raise DemoError("the pipeline ran but promoted nothing: see `flywheel models list`")
    if registry.reference(old) is None:
        raise DemoError(
            f"champion {old} was exported before reference profiles existed, so drift cannot be "
            "judged: run `flywheel run --force-from export` and start the demo again"
        )
    return old


def demo_halves(cfg: Config, limit: int | None) -> Halves:
    """The snippets in halves, leaving out held-back texts the feedback store already has."""
    from flywheel import feedback

    pii = cfg.clean.mask_pii
    in_store = feedback.read(cfg.resolve(cfg.data.feedback.path))
    seen = frozenset(in_store["text"].dropna().map(lambda t: snippet_key(t, pii)))
    halves = split_halves(snippets(cfg), cfg.seed, limit, seen, pii)
    if halves.feedback.empty or halves.held_back.empty:
        raise DemoError(
            f"{len(halves.feedback)} snippets to send as feedback and {len(halves.held_back)} to "
            "hold back: both halves need some; use more --snippets"
        )
    print(
        f"Amazon snippets: {len(halves.feedback) + len(halves.held_back):,}; "
        f"{len(halves.feedback):,} as feedback, {len(halves.held_back):,} held back "
        f"(dropped: {halves.dropped_duplicates} repeated texts, {halves.dropped_conflicting} "
        f"with both labels, {halves.dropped_seen} held-back texts already in the feedback store)"
    )
    return halves


def rescored(
    client: Client,
    registry: ModelRegistry,
    old: str,
    new: str | None,
    candidate: str | None,
    held_back: pd.DataFrame,
) -> float | None:
    """Accuracy on the held-back half after the retrain: of the new champion as served, of the
    candidate when it was not promoted, or None when nothing was trained."""
    if new != old:
        wait_for_version(client, new)
        after = client.predict(held_back["text"].tolist(), "predict the held-back half again")
    elif candidate is not None:  # not promoted: score the candidate all the same
        predicted = registry.load(candidate).predict(held_back["text"].tolist())
        after = [{"label": p.label} for p in predicted]
    else:
        return None
    return accuracy(after, held_back["label"].tolist())


def write_report(folder: Path, report: dict) -> None:
    from flywheel.io import write_json

    write_json(folder / "feedback.json", report)
    lines = [
        "# Feedback loop demo",
        "",
        f"Amazon product review snippets (VADER, Hutto & Gilbert 2014): {report['snippets']:,}; "
        f"{report['feedback_rows']:,} sent as feedback ({report['feedback_new']:,} new to the "
        f"store), {report['held_back_rows']:,} held back (split by a hash of the text; "
        f"{report['dropped_duplicates']} repeated texts, {report['dropped_conflicting']} with "
        f"both labels and {report['dropped_seen']} held-back texts already in the feedback store "
        f"dropped). {report['seconds']:.0f} s in all.",
        "",
    ]
    models = [[f"old champion (version {report['old_champion']})", f"{report['old_accuracy']:.4f}"]]
    if report["new_accuracy"] is not None:
        who = "new champion" if report["promoted"] else "retrained candidate (not promoted)"
        models.append([f"{who} (version {report['candidate']})", f"{report['new_accuracy']:.4f}"])
    lines.append(markdown_table(["model", "accuracy on the held-back half"], models))
    lines += ["", "Retrain check: " + ("fired" if report["retrain_fired"] else "not fired")]
    lines += [f"- {reason}" for reason in report["retrain_reasons"]]
    if report["promotion"]:
        lines += ["", f"Promotion: {report['promotion']}", ""]
        lines += [f"- {line}" for line in report["gates"]]
    lines += ["", f"Outcome: {report['outcome'] or 'not fired'}"]
    (folder / "feedback.md").write_text("\n".join(lines) + "\n")
