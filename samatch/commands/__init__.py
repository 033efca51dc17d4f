"""One module per `samatch` subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``."""

import argparse


def parse_args(module, argv: list[str]) -> argparse.Namespace:
    """Parse a subcommand's arguments from a list (for commands that call other commands)."""
    parser = argparse.ArgumentParser(prog=f"samatch {module.__name__.rsplit('.', 1)[-1]}")
    module.add_arguments(parser)
    return parser.parse_args(argv)


def add_cascade_arguments(p: argparse.ArgumentParser) -> None:
    """``--sam-cascade`` / ``--cascade-threshold``, shared by evaluate and predict."""
    p.add_argument(
        "--sam-cascade",
        action="store_true",
        help="refine the U-Net's prediction with the run's SAM (boxes -> SAM -> fused mask)",
    )
    p.add_argument(
        "--cascade-threshold",
        type=float,
        default=0.5,
        help="confidence a pixel needs to count for a cascade box (default 0.5)",
    )
