import pytest

from pgwarden.masking.detectors import BUILTIN_DETECTORS, DetectorSet, builtin, custom, iban_ok, luhn_ok

ALL = DetectorSet(builtin(n) for n in BUILTIN_DETECTORS)


@pytest.mark.parametrize(
    "text, kind",
    [
        ("call grace@example.org after 5pm", "email"),
        ("ssn 123-45-6789 on file", "us_ssn"),
        ("ssn 123 45 6789", "us_ssn"),
        ("card 4111111111111111", "credit_card"),
        ("card 4111 1111 1111 1111 exp", "credit_card"),
        ("amex 340000000000009", "credit_card"),
        ("tel +1 415 555 0101", "phone"),
        ("tel (415) 555-0101", "phone"),
        ("uk +44 20 7946 0958", "phone"),
        ("iban GB82 WEST 1234 5698 7654 32 ok", "iban"),
        ("iban DE89370400440532013000", "iban"),
    ],
)
def test_true_positives(text, kind):
    out = ALL.scrub(text)
    assert f"[redacted:{kind}]" in out
    assert ALL.may_match(text.encode())


@pytest.mark.parametrize(
    "text",
    [
        "order 12345 shipped",
        "total 4111111111111112",  # fails Luhn
        "date 2024-01-15 10:30",
        "ssn-like 000-12-3456 and 666-12-3456",
        "version 1.2.3, id 987654",
        "GB00 WEST 1234 5698 7654 32",  # fails mod-97
        "prefers email",
        "VIP",
    ],
)
def test_false_positives_are_left_alone(text):
    assert ALL.scrub(text) is text


def test_prefilter_skips_plain_rows_and_decodes_non_ascii():
    assert not ALL.may_match(b"\x00\x02\x00\x00\x00\x03abc\x00\x00\x00\x02VIP")
    assert ALL.may_match("caf\u00e9".encode())  # non-ASCII: always decoded


def test_prefilter_is_not_fooled_by_length_bytes():
    # a length prefix of 0x31 ('1') right before a value must not hide the SSN from the prefilter
    payload = b"\x00\x01\x00\x00\x00\x31" + b"123-45-6789"
    assert ALL.may_match(payload)


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_custom_detector():
    d = DetectorSet([custom("employee_id", r"EMP-[0-9]{6}")])
    assert d.scrub("badge EMP-123456 ok") == "badge [redacted:employee_id] ok"
    assert not d.may_match(b"badge EMP-12 ok")
    # a pattern with lookarounds cannot be prefiltered safely: every value is decoded
    assert DetectorSet([custom("x", r"(?<!\d)42")]).may_match(b"nothing")


@pytest.mark.parametrize(
    "detectors, text, kind",
    [
        (ALL, "caf\u00e9 grace@example.org 123-45-6789", "us_ssn"),  # non-ASCII: no prefilter over text
        (ALL, "caf\u00e9 grace@example.org", "email"),
        (DetectorSet([custom("answer", r"(?<!\d)42(?!\d)")]), "the answer is 42.", "answer"),  # not prefiltered
        (DetectorSet([custom("employee_id", r"EMP-[0-9]{6}"), builtin("email")]), "EMP-123456", "employee_id"),
    ],
)
def test_scrub_finds_what_the_detectors_find_past_its_prefilter(detectors, text, kind):
    """scrub() (audit parameters, error text) first asks one combined search whether any detector
    could match; a value it lets through must still be scrubbed by every detector."""
    assert f"[redacted:{kind}]" in detectors.scrub(text)


# A custom pattern that means something else inside the combined prefilter `(?:a)|(?:b)|…`, after
# another detector's groups or over a whole row's bytes, must not gate anything: each is found
# in a value sent in a row with other columns around it, and scrubbed where the audit scrubs.
@pytest.mark.parametrize(
    "pattern, value",
    [
        (r"PIN([0-9])\1\1\1", "PIN7777"),  # \1 would name the earlier detector's group
        (r"(['\"])tok_[A-Za-z0-9]{12}\1", "'tok_ABCDEFGHIJKL'"),
        (r"(?P<d>[0-9])(?P=d)-SECRET", "44-SECRET"),  # named group and backreference
        (r"(?P<x>EMP)-[0-9]{6}", "EMP-123456"),  # the same group name in two detectors
        (r"(?i)badge-[0-9]{4}", "BADGE-1234"),  # inline flags compile only at the start
        (r"\Aacct-[0-9]{5}\Z", "acct-12345"),  # anchored to the value, not to the row
    ],
)
def test_custom_patterns_that_change_meaning_in_the_prefilter_are_not_prefiltered(pattern, value):
    others = [custom("stripe_key", r"(sk|pk)_live_[A-Za-z0-9]{16}"), custom("employee", r"(?P<x>EMP)-[0-9]{7}"),
              builtin("email")]
    detectors = DetectorSet([*others, custom("secret", pattern)])
    assert detectors.scrub(value) == "[redacted:secret]"
    row = b"\x00\x02\x00\x00\x00\x02ok" + len(value).to_bytes(4, "big") + value.encode()
    assert detectors.may_match(row), "the row prefilter must let this row through to the detectors"


def test_plain_custom_patterns_are_still_prefiltered():
    detectors = DetectorSet([custom("stripe_key", r"(sk|pk)_live_[A-Za-z0-9]{16}"), custom("order", r"ORD-[0-9]{6}")])
    assert not detectors.may_match(b"\x00\x01\x00\x00\x00\x05hello")
    assert detectors.may_match(b"\x00\x01\x00\x00\x00\x0aORD-123456")
    assert detectors.scrub("ship ORD-123456 today") == "ship [redacted:order] today"
