"""mbridge list: registered bridges and the configs shipped for them (``--markdown``: the
supported-models table of docs/models.md, which a test keeps in sync)."""
HELP = "registered bridges and their shipped configs"


def add_arguments(parser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print the docs table")


def rows() -> list[tuple[str, str, str, str, str]]:
    import inspect
    import sys

    from bridges.core.registry import registered
    from conformance.models import fixture_names, resolve

    shipped: dict[str, list[str]] = {}
    for name in fixture_names():
        shipped.setdefault(resolve(name).model_type, []).append(name)
    out = []
    for model_type, cls in registered().items():
        doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
        out.append((model_type, cls.__name__, ", ".join(cls.architectures),
                    ", ".join(shipped.get(model_type, [])) or "(no fixture config)",
                    " ".join(doc.split())))
    return out


def markdown() -> str:
    lines = ["| model type | bridge | architectures | shipped configs | what it handles |",
             "|---|---|---|---|---|"]
    lines += [f"| `{t}` | `{b}` | {a} | {s} | {d} |" for t, b, a, s, d in rows()]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    if args.markdown:
        print(markdown(), end="")
        return 0
    for t, b, a, s, _ in rows():
        print(f"{t:<10} {b:<16} {a:<24} {s}")
    return 0
