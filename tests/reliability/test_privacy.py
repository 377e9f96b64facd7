"""The PII masker measured on a labelled sample (issue 18, point 6): customer-service and review
messages written for this test, each with the personal data in it marked by hand (kind and the
exact text), and messages full of numbers that are not personal data (prices, dates, versions,
scores, order references, ISBNs). Recall: the share of marked items masked with their kind and
gone from the text; precision: the share of masks that cover a marked item."""

from __future__ import annotations

from collections import Counter

from flywheel.pii import PII_RULES, clean_and_mask

KINDS = [rule.kind for rule in PII_RULES]

# (message, [(kind, the personal data as written)])
SAMPLE: list[tuple[str, list[tuple[str, str]]]] = [
    ("Please call me back on 555-123-4567 after 5pm", [("phone", "555-123-4567")]),
    ("my number is (555) 123-4567, ask for Dana", [("phone", "(555) 123-4567")]),
    ("Call me at 566-7747 tonight", [("phone", "566-7747")]),
    ("reach me on +44 20 7946 0958 or at home", [("phone", "+44 20 7946 0958")]),
    ("Tel. +33 6 12 34 56 78 (mobile)", [("phone", "+33 6 12 34 56 78")]),
    ("ring 06 12 34 56 78 if the parcel is late", [("phone", "06 12 34 56 78")]),
    ("Meine Nummer: 030/1234567, bitte zurückrufen", [("phone", "030/1234567")]),
    ("whatsapp +49 151 23456789 please", [("phone", "+49 151 23456789")]),
    ("cell 555.867.5309 - text first", [("phone", "555.867.5309")]),
    ("phone: 566.7747, evenings only", [("phone", "566.7747")]),
    ("You can text me at 07700 900123", [("phone", "07700 900123")]),
    ("contact jane.doe@example.com about the refund", [("email", "jane.doe@example.com")]),
    (
        "Email: Max.Mustermann+orders@mail.example.de",
        [("email", "Max.Mustermann+orders@mail.example.de")],
    ),
    (
        "write to support-team@shop.example.co.uk asap",
        [("email", "support-team@shop.example.co.uk")],
    ),
    ("<john_smith99@example.org> sent me here", [("email", "john_smith99@example.org")]),
    ("my login is a.b@c.io and it fails", [("email", "a.b@c.io")]),
    (
        "reset link: https://example.com/reset?token=abc123 does not work",
        [("url", "https://example.com/reset?token=abc123")],
    ),
    ("see www.example.org/orders/4471 for my order", [("url", "www.example.org/orders/4471")]),
    ("my profile example.com/users/jdoe shows the wrong name", [("url", "example.com/users/jdoe")]),
    ("http://192.168.0.1/admin is my router page", [("url", "http://192.168.0.1/admin")]),
    ("refund to DE89 3704 0044 0532 0130 00 please", [("iban", "DE89 3704 0044 0532 0130 00")]),
    ("IBAN GB82WEST12345698765432, name on account A. Smith", [("iban", "GB82WEST12345698765432")]),
    (
        "FR14 2004 1010 0505 0001 3M02 606 is my account",
        [("iban", "FR14 2004 1010 0505 0001 3M02 606")],
    ),
    ("charged twice on card 4111 1111 1111 1111!", [("card", "4111 1111 1111 1111")]),
    ("card number 5500-0000-0000-0004 expired", [("card", "5500-0000-0000-0004")]),
    ("used my amex 378282246310005 yesterday", [("card", "378282246310005")]),
    ("login from 203.0.113.42 was not me", [("ip", "203.0.113.42")]),
    ("my IPv6 is 2001:db8::8a2e:370:7334", [("ip", "2001:db8::8a2e:370:7334")]),
    ("server at 198.51.100.7 refuses me", [("ip", "198.51.100.7")]),
    (
        "I'm Sam, call 555-234-5678 or mail sam@example.net",
        [("phone", "555-234-5678"), ("email", "sam@example.net")],
    ),
    (
        "refund card 4111111111111111 or IBAN DE89370400440532013000",
        [("card", "4111111111111111"), ("iban", "DE89370400440532013000")],
    ),
    (
        "from 203.0.113.9 I opened https://shop.example.com/cart?id=77 and it crashed",
        [("ip", "203.0.113.9"), ("url", "https://shop.example.com/cart?id=77")],
    ),
    (
        "two numbers: 555-111-2222 and +1 555 333 4444",
        [("phone", "555-111-2222"), ("phone", "+1 555 333 4444")],
    ),
    (  # the public news snippet of the issue: the local number used to stay
        "Tenants can get information at (212) 566-8082 or 566-7747.",
        [("phone", "(212) 566-8082"), ("phone", "566-7747")],
    ),
    ("call 1-800-555-0199 for support", [("phone", "1-800-555-0199")]),
    ("+1-555-123-4567 is the only number that works", [("phone", "+1-555-123-4567")]),
    ("555 123 4567 is my cell", [("phone", "555 123 4567")]),
    ("office +33 (0)1 23 45 67 89, ask for Luc", [("phone", "+33 (0)1 23 45 67 89")]),
    ("email me: jane dot doe at example dot com", [("email", "jane dot doe at example dot com")]),
    ("mail: JOHN@EXAMPLE.COM", [("email", "JOHN@EXAMPLE.COM")]),
    ("IBAN: NL91 ABNA 0417 1643 00", [("iban", "NL91 ABNA 0417 1643 00")]),
    ("visa 4012-8888-8888-1881 was declined", [("card", "4012-8888-8888-1881")]),
    ("logged in from ::ffff:192.0.2.1 at night", [("ip", "::ffff:192.0.2.1")]),
    ("see https://example.com/a/b?c=d. Thanks", [("url", "https://example.com/a/b?c=d")]),
    # Numbers that are not personal data: nothing may be masked.
    ("It cost $1,299.99 and broke after 3 weeks", []),
    ("order #123456789 never arrived", []),
    ("invoice no. 987654321 is wrong", []),
    ("ticket 100-200-300 still open", []),
    ("booked for 2024-01-15 12:30, nobody came", []),
    ("between 1999-2001 this was the best film", []),
    ("ISBN 978-3-16-148410-0, the print is blurry", []),
    ("firmware v1.2.3.4 bricked my phone", []),
    ("scores: 10 20 30 40 50 out of 100", []),
    ("room 101-2020 was dirty", []),
    ("the 2019 2020 2021 seasons were great", []),
    ("I waited 45 minutes on hold, 3 times", []),
    ("model RX-5500 XT runs hot at 85 C", []),
    ("pages 123-4567 of the manual are missing", []),
    ("chapters 2 and 3, pages 120-1450 or 200-2010 of it", []),
    ("delivered on 15.01.2024, two days late", []),
    ("tracking number 1Z999AA10123456784 shows nothing", []),
    ("I rated it 4.5/5 on Amazon.com", []),
    ("version 10.0.19045.3803 crashes on start", []),
    ("my case ID 5551234567 was closed without reply", []),
    ("the 12 x 8 x 4 inch box was crushed", []),
    ("review number 1234567 of a film", []),
    ("call the shop, ask about order 566-7747", []),
]


