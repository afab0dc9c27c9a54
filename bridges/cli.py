"""``mbridge`` command line: ``mbridge <command> --help`` for each command."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def _commands() -> dict:
    import bridges.commands as pkg

    return {info.name: importlib.import_module(f"bridges.commands.{info.name}")
            for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mbridge", description="HF <-> Megatron-Core bridges")
    sub = ap.add_subparsers(dest="cmd", required=True)
    commands = _commands()
    for name, mod in commands.items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.__doc__))
    args, rest = ap.parse_known_args(argv)
    mod = commands[args.cmd]
    if rest and not getattr(mod, "PASSTHROUGH", False):
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
