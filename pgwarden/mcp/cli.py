"""`pgwarden mcp`'s entry point: a clear message when the optional SDK is not installed."""

from __future__ import annotations

import argparse
import importlib.util

from pgwarden.errors import UserError


def main(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("mcp") is None:
        raise UserError(
            "pgwarden mcp needs the Model Context Protocol SDK: pip install 'pgwarden[mcp]' (or: pip install 'mcp>=2.3,<3')"
        )
    from pgwarden.mcp.server import main as serve

    return serve(args)
