"""Benchmark: what Python's garbage collector costs a ClientApp forked from the warm server.

``deploy supernode --warm`` forks every message's ClientApp from a server that has imported torch,
flwr, peft and transformers once (:mod:`deploy.warm`). Those imports leave about half a million
objects the collector tracks. A full collection in a child walks all of them and writes to each
one's header, so the kernel copies the pages it touches; a child runs one whenever the objects that
outlived its younger collections exceed a quarter of the long-lived ones. The server now collects and
freezes its heap before forking (:func:`deploy.warm.freeze_heap`, ``gc.freeze``): frozen objects are
left out of every collection.

Each trial is a fresh process that warms up as the server does (:func:`deploy.warm.warm_up` and
Flower's ``flwr-clientapp`` modules), prepares its heap in one of three settings, in turns:

* ``imported``: as the imports left it (the server before it froze its heap);
* ``collected``: after a full collection (``gc.collect``) only;
* ``frozen``: collected and frozen (what the server does now);

then forks a child that builds LiteMedSAM with LoRA on its mask decoder, as a SAM-Match site's
session does, and then runs one full collection. Per child: seconds of the build and of the
collector within it (``gc.callbacks``), collections, seconds of the full collection, and the objects
the child inherited frozen.

    python benchmarks/fork_gc.py [--repeat 2] [--out runs/fork_gc.json]

Asserts nothing about time. Linux (fork) only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.record import provenance, write_json  # noqa: E402
from deploy import warm  # noqa: E402


def child_build() -> dict:
    """In a forked child: build SAM with LoRA as a SAM-Match session does, timing the collector."""
    frozen = gc.get_freeze_count()  # what this child inherited frozen
    spent, started = [0.0, 0], [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - started[0]
            spent[1] += 1

    t0 = time.perf_counter()  # every collection from here on falls within build_s
    gc.callbacks.append(on_gc)
    import torch

    torch.set_num_threads(1)  # as bench_round's deployed ClientApps (deploy supernode --threads 1)
    from samatch.models.lora import LoraSettings, add_lora  # the project's modules come afresh, as in a child
    from samatch.models.sam import build_sam

    sam = add_lora(build_sam("litemedsam"), LoraSettings(rank=8, alpha=16.0, targets="decoder"))
    build = time.perf_counter() - t0
    gc.callbacks.remove(on_gc)
    t0 = time.perf_counter()
    gc.collect()  # one full collection, as a child runs whenever enough of its objects outlive younger ones
    full = time.perf_counter() - t0
    del sam
    return {
        "build_s": build,
        "gc_s": spent[0],
        "collections": spent[1],
        "full_collection_s": full,
        "frozen": frozen,
    }


SETTINGS = ("imported", "collected", "frozen")


def trial(setting: str) -> dict:
    """In this (fresh) process: warm up as the server does, prepare the heap as ``setting`` says, fork
    one child and return what it measured, with the objects the collector tracked before forking."""
    warmed = warm.warm_up()
    warm._entry(warm.ENTRY)  # Flower's flwr-clientapp modules, as the server imports them
    if setting != "imported":
        gc.collect()
    tracked = len(gc.get_objects())  # before freezing: a frozen object is no longer listed
    if setting == "frozen":
        warm.freeze_heap()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            os.write(write, json.dumps(child_build()).encode())
            code = 0
        except BaseException:  # noqa: BLE001  (say why, then exit: a child never returns)
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        raise RuntimeError(f"the forked child failed with exit code {code} (its traceback is above)")
    return {"setting": setting, "warm_up_s": warmed, "objects_tracked": tracked, **json.loads(data)}


def run_trial(setting: str) -> dict:
    """One :func:`trial` in a fresh Python (a heap once collected cannot be un-collected), in its own
    process group, so a trial that times out is stopped with the child it forked."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--trial", setting],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"trial {setting} failed: {err[-2000:]}")
    return json.loads(out.splitlines()[-1])


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=positive, default=2, help="trials per setting, in turns")
    parser.add_argument("--out", type=Path, default=Path("runs/fork_gc.json"))
    parser.add_argument("--trial", choices=SETTINGS, help=argparse.SUPPRESS)  # one trial, JSON to stdout
    args = parser.parse_args(argv)
    if not hasattr(os, "fork"):
        raise SystemExit("fork_gc.py needs fork (Linux)")
    if args.trial:
        print(json.dumps(trial(args.trial)))
        return 0
    t0 = time.perf_counter()
    children = []
    for _ in range(args.repeat):
        for setting in SETTINGS:
            children.append(run_trial(setting))
            c = children[-1]
            print(
                f"{setting:>9}: building SAM with LoRA {c['build_s']:.3f} s, of which the collector "
                f"{c['gc_s']:.3f} s in {c['collections']} collections; then a full collection "
                f"{c['full_collection_s']:.3f} s ({c['objects_tracked']:,} objects tracked, "
                f"{c['frozen']:,} frozen)",
                flush=True,
            )
    summary = {
        setting: {
            k: statistics.median(c[k] for c in children if c["setting"] == setting)
            for k in ("build_s", "gc_s", "collections", "full_collection_s")
        }
        for setting in SETTINGS
    }
    result = provenance("fork_gc", __file__, args, argv) | {
        "children": children,
        "summary": summary,
        "seconds_total": time.perf_counter() - t0,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
