"""The names users type: option aliases (init=xavier) resolved on the command line, before
Hydra composes, so that every record of a run names the option itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

import gradexp
import gradexp.config as C
from conftest import TINY, describe, load_events, load_summary, run_cli
from gradexp.preflight import resolve_aliases

OPTIONS_DIR = Path(gradexp.__file__).parent / "configs"
# The product's own example, `gradexp train model=rnn init=xavier clip=agc`, made tiny.
PRODUCT_EXAMPLE = ("model=rnn", "init=xavier", "clip=agc")
RNN_TINY = (
    "trainer.steps=2",
    "trainer.batch_size=16",
    "model.hidden_size=8",
    "data.length=10",
    "data.n_train=64",
    "data.n_test=32",
)


def options(group: str) -> set[str]:
    return {p.stem for p in (OPTIONS_DIR / group).glob("*.yaml")}


@pytest.mark.parametrize("group", sorted(C.ALIASES))
def test_every_alias_names_an_option_and_shadows_none(group: str) -> None:
    names = [name for alias in C.ALIASES[group] for name in alias.names]
    assert len(names) == len(set(names)), names
    assert not set(names) & options(group), "an alias may not hide an option file"
    for alias in C.ALIASES[group]:
        assert alias.option in options(group), alias
        assert alias.why, alias


@pytest.mark.parametrize(
    ("name", "option"),
    [
        ("xavier", "xavier_uniform"),  # Glorot & Bengio 2010: the uniform form
        ("glorot", "xavier_uniform"),
        ("kaiming", "kaiming_normal"),  # He et al. 2015: the normal form
        ("he", "kaiming_normal"),
        ("msra", "kaiming_normal"),
        ("lecun", "lecun_normal"),
        ("xavier_normal", "xavier_normal"),  # an option stands for itself
        ("bogus", "bogus"),  # and an unknown name is left for Hydra's error
    ],
)
def test_the_literature_names(name: str, option: str) -> None:
    assert C.resolve_alias("init", name) == option


@pytest.mark.parametrize(
    ("given", "resolved"),
    [
        (["init=xavier"], ["init=xavier_uniform"]),
        (["+init=he", "model.depth=3"], ["+init=kaiming_normal", "model.depth=3"]),
        (["-m", "init=xavier,he,normal"], ["-m", "init=xavier_uniform,kaiming_normal,normal"]),
        (["-m", "init=choice(glorot,msra)"], ["-m", "init=choice(xavier_uniform,kaiming_normal)"]),
        (["-m", "init=shuffle(lecun,normal)"], ["-m", "init=shuffle(lecun_normal,normal)"]),
        (["init='xavier'"], ["init=xavier_uniform"]),
        (["--cfg", "job", "init=kaiming"], ["--cfg", "job", "init=kaiming_normal"]),
        # not a group's option: left alone
        (["init.fallback=xavier", "activation=he"], ["init.fallback=xavier", "activation=he"]),
        (["init=xavier_normal"], ["init=xavier_normal"]),
        (["-m", "init=glob(x*)"], ["-m", "init=glob(x*)"]),
        (["hydra.job.name=xavier"], ["hydra.job.name=xavier"]),
    ],
)
def test_resolve_aliases_rewrites_the_command_line(given: list[str], resolved: list[str]) -> None:
    assert resolve_aliases(given) == resolved


def test_an_alias_to_a_missing_option_fails_as_an_unknown_option(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from gradexp.cli import main

    monkeypatch.chdir(tmp_path)
    broken = C.Alias(("xavier",), "xavier_gone", "a typo in the table")
    monkeypatch.setitem(C.ALIASES, "init", (broken,))
    monkeypatch.setattr(sys, "argv", ["gradexp"])
    with pytest.raises(SystemExit) as exit_:
        main(["train", "init=xavier", *TINY])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("gradexp: error: init=xavier_gone: unknown option; choose from ")
    assert sorted(line.split("choose from ")[1].split(", ")) == sorted(options("init"))
    assert not (tmp_path / "outputs").exists()


def test_the_product_example_records_the_resolved_option(tmp_path: Path) -> None:
    proc = run_cli(["train", *PRODUCT_EXAMPLE, *RNN_TINY], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    (run,) = (p.parent for p in (tmp_path / "outputs").rglob("summary.json"))
    assert load_summary(run)["status"] == "completed"
    assert load_summary(run)["options"]["init"] == "xavier_uniform"
    # the run's name, its recorded overrides and config, its HParams: the option itself
    assert "init=xavier_uniform" in run.name and "init=xavier," not in run.name, run.name
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert overrides == ["model=rnn", "init=xavier_uniform", "clip=agc", *RNN_TINY]
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert (config["model"]["name"], config["init"]["name"]) == ("rnn", "xavier_uniform")
    assert config["clip"]["name"] == "agc"
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = load_events(run).PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["init"].string_value == "xavier_uniform"


def test_a_sweep_over_aliases_names_its_jobs_by_option(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(["train", "-m", "init=glorot,he", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_init=xavier_uniform", "1_init=kaiming_normal"]
    for job in jobs:
        assert load_summary(sweep / job)["status"] == "completed"
