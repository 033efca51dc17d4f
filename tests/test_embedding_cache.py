"""EmbeddingStore: one encoding per (encoder weights, slice); reused across instances (processes)
and across groupings of the same slices."""

from __future__ import annotations

import pytest
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


def images_with_means(*means: float) -> torch.Tensor:
    return torch.stack([torch.full((1, 4, 4), m) for m in means])


def test_second_store_loads_instead_of_encoding(tmp_path):
    # Prepare: images with means 0.25 and 0.75 -> embeddings (0.5, -0.5) and (1.5, -1.5) at w = 2
    images = images_with_means(0.25, 0.75)
    first, second = CountingEncoder(), CountingEncoder()

    # Execute
    a = EmbeddingStore(tmp_path, first).get_or_compute(images, first)
    b = EmbeddingStore(tmp_path, second).get_or_compute(images, second)

    # Assert: one file per slice, holding that slice only
    assert first.seen == 2 and second.seen == 0
    assert b.dtype == torch.float16 and b[:, :, 0, 0].tolist() == [[0.5, -0.5], [1.5, -1.5]]
    assert torch.equal(a, b)
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 2 and not list(tmp_path.glob("*.tmp"))
    assert all(torch.load(f, weights_only=True).shape == (2, 1, 1) for f in files)


def test_another_grouping_encodes_only_new_slices(tmp_path):
    # Prepare: two sites' slices cached; then their pooled set plus one new slice, in another order
    enc = CountingEncoder()
    store = EmbeddingStore(tmp_path, enc)
    store.get_or_compute(images_with_means(0.25), enc)
    store.get_or_compute(images_with_means(0.5), enc)

    # Execute
    pooled = store.get_or_compute(images_with_means(0.5, 1.0, 0.25), enc)

    # Assert: only the 1.0 slice was encoded; rows follow the requested order
    assert enc.seen == 3
    assert pooled[:, 0, 0, 0].tolist() == [1.0, 2.0, 0.5]


def test_key_depends_on_images_and_encoder_weights(tmp_path):
    image = torch.zeros(1, 4, 4)
    store = EmbeddingStore(tmp_path, CountingEncoder(2.0))
    assert store.key(image) == EmbeddingStore(tmp_path, CountingEncoder(2.0)).key(image.clone())
    assert store.key(image) != store.key(image + 1e-3)
    assert store.key(image) != EmbeddingStore(tmp_path, CountingEncoder(3.0)).key(image)


def test_unreadable_file_is_recomputed_and_replaced(tmp_path):
    # Prepare: a truncated file where the slice's embedding should be
    images = images_with_means(0.5)
    enc = CountingEncoder()
    store = EmbeddingStore(tmp_path, enc)
    path = tmp_path / f"{store.key(images[0])}.pt"
    path.write_bytes(b"not a tensor")

    # Execute
    emb = store.get_or_compute(images, enc)

    # Assert
    assert enc.seen == 1 and emb[0, :, 0, 0].tolist() == [1.0, -1.0]
    assert torch.equal(torch.load(path, weights_only=True), emb[0])


def test_a_set_asked_for_before_is_read_from_its_one_file(tmp_path):
    # Prepare: a set cached, then its per-slice files removed
    images = images_with_means(0.25, 0.75, 0.5)
    first, second = CountingEncoder(), CountingEncoder()
    a = EmbeddingStore(tmp_path, first).get_or_compute(images, first)
    for f in tmp_path.glob("*.pt"):
        f.unlink()

    # Execute: the same set, then a subset of it (another set)
    b = EmbeddingStore(tmp_path, second).get_or_compute(images, second)
    part = EmbeddingStore(tmp_path, second).get_or_compute(images[:2], second)

    # Assert: the set from its file, nothing encoded; the subset had no file of its own, so it was encoded
    assert second.seen == 2 and torch.equal(b, a) and b.dtype == torch.float16
    assert b[:, 0, 0, 0].tolist() == [0.5, 1.5, 1.0] and torch.equal(part, a[:2])
    assert len(list((tmp_path / "sets").glob("*.pt"))) == 2


def test_an_unreadable_set_file_is_made_again_from_the_slices(tmp_path):
    # Prepare: the set's file cut short
    images = images_with_means(0.25, 0.75)
    enc = CountingEncoder()
    a = EmbeddingStore(tmp_path, enc).get_or_compute(images, enc)
    (set_file,) = (tmp_path / "sets").glob("*.pt")
    set_file.write_bytes(set_file.read_bytes()[:50])

    # Execute
    b = EmbeddingStore(tmp_path, enc).get_or_compute(images, enc)

    # Assert: read from the slice files (no encoding), and the set's file written again
    assert enc.seen == 2 and torch.equal(b, a)
    assert torch.equal(torch.load(set_file, weights_only=True), a)


def test_a_folder_that_cannot_take_the_files_only_warns(tmp_path):
    # Prepare: the store's folder would be inside a regular file
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    enc = CountingEncoder()

    # Execute
    with pytest.warns(RuntimeWarning, match="not kept"):
        emb = EmbeddingStore(blocker / "emb", enc).get_or_compute(images_with_means(0.25, 0.75), enc)

    # Assert: encoded and returned all the same
    assert enc.seen == 2 and emb[:, 0, 0, 0].tolist() == [0.5, 1.5]


def test_set_files_are_pruned_and_slice_files_kept(tmp_path, monkeypatch):
    # Prepare: room for one set file
    from samatch import filecache

    monkeypatch.setattr(filecache, "KEEP_SETS", 1)
    monkeypatch.setattr(filecache, "KEEP_RECENT_S", 0.0)  # by count alone
    encoder = CountingEncoder()
    store = EmbeddingStore(tmp_path, encoder)

    # Execute: two groupings of two slices (three slices in all), then the first again
    store.get_or_compute(images_with_means(0.1, 0.2), encoder)
    store.get_or_compute(images_with_means(0.2, 0.3), encoder)
    again = store.get_or_compute(images_with_means(0.1, 0.2), encoder)

    # Assert: one set file left (the last asked for), every slice file kept, no slice encoded twice
    assert len(list((tmp_path / "sets").glob("*.pt"))) == 1
    assert len(list(tmp_path.glob("*.pt"))) == 3 and encoder.seen == 3
    assert torch.allclose(again[:, 0, 0, 0].float(), torch.tensor([0.2, 0.4]), atol=1e-3)
