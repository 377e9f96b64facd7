"""PII masking: personal data in free text becomes typed placeholders such as <EMAIL>.

Used wherever text enters Flywheel (collect, before the raw table is written; the clean stage;
feedback as it is received; the model's preprocessing, so serving too), so that nothing
unmasked is stored, versioned, trained on or logged. Each rule is a candidate
pattern plus a confirmation that sees the whole match (checksums for cards and IBANs, address
parsing for IPs, digit counts and the surrounding words for phones). Text arrives already through
`clean_text` (NFKC, HTML unescaped, tags stripped, whitespace collapsed).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from flywheel.text import clean_text

# Words that make the number after them a product version, not an IPv4 address: "v1.2.3.4".
_VERSION_BEFORE = re.compile(r"\b(?:version|ver|v|build|model|release|firmware)\.?\s*$", re.I)
# Words that make the number after them an order/ticket reference, not a phone: "order #123456789",
# "invoice no. 987654321", "case ID 5551234567". "number"/"no."/"ID" count only after such a word,
# so "phone number 555-123-4567" and "caller ID 555-123-4567" stay phones.
_REFERENCE_BEFORE = re.compile(
    r"(?:\b(?:order|ticket|ref|reference|invoice|case|booking|tracking|transaction)\b\.?"
    r"(?:\s*(?:number|no|nr|id)\b\.?)?|#)\s*[:#]?\s*$",
    re.I,
)
# Words that make a 7-digit local number ("566-7747") a phone: without one, NNN-NNNN is as often
# a range, a room or a part number. Only in the 40 characters before the number.
_PHONE_BEFORE = re.compile(
    r"\b(?:call(?:ed|ing)?|phone[ds]?|tel|telephone|cell|mobile|fax|text(?:ed)?|sms|whatsapp|"
    r"dial(?:ed)?|ring|reach|number)\b[^.!?\d]*$",
    re.I,
)
# ... or a number with its area code just before it: "(212) 566-8082 or 566-7747".
_PHONE_LIST = re.compile(r"(?:\(\d{3}\)\s*|\d{3}[ .-])\d{3}[ .-]\d{4}\s*(?:,|/|&|or|and)\s*$", re.I)
_LOCAL_NUMBER = re.compile(r"\d{3}[ .-]\d{4}")
_NANP = re.compile(r"1[ .-]\d{3}[ .-]\d{3}[ .-]\d{4}")
_YEAR = re.compile(r"(?:19|20)\d\d")
_DATE = re.compile(r"(?:19|20)\d\d[-./]\d\d?[-./]\d\d?|\d\d?[-./]\d\d?[-./](?:19|20)\d\d")


def _before(match: re.Match[str], width: int = 40) -> str:
    return match.string[max(0, match.start() - width) : match.start()]


def _luhn_ok(match: re.Match[str]) -> bool:
    digits = [int(c) for c in match.group(0) if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(match: re.Match[str]) -> bool:
    # Customers type IBANs in any case ("de89 ...", "GB82 west ..."); the check runs on the
    # upper-cased compact form, as the standard defines it.
    compact = match.group(0).replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ip_ok(match: re.Match[str]) -> bool:
    candidate = match.group(0)
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    if address.version == 4:
        return not _VERSION_BEFORE.search(_before(match))
    # "::", "a::b" and "dead::beef" parse as IPv6 too; real addresses in text have at least two
    # groups and a decimal digit ("fe80::1"). Loopback "::1" is not personal data anyway.
    groups = [g for g in candidate.split(":") if g]
    return len(groups) >= 2 and any(c.isdigit() for c in candidate)


def _short_phone(candidate: str, before: str) -> bool:
    """A 7-8 digit candidate that is a phone: with an international or area-code prefix, or a
    local NNN-NNNN after a phone word or a number with its area code."""
    if candidate[0] in "+(":
        return True
    return bool(_LOCAL_NUMBER.fullmatch(candidate)) and bool(
        _PHONE_BEFORE.search(before) or _PHONE_LIST.search(before)
    )


def _phone_ok(match: re.Match[str]) -> bool:
    candidate = match.group(0)
    digits = sum(c.isdigit() for c in candidate)
    groups = re.findall(r"\d+", candidate)
    international = candidate.startswith("+")
    trunk = candidate.lstrip("(").startswith("0")  # national prefix: 06 ..., 020 ..., (0)1 ...
    # Bare digit runs of 7-8 look like years, ids or dates; demand an international or area-code
    # prefix for those, or a local number written NNN-NNNN after a word such as "call" or
    # "phone"; accept 9-15 digits as they come.
    before = _before(match)
    if not (9 <= digits <= 15 or (7 <= digits <= 8 and _short_phone(candidate, before))):
        return False
    if re.match(r":\d", match.string[match.end() :]):  # "2024-01-15 12:30": a time follows
        return False
    if _REFERENCE_BEFORE.search(before):  # "order #123456789", "ticket 100-200-300"
        return False
    # "3-16-148410" out of an ISBN; but "1-800-555-0199" is a North American number with its
    # trunk prefix.
    if len(groups[0]) == 1 and candidate[0] not in "+(" and not _NANP.fullmatch(candidate):
        return False
    # Runs of 2-digit groups are scores or lists ("10 20 30 40 50") unless written the French way,
    # with a leading 0 or a country code ("06 12 34 56 78", "+33 6 12 34 56 78").
    if all(len(g) <= 2 for g in groups) and not (international or trunk):
        return False
    if all(_YEAR.fullmatch(g) for g in groups):  # "2023 2024 2025", "2019-2021"
        return False
    return not _DATE.search(candidate)  # "15.01.2024 12 ..."


@dataclass(frozen=True)
class PiiRule:
    """One kind of personal data: a candidate pattern and a check that confirms a match."""

    kind: str
    pattern: re.Pattern[str]
    confirm: Callable[[re.Match[str]], bool] = lambda _: True

    @property
    def placeholder(self) -> str:
        return f"<{self.kind.upper()}>"


_URL_END = r"[^\s<>\"']*[^\s<>\"'.,;:!?)\]]"  # no trailing punctuation from the sentence
# An IBAN group after the bank code holds a digit, so a word after the IBAN ("... 7034 from") is
# not taken into the match (which would fail mod-97); Seychelles/Mauritius end in a currency code.
_IBAN_GROUP = r"(?=[a-z]{0,3}\d)[a-z\d]{4}"
_IBAN_TAIL = r"(?:(?=[a-z]{0,2}\d)[a-z\d]{1,3}|(?-i:[A-Z]{3}))"

# Order matters: URLs can contain e-mail addresses and IPs; IBANs and cards contain digit runs
# that the phone pattern would otherwise take.
PII_RULES = (
    PiiRule(
        "url",
        re.compile(
            # Not right after "@" or ".": "support@www.acme.com" is left to the e-mail rule.
            r"(?<![\w@.-])(?:https?://|www\.|"
            # Without scheme or www only with a path ("example.com/reset?token=abc"): a bare
            # domain ("ordered from Amazon.com") is a shop name in a review, not personal data.
            # A lowercase TLD keeps "Mr.Smith/Jones" and "fine.Really/..." out.
            r"(?=[a-z\d-]+(?:\.[a-z\d-]+)*\.(?-i:[a-z]{2,})/))" + _URL_END,
            re.I,
        ),
    ),
    # The lookbehind starts a match only where a local part can begin; `\b` there made long
    # dotted runs ("a.a.a...") quadratic, as every dot restarted the scan.
    PiiRule("email", re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")),
    PiiRule(
        "iban",
        re.compile(
            rf"\b[a-z]{{2}}\d\d ?[a-z\d]{{4}}(?: ?{_IBAN_GROUP}){{1,6}}(?: ?{_IBAN_TAIL})?\b", re.I
        ),
        _iban_ok,
    ),
    PiiRule("card", re.compile(r"\b\d(?:[ .-]?\d){12,18}\b"), _luhn_ok),
    PiiRule(
        "ip",
        re.compile(
            r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)"  # IPv4; not after "v" as in "v1.2.3.4"
            # IPv6, possibly ending in an IPv4 ("::ffff:192.0.2.1")
            r"|(?<![\w:.])(?:[0-9a-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9a-f]{0,4})"
            r"(?![\w:]|\.\d)",
            re.I,
        ),
        _ip_ok,
    ),
    PiiRule(
        "phone",
        re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?"  # country code
            r"(?:\(\d{1,4}\)[ .-]?)?"  # area code "(555)", or trunk prefix "(0)" as in +33 (0)1
            # A 1-digit first group ("+33 6 12 ...") is allowed only after a prefix (_phone_ok);
            # "/" separates the area code in German numbers ("030/1234567").
            r"\d{1,4}(?:[ ./-]?\d{2,4}){1,4}(?!\w)"
        ),
        _phone_ok,
    ),
)


def clean_and_mask(text: str, kinds: Sequence[str]) -> tuple[str, Counter[str]]:
    """A text as the clean stage, the model and serving see it: normalised (text.clean_text),
    then the `kinds` of personal data masked; with what was masked."""
    return mask_pii(clean_text(text), kinds)


def mask_raw(text: str, kinds: Sequence[str]) -> tuple[str, Counter[str]]:
    """A text as collected, with the `kinds` of personal data masked before it is written: as
    written but masked; or, where cleaning reveals more to mask (an e-mail written with HTML
    entities, say), cleaned and masked. Either way clean_and_mask of the result is what it
    would have been of the original."""
    masked, counts = mask_pii(text, kinds)
    cleaned = clean_text(masked)
    if cleaned == masked:  # nothing for cleaning to reveal: no second pass of the masker
        return masked, counts
    cleaned, more = mask_pii(cleaned, kinds)
    if more:
        return cleaned, counts + more
    return masked, counts


def counts_line(counts: Mapping[str, int]) -> str:
    """Masked personal data by kind, as the logs and the run summary print it: `email 2, ...`."""
    return ", ".join(f"{kind} {n:,}" for kind, n in counts.items())


def mask_pii(text: str, kinds: Sequence[str]) -> tuple[str, Counter[str]]:
    """Replace personal data of the given kinds with typed placeholders; count what was masked."""
    counts: Counter[str] = Counter()
    for rule in PII_RULES:
        if rule.kind not in kinds:
            continue

        def replace(match: re.Match[str], rule: PiiRule = rule) -> str:
            if not rule.confirm(match):
                return match.group(0)
            counts[rule.kind] += 1
            return rule.placeholder

        text = rule.pattern.sub(replace, text)
    return text, counts
