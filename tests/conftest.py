"""Shared fixtures: the real data in ../shared/data, and tiny synthetic dataset folders.

Tests on real data skip when it is absent, except on CI (env ``CI`` set), where they fail: a CI
run that silently skipped them would prove nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

# A tiny phantom federation for in-process runs: 32 px, 4-channel U-Net, 2 steps per round.
TINY_FEDERATION = {
    "data.format": "phantom-cardiac",
    "data.labeled": 1,
    "data.size": 32,
    "data.max_unlabeled": 6,
    "model.base_channels": 4,
    "schedule.batch_size": 2,
    "schedule.lr": 0.03,
    "device": "cpu",
    "num-server-rounds": 2,
    "local-iterations": 2,
}


def phantom_nodes(n: int) -> list[dict]:
    """Node configs of ``n`` simulated phantom hospitals."""
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def require_dir(path: Path, what: str) -> Path:
    if path.is_dir():
        return path
    message = f"{what} not found at {path}"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI is set, so the real-data tests must run", pytrace=False)
    pytest.skip(message)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread for the suite: the tests' tensors are tiny, and on a busy 2-core machine
    torch's spinning worker threads made small steps 10-20x slower (measured)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_dir(SHARED_DATA, "shared real data")


@pytest.fixture(scope="session")
def acdc_root(shared_data: Path) -> Path:
    return require_dir(shared_data / "ACDC", "ACDC h5 data")


@pytest.fixture(scope="session")
def busi_root(shared_data: Path) -> Path:
    return require_dir(shared_data / "BUSI", "BUSI data")


@pytest.fixture(scope="session")
def chaos_root(shared_data: Path) -> Path:
    return require_dir(shared_data / "CHAOS_MR_T2", "CHAOS MR T2 data")


# ---- tiny synthetic folders -------------------------------------------------------------------

# Train slices deliberately interleave patients: patient002 appears before and after patient001.
TINY_TRAIN = [
    "patient002_frame01_slice_0",
    "patient002_frame01_slice_1",
    "patient001_frame01_slice_0",
    "patient002_frame02_slice_0",
    "patient004_frame01_slice_0",
]
TINY_VAL = ["patient003_frame01"]


def tiny_slice(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(6, 5) float32 image in [0, 1) and uint8 label with 26 bg, 1 RV, 1 myocardium, 2 LV voxels."""
    image = np.random.default_rng(seed).random((6, 5)).astype(np.float32)
    label = np.zeros((6, 5), dtype=np.uint8)
    label[0, 0] = 1
    label[0, 1] = 2
    label[0, 2:4] = 3
    return image, label


def write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        f.create_dataset("label", data=label)
    return path


@pytest.fixture
def tiny_acdc_h5(tmp_path: Path) -> Path:
    """acdc-h5 folder: 5 train slices of 3 patients, 1 val volume (2, 6, 5); no test.list."""
    return write_tiny_acdc_h5(tmp_path / "ACDC")


def write_tiny_acdc_h5(root: Path) -> Path:
    """The :func:`tiny_acdc_h5` folder at ``root`` (for fixtures of a wider scope)."""
    for i, name in enumerate(TINY_TRAIN):
        write_h5(root / "data" / "slices" / f"{name}.h5", *tiny_slice(i))
    image, label = tiny_slice(99)
    write_h5(root / "data" / f"{TINY_VAL[0]}.h5", np.stack([image, image[::-1]]), np.stack([label, label]))
    (root / "train_slices.list").write_text("\n".join(TINY_TRAIN) + "\n")
    (root / "val.list").write_text("\n".join(TINY_VAL) + "\n")
    return root


def write_nifti(path: Path, data_xyz: np.ndarray, zooms=(1.5, 2.0, 3.0)) -> Path:
    """Write ``data_xyz`` (x, y, z[, t]) with voxel size ``zooms`` (x, y, z) mm."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*tuple(zooms)[:3], 1.0])
    img = nib.Nifti1Image(data_xyz, affine)
    zooms = tuple(zooms)[: data_xyz.ndim]
    img.header.set_zooms(zooms + (1.0,) * (data_xyz.ndim - len(zooms)))
    nib.save(img, str(path))
    return path


def xyz_volume(shape=(5, 4, 3)) -> np.ndarray:
    """float32 volume with value 100 x + 10 y + z at voxel (x, y, z): its transposition is checkable."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (100 * x + 10 * y + z).astype(np.float32)


def xyz_label(shape=(5, 4, 3)) -> np.ndarray:
    """uint8 label: value = x % 5 (0..4), i.e. per z-slice 4 voxels of each of 0..4 when x has 5 values."""
    x = np.arange(shape[0])[:, None, None] % 5
    return np.broadcast_to(x, shape).astype(np.uint8).copy()


