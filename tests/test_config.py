"""Unit tests for controller/config.py: the TOML contract, validation messages, shipped examples."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from controller.config import (
    Config,
    ControllerConfig,
    DeploymentConfig,
    demo_config,
    load_config,
    parse_config,
)
from mesh.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"

CONTROLLER = """\
[controller]
client_endpoint = "tcp://127.0.0.1:6555"
admin_endpoint  = "tcp://127.0.0.1:6556"
worker_endpoint = "tcp://127.0.0.1:6557"
metrics_port    = 9470
"""

MLP = """\
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
checkpoint = "/weights/mlp.pt"
stages = 2
worlds = 2
min_worlds = 1
max_worlds = 4
slo_p99_ms = 50.0
max_batch_size = 32
max_batch_delay_ms = 2.0
"""

ECHO = """\
[[deployments]]
name = "echo"
model = "worker.models.echo:build"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meshserve.toml"
    path.write_text(text)
    return path


def mlp_with(**overrides: object) -> str:
    """The MLP deployment table with keys replaced (or added) as TOML literals."""
    lines = [line for line in MLP.splitlines() if line.split(" = ")[0] not in overrides]
    lines += [f"{key} = {value}" for key, value in overrides.items()]
    return "\n".join(lines) + "\n"


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def rejected(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


# -- the contract keys ------------------------------------------------------------------------


def test_every_contract_key_is_read_from_the_file(tmp_path: Path) -> None:
    config = load_text(tmp_path, CONTROLLER + "\n" + MLP)
    assert config.controller == dataclasses.replace(
        ControllerConfig(),
        client_endpoint="tcp://127.0.0.1:6555",
        admin_endpoint="tcp://127.0.0.1:6556",
        worker_endpoint="tcp://127.0.0.1:6557",
        metrics_port=9470,
    )
    assert config.deployments == (
        dataclasses.replace(
            DeploymentConfig(name="mlp", model="worker.models.mlp:build"),
            checkpoint="/weights/mlp.pt",
            stages=2,
            worlds=2,
            min_worlds=1,
            max_worlds=4,
            slo_p99_ms=50.0,
            max_batch_size=32,
            max_batch_delay_ms=2.0,
        ),
    )
    assert config.deployment("mlp") is config.deployments[0]


def test_omitted_keys_take_their_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, ECHO)
    assert config.controller == ControllerConfig()
    assert config.deployments == (DeploymentConfig(name="echo", model="worker.models.echo:build"),)


def test_several_deployments_keep_their_order(tmp_path: Path) -> None:
    config = load_text(tmp_path, MLP + "\n" + ECHO)
    assert [d.name for d in config.deployments] == ["mlp", "echo"]
    assert config.deployment("echo").model == "worker.models.echo:build"
    with pytest.raises(KeyError):
        config.deployment("missing")


def test_an_integer_is_accepted_where_a_number_is_expected(tmp_path: Path) -> None:
    config = load_text(tmp_path, mlp_with(slo_p99_ms=75, max_batch_delay_ms=0))
    dep = config.deployment("mlp")
    assert dep.slo_p99_ms == 75.0 and isinstance(dep.slo_p99_ms, float)
    assert dep.max_batch_delay_ms == 0.0


def test_factory_kwargs_are_read_as_a_table(tmp_path: Path) -> None:
    config = load_text(tmp_path, MLP + "factory_kwargs = { hidden = 128, layers = 2 }\n")
    assert config.deployment("mlp").factory_kwargs == {"hidden": 128, "layers": 2}


# -- unknown keys -----------------------------------------------------------------------------


def test_an_unknown_deployment_key_is_rejected_by_its_dotted_name(tmp_path: Path) -> None:
    message = rejected(tmp_path, MLP + "max_batchsize = 8\n")
    assert "deployments[mlp].max_batchsize" in message


def test_an_unknown_controller_key_is_rejected_by_its_dotted_name(tmp_path: Path) -> None:
    message = rejected(tmp_path, CONTROLLER + "typo = 1\n\n" + MLP)
    assert "controller.typo" in message


def test_an_unknown_top_level_key_is_rejected_by_name(tmp_path: Path) -> None:
    message = rejected(tmp_path, "[workers]\ncount = 2\n\n" + MLP)
    assert "workers" in message


def test_an_unnamed_deployment_is_located_by_its_index(tmp_path: Path) -> None:
    message = rejected(tmp_path, MLP + '\n[[deployments]]\nmodel = "worker.models.echo:build"\n')
    assert "deployments[1].name" in message


# -- types and ranges -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "literal"),
    [
        ("stages", '"2"'),
        ("stages", "2.0"),
        ("stages", "true"),
        ("worlds", "[2]"),
        ("slo_p99_ms", '"fast"'),
        ("slo_p99_ms", "false"),
        ("max_batch_size", "2.5"),
        ("checkpoint", "0"),
        ("model", "{ module = 'x' }"),
        ("factory_kwargs", '"hidden=128"'),
    ],
)
def test_a_deployment_value_of_the_wrong_type_is_rejected_by_name(
    tmp_path: Path, key: str, literal: str
) -> None:
    message = rejected(tmp_path, mlp_with(**{key: literal}))
    assert f"deployments[mlp].{key}" in message


