"""samatch.config: defaults, dotted overrides, type coercion, checks, TOML / JSON round trips."""

import dataclasses

import pytest

from samatch.config import (
    DataConfig,
    MethodConfig,
    ModelConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    coerce_value,
    load_config,
    parse_set_args,
)


def test_defaults():
    # Execute
    cfg = TrainConfig()

    # Assert: the values the docs and the UniMatch medical recipe rely on
    assert cfg.data.size == 256
    assert cfg.data.labeled == 3
    assert cfg.model.base_channels == 16
    assert cfg.model.num_classes == 0  # 0 = take it from the dataset
    assert cfg.model.dropout == (0.05, 0.1, 0.2, 0.3, 0.5)
    assert cfg.method.name == "unimatch"
    assert cfg.method.threshold == 0.95
    assert cfg.schedule.iterations == 30000
    assert cfg.schedule.batch_size == 12
    assert cfg.schedule.lr == 0.01
    assert cfg.device == "auto"
    assert cfg.seed == 0


def test_dotted_and_nested_overrides_agree():
    # Prepare
    dotted = {"method.threshold": 0.9, "schedule.iterations": 200, "data.size": 64, "seed": 3}
    nested = {"method": {"threshold": 0.9}, "schedule": {"iterations": 200}, "data": {"size": 64}, "seed": 3}

    # Execute
    a = apply_overrides(TrainConfig(), dotted)
    b = apply_overrides(TrainConfig(), nested)

    # Assert
    assert a == b
    assert (a.method.threshold, a.schedule.iterations, a.data.size, a.seed) == (0.9, 200, 64, 3)
    assert a.method.name == "unimatch"  # untouched keys keep their defaults


def test_overrides_do_not_mutate_the_input():
    cfg = TrainConfig()
    apply_overrides(cfg, {"data.size": 64})
    assert cfg.data.size == 256


def test_strings_are_coerced_to_the_field_types():
    # Prepare: what `--set` delivers
    sets = parse_set_args(
        ["method.threshold=0.5", "schedule.iterations=3", "model.dropout=0.1,0.2,0.3,0.4,0.5", "data.root=0"]
    )

    # Execute
    cfg = apply_overrides(TrainConfig(), sets)

    # Assert: exact types, not just equal values
    assert cfg.method.threshold == 0.5 and type(cfg.method.threshold) is float
    assert cfg.schedule.iterations == 3 and type(cfg.schedule.iterations) is int
    assert cfg.model.dropout == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert type(cfg.model.dropout) is tuple
    assert cfg.data.root == "0"


@pytest.mark.parametrize(
    "value,expected", [("true", True), ("True", True), ("1", True), ("false", False), ("0", False)]
)
def test_bool_coercion(value, expected):
    # No TrainConfig field is a bool yet; the converter is what --set values go through.
    assert coerce_value(value, bool, "x") is expected


def test_bool_coercion_rejects_other_words():
    with pytest.raises(ValueError, match="x: expected true/false"):
        coerce_value("yes", bool, "x")


def test_whole_float_is_accepted_for_int():
    # TOML / JSON may write 200.0 for an iteration count; 200.5 is an error (below).
    assert apply_overrides(TrainConfig(), {"schedule.iterations": 200.0}).schedule.iterations == 200


@pytest.mark.parametrize(
    "key",
    ["data.sise", "nonsense", "method.threshold.x", "data.size.extra", "schedule"],
)
def test_unknown_key_is_named(key):
    with pytest.raises(ValueError, match="unknown config key") as err:
        apply_overrides(TrainConfig(), {key: "1"})
    assert key in str(err.value)


