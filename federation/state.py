"""Trainable state <-> Flower ArrayRecord, and the list of what may leave a site.

The state is ``method.checkpoint_state()``: U-Net tensors under ``model.`` (BatchNorm running
statistics and the int64 ``num_batches_tracked`` included) and, for SAM-Match, LoRA adapter tensors
under ``sam_lora.``. Keys and dtypes travel unchanged; integer buffers stay integer. With transport
``fp16`` floating tensors are sent as float16 (half the bytes) and restored to float32 on receipt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from federation.config import FederationConfig
from samatch.models.unet import batchnorm_state_keys

MODEL_PREFIX = "model."
LORA_PREFIX = "sam_lora."


def batchnorm_keys(method: torch.nn.Module) -> set[str]:
    """``model.``-prefixed keys of every BatchNorm parameter and buffer of the Match network."""
    return {f"{MODEL_PREFIX}{key}" for key in batchnorm_state_keys(method.model)}


def is_lora_a(key: str) -> bool:
    return key.startswith(LORA_PREFIX) and ".lora_A." in key


def shareable_keys(method: torch.nn.Module, fed: FederationConfig) -> list[str]:
    """Exactly the keys that may leave a site (sorted): the Match network's tensors and the LoRA
    tensors, minus BatchNorm tensors under FedBN, minus the frozen LoRA A matrices under FFA."""
    keys = set(method.checkpoint_state())
    bad = sorted(k for k in keys if not k.startswith((MODEL_PREFIX, LORA_PREFIX)))
    if bad:
        raise ValueError(f"checkpoint_state has keys outside model./sam_lora.: {bad[:5]}")
    if fed.fedbn:
        keys -= batchnorm_keys(method)
    if fed.lora_mode == "ffa":
        keys = {k for k in keys if not is_lora_a(k)}
    return sorted(keys)


def to_record(
    state: Mapping[str, torch.Tensor | np.ndarray], keys: Iterable[str], transport: str
) -> ArrayRecord:
    """The ``keys`` of ``state`` as an ArrayRecord (float16 floats when ``transport == "fp16"``)."""
    record = ArrayRecord()
    for key in keys:
        value = state[key]
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if transport == "fp16" and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float16)
        record[key] = Array(np.asarray(arr, order="C"))
    return record


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """ArrayRecord -> tensors; float16 (fp16 transport) comes back as float32, integers unchanged."""
    out = {}
    for key, value in record.items():
        arr = value.numpy()
        if arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        out[key] = torch.from_numpy(arr.copy())
    return out


def record_nbytes(record: ArrayRecord) -> int:
    """Serialized payload bytes of the arrays (what crosses the wire, headers included)."""
    return sum(len(v.data) for v in record.values())


# ---- cross-task federation: wire names ------------------------------------------------------------
# A site of task T sends its Match network as ``task.T.model.*``, so the server aggregates each task's
# U-Net only among that task's sites; the LoRA adapters keep their plain ``sam_lora.*`` names (one
# adapter shared by every task) unless ``share-adapters = "task"`` namespaces them too.
TASK_PREFIX = "task."


def wire_key(key: str, task: str, share_adapters: str = "all") -> str:
    """A site's state key -> its name on the wire."""
    if task and (key.startswith(MODEL_PREFIX) or share_adapters == "task"):
        return f"{TASK_PREFIX}{task}.{key}"
    return key


def to_wire(state: Mapping, task: str, share_adapters: str = "all") -> dict:
    return {wire_key(k, task, share_adapters): v for k, v in state.items()}


def from_wire(state: Mapping, task: str, share_adapters: str = "all") -> dict:
    """The entries of ``state`` meant for a site of ``task``, under the site's own key names (other
    tasks' tensors are dropped)."""
    if not task:
        return dict(state)
    own = f"{TASK_PREFIX}{task}."
    out = {}
    for key, value in state.items():
        if key.startswith(own):
            out[key[len(own) :]] = value
        elif not key.startswith(TASK_PREFIX):
            out[key] = value
    return out


def task_of_keys(keys: Iterable[str]) -> str:
    """The task whose tensors a key set carries ("" for a single-task state)."""
    tasks = {k[len(TASK_PREFIX) :].split(".", 1)[0] for k in keys if k.startswith(TASK_PREFIX)}
    if len(tasks) > 1:
        raise ValueError(f"a site's state carries tensors of several tasks: {sorted(tasks)}")
    return tasks.pop() if tasks else ""
