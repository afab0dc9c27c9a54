"""mbridge check: the conformance suite for one model (extra arguments go to pytest)."""
HELP = "run the conformance suite for one model"
PASSTHROUGH = True  # unknown arguments are pytest's


def add_arguments(parser) -> None:
    parser.add_argument("model", help="org/model (shipped fixture or hub config) or a local directory")


def run(args) -> int:
    import pytest

    return int(pytest.main([f"--mbridge-model={args.model}", *args.rest]))
