"""The lexical front of the constant-blind analysis cache: a text's key with its integer constants
blanked, and the analyses filed under such keys. Compiled with the proxy's hot modules
(pgwarden/compiled.py): the gate looks every statement up here before any interpreted call, and
pgwarden.policy.analysis files the shapes (it parses, walks and probes; this module never does).

The constant-blind key still costs a parse and a pass over the tree's JSON (about 6 us of the
proxy's per-statement work), and an agent's traffic is mostly a few shapes with a new number in
each (pgbench: `... WHERE aid = 12345;`). In a plain ASCII text (no quotes of either kind, no
dollar signs, backslashes or comments) a run of one to nine digits with no letter, digit,
underscore or dot on either side can only be an integer constant token (or the exponent of a
numeric one, 1e-5, which is a literal value all the same); the digits of a name stay in the
key. Blanking those runs gives a key two texts share when they are the same text but for them.
An analysis is filed under that key only when the constant-blind cache filed it (the walk read
no literal) and two probes, the runs replaced by 1, 2, 3, … and by 999999999, 999999998, …,
parse to the same blinded tree as the text itself: the integers then become only literal
values, not a FETCH count, a storage parameter, an array bound or float(p)'s choice of type,
where a different number makes a different statement. A shape that fails the probes is
remembered as such (one probe per shape).
"""

from __future__ import annotations

import re
from typing import Any, Final

from pgwarden.cache import BoundedCache

FRONT_CACHE_SIZE: Final = 1024
# texts longer than this are analysed afresh every time (pgwarden.policy.analysis.MAX_CACHED_TEXT)
MAX_FRONT_TEXT: Final = 4096
# (blanked text, search_path, server version) -> its Analysis, or False: the shape failed the probes
FRONT_CACHE: BoundedCache[tuple[str, tuple[str, ...], int], Any] = BoundedCache(FRONT_CACHE_SIZE)
# a run of 1-9 digits with no name character or dot either side: what `integer_runs` finds, as a
# pattern (the specification tests hold the scanner to; the scanner, compiled, takes a third of
# the time the regular expression engine does on a pgbench text)
INTEGER_RUN: Final = re.compile(r"[0-9](?<![A-Za-z0-9_.][0-9])[0-9]{0,8}(?![A-Za-z0-9_.])")
MAX_RUN: Final = 9  # digits: a longer number (a bigint, a numeric) stays in the key


def _name_char(c: int) -> bool:
    """A letter, digit, underscore or dot (ASCII code `c`): what may not touch a blanked run."""
    return 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 95 or c == 46


def integer_runs(sql: str) -> list[int]:
    """Where INTEGER_RUN matches in `sql`: start, end, start, end, … A scan by code point,
    compiled: maximal digit runs, kept when 1-9 long and not touching a name character or dot."""
    runs: list[int] = []
    n = len(sql)
    i = 0
    while i < n:
        c = ord(sql[i])
        if 48 <= c <= 57:
            j = i + 1
            while j < n and 48 <= ord(sql[j]) <= 57:
                j += 1
            if (j - i <= MAX_RUN and (i == 0 or not _name_char(ord(sql[i - 1])))
                    and (j == n or not _name_char(ord(sql[j])))):
                runs.append(i)
                runs.append(j)
            i = j
        else:
            i += 1
    return runs


# compiled (mypyc), a function has no Python code object and the scan above is the faster way;
# run as Python (PGWARDEN_PURE_PYTHON=1, or a build without a compiler) the pattern is faster
COMPILED: Final = not hasattr(_name_char, "__code__")


def split_runs(sql: str) -> list[str]:
    """`sql` cut at its integer runs, the runs left out: INTEGER_RUN.split(sql)."""
    if not COMPILED:
        return INTEGER_RUN.split(sql)
    return split_runs_at(sql, integer_runs(sql))


def front_key(sql: str) -> str | None:
    """`sql` with its integer constants blanked, or None outside the plain lexical domain (where a
    digit run could be part of a string, a quoted or non-ASCII name, a comment or a parameter,
    and a NUL, refused by the analysis, could pass for a blanked digit)."""
    if (not sql.isascii() or "'" in sql or '"' in sql or "$" in sql or "\\" in sql or "--" in sql
            or "/*" in sql or "\x00" in sql):  # eight checks in C: a third of one regex search
        return None
    if not COMPILED:
        return INTEGER_RUN.sub("\x00", sql)
    runs = integer_runs(sql)
    if not runs:
        return sql
    return "\x00".join(split_runs_at(sql, runs))  # NUL: not in a text in the domain, so never a collision


def split_runs_at(sql: str, runs: list[int]) -> list[str]:
    """`sql` cut at `runs` (integer_runs' positions), the runs left out."""
    parts: list[str] = []
    start = 0
    for k in range(0, len(runs), 2):
        parts.append(sql[start : runs[k]])
        start = runs[k + 1]
    parts.append(sql[start:])
    return parts


def filed(sql: str, search_path: tuple[str, ...], server_version: int) -> Any:
    """The analysis filed for `sql`'s shape, or None: not filed (yet), not in the lexical domain,
    too long, or a shape whose integers are more than literal values. None sends the caller to
    `pgwarden.policy.analysis.analyze`, which files what it may."""
    if len(sql) > MAX_FRONT_TEXT:
        return None
    key = front_key(sql)
    if key is None:
        return None
    known = FRONT_CACHE.get((key, search_path, server_version), touch=True)
    return None if known is None or known is False else known