# Marked items the masker is known to miss, with why: a new miss fails the test, these do not.
KNOWN_MISSES = {
    # Spelled-out addresses are not matched: a pattern for "at ... dot" would mask ordinary
    # sentences ("look at it dot by dot"). Person names are not masked at all (no NER model).
    "jane dot doe at example dot com",
}


def measure() -> dict[str, dict[str, float]]:
    """Per kind: marked items, masks, items masked and gone (recall), masks on items
    (precision); 'all' over every kind."""
    found: Counter = Counter()
    marked: Counter = Counter()
    hit: Counter = Counter()
    for text, gold in SAMPLE:
        masked, counts = clean_and_mask(text, KINDS)
        expected = Counter(kind for kind, _ in gold)
        for kind in KINDS:
            found[kind] += counts[kind]
            marked[kind] += expected[kind]
            covered = sum(1 for k, span in gold if k == kind and span not in masked)
            hit[kind] += min(covered, counts[kind])
    out = {}
    for kind in [*KINDS, "all"]:
        f = sum(found.values()) if kind == "all" else found[kind]
        m = sum(marked.values()) if kind == "all" else marked[kind]
        h = sum(hit.values()) if kind == "all" else hit[kind]
        out[kind] = {
            "marked": m,
            "masked": f,
            "recall": h / m if m else 1.0,
            "precision": h / f if f else 1.0,
        }
    return out


def test_the_masker_finds_the_marked_data_and_little_else():
    figures = measure()
    for kind, row in figures.items():
        print(
            f"{kind:6s} marked {row['marked']:3d} masked {row['masked']:3d} "
            f"recall {row['recall']:.3f} precision {row['precision']:.3f}"
        )
    assert figures["all"]["marked"] >= 40
    assert figures["all"]["recall"] >= 0.95
    assert figures["all"]["precision"] >= 0.95
    for kind in KINDS:
        assert figures[kind]["recall"] >= 0.85, (kind, figures[kind])
        assert figures[kind]["precision"] >= 0.95, (kind, figures[kind])


def test_every_negative_is_left_alone_and_every_marked_item_is_gone():
    leaks, false_masks = [], []
    for text, gold in SAMPLE:
        masked, counts = clean_and_mask(text, KINDS)
        leaks += [(text, span) for _, span in gold if span in masked and span not in KNOWN_MISSES]
        if not gold and sum(counts.values()):
            false_masks.append((text, masked))
    assert leaks == []
    assert false_masks == []
