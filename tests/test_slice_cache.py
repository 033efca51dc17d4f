"""data.cache_dir: prepared slice sets kept in a site-local folder (samatch.data.load_slices_cached)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_slice, write_h5

from samatch.config import TrainConfig, apply_overrides
from samatch.data import (
    LazyVolumes,
    build_train_data,
    load_slices,
    load_slices_cached,
    load_volumes,
    load_volumes_cached,
    slices_key,
)
from samatch.io import open_dataset


def counted(refs):
    """The refs with a loader that counts its calls: (refs, calls list)."""
    calls = []

    def wrap(ref):
        def load(r):
            calls.append(r.case_id)
            return ref.loader(r)

        return dataclasses.replace(ref, loader=load)

    return [wrap(r) for r in refs], calls


def train_refs(root):
    return [r for r in open_dataset(root, "acdc-h5").cases(None) if r.split == "train"]


def assert_same(a, b):
    assert torch.equal(a.images, b.images) and a.images.dtype == b.images.dtype
    assert (a.labels is None and b.labels is None) or torch.equal(a.labels, b.labels)
    assert a.patient_ids == b.patient_ids


def assert_same_cases(a, b):
    """The same volumes: pixels, labels and every field of their metadata."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.image.dtype == y.image.dtype and np.array_equal(x.image, y.image)
        assert x.label.dtype == y.label.dtype and np.array_equal(x.label, y.label)
        assert x.meta == y.meta and x.meta.extra == y.meta.extra  # == leaves out affine and extra
        assert (x.meta.affine is None and y.meta.affine is None) or np.array_equal(
            x.meta.affine, y.meta.affine
        )


def test_second_load_reads_the_kept_file_not_the_cases(tiny_acdc_h5, tmp_path):
    # Setup
    refs, calls = counted(train_refs(tiny_acdc_h5))
    cache = tmp_path / "slices"

    # Execute: twice with labels, once without (another set: another file)
    first = load_slices_cached(refs, 32, True, "labeled", cache)
    loads_first = len(calls)
    second = load_slices_cached(refs, 32, True, "labeled", cache)
    unlabeled = load_slices_cached(refs, 32, False, "unlabeled", cache)

    # Assert: 5 cases read once for the labeled set, none the second time, the same slices as without a cache
    assert loads_first == 5 and len(calls) == 10
    assert_same(first, load_slices(refs, 32, True))
    assert_same(second, first)
    assert unlabeled.labels is None and torch.equal(unlabeled.images, first.images)
    assert len(list(cache.glob("sets/*.pt"))) == 2 and not list(cache.glob("*.tmp"))


def test_another_reading_of_the_same_files_is_kept_apart(tiny_acdc_h5, tmp_path):
    # Setup: the same cases read twice with different reader settings (e.g. another label map)
    refs, calls = counted(train_refs(tiny_acdc_h5))
    cache = tmp_path / "slices"

    # Execute: two reader settings, then another size
    load_slices_cached(refs, 32, True, "labeled", cache, reading='["acdc-h5", ""]')
    load_slices_cached(refs, 32, True, "labeled", cache, reading='["acdc-h5", "3=1"]')
    other_size = load_slices_cached(refs, 48, True, "labeled", cache, reading='["acdc-h5", ""]')

    # Assert: each prepared from the cases, three files
    assert len(calls) == 15 and len(list(cache.glob("sets/*.pt"))) == 3
    assert other_size.images.shape[-1] == 48


def test_a_changed_case_file_is_prepared_again(tiny_acdc_h5, tmp_path):
    # Setup: one set kept, then one slice's file rewritten with other pixels
    refs, calls = counted(train_refs(tiny_acdc_h5))
    cache = tmp_path / "slices"
    before = load_slices_cached(refs, 32, True, "labeled", cache)
    changed = Path(refs[0].paths[0])
    image, label = tiny_slice(42)
    write_h5(changed, np.concatenate([image, image]), np.concatenate([label, label]))  # (12, 5): other size
    calls.clear()

    # Execute
    after = load_slices_cached(refs, 32, True, "labeled", cache)

    # Assert: every case read again (one key for the set), the new pixels, a second file
    assert len(calls) == 5
    assert not torch.equal(after.images, before.images)
    assert_same(after, load_slices(refs, 32, True))
    assert len(list(cache.glob("sets/*.pt"))) == 2


