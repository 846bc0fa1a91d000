"""One place for each config fact: a schema's defaults are its options' (an option file sets
only what differs), each schema checks its own values, and a model family's and a task's
facts live on their schemas."""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

import gradexp.config as C
from conftest import composed
from gradexp.cli import CONFIG_DIR
from gradexp.errors import ConfigError

GROUPS = ("model", "activation", "init", "norm", "clip", "optim", "data", "trainer")
OPTION_FILES = sorted(
    (group, path.stem) for group in GROUPS for path in (Path(CONFIG_DIR) / group).glob("*.yaml")
)


def option_file(group: str, option: str) -> tuple[type, dict]:
    """The schema an option file names, and the values the file sets."""
    text = yaml.safe_load((Path(CONFIG_DIR) / group / f"{option}.yaml").read_text()) or {}
    defaults = text.pop("defaults")
    (schema,) = [d for d in defaults if isinstance(d, str) and d.startswith("/schema_")]
    key = schema.removeprefix(f"/schema_{group}_").removesuffix("@_here_")
    return C.SCHEMAS[group][key], text


def schema_defaults(schema: type) -> dict:
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize(("group", "option"), OPTION_FILES)
def test_an_option_file_sets_only_what_differs_from_its_schema(group: str, option: str) -> None:
    schema, values = option_file(group, option)
    defaults = schema_defaults(schema)
    assert set(values) <= set(defaults), f"{group}/{option}: keys its schema lacks"
    same = {k: v for k, v in values.items() if k != "name" and v == defaults[k]}
    assert not same, f"{group}/{option} repeats its schema's defaults: {same}"
    if group != "trainer":
        assert values.get("name", defaults.get("name")) == option  # name picks the code


@pytest.mark.parametrize("option", sorted(C.SCHEMAS["model"]))
def test_a_model_option_names_its_own_schema(option: str) -> None:
    schema, _ = option_file("model", option)
    assert schema is C.SCHEMAS["model"][option]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = C.to_config(compose("config", overrides=[f"model={option}"]))
    assert type(cfg.model) is schema


def test_every_model_option_file_has_a_schema_entry() -> None:
    assert {o for g, o in OPTION_FILES if g == "model"} == set(C.SCHEMAS["model"])
    assert {o for g, o in OPTION_FILES if g == "data"} == set(C.SCHEMAS["data"])


@pytest.mark.parametrize("option", sorted(C.SCHEMAS["model"]))
def test_a_model_family_declares_its_inputs_and_norms(option: str) -> None:
    schema = C.SCHEMAS["model"][option]
    kinds = set(C.DATA_KINDS.values())
    norms = {o for g, o in OPTION_FILES if g == "norm"}
    assert schema.inputs and set(schema.inputs) <= kinds, schema.inputs
    assert "none" in schema.norms and set(schema.norms) <= norms, schema.norms


def test_a_model_schema_that_forgets_its_facts_fails() -> None:
    @dataclasses.dataclass
    class ToyConfig(C.ModelConfig):
        name: str = "toy"

    assert not hasattr(ToyConfig, "inputs") and not hasattr(ToyConfig, "norms")
    cfg = valid_config(model=ToyConfig())
    with pytest.raises(AttributeError, match="inputs"):
        C.validate(cfg)  # never a pairing check silently skipped


@pytest.mark.parametrize("option", sorted(C.SCHEMAS["data"]))
def test_a_task_declares_its_kind(option: str) -> None:
    assert C.SCHEMAS["data"][option].kind in ("vector", "image", "sequence")


