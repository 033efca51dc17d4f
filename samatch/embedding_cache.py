"""Frozen-encoder image embeddings kept on the site's disk, so each slice is encoded once per machine.

SAM's image encoder is the expensive part of SAM-Match on a CPU (LiteMedSAM: about 3 s per 256x256
slice on one core). With a frozen encoder (``sam.lora_targets = decoder``) an embedding depends only on
the image and the encoder weights, so :class:`EmbeddingStore` files each slice's embedding under a
key made of both:

    <cache_dir>/<sha256(encoder weights, slice)[:32]>.pt   (256, 64, 64) float16
    <cache_dir>/sets/<sha256(the slices' keys)[:32]>.pt    (N, 256, 64, 64) float16, one per set

A federated site whose data is reopened by another worker process, a resumed run, the next run on
the same data, or another grouping of the same slices (a centralized run on pooled sites' data)
loads the files instead of encoding again; only slices never seen are encoded. A set asked for
before is read from its one ``sets/`` file, mapped rather than copied: a deployed site starts a
process for every message, and reading hundreds of slice files cost it about a second (at the price
of keeping each embedding twice on disk). ``sets/`` keeps its most recently used files
(:func:`samatch.filecache.keep_set`); the per-slice files, seconds each to encode again, are kept.
Embeddings are derived from the site's images and never leave the site: the folder is site-local,
like the data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from samatch.filecache import keep, load_or_none, set_or_prepare

__all__ = ["EmbeddingStore", "tensor_digest"]


def tensor_digest(tensors: list[torch.Tensor], h=None):
    """sha256 over the dtypes, shapes and bytes of ``tensors`` (in order)."""
    h = h or hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h


class EmbeddingStore:
    """A folder of cached embeddings for one encoder.

    Args:
        folder: where the files live (created on first write).
        encoder: the frozen encoder module; its weights are part of every key.
    """

    def __init__(self, folder: str | os.PathLike, encoder: torch.nn.Module):
        self.folder = Path(folder)
        state = encoder.state_dict()
        self._encoder_hash = tensor_digest([state[k] for k in sorted(state)]).hexdigest()

    def key(self, image: torch.Tensor) -> str:
        """One slice (1, S, S) -> the file stem of its embedding under this encoder."""
        h = hashlib.sha256(self._encoder_hash.encode())
        return tensor_digest([image.float()], h).hexdigest()[:32]

    def load_slice(self, key: str) -> torch.Tensor | None:
        """The kept embedding (...) of one slice's key, or None when it is missing or unreadable."""
        emb = load_or_none(self.folder / f"{key}.pt")
        return emb if isinstance(emb, torch.Tensor) and emb.dim() == 3 else None

    def get_or_compute(
        self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Embeddings (N, ...) of ``images`` (N, 1, S, S): the set's file when it has one, else read per
        slice from the folder and ``compute`` (called once, on the missing slices only) for the others;
        both are then saved. A file that cannot be read is recomputed and replaced."""
        keys = [self.key(img) for img in images]
        set_path = self.folder / "sets" / f"{hashlib.sha256(' '.join(keys).encode()).hexdigest()[:32]}.pt"

        def decode(kept) -> torch.Tensor | None:
            whole = isinstance(kept, torch.Tensor) and kept.dim() == 4 and kept.shape[0] == len(keys)
            return kept if whole else None

        def from_slices() -> torch.Tensor:
            out: list[torch.Tensor | None] = [self.load_slice(key) for key in keys]
            missing = [i for i, e in enumerate(out) if e is None]
            if missing:
                emb = compute(images[missing])
                for j, i in enumerate(missing):
                    out[i] = emb[j].cpu()
                    keep(out[i].clone(), self.folder / f"{keys[i]}.pt")
            return torch.stack(out)

        return set_or_prepare(set_path, decode, from_slices)
