"""End to end: the ``gradexp`` command in a subprocess, as a user runs it.

Every training run here is tiny (a 3-layer width-8 MLP, 6 steps): the seconds go to
Python and torch start-up, so runs are shared by several tests where natural.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import gradexp
from conftest import (
    REPO_ROOT,
    TINY,
    TINY_DEPTH,
    Run,
    describe,
    layer_tags,
    load_summary,
    run_cli,
    scalar_series,
    train,
)
from gradexp.config import EXECUTION_KEYS

TAGS = layer_tags(TINY_DEPTH)  # 00_hidden.0, 01_hidden.1, 02_hidden.2, 03_head
NAMES = [t.split("_", 1)[1] for t in TAGS]
LOG_STEPS = [0, 2, 3, 4, 5]  # log_every=2, hist/eval_every=3, and the last step
GROUPS = ("model", "activation", "init", "norm", "clip", "optim", "data", "trainer")
PER_LAYER_SCALARS = ("grad_norm", "weight_norm", "update_ratio", "signal_bwd", "signal_fwd")
FINAL_METRICS = ("loss/train", "acc/train", "loss/test", "acc/test")


CONFIG_YAML = yaml.safe_load(
    (Path(gradexp.__file__).parent / "configs" / "config.yaml").read_text()
)


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files the package ships."""
    configs = Path(gradexp.__file__).parent / "configs" / group
    return sorted(p.stem for p in configs.glob("*.yaml"))


def stderr_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command may print on stderr."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, describe(proc)
    assert lines[0].strip(), describe(proc)
    return lines[0]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode != 0, describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    line = stderr_line(proc)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


# --- gradexp train, end to end ---------------------------------------------------------


