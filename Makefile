# The two set-up commands of the README. Both install into ./.venv first (idempotent).
.PHONY: run test setup lint

setup:
	bash scripts/setup.sh

# The main job: the embedded default, a federated simulation (`flwr run .`) of three phantom
# hospitals; scripts/flwr_run.sh handles Flower's settings home, telemetry and its SuperLink.
run: setup
	bash scripts/flwr_run.sh

# The whole test suite (CI runs this through .ci/run).
test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check samatch federation clients server simulations tests benchmarks deploy
