"""What the handlers share, as one typed object on `app.state` (`ServerState`), and the request
dependencies that read it: the state itself, the served model, the bearer-token guard."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flywheel.config import Config, ServeConfig
from flywheel.serving.champion import ChampionSlot, ServedModel
from flywheel.serving.errors import ApiError
from flywheel.serving.metrics import Metrics
from flywheel.serving.prediction_log import PredictionLogger
from flywheel.serving.scoring import Scorer, current_model


@dataclass(frozen=True)
class ServerState:
    """One app's model slot, settings, metrics, prediction log, scorer and paths."""

    cfg: Config
    slot: ChampionSlot
    token: str | None  # guards /feedback and /reload; None: open
    metrics: Metrics
    predictions: PredictionLogger
    scorer: Scorer
    feedback_path: Path
    predictions_path: Path

    @classmethod
    def create(cls, cfg: Config, slot: ChampionSlot, token: str | None) -> ServerState:
        """The state of a new app: its own metrics (told of every reload) and prediction log."""
        metrics = Metrics()
        slot.listeners.append(metrics.on_reload)
        if slot.current is not None and slot.current.version.isdigit():
            metrics.model_version.set(int(slot.current.version))
        path = cfg.resolve(cfg.monitor.predictions_path)
        logger = PredictionLogger(
            path,
            cfg.monitor.keep_predictions,
            cfg.monitor.log_text,
            metrics.log_errors,
            cfg.clean.mask_pii,
        )
        scorer = Scorer(
            slot, cfg.serve.batch_wait_ms, cfg.serve.max_batch, metrics.model_calls.observe
        )
        return cls(
            cfg, slot, token, metrics, logger, scorer, cfg.resolve(cfg.data.feedback.path), path
        )

    @property
    def limits(self) -> ServeConfig:
        return self.cfg.serve

    def served(self) -> ServedModel:
        """The model answering this request, read once: the request keeps it to its end."""
        return current_model(self.slot)


async def server_state(request: Request) -> ServerState:
    # async: FastAPI runs a plain-def dependency in its thread pool, a thread hop per request
    return request.app.state.flywheel


State = Annotated[ServerState, Depends(server_state)]


def token_guard(token_env: str) -> Any:
    """The dependency of /feedback and /reload: `Authorization: Bearer <token>` when the server
    has a token. Made per app, as the OpenAPI security scheme names the app's `token_env`."""
    bearer = HTTPBearer(auto_error=False, description=f"The token in ${token_env}.")

    # The bearer is a default value, not in Annotated[...]: annotations are strings here and
    # `bearer` is local, so FastAPI could not resolve it from an annotation.
    async def require_token(
        state: State,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        if state.token is None:
            return
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise ApiError(
                401,
                f"this endpoint needs `Authorization: Bearer <token>` (the server's ${token_env})",
                challenge,
            )
        if not hmac.compare_digest(credentials.credentials.encode(), state.token.encode()):
            raise ApiError(401, "wrong bearer token", challenge)

    return Depends(require_token)
