"""One place for each config fact: a schema's defaults are its options' (an option file sets
only what differs), each schema checks its own values, and a model family's and a task's
facts live on their schemas."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

import gradexp.config as C
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
    cfg = C.Config(
        model=ToyConfig(),
        activation=C.ActivationConfig("relu"),
        init=C.InitConfig("default"),
        norm=C.NormConfig("none"),
        clip=C.ClipConfig("none"),
        optim=C.SGDConfig("sgd"),
        data=C.SyntheticDataConfig("synthetic"),
        trainer=C.TrainerConfig(),
    )
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
        (C.SyntheticDataConfig("synthetic", classes=1), "data.classes=1: need at least 2"),
        (C.CopyDataConfig("copy", symbols=1), "data.symbols=1: need at least 2"),
        (C.AddingDataConfig("adding", length=1), "data.length=1: need at least 2"),
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
