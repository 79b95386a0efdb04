"""`pgwarden demo` — the README's first command — shows allow, mask, deny, approval and the audit."""

from __future__ import annotations

import subprocess
import sys

SECRETS = ("ada@example.com", "123-45-6789", "4111111111111111", "grace@example.org", "234-56-7890")


def test_the_demo_tells_the_whole_story() -> None:
    out = subprocess.run([sys.executable, "-m", "pgwarden.cli", "demo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "summary: allowed->ok, masked->ok, masked->ok, masked->ok, denied->42501, denied->42501, denied->42501, review->ok" in text
    assert "a***@example.com" in text and "[redacted:email]" in text  # masked, and caught in free text
    assert "pgwarden approvals approve" in text  # a human approved the DELETE
    assert "chain intact" in text  # the auditor's check
    assert "DELETE 1" in text  # the replay shows the approved statement ran once
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked into the demo output"