def test_unknown_nested_key_is_named_with_its_section():
    with pytest.raises(ValueError, match="data.sise"):
        apply_overrides(TrainConfig(), {"data": {"sise": 64}})


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("data.size", "abc", "data.size: expected int"),
        ("data.size", 64.5, "data.size: expected an integer"),
        ("schedule.lr", "fast", "schedule.lr: expected float"),
        ("schedule.lr", [1], "schedule.lr: expected float"),
        ("model.dropout", "a,b,c,d,e", "model.dropout: expected float"),
        ("data.size", None, "data.size: expected int"),
    ],
)
def test_bad_value_is_a_value_error(key, value, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(TrainConfig(), {key: value})


def test_scalar_for_tuple_field_is_a_value_error():
    with pytest.raises(ValueError):
        apply_overrides(TrainConfig(), {"model.dropout": 0.5})


def test_list_for_str_field_is_a_value_error():
    with pytest.raises(ValueError):
        apply_overrides(TrainConfig(), {"data.root": [1, 2]})


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: MethodConfig(threshold=1.5), "method.threshold must be in"),
        (lambda: MethodConfig(threshold=-0.1), "method.threshold must be in"),
        (lambda: DataConfig(labeled=0), "data.labeled must be >= 1"),
        (lambda: DataConfig(size=72), "data.size must be a multiple of 16"),
        (lambda: DataConfig(size=16), "data.size must be a multiple of 16 and >= 32"),
        (lambda: ModelConfig(num_classes=1), "model.num_classes must be >= 2"),
        (lambda: ModelConfig(dropout=(0.1, 0.2)), "one rate per encoder level"),
        (lambda: ScheduleConfig(iterations=0), "must be >= 1"),
        (lambda: ScheduleConfig(batch_size=0), "must be >= 1"),
    ],
)
def test_post_init_checks(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_bounds_are_inclusive(threshold):
    assert MethodConfig(threshold=threshold).threshold == threshold


def test_post_init_checks_also_run_through_overrides():
    with pytest.raises(ValueError, match="data.size must be a multiple of 16"):
        apply_overrides(TrainConfig(), {"data.size": "100"})


def test_parse_set_args():
    assert parse_set_args(["a.b=1", " c = x=y "]) == {"a.b": "1", "c": "x=y"}
    with pytest.raises(ValueError, match="key=value"):
        parse_set_args(["a.b"])


def test_toml_file_round_trip(tmp_path):
    # Prepare: tables, dotted keys and a top-level key in one file, plus a later override
    path = tmp_path / "run.toml"
    path.write_text(
        'seed = 7\ndevice = "cpu"\nmethod.threshold = 0.8\n'
        "[data]\nsize = 64\nlabeled = 2\n"
        "[model]\ndropout = [0.0, 0.0, 0.1, 0.1, 0.2]\n"
    )

    # Execute
    cfg = load_config(path, {"data.labeled": "5"})

    # Assert
    assert cfg.seed == 7 and cfg.device == "cpu"
    assert cfg.method.threshold == 0.8
    assert cfg.data.size == 64
    assert cfg.data.labeled == 5  # the override wins over the file
    assert cfg.model.dropout == (0.0, 0.0, 0.1, 0.1, 0.2)
    assert cfg.schedule == ScheduleConfig()


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("data.size = = 3\n")
    with pytest.raises(ValueError, match="cannot parse config"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[data]\nsise = 64\n")
    with pytest.raises(ValueError, match="data.sise"):
        load_config(unknown)


def test_json_save_load_round_trip(tmp_path):
    # Prepare: every section changed from its default
    cfg = apply_overrides(
        TrainConfig(),
        {
            "data": {"root": "/x", "format": "busi", "size": 64, "max_val_cases": 2},
            "model": {"num_classes": 2, "dropout": [0.0, 0.1, 0.1, 0.2, 0.3]},
            "method": {"name": "fixmatch", "threshold": 0.7},
            "schedule": {"iterations": 5, "lr": 0.03},
            "device": "cpu",
            "seed": 4,
        },
    )

    # Execute
    cfg.save(tmp_path / "config.json")
    back = TrainConfig.load(tmp_path / "config.json")
    via_load_config = load_config(tmp_path / "config.json")

    # Assert: equal dataclasses, tuples stay tuples after the JSON list
    assert back == cfg
    assert via_load_config == cfg
    assert type(back.model.dropout) is tuple
    assert dataclasses.asdict(back) == cfg.to_dict()


def test_toml_run_config_becomes_one_flower_config_line(tmp_path):
    # Prepare: a run-config file of each value type
    from flwr.common.config import parse_config_args

    from federation.config import toml_as_config_line

    path = tmp_path / "run.toml"
    path.write_text('num-server-rounds = 2\nfedbn = true\nschedule.lr = 0.01\nmethod.name = "samatch"\n')

    # Execute
    line = toml_as_config_line(path)

    # Assert: the exact string, and Flower reads it back (beside another -c) as the file's values
    assert line == 'num-server-rounds=2 fedbn=true schedule.lr=0.01 method.name="samatch"'
    parsed = parse_config_args(['out-dir="/x"', line])
    assert parsed == {
        "out-dir": "/x",
        "num-server-rounds": 2,
        "fedbn": True,
        "schedule.lr": 0.01,
        "method.name": "samatch",
    }
    (tmp_path / "bad.toml").write_text('data.root = "a\\"b"\n')
    with pytest.raises(ValueError, match="bad.toml: data.root: quotes"):
        toml_as_config_line(tmp_path / "bad.toml")


def test_relative_manifest_is_found_in_the_app_folder(tmp_path, monkeypatch):
    # Flower runs the apps from another working directory: the manifest ships inside the app
    from federation.config import APP_ROOT, parse_run_config

    monkeypatch.chdir(tmp_path)
    _, fed = parse_run_config({"partition-manifest": "simulations/crosstask/manifest.json"})
    assert fed.partition_manifest == str(APP_ROOT / "simulations/crosstask/manifest.json")
    _, fed = parse_run_config({"partition-manifest": "missing.json"})
    assert fed.partition_manifest == "missing.json"  # unchanged: the reader names it in its error