def test_same_size_rewrite_changes_the_key_through_its_modification_time(tiny_acdc_h5, tmp_path):
    # Setup: a rewrite of the same size, its modification time moved on
    refs, calls = counted(train_refs(tiny_acdc_h5))
    cache = tmp_path / "slices"
    load_slices_cached(refs, 32, True, "labeled", cache)
    path = Path(refs[1].paths[0])
    size = os.path.getsize(path)
    write_h5(path, *tiny_slice(7))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls.clear()

    # Execute
    after = load_slices_cached(refs, 32, True, "labeled", cache)

    # Assert
    assert os.path.getsize(path) == size and len(calls) == 5
    assert_same(after, load_slices(refs, 32, True))


def test_an_unreadable_kept_file_is_prepared_and_replaced(tiny_acdc_h5, tmp_path):
    # Setup: the kept file cut short
    refs, calls = counted(train_refs(tiny_acdc_h5))
    cache = tmp_path / "slices"
    first = load_slices_cached(refs, 32, True, "labeled", cache)
    (kept,) = cache.glob("sets/*.pt")
    kept.write_bytes(kept.read_bytes()[:100])
    calls.clear()

    # Execute: prepared again, then read from the replaced file
    again = load_slices_cached(refs, 32, True, "labeled", cache)
    loads_again = len(calls)
    third = load_slices_cached(refs, 32, True, "labeled", cache)

    # Assert
    assert loads_again == 5 and len(calls) == 5
    assert_same(again, first)
    assert_same(third, first)


def test_build_train_data_with_a_cache_dir_gives_the_same_sets(acdc_root, tmp_path):
    # Setup: real ACDC, 1 labeled patient and 12 unlabeled slices at 64 px
    base = {"data.format": "acdc-h5", "data.root": str(acdc_root), "data.labeled": 1}
    base |= {"data.size": 64, "data.max_unlabeled": 12, "data.max_val_cases": 1, "model.num_classes": 4}
    plain = build_train_data(apply_overrides(TrainConfig(), base))
    cached_cfg = apply_overrides(TrainConfig(), base | {"data.cache_dir": str(tmp_path / "slices")})

    # Execute: the first build writes the two sets and the validation volumes, the second reads them
    build_train_data(cached_cfg)
    cached = build_train_data(cached_cfg)

    # Assert
    assert len(list((tmp_path / "slices").glob("sets/*.pt"))) == 3
    assert_same(cached.labeled, plain.labeled)
    assert_same(cached.unlabeled, plain.unlabeled)
    assert len(cached.unlabeled) == 12 and cached.num_classes == 4
    assert_same_cases(cached.val, plain.val)


def test_a_folder_that_cannot_take_the_file_is_skipped_with_a_warning(tiny_acdc_h5, tmp_path):
    # Setup: the cache folder would be inside a regular file (as root, permissions would not stop it)
    refs, calls = counted(train_refs(tiny_acdc_h5))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")

    # Execute
    with pytest.warns(RuntimeWarning, match="not-a-folder.*not kept"):
        slices = load_slices_cached(refs, 32, True, "labeled", blocker / "slices")

    # Assert: the slices all the same, read from the cases
    assert len(calls) == 5
    assert_same(slices, load_slices(refs, 32, True))


def test_the_key_is_the_same_in_another_process(tiny_acdc_h5):
    # Setup: the key computed here, then by a fresh interpreter (another hash seed)
    code = (
        "from samatch.data import slices_key; from samatch.io import open_dataset;"
        f"cases = open_dataset({str(tiny_acdc_h5)!r}, 'acdc-h5').cases(None);"
        "print(slices_key([r for r in cases if r.split == 'train'], 32, True, 'x'))"
    )
    env = os.environ | {"PYTHONHASHSEED": "123"}

    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)

    # Assert
    assert out.stdout.strip() == slices_key(train_refs(tiny_acdc_h5), 32, True, "x")


