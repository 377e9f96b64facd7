"""Slices of a test split: by source (the original data, feedback, ...) and by text length.

One definition for the evaluation report, the int8 parity gate and the promotion gates, so a
slice means the same rows wherever it is judged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Slices by text length in characters: [0, 60), [60, 140), [140, inf).
LENGTH_EDGES = (60, 140)


def length_bucket(n_chars: int) -> str:
    low = 0
    for edge in LENGTH_EDGES:
        if n_chars < edge:
            return f"{low}-{edge - 1}"
        low = edge
    return f"{low}+"


def slice_masks(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Row masks of every slice: `source=<name>` and `length=<bucket>` (characters)."""
    keys = {
        "source": frame["source"].astype(str),
        "length": frame["text"].str.len().map(length_bucket),
    }
    return {
        f"{name}={value}": (values == value).to_numpy()
        for name, values in keys.items()
        for value in sorted(values.unique())
    }
