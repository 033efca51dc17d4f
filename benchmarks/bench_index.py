"""Benchmark: index every ACDC training slice (``cases('train')``), no pixel data read.

Reports the best and median wall time over ``--repeat`` runs and the rise in peak RSS during the
first run (Linux ``ru_maxrss``, KiB; it only grows, so later runs would show ~0). Prints one line
and writes JSON to ``--out``. Asserts nothing about time: it is a measurement, not a test.

    python benchmarks/bench_index.py [--root ../shared/data/ACDC] [--repeat 5] [--out runs/bench_index.json]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.record import provenance, write_json  # noqa: E402
from samatch.io import open_dataset  # noqa: E402


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench(root: Path, repeat: int) -> dict:
    times = []
    rss_before = peak_rss_kib()
    n_cases = n_patients = 0
    for _ in range(repeat):
        start = time.perf_counter()
        refs = open_dataset(root, "acdc-h5").cases("train")
        times.append(time.perf_counter() - start)
        n_cases, n_patients = len(refs), len({r.patient_id for r in refs})
        if len(times) == 1:
            rss_delta = peak_rss_kib() - rss_before
    return {
        "root": str(root),
        "cases": n_cases,
        "patients": n_patients,
        "repeat": repeat,
        "seconds_best": min(times),
        "seconds_median": statistics.median(times),
        "peak_rss_delta_kib": rss_delta,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / ".." / "shared" / "data" / "ACDC")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_index.json"))
    args = parser.parse_args(argv)
    result = bench(args.root.resolve(), max(1, args.repeat))
    print(
        f"indexed {result['cases']} slices of {result['patients']} patients: "
        f"best {result['seconds_best'] * 1e3:.1f} ms, median {result['seconds_median'] * 1e3:.1f} ms, "
        f"peak RSS +{result['peak_rss_delta_kib']} KiB"
    )
    write_json(args.out, provenance("index_acdc_train_slices", __file__, args, argv) | result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
