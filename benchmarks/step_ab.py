"""Benchmark: the joint SAM-Match step against the UniMatch step, in turns, in one process.

``bench_step.py`` times its cases one after the other, so a machine whose speed drifts (a shared
CPU, the allocator's state) moves one case and not the other, and their ratio with it (1.2-1.5 from
run to run on this project's 2-core CPU, docs/performance_log.md). Here the two trainers (the same
networks and batch as bench_step's ``unimatch`` and ``joint`` cases) step in turns, UniMatch then
joint, and each pair gives a ratio; drift that is slow against one pair cancels in it. Prints each
pair, the median ratio and its spread; the SAM decoder's forward and backward are also timed apart
(the joint step's batch of prompts: 2B images x (C-1) boxes, LoRA gradients). On the CPU a joint
step decodes only the prompts that exist (``SamGuidance.skip_invalid``), so the prompts it decoded
are counted: on the phantom about a third of the pseudo-label prompts exist, which real data need
not match (docs/performance_log.md); ``--decode all`` decodes every prompt, as a GPU does, which
bounds real data from above. ``--run`` replaces the phantom with a trained run's real data and
U-Net (its ``best.pt`` in both trainers): the joint steps then prompt SAM from a trained network's
confident predictions on real slices (``--pool`` slices of each set, spread evenly over it).

    python benchmarks/step_ab.py [--batch 4] [--size 256] [--pairs 6] [--warmup 2] [--threads 0]
        [--amp fp32] [--sam-amp step] [--decode valid] [--run RUN_DIR [--pool 16] [--sam-cache DIR]]
        [--allocator auto] [--out runs/step_ab.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.bench_step import PassCounter, make_config, make_data  # noqa: E402
from benchmarks.record import provenance, write_json  # noqa: E402
from benchmarks.step_cost import synced_seconds  # noqa: E402
from samatch import allocator  # noqa: E402
from samatch.config import TrainConfig  # noqa: E402
from samatch.data import SliceSet, TrainData, build_train_data, open_reader  # noqa: E402
from samatch.engine import Trainer, load_run_model  # noqa: E402

CPU = torch.device("cpu")


def spread(s: SliceSet, pool: int) -> SliceSet:
    """``pool`` slices of ``s`` spread evenly over it (its patients, their bases to their apices)."""
    idx = torch.linspace(0, len(s) - 1, min(pool, len(s))).round().long().unique()
    labels = None if s.labels is None else s.labels[idx]
    return SliceSet(s.images[idx], labels, [s.patient_ids[i] for i in idx.tolist()])


def run_data(cfg: TrainConfig, run: Path, pool: int) -> TrainData:
    """``cfg`` given the data and U-Net settings of the trained run in ``run`` (its config.json) ->
    ``pool`` slices of each of the run's labeled and unlabeled sets."""
    trained = TrainConfig.load(run / "config.json")
    cfg.data, cfg.model = trained.data, trained.model
    if cfg.model.num_classes != 4:  # sam.enclosed "2>3" is the cardiac layout (myocardium around the LV)
        cfg.sam.enclosed = ""
    if not cfg.data.format.startswith("phantom-") and not Path(cfg.data.root).is_dir():
        raise SystemExit(
            f"{run}: the run's data folder {cfg.data.root!r} is not found from {Path.cwd()} (a relative"
            " path is relative to where the run was trained: run this there)"
        )
    data = build_train_data(cfg, lazy_val=True)  # the validation volumes are not used
    if data.unlabeled is None:
        raise SystemExit(f"{run}: the run's data have no unlabeled slices (data.max_unlabeled)")
    return TrainData(
        spread(data.labeled, pool), spread(data.unlabeled, pool), [], data.num_classes, data.class_names
    )


def trainer_for(
    method: str,
    size: int,
    batch: int,
    amp: str,
    run: Path | None = None,
    pool: int = 16,
    sam_cache: str = "",
    sam_amp: str = "step",
) -> Trainer:
    """A trainer of ``method`` on the phantom, or on the trained run ``run``'s data with its U-Net."""
    settings = {"sam.cache_dir": sam_cache, "sam.amp": sam_amp}
    cfg = make_config(method, size, batch, "cpu", amp, settings=settings)
    trainer = Trainer(cfg, make_data(cfg, pool=batch) if run is None else run_data(cfg, run, pool))
    if run is not None:
        _, model, _ = load_run_model(run, "best", "cpu")
        trainer.model.load_state_dict(model.state_dict())
    if method == "samatch":
        trainer.iteration = trainer.method.joint_start()  # past warm-up: the joint step
    return trainer


def add_run_arguments(parser: argparse.ArgumentParser, pool: int, required: bool) -> None:
    """``--run`` (a trained run folder), ``--pool`` and ``--sam-cache``: the arguments of trainer_for."""
    parser.add_argument(
        "--run",
        type=Path,
        default=None,
        required=required,
        help="a trained run folder (samatch train): its data and its U-Net (best.pt)"
        + ("" if required else " instead of the phantom"),
    )
    parser.add_argument(
        "--pool", type=int, default=pool, help="with --run: slices per labeled / unlabeled set"
    )
    parser.add_argument(
        "--sam-cache", default="", help="sam.cache_dir: keep the pool's SAM embeddings here (reused)"
    )


