import pytest

from flywheel.pii import PII_RULES, mask_pii

ALL_PII = [rule.kind for rule in PII_RULES]


@pytest.mark.parametrize(
    ("text", "masked", "kind"),
    [
        ("mail me at jane.doe+films@example.co.uk now", "mail me at <EMAIL> now", "email"),
        ("see https://example.com/path?q=1, then", "see <URL>, then", "url"),
        ("or www.example.org.", "or <URL>.", "url"),
        ("card 4111 1111 1111 1111 ok", "card <CARD> ok", "card"),
        ("card 4111-1111-1111-1111", "card <CARD>", "card"),
        ("iban DE89 3704 0044 0532 0130 00 thanks", "iban <IBAN> thanks", "iban"),
        ("iban GB82WEST12345698765432", "iban <IBAN>", "iban"),
        ("from 192.168.10.254 today", "from <IP> today", "ip"),
        ("v6 2001:db8::8a2e:370:7334 here", "v6 <IP> here", "ip"),
        ("call +44 20 7946 0958 today", "call <PHONE> today", "phone"),
        ("call (555) 123-4567", "call <PHONE>", "phone"),
        ("call 555-123-4567 or", "call <PHONE> or", "phone"),
    ],
)
def test_mask_pii_each_kind(text, masked, kind):
    out, counts = mask_pii(text, ALL_PII)
    assert out == masked
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "released in 1999, sequel in 2003",
        "on 2024-01-15 at 12:30:45",
        "it cost $12,500,000 to make",
        "card 4111 1111 1111 1112",  # fails Luhn
        "version 1.2.3.4.5 of the cut",
        "rated 9/10, 120 minutes",
        "a <EMAIL> placeholder stays",
    ],
)
def test_mask_pii_leaves_non_pii_alone(text):
    out, counts = mask_pii(text, ALL_PII)
    assert out == text
    assert sum(counts.values()) == 0


def test_checksums_decide_card_and_iban():
    _, counts = mask_pii("iban DE89 3704 0044 0532 0130 01", ALL_PII)  # fails mod-97
    assert counts["iban"] == 0
    _, counts = mask_pii("card 4111 1111 1111 1112", ["card"])  # fails Luhn
    assert counts["card"] == 0


def test_mask_pii_only_configured_kinds():
    text = "jane@example.com 192.168.0.1"
    out, counts = mask_pii(text, ["ip"])
    assert out == "jane@example.com <IP>"
    assert counts == {"ip": 1}


def test_email_inside_url_is_one_url():
    out, counts = mask_pii("https://x.example.com/u/jane@example.com", ALL_PII)
    assert out == "<URL>"
    assert counts == {"url": 1}
