"""Errors as the API answers them: a status code and `{detail, errors}`, where `detail` says in
words what is wrong and which limit applies. A handler refuses a request by raising `ApiError`;
malformed JSON is a 400, a body not sent as JSON a 415, a field of the wrong type a 422; anything
unexpected is a logged 500 naming the exception, and the server goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel.serving.schemas import Problem

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the API refuses: status code and a message for the caller."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text}
    for code, text in {
        400: "Malformed JSON.",
        401: "Missing or wrong bearer token.",
        413: "A batch or a text over the configured limit.",
        415: "A body that is not sent as application/json.",
        422: "A field of the wrong type, an empty text, an unknown label.",
        503: "No model loaded, or a reload failed (the old model keeps serving).",
    }.items()
}


def _errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # without `input` and `ctx`: they can echo a whole request or hold exception objects
    return [
        {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors()
    ]


def _where(loc: list[str]) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or "body"


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail, "errors": []}, exc.status, exc.headers)


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _errors(exc)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method == "POST" and media != "application/json":
        return JSONResponse(
            {
                "detail": f"send a JSON body with Content-Type: application/json "
                f"(got {media or 'no content type'})",
                "errors": errors,
            },
            415,
        )
    if any(e["type"] == "json_invalid" for e in errors):
        where = next(e for e in exc.errors() if e["type"] == "json_invalid")
        reason = (where.get("ctx") or {}).get("error", "not valid JSON")
        position = where["loc"][-1] if len(where["loc"]) > 1 else "?"
        return JSONResponse(
            {"detail": f"malformed JSON at character {position}: {reason}", "errors": errors},
            400,
        )
    detail = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in errors)
    return JSONResponse({"detail": detail, "errors": errors}, 422)


# FastAPI's words for a body json.loads gave up on with something else than a syntax error.
UNPARSED = "There was an error parsing the body"


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own refusals (404, 405, an unparsable body) in the API's
    shape, `{detail, errors}`."""
    detail = exc.detail
    if exc.status_code == 400 and detail == UNPARSED:
        detail = (
            "the body could not be read as JSON: send UTF-8 encoded JSON (this body has bytes "
            "that are not UTF-8, nesting too deep or a number too long to read)"
        )
    return JSONResponse({"detail": detail, "errors": []}, exc.status_code, exc.headers)


async def crashed(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(
        {"detail": f"internal error ({type(exc).__name__}); see the server log", "errors": []},
        500,
    )


HANDLERS: dict[Any, Any] = {
    ApiError: api_error,
    RequestValidationError: invalid,
    StarletteHTTPException: http_error,
    Exception: crashed,
}
