"""PII masking: personal data in free text becomes typed placeholders such as <EMAIL>.

Used wherever text enters Flywheel (the clean stage now; serving and the model's preprocessing
later), so that nothing unmasked is versioned, trained on or logged. Each rule is a candidate
pattern plus a confirmation (checksums for cards and IBANs, address parsing for IPs).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass


def _luhn_ok(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(candidate: str) -> bool:
    compact = candidate.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ip_ok(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _phone_ok(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    # Bare digit runs of 7-8 look like years, ids or dates; demand an international or area-code
    # prefix for those, and accept 9-15 digits as they come.
    return 9 <= digits <= 15 or (7 <= digits <= 8 and candidate.lstrip()[0] in "+(")


@dataclass(frozen=True)
class PiiRule:
    """One kind of personal data: a candidate pattern and a check that confirms a match."""

    kind: str
    pattern: re.Pattern[str]
    confirm: Callable[[str], bool] = lambda _: True

    @property
    def placeholder(self) -> str:
        return f"<{self.kind.upper()}>"


# Order matters: URLs can contain e-mail addresses and IPs; IBANs and cards contain digit runs
# that the phone pattern would otherwise take.
PII_RULES = (
    PiiRule("url", re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]]")),
    PiiRule("email", re.compile(r"\b[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")),
    PiiRule(
        "iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), _iban_ok
    ),
    PiiRule("card", re.compile(r"\b\d(?:[ -]?\d){12,18}\b"), _luhn_ok),
    PiiRule(
        "ip",
        re.compile(
            r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)|(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"
        ),
        _ip_ok,
    ),
    PiiRule(
        "phone",
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?"  # country code, area code
            r"\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)"
        ),
        _phone_ok,
    ),
)


def mask_pii(text: str, kinds: list[str] | tuple[str, ...]) -> tuple[str, Counter[str]]:
    """Replace personal data of the given kinds with typed placeholders; count what was masked."""
    counts: Counter[str] = Counter()
    for rule in PII_RULES:
        if rule.kind not in kinds:
            continue

        def replace(match: re.Match[str], rule: PiiRule = rule) -> str:
            if not rule.confirm(match.group(0)):
                return match.group(0)
            counts[rule.kind] += 1
            return rule.placeholder

        text = rule.pattern.sub(replace, text)
    return text, counts
