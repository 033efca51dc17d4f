"""`samatch demo`: the embedded default, end to end on the built-in phantoms in a few CPU minutes.

Three phantom hospitals with different scanners (intensity, contrast, noise, anatomy size), one
labeled patient each, pooled centrally and trained with a Match method; prints validation Dice as it
goes and evaluates the best checkpoint. Nothing outside the package is read.
"""

from __future__ import annotations

import argparse

from samatch.config import load_config

DEMO = {
    "data.format": "phantom-cardiac",
    "data.root": "0,1,2",
    "data.labeled": 3,
    "data.size": 64,
    "model.base_channels": 8,
    "schedule.iterations": 240,
    "schedule.batch_size": 4,
    "schedule.lr": 0.03,
    "schedule.eval_every": 60,
    "schedule.log_every": 20,
    "device": "cpu",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--method", default="unimatch")
    p.add_argument("--iterations", type=int, default=DEMO["schedule.iterations"])


def run(args) -> int:
    import torch

    from samatch.commands import evaluate as evaluate_cmd
    from samatch.commands import parse_args
    from samatch.commands import train as train_cmd

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        f"demo: {args.method} on 3 phantom hospitals (1 labeled patient each), "
        f"{args.iterations} iterations, CPU -> {args.out}"
    )
    sets = [f"{k}={v}" for k, v in {**DEMO, "schedule.iterations": args.iterations}.items()]
    load_config(None, dict(s.split("=", 1) for s in sets))  # fail early on a bad default
    train_cmd.run(
        parse_args(
            train_cmd, ["--method", args.method, "--out", args.out, *sum((["--set", s] for s in sets), [])]
        )
    )
    return evaluate_cmd.run(parse_args(evaluate_cmd, ["--run", args.out, "--device", "cpu"]))
