"""samatch.filecache: the caches' write-then-rename saving and its failures."""

from __future__ import annotations

import pytest
import torch

from samatch import filecache


def test_keep_saves_through_a_rename(tmp_path):
    # Execute
    saved = filecache.keep({"x": torch.arange(3)}, tmp_path / "sub" / "a.pt")

    # Assert: the folder made, the file readable, no temporary file left
    assert saved and torch.equal(filecache.load_or_none(tmp_path / "sub" / "a.pt")["x"], torch.arange(3))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.pt"]


def test_keep_warns_and_leaves_nothing_when_the_disk_is_full(tmp_path, monkeypatch):
    # Setup: torch.save as it fails on a full disk (its writer raises RuntimeError, not OSError)
    def full_disk(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")

    monkeypatch.setattr(filecache.torch, "save", full_disk)

    # Execute
    with pytest.warns(RuntimeWarning, match=r"a\.pt: not kept \(.*unexpected pos"):
        saved = filecache.keep(torch.zeros(2), tmp_path / "a.pt")

    # Assert: not saved, and neither the file nor its temporary file is there
    assert not saved and not list(tmp_path.iterdir())
