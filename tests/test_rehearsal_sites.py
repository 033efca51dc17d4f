"""deploy.rehearsal with ``sites_from``: the sites of a partition manifest, read in place, instead of
phantom folders (no process is started here; the benchmark runs them, docs/performance.md)."""

from __future__ import annotations

import json

import pytest

from deploy.cli import build_parser
from deploy.rehearsal import Rehearsal, RehearsalConfig, dataset_classes


def write_manifest(folder, root: str, sites: int) -> str:
    """A partition manifest of ``sites`` sites of an acdc-h5 dataset at ``root``."""
    entries = [{"name": f"hospital{i}", "splits_file": f"site{i}_splits.json"} for i in range(sites)]
    path = folder / "manifest.json"
    path.write_text(json.dumps({"root": root, "format": "acdc-h5", "sites": entries}))
    return str(path)


def test_manifest_sites_read_their_dataset_in_place(tiny_acdc_h5, tmp_path):
    # Setup: a manifest naming another folder; the dataset is given here (sites_root)
    manifest = write_manifest(tmp_path, "/elsewhere/ACDC", 3)
    cfg = RehearsalConfig(sites=2, sites_from=manifest, sites_root=str(tiny_acdc_h5))

    # Execute
    reh = Rehearsal(tmp_path / "rehearsal", cfg)
    args = build_parser().parse_args(reh.supernode_args("hospitalB"))

    # Assert: both sites on the one dataset, in place; the second site's splits file and index
    assert reh.data_roots == {"hospitalA": tiny_acdc_h5, "hospitalB": tiny_acdc_h5}
    assert args.data_root == str(tiny_acdc_h5) and args.data_format == "acdc-h5"
    assert args.splits_file == str(tmp_path / "site1_splits.json") and args.site_index == 1
    assert args.label_map == ""
    assert dataset_classes(reh.site_specs["hospitalB"]) == 4  # background, RV, myocardium, LV
    assert reh.run_config()["data.format"] == "acdc-h5" and reh.run_config()["model.num_classes"] == 4


def test_phantom_sites_are_unchanged(tmp_path):
    # Execute: the default rehearsal (phantom NIfTI folders written by prepare)
    reh = Rehearsal(tmp_path / "rehearsal", RehearsalConfig(sites=2))
    args = build_parser().parse_args(reh.supernode_args("hospitalA"))

    # Assert: the site's own folder under the rehearsal, nifti, no splits file
    assert reh.data_roots["hospitalA"] == tmp_path / "rehearsal" / "sites" / "hospitalA" / "data"
    assert args.data_format == "nifti" and args.splits_file == "" and args.site_index == 0
    assert reh.run_config()["data.format"] == "nifti"  # what the in-process drills (deploy.faults) run too


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"root": "/d", "format": "acdc-h5"}', r"manifest\.json: not a partition manifest \('sites'\)"),
        ("[1, 2", r"manifest\.json: not a partition manifest"),
        (None, r"manifest\.json: 1 sites, the rehearsal needs 2"),
    ],
)
def test_a_bad_manifest_is_named_with_its_problem(tmp_path, content, error):
    # Setup
    if content is None:
        write_manifest(tmp_path, "/d", 1)
    else:
        (tmp_path / "manifest.json").write_text(content)

    # Execute / Assert
    with pytest.raises(ValueError, match=error):
        Rehearsal(
            tmp_path / "rehearsal", RehearsalConfig(sites=2, sites_from=str(tmp_path / "manifest.json"))
        )