@pytest.fixture(scope="module")
def agc_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One tiny run with AGC: clipping adds the most tags."""
    return train(tmp_path_factory.mktemp("agc"), *TINY, "clip=agc").ok()


def test_train_writes_summary(agc_run: Run) -> None:
    assert "Traceback" not in agc_run.proc.stderr
    summary = load_summary(agc_run.dir, strict=True)
    assert summary["status"] == "completed"
    assert summary["steps"] == 6
    assert summary["nonfinite"] is None
    assert summary["skipped_steps"] == 0
    assert summary["wall_time_s"] > 0
    assert summary["steps_per_s"] > 0
    for key in FINAL_METRICS:
        assert math.isfinite(summary["metrics"][key]), key
    assert 0 <= summary["metrics"]["acc/train"] <= 1
    assert 0 <= summary["metrics"]["acc/test"] <= 1

    layers = summary["layers"]
    assert [layer["index"] for layer in layers] == list(range(TINY_DEPTH + 1))
    assert [layer["name"] for layer in layers] == NAMES
    for layer in layers:
        for key in ("grad_norm", "signal_bwd", "signal_fwd"):
            for which in ("first", "last"):
                value = layer[key][which]
                assert isinstance(value, float) and math.isfinite(value) and value > 0, (
                    layer["name"],
                    key,
                    which,
                    value,
                )


def test_train_writes_hydra_files(agc_run: Run) -> None:
    log = (agc_run.dir / "train.log").read_text()
    assert "start: {'model': 'mlp'" in log and "status completed after 6 steps" in log
    assert log.count("status completed") == 1
    composed = yaml.safe_load((agc_run.dir / ".hydra" / "config.yaml").read_text())
    assert composed["model"]["depth"] == TINY_DEPTH
    assert composed["clip"]["name"] == "agc"
    overrides = yaml.safe_load((agc_run.dir / ".hydra" / "overrides.yaml").read_text())
    assert overrides == [*TINY, "clip=agc"]


def test_event_file_has_every_tag(agc_run: Run) -> None:
    tags = agc_run.events.Tags()
    scalars, histograms = set(tags["scalars"]), set(tags["histograms"])
    expected = {f"{q}/{t}" for q in PER_LAYER_SCALARS for t in TAGS}
    # AGC leaves the head out by default: no clipped-unit fraction for it.
    expected |= {f"clip_frac/{t}" for t in TAGS[:-1]}
    expected |= {
        *FINAL_METRICS,
        "opt/lr",
        "grad/norm_pre_clip",
        "grad/norm_post_clip",
        "clip/frac",
    }
    assert expected <= scalars, sorted(expected - scalars)
    assert "clip/coef" not in scalars  # clip=norm only
    assert f"clip_frac/{TAGS[-1]}" not in scalars
    assert {f"grad_log10/{t}" for t in TAGS} <= histograms
    # Each step-0 histogram holds every gradient entry of its layer (weights and bias;
    # sigmoid units: none exactly 0): 32 features -> 8 -> 8 -> 8 -> 10 classes.
    hists = [agc_run.events.Histograms(f"grad_log10/{t}")[0].histogram_value for t in TAGS]
    counts = [h.num for h in hists]
    assert counts == [32 * 8 + 8, 8 * 8 + 8, 8 * 8 + 8, 8 * 10 + 10]
    # In decades of |entry|: no entry exceeds the layer's gradient norm, and the mean
    # log10 |entry| is at most log10 of the RMS entry, ||g|| / sqrt(n) (Jensen).
    for tag, hist, n in zip(TAGS, hists, counts):
        (norm,) = [v for s, v in scalar_series(agc_run.events, f"grad_norm/{tag}") if s == 0]
        assert hist.max <= math.log10(norm) + 1e-4
        assert hist.sum / n <= math.log10(norm / math.sqrt(n)) + 1e-4
        assert hist.min < hist.max
    # No layer that the model does not have.
    per_layer = {s.split("/", 1)[1] for s in scalars if s.split("/")[0] in PER_LAYER_SCALARS}
    assert per_layer == set(TAGS)


def test_event_scalars_at_log_steps(agc_run: Run) -> None:
    acc = agc_run.events
    for tag in ("loss/train", "opt/lr", "grad/norm_pre_clip", *(f"grad_norm/{t}" for t in TAGS)):
        assert [step for step, _ in scalar_series(acc, tag)] == LOG_STEPS, tag
    assert all(v == pytest.approx(0.01) for _, v in scalar_series(acc, "opt/lr"))  # sgd default
    test_steps = [step for step, _ in scalar_series(acc, "loss/test")]
    assert test_steps[0] == 0 and test_steps[-1] == 5, test_steps


def test_event_values_are_consistent(agc_run: Run) -> None:
    acc = agc_run.events
    pre = dict(scalar_series(acc, "grad/norm_pre_clip"))
    post = dict(scalar_series(acc, "grad/norm_post_clip"))
    per_layer = {t: dict(scalar_series(acc, f"grad_norm/{t}")) for t in TAGS}
    for step in LOG_STEPS:
        # The global norm is the norm of the per-layer norms, and clipping never grows it.
        total = math.sqrt(sum(per_layer[t][step] ** 2 for t in TAGS))
        assert pre[step] == pytest.approx(total, rel=1e-4)
        assert post[step] <= pre[step] * (1 + 1e-5)
    for _, frac in scalar_series(acc, "clip/frac"):
        assert 0 <= frac <= 1
    assert any(frac > 0 for _, frac in scalar_series(acc, "clip/frac")), "AGC never clipped"


def test_event_values_match_summary(agc_run: Run) -> None:
    acc, summary = agc_run.events, agc_run.summary
    for layer, tag in zip(summary["layers"], TAGS):
        for key in ("grad_norm", "signal_bwd", "signal_fwd"):
            series = scalar_series(acc, f"{key}/{tag}")
            assert series[0][0] == 0
            assert series[0][1] == pytest.approx(layer[key]["first"], rel=1e-6), (tag, key)
            assert series[-1][1] == pytest.approx(layer[key]["last"], rel=1e-6), (tag, key)
    for key in FINAL_METRICS:
        assert scalar_series(acc, key)[-1][1] == pytest.approx(summary["metrics"][key], rel=1e-6)


def test_event_file_has_hparams(agc_run: Run) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = agc_run.events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]
    ).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    hparams = start.hparams
    assert hparams["depth"].number_value == TINY_DEPTH
    assert hparams["width"].number_value == 8
    assert hparams["clip"].string_value == "agc"
    assert hparams["init"].string_value == "normal"
    assert hparams["activation"].string_value == "sigmoid"
    assert hparams["optim"].string_value == "sgd"
    assert hparams["status"].string_value == "completed"
    assert {h.name for h in experiment.hparam_infos} == set(hparams)
    # The HParams tab shows each metric's last scalar: each must be a logged tag.
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"hparams/loss/test", "hparams/acc/test"} <= metrics  # finite stand-ins
    assert metrics <= set(agc_run.events.Tags()["scalars"])


def test_event_file_has_custom_scalars_layout(agc_run: Run) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = agc_run.events
    assert "custom_scalars__config__" in acc.PluginTagToContent("custom_scalars")
    proto = acc.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    scalars = acc.Tags()["scalars"]
    charts = {
        chart.title: [t for t in scalars if any(re.search(r, t) for r in chart.multiline.tag)]
        for category in layout.category
        for chart in category.chart
    }
    for title, matched in charts.items():
        assert matched, f"custom scalars chart {title!r} matches no logged tag"
    # Each per-layer quantity has a chart with exactly its layers on it.
    for quantity in (*PER_LAYER_SCALARS, "clip_frac"):
        layers = TAGS[:-1] if quantity == "clip_frac" else TAGS  # AGC leaves the head out
        wanted = sorted(f"{quantity}/{t}" for t in layers)
        assert wanted in [sorted(m) for m in charts.values()], quantity


def test_hist_and_eval_steps_follow_their_own_cadence(agc_run: Run) -> None:
    acc = agc_run.events
    assert [step for step, _ in scalar_series(acc, "loss/test")] == [0, 3, 5]
    assert [h.step for h in acc.Histograms(f"grad_log10/{TAGS[0]}")] == [0, 3]


def test_norm_clipping_logs_its_coefficient(tmp_path: Path) -> None:
    max_norm = 0.01  # below the tiny model's gradient norm: every step clips
    run = train(tmp_path, *TINY, "clip=norm", f"clip.max_norm={max_norm}").ok()
    acc = run.events
    scalars = set(acc.Tags()["scalars"])
    assert {"clip/coef", "grad/norm_pre_clip", "grad/norm_post_clip"} <= scalars
    assert not any(s == "clip/frac" or s.startswith("clip_frac/") for s in scalars)
    pre = dict(scalar_series(acc, "grad/norm_pre_clip"))
    coef = dict(scalar_series(acc, "clip/coef"))
    post = dict(scalar_series(acc, "grad/norm_post_clip"))
    assert sorted(coef) == LOG_STEPS
    for step in LOG_STEPS:
        assert pre[step] > max_norm
        assert coef[step] == pytest.approx(max_norm / pre[step], rel=1e-3)
        assert post[step] == pytest.approx(max_norm, rel=1e-3)


# --- determinism ---------------------------------------------------------------------------


def per_layer_series(run: Run) -> dict[str, list[tuple[int, float]]]:
    return {
        f"{q}/{t}": scalar_series(run.events, f"{q}/{t}")
        for q in ("grad_norm", "signal_bwd")
        for t in TAGS
    }


def test_same_seed_same_gradients(agc_run: Run, tmp_path: Path) -> None:
    again = train(tmp_path, *TINY, "clip=agc").ok()
    assert again.summary["layers"] == agc_run.summary["layers"]
    assert per_layer_series(again) == per_layer_series(agc_run)


def test_other_seed_other_gradients(agc_run: Run, tmp_path: Path) -> None:
    other = train(tmp_path, *TINY, "clip=agc", "seed=1").ok()
    first = [layer["grad_norm"]["first"] for layer in other.summary["layers"]]
    assert first != [layer["grad_norm"]["first"] for layer in agc_run.summary["layers"]]
    assert per_layer_series(other) != per_layer_series(agc_run)


# --- multirun ------------------------------------------------------------------------------


def test_multirun_writes_one_dir_per_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "train",
            "-m",
            "init=xavier_normal,kaiming_normal",
            *TINY,
            "trainer.progress=off",  # excluded from the directory names
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2, jobs
    for number, (job, init) in enumerate(zip(jobs, ("xavier_normal", "kaiming_normal"))):
        prefix, _, overrides = job.name.partition("_")
        assert prefix == str(number)
        # named by the job number and what varies: the shared TINY keys are left out
        assert overrides == f"init={init}", job.name
        summary = load_summary(job)
        assert summary["status"] == "completed"
        acc = Run(proc, job).events  # exactly one event file, readable
        assert f"grad_norm/{TAGS[0]}" in acc.Tags()["scalars"]
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["init"]["name"] == init


def test_run_names_leave_out_the_execution_keys() -> None:
    # Hydra reads them from config.yaml: the same keys as config.EXECUTION_KEYS, which
    # preflight (a sweep's job names), gradexp report and resume use.
    override_dirname = CONFIG_YAML["hydra"]["job"]["config"]["override_dirname"]
    assert override_dirname["exclude_keys"] == ["experiment", *EXECUTION_KEYS]


def test_default_run_dir(tmp_path: Path) -> None:
    """The default hydra.run.dir, outputs/DATE/TIME_<overrides>: a file name has at most
    255 bytes however many overrides there are, and what is already in outputs/ stays."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "notes.txt").write_text("mine\n")
    (outputs / ".gradexp-write-test").write_text("also mine\n")  # the write probe's old name
    many = [
        *TINY,
        "data.features=32",
        "data.classes=10",
        "data.modes=3",
        "data.noise=1.0",
        "optim.lr=0.01",
        "optim.momentum=0.9",
        "optim.weight_decay=0.0",
        "init=xavier_normal",
        "init.gain=1.0",
    ]
    assert len(",".join(many)) > 255
    rejected = run_cli(["train", *many, "init=foo"], cwd=tmp_path)
    assert_one_line_error(rejected, "init=foo")
    proc = run_cli(["train", *many], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)

    assert (outputs / "notes.txt").read_text() == "mine\n"
    assert (outputs / ".gradexp-write-test").read_text() == "also mine\n"
    assert sorted(p.name for p in outputs.iterdir() if p.is_file()) == [
        ".gradexp-write-test",
        "notes.txt",
    ]
    runs = [p for p in outputs.glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    assert len(runs[0].name.encode()) <= 255
    assert "init=xavier_normal" in runs[0].name
    assert load_summary(runs[0])["status"] == "completed"


# --- the wheel -----------------------------------------------------------------------------


def test_wheel_installs_and_runs_with_its_configs(tmp_path: Path) -> None:
    # Build from a copy: an in-tree build/ directory could leak stale files into the wheel.
    tree = tmp_path / "tree"
    shutil.copytree(
        REPO_ROOT,
        tree,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv*",
            "build",
            "dist",
            "outputs",
            "multirun",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            "tests",
        ),
    )
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(tree)]
    if importlib.util.find_spec("setuptools") is not None:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
        if major >= 64:  # the build backend is here: build offline
            build[4:4] = ["--no-build-isolation", "--no-index"]
    proc = subprocess.run(build, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, describe(proc)
    (wheel,) = wheels.glob("gradexp-*.whl")

    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index"]
    install += ["--target", str(site), str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, describe(proc)
    for group in GROUPS:
        assert list((site / "gradexp" / "configs" / group).glob("*.yaml")), group
    assert (site / "gradexp" / "configs" / "config.yaml").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site)}
    python = [sys.executable]
    proc = run_cli(
        ["-c", "import gradexp; print(gradexp.__file__); print(gradexp.__version__)"],
        cwd=elsewhere,
        env=env,
        command=python,
    )
    assert proc.returncode == 0, describe(proc)
    file, version = proc.stdout.split()
    assert Path(file).resolve().is_relative_to(site.resolve()), file
    assert version == importlib.metadata.version("gradexp")

    run_dir = elsewhere / "run"
    proc = run_cli(
        ["-m", "gradexp", "train", *TINY, f"hydra.run.dir={run_dir}"],
        cwd=elsewhere,
        env=env,
        command=python,
    )
    assert proc.returncode == 0, describe(proc)
    assert load_summary(run_dir)["status"] == "completed"
    # The configs are read as resources of the imported package (which is the wheel's,
    # as checked above), not from a path into a source tree.
    hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())
    sources = hydra_cfg["hydra"]["runtime"]["config_sources"]
    main = [(s["schema"], s["path"]) for s in sources if s["provider"] == "main"]
    assert main == [("pkg", "gradexp.configs")], sources