@pytest.fixture
def tiny_chaos(tmp_path: Path) -> Path:
    """CHAOS-style folder: cases 1 and 2, shape (x, y, z) = (5, 4, 3), zooms 1.5 x 2 x 3 mm, labels 0..4."""
    root = tmp_path / "CHAOS"
    for n in (1, 2):
        write_nifti(root / f"image_{n}.nii.gz", xyz_volume() + n)
        write_nifti(root / f"label_{n}.nii.gz", xyz_label())
    return root


@pytest.fixture
def tiny_acdc_nifti(tmp_path: Path) -> Path:
    """Raw ACDC: patient001 with frames 01 and 12 (+ _gt), a 4D cine file and Info.cfg to ignore."""
    root = tmp_path / "ACDC_raw"
    pdir = root / "patient001"
    for frame in ("01", "12"):
        write_nifti(pdir / f"patient001_frame{frame}.nii.gz", xyz_volume(), zooms=(1.4, 1.4, 10.0))
        write_nifti(pdir / f"patient001_frame{frame}_gt.nii.gz", xyz_label() % 4, zooms=(1.4, 1.4, 10.0))
    write_nifti(
        pdir / "patient001_4d.nii.gz", np.stack([xyz_volume()] * 2, axis=-1), zooms=(1.4, 1.4, 10.0, 1.0)
    )
    (pdir / "Info.cfg").write_text("ED: 1\nES: 12\n")
    return root


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path)
    return path


def busi_image(seed: int, shape=(4, 6)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*shape, 3), dtype=np.uint8)


@pytest.fixture
def tiny_busi(tmp_path: Path) -> Path:
    """BUSI folder: benign (1), benign (2) with an extra mask, malignant (1), normal (1) (empty mask).

    Masks of 4 x 6 images: benign (1) rows 0-1 cols 0-1 (4 px); benign (2) _mask col 0 rows 0-3 and
    _mask_1 (RGBA, opaque) row 0 cols 0-5, union 4 + 6 - 1 = 9 px; malignant (1) row 3 (6 px).
    """
    root = tmp_path / "BUSI"
    for cat, n, seed in (("benign", 1, 1), ("benign", 2, 2), ("malignant", 1, 3), ("normal", 1, 4)):
        write_png(root / cat / f"{cat} ({n}).png", busi_image(seed))
    m = np.zeros((4, 6), dtype=np.uint8)
    m[0:2, 0:2] = 255
    write_png(root / "benign" / "benign (1)_mask.png", m, mode="1")
    m = np.zeros((4, 6), dtype=np.uint8)
    m[:, 0] = 255
    write_png(root / "benign" / "benign (2)_mask.png", m, mode="1")
    m = np.zeros((4, 6, 4), dtype=np.uint8)
    m[..., 3] = 255  # opaque everywhere, as in the real BUSI RGBA masks: alpha must not count
    m[0, :, :3] = 255
    write_png(root / "benign" / "benign (2)_mask_1.png", m)
    m = np.zeros((4, 6), dtype=np.uint8)
    m[3, :] = 255
    write_png(root / "malignant" / "malignant (1)_mask.png", m, mode="L")
    write_png(root / "normal" / "normal (1)_mask.png", np.zeros((4, 6, 3), dtype=np.uint8))
    return root


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut ``path`` to ``keep`` of its bytes, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


HOLDER = """
import sys, time
from samatch.rundir import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def held_elsewhere():
    """``held_elsewhere(folder)`` -> another process (Popen) that holds ``folder`` as a live run does
    (``samatch.rundir.hold``) until it is killed; the fixture kills it at the end if the test did not."""
    pytest.importorskip("fcntl", reason="run folders are held through fcntl")
    children: list[subprocess.Popen] = []

    def start(folder: Path) -> subprocess.Popen:
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
        )
        children.append(child)
        assert child.stdout.readline() == "held\n"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()
        child.stdout.close()


@pytest.fixture
def synth() -> SimpleNamespace:
    """The writers above, for tests that build or break their own files."""
    return SimpleNamespace(
        write_h5=write_h5,
        write_nifti=write_nifti,
        write_png=write_png,
        truncate=truncate,
        tiny_slice=tiny_slice,
        xyz_volume=xyz_volume,
        xyz_label=xyz_label,
        busi_image=busi_image,
        train_names=list(TINY_TRAIN),
    )


@pytest.fixture
def task_identity():
    """Strategy code outside Flower's runtime: messages as run 1 from node 0 (restored after)."""
    from federation.inprocess import server_task_identity

    with server_task_identity():
        yield
