"""The HTTP API: the champion answers /predict, users correct it through /feedback.

    POST /predict    one text or a batch -> label, probabilities, prediction id, model version
    POST /feedback   the right label for a text, stored PII-masked; once per id (or, without
                     one, per text and label)                              [token, if configured]
    POST /reload     load the champion now if the alias moved              [token, if configured]
    GET  /health     200 while a model is loaded
    GET  /model      version, data version, test metrics, when promoted
    GET  /metrics    Prometheus text format
    GET  /docs       OpenAPI documentation with examples

Every answered prediction is logged (flywheel/predictions.py: hash, length, label, confidence,
OOV share; no raw text unless monitor.log_text) for drift monitoring; feedback goes to the
feedback store (flywheel/feedback.py), from which the next data version takes it.
Bad input is a 4xx whose `detail` says what is wrong and which limit applies; the server never
stops on input.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from flywheel import __version__, feedback, predictions
from flywheel.config import Config
from flywheel.serving.champion import ChampionSlot
from flywheel.serving.metrics import Metrics
from flywheel.serving.schemas import (
    PREDICT_EXAMPLES,
    FeedbackRequest,
    FeedbackResponse,
    Health,
    ModelInfo,
    Prediction,
    PredictRequest,
    PredictResponse,
    Problem,
    ReloadResponse,
)

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


def create_app(cfg: Config, slot: ChampionSlot, token: str | None = None) -> FastAPI:
    """The app around a loaded slot; `token` (if any) guards /feedback and /reload."""
    sc = cfg.serve
    feedback_path = cfg.resolve(cfg.data.feedback.path)
    log_path = cfg.resolve(cfg.monitor.predictions_path)
    metrics = Metrics()
    slot.listeners.append(metrics.on_reload)
    if slot.current is not None and slot.current.version.isdigit():
        metrics.model_version.set(int(slot.current.version))
    prediction_log = predictions.PredictionLog(log_path, cfg.monitor.keep_predictions)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        slot.start()
        try:
            yield
        finally:
            slot.stop()
            prediction_log.close()

    app = FastAPI(
        title="Flywheel",
        version=__version__,
        description="Text classification by the champion model of the MLflow registry, with "
        "feedback collection for the next retraining. Errors come as `{detail, errors}`.",
        lifespan=lifespan,
    )
    bearer = HTTPBearer(auto_error=False, description=f"The token in ${sc.token_env}.")

    # The dependency is a default value, not in Annotated[...]: annotations are strings here
    # and `bearer` is local, so FastAPI could not resolve it from an annotation.
    def require_token(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        if token is None:
            return
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise ApiError(
                401,
                f"this endpoint needs `Authorization: Bearer <token>` (the server's "
                f"${sc.token_env})",
                challenge,
            )
        if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise ApiError(401, "wrong bearer token", challenge)

    def served() -> Any:
        model = slot.current  # read once: this request keeps this model to its end
        if model is None:
            raise ApiError(503, "no model loaded yet")
        return model

    def checked(text: str, where: str) -> tuple[str, bool]:
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

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "errors": []}, exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
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

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); see the server log", "errors": []},
            500,
        )

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Response:
        started, status = time.perf_counter(), 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            metrics.requests.labels(endpoint, request.method, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=PROBLEMS,
        summary="Classify one text or a batch",
    )
    def predict(
        body: Annotated[PredictRequest, Body(openapi_examples=PREDICT_EXAMPLES)],
    ) -> PredictResponse:
        """Labels and probabilities from the champion; each answer has an id to send with
        feedback. Blank texts are refused; longer texts than serve.max_text_chars are refused
        or cut (serve.long_text)."""
        texts = body.items()
        if len(texts) > sc.max_batch:
            raise ApiError(
                413,
                f"batch of {len(texts)} texts is over the limit of {sc.max_batch} "
                "(serve.max_batch): split it",
            )
        single = body.text is not None
        ready = [checked(t, "text" if single else f"texts[{i}]") for i, t in enumerate(texts)]
        model = served()
        answers = model.predict([t for t, _ in ready])
        out = [
            Prediction(
                id=uuid.uuid4().hex, label=a.label, probabilities=a.probabilities, truncated=cut
            )
            for a, (_, cut) in zip(answers, ready, strict=True)
        ]
        for p in out:
            metrics.predictions.labels(p.label).inc()
        metrics.truncated.inc(sum(p.truncated for p in out))
        record(model, texts, [t for t, _ in ready], out)
        return PredictResponse(model_version=model.version, predictions=out)

    def record(model: Any, received: list[str], scored: list[str], out: list[Prediction]) -> None:
        """Log the answers for drift monitoring; a failure costs the log row, not the answer."""
        try:
            stamp = predictions.now()
            rows = []
            for raw, text, p in zip(received, scored, out, strict=True):
                normalised = model.normalise(text)
                rows.append(
                    predictions.LoggedPrediction(
                        p.id,
                        stamp,
                        model.version,
                        predictions.text_hash(raw),
                        len(normalised),
                        p.label,
                        p.probabilities[p.label],
                        model.oov_rate(normalised),
                        raw if cfg.monitor.log_text else None,
                    )
                )
            prediction_log.write(rows)
        except Exception as exc:
            metrics.log_errors.inc(len(out))
            log.error("could not log %d prediction(s): %s", len(out), exc)

    @app.post(
        "/feedback",
        status_code=201,
        response_model=FeedbackResponse,
        responses={200: {"model": FeedbackResponse, "description": "Seen before."}} | PROBLEMS,
        dependencies=[Depends(require_token)],
        summary="Say which label is right for a text",
    )
    def give_feedback(body: FeedbackRequest, response: Response) -> FeedbackResponse:
        """Stored in the feedback store with personal data masked (clean.mask_pii); the next
        pipeline run merges it into the data. Sending the same `id` again, or without an id the
        same text and label, stores nothing and answers 200."""
        model = served()
        text, _ = checked(body.text, "text")
        if text != body.text:
            raise ApiError(413, f"text is over serve.max_text_chars ({sc.max_text_chars:,})")
        for field, value in (("label", body.label), ("predicted_label", body.predicted_label)):
            if value is not None and value not in model.labels:
                raise ApiError(
                    422, f"{field}: unknown label {value!r} (labels: {', '.join(model.labels)})"
                )
        predicted, version = body.predicted_label, None
        if body.prediction_id is not None:
            logged = predictions.lookup(log_path, body.prediction_id)
            if logged is not None:
                predicted = predicted or str(logged["label"])
                version = str(logged["model_version"])
        record_, masked = feedback.received(
            body.text,
            body.label,
            cfg.clean.mask_pii,
            id=body.id,
            predicted_label=predicted,
            model_version=version,
            source="api",
            prediction_id=body.prediction_id,
        )
        if not record_.text:
            raise ApiError(
                422, "text is empty after cleaning (only markup or invisible characters)"
            )
        created = feedback.add(feedback_path, [record_]) == 1
        metrics.feedback.labels("created" if created else "duplicate").inc()
        if not created:
            response.status_code = 200
        return FeedbackResponse(
            id=record_.id, created=created, model_version=version, masked=dict(masked)
        )

    @app.post(
        "/reload",
        response_model=ReloadResponse,
        responses=PROBLEMS,
        dependencies=[Depends(require_token)],
        summary="Load the champion now if the alias moved",
    )
    def reload() -> ReloadResponse:
        """What polling does every serve.reload_seconds, now. In-flight requests finish on the
        old model; a version that fails to load leaves the old one serving (503)."""
        before = slot.current.version if slot.current else None
        try:
            result = slot.reload()
        except Exception as exc:  # NoChampionError, a broken version, the store away
            raise ApiError(
                503, f"reload failed, still serving version {before or 'none'}: {exc}"
            ) from exc
        return ReloadResponse(
            previous=result.previous, current=result.current, changed=result.changed
        )

    @app.get("/health", response_model=Health, responses=PROBLEMS, summary="Liveness")
    def health() -> Health:
        return Health(status="ok", model_version=served().version)

    @app.get("/model", response_model=ModelInfo, responses=PROBLEMS, summary="The served model")
    def model_info() -> ModelInfo:
        model = served()
        return ModelInfo(
            version=model.version, labels=model.labels, loaded_at=model.loaded_at, **model.info
        )

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Metrics."}},
    )
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(
    cfg: Config,
    host: str | None = None,
    port: int | None = None,
    reload_seconds: float | None = None,
    log_level: str = "info",
) -> None:
    """Load the champion and serve it with uvicorn until stopped (Ctrl-C, SIGTERM)."""
    import os

    import uvicorn

    from flywheel.serving.champion import RegistrySource
    from flywheel.tasks.registry import ModelRegistry

    sc = cfg.serve
    poll = sc.reload_seconds if reload_seconds is None else reload_seconds
    slot = ChampionSlot(RegistrySource(ModelRegistry.of(cfg)), poll)
    loaded = slot.reload()
    token = os.environ.get(sc.token_env) or None
    host, port = host or sc.host, sc.port if port is None else port
    print(
        f"serving {cfg.registry.model_name} version {loaded.current} on http://{host}:{port} "
        f"(docs: /docs; champion checked every {poll:g} s" + (")" if poll else ": off)")
    )
    print(
        f"/feedback and /reload need a bearer token (${sc.token_env})"
        if token
        else f"no token set (${sc.token_env}): /feedback and /reload are open"
    )
    uvicorn.run(create_app(cfg, slot, token), host=host, port=port, log_level=log_level)