# --- bad input -----------------------------------------------------------------------------


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


BAD_INPUT = [
    pytest.param(["init=foo"], ["init=foo", *group_options("init")], id="unknown-option"),
    pytest.param(["model.dpth=3"], ["model.dpth", "depth", "width"], id="unknown-key"),
    pytest.param(["+trainer.stepz=5"], ["trainer.stepz", "steps"], id="added-unknown-key"),
    pytest.param(["trainer.steps=0"], ["trainer.steps=0"], id="zero-steps"),
    pytest.param(["trainer.steps=-5"], ["trainer.steps=-5"], id="negative-steps"),
    pytest.param(["trainer.steps=abc"], ["trainer.steps=abc"], id="steps-not-int"),
    pytest.param(["optim.lr=0"], ["optim.lr=0"], id="zero-lr"),
    pytest.param(["trainer.batch_size=0"], ["trainer.batch_size=0"], id="zero-batch"),
    pytest.param(["clip=value", "clip.threshold=0"], ["clip.threshold=0"], id="clip-threshold"),
    pytest.param(["clip=norm", "clip.max_norm=-1"], ["clip.max_norm=-1"], id="clip-max-norm"),
    pytest.param(
        ["norm=group", "norm.num_groups=5"],
        ["norm.num_groups=5", "model.width=8", "1, 2, 4, 8"],
        id="groups-not-dividing-width",
    ),
    pytest.param(["trainer.amp=x"], ["trainer.amp=x", "off", "bf16", "fp16"], id="amp"),
    pytest.param(["trainer.figure_every=-1"], ["trainer.figure_every=-1"], id="figure-every"),
    pytest.param(["diagnose.dead_frac=2"], ["diagnose.dead_frac=2.0", "(0, 1]"], id="dead-frac"),
    pytest.param(
        ["diagnose.vanishing_ratio=2"],
        ["diagnose.vanishing_ratio=2.0", "vanishing_ratio < 1 < exploding_ratio"],
        id="vanishing-ratio",
    ),
    pytest.param(
        ["activation.name=xx"], ["activation.name=xx", "sigmoid", "leaky_relu"], id="act-name"
    ),
    pytest.param(
        ["trainer.on_nonfinite=explode"],
        ["trainer.on_nonfinite=explode", "stop", "skip", "raise"],
        id="on-nonfinite",
    ),
    pytest.param(
        ["trainer.device=cuda"],
        ["trainer.device=cuda", "cpu"],
        id="no-cuda",
        marks=pytest.mark.skipif(cuda_available(), reason="CUDA is available here"),
    ),
    pytest.param(
        ["hydra.job.chdr=true"],
        ["hydra.job.chdr", "unknown key", "chdir"],
        id="hydra-key",
    ),
    pytest.param(
        ["hydra/launcher=ray", "hydra.launcher.ray.remote.num_cpu=1"],
        ["hydra.launcher.ray.remote.num_cpu", "+hydra.launcher.ray.remote.num_cpu="],
        id="ray-key",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
            reason="the Ray launcher is not installed",
        ),
    ),
    pytest.param(
        ["optim=hessian_free", "optim.curvature_batch=999"],
        ["optim.curvature_batch=999", "trainer.batch_size", "0 for the whole batch"],
        id="hf-curvature-batch",
    ),
    pytest.param(
        ["objective.metric=accuracy"],
        ["objective.metric=accuracy", "loss/test", "acc/test"],
        id="objective-metric",
    ),
    pytest.param(
        ["data=adding", "objective.metric=acc/test"],
        ["objective.metric=acc/test", "data=adding", "loss/test"],
        id="objective-no-accuracy",
    ),
    pytest.param(
        ["-m", "init=normal,xavier_normal"],
        ["unrecognized arguments", "init=normal,xavier_normal", "-m"],
        id="flag-after-overrides",
    ),
]


