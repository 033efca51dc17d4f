"""Server-side validation: the global U-Net on a validation set the coordinator holds itself.

Run config ``server-val-root`` (and ``server-val-format``, ``server-val-label-map``) names a dataset
folder on the server's machine (for phantoms: site indices such as "0,1,2"); its validation split
(``samatch.data.build_splits`` with the run's seed, at most ``data.max_val_cases`` cases) is scored
after every round with :func:`samatch.evaluate.evaluate_cases`, per volume at native resolution.
Under FedBN the global model has no BatchNorm tensors: the server uses the initial ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from federation.config import FederationConfig
from federation.state import MODEL_PREFIX
from samatch.config import TrainConfig
from samatch.data import build_splits, load_volumes, open_reader
from samatch.evaluate import evaluate_cases, summarize_dice
from samatch.io.base import Case
from samatch.models.unet import build_unet


@dataclasses.dataclass
class ServerValidation:
    cfg: TrainConfig
    cases: list[Case]
    class_names: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: TrainConfig, fed: FederationConfig) -> ServerValidation | None:
        """The server's validation cases, or None when ``server-val-root`` is not set."""
        if not fed.server_val_root:
            return None
        data = dataclasses.replace(
            cfg.data,
            root=fed.server_val_root,
            format=fed.server_val_format or cfg.data.format,
            label_map=fed.server_val_label_map,
            splits_file="",
        )
        reader = open_reader(data)
        if reader.num_classes != cfg.model.num_classes:
            raise ValueError(
                f"server-val-root {fed.server_val_root}: {reader.num_classes} classes, "
                f"the model has {cfg.model.num_classes}"
            )
        splits = build_splits(reader, data)
        refs = {r.case_id: r for r in reader.cases(None)}
        val = splits.val[: data.max_val_cases or None]
        if not val:
            raise ValueError(f"server-val-root {fed.server_val_root}: no validation cases")
        cases = load_volumes([refs[i] for i in val], desc="server validation")
        return cls(dataclasses.replace(cfg, data=data), cases, tuple(reader.class_names))

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Per-class and mean Dice of the global state's U-Net on the server's cases."""
        model = build_unet(self.cfg)
        own = model.state_dict()
        own.update({k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)})
        model.load_state_dict(own)
        rows = evaluate_cases(
            model,
            self.cases,
            self.cfg.model.num_classes,
            self.cfg.data.size,
            torch.device("cpu"),
            distances=False,
        )
        return summarize_dice(rows, self.class_names)
