"""EmbeddingStore: one encoding per (encoder weights, images); reused across instances (processes)."""

from __future__ import annotations

import torch

from samatch.embedding_cache import EmbeddingStore


class CountingEncoder(torch.nn.Module):
    """(N,1,S,S) -> (N,2,1,1): per-image mean times a weight; counts the images it encodes."""

    def __init__(self, w: float = 2.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        m = x.mean((1, 2, 3)) * self.w
        return torch.stack([m, -m], 1)[..., None, None].half()


def test_second_store_loads_instead_of_encoding(tmp_path):
    # Prepare: images with means 0.25 and 0.75 -> embeddings (0.5, -0.5) and (1.5, -1.5) at w = 2
    images = torch.stack([torch.full((1, 4, 4), 0.25), torch.full((1, 4, 4), 0.75)])
    first, second = CountingEncoder(), CountingEncoder()

    # Execute
    a = EmbeddingStore(tmp_path, first).get_or_compute(images, first)
    b = EmbeddingStore(tmp_path, second).get_or_compute(images, second)

    # Assert
    assert first.seen == 2 and second.seen == 0
    assert b.dtype == torch.float16 and b[:, :, 0, 0].tolist() == [[0.5, -0.5], [1.5, -1.5]]
    assert torch.equal(a, b)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob("*.tmp"))


def test_key_depends_on_images_and_encoder_weights(tmp_path):
    images = torch.zeros(2, 1, 4, 4)
    store = EmbeddingStore(tmp_path, CountingEncoder(2.0))
    assert store.key(images) == EmbeddingStore(tmp_path, CountingEncoder(2.0)).key(images.clone())
    assert store.key(images) != store.key(images + 1e-3)
    assert store.key(images) != EmbeddingStore(tmp_path, CountingEncoder(3.0)).key(images)


def test_unreadable_file_is_recomputed_and_replaced(tmp_path):
    # Prepare: a truncated file where the embeddings should be
    images = torch.full((1, 1, 4, 4), 0.5)
    enc = CountingEncoder()
    store = EmbeddingStore(tmp_path, enc)
    path = tmp_path / f"{store.key(images)}.pt"
    path.write_bytes(b"not a tensor")

    # Execute
    emb = store.get_or_compute(images, enc)

    # Assert
    assert enc.seen == 1 and emb[0, :, 0, 0].tolist() == [1.0, -1.0]
    assert torch.equal(torch.load(path, weights_only=True), emb)
