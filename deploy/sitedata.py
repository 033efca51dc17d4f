"""Small hospital folders for the local rehearsal: phantom patients written as real files.

Each site folder is an nnU-Net raw dataset (``dataset.json``, ``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``), read by the project's ``nifti`` reader exactly as a hospital's own
export would be; the images come from :class:`samatch.phantoms.PhantomReader` (site ``i`` has
scanner style ``i``), so three folders show the phantoms' domain shift.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from samatch.phantoms import KINDS, PhantomReader

DATA_FORMAT = "nifti"


def write_phantom_site(root: Path, site: int, size: int = 32, patients: int = 10, slices: int = 6) -> Path:
    """Write phantom site ``site`` (cardiac, ``patients`` volumes of ``slices`` x ``size`` x ``size``)
    to ``root`` in nnU-Net layout; returns ``root``. The files are deterministic in ``site``."""
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    reader = PhantomReader("cardiac", site=site, size=size, num_patients=patients, num_val=0, slices=slices)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])  # 1 x 1 mm in-plane, 2 mm slices
    for p in range(patients):
        image, label = reader._volume(site, p)  # (Z, H, W)
        case = f"site{site}_p{p:03d}"
        # NIfTI stores (x, y, z): the reader transposes back to (z, y, x).
        nib.save(
            nib.Nifti1Image(image.transpose(2, 1, 0), affine), str(root / "imagesTr" / f"{case}_0000.nii.gz")
        )
        nib.save(
            nib.Nifti1Image(label.transpose(2, 1, 0).astype(np.uint8), affine),
            str(root / "labelsTr" / f"{case}.nii.gz"),
        )
    info = {
        "name": f"phantom-site{site}",
        "channel_names": {"0": "MRI"},
        "labels": {name: i for i, name in enumerate(KINDS["cardiac"])},
        "numTraining": patients,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=1))
    return root
