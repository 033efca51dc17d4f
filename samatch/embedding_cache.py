"""Frozen-encoder image embeddings kept on the site's disk, so each slice is encoded once per machine.

SAM's image encoder is the expensive part of SAM-Match on a CPU (LiteMedSAM: about 3 s per 256x256
slice on one core). With a frozen encoder (``sam.lora_targets = decoder``) an embedding depends only on
the image and the encoder weights, so :class:`EmbeddingStore` files each slice's embedding under a
key made of both:

    <cache_dir>/<sha256(encoder weights, slice)[:32]>.pt   (256, 64, 64) float16

A federated site whose data is reopened by another worker process, a resumed run, the next run on
the same data, or another grouping of the same slices (a centralized run on pooled sites' data)
loads the files instead of encoding again; only slices never seen are encoded. Embeddings are
derived from the site's images and never leave the site: the folder is site-local, like the data.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

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

    def _load(self, path: Path) -> torch.Tensor | None:
        if not path.is_file():
            return None
        try:
            emb = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any unreadable file is simply recomputed
            return None
        return emb if isinstance(emb, torch.Tensor) and emb.dim() == 3 else None

    def _save(self, path: Path, emb: torch.Tensor) -> None:
        # Write-then-rename: concurrent workers of one site never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(emb.detach().cpu().clone(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def get_or_compute(
        self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Embeddings (N, ...) of ``images`` (N, 1, S, S): read per slice from the folder, and
        ``compute`` (called once, on the missing slices only) for the others, which are then saved.
        A file that cannot be read is recomputed and replaced."""
        paths = [self.folder / f"{self.key(img)}.pt" for img in images]
        out: list[torch.Tensor | None] = [self._load(p) for p in paths]
        missing = [i for i, e in enumerate(out) if e is None]
        if missing:
            emb = compute(images[missing])
            self.folder.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(missing):
                out[i] = emb[j].cpu()
                self._save(paths[i], out[i])
        return torch.stack(out)
