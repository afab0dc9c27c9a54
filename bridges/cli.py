"""``mbridge`` command line.

    mbridge list                       registered bridges and the configs shipped for them
    mbridge check <org/model|dir> ...  the conformance suite for one model (extra args go to pytest)
"""
from __future__ import annotations

import argparse
import sys


def _list() -> int:
    from bridges.core.registry import registered
    from conformance.models import fixture_names, resolve

    shipped: dict[str, list[str]] = {}
    for name in fixture_names():
        shipped.setdefault(resolve(name).model_type, []).append(name)
    for model_type, cls in registered().items():
        print(f"{model_type:<10} {cls.__name__:<16} {', '.join(cls.architectures):<24} "
              f"{', '.join(shipped.get(model_type, [])) or '(no fixture config)'}")
    return 0


def _check(model: str, rest: list[str]) -> int:
    import pytest

    return int(pytest.main([f"--mbridge-model={model}", *rest]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mbridge", description="HF <-> Megatron-Core bridges")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registered bridges and their shipped configs")
    chk = sub.add_parser("check", help="run the conformance suite for one model")
    chk.add_argument("model", help="org/model (shipped fixture or hub config) or a local directory")
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "list":
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        return _list()
    return _check(args.model, rest)


if __name__ == "__main__":
    sys.exit(main())
