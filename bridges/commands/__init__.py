"""``mbridge`` subcommands: one module each, exposing HELP, ``add_arguments(parser)`` and
``run(args) -> int``. ``bridges/cli.py`` discovers them."""