@pytest.mark.parametrize(("bad", "fragments"), BAD_INPUT)
def test_bad_input_fails_in_one_line(tmp_path: Path, bad: list[str], fragments: list[str]) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["train", *TINY, f"hydra.run.dir={run_dir}", *bad], cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not run_dir.exists(), "a rejected command must leave no run directory"


def test_two_modes_fail_in_one_line(tmp_path: Path) -> None:
    proc = run_cli(["train", "-m", "--cfg", "job", *TINY], cwd=tmp_path)
    assert_one_line_error(proc, "-m and --cfg", "choose one")


# A crash no check can foresee (a bug): the loop of a width-7 job raises. Injected through
# sitecustomize, which every Python process of the command imports first.
CRASH_WIDTH_7 = """
import gradexp.train as train

loop = train.Trainer.loop


def crashing(self):
    if self.cfg.model.width == 7:
        raise RuntimeError("injected: the loop of a width-7 job crashed")
    return loop(self)


train.Trainer.loop = crashing
"""


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(CRASH_WIDTH_7)
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p)
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["train", "-m", *TINY, "model.width=7,8", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env={"PYTHONPATH": path},
    )
    assert proc.returncode == 0, describe(proc)
    failed, ok = sorted(p for p in sweep.iterdir() if p.is_dir())
    summary = load_summary(failed)
    assert summary["status"] == "failed"
    assert summary["error"] == "RuntimeError: injected: the loop of a width-7 job crashed"
    assert f"gradexp: job 0 failed: {summary['error']}" in proc.stderr
    assert load_summary(ok)["status"] == "completed"  # the job after it ran


