"""`samatch predict --run RUN_DIR INPUT OUTPUT`: segment files with a trained run.

NIfTI in -> NIfTI out (uint8 labels, the input's affine and header); PNG in -> PNG out (class
indices as pixel values; ``--scale`` stretches them to 0..255 for viewing); a folder -> a folder of
the same file names. ``--sam-cascade`` refines the U-Net's prediction with the run's SAM, as in
`samatch evaluate`. ``--overlay`` also writes ``<name>_overlay.png``: image, prediction and, with
``--gt``, the ground truth, side by side (the middle slice of a volume).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from samatch.commands import add_cascade_arguments

SUFFIXES = (".nii.gz", ".nii", ".png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder made by `samatch train`")
    p.add_argument("input", help="a .nii.gz / .nii / .png file, or a folder of them")
    p.add_argument("output", help="output file, or folder when INPUT is a folder")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--overlay", action="store_true", help="also write PNG overlays")
    p.add_argument("--gt", help="ground-truth label file or folder (same names), for overlays")
    p.add_argument("--scale", action="store_true", help="PNG output stretched to 0..255")
    p.add_argument("--device", default="auto")
    add_cascade_arguments(p)


def _is_image(path: Path) -> bool:
    name = path.name
    # Label files of the layouts we read are not inputs.
    return name.endswith(SUFFIXES) and "_mask" not in name and not name.endswith(("_gt.nii.gz", "_gt.nii"))


def _read(path: Path):
    """-> (image (Z, H, W) float32, writer state)."""
    if path.name.endswith(".png"):
        from samatch.io.busi import read_gray

        return read_gray(path)[None], None
    import nibabel as nib

    from samatch.io.nifti import read_nifti

    data, _, _ = read_nifti(path)
    return data.astype(np.float32), nib.load(str(path))


def _write(path: Path, label: np.ndarray, nifti, num_classes: int, scale: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if nifti is None:
        from PIL import Image

        out = label[0] * (255 // (num_classes - 1)) if scale else label[0]
        Image.fromarray(out.astype(np.uint8)).save(path)
        return
    import nibabel as nib

    header = nifti.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), nifti.affine, header), str(path))


def write_overlay(
    path: Path, image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None, num_classes: int
) -> None:
    """Middle slice: image | image + prediction | image + ground truth (if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = image.shape[0] // 2
    panels = [("image", None), ("prediction", pred)] + ([("ground truth", gt)] if gt is not None else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, lab) in zip(axes, panels, strict=True):
        ax.imshow(image[z], cmap="gray")
        if lab is not None:
            ax.imshow(
                np.ma.masked_equal(lab[z], 0),
                cmap="tab10",
                vmin=0,
                vmax=9,
                alpha=0.5,
                interpolation="nearest",
            )
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(args) -> int:
    from tqdm import tqdm

    from samatch.engine import load_run_cascade, load_run_model
    from samatch.evaluate import predict_label

    cfg, model, device = load_run_model(args.run, args.checkpoint, args.device)
    cascade = None
    if args.sam_cascade:
        cascade = load_run_cascade(args.run, cfg, args.checkpoint, device, args.cascade_threshold)
    src, dst = Path(args.input), Path(args.output)
    if src.is_dir():
        pairs = [(f, dst / f.name) for f in sorted(src.iterdir()) if f.is_file() and _is_image(f)]
        if not pairs:
            raise FileNotFoundError(f"{src}: no .nii.gz / .nii / .png images in this folder")
    elif src.is_file():
        if not src.name.endswith(SUFFIXES):
            raise ValueError(f"{src}: unsupported file type (expected .nii.gz, .nii or .png)")
        pairs = [(src, dst)]
    else:
        raise FileNotFoundError(f"{src}: no such file or folder")
    gt_root = Path(args.gt) if args.gt else None
    for f_in, f_out in tqdm(pairs, desc="predict", disable=len(pairs) < 3):
        image, nifti = _read(f_in)
        label = predict_label(model, image, cfg.data.size, device, cascade)
        _write(f_out, label, nifti, cfg.model.num_classes, args.scale)
        if args.overlay:
            gt = None
            if gt_root is not None:
                g_path = gt_root / f_in.name if gt_root.is_dir() else gt_root
                gt = _read(g_path)[0].astype(np.int64)
            stem = f_out.name.split(".")[0]
            write_overlay(f_out.with_name(stem + "_overlay.png"), image, label, gt, cfg.model.num_classes)
    print(f"wrote {len(pairs)} prediction(s) -> {dst}")
    return 0
