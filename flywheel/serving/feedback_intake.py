"""Feedback from a request to the feedback store: the text within the limits, the labels among
the served model's, the prediction it is about resolved from the prediction log (what the model
answered, which version), personal data masked (clean.mask_pii), and the record stored once per
id (or, without one, per text and label). Why feedback is masked before it is written and how it
reaches the next data version: docs/decisions/0009 and 0010."""

from __future__ import annotations

from flywheel import feedback, predictions
from flywheel.serving.champion import ServedModel
from flywheel.serving.errors import ApiError
from flywheel.serving.limits import checked
from flywheel.serving.schemas import FeedbackRequest, FeedbackResponse
from flywheel.serving.state import ServerState


def take(body: FeedbackRequest, model: ServedModel, state: ServerState) -> FeedbackResponse:
    """Check the feedback against `model` and store it; `created` is False for a repeat."""
    sc = state.limits
    text, _ = checked(body.text, "text", sc)
    if text != body.text:
        raise ApiError(413, f"text is over serve.max_text_chars ({sc.max_text_chars:,})")
    for field, value in (("label", body.label), ("predicted_label", body.predicted_label)):
        if value is not None and value not in model.labels:
            raise ApiError(
                422, f"{field}: unknown label {value!r} (labels: {', '.join(model.labels)})"
            )
    predicted, version = resolve_prediction(body, state)
    record, masked = feedback.received(
        body.text,
        body.label,
        state.cfg.clean.mask_pii,
        id=body.id,
        predicted_label=predicted,
        model_version=version,
        source="api",
        prediction_id=body.prediction_id,
    )
    if not record.text:
        raise ApiError(422, "text is empty after cleaning (only markup or invisible characters)")
    created = feedback.add(state.feedback_path, [record]) == 1
    return FeedbackResponse(
        id=record.id, created=created, model_version=version, masked=dict(masked)
    )


def resolve_prediction(body: FeedbackRequest, state: ServerState) -> tuple[str | None, str | None]:
    """(the label the model answered, the version that answered) for the feedback's
    `prediction_id`, from the prediction log; the label sent wins, and both are None when
    unknown."""
    if body.prediction_id is None:
        return body.predicted_label, None
    state.predictions.flush()  # the answer it is about may still be on its way to the log
    logged = predictions.lookup(state.predictions_path, body.prediction_id)
    if logged is None:
        return body.predicted_label, None
    return body.predicted_label or str(logged["label"]), str(logged["model_version"])
