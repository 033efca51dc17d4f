"""Census: the operators one training step dispatches, by part of the step, as a GPU runs it.

On a fast GPU the SAM-Match step is bound by the host: every dispatched operator costs the host
Python and dispatcher time, and the kernels of this step are small, so the GPU waits (measured on an
H100: busy 29 of 97 ms, docs/performance.md). The count does not depend on the device, so this CPU
tool tells where a GPU step's host time goes, with the GPU's settings: largest-component's fixed
iteration count (the CPU stops at the fixed point) and every prompt decoded (the CPU skips invalid
ones); the optimizers run torch's fused kernels on both devices (``fused_optimizer``).

    python benchmarks/op_census.py [--size 64] [--batch 4] [--out runs/op_census.json]

Parts: the two-way transformer and the upscaling of SAM's mask decoder, SAM's prompt encoder, the
largest-component filter, the backward pass, the optimizers, and the rest (the U-Net's forward,
augmentation, losses, prompts). Operators are counted as torch dispatches them (views included).
"""

from __future__ import annotations

import argparse
import collections
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import samatch.methods.sam_guided as sam_guided  # noqa: E402
import samatch.models.sam as sam_module  # noqa: E402
from benchmarks.bench_step import make_config, make_data  # noqa: E402
from benchmarks.record import provenance, write_json  # noqa: E402
from samatch.engine import Trainer  # noqa: E402
from samatch.prompts import _largest_component  # noqa: E402


class PartCount(TorchDispatchMode):
    """Counts dispatched operators under the innermost open part (``self.part(name)``)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self._parts = ["rest"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self._parts[-1]] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def part(self, name: str):
        self._parts.append(name)
        try:
            yield
        finally:
            self._parts.pop()

    def wrap(self, fn, name: str):
        def counted(*args, **kwargs):
            with self.part(name):
                return fn(*args, **kwargs)

        return counted


def census(method: str, size: int, batch: int) -> dict:
    """Operators of one step of ``method`` (after one untimed step), by part; and the total."""
    cfg = make_config(method, size, batch, "cpu")
    trainer = Trainer(cfg, make_data(cfg, pool=batch))
    if method == "samatch":
        trainer.iteration = trainer.method.joint_start()
        trainer.method.guide.skip_invalid = False  # a GPU decodes every prompt
    trainer.step()
    counter = PartCount()
    fixed_lc = lambda masks, connectivity=8, max_iters=None: _largest_component(  # noqa: E731
        masks, connectivity, max_iters, stop_early=False
    )
    with ExitStack() as stack:
        patch = lambda target, name, fn: stack.enter_context(mock.patch.object(target, name, fn))  # noqa: E731
        patch(sam_module, "folded_two_way", counter.wrap(sam_module.folded_two_way, "SAM decoder: two-way"))
        patch(
            sam_module,
            "upscale_and_read",
            counter.wrap(sam_module.upscale_and_read, "SAM decoder: upscaling"),
        )
        patch(sam_guided, "largest_component", counter.wrap(fixed_lc, "largest component"))
        patch(torch.Tensor, "backward", counter.wrap(torch.Tensor.backward, "backward"))
        for opt in trainer.optimizers:
            patch(opt, "step", counter.wrap(opt.step, "optimizers"))
        guide = getattr(trainer.method, "guide", None)
        if guide is not None:
            encoder = guide.sam.prompt_encoder
            patch(encoder, "forward", counter.wrap(encoder.forward, "SAM prompt encoder"))
        with counter:
            trainer.step()
    return {
        "method": method,
        "total": sum(counter.counts.values()),
        "parts": dict(counter.counts.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=int, default=64, help="network input size (counts barely depend on it)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/op_census.json"))
    args = parser.parse_args(argv)
    rows = [census(m, args.size, args.batch) for m in ("unimatch", "samatch")]
    for r in rows:
        print(f"{r['method']}: {r['total']} operators per step")
        for part, n in r["parts"].items():
            print(f"  {part:<24} {n:6d}")
    write_json(
        args.out,
        provenance("op_census", __file__, args, argv)
        | {"size": args.size, "batch": args.batch, "steps": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
