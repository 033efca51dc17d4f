"""Frozen-encoder image embeddings kept on the site's disk, so each slice is encoded once per machine.

SAM's image encoder is the expensive part of SAM-Match on a CPU (LiteMedSAM: about 3 s per 256x256
slice on one core). With a frozen encoder (``sam.lora_targets = decoder``) an embedding depends only on
the image and the encoder weights, so :class:`EmbeddingStore` files it under a key made of both:

    <cache_dir>/<sha256(encoder weights, images)[:32]>.pt   (N, 256, 64, 64) float16

A federated site whose data is reopened by another worker process, a resumed run, or the next run on
the same data loads the file instead of encoding again. Embeddings are derived from the site's images
and never leave the site: the folder is site-local, like the data.
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

    def key(self, images: torch.Tensor) -> str:
        """images (N, 1, S, S) -> the file stem for their embeddings under this encoder."""
        h = hashlib.sha256(self._encoder_hash.encode())
        return tensor_digest([images.float()], h).hexdigest()[:32]

    def get_or_compute(
        self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Embeddings of ``images`` from the folder, or ``compute(images)`` written there first.

        A file that cannot be read (truncated, other shape) is recomputed and replaced.
        """
        path = self.folder / f"{self.key(images)}.pt"
        if path.is_file():
            try:
                emb = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(emb, torch.Tensor) and emb.shape[0] == images.shape[0]:
                    return emb
            except Exception:  # noqa: BLE001 - any unreadable file is simply recomputed
                pass
        emb = compute(images)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: concurrent workers of one site never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(emb.detach().cpu(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return emb
