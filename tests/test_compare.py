"""simulations.compare end to end on two tiny phantom hospitals (a partition manifest, as for real
data): matched iteration accounting, one set of validation cases for every arm, p-values that
samatch.stats reproduces from the recorded per-case numbers, per-round curves that agree with the
final evaluation, the table and the PNGs; plus the phantom-site plan and one-line errors."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from samatch.config import DataConfig
from samatch.stats import compare_runs
from simulations.compare import centralized_config, load_run_config, main, make_plan, pooled_root
from simulations.compare_report import markdown
from simulations.partition import partition

# 2 sites x 2 rounds x 20 local iterations = 80 iterations per arm; supervised (the cheapest method
# that learns something in 40 steps per site), 32 px, base-8 U-Net.
TINY = """
num-server-rounds = 2
local-iterations = 20
method.name = "supervised"
data.format = "phantom-cardiac"
data.labeled = 1
data.size = 32
data.max_unlabeled = 6
model.base_channels = 8
schedule.batch_size = 4
schedule.lr = 0.1
device = "cpu"
"""
SITES = ("hospital0", "hospital1")
# Phantom sites 0 and 2 pooled (phantom site 1's scanner is too far off to federate in 40 steps),
# partitioned "labeled": hospital0 labels site0_p000, hospital1 site2_p000 (the first patients in
# train order), and the validation patients p008, p009 of both phantom sites are dealt round-robin.
VAL_CASES = {
    "site0_p008": "hospital0",
    "site2_p008": "hospital0",
    "site0_p009": "hospital1",
    "site2_p009": "hospital1",
}
ARMS = {"centralized", "federated", "local", *(f"local:{s}" for s in SITES)}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("compare")
    data = DataConfig(root="0,2", format="phantom-cardiac", size=32)
    manifest = partition(data, 2, "labeled", root / "partition")
    config = root / "tiny.toml"
    # FedBN: the hardest federated model to rebuild (global tensors + each site's own BatchNorm);
    # test_training_curves_end_at_the_final_evaluation checks it against the ClientApp's own scores.
    config.write_text(TINY + f'partition-manifest = "{manifest}"\nfedbn = true\n')
    out = root / "out"
    code = main(["--config", str(config), "--out", str(out), "--quiet"])
    result = json.loads((out / "compare.json").read_text())
    return SimpleNamespace(code=code, out=out, result=result)


def case_means(rows: list[dict], metric: str) -> dict[str, float]:
    by_case: dict[str, list[float]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r[metric])
    return {c: float(np.mean(v)) for c, v in by_case.items()}


def test_iterations_are_matched_exactly(run):
    # Assert: K x R x L = 2 x 2 x 20 = 80 in every arm, 40 per site for federated and local-only
    assert run.code == 0
    compute = run.result["compute"]
    assert compute["iterations"] == {"centralized": 80, "federated": 80, "local": 80}
    assert compute["per_site"] == {"federated": dict.fromkeys(SITES, 40), "local": dict.fromkeys(SITES, 40)}
    central_cfg = json.loads((run.out / "centralized" / "config.json").read_text())
    assert central_cfg["schedule"]["iterations"] == 80 and central_cfg["schedule"]["eval_every"] == 40
    local_cfg = json.loads((run.out / "local" / SITES[0] / "config.json").read_text())
    assert local_cfg["schedule"]["iterations"] == 40
    fed_results = json.loads((run.out / "federated" / "results.json").read_text())
    assert [r["round"] for r in fed_results["rounds"]] == [1, 2]


def test_centralized_pools_exactly_the_sites_data(run):
    # One labeled patient (6 slices) and 6 capped unlabeled slices per site (loaded, but unused by
    # supervised: reported as 0); the sites' validation volumes.
    splits = json.loads((run.out / "centralized" / "splits.json").read_text())
    assert splits["labeled"] == [f"site{s}_p000_slice_{z}" for s in (0, 2) for z in range(6)]
    assert len(splits["unlabeled"]) == 12 and not set(splits["unlabeled"]) & set(splits["labeled"])
    assert set(splits["val"]) == set(VAL_CASES)
    assert json.loads((run.out / "federated" / "splits.json").read_text()) == splits  # for evaluate --run
    sites = run.result["sites"]
    assert [(s["labeled_patients"], s["labeled_slices"], s["unlabeled_slices"]) for s in sites] == [
        (["site0_p000"], 6, 0),
        (["site2_p000"], 6, 0),
    ]


def test_every_arm_is_scored_on_the_same_cases(run):
    arms = run.result["arms"]
    assert set(arms) == ARMS
    assert run.result["case_site"] == VAL_CASES
    expected = set(itertools.product(VAL_CASES, (1, 2, 3)))  # (case, class) for RV, myocardium, LV
    for arm, entry in arms.items():
        pairs = [(r["case"], r["class"]) for r in entry["rows"]]
        assert len(pairs) == len(set(pairs)) and set(pairs) == expected, arm
    # `local` predicts each case with its own site's model
    own = [r for s in SITES for r in arms[f"local:{s}"]["rows"] if VAL_CASES[r["case"]] == s]
    assert sorted(own, key=lambda r: (r["case"], r["class"])) == arms["local"]["rows"]


@pytest.mark.parametrize("metric", ["dice", "hd95"])
def test_p_values_are_samatch_stats_on_the_recorded_cases(run, metric):
    # Prepare: per-case means over classes, recomputed here from the recorded rows
    arms = run.result["arms"]
    # The rows name each case's patient; a phantom patient has one volume, so patients pair as cases.
    assert all(r["patient"] == r["case"] for entry in arms.values() for r in entry["rows"])
    per_case = {arm: case_means(arms[arm]["rows"], metric) for arm in arms}

    # Execute
    expected = {c.run: c for c in compare_runs(per_case, reference="centralized")}

    # Assert
    recorded = run.result["tests"][metric]
    assert {t["run"] for t in recorded} == ARMS - {"centralized"}
    assert any(t["diff"] != 0 for t in recorded)  # the arms differ: scipy ran, not the all-zero shortcut
    for t in recorded:
        e = expected[t["run"]]
        assert t["n"] == 4 and 0.0 <= t["p"] <= 1.0 and 0.0 <= t["p_bonferroni"] <= 1.0
        assert t["p"] == pytest.approx(e.p) and t["statistic"] == pytest.approx(e.statistic)
        assert t["p_bonferroni"] == pytest.approx(min(1.0, 4 * t["p"]))  # 4 comparisons
        diff = np.mean(list(per_case[t["run"]].values())) - np.mean(list(per_case["centralized"].values()))
        assert t["diff"] == pytest.approx(diff)


def test_training_curves_end_at_the_final_evaluation(run):
    # The last federated round (the sites' ClientApps, each with its own BatchNorm) and the last
    # centralized validation score the final models on the same cases (Dice only, another code
    # path), so their mean Dice equals the final evaluation's.
    rounds = run.result["rounds"]
    arms = run.result["arms"]
    assert [r["round"] for r in rounds["centralized"]] == [1.0, 2.0]  # every 2 x 20 iterations
    assert rounds["federated"][-1]["dice_mean"] > 0  # the federation learned: the check below is not 0 == 0
    assert rounds["federated"][-1]["dice_mean"] == pytest.approx(arms["federated"]["summary"]["mean"]["dice"])
    assert rounds["centralized"][-1]["dice_mean"] == pytest.approx(
        arms["centralized"]["summary"]["mean"]["dice"]
    )


def test_table_rows_hold_the_recorded_numbers(run):
    table = (run.out / "comparison.md").read_text()
    assert table == markdown(run.result)  # re-made from the JSON alone
    dice_table = table.split("\nHD95")[0]
    lines = {line.split(" | ")[0][2:]: line for line in dice_table.splitlines() if line.startswith("| ")}
    assert ARMS <= set(lines)
    assert "| RV | myocardium | LV | mean |" in table
    for arm in ARMS:
        values = np.array(list(case_means(run.result["arms"][arm]["rows"], "dice").values()))
        assert f"{values.mean():.3f} ± {values.std():.3f}" in lines[arm], arm
    assert lines["federated"].startswith("| federated | 2×2×20 = 80 |")
    assert lines["local"].startswith("| local | 2×40 = 80 |")
    assert lines["centralized"].startswith("| centralized | 80 |")


@pytest.mark.parametrize("name", ["dice_per_round.png", "local_sites.png"])
def test_plots_are_png_images(run, name):
    with Image.open(run.out / name) as img:
        assert img.format == "PNG" and img.size == (640, 420)
        low, high = img.convert("L").getextrema()
        assert high - low > 100  # axes and lines drawn, not a blank canvas


def test_phantom_sites_without_a_manifest(tmp_path):
    # Prepare: no manifest, no method in the file: phantom site i is site i, the method is samatch
    config = tmp_path / "c.toml"
    config.write_text(TINY.replace('method.name = "supervised"\n', ""))

    # Execute
    run_config = load_run_config(config, [], None)
    plan = make_plan(run_config, tmp_path / "out", sites=3, labeled=6)

    # Assert
    assert run_config["method.name"] == "samatch"
    assert load_run_config(config, [], "unimatch")["method.name"] == "unimatch"
    assert [s.name for s in plan.sites] == ["phantom-site0", "phantom-site1", "phantom-site2"]
    assert plan.cfg.data.labeled == 2  # 6 labeled patients over 3 sites
    assert plan.run_config["min-train-nodes"] == 3 and plan.run_config["model.num_classes"] == 4
    assert plan.site_iterations == 2 * 20 and plan.total_iterations == 3 * 2 * 20
    assert pooled_root([s.apply(plan.cfg) for s in plan.sites]) == "0,1,2"
    central = centralized_config(plan, tmp_path / "splits.json")
    assert central.schedule.iterations == 120 and central.schedule.eval_every == 60
    assert central.data.root == "0,1,2" and central.data.max_unlabeled == 0


@pytest.mark.parametrize(
    "toml, extra, message",
    [
        (None, [], "config file not found"),
        (TINY + "schedule.iterations = 10\n", [], "schedule.iterations is derived"),
        (TINY, ["--labeled", "3"], "--labeled 3 cannot be spread evenly over 2 sites"),
        (TINY + "fraction-train = 0.5\n", [], "fraction-train"),
        (TINY, ["--sites", "1"], "at least 2 sites"),
        (TINY, ["--method", "foo"], "unknown method 'foo'"),
        (TINY + 'partition-manifest = "nope.json"\n', [], "nope.json: partition manifest not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, toml, extra, message):
    config = tmp_path / "c.toml"
    if toml is not None:
        config.write_text(toml)
    code = main(["--config", str(config), "--out", str(tmp_path / "out"), "--sites", "2", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("compare: error:") and message in err and "\n" not in err


def test_refuses_a_non_empty_out_folder(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    (tmp_path / "c.toml").write_text(TINY)
    assert main(["--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_overwrite_moves_each_arms_earlier_run_aside(tmp_path, capsys):
    # Prepare: a 1-round, 2-iteration comparison of 2 phantom sites, run once
    config = tmp_path / "c.toml"
    short = TINY.replace("num-server-rounds = 2", "num-server-rounds = 1")
    config.write_text(short.replace("local-iterations = 20", "local-iterations = 2"))
    argv = ["--config", str(config), "--out", str(tmp_path / "out"), "--sites", "2", "--quiet"]
    assert main(argv) == 0
    first = {p: p.read_text() for p in (tmp_path / "out").rglob("metrics.csv")}

    # Execute: again into the same folder
    assert main([*argv, "--overwrite"]) == 0

    # Assert: every arm's earlier folder was moved aside whole; each metrics.csv holds one run's rows
    printed = capsys.readouterr().out
    arms = [tmp_path / "out" / "local" / "phantom-site0", tmp_path / "out" / "local" / "phantom-site1"]
    for arm in [*arms, tmp_path / "out" / "centralized", tmp_path / "out" / "federated"]:
        (moved,) = [p for p in arm.parent.iterdir() if p.name.startswith(f"{arm.name}.")]
        assert f"{arm} held an earlier run: moved it to {moved}" in printed or arm.name == "federated"
        if arm / "metrics.csv" in first:
            assert (moved / "metrics.csv").read_text() == first[arm / "metrics.csv"]
            assert (arm / "metrics.csv").read_text().count("\n") == first[arm / "metrics.csv"].count("\n")
    assert len(first) == 3 and (tmp_path / "out" / "federated" / "results.json").is_file()


def test_help_exits_0_and_states_matched_compute(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "Matched compute" in capsys.readouterr().out
