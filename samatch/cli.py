"""`samatch` command line: each subcommand lives in its own module with ``add_arguments`` and ``run``.

Bad input ends in one line on stderr naming the file and the problem, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from samatch import allocator
from samatch.io.base import DataError

# (command words, module, help). The module provides add_arguments(parser) and run(args) -> int.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("data", "check"), "samatch.datacheck", "summarize a dataset folder and report bad files"),
    (("data", "pack"), "samatch.commands.pack", "write a compact preprocessed .npz of a training setup"),
    (("train",), "samatch.commands.train", "train one method on one dataset (centralized)"),
    (("evaluate",), "samatch.commands.evaluate", "evaluate a run on a split at native resolution"),
    (("predict",), "samatch.commands.predict", "segment NIfTI / PNG files or folders with a run"),
    (("sam-report",), "samatch.commands.sam_report", "Dice of SAM pseudo-labels by prompt source"),
    (("compare",), "samatch.commands.compare", "paired Wilcoxon tests between evaluated runs"),
    (("demo",), "samatch.commands.demo", "the embedded default: phantom hospitals, end to end"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samatch", description=__doc__.splitlines()[0])
    allocator.add_allocator_argument(parser)
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module, help_text in COMMANDS:
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text)
        else:
            if words[0] not in groups:
                grp = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = grp.add_subparsers(dest="subcommand", required=True)
            sub = groups[words[0]].add_parser(words[1], help=help_text)
        sub.set_defaults(_module=module, _parser=sub)
        allocator.add_allocator_argument(sub, default=argparse.SUPPRESS)  # also after the command
        importlib.import_module(module).add_arguments(sub)
    return parser


def allocator_choice(argv: list[str] | None) -> str:
    """``--allocator`` wherever it stands in ``argv`` (before or after the command), or its default;
    read without the commands' parsers, whose modules import torch."""
    pre = argparse.ArgumentParser(prog="samatch", add_help=False)
    allocator.add_allocator_argument(pre)
    return pre.parse_known_args(argv)[0].allocator


def main(argv: list[str] | None = None) -> int:
    """Run one command; from the command line (``argv`` None) the process first starts again on the
    chosen allocator (``samatch.allocator.relaunch``), which an in-process call leaves alone. It
    starts again before the commands' modules are imported: they import torch (about 1 s that the
    new process would pay again)."""
    try:
        allocator.relaunch(allocator_choice(argv), argv)
    except ValueError as err:
        print(f"samatch: error: {err}", file=sys.stderr)
        return 2
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # the command's own usage, not the top-level one
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"samatch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