def test_bad_sweep_fails_before_any_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        ["train", "-m", "init=normal,foo", *TINY, f"hydra.sweep.dir={sweep}"], cwd=tmp_path
    )
    assert_one_line_error(proc, "init=foo", *group_options("init"))
    assert not sweep.exists(), list(sweep.rglob("*"))


def test_a_key_only_the_swept_values_have_fails_in_one_line(tmp_path: Path) -> None:
    # Hydra composes a sweep's config without its swept values before the first job:
    # data.length exists for model=rnn's task, not for the default's.
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "model=rnn,lstm", "data.length=20", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, cwd=tmp_path)
    assert_one_line_error(
        proc, "data.length: unknown key", "without its swept values", "model=rnn,lstm"
    )
    assert not sweep.exists()
    proc = run_cli([*args, "data=adding", "trainer.steps=2", "trainer.progress=off"], tmp_path)
    assert proc.returncode == 0, describe(proc)


def test_sweep_errors_name_the_real_cause(tmp_path: Path) -> None:
    proc = run_cli(["train", "-m", "init=normal,xavier_normal", "trainer.resume=true"], tmp_path)
    assert_one_line_error(proc, "trainer.resume=true with -m", "gradexp resume JOB_DIR")
    proc = run_cli(["train", "-m", "init=normal,xavier_normal", "hydra.launcher.n_job=2"], tmp_path)
    line = assert_one_line_error(proc, "hydra.launcher.n_job: unknown key")
    assert "swept values" not in line  # a key of Hydra's: the sweep is not the cause
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_unwritable_output_dir(tmp_path: Path, multirun: bool) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("precious\n")
    target = blocker / "sub"
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    flags = ["-m", "init=normal,xavier_normal"] if multirun else []
    proc = run_cli(["train", *flags, *TINY, f"{key}={target}"], cwd=tmp_path)
    assert_one_line_error(proc, key, str(target))
    assert blocker.read_text() == "precious\n"


