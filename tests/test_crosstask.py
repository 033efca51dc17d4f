"""Cross-task federation: cardiac and lesion hospitals share SAM's LoRA adapters, while each task's
U-Net is aggregated only among that task's hospitals (real ServerApp / ClientApp, in process)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clients.client_app import app as client_app
from federation.aggregate import aggregate_states
from federation.config import FederationConfig, parse_run_config, site_from_node_config
from federation.inprocess import InProcessGrid, run_inprocess
from federation.local import clear_sessions
from federation.outputs import RunRecorder
from federation.state import from_record, from_wire, task_of_keys, to_wire
from samatch.config import TrainConfig, apply_overrides
from samatch.engine import load_run_model
from server.server_app import app as server_app

TASKS = {
    "cardiac": {"data.format": "phantom-cardiac", "model.num_classes": 4},
    "lesion": {"data.format": "phantom-lesion", "model.num_classes": 2},
}
SITES = [
    {"name": "heart-a", "task": "cardiac", "overrides": {"data.root": "0"}},
    {"name": "heart-b", "task": "cardiac", "overrides": {"data.root": "1"}},
    {"name": "breast-c", "task": "lesion", "overrides": {"data.root": "2"}},
]


def write_manifest(tmp_path):
    path = tmp_path / "crosstask.json"
    path.write_text(json.dumps({"tasks": TASKS, "sites": SITES}))
    return str(path)


def test_wire_names_namespace_the_unet_and_optionally_the_adapters():
    state = {"model.w": 1, "sam_lora.a": 2}
    assert to_wire(state, "acdc") == {"task.acdc.model.w": 1, "sam_lora.a": 2}
    assert to_wire(state, "acdc", "task") == {"task.acdc.model.w": 1, "task.acdc.sam_lora.a": 2}
    assert to_wire(state, "") == state
    incoming = {"task.acdc.model.w": 1, "task.busi.model.w": 9, "sam_lora.a": 2}
    assert from_wire(incoming, "acdc") == state  # the other task's U-Net is dropped
    assert task_of_keys(["task.busi.model.w", "sam_lora.a"]) == "busi" and task_of_keys(["model.w"]) == ""
    with pytest.raises(ValueError, match="several tasks"):
        task_of_keys(["task.a.model.w", "task.b.model.w"])


def test_aggregation_per_key_over_the_sites_that_sent_it():
    # Prepare: two cardiac sites and one lesion site, weights 0.5 / 0.25 / 0.25
    states = [
        {"lora": np.array([4.0]), "task.cardiac.w": np.array([2.0])},
        {"lora": np.array([0.0]), "task.cardiac.w": np.array([6.0])},
        {"lora": np.array([8.0]), "task.lesion.w": np.array([3.0])},
    ]
    # Execute
    out = aggregate_states(states, [0.5, 0.25, 0.25])
    # Assert: lora over all three = 0.5*4 + 0.25*0 + 0.25*8 = 4; cardiac over its two with weights
    # renormalised to 2/3, 1/3: 2*2/3 + 6/3 = 10/3; lesion = its only site's value
    assert out["lora"].tolist() == [4.0]
    assert out["task.cardiac.w"].tolist() == pytest.approx([10 / 3])
    assert out["task.lesion.w"].tolist() == [3.0]


def test_manifest_site_gets_its_task_settings(tmp_path):
    manifest = write_manifest(tmp_path)
    cfg, fed = parse_run_config({"partition-manifest": manifest})
    site = site_from_node_config({"partition-id": 2, "num-partitions": 3}, cfg, fed)
    assert site.name == "breast-c" and site.task == "lesion"
    assert dict(site.overrides) == {"data.format": "phantom-lesion", "model.num_classes": 2, "data.root": "2"}
    with pytest.raises(ValueError, match="task 'liver' is not in the partition manifest"):
        site_from_node_config(
            {"data-root": "/d", "task": "liver"}, cfg, FederationConfig(partition_manifest=manifest)
        )


@pytest.mark.slow
def test_crosstask_run_shares_adapters_and_keeps_unets_per_task(tmp_path):
    # Prepare: SAM-Match on tiny phantoms, 2 rounds of 1 step; record what every node receives.
    run_config = {
        "method.name": "samatch",
        "data.labeled": 1,
        "data.size": 32,
        "data.max_unlabeled": 1,
        "model.base_channels": 4,
        "schedule.batch_size": 2,
        "sam.lora_rank": 2,
        "device": "cpu",
        "num-server-rounds": 2,
        "local-iterations": 1,
        "min-train-nodes": 3,
        "min-evaluate-nodes": 3,
        "min-available-nodes": 3,
        "partition-manifest": write_manifest(tmp_path),
        "out-dir": str(tmp_path / "run"),
    }
    received = []

    def recording_app(msg, context):  # (node, type, round, keys) at receipt: the config is reused
        rnd = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
        keys = set(msg.content["arrays"]) if "arrays" in msg.content else set()
        received.append((context.node_id, msg.metadata.message_type, rnd, keys))
        return client_app(msg, context)

    nodes = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    clear_sessions()
    original = InProcessGrid.__init__

    def init(self, _app, node_configs, rc):
        original(self, recording_app, node_configs, rc)

    # Execute
    InProcessGrid.__init__ = init
    try:
        grid = run_inprocess(server_app, client_app, run_config, nodes)
    finally:
        InProcessGrid.__init__ = original
        clear_sessions()

    # Assert: uploads carry only the site's own task's U-Net plus the shared (un-namespaced) LoRA
    task_of_node = {100: "cardiac", 101: "cardiac", 102: "lesion"}
    uploads = {}
    for node, reply in grid.sent:
        if reply.metadata.message_type != "train":
            continue
        keys = set(reply.content["arrays"])
        assert task_of_keys(keys) == task_of_node[node]
        assert any(k.startswith("sam_lora.") for k in keys)
        uploads[node] = from_record(reply.content["arrays"])  # the last round's upload wins
    assert len(uploads) == 3

    # Round 1's train downloads carry every task; once a node has replied, its downloads (round 1's
    # evaluation) carry only its own task (+ adapters), and round 2's training uses that kept copy
    def downloads(kind, rnd):
        return [(n, keys) for n, k, r, keys in received if k == kind and r == rnd]

    r1, e1, r2 = downloads("train", 1), downloads("evaluate", 1), downloads("train", 2)
    assert len(r1) == len(e1) == len(r2) == 3
    assert all({task_of_keys([k]) for k in keys} == {"", "cardiac", "lesion"} for _, keys in r1)
    for node, keys in e1:
        assert {task_of_keys([k]) for k in keys} == {"", task_of_node[node]}
    assert all(keys == set() for _, keys in r2)  # keep-global
    # The final global state: adapters = mean over all three hospitals (6 labeled slices each),
    # the cardiac U-Net = mean of the two cardiac hospitals, the lesion U-Net = its one hospital's
    final = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["method"]
    for key, value in final.items():
        if not value.is_floating_point():
            continue
        holders = [uploads[n][key].double() for n in sorted(uploads) if key in uploads[n]]
        expected = sum(holders) / len(holders)
        assert len(holders) == {"": 3, "cardiac": 2, "lesion": 1}[task_of_keys([key])], key
        assert torch.allclose(value.double(), expected, atol=1e-6), key
    lora_b = [k for k in final if k.startswith("sam_lora.") and "lora_B" in k]
    assert lora_b and any(final[k].abs().sum() > 0 for k in lora_b)  # the adapters trained
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["rounds"][-1]["evaluate-tasks"]) == {"cardiac", "lesion"}
    assert "dice_lesion" in results["rounds"][-1]["evaluate-tasks"]["lesion"]
    # plain averaging of sites' A and B: its gap from averaging B @ A is measured every round
    assert all(0.0 <= r["lora-avg-bias"] < 10.0 for r in results["rounds"])
    # Each task's run folder holds its U-Net under the core's names, loadable as a centralized run's
    _, lesion_unet, _ = load_run_model(tmp_path / "run" / "tasks" / "lesion", "last", device="cpu")
    assert lesion_unet.state_dict().keys() == {
        k[len("task.lesion.model.") :] for k in final if k.startswith("task.lesion.model.")
    }
    for key, value in lesion_unet.state_dict().items():
        assert torch.equal(value, final[f"task.lesion.model.{key}"]), key
    for task in ("cardiac", "lesion"):  # a best round per task, its best.pt that round's U-Net
        best = results["best_dice_tasks"][task]
        rnd = next(r["round"] for r in results["rounds"] if r["evaluate-tasks"][task]["dice_mean"] == best)
        saved = torch.load(tmp_path / "run" / "tasks" / task / "best.pt", weights_only=False)
        assert best >= 0 and saved["round"] == rnd
        _, unet, _ = load_run_model(tmp_path / "run" / "tasks" / task, "best", device="cpu")
        assert all(torch.equal(v, saved["method"][f"model.{k}"]) for k, v in unet.state_dict().items())
    # The run folder's own checkpoint holds every task's U-Net under wire names: pointed elsewhere
    with pytest.raises(
        ValueError, match=r"a cross-task run's global state: each task's U-Net is in tasks/<task>/"
    ):
        load_run_model(tmp_path / "run", "last", device="cpu")


def test_recorder_keeps_a_run_folder_per_task(tmp_path):
    # Prepare: a two-task global state under wire names; three rounds whose best global mean Dice
    # (round 3), best cardiac Dice (round 2) and best lesion Dice (round 1) fall in different rounds
    cfg = TrainConfig()
    tasks = {t: apply_overrides(cfg, over) for t, over in TASKS.items()}
    recorder = RunRecorder(tmp_path, cfg, FederationConfig(), tasks=tasks)
    dice = {1: (0.2, 0.5), 2: (0.4, 0.3), 3: (0.3, 0.45)}  # round: (cardiac, lesion); means .35 .35 .375

    # Execute
    rows = []
    for rnd, (cardiac, lesion) in dice.items():
        state = {
            "task.cardiac.model.w": torch.tensor([float(rnd)]),
            "task.lesion.model.w": torch.tensor([10.0 + rnd]),
            "sam_lora.a": torch.tensor([100.0 + rnd]),
        }
        metrics = {
            "evaluate": {"dice_mean": (cardiac + lesion) / 2},
            "evaluate-tasks": {"cardiac": {"dice_mean": cardiac}, "lesion": {"dice_mean": lesion}},
        }
        rows.append(recorder.record(rnd, state, metrics, 1.0))

    # Assert: the global best and each task's best are kept apart, under the site's own key names
    def saved(*path):
        ckpt = torch.load(tmp_path.joinpath(*path), weights_only=False)
        return ckpt["round"], {k: v.item() for k, v in ckpt["method"].items()}

    assert [r["best-tasks"] for r in rows] == [["cardiac", "lesion"], ["cardiac"], []]
    assert saved("best.pt")[0] == 3
    assert saved("tasks", "cardiac", "best.pt") == (2, {"model.w": 2.0, "sam_lora.a": 102.0})
    assert saved("tasks", "lesion", "best.pt") == (1, {"model.w": 11.0, "sam_lora.a": 101.0})
    assert saved("tasks", "lesion", "last.pt") == (3, {"model.w": 13.0, "sam_lora.a": 103.0})
    assert TrainConfig.load(tmp_path / "tasks" / "lesion" / "config.json").model.num_classes == 2
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["best_dice_tasks"] == {"cardiac": 0.4, "lesion": 0.5}
    # A resumed run starts from the history's per-task bests, where their best.pt files are there
    resumed = RunRecorder(tmp_path, cfg, FederationConfig(), history=results["rounds"], tasks=tasks)
    assert resumed.task_best == {"cardiac": 0.4, "lesion": 0.5} and resumed.best == 0.375
    (tmp_path / "tasks" / "lesion" / "best.pt").unlink()  # e.g. resumed into another folder
    resumed = RunRecorder(tmp_path, cfg, FederationConfig(), history=results["rounds"], tasks=tasks)
    assert resumed.task_best == {"cardiac": 0.4, "lesion": -1.0}


def test_crosstask_runner_manifest_and_table(tmp_path):
    # Prepare: a manifest in its own folder with a relative data root
    from simulations.crosstask import format_table, write_manifest

    folder = tmp_path / "m"
    folder.mkdir()
    tasks = {"acdc": {"data.root": "../data/ACDC", "data.format": "acdc-h5", "model.num_classes": 4}}
    (folder / "manifest.json").write_text(json.dumps({"tasks": tasks, "sites": []}))

    # Execute
    path = write_manifest(str(folder / "manifest.json"), ["acdc:data.max_unlabeled=3"], tmp_path)

    # Assert: the root is absolute, the override is an int, and a bad --task-set is one clear error
    written = json.loads(path.read_text())["tasks"]["acdc"]
    assert written["data.root"] == str((tmp_path / "data" / "ACDC").resolve())
    assert written["data.max_unlabeled"] == 3
    with pytest.raises(ValueError, match="TASK:KEY=VALUE"):
        write_manifest(str(folder / "manifest.json"), ["liver:data.labeled=1"], tmp_path)
    arms = {
        "shared": {"tasks": {"acdc": {"unet_dice": 0.5, "sam_gt_box": 0.75, "n": 8}}},
        "per-task": {"tasks": {}},
    }
    assert format_table(arms).splitlines()[2:] == [
        "| acdc | shared | 50.00 | 75.00 | 8 |",
        "| acdc | per-task | - | - | - |",
    ]
