import pytest
from masking_helpers import AGENT, HASH_KEY, OFFICER, RULE

from pgwarden.masking import load_masking, strategies
from pgwarden.resources import ResourceError, parse_documents


def rule(**over):
    text = RULE.format(derived="redact", whole_row="redact", allow="false")
    docs = parse_documents(text)
    spec = dict(docs[0].spec)
    spec.update(over)
    return [docs[0].__class__(**{**docs[0].__dict__, "spec": spec})]


def test_exempt_subject_sees_clear_values_and_other_connections_are_untouched():
    ms = load_masking(rule(), env={"SHOP_HASH_KEY": HASH_KEY})
    assert ms.for_identity(OFFICER, "shop") is None
    assert ms.for_identity(AGENT, "other-db") is None
    sm = ms.for_identity(AGENT, "shop")
    assert sm is not None and sm.columns[("public", "customers")]["ssn"] == "redact"
    assert ms.for_identity(AGENT, "shop") is sm  # cached per rule set


@pytest.mark.parametrize(
    "over, field",
    [
        ({"columns": [{"table": "customers", "column": "email"}]}, "spec.columns[0].table"),
        ({"columns": [{"table": "public.customers", "column": "email", "strategy": "rot13"}]},
         "spec.columns[0].strategy"),
        ({"columns": [{"table": "public.customers", "column": "x", "bogus": 1}]}, "spec.columns[0]"),
        ({"detectors": ["email", "passport"]}, "spec.detectors[1]"),
        ({"detectors": [{"name": "emp", "regex": "E-(\\d"}]}, "spec.detectors[0].regex"),
        ({"derived": "hide"}, "spec.derived"),
        ({"wholeRow": "maybe"}, "spec.wholeRow"),
        ({"allowInPredicates": "yes"}, "spec.allowInPredicates"),
        ({"exemptSubjects": [{"team": "x"}]}, "spec.exemptSubjects[0]"),
        ({"hashKeyEnv": "NOPE"}, "spec.hashKeyEnv"),
        ({"hashKeyEnv": None}, "spec.hashKeyEnv"),
        ({"hashKeyFile": "/nonexistent/key"}, "spec.hashKeyFile"),
        ({"colums": []}, "spec"),
    ],
)
def test_errors_name_the_document_and_field(over, field):
    with pytest.raises(ResourceError) as e:
        load_masking(rule(**over), env={"SHOP_HASH_KEY": HASH_KEY})
    assert e.value.field_path == field
    assert "MaskingRule agents/shop-pii" in str(e.value)


def test_hash_key_from_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("0123456789abcdef0123\n")
    ms = load_masking(rule(hashKeyEnv=None, hashKeyFile=str(key)), env={})
    assert ms.rules[0].hash_key == b"0123456789abcdef0123"


def test_two_rules_merge_to_the_stricter_setting():
    a = rule()
    b = rule(derived="deny", allowInPredicates=True,
             columns=[{"table": "public.customers", "column": "email", "strategy": "null"}])
    b = [b[0].__class__(**{**b[0].__dict__, "name": "second"})]
    sm = load_masking(a + b, env={"SHOP_HASH_KEY": HASH_KEY}).for_identity(AGENT, "shop")
    assert sm.derived == "deny"
    assert sm.allow_in_predicates is False
    assert sm.columns[("public", "customers")]["email"] == "null"


def test_strategies():
    assert strategies.redact("123-45-6789") == "[redacted]"
    assert strategies.email("ada@example.com") == "a***@example.com"
    assert strategies.email("not an email") == "[redacted]"
    assert strategies.last4("4111 1111 1111 1234") == "****1234"
    assert strategies.last4("12345") == "[redacted]"
    assert strategies.partial("Ada Lovelace") == "Ad****ce"
    assert strategies.partial("short") == "[redacted]"
    assert strategies.null("x") is None
    h = strategies.make_hash(b"k" * 32)
    assert h("ada@example.com") == h("ada@example.com") != h("grace@example.org")
    assert len(h("x")) == 16 and "ada" not in h("ada@example.com")
    assert strategies.make_hash(b"j" * 32)("ada@example.com") != h("ada@example.com")