# --- divergence ------------------------------------------------------------------------------

DIVERGE = ("optim.lr=1e6", "init=normal", "activation=relu")  # non-finite at step 2


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return train(tmp_path_factory.mktemp("diverged"), *TINY, *DIVERGE)


def test_divergence_is_a_result(diverged_run: Run) -> None:
    diverged_run.ok()
    assert "Traceback" not in diverged_run.proc.stderr
    summary = diverged_run.summary
    assert summary["status"] == "diverged"
    nonfinite = summary["nonfinite"]
    assert set(nonfinite) == {"step", "layer"}
    assert nonfinite["layer"] in NAMES
    assert 0 <= nonfinite["step"] < 6
    assert summary["steps"] == nonfinite["step"]
    # TensorBoard can read what was logged up to the divergence.
    acc = diverged_run.events
    steps = [step for step, _ in scalar_series(acc, f"grad_norm/{TAGS[0]}")]
    assert steps and steps[0] == 0 and steps[-1] <= nonfinite["step"]
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")


def test_diverged_summary_is_strict_json(diverged_run: Run) -> None:
    load_summary(diverged_run.dir, strict=True)


def test_on_nonfinite_raise_fails_in_one_line(tmp_path: Path) -> None:
    run = train(tmp_path, *TINY, *DIVERGE, "trainer.on_nonfinite=raise")
    assert run.proc.returncode not in (0, 2), describe(run.proc)  # 2: bad input
    line = assert_one_line_error(run.proc, "non-finite")
    nonfinite = run.summary["nonfinite"]
    assert f"step {nonfinite['step']}" in line
    assert nonfinite["layer"] in line