@pytest.mark.parametrize(
    ("key", "literal"),
    [("metrics_port", '"9464"'), ("client_endpoint", "5555"), ("heartbeat_interval_ms", "0.5"),
     ("max_idle_stages", "-1"), ("max_idle_stages", "2.0"), ("busy_poll_us", "-1"),
     ("busy_poll_us", "200000"), ("busy_poll_us", "0.5"), ("max_stage_bytes", "-1"),
     ("max_stage_bytes", "1e9"), ("max_stage_bytes", str(2**50 + 1))],
)
def test_a_controller_value_of_the_wrong_type_or_range_is_rejected_by_name(
    tmp_path: Path, key: str, literal: str
) -> None:
    message = rejected(tmp_path, f"[controller]\n{key} = {literal}\n\n" + MLP)
    assert f"controller.{key}" in message


def test_deployments_written_as_a_single_table_are_rejected(tmp_path: Path) -> None:
    rejected(tmp_path, MLP.replace("[[deployments]]", "[deployments]"))


def test_min_worlds_above_max_worlds_is_rejected(tmp_path: Path) -> None:
    message = rejected(tmp_path, mlp_with(min_worlds=5, max_worlds=3, worlds=4))
    assert "deployments[mlp].min_worlds" in message


@pytest.mark.parametrize("worlds", [0, 5])
def test_a_world_count_outside_its_bounds_is_rejected(tmp_path: Path, worlds: int) -> None:
    message = rejected(tmp_path, mlp_with(worlds=worlds, min_worlds=1, max_worlds=4))
    assert "deployments[mlp].worlds" in message


@pytest.mark.parametrize(
    ("key", "literal"),
    [("stages", 0), ("max_batch_size", 0), ("slo_p99_ms", "-1.0"), ("slo_p99_ms", "nan"),
     ("max_batch_delay_ms", "-0.5"), ("max_worlds", 0)],
)
def test_a_deployment_value_out_of_range_is_rejected_by_name(
    tmp_path: Path, key: str, literal: object
) -> None:
    message = rejected(tmp_path, mlp_with(**{key: literal}))
    assert f"deployments[mlp].{key}" in message


@pytest.mark.parametrize(
    "factory",
    ["worker.models.mlp.build", "worker.models.mlp:", ":build", "worker.models.mlp:build()",
     "worker models:build", "worker.models.mlp:build:x", ""],
)
def test_a_model_that_is_not_a_factory_string_is_rejected(tmp_path: Path, factory: str) -> None:
    message = rejected(tmp_path, mlp_with(model=f'"{factory}"'))
    assert "deployments[mlp].model" in message


@pytest.mark.parametrize("name", ["", "has space", "-leading-dash", "x" * 65])
def test_a_bad_deployment_name_is_rejected(tmp_path: Path, name: str) -> None:
    message = rejected(tmp_path, mlp_with(name=f'"{name}"'))
    assert ".name" in message


def test_a_deployment_configured_twice_is_rejected(tmp_path: Path) -> None:
    message = rejected(tmp_path, MLP + "\n" + MLP)
    assert "mlp" in message
    assert "twice" in message


@pytest.mark.parametrize(
    "text", ["", CONTROLLER, "deployments = []\n"], ids=["blank", "no_table", "empty_array"]
)
def test_a_config_without_deployments_is_rejected(tmp_path: Path, text: str) -> None:
    message = rejected(tmp_path, text)
    assert "deployments" in message


def test_equal_endpoints_are_rejected(tmp_path: Path) -> None:
    text = CONTROLLER.replace("6556", "6555") + "\n" + MLP
    message = rejected(tmp_path, text)
    assert "endpoint" in message


@pytest.mark.parametrize("endpoint", ["127.0.0.1:5555", "tcp://127.0.0.1", "http://127.0.0.1:5555"])
def test_an_endpoint_that_is_not_a_zeromq_address_is_rejected(
    tmp_path: Path, endpoint: str
) -> None:
    message = rejected(tmp_path, f'[controller]\nclient_endpoint = "{endpoint}"\n\n' + MLP)
    assert "controller.client_endpoint" in message


def test_a_heartbeat_timeout_shorter_than_two_intervals_is_rejected(tmp_path: Path) -> None:
    text = "[controller]\nheartbeat_interval_ms = 500\nheartbeat_timeout_ms = 900\n\n" + MLP
    assert "heartbeat_timeout_ms" in rejected(tmp_path, text)


# -- the file itself --------------------------------------------------------------------------


def test_a_missing_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=r"nowhere\.toml"):
        load_config(path)


def test_a_file_that_is_not_toml_is_a_config_error(tmp_path: Path) -> None:
    message = rejected(tmp_path, "[controller\nclient_endpoint = \n")
    assert "TOML" in message


# -- built-in and shipped configs -------------------------------------------------------------


