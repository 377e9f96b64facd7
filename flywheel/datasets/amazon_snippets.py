"""VADER's human-rated Amazon product review snippets (Hutto & Gilbert, ICWSM-14; MIT licence):
text the default model was not trained for, used by `flywheel demo feedback`.

See flywheel/datasets/vader_amazon/README.md for the source, checksums and counts.
"""

from __future__ import annotations

import bz2
from importlib import resources
from pathlib import Path

import pandas as pd

from flywheel.errors import FlywheelError
from flywheel.io import read_verified

FILE = "amazonReviewSnippets_GroundTruth.txt.bz2"
SHA256 = "3e6b2011557d9a6e58bb21e7a9e454c34dcd1283b744ec41741a9746b0d98c9f"
ORIGIN = "amazon_snippets"


class DatasetError(FlywheelError, ValueError):
    """The vendored file is damaged or not in the expected format; the message names it."""


def path() -> Path:
    return Path(str(resources.files("flywheel.datasets") / "vader_amazon" / FILE))


def read_amazon_snippets(positive_label: str, negative_label: str) -> pd.DataFrame:
    """The snippets as `text`, `label` (by the sign of the mean human rating; zero-rated ones
    dropped), `rating` and `origin` ("amazon_snippets:<line>", 1-based)."""
    file = path()
    payload = read_verified(file, SHA256, DatasetError)
    rows = []
    for number, line in enumerate(bz2.decompress(payload).decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            if len(fields) != 3 or not fields[2].strip():
                raise ValueError("expected id, mean rating and text, tab-separated")
            rating = float(fields[1])
        except ValueError as exc:
            raise DatasetError(f"{file}: line {number}: {exc}") from None
        if rating != 0:
            label = positive_label if rating > 0 else negative_label
            rows.append((fields[2].strip(), label, rating, f"{ORIGIN}:{number}"))
    frame = pd.DataFrame(rows, columns=["text", "label", "rating", "origin"])
    return frame.astype({"text": "string", "label": "string", "origin": "string"})
