"""POST /feedback: the right label for a text, into the feedback store (the work:
flywheel/serving/feedback_intake.py)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from flywheel.serving.errors import PROBLEMS
from flywheel.serving.feedback_intake import take
from flywheel.serving.schemas import FeedbackRequest, FeedbackResponse
from flywheel.serving.state import State

router = APIRouter()


@router.post(
    "/feedback",
    status_code=201,
    response_model=FeedbackResponse,
    responses={200: {"model": FeedbackResponse, "description": "Seen before."}} | PROBLEMS,
    summary="Say which label is right for a text",
)
def give_feedback(body: FeedbackRequest, response: Response, state: State) -> FeedbackResponse:
    """Stored in the feedback store with personal data masked (clean.mask_pii); the next
    pipeline run merges it into the data. Sending the same `id` again, or without an id the
    same text and label, stores nothing and answers 200."""
    stored = take(body, state.served(), state)
    state.metrics.feedback.labels("created" if stored.created else "duplicate").inc()
    if not stored.created:
        response.status_code = 200
    return stored
