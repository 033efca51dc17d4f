"""Benchmark: what a deployed site spends on its slices and SAM embeddings in every message's process.

A deployment runs each message in a new (forked) process, which builds the site's session again
(``federation.local``): it reads, normalises and resizes every training case (``samatch.data``) and,
for SAM-Match, reads every slice's cached embedding (``samatch.embedding_cache``). The phantom sites
of ``bench_round.py`` are too small to show this; here it is timed on a real dataset:

* **slices:** ``build_train_data`` without ``data.cache_dir``, then with it: the first build (prepares
  the sets and writes them) and the later ones (map the kept files), with the validation volumes read
  and as a site's session builds it (``lazy_val``: read by the first evaluation, never in a train
  message);
* **embeddings,** for the same slices: their keys (a hash of each slice), then the per-slice files
  read and stacked (all there was before the set files), and the set's one file mapped. A stand-in
  encoder writes zeros of LiteMedSAM's embedding shape, (256, 64, 64) float16: reading does not depend
  on the values, and LiteMedSAM takes seconds per slice on a CPU.

The caches live in a temporary folder, removed at the end (about 4 MB per slice). The files are in
the page cache when read, as on a site that sends a message every few seconds.

    python benchmarks/site_cache.py --root ../shared/data/ACDC --format acdc-h5 [--labeled 3]
        [--unlabeled 420] [--size 256] [--repeat 3] [--out runs/site_cache.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks.record import provenance, write_json  # noqa: E402
from samatch.config import TrainConfig, apply_overrides  # noqa: E402
from samatch.data import build_train_data  # noqa: E402
from samatch.embedding_cache import EmbeddingStore  # noqa: E402

EMBEDDING = (256, 64, 64)  # LiteMedSAM's image embedding per slice


def seconds(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_s(fn, repeat: int) -> tuple[float, list[float]]:
    times = [seconds(fn)[0] for _ in range(repeat)]
    return statistics.median(times), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="dataset folder (read in place)")
    parser.add_argument("--format", default="", help="data.format (empty: detected)")
    parser.add_argument("--labeled", type=int, default=3, help="labeled budget (data.labeled)")
    parser.add_argument("--unlabeled", type=int, default=420, help="unlabeled slices (data.max_unlabeled)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/site_cache.json"))
    args = parser.parse_args(argv)
    base = {
        "data.root": args.root,
        "data.format": args.format,
        "data.labeled": args.labeled,
        "data.max_unlabeled": args.unlabeled,
        "data.size": args.size,
    }
    with tempfile.TemporaryDirectory(prefix="site_cache_") as tmp:
        plain_cfg = apply_overrides(TrainConfig(), base)
        cached_cfg = apply_overrides(TrainConfig(), base | {"data.cache_dir": str(Path(tmp) / "slices")})
        plain_s, plain_times = median_s(lambda: build_train_data(plain_cfg), args.repeat)
        first_s, data = seconds(lambda: build_train_data(cached_cfg))
        kept_s, kept_times = median_s(lambda: build_train_data(cached_cfg), args.repeat)
        # As a site's session builds it: the validation volumes wait for the first evaluation.
        lazy_s, lazy_times = median_s(lambda: build_train_data(cached_cfg, lazy_val=True), args.repeat)
        n = {"labeled": len(data.labeled), "unlabeled": len(data.unlabeled) if data.unlabeled else 0}
        print(
            f"slices ({n['labeled']} labeled, {n['unlabeled']} unlabeled, {args.size} px): read and prepared"
            f" {plain_s:.2f} s; with data.cache_dir first {first_s:.2f} s, then {kept_s:.3f} s;"
            f" validation volumes read on first use (a site session) {lazy_s:.3f} s"
        )

        images = torch.cat([s.images for s in (data.labeled, data.unlabeled) if s is not None])
        store = EmbeddingStore(Path(tmp) / "emb", torch.nn.Linear(2, 2))
        write_s, _ = seconds(
            lambda: store.get_or_compute(
                images, lambda x: torch.zeros(len(x), *EMBEDDING, dtype=torch.float16)
            )
        )
        keys_s, keys_times = median_s(lambda: [store.key(img) for img in images], args.repeat)
        keys = [store.key(img) for img in images]
        per_slice_s, per_slice_times = median_s(
            lambda: torch.stack([store.load_slice(k) for k in keys]), args.repeat
        )
        set_s, set_times = median_s(lambda: store.get_or_compute(images, None), args.repeat)
        print(
            f"embeddings of {len(images)} slices ({images.shape[0] * 2 * 256 * 64 * 64 / 1e6:.0f} MB):"
            f" keys {keys_s:.3f} s; per-slice files read and stacked {per_slice_s:.2f} s;"
            f" the set's file, keys included {set_s:.3f} s"
        )

    result = provenance("site_cache", __file__, args, argv) | {
        "cache_folder": tmp,  # removed
        "slices": n,
        "data_s": {
            "no_cache": plain_times,
            "cache_first": first_s,
            "cache_kept": kept_times,
            "cache_kept_lazy_validation": lazy_times,
        },
        "embeddings_s": {
            "first_write": write_s,
            "keys": keys_times,
            "per_slice_files": per_slice_times,
            "set_file_with_keys": set_times,
        },
        "summary": {
            "data_no_cache_s": plain_s,
            "data_cache_kept_s": kept_s,
            "data_cache_kept_lazy_validation_s": lazy_s,
            "embedding_keys_s": keys_s,
            "embedding_per_slice_s": per_slice_s,
            "embedding_set_file_s": set_s,
        },
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
