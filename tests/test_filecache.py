"""samatch.filecache: the caches' write-then-rename saving and its failures."""

from __future__ import annotations

import os
import time

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


def named(letter: str) -> str:
    """The set file name of key ``letter`` x 32 (a hex digit, so a name the caches give)."""
    return f"{letter * 32}.pt"


def files_with_mtimes(folder, **mtimes):
    """Set files ``named(letter)`` in ``folder`` with the given modification times (seconds)."""
    for letter, t in mtimes.items():
        path = folder / named(letter)
        torch.save(torch.zeros(1), path)
        os.utime(path, (t, t))


def test_prune_keeps_the_most_recently_modified_set_files(tmp_path):
    # Setup: five set files, a the oldest; a writer's temporary file, a note, and two older .pt
    # files not named as sets (a checkpoint; a key one digit short)
    files_with_mtimes(tmp_path, a=100, b=200, c=300, d=400, e=500)
    (tmp_path / "x.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("kept")
    for foreign in ("best.pt", f"{'0' * 31}.pt"):
        torch.save(torch.zeros(1), tmp_path / foreign)
        os.utime(tmp_path / foreign, (50, 50))

    # Execute
    removed = filecache.prune(tmp_path, 2)

    # Assert: a, b, c gone; d and e, and every file not named as a set, left
    assert sorted(p.name for p in removed) == [named("a"), named("b"), named("c")]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([named("d"), named("e"), "best.pt", f"{'0' * 31}.pt", "notes.txt", "x.tmp"])


def test_prune_spares_the_file_just_written_within_the_count(tmp_path):
    # Setup: the spared file is the oldest by time (written in the same clock tick as another)
    files_with_mtimes(tmp_path, a=100, b=200, c=300)

    # Execute: keep 2, sparing a
    filecache.prune(tmp_path, 2, spare=tmp_path / named("a"))

    # Assert: a and the newest other (c) left, 2 in all
    assert sorted(p.name for p in tmp_path.iterdir()) == [named("a"), named("c")]


def test_prune_keeps_sets_used_recently_beyond_the_count(tmp_path):
    # Setup: four set files used 2 h, 30 min, 1 min and 0 s ago
    now = time.time()
    files_with_mtimes(tmp_path, a=now - 7200, b=now - 1800, c=now - 60, d=now)

    # Execute: keep the newest one, and any used within the last hour
    removed = filecache.prune(tmp_path, 1, recent_s=3600)

    # Assert: only a (2 h) goes; b and c are beyond the count but recent
    assert [p.name for p in removed] == [named("a")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [named("b"), named("c"), named("d")]


def test_keep_set_prunes_no_set_used_within_keep_recent_s(tmp_path, monkeypatch):
    # Setup: room for one set by count; two sets used just now and one a day ago
    now = time.time()
    files_with_mtimes(tmp_path, a=now - 86400, b=now, c=now)
    monkeypatch.setattr(filecache, "KEEP_SETS", 1)

    # Execute: a new set kept
    assert filecache.keep_set(torch.ones(2), tmp_path / named("f"))

    # Assert: the day-old set goes; the recent ones stay with the new one (a simulation of many sites)
    assert sorted(p.name for p in tmp_path.iterdir()) == [named("b"), named("c"), named("f")]


def test_a_set_read_with_mark_used_outlives_older_ones(tmp_path, monkeypatch):
    # Setup: three sets, a the oldest; room for two
    files_with_mtimes(tmp_path, a=100, b=200, c=300)
    monkeypatch.setattr(filecache, "KEEP_SETS", 2)

    # Execute: b read without marking, a read and marked, then a new set (f) kept
    assert filecache.load_or_none(tmp_path / named("b")) is not None
    assert filecache.load_or_none(tmp_path / named("a"), mark_used=True) is not None
    assert (tmp_path / named("b")).stat().st_mtime == 200
    saved = filecache.keep_set(torch.ones(2), tmp_path / named("f"))

    # Assert: a marked now; the new set and a stay, b and c go
    assert saved and (tmp_path / named("a")).stat().st_mtime > 1e9
    assert sorted(p.name for p in tmp_path.iterdir()) == [named("a"), named("f")]
