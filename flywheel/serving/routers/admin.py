"""POST /reload: load the champion now if the alias moved (guarded by the token, if any)."""

from __future__ import annotations

from fastapi import APIRouter

from flywheel.serving.errors import PROBLEMS, ApiError
from flywheel.serving.schemas import ReloadResponse
from flywheel.serving.state import State

router = APIRouter()


@router.post(
    "/reload",
    response_model=ReloadResponse,
    responses=PROBLEMS,
    summary="Load the champion now if the alias moved",
)
def reload(state: State) -> ReloadResponse:
    """What polling does every serve.reload_seconds, now. In-flight requests finish on the
    old model; a version that fails to load leaves the old one serving (503)."""
    current = state.slot.current
    before = current.version if current else None
    try:
        result = state.slot.reload()
    except Exception as exc:  # NoChampionError, a broken version, the store away
        raise ApiError(
            503, f"reload failed, still serving version {before or 'none'}: {exc}"
        ) from exc
    return ReloadResponse(previous=result.previous, current=result.current, changed=result.changed)
