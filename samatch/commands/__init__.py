"""One module per `samatch` subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``."""
