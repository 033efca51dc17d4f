"""`samatch train / evaluate / predict / compare` end to end on the built-in phantom, tiny settings.

Runs in-process through ``samatch.cli.main`` (fast), plus subprocesses for the error contract:
bad input ends with exit code 2 and one stderr line, never a traceback.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from samatch.cli import main
from samatch.engine import load_run_model
from samatch.evaluate import predict_label

TINY_SETS = [
    "data.size=32",
    "model.base_channels=4",
    "schedule.batch_size=2",
    "schedule.eval_every=2",
    "schedule.log_every=2",
]


def train_argv(out: Path, method: str, iterations: int = 4, *extra: str) -> list[str]:
    argv = ["train", "--format", "phantom-cardiac", "--method", method, "--out", str(out)]
    argv += ["--iterations", str(iterations), "--device", "cpu", "--quiet"]
    for s in TINY_SETS:
        argv += ["--set", s]
    return argv + list(extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two trained and evaluated phantom runs: supervised and unimatch, 4 iterations each."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("supervised", "unimatch"):
        run = root / method
        assert main(train_argv(run, method)) == 0
        assert main(["evaluate", "--run", str(run), "--device", "cpu"]) == 0
        out[method] = run
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "samatch.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_train_writes_the_run_folder(runs):
    run = runs["supervised"]
    for name in ("config.json", "splits.json", "best.pt", "last.pt", "metrics.csv", "val_history.json"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"]["name"] == "supervised"
    assert cfg["schedule"]["iterations"] == 4 and cfg["data"]["size"] == 32
    assert cfg["model"]["num_classes"] == 4  # resolved from the dataset before saving
    splits = json.loads((run / "splits.json").read_text())
    assert splits["patients"]["labeled"] == ["site0_p000", "site0_p001", "site0_p002"]
    assert len(splits["val"]) == 2
    assert torch.load(run / "last.pt", weights_only=False)["iteration"] == 4


def test_evaluate_writes_cases_and_summary(runs):
    out = runs["supervised"] / "eval_val"
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert len(rows) == 2 * 3  # 2 validation volumes x 3 foreground classes
    assert {r["class"] for r in rows} == {"1", "2", "3"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["classes"]) == {"1", "2", "3"}
    dice = [float(r["dice"]) for r in rows]
    assert summary["mean"]["dice"] == pytest.approx(np.mean(dice))  # equal class counts: mean of means


def test_resume_after_completion_does_nothing_more(runs, tmp_path):
    # Prepare
    run = tmp_path / "run"
    shutil.copytree(runs["supervised"], run)
    before = torch.load(run / "last.pt", weights_only=False)
    metrics_before = (run / "metrics.csv").read_text()

    # Execute
    code = main(["train", "--out", str(run), "--resume", "--quiet"])

    # Assert
    assert code == 0
    after = torch.load(run / "last.pt", weights_only=False)
    assert after["iteration"] == 4
    assert all(torch.equal(before["method"][k], after["method"][k]) for k in before["method"])
    assert (run / "metrics.csv").read_text() == metrics_before


def test_resume_continues_to_the_iterations_of_config_json(runs, tmp_path):
    # Prepare: --resume reloads the run's config.json, so raising the budget means editing it
    run = tmp_path / "run"
    shutil.copytree(runs["supervised"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["schedule"]["iterations"] = 6
    (run / "config.json").write_text(json.dumps(cfg))

    # Execute
    code = main(["train", "--out", str(run), "--resume", "--quiet"])

    # Assert
    assert code == 0
    assert torch.load(run / "last.pt", weights_only=False)["iteration"] == 6
    history = json.loads((run / "val_history.json").read_text())
    assert [h["iteration"] for h in history] == [2, 4, 6]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [2, 4, 6]


def test_resume_with_more_iterations_is_not_silently_ignored(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["supervised"], run)
    code = main(["train", "--out", str(run), "--resume", "--iterations", "6", "--quiet"])
    assert code == 0
    assert torch.load(run / "last.pt", weights_only=False)["iteration"] == 6


def test_a_new_run_into_an_earlier_runs_folder_moves_that_run_aside(runs, tmp_path, capsys):
    # Prepare: an evaluated run, and a new run with the same --out that reuses its splits.json
    run = tmp_path / "run"
    shutil.copytree(runs["supervised"], run)
    earlier = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    reuse = ["--set", f"data.splits_file={run / 'splits.json'}"]

    # Execute
    code = main(train_argv(run, "supervised", 2, *reuse))

    # Assert: the earlier run is whole under its new name; the folder holds the new run alone
    assert code == 0
    (moved,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert f"{run} held an earlier run: moved it to {moved}" in capsys.readouterr().out
    assert {p.relative_to(moved): p.read_bytes() for p in moved.rglob("*") if p.is_file()} == earlier
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [2]  # not the earlier run's rows, then this one's
    assert not (run / "eval_val").exists()
    assert (run / "splits.json").read_bytes() == earlier[Path("splits.json")]  # read before the move


def test_a_run_that_fails_on_its_input_leaves_the_earlier_run_in_place(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["supervised"], run)
    code = main(["train", "--out", str(run), "--data", str(tmp_path / "nope"), "--format", "busi"])
    assert code == 2 and "nope" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (run / "last.pt").is_file()


def run_folder(path: Path) -> Path:
    """An empty run's folder at ``path``: what makes a folder a run's is its config.json."""
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def test_set_aside_names_the_folder_by_its_start_and_leaves_other_folders(tmp_path, monkeypatch):
    from samatch.rundir import in_folder, set_aside

    # Prepare: two runs started in the same second (2026-11-28 10:00:00 local time), a folder of
    # other files, and a link to a run
    started = time.mktime((2026, 11, 28, 10, 0, 0, 0, 0, -1))
    for name in ("a", "b", "c"):
        os.utime(run_folder(tmp_path / name) / "config.json", (started, started))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "c")
    monkeypatch.chdir(tmp_path)

    # Execute
    first = set_aside("a")
    (tmp_path / "b").rename(tmp_path / "a")
    second = set_aside(tmp_path / "a")
    linked = set_aside("link")

    # Assert: named by the start, relative when given so; a link is renamed, its target kept
    assert first == Path("a.20261128-100000") and second == tmp_path / "a.20261128-100000-2"
    assert not (tmp_path / "a").exists() and (second / "config.json").is_file()
    assert linked == Path("link.20261128-100000") and linked.is_symlink() and (tmp_path / "c").is_dir()
    assert set_aside(tmp_path / "notes") is None and (tmp_path / "notes" / "x.txt").is_file()
    assert set_aside(tmp_path / "missing") is None
    assert in_folder(tmp_path / "a" / "last.pt", tmp_path / "a") and in_folder(tmp_path / "a", tmp_path / "a")
    assert not in_folder(tmp_path / "b" / "last.pt", tmp_path / "a")


def test_set_aside_refuses_to_move_what_the_new_run_reads(tmp_path, monkeypatch):
    from samatch.rundir import set_aside

    (run_folder(tmp_path / "run") / "sub").mkdir()
    with pytest.raises(ValueError, match=r"run: holds an earlier run.*manifest\.json lies in it"):
        set_aside(tmp_path / "run", ["", tmp_path / "run" / "sub" / "manifest.json"])
    monkeypatch.chdir(tmp_path / "run" / "sub")
    with pytest.raises(ValueError, match="the working folder lies in it"):
        set_aside("..")
    assert (tmp_path / "run" / "config.json").is_file()  # nothing moved


def test_a_live_runs_folder_is_neither_moved_nor_taken_and_is_freed_when_its_process_dies(
    runs, tmp_path, capsys, held_elsewhere
):
    from samatch.rundir import set_aside

    # Prepare: a finished run, which another process now holds as a live run would
    run = tmp_path / "run"
    shutil.copytree(runs["supervised"], run)
    child = held_elsewhere(run)
    busy = rf"run: a live run \(pid {child.pid} on [^)]+\) is writing there"

    # Execute: a new run moving the folder aside; a resume writing into it
    with pytest.raises(ValueError, match=busy):
        set_aside(run)
    code = main(["train", "--out", str(run), "--resume", "--iterations", "6", "--quiet"])

    # Assert: both refused, the run untouched
    assert code == 2 and re.fullmatch(
        rf"samatch: error: \S*{busy}; wait for it to end\n", capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert torch.load(run / "last.pt", weights_only=False)["iteration"] == 4
    child.kill()
    child.wait()
    # Once the holder is gone (killed: nothing of its own ran), the kernel has released its hold.
    moved = set_aside(run)
    assert moved is not None and (moved / "last.pt").is_file()


@pytest.mark.skipif(os.name != "posix", reason="run folders are held through fcntl")
def test_a_lock_file_that_cannot_be_opened_is_one_line_for_a_new_run_and_no_obstacle_to_moving(
    tmp_path, monkeypatch
):
    from samatch.rundir import LOCK_NAME, hold, set_aside

    # Prepare: an earlier run whose lock file this user may not open (another user's, read-only)
    run = run_folder(tmp_path / "run")
    (run / LOCK_NAME).write_text("pid 1 on elsewhere\n")
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(LOCK_NAME):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)

    # Execute / Assert: moving it aside needs no lock; a new run that cannot hold its folder says so
    moved = set_aside(run)
    assert moved is not None and (moved / "config.json").is_file()
    with pytest.raises(
        ValueError, match=r"run: cannot write the run's lock file \.run\.lock \(Permission denied\)$"
    ):
        with hold(run):
            pass


@pytest.mark.skipif(os.name != "posix", reason="run folders are held through fcntl")
def test_a_folder_moved_aside_while_a_run_takes_it_is_not_held_by_that_run(tmp_path, monkeypatch):
    from samatch import rundir

    # Prepare: between this run's opening of the lock file and its lock, another run moves the
    # folder aside (the lock would then guard the moved folder, not the one this run writes to)
    run = tmp_path / "run"
    real_flock = rundir.fcntl.flock

    def moved_first(fd, op):
        if run.exists():
            run.rename(tmp_path / "run.earlier")
        return real_flock(fd, op)

    monkeypatch.setattr(rundir.fcntl, "flock", moved_first)

    # Execute / Assert
    with pytest.raises(ValueError, match=r"run: another run moved the folder while this one was taking it"):
        with rundir.hold(run):
            pass
    assert not rundir._HELD


@pytest.mark.skipif(os.name != "posix", reason="run folders are held through fcntl")
def test_a_forked_child_does_not_keep_its_parents_run_folder_held(tmp_path):
    from samatch.rundir import hold

    # Prepare: a child forked while the folder is held, which runs until told to end
    run = run_folder(tmp_path / "run")
    started, stop = os.pipe(), os.pipe()
    with hold(run):
        pid = os.fork()
        if pid == 0:  # the child: say it runs, wait, leave without running anything of the parent's
            os.write(started[1], b"r")
            os.read(stop[0], 1)
            os._exit(0)
    try:
        assert os.read(started[0], 1) == b"r"

        # Execute / Assert: the parent let go, so the folder is free though the child lives on
        with hold(run):
            assert os.waitpid(pid, os.WNOHANG) == (0, 0)
    finally:
        os.write(stop[1], b"x")
        os.waitpid(pid, 0)
        for fd in (*started, *stop):
            os.close(fd)


def test_resume_without_a_checkpoint_is_exit_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and err.count("\n") == 1


def nifti_with_affine(path: Path, seed: int = 0) -> nib.Nifti1Image:
    """Random (x, y, z) = (40, 40, 3) float volume with a rotated, scaled and shifted affine."""
    data = np.random.default_rng(seed).random((40, 40, 3)).astype(np.float32)
    data[10:25, 12:30, :] += 1.0  # some structure, so the prediction is not constant
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array(
        [[1.4 * c, -1.4 * s, 0.0, -20.0], [1.4 * s, 1.4 * c, 0.0, 35.5], [0.0, 0.0, 8.0, 12.0], [0, 0, 0, 1]]
    )
    img = nib.Nifti1Image(data, affine)
    nib.save(img, str(path))
    return nib.load(str(path))


def test_predict_nifti_keeps_affine_shape_and_orientation(runs, tmp_path):
    # Prepare
    src = nifti_with_affine(tmp_path / "scan.nii.gz")
    dst = tmp_path / "out" / "pred.nii.gz"

    # Execute
    code = main(["predict", "--run", str(runs["supervised"]), str(tmp_path / "scan.nii.gz"), str(dst)])

    # Assert
    assert code == 0
    out = nib.load(str(dst))
    assert out.shape == (40, 40, 3)
    assert np.array_equal(out.affine, src.affine)
    assert out.get_data_dtype() == np.uint8
    pred = np.asanyarray(out.dataobj)
    assert pred.dtype == np.uint8 and pred.max() < 4
    # Same voxels as predicting the (z, y, x) array directly: no axis was swapped on the way back
    _, model, device = load_run_model(runs["supervised"], "best", "cpu")
    expected = predict_label(model, np.asanyarray(src.dataobj).transpose(2, 1, 0), 32, device)
    assert np.array_equal(pred, expected.transpose(2, 1, 0))


def test_predict_png_keeps_the_size(runs, tmp_path):
    # Prepare: 30 rows x 50 columns, not square, not the network size
    pixels = np.random.default_rng(1).integers(0, 256, (30, 50), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "us.png")

    # Execute
    code = main(
        ["predict", "--run", str(runs["supervised"]), str(tmp_path / "us.png"), str(tmp_path / "p.png")]
    )

    # Assert
    assert code == 0
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == (50, 30)
        assert np.asarray(im).max() < 4  # class indices, not stretched without --scale


def test_predict_folder_with_overlays(runs, tmp_path):
    # Prepare: two images, a mask file and a text file that are not inputs
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.png", "b.png", "b_mask.png"):
        Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)).save(src / name)
    (src / "notes.txt").write_text("not an image")

    # Execute
    code = main(["predict", "--run", str(runs["supervised"]), str(src), str(tmp_path / "out"), "--overlay"])

    # Assert
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]
    with Image.open(tmp_path / "out" / "a.png") as im:
        assert im.size == (20, 24)


def test_compare_prints_both_runs(runs, capsys):
    # Execute
    code = main(["compare", str(runs["supervised"]), str(runs["unimatch"])])

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert str(runs["supervised"]) in out  # the reference, in the heading
    table = out.splitlines()[-2:]  # header row and one comparison row
    assert table[0].split()[:2] == ["run", "n"]
    assert table[1].split()[:2] == [str(runs["unimatch"]), "2"]


@pytest.mark.parametrize("columns", ["both", "neither", "one"])
def test_compare_pairs_patients_not_their_frames(tmp_path, capsys, columns):
    # Prepare: two runs' cases.csv, 3 patients x 2 frames (ED, ES), one class; the second run 0.1
    # better on every case. A file without the patient column is an older one: if any run has such a
    # file, every run is paired by case (mixing patient and case ids would pair nothing).
    runs = []
    for name, shift in (("ref", 0.0), ("run", 0.1)):
        with_patient = columns == "both" or (columns == "one" and name == "ref")
        folder = tmp_path / name / "eval_val"
        folder.mkdir(parents=True)
        lines = ["case,patient,class,dice" if with_patient else "case,class,dice"]
        for i, (patient, frame) in enumerate((p, f) for p in ("p1", "p2", "p3") for f in ("ED", "ES")):
            patient_cell = f"{patient}," if with_patient else ""
            lines.append(f"{patient}_{frame},{patient_cell}1,{0.1 * i + shift}")
        (folder / "cases.csv").write_text("\n".join(lines) + "\n")
        runs.append(str(tmp_path / name))

    # Execute
    code = main(["compare", *runs])

    # Assert: 3 pairs (patients) when both files name them, else 6 (cases) and a note says so
    out = capsys.readouterr().out
    assert code == 0
    row = out.splitlines()[-1].split()
    assert row[:2] == [runs[1], "3" if columns == "both" else "6"]
    assert float(row[4]) == pytest.approx(0.1)  # diff
    assert ("no patient column" in out) is (columns != "both")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("samatch: error: ")
    return lines[0]


def test_missing_run_folder_is_one_line_exit_2(tmp_path):
    line = one_error_line(run_cli("evaluate", "--run", str(tmp_path / "no_such_run"), "--device", "cpu"))
    assert "no_such_run" in line and "config.json" in line


def test_unknown_set_key_is_one_line_exit_2(tmp_path, capsys):
    code = main(
        ["train", "--format", "phantom-cardiac", "--out", str(tmp_path / "r"), "--set", "data.sise=64"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err == "samatch: error: unknown config key: data.sise\n"
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["train", "--out", "{tmp}/r"], "--data ROOT is required"),
        (["train", "--format", "phantom-cardiac", "--out", "{tmp}/r", "--set", "data.size=40"], "data.size"),
        (["train", "--format", "phantom-cardiac", "--out", "{tmp}/r", "--set", "data.size"], "key=value"),
        (["predict", "--run", "{run}", "{tmp}/notes.txt", "{tmp}/o.png"], "unsupported file type"),
        (["predict", "--run", "{run}", "{tmp}/missing.png", "{tmp}/o.png"], "no such file or folder"),
        (["compare", "{run}", "{tmp}"], "run `samatch evaluate`"),
        (["compare", "{run}"], "at least two runs"),
    ],
)
def test_bad_inputs_in_process(runs, tmp_path, capsys, argv, expect):
    (tmp_path / "notes.txt").write_text("x")
    argv = [a.format(tmp=tmp_path, run=runs["supervised"]) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("samatch: error: ") and err.count("\n") == 1
    assert expect in err


def test_an_unknown_option_is_reported_with_the_commands_own_usage(capsys):
    from samatch import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "check", "some/folder", "--bogus"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("usage: samatch data check")
    assert err.strip().endswith("samatch data check: error: unrecognized arguments: --bogus")