def test_kept_sets_are_mapped_from_their_file(tiny_acdc_h5, tmp_path):
    # Setup
    refs = train_refs(tiny_acdc_h5)
    load_slices_cached(refs, 32, True, "labeled", tmp_path)
    (kept,) = tmp_path.glob("sets/*.pt")

    # Execute
    slices = load_slices_cached(refs, 32, True, "labeled", tmp_path)

    # Assert: the file is mapped into this process while its tensors live
    assert str(kept) in Path("/proc/self/maps").read_text()
    assert len(slices) == 5


def test_a_missing_case_file_fails_as_without_a_cache(tiny_acdc_h5, tmp_path):
    # Setup: one slice's file gone
    refs = train_refs(tiny_acdc_h5)
    Path(refs[2].paths[0]).unlink()
    with pytest.raises(Exception) as plain:
        load_slices(refs, 32, True)

    # Execute / Assert: the reader's own error, not one from the cache's key
    with pytest.raises(type(plain.value), match=re.escape(str(plain.value))):
        load_slices_cached(refs, 32, True, "labeled", tmp_path)


def test_build_train_data_keys_on_the_label_map_and_skips_phantoms(tiny_acdc_h5, tmp_path):
    # Setup: the tiny ACDC folder as is and with the LV mapped to class 1 only; then a phantom site
    base = {"data.format": "acdc-h5", "data.root": str(tiny_acdc_h5), "data.labeled": 1, "data.size": 32}
    base |= {"data.cache_dir": str(tmp_path / "slices")}
    as_is = build_train_data(apply_overrides(TrainConfig(), base))
    lv_only = build_train_data(apply_overrides(TrainConfig(), base | {"data.label_map": "3=1"}))
    phantom = {"data.format": "phantom-cardiac", "data.root": "0", "data.size": 32}
    build_train_data(apply_overrides(TrainConfig(), phantom | {"data.cache_dir": str(tmp_path / "ph")}))

    # Assert: two sets and the validation volumes per label map, the LV-only labels in {0, 1};
    # nothing kept for the phantom
    assert len(list((tmp_path / "slices").glob("sets/*.pt"))) == 6
    assert set(np.unique(lv_only.val[0].label).tolist()) == {0, 1}
    assert set(as_is.labeled.labels.unique().tolist()) == {0, 1, 2, 3}
    assert set(lv_only.labeled.labels.unique().tolist()) == {0, 1}
    assert not (tmp_path / "ph").exists()


def test_lazy_volumes_read_each_case_once_on_first_use(tiny_acdc_h5):
    # Setup: the validation cases of the tiny dataset, counted
    refs, calls = counted([r for r in open_dataset(tiny_acdc_h5, "acdc-h5").cases(None) if r.split == "val"])
    lazy = LazyVolumes(refs)

    # Execute / Assert: length and truth read nothing; the first item reads every case, once
    assert len(lazy) == len(refs) > 0 and lazy and calls == []
    first = lazy[0]
    assert sorted(calls) == sorted(r.case_id for r in refs)
    cases = list(lazy)
    assert len(calls) == len(refs) and cases[0] is first
    eager = load_volumes(refs)
    assert [c.meta.case_id for c in cases] == [c.meta.case_id for c in eager]
    assert all(
        np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        for a, b in zip(cases, eager, strict=True)
    )


def test_lazy_volumes_report_a_case_without_a_label_on_first_use(tiny_acdc_h5):
    # Setup: one validation case whose loader drops the label
    ref = next(r for r in open_dataset(tiny_acdc_h5, "acdc-h5").cases(None) if r.split == "val")
    unlabeled = dataclasses.replace(ref, loader=lambda r: dataclasses.replace(ref.loader(r), label=None))
    lazy = LazyVolumes([unlabeled])

    # Execute / Assert: nothing is read until used; then the one-line error names the file
    assert len(lazy) == 1
    with pytest.raises(ValueError, match=rf"^{re.escape(ref.paths[0])}: evaluation case has no label$"):
        lazy[0]


