"""Site-local tensors (FedBN's BatchNorm) on the site's own disk, per round, so a resume keeps them.

Under FedBN each hospital's BatchNorm tensors never leave it. Within one Flower run they live in the
node's ``context.state``; a stopped federation resumed as a *new* run starts with an empty context, so
without this file the sites would fall back to their initial BatchNorm and the resumed run would
differ from an uninterrupted one. The folder is the node config's ``state-dir`` (a deployment: each
hospital names its own) or else the run config's ``site-state-dir`` (simulation); files are

    <folder>/<site name>/local-round<NNNN>.pt    {key: tensor}

and only the two newest rounds are kept (the server's last.pt is at most one round behind a site).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

KEEP = 2
_NAME = re.compile(r"local-round(\d{4,})\.pt$")


def site_state_folder(node_config: Mapping[str, Any], site_state_dir: str, site_name: str) -> Path | None:
    """The site's folder, or None when neither ``state-dir`` nor ``site-state-dir`` is set."""
    root = str(node_config.get("state-dir") or site_state_dir)
    return Path(root) / site_name if root else None


def save_local_round(folder: Path, server_round: int, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write ``tensors`` as round ``server_round``'s file (atomically) and drop older rounds."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"local-round{server_round:04d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
    rounds = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    for old in rounds[:-KEEP]:
        (folder / f"local-round{old:04d}.pt").unlink(missing_ok=True)
    return path


def load_local_round(folder: Path, server_round: int) -> dict[str, torch.Tensor] | None:
    """Round ``server_round``'s tensors, or None when that round was not saved here."""
    path = folder / f"local-round{server_round:04d}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - name the file, whatever torch raised
        raise ValueError(f"{path}: cannot read the site's saved local state: {exc}") from exc
