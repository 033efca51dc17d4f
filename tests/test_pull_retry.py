"""federation.pull_retry: Flower's object pulls retry a missing object after 0.05 s instead of 1 s, in
the ServerApp's grid, the SuperNode's loop and the warm server's ClientApps (with the rest of the warm
server's set-up of Flower's ClientApp module)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

from federation import pull_retry

REPO = Path(__file__).resolve().parents[1]


def gap_before_retry(pull) -> float:
    """Seconds between the first request for an object (missing: it is still being uploaded) and
    the second, through ``pull`` (Flower's ``pull_objects`` as a module would call it)."""
    asked: list[float] = []

    def pull_object(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) == 1:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert pull(["abc"], pull_object_fn=pull_object) == {"abc": b"content"}
    return asked[1] - asked[0]


def test_a_missing_object_is_asked_for_again_after_the_short_wait(monkeypatch):
    # Prepare: a module that imported Flower's pull_objects, as flwr.superlink.grid.http_grid does
    module = types.ModuleType("caller")
    module.pull_objects = pull_objects
    monkeypatch.delenv(pull_retry.ENV, raising=False)

    # Execute: Flower's own wait, then the shortened one (twice: the second call rebinds, not nests)
    flower_s = gap_before_retry(module.pull_objects)
    assert pull_retry.shorten(module, "pull_objects") == 0.05
    assert pull_retry.shorten(module, "pull_objects", 0.1) == 0.1
    short_s = gap_before_retry(module.pull_objects)

    # Assert: Flower waits 1 s +-20%; shortened, 0.1 s +-20% (a 2-core machine adds a little)
    print(f"checked: retry after {flower_s:.3f} s (Flower) and {short_s:.3f} s (shortened to 0.1 s)")
    assert flower_s >= 0.75
    assert 0.075 <= short_s < 0.5
    assert module.pull_objects.func is pull_objects and module.pull_objects.keywords == {
        "initial_backoff": 0.1
    }


@pytest.mark.parametrize(
    "value, expected",
    [(None, 0.05), ("", 0.05), (" 0.2 ", 0.2), ("1", 1.0), ("10", 10.0)]
    + [(bad, None) for bad in ("0", "-1", "x", "inf", "nan", "11")],
)
def test_the_first_retry_comes_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(pull_retry.ENV, raising=False)
    else:
        monkeypatch.setenv(pull_retry.ENV, value)
    if expected is None:
        with pytest.raises(
            ValueError,
            match=rf"\$FEDSAMATCH_PULL_RETRY_S={value!r}: must be a number of seconds in \(0, 10\]",
        ):
            pull_retry.first_retry_s()
    else:
        assert pull_retry.first_retry_s() == expected


def test_a_function_without_the_keyword_is_refused():
    module = types.ModuleType("caller")
    module.pull = lambda ids: ids
    with pytest.raises(TypeError, match="caller.pull takes no 'initial_backoff': Flower changed"):
        pull_retry.shorten(module, "pull")


def test_the_server_app_shortens_its_grids_object_retry(tmp_path, monkeypatch):
    # Prepare: Flower's grid module as it is now (restored afterwards), the default retry
    from conftest import TINY_FEDERATION, phantom_nodes
    from flwr.superlink.grid import http_grid

    from clients.client_app import app as client_app
    from federation.inprocess import run_inprocess
    from federation.local import clear_sessions
    from server.server_app import app as server_app

    monkeypatch.setattr(http_grid, "pull_objects", pull_objects)
    monkeypatch.delenv(pull_retry.ENV, raising=False)
    assert "pull_objects(" in Path(http_grid.__file__).read_text()  # the name its grid calls

    # Execute: one round of the real ServerApp (the SuperNode's side: tests/test_deploy_node.py)
    clear_sessions()
    one_site = {"min-available-nodes": 1, "min-train-nodes": 1, "min-evaluate-nodes": 1}
    run_config = {**TINY_FEDERATION, **one_site, "num-server-rounds": 1, "out-dir": str(tmp_path / "run")}
    run_inprocess(server_app, client_app, run_config, phantom_nodes(1))

    # Assert
    assert http_grid.pull_objects.func is pull_objects
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.05}


def test_the_warm_server_sets_up_flowers_clientapp_and_keeps_no_project_module():
    # In a fresh process (the warm server forgets this project's modules, which a test process needs)
    code = (
        "import json, sys; from deploy import warm; warm._entry(warm.ENTRY); warm.patch_clientapp(); "
        "app = sys.modules[warm.CLIENTAPP_MODULE]; pull = app.pull_and_inflate_object_from_tree; "
        "left = [m for m in sys.modules if m.partition('.')[0] in warm.PROJECT_PACKAGES]; "
        "print(json.dumps({'keywords': pull.keywords, 'left': left, "
        "'fab_check': app.install_from_fab.__wrapped__.__module__}))"
    )
    env = {"PATH": "/usr/bin:/bin", pull_retry.ENV: "0.02"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    # the object retry shortened, Flower's FAB install wrapped (tests/test_deploy_node.py), no module
    # of this project's left for a child to inherit
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "keywords": {"initial_backoff": 0.02},
        "left": [],
        "fab_check": "flwr.cli.install",
    }
