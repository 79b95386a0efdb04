"""`pgwarden inject --connection NAME -f manifest.yaml`: the webhook's mutation, offline.

Prints every document of the manifest, with Pods and workload pod templates injected by the
same function the admission webhook uses (as `istioctl kube-inject` / `linkerd inject` do).
A DatabaseConnection in the same input supplies its credentials Secret name.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from pgwarden.errors import UserError
from pgwarden.operator.injection import InjectionError, InjectionTarget, inject_manifest
from pgwarden.operator.settings import OperatorSettings


def inject_documents(text: str, connection: str, image: str | None = None) -> list[Any]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise UserError(f"the manifest is not valid YAML: {e}") from e
    settings = OperatorSettings.from_env().injection
    if image:
        from dataclasses import replace

        settings = replace(settings, image=image)
    targets = {
        d["metadata"]["name"]: InjectionTarget.for_connection(
            d["metadata"]["name"], ((d.get("spec") or {}).get("credentials") or {}).get("secretName", ""))
        for d in docs if isinstance(d, dict) and d.get("kind") == "DatabaseConnection" and d.get("metadata")
    }
    out = []
    for i, d in enumerate(docs):
        if isinstance(d, dict) and d.get("kind") == "List":
            d = {**d, "items": [inject_manifest(x, connection, targets, settings) for x in d.get("items") or []]}
        elif isinstance(d, dict):
            try:
                d = inject_manifest(d, connection, targets, settings)
            except InjectionError as e:
                name = (d.get("metadata") or {}).get("name", "?")
                raise UserError(f"document {i + 1} ({d.get('kind')} {name}): {e}") from e
        out.append(d)
    return out


def main(args: argparse.Namespace) -> int:
    if args.filename == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.filename) as f:
                text = f.read()
        except OSError as e:
            raise UserError(f"cannot read {args.filename}: {e.strerror}") from e
    docs = inject_documents(text, args.connection, args.image)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0
