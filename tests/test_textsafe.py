"""Agent-supplied text shown to people: what can steer a terminal is shown as a visible escape."""

from __future__ import annotations

import json

from pgwarden.textsafe import Escaper, escape, is_safe, json_dumps

CURSOR_UP_ERASE = "\x1b[1A\x1b[2K"
OSC8 = "\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\"
BIDI = "\u202e0 < di\u202c"


def test_terminal_sequences_become_visible() -> None:
    s = f"DELETE FROM t WHERE id = 8 /*{CURSOR_UP_ERASE}*/ OR id > 0"
    assert escape(s) == "DELETE FROM t WHERE id = 8 /*\\x1b[1A\\x1b[2K*/ OR id > 0"
    assert escape(OSC8) == "\\x1b]8;;https://evil.example/\\x1b\\click\\x1b]8;;\\x1b\\"
    assert escape(BIDI) == "\\u202e0 < di\\u202c"


def test_every_listed_class_is_escaped() -> None:
    hostile = [
        "\x00",
        "\x07",
        "\r",
        "\x1b",
        "\x7f",
        "\x85",
        "\x9b",
        "\u061c",
        "\u200e",
        "\u200f",
        "\u2028",
        "\u202a",
        "\u202b",
        "\u202c",
        "\u202d",
        "\u202e",
        "\u2066",
        "\u2067",
        "\u2068",
        "\u2069",
        "\u200b",
        "\ufeff",
        "\U000e0001",
    ]
    for c in hostile:
        out = escape(f"a{c}b", multiline=True)
        assert out.startswith("a\\") and out.endswith("b") and c not in out, repr(c)
        assert is_safe(out)
    assert escape("\U000e0001") == "\\U000e0001"


def test_readable_text_is_untouched() -> None:
    for s in ("SELECT 'café', 'Müller', '東京' -- ok", "E'\\x1b' is text", "a\\nb"):
        assert escape(s) == s
    assert escape("a\nb\tc", multiline=True) == "a\nb\tc"
    assert escape("a\nb\tc") == "a\\x0ab\\x09c"  # one value, one line


def test_escaper_says_that_it_escaped() -> None:
    safe = Escaper()
    assert safe("plain") == "plain" and safe.note() is None
    safe(f"x{CURSOR_UP_ERASE}")
    note = safe.note()
    assert note is not None and note.startswith("note: 2 control") and "shown escaped" in note


def test_json_for_a_terminal_round_trips() -> None:
    value = {
        "sql": f"SELECT 1 /*{CURSOR_UP_ERASE}\x9b2K{BIDI}*/",
        "name": "Zoë",
        "emoji": "\U0001f600",
        "tag": "\U000e0041",
    }
    text = json_dumps(value, indent=1)
    assert is_safe(text, multiline=True)
    assert "Zoë" in text and "\\u202e" in text and "\\u009b" in text and "\\udb40\\udc41" in text
    assert json.loads(text) == value
