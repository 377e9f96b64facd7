"""Request texts against the configured limits (params.yaml's `serve` section): a blank text is
refused, a batch or a text over its limit is refused (413) or, with serve.long_text: truncate,
the text is cut. Each error names the limit and where it is set. `BodyLimit` refuses a body
too large for any valid request before the server reads it whole."""

from __future__ import annotations

import json
from typing import Any

from flywheel.config import ServeConfig
from flywheel.serving.errors import ApiError
from flywheel.text import clean_text


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
    cut = len(text) > sc.max_text_chars
    if cut and sc.long_text != "truncate":
        raise ApiError(
            413,
            f"{where} has {len(text):,} characters, over the limit of {sc.max_text_chars:,} "
            "(serve.max_text_chars; serve.long_text: truncate cuts long texts instead)",
        )
    if cut:
        text = text[: sc.max_text_chars]
    # Markup, entities or invisible characters may be all there is: the model would answer for
    # an empty text. (Checked only where cleaning can remove something: a plain text skips it.)
    if ("<" in text or "&" in text or not text.isprintable()) and not clean_text(text):
        raise ApiError(
            422, f"{where} is empty after cleaning (only markup or invisible characters)"
        )
    return text, cut


# A text's characters as JSON bytes at worst: an astral character escaped as two \\uXXXX.
JSON_BYTES_PER_CHAR = 12


def max_body_bytes(sc: ServeConfig) -> int:
    """The largest body a valid request can have: a full batch of texts at the length limit,
    every character escaped at worst, and room for the rest of the JSON. About 3.9 MB with the
    defaults (64 texts of 5,000 characters)."""
    return sc.max_batch * (sc.max_text_chars * JSON_BYTES_PER_CHAR + 1024) + 64 * 1024


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413 before the app reads it
    whole. A Content-Length over the limit is refused before any byte is read; a body without
    one (chunked) is counted as it arrives and refused at the first chunk past the limit."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self.refuse(send, int(declared))
            return
        received = 0
        started = False

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self.refuse(send, received)

    async def refuse(self, send: Any, size: int) -> None:
        detail = (
            f"request body of {size:,}+ bytes is over the limit of {self.limit:,} bytes "
            "(serve.max_batch texts of serve.max_text_chars characters): send fewer or "
            "shorter texts"
        )
        body = json.dumps({"detail": detail, "errors": []}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    """A streamed body passed BodyLimit's limit."""
