"""Tasks for test_convert.py, run on every rank of the pool."""


def cli(argv: list[str]) -> int:
    from bridges.cli import main

    return main(argv)