def test_on_nonfinite_skip_completes(tmp_path: Path) -> None:
    run = train(tmp_path, *TINY, *DIVERGE, "trainer.on_nonfinite=skip").ok()
    summary = run.summary
    assert summary["status"] == "completed"
    assert summary["steps"] == 6
    assert summary["skipped_steps"] > 0
    assert summary["nonfinite"]["layer"] in NAMES


# --- help, version, composed config --------------------------------------------------------


def test_help_lists_train(tmp_path: Path) -> None:
    proc = run_cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert re.search(r"^\s+train\s", proc.stdout, re.MULTILINE), proc.stdout


def test_version(tmp_path: Path) -> None:
    proc = run_cli(["--version"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.strip() == f"gradexp {importlib.metadata.version('gradexp')}"
    # `train --version` is gradexp's too, not only Hydra's
    proc = run_cli(["train", "--version"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.startswith(f"gradexp {importlib.metadata.version('gradexp')} (Hydra ")


def test_train_help_lists_every_group_and_option(tmp_path: Path) -> None:
    proc = run_cli(["train", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    section = proc.stdout.split("== Configuration groups ==", 1)[1].split("== Config ==")[0]
    listed = {}
    for line in section.splitlines():
        m = re.fullmatch(r"([\w/]+): (\w+(?:, \w+)*)", line.strip())
        if m:
            listed[m[1]] = m[2].split(", ")
    assert set(listed) == {*GROUPS, "experiment", "arm"}, listed
    for group in (*GROUPS, "experiment", "arm"):
        assert sorted(listed[group]) == group_options(group), group
    assert {"sigmoid", "relu", "tanh"} <= set(listed["activation"])
    assert {"normal", "xavier_normal", "kaiming_normal"} <= set(listed["init"])
    assert {"none", "value", "norm", "agc"} == set(listed["clip"])
    assert "schema_" not in proc.stdout
    assert not (tmp_path / "outputs").exists()


HELP_EXAMPLES = [
    line.strip()
    for line in CONFIG_YAML["hydra"]["help"]["footer"].splitlines()
    if line.strip().startswith("gradexp ")
]
# Appended to each example: two steps on a little data (every model and task has these).
EXAMPLE_TINY = ("trainer.steps=2", "trainer.batch_size=16", "data.n_train=64", "data.n_test=32")


def test_train_help_shows_the_examples_and_the_aliases(tmp_path: Path) -> None:
    proc = run_cli(["train", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "gradexp train model=rnn init=xavier clip=agc" in HELP_EXAMPLES  # the product's
    for example in HELP_EXAMPLES:
        assert f"  {example}\n" in proc.stdout, example
    aliases = proc.stdout.split("== Aliases ==", 1)[1].split("== Config ==")[0]
    assert "init=xavier, init=glorot: xavier_uniform (Glorot & Bengio 2010" in aliases
    assert "init=kaiming, init=he, init=msra: kaiming_normal (He et al. 2015" in aliases
    assert "init=lecun: lecun_normal" in aliases


@pytest.mark.parametrize("example", HELP_EXAMPLES)
def test_train_help_example_runs(tmp_path: Path, example: str) -> None:
    proc = run_cli([*shlex.split(example)[1:], *EXAMPLE_TINY], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    runs = sorted(p.parent for p in (tmp_path / "outputs").rglob("summary.json"))
    sweep = next((a for a in shlex.split(example) if "," in a), None) if " -m " in example else None
    assert len(runs) == (sweep.count(",") + 1 if sweep else 1), runs
    for run in runs:
        assert load_summary(run)["status"] == "completed", run


HYDRA_HELP = "import sys; from gradexp.cli import _run_hydra; _run_hydra(sys.argv[1:])"


@pytest.mark.parametrize("overrides", [[], ["model=rnn", "init=kaiming", "--resolve"]])
def test_train_help_is_hydras_help(tmp_path: Path, overrides: list[str]) -> None:
    """gradexp renders `train --help` from one composed config (Hydra's own rendering takes
    seconds): the same text as Hydra's, for the options the aliases stand for."""
    ours = run_cli(["train", *overrides, "--help"], cwd=tmp_path)
    assert ours.returncode == 0, describe(ours)
    resolved = [o.replace("init=kaiming", "init=kaiming_normal") for o in overrides]
    command = [sys.executable, "-c", HYDRA_HELP]
    hydras = run_cli([*resolved, "--help"], cwd=tmp_path, command=command)
    assert hydras.returncode == 0, describe(hydras)
    assert ours.stdout == hydras.stdout
    assert "name: kaiming_normal" in ours.stdout or not overrides


def test_help_imports_neither_hydra_nor_torch(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom gradexp.cli import main\ntry:\n    main(['--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted({'hydra', 'torch'} & {m.split('.')[0] for m in sys.modules}))"
    )
    proc = run_cli(["-c", code], cwd=tmp_path, command=[sys.executable])
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.splitlines()[-1] == "[]"


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    proc = run_cli(["train", "--cfg", "job", "model.depth=7", "init=xavier_normal"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    cfg = yaml.safe_load(proc.stdout)
    assert set(GROUPS) <= set(cfg)
    assert cfg["model"]["depth"] == 7
    assert cfg["init"]["name"] == "xavier_normal"
    assert cfg["activation"]["name"] == "sigmoid"  # the default stays
    assert not (tmp_path / "outputs").exists(), "--cfg must not create a run directory"


def test_cfg_job_rejects_bad_input(tmp_path: Path) -> None:
    proc = run_cli(["train", "--cfg", "job", "init=foo"], cwd=tmp_path)
    assert_one_line_error(proc, "init=foo")


def test_shell_completion_completes_options(tmp_path: Path) -> None:
    proc = run_cli(["-sc", "query=bash"], cwd=tmp_path, env={"COMP_LINE": "gradexp train init=xav"})
    assert proc.returncode == 0, describe(proc)
    assert set(proc.stdout.split()) == {"init=xavier_normal", "init=xavier_uniform"}


# --- the README's default ------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_shows_vanishing_gradients(tmp_path: Path) -> None:
    """README: `gradexp train` (20 sigmoid layers, N(0, 1) init): at step 0 the first layer
    gets at least 1000x less backward signal than the head."""
    run = train(tmp_path).ok()
    summary = load_summary(run.dir)
    assert summary["status"] == "completed"
    assert summary["steps"] == 1000
    layers = summary["layers"]
    assert len(layers) == 21 and layers[-1]["name"] == "head"
    first, head = layers[0]["signal_bwd"]["first"], layers[-1]["signal_bwd"]["first"]
    assert 0 < first * 1000 <= head, (first, head, first / head)
