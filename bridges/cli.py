"""``mbridge`` command line: ``mbridge <command> --help`` for each command."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback


def _commands() -> dict:
    import bridges.commands as pkg

    return {info.name.replace("_", "-"): importlib.import_module(f"bridges.commands.{info.name}")
            for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MBRIDGE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    ap = argparse.ArgumentParser(prog="mbridge", description="HF <-> Megatron-Core bridges")
    ap.add_argument("--debug", action="store_true",
                    help="show the Python traceback of an error (also: MBRIDGE_DEBUG=1)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    commands = _commands()
    for name, mod in commands.items():
        mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.__doc__))
    args, rest = ap.parse_known_args(argv)
    mod = commands[args.cmd]
    if rest and not getattr(mod, "PASSTHROUGH", False):
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest, args.argv, args.debug = rest, argv, debug
    try:
        return int(mod.run(args) or 0)
    except BaseException as e:  # noqa: BLE001 - every failure ends here, as one line or a traceback
        return _failed(e, debug)


def _failed(e: BaseException, debug: bool) -> int:
    """Print a failure the way a user can read it; return the exit status: 2 for bad input
    (an ``MBridgeError``: the message names the file, tensor or field), 1 for an OS error
    (disk full, permission) or a bug (with its traceback), 130 for Ctrl-C."""
    from bridges.core.errors import MBridgeError
    from bridges.launch import report_failure

    if isinstance(e, SystemExit):
        raise e
    status, user = ((2, True) if isinstance(e, MBridgeError) else (1, True) if isinstance(e, OSError)
                    else (130, True) if isinstance(e, KeyboardInterrupt) else (1, False))
    if report_failure(e, status, user, _text(e)):
        return status
    if debug or not user:
        traceback.print_exception(e)
    if isinstance(e, KeyboardInterrupt):
        print("mbridge: interrupted; the output path was left as it was before", file=sys.stderr)
    elif user:
        rank = os.environ.get("RANK", "0")
        print(f"mbridge: error: {'' if rank == '0' else f'[rank {rank}] '}{_text(e)}", file=sys.stderr)
    return status


def _text(e: BaseException) -> str:
    """The message; an OSError of ours without its '[Errno N]' prefix."""
    if isinstance(e, OSError) and e.strerror and not e.filename:
        return e.strerror
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