def test_the_schema_defaults_are_the_defaults() -> None:
    # optim/sgd.yaml once set lr: 0.01 over OptimConfig.lr = 0.05, which never took effect
    assert C.SGDConfig("sgd").lr == 0.01
    assert C.AdamConfig("adam").lr == C.RMSpropConfig("rmsprop").lr == 0.001
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for option in ("sgd", "adam", "adamw", "rmsprop"):
            cfg = C.to_config(compose("config", overrides=[f"optim={option}"]))
            expected = dataclasses.replace(
                type(cfg.optim)(option), **({"weight_decay": 0.01} if option == "adamw" else {})
            )
            assert cfg.optim == expected, option


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (C.TrainerConfig(steps=0), "trainer.steps=0: must be > 0"),
        (C.TrainerConfig(tbptt=-1), "trainer.tbptt=-1: must be >= 0 (0: full BPTT)"),
        (C.DiagnoseConfig(sustain=0), "diagnose.sustain=0: must be > 0"),
        (C.ObjectiveConfig(metric="x"), "objective.metric=x: unknown; choose from loss/test,"),
        (C.SGDConfig("sgd", momentum=0, nesterov=True), "optim.nesterov=true needs optim."),
        (C.AdamConfig("adam", l1=-1), "optim.l1=-1: must be >= 0"),
        (C.MLPConfig(width=0), "model.width=0: must be > 0"),
        (C.CNNConfig(depth=2, downsample=[2]), "model.downsample=[2]: layer 2 is not in 0..1"),
        (C.NFNetConfig(blocks=[]), "model.blocks=[]: need one or more stages of >= 1"),
        (C.RecurrentConfig("rnn", read="cols"), "model.read=cols: unknown; choose from rows,"),
        (C.IRNNConfig(input_std=-1), "model.input_std=-1: must be >= 0"),
        (
            C.RReLUConfig("rrelu", lower=0.5, upper=0.1),
            "activation.lower=0.5, activation.upper=0.1: need",
        ),
        (C.KaimingInitConfig("kaiming_normal", mode="x"), "init.mode=x: unknown; choose"),
        (C.IdentityInitConfig("identity", fallback="x"), "init.fallback=x: unknown; choose"),
        (C.GroupNormConfig("group", num_groups=0), "norm.num_groups=0: must be > 0"),
        (C.AGCConfig("agc", eps=0), "clip.eps=0: must be > 0"),
        (C.SyntheticDataConfig("synthetic", classes=1), "data.classes=1: must be >= 2 and <="),
        (C.CopyDataConfig("copy", symbols=1), "data.symbols=1: must be >= 2 and <="),
        (C.AddingDataConfig("adding", length=1), "data.length=1: must be >= 2 (one marker"),
        (C.SyntheticImagesDataConfig("synthetic_images", shift=16), "data.shift=16: must be in"),
        (C.DigitsDataConfig("digits", test_fraction=1), "data.test_fraction=1: must be in (0, 1)"),
    ],
    ids=lambda x: type(x).__name__ if dataclasses.is_dataclass(x) else None,
)
def test_each_schema_checks_its_own_values(node: C.Schema, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        node.validate()
    assert str(error.value).startswith(message)
    dataclasses.replace(node, **schema_defaults(type(node))).validate()  # its defaults pass


@pytest.mark.parametrize("model", C.RECURRENT_MODELS)
def test_a_group_norm_on_a_recurrent_model_is_a_config_error(model: str) -> None:
    # It raised AttributeError (a traceback): a recurrent model has no width to divide.
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", "norm=group"])
    with pytest.raises(ConfigError) as error:
        C.to_config(cfg)
    assert (
        str(error.value)
        == f"norm=group does not fit model={model}: model={model} takes none, layer"
    )


# --- ranges: every numeric key states the values it takes ------------------------------
# Every schema: each group's kinds, the groups without options, and the top level (seed).
ALL_SCHEMAS = sorted(
    {schema for kinds in C.SCHEMAS.values() for schema in kinds.values()}
    | {C.DiagnoseConfig, C.ObjectiveConfig, C.Config},
    key=lambda schema: schema.__name__,
)


def numeric_fields(schema: type) -> dict[str, type]:
    """{key: int or float} for each field that holds a number, or an optional one, or a
    list of them (bool is not a number here)."""
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if typing.get_origin(kind) is list:
            (kind,) = typing.get_args(kind)
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:  # X | None
            kind = args[0]
        if kind in (int, float):
            out[f.name] = kind
    return out


@pytest.mark.parametrize("schema", ALL_SCHEMAS, ids=lambda schema: schema.__name__)
def test_every_numeric_key_declares_its_range(schema: type) -> None:
    numeric = numeric_fields(schema)
    ranges = C.ranges_of(schema)
    missing = sorted(set(numeric) - set(ranges))
    assert not missing, f"{schema.__name__}: numeric keys without a declared range: {missing}"
    stray = sorted(set(ranges) - {f.name for f in dataclasses.fields(schema)})
    assert not stray, f"{schema.__name__}: ranges for keys it does not have: {stray}"
    for key, kind in numeric.items():
        allowed = ranges[key]
        assert allowed.integer == (kind is int), f"{schema.__name__}.{key}: {kind.__name__}"
        if kind is int:  # a size torch can index with, a seed torch takes
            assert allowed.low is not None and allowed.high is not None, key


def test_the_range_walk_sees_every_kind_of_numeric_key() -> None:
    assert numeric_fields(C.Config) == {"seed": int}
    assert numeric_fields(C.ObjectiveConfig) == {"penalty": float}  # float | None
    assert numeric_fields(C.ResNetConfig) == {"blocks": int, "width": int}  # list[int]

    @dataclasses.dataclass
    class ToyConfig(C.MLPConfig):
        dropout: float = 0.0

    assert set(numeric_fields(ToyConfig)) - set(C.ranges_of(ToyConfig)) == {"dropout"}


@pytest.mark.parametrize(
    ("allowed", "text"),
    [
        (C.POSITIVE, "must be > 0 and finite"),
        (C.NONNEGATIVE, "must be >= 0 and finite"),
        (C.FINITE, "must be finite"),
        (C.FRACTION, "must be in [0, 1)"),
        (C.Range(0, 1), "must be in [0, 1]"),
        (C.Range(0, 1, low_open=True, high_open=True), "must be in (0, 1)"),
        (C.SIZE, "must be > 0 and <= 2147483647"),
        (C.Range(1, 10**9, integer=True), "must be >= 1 and <= 1000000000"),
        (
            C.Range(0, 2**31 - 1, integer=True, note="0: full BPTT"),
            "must be >= 0 (0: full BPTT) and <= 2147483647",
        ),
        (C.SEED, "must be >= -9223372036854775808 and <= 18446744073709551615"),
        (C.Range(0, low_open=True, infinite=True, note="inf: max"), "must be > 0 (inf: max)"),
    ],
)
def test_a_range_states_itself(allowed: C.Range, text: str) -> None:
    assert str(allowed) == text


def test_a_range_holds_what_it_states() -> None:
    assert 0 in C.FRACTION and 0.999 in C.FRACTION and 1 not in C.FRACTION
    assert math.nan not in C.FINITE and math.inf not in C.FINITE and -math.inf not in C.FINITE
    assert 10**400 not in C.POSITIVE  # an int no float holds
    norm_type = C.ranges_of(C.NormClipConfig)["norm_type"]
    assert math.inf in norm_type and -math.inf not in norm_type and math.nan not in norm_type
    assert 2**64 - 1 in C.SEED and -(2**63) in C.SEED
    assert 2**64 not in C.SEED and -(2**63) - 1 not in C.SEED
    assert 1.0 not in C.SIZE and True not in C.SIZE  # an int key takes ints only


def outside(allowed: C.Range) -> list[float]:
    """Values just outside ``allowed``, NaN and the infinities it refuses."""
    values: list[float] = []
    if allowed.low is not None:
        values.append(allowed.low if allowed.low_open else allowed.low - 1)
    if allowed.high is not None:
        values.append(allowed.high if allowed.high_open else allowed.high + 1)
    if not allowed.integer:
        values.append(math.nan)
        values += [math.inf] if not allowed.infinite else []
        values += [-math.inf] if not allowed.infinite or allowed.low is not None else []
    return values


def valid_config(**changes: object) -> C.Config:
    base = C.Config(
        model=C.MLPConfig(),
        activation=C.ActivationConfig("relu"),
        init=C.InitConfig("default"),
        norm=C.NormConfig("none"),
        clip=C.ClipConfig("none"),
        optim=C.SGDConfig("sgd"),
        data=C.SyntheticDataConfig("synthetic"),
        trainer=C.TrainerConfig(),
    )
    return dataclasses.replace(base, **changes)


RANGED_KEYS = [
    (schema, key)
    for schema in ALL_SCHEMAS
    if schema is not C.Config
    for key in sorted(C.ranges_of(schema))
]


@pytest.mark.parametrize(
    ("schema", "key"), RANGED_KEYS, ids=[f"{s.__name__}.{k}" for s, k in RANGED_KEYS]
)
def test_each_schema_checks_every_range_first(schema: type, key: str) -> None:
    # Through the schema's own validate: one that forgets super().validate() fails here,
    # and so does a cross-key check that runs before the ranges.
    allowed = C.ranges_of(schema)[key]
    defaults = schema_defaults(schema)
    schema(**defaults).validate()
    is_list = isinstance(defaults[key], list)
    for bad in outside(allowed):
        node = schema(**{**defaults, key: [bad] if is_list else bad})
        with pytest.raises(ConfigError) as error:
            node.validate()
        shown = f"[{bad}]: each item" if is_list else f"{bad}:"
        assert str(error.value) == f"{schema.group}.{key}={shown} {allowed}"


@pytest.mark.parametrize("bad", outside(C.SEED))
def test_the_seeds_are_64_bit(bad: int) -> None:
    with pytest.raises(ConfigError) as error:
        C.validate(valid_config(seed=bad))
    assert str(error.value) == f"seed={bad}: {C.SEED}"
    with pytest.raises(ConfigError) as error:
        C.validate(valid_config(data=C.SyntheticDataConfig("synthetic", seed=bad)))
    assert str(error.value) == f"data.seed={bad}: {C.SEED}"
    C.validate(valid_config(seed=2**64 - 1, data=C.SyntheticDataConfig("synthetic", seed=-(2**63))))


def option_overrides(group: str, option: str) -> list[str]:
    """``group=option``, with a model that takes it where the default model does not."""
    if group == "norm" and option not in C.MLPConfig.norms:
        model = next(name for name, norms in C.MODEL_NORMS.items() if option in norms)
        return [f"model={model}", f"norm={option}"]
    return [f"{group}={option}"]


@pytest.mark.parametrize(("group", "option"), OPTION_FILES)
def test_every_option_is_within_its_ranges(group: str, option: str) -> None:
    cfg = composed(*option_overrides(group, option))
    assert group == "trainer" or getattr(cfg, group).name == option


def preset_jobs(preset: str) -> list[list[str]]:
    """The overrides of each job of an experiment preset's own sweep."""
    text = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / f"{preset}.yaml").read_text())
    params = text.get("hydra", {}).get("sweeper", {}).get("params", {})
    axes = [
        [f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()
    ]
    return [[f"experiment={preset}", *job] for job in itertools.product(*axes)]


@pytest.mark.parametrize(
    "preset", sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
)
def test_every_preset_job_is_within_its_ranges(preset: str) -> None:
    jobs = preset_jobs(preset)
    assert len(jobs) > 1  # a preset is a sweep
    for job in jobs:
        composed(*job)  # raises ConfigError on a value outside its range


def test_infinity_norm_clipping_is_accepted() -> None:
    cfg = composed("clip=norm", "clip.norm_type=inf")
    assert cfg.clip.norm_type == math.inf