def run_size(parser: argparse.ArgumentParser, run: Path) -> int:
    """The slice size the run in ``run`` was trained at; a parser error when it is not a run folder."""
    if not (run / "config.json").is_file():
        parser.error(f"--run {run}: no config.json there (is it a run folder?)")
    return TrainConfig.load(run / "config.json").data.size


def decode_seconds(trainer: Trainer, batch: int, repeat: int) -> list[float]:
    """SAM decode of 2B images x (C-1) boxes, forward and backward (LoRA gradients), as in a joint step."""
    guide = trainer.method.guide
    k = trainer.cfg.model.num_classes - 1
    emb = torch.randn(2 * batch, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([20.0, 30.0, 150.0, 170.0]).expand(2 * batch, k, 4).contiguous()

    step_amp = {"dtype": torch.bfloat16, "enabled": trainer.cfg.schedule.amp == "bf16"}

    def once():  # in the step's autocast, then the decoder's own precision (sam.amp)
        with torch.autocast(CPU.type, **step_amp), guide.precision(CPU):
            logits = guide.sam.decode(emb, boxes)
        logits.float().square().mean().backward()

    once()
    times = [synced_seconds(once, CPU) for _ in range(repeat)]
    guide.sam.zero_grad(set_to_none=True)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--size", type=int, default=None, help="slice size (default 256; with --run the run's)"
    )
    parser.add_argument("--pairs", type=int, default=6, help="timed (UniMatch, joint) pairs")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each trainer first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--amp", default="fp32", help="fp32 or bf16")
    parser.add_argument(
        "--sam-amp",
        choices=("step", "fp32", "bf16"),
        default="step",
        help="sam.amp: SAM's decoder as the step (--amp), or in fp32 or bf16 whatever the step's",
    )
    parser.add_argument(
        "--decode",
        choices=("valid", "all"),
        default="valid",
        help="valid: decode only the prompts that exist (the CPU default); all: every prompt, as a GPU"
        " does and as real data nearly does (a class is present in 67-96%% of slices)",
    )
    add_run_arguments(parser, pool=16, required=False)
    parser.add_argument("--out", type=Path, default=Path("runs/step_ab.json"))
    allocator.add_allocator_argument(parser)
    args = parser.parse_args(argv)
    if args.run is not None:
        trained_size = run_size(parser, args.run)
        if args.size is not None and args.size != trained_size:
            parser.error(f"--size {args.size}: the run in {args.run} was trained at {trained_size}")
    allocator.relaunch(args.allocator, argv, parser)  # from the command line: start again on it
    if args.threads:
        torch.set_num_threads(args.threads)
    trainers = {
        m: trainer_for(
            m, args.size or 256, args.batch, args.amp, args.run, args.pool, args.sam_cache, args.sam_amp
        )
        for m in ("unimatch", "samatch")
    }
    size = trainers["samatch"].cfg.data.size
    trainers["samatch"].method.guide.skip_invalid = args.decode == "valid"
    for _ in range(args.warmup):
        for trainer in trainers.values():
            trainer.step()
    counter = PassCounter(trainers["samatch"].method.guide.sam)  # the prompts the joint steps decode
    pairs = []
    for i in range(args.pairs):
        uni, joint = (synced_seconds(trainers[m].step, CPU) for m in ("unimatch", "samatch"))
        pairs.append({"unimatch_s": uni, "joint_s": joint, "ratio": joint / uni})
        print(f"pair {i + 1}: UniMatch {uni:.2f} s, joint {joint:.2f} s, ratio {joint / uni:.2f}", flush=True)
    counter.remove()
    decode = decode_seconds(trainers["samatch"], args.batch, repeat=3)
    prompts = 2 * args.batch * (trainers["samatch"].cfg.model.num_classes - 1)
    ratios = sorted(p["ratio"] for p in pairs)
    summary = {
        "ratio_median": statistics.median(ratios),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "unimatch_s_median": statistics.median(p["unimatch_s"] for p in pairs),
        "joint_s_median": statistics.median(p["joint_s"] for p in pairs),
        "decode_fwd_bwd_s_median": statistics.median(decode),
        "prompts_decoded_per_step": counter.prompts / args.pairs,
        "prompts_per_step": prompts,
        "size": size,
        "data": "phantom"
        if args.run is None
        else f"{args.run} ({open_reader(trainers['samatch'].cfg.data).name})",
    }
    print(
        f"joint / UniMatch: median {summary['ratio_median']:.2f} (min {ratios[0]:.2f}, max {ratios[-1]:.2f})"
        f" over {len(pairs)} pairs; SAM decode forward + backward {summary['decode_fwd_bwd_s_median']:.2f} s;"
        f" prompts decoded per joint step {summary['prompts_decoded_per_step']:.1f} of {prompts}"
    )
    result = provenance("step_ab", __file__, args, argv) | {
        "pairs": pairs,
        "decode_fwd_bwd_s": decode,
        "summary": summary,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
