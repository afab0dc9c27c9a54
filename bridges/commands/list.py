"""mbridge list: registered bridges and the configs shipped for them."""
HELP = "registered bridges and their shipped configs"


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    from bridges.core.registry import registered
    from conformance.models import fixture_names, resolve

    shipped: dict[str, list[str]] = {}
    for name in fixture_names():
        shipped.setdefault(resolve(name).model_type, []).append(name)
    for model_type, cls in registered().items():
        print(f"{model_type:<10} {cls.__name__:<16} {', '.join(cls.architectures):<24} "
              f"{', '.join(shipped.get(model_type, [])) or '(no fixture config)'}")
    return 0
