"""Request texts against the configured limits (params.yaml's `serve` section): a blank text is
refused, a batch or a text over its limit is refused (413) or, with serve.long_text: truncate,
the text is cut. Each error names the limit and where it is set."""

from __future__ import annotations

from flywheel.config import ServeConfig
from flywheel.serving.errors import ApiError


def check_batch(size: int, sc: ServeConfig) -> None:
    if size > sc.max_batch:
        raise ApiError(
            413,
            f"batch of {size} texts is over the limit of {sc.max_batch} (serve.max_batch): "
            "split it",
        )


def checked(text: str, where: str, sc: ServeConfig) -> tuple[str, bool]:
    """The text to score and whether it was cut; `where` names it in errors (`texts[2]`)."""
    if not text.strip():
        raise ApiError(422, f"{where} is empty or only whitespace")
    if len(text) <= sc.max_text_chars:
        return text, False
    if sc.long_text == "truncate":
        return text[: sc.max_text_chars], True
    raise ApiError(
        413,
        f"{where} has {len(text):,} characters, over the limit of {sc.max_text_chars:,} "
        "(serve.max_text_chars; serve.long_text: truncate cuts long texts instead)",
    )
