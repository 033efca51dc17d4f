"""bench_round's cases: which engine, method, transport and packing each run uses, and the tiny
federation (:class:`Scale`) every engine runs. See ``benchmarks/bench_round.py``."""

from __future__ import annotations

from dataclasses import dataclass

from deploy.node import REPLY_CHECK_S
from federation.pull_retry import DEFAULT_S as PULL_RETRY_S

ENGINES = ("inprocess", "flwr-run", "deploy")
# Run-config settings of each method (the U-Net is the same; SAM-Match adds LoRA on SAM's decoder).
METHODS = {
    "unimatch": {"method.name": "unimatch"},
    "samatch-avg": {"method.name": "samatch", "lora-mode": "avg"},
    "samatch-ffa": {"method.name": "samatch", "lora-mode": "ffa"},
}
MB = 1e6
GOAL_OVERHEAD_S = 2.0  # the performance issue's goals, per round and per site
GOAL_BYTES = 8 * MB
TRAIN_COUNTS = {"num-examples": 6.0, "num-labeled": 6.0, "num-unlabeled": 6.0}


@dataclass(frozen=True)
class Case:
    engine: str
    method: str = "unimatch"  # a key of METHODS
    transport: str = "fp32"
    pack: bool = False
    evaluate_then_train: bool = False  # one message per site per round (federation/evaluate_then_train.py)
    # deploy only: `deploy supernode --warm` and `--poll-interval` (deploy/node.py); False / 3.0 is
    # Flower 1.42's own runtime (a fresh ClientApp process per message, a 3 s idle poll)
    warm: bool = True
    poll_s: float = 0.5
    # deploy only: the first retry of a message's object that has not arrived yet
    # (federation/pull_retry.py; 1.0 is Flower's own) and `deploy supernode --reply-check` (0.5: Flower's)
    pull_retry_s: float = PULL_RETRY_S
    reply_s: float = REPLY_CHECK_S

    @property
    def supernode(self) -> str:
        if self.engine != "deploy":
            return ""
        retry = "" if self.pull_retry_s == PULL_RETRY_S else f", object retry {self.pull_retry_s:g} s"
        reply = "" if self.reply_s == REPLY_CHECK_S else f", reply check {self.reply_s:g} s"
        return f"{'warm' if self.warm else 'fresh'}, poll {self.poll_s:g} s{reply}{retry}"

    @property
    def name(self) -> str:
        joint = " evaluate-then-train" if self.evaluate_then_train else ""
        node = f" ({self.supernode})" if self.supernode else ""
        return f"{self.engine} {self.method} {self.transport}{' packed' if self.pack else ''}{joint}{node}"


# The full benchmark's runs; --quick keeps the first two in-process ones.
FULL_CASES = (
    Case("inprocess", "unimatch", "fp32"),
    Case("inprocess", "unimatch", "fp16"),
    Case("inprocess", "unimatch", "fp32", pack=True),
    Case("inprocess", "samatch-avg", "fp32"),
    Case("inprocess", "samatch-ffa", "fp32"),
    Case("flwr-run", "unimatch", "fp32"),
    Case("flwr-run", "unimatch", "fp16"),
    Case("flwr-run", "unimatch", "fp32", evaluate_then_train=True),
    Case("deploy", "unimatch", "fp32", pack=True),
    Case("deploy", "unimatch", "fp32"),
    # the deployment's default (deploy/commands.py, deploy/node.py), then on Flower 1.42's own runtime
    Case("deploy", "unimatch", "fp32", pack=True, evaluate_then_train=True),
    Case(
        "deploy",
        "unimatch",
        "fp32",
        pack=True,
        evaluate_then_train=True,
        warm=False,
        poll_s=3.0,
        pull_retry_s=1.0,
        reply_s=0.5,
    ),
    # a SAM-Match site: every message's process also builds SAM (its embeddings cached on disk); then
    # with Flower's 1 s first retry of an object still on its way
    Case("deploy", "samatch-avg", "fp32", pack=True, evaluate_then_train=True),
    Case("deploy", "samatch-avg", "fp32", pack=True, evaluate_then_train=True, pull_retry_s=1.0),
)


@dataclass(frozen=True)
class Scale:
    """The tiny federation the engines run: real U-Net width, little data, few steps."""

    sites: int = 2
    rounds: int = 4
    local_iterations: int = 2
    size: int = 32
    base_channels: int = 16
    batch: int = 2
    max_unlabeled: int = 4
    # deploy only: the sites' real data from a partition manifest (deploy.rehearsal), not phantoms
    sites_from: str = ""
    sites_root: str = ""

    def run_config(self, case: Case) -> dict[str, object]:
        return {
            "num-server-rounds": self.rounds,
            "local-iterations": self.local_iterations,
            "min-available-nodes": self.sites,
            "min-train-nodes": self.sites,
            "min-evaluate-nodes": self.sites,
            "evaluate-every": 1,
            "transport": case.transport,
            "pack-arrays": case.pack,
            "evaluate-then-train": case.evaluate_then_train,
            "data.size": self.size,
            "data.labeled": 1,
            "data.max_unlabeled": self.max_unlabeled,
            "data.max_val_cases": 1,
            "model.base_channels": self.base_channels,
            "schedule.batch_size": self.batch,
            "device": "cpu",
            **METHODS[case.method],
        }
