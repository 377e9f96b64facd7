"""Request and response bodies of the HTTP API, with the examples the OpenAPI docs show.

Types are strict: a number where a text belongs is a 422, not a text "123". Checks that depend
on the configuration or the loaded model (blank texts, batch and length limits, known labels)
are made by the app, so that each error names the limit and where it is set.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator

ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(value: str) -> str:
    """JSON may escape half of a UTF-16 pair ("\\ud800") alone: that is not Unicode text, and
    neither the tokenizer nor the UTF-8 stores can take it."""
    found = _SURROGATE.search(value)
    if found:
        raise ValueError(
            f"holds a lone UTF-16 surrogate (U+{ord(found.group()):04X} at character "
            f"{found.start()}), which is not Unicode text: send both halves of the pair, or "
            "valid UTF-8"
        )
    return value


Text = Annotated[StrictStr, AfterValidator(_unicode)]  # a string that is Unicode text


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(_Body):
    text: Text | None = Field(None, description="One text to classify.")
    texts: list[Text] | None = Field(
        None, description="Several texts (at most serve.max_batch); answers keep their order."
    )

    @model_validator(mode="after")
    def _one_of(self) -> PredictRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("send either `text` (one string) or `texts` (a list of strings)")
        if self.texts is not None and not self.texts:
            raise ValueError("`texts` is empty: send at least one text")
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


PREDICT_EXAMPLES = {
    "one": {"summary": "One text", "value": {"text": "A wonderful, moving film."}},
    "batch": {
        "summary": "A batch",
        "value": {"texts": ["A wonderful, moving film.", "Dull and far too long."]},
    },
}


class Prediction(BaseModel):
    id: str = Field(description="Prediction id: send it with /feedback about this answer.")
    label: str = Field(description="The most probable label.")
    probabilities: dict[str, float] = Field(description="Every label's probability.")
    truncated: bool = Field(
        False, description="The text was cut to serve.max_text_chars before scoring."
    )


class PredictResponse(BaseModel):
    model_version: str = Field(description="Registry version that answered.")
    predictions: list[Prediction]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_version": "4",
                    "predictions": [
                        {
                            "id": "3f2a9c0e5b7d4e1f8a6b2c4d9e0f1a2b",
                            "label": "fresh",
                            "probabilities": {"fresh": 0.97, "rotten": 0.03},
                            "truncated": False,
                        }
                    ],
                }
            ]
        }
    )


class FeedbackRequest(_Body):
    id: str | None = Field(
        None,
        pattern=ID_PATTERN,
        description="Idempotency key: sending the same id again stores nothing new. "
        "Omitted: the server derives one from the text and the label, so the same text with "
        "the same label is stored once.",
    )
    text: Text = Field(description="The text the feedback is about.")
    label: Text = Field(description="The label the user says is right (a model label).")
    prediction_id: str | None = Field(
        None, pattern=ID_PATTERN, description="The /predict answer this is about, if known."
    )
    predicted_label: Text | None = Field(
        None, description="What the model answered, if known (else taken from prediction_id)."
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "ticket-4711",
                    "text": "Dull and far too long.",
                    "label": "rotten",
                    "prediction_id": "3f2a9c0e5b7d4e1f8a6b2c4d9e0f1a2b",
                    "predicted_label": "fresh",
                }
            ]
        }
    )


class FeedbackResponse(BaseModel):
    id: str = Field(description="The id it is stored under (sent, or derived).")
    created: bool = Field(
        description="False: a repeat (this id, or this text and label, was stored before); "
        "nothing changed."
    )
    model_version: str | None = Field(description="Version that made the prediction, if known.")
    masked: dict[str, int] = Field(
        default_factory=dict,
        description="Personal data masked in the stored text, by kind (clean.mask_pii), "
        'e.g. {"email": 1}.',
    )


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    model_version: str = Field(examples=["4"])


class ModelInfo(BaseModel):
    name: str = Field(examples=["flywheel-classifier"])
    version: str = Field(examples=["4"])
    labels: list[str] = Field(examples=[["fresh", "rotten"]])
    data_version: str | None = Field(description="DVC hash of the training data.")
    git_commit: str | None = None
    variant: str | None = Field(None, description="fp32, int8, ... (the exported model).")
    metrics: dict[str, float] = Field(description="Test-split scores it was registered with.")
    promoted_at: str | None = Field(description="When it last became champion (UTC).")
    loaded_at: str = Field(description="When this server loaded it (UTC).")


class ReloadResponse(BaseModel):
    previous: str | None = Field(description="Version served before.")
    current: str = Field(description="Version served now.")
    changed: bool


class Problem(BaseModel):
    detail: str = Field(description="What is wrong, in words.")
    errors: list[dict] = Field(default_factory=list, description="Each failed check.")
