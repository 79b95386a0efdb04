"""Content detectors: the safety net that finds secrets by their shape, wherever they sit.

Lineage masks what the parse tree can follow; detectors catch what it cannot (an email typed
into `customers.notes`, an SSN inside an error message, a card number in a JSON blob). They run
over every text value of every result, so they are built for speed:

* a single combined *bytes* regex without lookarounds (`prefilter`) is run once over a whole
  DataRow or CopyData payload; most rows have no candidate at all and are passed on untouched,
  without being split into columns or decoded;
* only on a candidate hit are values decoded and each detector's full pattern run, with its
  checksum (Luhn for cards, mod-97 for IBANs) to keep false positives down.

The prefilter is a superset of the full patterns, and because a column's bytes are contiguous in
the payload, a hit inside a value is always a hit in the payload. A payload that is not pure
ASCII (binary-format integers, non-English text) is always decoded: the bytes and str regex
engines only agree on ASCII. All patterns use ASCII semantics (custom ones too, `re.ASCII`).

We measured no maintained PII library that fits a per-row budget of microseconds (the NER-based
ones cost milliseconds per value; the regex ones add nothing over these five patterns), so
the detectors stay small, precompiled and tested here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

BUILTIN_DETECTORS = ("email", "us_ssn", "credit_card", "phone", "iban")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in moved))
    except ValueError:
        return False
    return number % 97 == 1


def _card_ok(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _phone_ok(match: str) -> bool:
    n = sum(c.isdigit() for c in match)
    return 8 <= n <= 15


@dataclass(frozen=True)
class Detector:
    """One named pattern. `core` is the lookaround-free superset used by the bytes prefilter."""

    name: str
    full: re.Pattern[str]
    core: str
    check: Callable[[str], bool] | None = None


_EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
# Prefilter gates, each a superset of its detectors' full patterns, cheap to search because they
# start at a literal or a digit (a leading character class with a long repeat is rescanned at
# every position of the row). SSNs, cards and phone numbers all contain at least eight digits
# within a run of digits and separators, so one gate serves the three.
_EMAIL_CORE = r"@[A-Za-z0-9-]+\."
_DIGITS_CORE = r"[0-9][0-9 .()-]{6,}[0-9]"
_IBAN_CORE = r"[A-Z]{2}[0-9]{2}"

_BUILTINS: dict[str, Detector] = {
    "email": Detector("email", re.compile(_EMAIL, re.ASCII), _EMAIL_CORE),
    # SSNs and ITINs (area 9xx: tax ids of the same sensitivity); 000 and 666 are never issued
    "us_ssn": Detector(
        "us_ssn",
        re.compile(
            r"(?<![0-9-])(?!000|666)[0-9]{3}(?P<s>[- ])(?!00)[0-9]{2}(?P=s)(?!0000)[0-9]{4}(?![0-9-])",
            re.ASCII,
        ),
        _DIGITS_CORE,
    ),
    "credit_card": Detector(
        "credit_card", re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])", re.ASCII), _DIGITS_CORE, _card_ok
    ),
    "phone": Detector(
        "phone",
        re.compile(
            r"(?<![\w+])\+[0-9][0-9 .()-]{6,20}[0-9](?![0-9])"
            r"|(?<![\w])\(?[0-9]{3}\)?[ .-][0-9]{3}[ .-][0-9]{4}(?![0-9])",
            re.ASCII,
        ),
        _DIGITS_CORE,
        _phone_ok,
    ),
    "iban": Detector("iban", re.compile(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b", re.ASCII), _IBAN_CORE, iban_ok),
}


def builtin(name: str) -> Detector:
    return _BUILTINS[name]


# what makes a custom pattern mean something else inside the combined prefilter (see custom())
_UNSAFE_IN_PREFILTER = re.compile(r"\(\?(?!:)|\\[bBAZ1-9]|\^|\$")


def custom(name: str, pattern: str) -> Detector:
    """A MaskingRule's own regex; raises re.error when it does not compile."""
    full = re.compile(pattern, re.ASCII)
    re.compile(pattern.encode("ascii"), re.ASCII)  # must also work over bytes for the prefilter
    # The prefilter must never be narrower than the full pattern, so the pattern is used as-is
    # only when it means the same inside `(?:a)|(?:b)|…` over a whole row's bytes. Not with:
    # lookarounds and anchors (\b \B ^ $ \A \Z: the length bytes around a value, or another
    # column, would decide them); numbered backreferences (another detector's groups come first
    # in the combined pattern: `\1` would name one of those, unset, and the branch never matches);
    # any other `(?…)` than `(?:` (named groups and backreferences, conditionals, inline flags:
    # they renumber, clash or do not compile there). Such a pattern is not prefiltered at all.
    core = pattern if not _UNSAFE_IN_PREFILTER.search(pattern) else ""
    return Detector(name, full, core)


def tag(name: str) -> str:
    """What replaces a detector hit: it says what was found, never any part of it."""
    return f"[redacted:{name}]"


class DetectorSet:
    """All detectors of one subject's masking, with the combined prefilter."""

    def __init__(self, detectors: Iterable[Detector]) -> None:
        self.detectors: tuple[Detector, ...] = tuple(detectors)
        cores = [d.core for d in self.detectors]
        self._pre_text: re.Pattern[str] | None = None
        if not self.detectors:
            self._pre: re.Pattern[bytes] | None = None
            self._always = False
        elif all(cores):
            either = "|".join(f"(?:{c})" for c in dict.fromkeys(cores))
            self._pre = re.compile(either.encode("ascii"), re.ASCII)
            # the same over text, for scrub(): one search instead of every detector's finditer
            # (the audit scrubs each parameter of every extended-protocol statement)
            self._pre_text = re.compile(either, re.ASCII)
            self._always = False
        else:  # a custom pattern we cannot safely prefilter: decode every value
            self._pre = None
            self._always = True

    def __bool__(self) -> bool:
        return bool(self.detectors)

    @property
    def prefilter_text(self) -> re.Pattern[str] | None:
        """What `scrub` runs first over ASCII text: no match, nothing to replace (None: no such
        shortcut, `scrub` looks at every value)."""
        return self._pre_text

    def may_match(self, payload: bytes) -> bool:
        """Cheap test over raw bytes: False means no detector can match any value inside."""
        if self._always:
            return True
        if self._pre is None:
            return False
        if not payload.isascii():
            return True
        return self._pre.search(payload) is not None

    def scrub(self, text: str) -> str:
        """Replace every validated hit by its tag; returns the same object when nothing matched."""
        pre = self._pre_text
        if pre is not None and text.isascii() and pre.search(text) is None:
            return text  # no detector's core occurs: none can match (see may_match)
        spans: list[tuple[int, int, str]] = []
        for det in self.detectors:
            for m in det.full.finditer(text):
                if m.end() > m.start() and (det.check is None or det.check(m.group())):
                    spans.append((m.start(), m.end(), det.name))
        if not spans:
            return text
        spans.sort()
        out: list[str] = []
        pos = 0
        for start, end, name in spans:
            if end <= pos:
                continue  # inside a span already replaced
            out.append(text[pos:max(pos, start)])
            out.append(tag(name))
            pos = end
        out.append(text[pos:])
        return "".join(out)
