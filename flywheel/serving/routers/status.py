"""GET /health, /model and /metrics: liveness, the served model, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from flywheel.serving.errors import PROBLEMS
from flywheel.serving.schemas import Health, ModelInfo
from flywheel.serving.state import State

router = APIRouter()


@router.get("/health", response_model=Health, responses=PROBLEMS, summary="Liveness")
def health(state: State) -> Health:
    return Health(status="ok", model_version=state.served().version)


@router.get("/model", response_model=ModelInfo, responses=PROBLEMS, summary="The served model")
def model_info(state: State) -> ModelInfo:
    model = state.served()
    return ModelInfo(
        version=model.version, labels=model.labels, loaded_at=model.loaded_at, **model.info
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Metrics."}},
)
def prometheus(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
