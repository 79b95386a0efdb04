"""Showing agent-controlled text on a person's terminal without letting it steer the terminal.

A statement, an application_name, a subject, an error text or a cell value comes from the agent.
Printed raw, an ESC sequence in a SQL comment can move the cursor up and erase the line a reviewer
is reading, an OSC 8 sequence can turn text into a link, and a bidi override can reorder what is
shown, so the reviewer approves something other than what runs. Every character that is not
printable (C0 and C1 controls, DEL, bidi and other format characters, line and paragraph
separators, unassigned and private-use code points) is shown as a visible escape (`\\x1b`,
`\\u202e`), and the CLI says that it did, so the reader knows the text held such characters.

Backslashes are left alone: a literal `\\x1b` typed into a statement is harmless text, and the
note tells the reader when escaping happened.
"""

from __future__ import annotations

import json
from typing import Any

# Whitespace kept as is where the output is multi-line (a statement shown in full).
_MULTILINE_KEEP = frozenset("\n\t")


def _escape_char(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def is_safe(text: str, *, multiline: bool = False) -> bool:
    """True if `text` prints as itself: nothing in it can move the cursor or reorder the line."""
    if text.isprintable():
        return True
    return multiline and all(c.isprintable() or c in _MULTILINE_KEEP for c in text)


def escape(text: str, *, multiline: bool = False) -> str:
    """`text` with every non-printable character as a visible escape.

    `multiline` keeps newlines and tabs (a statement shown in full); otherwise they are escaped
    too, so one value stays on one line. Carriage return is always escaped: it rewrites the line.
    """
    if is_safe(text, multiline=multiline):
        return text
    keep = _MULTILINE_KEEP if multiline else frozenset()
    return "".join(c if c.isprintable() or c in keep else _escape_char(c) for c in text)


def count_unsafe(text: str, *, multiline: bool = False) -> int:
    if is_safe(text, multiline=multiline):
        return 0
    keep = _MULTILINE_KEEP if multiline else frozenset()
    return sum(1 for c in text if not (c.isprintable() or c in keep))


class Escaper:
    """Escapes values for one command's output and remembers whether it had to.

    `safe = Escaper(); print(safe(value)); ...; note = safe.note()` — the note is printed once,
    after the output, when anything was escaped.
    """

    def __init__(self) -> None:
        self.escaped = 0

    def __call__(self, value: object, *, multiline: bool = False) -> str:
        text = "" if value is None else str(value)
        n = count_unsafe(text, multiline=multiline)
        if not n:
            return text
        self.escaped += n
        return escape(text, multiline=multiline)

    def note(self) -> str | None:
        if not self.escaped:
            return None
        return (
            f"note: {self.escaped} control, bidi or other invisible character(s) in agent-supplied text are "
            "shown escaped (\\xNN, \\uNNNN) so they cannot hide or reorder what is printed"
        )


def json_dumps(value: Any, **kw: Any) -> str:
    """JSON for a terminal: non-ASCII text stays readable, invisible characters become \\uXXXX.

    `json.dumps(ensure_ascii=False)` escapes C0 controls only; C1 controls and bidi overrides would
    reach the terminal raw. Outside strings JSON output is ASCII, so every non-printable character
    left is inside a string, where `\\uXXXX` is the same value.
    """
    text = json.dumps(value, ensure_ascii=False, **kw)
    if is_safe(text, multiline=True):
        return text
    out = []
    for c in text:
        if c.isprintable() or c in _MULTILINE_KEEP:
            out.append(c)
            continue
        n = ord(c)
        if n < 0x10000:
            out.append(f"\\u{n:04x}")
        else:  # a surrogate pair, as JSON spells code points above the BMP
            n -= 0x10000
            out.append(f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}")
    return "".join(out)
