"""One message per site per round instead of two (run config ``evaluate-then-train``).

With federated evaluation every round, a site gets two instructions per round: evaluate the global
state aggregated in round r, then (in round r + 1) train from that same state. In a deployment every
instruction costs a fresh ClientApp process and the SuperNode's idle poll (docs/performance_log.md), so
under ``evaluate-then-train`` the evaluate phase of round r sends round r + 1's train instruction
instead, flagged with :data:`EVALUATE_FIRST`: the site evaluates the state it received, then trains
from it, and replies with its update plus the evaluation as a second MetricRecord named
:data:`EVALUATION`. The server records that evaluation as round r's and keeps the replies as round
r + 1's training, whose own phase then sends nothing. Round 1 is a plain train instruction and the
run's last evaluation a plain evaluate instruction.

The site evaluates before it trains and ``train_round`` re-seeds every round, so the metrics and
the trained weights are those of the two-message rounds (tests/test_evaluate_then_train.py).
"""

from __future__ import annotations

EVALUATE_FIRST = "evaluate-first"  # train instruction's config: evaluate the received state first
EVALUATION = "evaluation"  # the reply's MetricRecord holding that evaluation
