"""One module per `samatch` subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``."""

import argparse


def parse_args(module, argv: list[str]) -> argparse.Namespace:
    """Parse a subcommand's arguments from a list (for commands that call other commands)."""
    parser = argparse.ArgumentParser(prog=f"samatch {module.__name__.rsplit('.', 1)[-1]}")
    module.add_arguments(parser)
    return parser.parse_args(argv)
