"""Text normalisation, written once: the clean stage, validation and (later) the model's
preprocessing and serving all call these, so training and inference see text the same way."""

from __future__ import annotations

import html
import re
import unicodedata

# Only real HTML elements are tags: "<EMAIL>" placeholders, "<3" and "<jane@example.com>" are text.
_HTML_ELEMENTS = (
    "a|abbr|b|blockquote|body|br|caption|center|cite|code|col|dd|del|div|dl|dt|em|font|h[1-6]|"
    "head|hr|html|i|img|ins|kbd|li|mark|ol|p|pre|q|s|small|span|strike|strong|sub|sup|table|"
    "tbody|td|tfoot|th|thead|title|tr|tt|u|ul"
)
_TAG = re.compile(rf"</?(?:{_HTML_ELEMENTS})(?:\s[^<>]*)?/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_NOT_WORD = re.compile(r"[^\w<>]+")
_LINE_BREAKS = "\t\n\r\x0b\x0c"


def clean_text(text: str) -> str:
    """NFKC, HTML entities and tags, invisible characters, whitespace: one readable line."""
    text = unicodedata.normalize("NFKC", text)
    text = html.unescape(text)
    text = _TAG.sub(" ", text)
    text = "".join(
        " " if ch in _LINE_BREAKS else ch
        for ch in text
        if unicodedata.category(ch) not in ("Cc", "Cf") or ch in _LINE_BREAKS
    )
    return _SPACE.sub(" ", text).strip()


def normalised_key(text: str) -> str:
    """The de-duplication and split key: case-folded words, punctuation and spacing ignored."""
    return _SPACE.sub(" ", _NOT_WORD.sub(" ", text.casefold())).strip()