def test_sets_are_pruned_in_their_own_folder_and_nothing_else(tiny_acdc_h5, tmp_path, monkeypatch):
    # Setup: room for one set; the cache folder is shared with a checkpoint and per-slice embeddings
    from samatch import filecache

    monkeypatch.setattr(filecache, "KEEP_SETS", 1)
    monkeypatch.setattr(filecache, "KEEP_RECENT_S", 0.0)  # by count alone
    refs = train_refs(tiny_acdc_h5)
    others = [tmp_path / "best.pt", tmp_path / f"{'ab' * 16}.pt"]
    for path in others:
        torch.save(torch.zeros(1), path)

    # Execute: two sets
    load_slices_cached(refs, 32, True, "labeled", tmp_path)
    load_slices_cached(refs, 16, True, "labeled", tmp_path)

    # Assert: one set left in sets/, the other files untouched
    assert len(list(tmp_path.glob("sets/*.pt"))) == 1 and all(p.exists() for p in others)


def test_the_folder_keeps_the_most_recently_used_sets(tiny_acdc_h5, tmp_path, monkeypatch):
    # Setup: room for two sets; sets at 32 px and 16 px written, the 32 px one older by time
    from samatch import filecache

    monkeypatch.setattr(filecache, "KEEP_SETS", 2)
    refs = train_refs(tiny_acdc_h5)
    cache = tmp_path / "slices"
    load_slices_cached(refs, 32, True, "labeled", cache)
    (at32,) = cache.glob("sets/*.pt")
    os.utime(at32, (100, 100))
    load_slices_cached(refs, 16, True, "labeled", cache)
    (at16,) = set(cache.glob("sets/*.pt")) - {at32}
    os.utime(at16, (200, 200))

    # Execute: the 32 px set used again (read, not prepared), then a third set prepared
    refs_counted, calls = counted(refs)
    load_slices_cached(refs_counted, 32, True, "labeled", cache)
    load_slices_cached(refs, 24, True, "labeled", cache)

    # Assert: the 32 px set was read from its file; the 16 px set, the least recently used, is gone
    assert calls == []
    assert at32.exists() and not at16.exists() and len(list(cache.glob("sets/*.pt"))) == 2


@pytest.mark.parametrize("fixture", ["tiny_acdc_h5", "tiny_chaos"])
def test_validation_volumes_are_kept_with_their_metadata(fixture, request, tmp_path):
    # Setup: ACDC h5 (no spacing, a note in extra) and CHAOS NIfTI (spacing, affine, label file)
    root = request.getfixturevalue(fixture)
    fmt = "acdc-h5" if fixture == "tiny_acdc_h5" else "nifti"
    refs, calls = counted(list(open_dataset(root, fmt).cases(None)))

    # Execute: twice
    first = load_volumes_cached(refs, tmp_path, "r")
    read = len(calls)
    second = load_volumes_cached(refs, tmp_path, "r")

    # Assert: every case read once; the kept volumes equal the read ones, metadata included
    assert read == len(refs) and len(calls) == read
    assert_same_cases(second, first)
    assert_same_cases(second, load_volumes(refs))
    assert len(list(tmp_path.glob("sets/*.pt"))) == 1


def test_a_site_session_reads_its_kept_volumes_on_first_evaluation(tiny_acdc_h5, tmp_path):
    # Setup: a cached build, then a lazy one of the same data
    base = {"data.format": "acdc-h5", "data.root": str(tiny_acdc_h5), "data.labeled": 1, "data.size": 32}
    cfg = apply_overrides(TrainConfig(), base | {"data.cache_dir": str(tmp_path)})
    eager = build_train_data(cfg)

    # Execute
    lazy = build_train_data(cfg, lazy_val=True)

    # Assert: nothing read until used, then the kept volumes (mapped from the one file)
    assert not lazy.val.loaded and len(lazy.val) == 1
    assert_same_cases(list(lazy.val), eager.val)
    (kept,) = [p for p in tmp_path.glob("sets/*.pt") if "cases" in torch.load(p, weights_only=True)]
    assert str(kept) in Path("/proc/self/maps").read_text()
