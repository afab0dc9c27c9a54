"""Tasks for test_convert.py, run on every rank of the pool."""


def cli(argv: list[str]) -> int:
    from bridges.cli import main

    return main(argv)


def cli_captured(argv: list[str]) -> tuple[int, str]:
    """``mbridge <argv>`` on this rank: its exit status and what it printed to stderr."""
    import contextlib
    import io

    from bridges.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def cli_stdout(argv: list[str]) -> tuple[int, str]:
    """``mbridge <argv>`` on this rank: its exit status and what it printed to stdout."""
    import contextlib
    import io

    from bridges.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()