def as_raw(config: Config) -> dict[str, object]:
    return {
        "controller": dataclasses.asdict(config.controller),
        "deployments": [d.to_wire() for d in config.deployments],
    }


def test_the_demo_config_passes_every_check_of_a_file_config() -> None:
    demo = demo_config()
    assert parse_config(as_raw(demo)) == demo
    assert "mlp" in [d.name for d in demo.deployments]


def test_the_demo_factories_are_importable() -> None:
    for dep in demo_config().deployments:
        module, func = dep.model.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.toml"))


def test_the_examples_folder_ships_the_mlp_and_echo_configs() -> None:
    assert {p.name for p in example_files()} >= {"mlp.toml", "echo.toml"}


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_every_shipped_example_config_loads_and_names_importable_factories(path: Path) -> None:
    config = load_config(path)
    for dep in config.deployments:
        module, func = dep.model.split(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_the_mlp_example_serves_one_stage_worlds_two_at_start() -> None:
    dep = load_config(EXAMPLES / "mlp.toml").deployment("mlp")
    assert (dep.model, dep.stages, dep.worlds) == ("worker.models.mlp:build", 1, 2)


def test_the_echo_example_serves_the_echo_handler() -> None:
    dep = load_config(EXAMPLES / "echo.toml").deployment("echo")
    assert dep.model == "worker.models.echo:build"


def test_a_kubernetes_grace_of_zero_a_force_delete_is_rejected_by_name() -> None:
    raw = {"deployments": [{"name": "mlp", "model": "worker.models.mlp:build"}],
           "kubernetes": {"termination_grace_s": 0}}
    with pytest.raises(ConfigError, match=r"kubernetes\.termination_grace_s"):
        parse_config(raw)
    raw["kubernetes"] = {"termination_grace_s": 1}
    assert parse_config(raw).kubernetes.termination_grace_s == 1


def test_curve_with_the_kubernetes_launcher_needs_the_workers_key_secret(tmp_path: Path) -> None:
    for folder in ("clients", "workers", "admins"):
        (tmp_path / folder).mkdir()
    (tmp_path / "controller.key_secret").write_text("")
    raw = {"controller": {"launcher": "kubernetes"},
           "deployments": [{"name": "mlp", "model": "worker.models.mlp:build"}],
           "security": {"curve": True, "controller_key": "controller.key_secret",
                        "client_keys": "clients", "worker_keys": "workers",
                        "admin_keys": "admins"}}
    with pytest.raises(ConfigError, match=r"kubernetes\.keys_secret"):
        parse_config(raw, tmp_path)
    raw["kubernetes"] = {"keys_secret": "meshserve-worker-key"}
    config = parse_config(raw, tmp_path)
    assert config.security.curve and config.kubernetes.keys_secret == "meshserve-worker-key"


def test_a_workers_join_checks_the_deployments_ranges_as_the_config_does() -> None:
    """The ranges live in the record both sides decode (mesh/spec.py): a join whose deployment
    has a value out of range is refused by the worker, naming the field and the value."""
    from mesh.errors import BadRequest
    from mesh.messages import Join

    spec = {"name": "mlp", "model": "worker.models.mlp:build", "stages": 2}
    join = {"kind": "join", "world_id": 1, "epoch": 1, "rank": 0, "size": 2, "deployment": spec}
    assert Join.from_wire(join).deployment.stages == 2
    for key, value in (("stages", 0), ("max_batch_size", 10**6), ("kv_cache_mb", -1.0),
                       ("name", "has space"), ("split_points", [0])):
        with pytest.raises(BadRequest) as info:
            Join.from_wire({**join, "deployment": {**spec, key: value}})
        assert f"join.deployment.{key}" in str(info.value)
        shown = repr(value[0] if isinstance(value, list) else value)
        assert f"got {shown}" in str(info.value)


@pytest.mark.parametrize(("key", "literal", "shown"), [
    ("stages", 0, "got 0"), ("slo_p99_ms", "nan", "got nan"), ("max_seqs", 5000, "got 5000")])
def test_a_range_error_names_the_field_and_the_value(tmp_path: Path, key: str, literal: object,
                                                     shown: str) -> None:
    message = rejected(tmp_path, mlp_with(**{key: literal}))
    assert message.startswith(f"deployments[mlp].{key}: expected") and shown in message


def test_the_autoscaler_table_sets_the_policys_thresholds(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[autoscaler]\nmin_samples = 5\nhold_s = 60\n\n" + MLP)
    assert (config.autoscaler.min_samples, config.autoscaler.hold_s) == (5, 60.0)
    assert config.autoscaler.target_util == 0.75  # the rest keep their defaults
    assert "autoscaler.target_util" in rejected(tmp_path, "[autoscaler]\ntarget_util = 1.5\n\n"
                                                + MLP)
    assert "autoscaler.policy" in rejected(tmp_path, '[autoscaler]\npolicy = "magic"\n\n' + MLP)
    assert "autoscaler.down_util" in rejected(
        tmp_path, "[autoscaler]\ntarget_util = 0.5\ndown_util = 0.6\n\n" + MLP)
