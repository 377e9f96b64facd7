"""POST /predict: the champion's labels and probabilities for one text or a batch."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Request

from flywheel.serving.errors import PROBLEMS
from flywheel.serving.limits import check_batch, checked
from flywheel.serving.schemas import PREDICT_EXAMPLES, Prediction, PredictRequest, PredictResponse
from flywheel.serving.state import State

router = APIRouter()


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=PROBLEMS,
    summary="Classify one text or a batch",
)
async def predict(
    body: Annotated[PredictRequest, Body(openapi_examples=PREDICT_EXAMPLES)],
    state: State,
    request: Request,
) -> PredictResponse:
    """Labels and probabilities from the champion; each answer has an id to send with
    feedback. Blank texts are refused; longer texts than serve.max_text_chars are refused
    or cut (serve.long_text)."""
    # On the event loop: the checks and the answer; the model call runs in the scorer's
    # worker thread, batched with concurrent requests when serve.batch_wait_ms > 0.
    texts = body.items()
    check_batch(len(texts), state.limits)
    single = body.text is not None
    ready = [
        checked(t, "text" if single else f"texts[{i}]", state.limits) for i, t in enumerate(texts)
    ]
    model, answers = await state.scorer.score([t for t, _ in ready], request.scope)
    out = [
        Prediction(id=uuid.uuid4().hex, label=a.label, probabilities=a.probabilities, truncated=cut)
        for a, (_, cut) in zip(answers, ready, strict=True)
    ]
    for p in out:
        state.metrics.predictions.labels(p.label).inc()
    state.metrics.truncated.inc(sum(p.truncated for p in out))
    state.predictions.record(model, texts, [t for t, _ in ready], out)
    return PredictResponse(model_version=model.version, predictions=out)
