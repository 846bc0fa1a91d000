"""The gradexp tab in TensorBoard: its routes, served by a real ``tensorboard`` over real
runs, and the tab itself in a real browser (Debian's Chromium, driven by Playwright).

The browser tests skip with the reason where no Chromium can be had (`.ci/run` installs
Debian's); screenshots land in the test's tmp dir (printed on failure).
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, cli_env, describe, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SWEEP_RUNS = ("sweep/0_init=normal", "sweep/1_init=xavier_normal")
LSTM = ("model=lstm", "data.length=8", "model.hidden_size=8", *TINY[2:])


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny two-job sweep and a tiny LSTM run in one logdir."""
    root = tmp_path_factory.mktemp("tb")
    sweep = ["train", "-m", *TINY, "init=normal,xavier_normal", f"hydra.sweep.dir={root / 'sweep'}"]
    proc = run_cli(sweep, root)
    assert proc.returncode == 0, describe(proc)
    proc = run_cli(["train", *LSTM, f"hydra.run.dir={root / 'lstm'}"], root)
    assert proc.returncode == 0, describe(proc)
    return root


def leaves(node: dict, prefix: str = "") -> dict:
    """A nested config as {"dotted.key": value}."""
    out = {}
    for k, v in node.items():
        out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tensorboard(logdir: Path):
    """``tensorboard --logdir`` on 127.0.0.1: its base URL."""
    proc, url = start_tensorboard(logdir, 3, "--reload_interval", "0")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start_tensorboard(logdir: Path, runs: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """``tensorboard --logdir`` on 127.0.0.1, once it lists ``runs`` gradexp runs."""
    port = free_port()
    exe = Path(sys.executable).parent / "tensorboard"
    proc = subprocess.Popen(
        [str(exe), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), *extra],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            listed = json.loads(urllib.request.urlopen(f"{url}/data/plugin/gradexp/runs").read())
            if len(listed["runs"]) == runs:  # every run loaded
                return proc, url
        except (urllib.error.URLError, ConnectionError, KeyError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"tensorboard did not serve the runs: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)


def sweep_values(grid: dict) -> np.ndarray:
    """A /heatmaps grid's values: layers x steps float32, NaN where none."""
    flat = np.frombuffer(base64.b64decode(grid["values_f32"]), dtype="<f4")
    return flat.reshape(len(grid["layers"]), len(grid["steps"]))


def shown_value(text: str, quantity: str) -> float:
    """The value a tooltip or the keyboard's status line shows for ``quantity``."""
    m = re.search(rf"{quantity} (\S+?)\)?$", text)
    assert m, text
    return float(m[1])


def event_values(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a run, as TensorBoard's EventAccumulator reads the event file."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    files = sorted(run_dir.glob("events.out.tfevents.*"))
    acc = ea.EventAccumulator(str(files[0]), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


# --- the backend ------------------------------------------------------------------------


def test_the_tab_is_listed_and_its_module_served(tensorboard: str) -> None:
    _, listing = get(f"{tensorboard}/data/plugins_listing")
    assert listing["gradexp"]["enabled"] and listing["gradexp"]["tab_name"] == "gradexp"
    with urllib.request.urlopen(f"{tensorboard}/data/plugin/gradexp/index.js") as r:
        assert r.headers["Content-Type"].startswith("application/javascript")
        assert "export async function render" in r.read().decode()


def test_runs_lists_layers_quantities_and_verdicts(tensorboard: str) -> None:
    status, body = get(f"{tensorboard}/data/plugin/gradexp/runs")
    assert status == 200
    runs = body["runs"]
    assert sorted(runs) == sorted([*SWEEP_RUNS, "lstm"])
    mlp = runs[SWEEP_RUNS[0]]
    assert mlp["layers"] == ["hidden.0", "hidden.1", "hidden.2", "head"]  # input first
    assert mlp["quantities"][0] == "signal_bwd" and "grad_norm" in mlp["quantities"]
    assert mlp["time_layers"] == [] and runs["lstm"]["time_layers"] == ["00_recurrent.0"]
    # The verdicts table, after the run's outcome in words where it logged one.
    assert "\n| verdict | layer | step | evidence |" in "\n" + mlp["verdicts"]


@pytest.mark.parametrize("quantity", ["signal_bwd", "grad_norm", "update_ratio"])
def test_heatmap_holds_what_the_event_file_holds(
    tensorboard: str, logdir: Path, quantity: str
) -> None:
    run = SWEEP_RUNS[1]
    query = urllib.parse.urlencode({"run": run, "quantity": quantity})
    status, body = get(f"{tensorboard}/data/plugin/gradexp/heatmap?{query}")
    assert status == 200, body
    events = event_values(logdir / run)
    tags = [f"{quantity}/{i}_{name}" for i, name in zip(["00", "01", "02", "03"], body["layers"])]
    assert body["steps"] == sorted(events[tags[0]])  # every logged step: 0, 2, 4, 5
    for tag, row in zip(tags, body["values"]):
        expected = [events[tag].get(step) for step in body["steps"]]
        assert row == pytest.approx(expected, rel=0, abs=0), tag  # float32 as written


def test_heatmaps_hold_every_run_as_logged(tensorboard: str, logdir: Path) -> None:
    for _ in range(2):  # the second reply comes from the server's cache: the same
        status, body = get(f"{tensorboard}/data/plugin/gradexp/heatmaps?quantity=signal_bwd")
        assert status == 200 and sorted(body["grids"]) == sorted([*SWEEP_RUNS, "lstm"])
        for run, grid in body["grids"].items():
            events = event_values(logdir / run)
            tags = sorted(t for t in events if t.startswith("signal_bwd/"))
            assert [t.split("_", 2)[-1] for t in tags] == grid["layers"], run
            expected = [[events[t].get(step, math.nan) for step in grid["steps"]] for t in tags]
            # float32 as written, bit for bit
            np.testing.assert_array_equal(sweep_values(grid), np.float32(expected), err_msg=run)
    status, body = get(f"{tensorboard}/data/plugin/gradexp/heatmaps?quantity=grad_norm&limit=1")
    assert list(body["grids"]) == ["lstm"]  # the first run by name
    query = urllib.parse.urlencode([("quantity", "grad_norm"), ("run", SWEEP_RUNS[1])])
    status, body = get(f"{tensorboard}/data/plugin/gradexp/heatmaps?{query}")
    assert list(body["grids"]) == [SWEEP_RUNS[1]]


def test_runs_bring_the_first_screens_grids(tensorboard: str) -> None:
    _, alone = get(f"{tensorboard}/data/plugin/gradexp/runs")
    assert "grids" not in alone
    status, body = get(f"{tensorboard}/data/plugin/gradexp/runs?first=2&quantity=grad_norm")
    assert status == 200 and body["runs"] == alone["runs"]
    assert list(body["grids"]) == sorted(alone["runs"])[:2]  # the first runs by name
    shown = [("run", run) for run in body["grids"]]
    query = urllib.parse.urlencode([("quantity", "grad_norm"), *shown])
    _, heatmaps = get(f"{tensorboard}/data/plugin/gradexp/heatmaps?{query}")
    assert body["grids"] == heatmaps["grids"]
    code, error = get(f"{tensorboard}/data/plugin/gradexp/runs?first=2&quantity=bogus")
    assert code == 400 and "quantity=bogus: unknown" in error["error"]


def test_the_sweep_follows_a_run_that_logs_on(tmp_path: Path) -> None:
    """The grids the server keeps are read again once a run has logged more: a run that
    grows while TensorBoard serves the tab shows its new steps, not the cached ones."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    from gradexp.metrics import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path / "growing")
    values = {}

    def log(steps: range) -> None:
        for step in steps:
            row = [float(np.float32(10.0 ** -(i + step / 7))) for i in range(3)]
            values[step] = row
            logger.writer.file_writer.add_summary(
                Summary(value=[
                    Summary.Value(tag=f"signal_bwd/{i:02d}_hidden.{i}", simple_value=v)
                    for i, v in enumerate(row)
                ]),
                step,
            )  # fmt: skip
        logger.writer.flush()

    log(range(0, 3))
    proc, url = start_tensorboard(tmp_path, 1, "--reload_interval", "1")
    try:
        route = f"{url}/data/plugin/gradexp/heatmaps?quantity=signal_bwd"
        deadline = time.monotonic() + 60
        while get(route)[1]["grids"]["growing"]["steps"] != [0, 1, 2]:
            assert time.monotonic() < deadline, get(route)
            time.sleep(0.3)
        log(range(3, 6))
        while (grid := get(route)[1]["grids"]["growing"])["steps"] != list(range(6)):
            assert time.monotonic() < deadline, grid["steps"]
            time.sleep(0.3)
        expected = np.float32([[values[s][i] for s in range(6)] for i in range(3)])
        np.testing.assert_array_equal(sweep_values(grid), expected)
        _, one = get(f"{url}/data/plugin/gradexp/heatmap?run=growing")
        assert one["steps"] == list(range(6)) and one["values"] == expected.tolist()
    finally:
        logger.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_summary_is_the_runs_own(tensorboard: str, logdir: Path) -> None:
    run = SWEEP_RUNS[0]
    status, body = get(
        f"{tensorboard}/data/plugin/gradexp/summary?{urllib.parse.urlencode({'run': run})}"
    )
    assert status == 200, body
    summary = json.loads((logdir / run / "summary.json").read_text())
    for key in ("status", "steps", "options", "verdicts", "theory", "metrics"):
        assert body["summary"][key] == summary[key], key
    # The composed config, every key: what .hydra/config.yaml holds, flattened.
    from omegaconf import OmegaConf

    composed = OmegaConf.to_container(OmegaConf.load(logdir / run / ".hydra" / "config.yaml"))
    expected = leaves(composed)
    assert body["config"] and set(body["config"]) == set(expected)
    for key, value in expected.items():
        assert body["config"][key] == value, key


def test_text_tab_lists_the_readable_summary_not_the_tabs_data(tensorboard: str) -> None:
    status, body = get(f"{tensorboard}/data/plugin/text/tags")
    assert status == 200
    for run in [*SWEEP_RUNS, "lstm"]:
        assert {"run/summary/text_summary", "run/verdicts/text_summary"} <= set(body[run])
        assert not [tag for tag in body[run] if tag.startswith("gradexp/")]


def test_summary_json_read_from_either_form() -> None:
    from gradexp.tensorboard_plugin.plugin import _summary_json

    assert _summary_json('{"status": "completed"}') == {"status": "completed"}
    # Runs logged before the gradexp data tags: summary.json in run/summary's code block.
    assert _summary_json('```\n{"status": "diverged"}\n```') == {"status": "diverged"}
    assert _summary_json("**completed** after 3 steps") is None
    assert _summary_json("[1, 2]") is None


def test_statuses_are_the_runs_own(tensorboard: str, logdir: Path) -> None:
    status, body = get(f"{tensorboard}/data/plugin/gradexp/statuses")
    assert status == 200
    expected = {
        run: json.loads((logdir / run / "summary.json").read_text())["status"]
        for run in [*SWEEP_RUNS, "lstm"]
    }
    assert body["statuses"] == expected


def test_time_grid_holds_the_gradients_through_time(tensorboard: str, logdir: Path) -> None:
    status, body = get(f"{tensorboard}/data/plugin/gradexp/time?run=lstm")
    assert status == 200, body
    grid = body["layers"]["00_recurrent.0"]
    assert grid["t"] == list(range(8))  # T=8 < time_samples: every time step
    events = event_values(logdir / "lstm")
    for t, row in zip(grid["t"], grid["values"]):
        series = events[f"time_grad/00_recurrent.0/t{t}"]
        assert row == [series.get(s) for s in grid["steps"]]


@pytest.mark.parametrize(
    ("route", "status", "fragment"),
    [
        ("heatmap?run=nope", 404, "run 'nope': no such run"),
        ("heatmap?run=lstm&quantity=bogus", 400, "quantity=bogus: unknown; choose from"),
        ("heatmap", 400, "give a run"),
        ("time?run=nope", 404, "no such run"),
        ("summary?run=nope", 404, "no such run"),
        ("heatmaps?quantity=bogus", 400, "quantity=bogus: unknown"),
    ],
)
def test_bad_requests_get_a_clear_4xx(
    tensorboard: str, route: str, status: int, fragment: str
) -> None:
    code, body = get(f"{tensorboard}/data/plugin/gradexp/{route}")
    assert code == status and fragment in body["error"], body


# --- the tab in a real browser -------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if CHROMIUM is None:
        pytest.skip("no Chromium here (apt-get install -y chromium)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def open_tab(browser, url: str, shots: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.goto(f"{url}/#gradexp")
    frame = page.frame_locator("iframe")
    return page, frame


def open_run(browser, url: str, logdir: Path, run: str):
    """The tab on one run: the page, its frame, the drawn heatmap, the run's event values
    (tag -> step -> value) and its logged steps."""
    page, frame = open_tab(browser, url, logdir)
    frame.locator("#run").select_option(run)
    heatmap = frame.locator("#heatmap")
    heatmap.wait_for()
    events = event_values(logdir / run)
    return page, frame, heatmap, events, sorted(events["signal_bwd/00_hidden.0"])


def test_the_sweep_view_lists_every_run(browser, tensorboard: str, tmp_path: Path) -> None:
    page, frame = open_tab(browser, tensorboard, tmp_path)
    frame.locator("#sweep[data-complete]").wait_for()
    cards = frame.locator("#sweep .card")
    assert sorted(cards.evaluate_all("cs => cs.map(c => c.dataset.run)")) == sorted(
        [*SWEEP_RUNS, "lstm"]
    )
    frame.locator("#sweep .card[data-status]").nth(2).wait_for()  # each card's status
    assert set(cards.evaluate_all("cs => cs.map(c => c.dataset.status)")) == {"completed"}
    frame.locator("#filter").fill("xavier")
    frame.locator("#sweep .card").first.wait_for()
    page.wait_for_function(
        "() => document.querySelector('iframe').contentDocument"
        ".querySelectorAll('#sweep .card').length === 1"
    )
    page.screenshot(path=str(tmp_path / "sweep.png"), full_page=True)
    page.close()


def test_a_run_heatmap_tooltip_and_profile(
    browser, tensorboard: str, logdir: Path, tmp_path: Path
) -> None:
    run = SWEEP_RUNS[0]
    page, frame, heatmap, events, steps = open_run(browser, tensorboard, logdir, run)
    assert heatmap.get_attribute("data-rows") == "4"  # 3 hidden layers and the head
    assert heatmap.get_attribute("data-cols") == str(len(steps))
    # The bottom-left cell: the input layer at step 0; the tooltip shows its raw value.
    box = heatmap.bounding_box()
    rows, cols = 4, len(steps)
    canvas_w = int(heatmap.get_attribute("width"))
    cell_w = (canvas_w - 130 - 4) / cols
    cell_h = (int(heatmap.get_attribute("height")) - 34) / rows
    page.mouse.move(box["x"] + 130 + cell_w / 2, box["y"] + (rows - 0.5) * cell_h)
    tooltip = frame.locator("#tooltip")
    tooltip.wait_for(state="visible")
    text = tooltip.text_content()
    raw = events["signal_bwd/00_hidden.0"][0]
    head = events["signal_bwd/03_head"][0]
    assert "layer hidden.0 · step 0" in text, text
    assert np.float32(shown_value(text, "signal_bwd")) == np.float32(raw), (text, raw)  # exact
    # The profile follows the slider: its values are the grid's column at that step.
    profile = frame.locator("#profile")
    assert profile.get_attribute("data-step") == "0"
    values = json.loads(profile.get_attribute("data-values"))
    assert values[0] == pytest.approx(raw / head, rel=1e-6)
    frame.locator("#step").fill(str(len(steps) - 1))
    page.wait_for_timeout(200)
    assert profile.get_attribute("data-step") == str(steps[-1])
    last = json.loads(profile.get_attribute("data-values"))
    expected = events["signal_bwd/00_hidden.0"][steps[-1]] / events["signal_bwd/03_head"][steps[-1]]
    assert last[0] == pytest.approx(expected, rel=1e-6) and not math.isnan(last[0])
    assert frame.locator("#verdicts th").first.text_content() == "verdict"
    _, listing = get(f"{tensorboard}/data/plugin/gradexp/runs")
    outcome = listing["runs"][run]["verdicts"].split("\n")[0]
    if outcome.startswith("outcome: **"):  # in words above the table, not a row of it
        shown = frame.locator(".outcome").text_content()
        assert shown == outcome.replace("**", "").replace("\\|", "|"), (shown, outcome)
        assert frame.locator(".outcome strong").count() == 1
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)
    page.close()


def test_the_heatmap_reads_out_by_keyboard(
    browser, tensorboard: str, logdir: Path, tmp_path: Path
) -> None:
    run = SWEEP_RUNS[0]
    page, frame, heatmap, events, steps = open_run(browser, tensorboard, logdir, run)
    layers = ["00_hidden.0", "01_hidden.1", "02_hidden.2", "03_head"]
    readout = frame.locator("#heatmap-readout")
    assert readout.get_attribute("role") == "status"
    assert heatmap.get_attribute("aria-describedby") == "heatmap-readout"
    # Tab from the last control reaches the heatmap; its cursor starts at the input layer
    # and the profile's step.
    frame.locator("#filter").focus()
    page.keyboard.press("Tab")
    assert frame.locator("#heatmap:focus").count() == 1
    profile = frame.locator("#profile")

    def check(layer: int, column: int) -> None:
        text = readout.text_content()
        name, step = layers[layer].split("_", 1)[1], steps[column]
        assert f"{run} · layer {name} · step {step} · " in text, text
        raw = events[f"signal_bwd/{layers[layer]}"][step]
        assert np.float32(shown_value(text, "signal_bwd")) == np.float32(raw), (text, raw)
        assert readout.get_attribute("data-step") == str(step)

    check(0, 0)
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    check(2, 0)
    assert profile.get_attribute("data-step") == "0"  # up/down: the layer only
    page.keyboard.press("ArrowRight")
    check(2, 1)
    assert profile.get_attribute("data-step") == str(steps[1])  # left/right: the profile too
    page.keyboard.press("End")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")  # the head is the top row: stays
    check(3, len(steps) - 1)
    assert profile.get_attribute("data-step") == str(steps[-1])
    page.keyboard.press("Home")
    page.keyboard.press("ArrowDown")
    check(2, 0)
    page.keyboard.press("Enter")
    assert profile.get_attribute("data-step") == "0"
    # The cursor is drawn on the canvas while it has the focus: a black edge left of its
    # cell (white outside it), gone once the focus moves on.
    probe = """c => { const g = c.gradexp; const i = g.cursor.i, j = g.cursor.j;
        const y = (g.grid.layers.length - 1 - i) * g.ch + Math.floor(g.ch / 2);
        return Array.from(c.getContext('2d').getImageData(g.left + j * g.cw - 1, y, 1, 1).data);
    }"""
    assert heatmap.evaluate(probe) == [0, 0, 0, 255]
    page.screenshot(path=str(tmp_path / "keyboard.png"), full_page=True)
    page.keyboard.press("Shift+Tab")
    assert heatmap.evaluate(probe) != [0, 0, 0, 255]
    assert "layer hidden.2 · step 0" in readout.text_content()  # still on screen
    page.close()


def test_a_run_shows_its_config(browser, tensorboard: str, logdir: Path, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    run = SWEEP_RUNS[1]
    page, frame = open_tab(browser, tensorboard, tmp_path)
    frame.locator("#run").select_option(run)
    frame.locator("#config details").first.wait_for()
    composed = OmegaConf.to_container(OmegaConf.load(logdir / run / ".hydra" / "config.yaml"))
    rows = frame.locator("#config tr[data-key]").evaluate_all(
        "rs => rs.map(r => [r.dataset.key, r.closest('details').dataset.group,"
        " r.querySelector('th').textContent, r.querySelector('td').textContent])"
    )
    shown = {}
    for key, group, name, text in rows:  # each under its top-level key
        assert key == (f"{group}.{name}" if group else name), (key, group, name)
        shown[key] = text
    expected = leaves(composed)
    assert set(shown) == set(expected)
    for key, value in expected.items():  # strings as they are, the rest as JSON
        assert (shown[key] if isinstance(value, str) else json.loads(shown[key])) == value, key
    groups = frame.locator("#config details")
    opened = groups.evaluate_all("ds => ds.filter(d => d.open).map(d => d.dataset.group)")
    assert {"model", "init", "activation", "norm", "clip", "optim"} <= set(opened)
    assert "trainer" not in opened  # one line until opened
    summary = frame.locator('#config details[data-group="init"] summary').text_content()
    assert summary == f"init: {composed['init']['name']}"
    page.close()


def test_a_run_without_config_says_so(browser, tensorboard: str, tmp_path: Path) -> None:
    page, frame = open_tab(browser, tensorboard, tmp_path)

    def no_config(route) -> None:  # as a run logged before the config was
        body = route.fetch().json()
        route.fulfill(json={**body, "config": None})

    page.route("**/data/plugin/gradexp/summary?*", no_config)
    frame.locator("#run").select_option(SWEEP_RUNS[0])
    config = frame.locator("#config")
    config.wait_for()
    assert config.evaluate("c => c.tagName") == "P"
    assert "no config logged" in config.text_content()
    page.close()


def test_a_sweep_card_opens_with_enter(browser, tensorboard: str, tmp_path: Path) -> None:
    page, frame = open_tab(browser, tensorboard, tmp_path)
    frame.locator("#sweep[data-complete]").wait_for()
    runs = sorted([*SWEEP_RUNS, "lstm"])
    # A card's heatmap is not a Tab stop of its own: Tab goes from card to card.
    assert frame.locator("#sweep canvas[tabindex]").count() == 0
    frame.locator("#filter").focus()
    focused = "() => document.activeElement.closest('.card')?.dataset.run"
    page.keyboard.press("Tab")
    assert frame.locator("body").evaluate(focused) == runs[0]
    page.keyboard.press("Tab")
    assert frame.locator("body").evaluate(focused) == runs[1]
    page.screenshot(path=str(tmp_path / "sweep_focus.png"), full_page=True)
    page.keyboard.press("Enter")
    frame.locator("#heatmap").wait_for()
    assert frame.locator("h2").text_content() == runs[1]
    assert frame.locator("#view").input_value() == "run"
    assert frame.locator("#run").input_value() == runs[1]
    page.close()


def test_a_recurrent_run_shows_gradients_through_time(
    browser, tensorboard: str, logdir: Path, tmp_path: Path
) -> None:
    page, frame = open_tab(browser, tensorboard, tmp_path)
    frame.locator("#run").select_option("lstm")
    time_section = frame.locator("#time canvas[data-rows]")
    time_section.first.wait_for()
    assert time_section.first.get_attribute("data-rows") == "8"  # t = 0..7
    # Read by keyboard as well: t=1 at the first logged step, as the event file holds it.
    time_section.first.focus()
    page.keyboard.press("ArrowUp")
    text = frame.locator("#time .readout").first.text_content()
    series = event_values(logdir / "lstm")["time_grad/00_recurrent.0/t1"]
    step = min(series)
    assert f"lstm · 00_recurrent.0 t=1 · step {step} · " in text, text
    assert np.float32(shown_value(text, "time_grad")) == np.float32(series[step]), text
    page.screenshot(path=str(tmp_path / "recurrent.png"), full_page=True)
    page.close()


def test_the_plugin_is_registered_for_tensorboard() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="tensorboard_plugins") if e.name == "gradexp"]
    plugin = entry.load()
    assert plugin.plugin_name == "gradexp"
    static = Path(sys.modules[plugin.__module__].__file__).parent / "static" / "index.js"
    assert static.is_file()  # shipped as package data (pyproject's package-data)


def test_the_readme_screenshots_script_draws_the_three_views(tmp_path: Path) -> None:
    pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if CHROMIUM is None:
        pytest.skip("no Chromium here (apt-get install -y chromium)")
    script = Path(__file__).resolve().parents[1] / "scripts" / "tab_screenshots.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "img"), "--logdir",
         str(tmp_path / "runs"), "--steps", "20", "--lstm-steps", "20"],
        capture_output=True, text=True, env=cli_env(), timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    for name, height in (("tab_sweep", 560), ("tab_vanishing", 1250), ("tab_recurrent", 1500)):
        with Image.open(tmp_path / "img" / f"{name}.png") as im:
            assert im.size == (1300, height)
            assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50  # not a blank page


def test_a_runs_own_thresholds_draw_its_contours(browser, tensorboard: str, tmp_path: Path) -> None:
    magenta = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4)
        if (d[i] === 0xd8 && d[i + 1] === 0x1b && d[i + 2] === 0x60) n++; return n; }"""
    counts = {}
    for ratio in (0.999, 1e-30):
        page, frame = open_tab(browser, tensorboard, tmp_path)

        def own(route, value: float = ratio) -> None:  # trained with diagnose.vanishing_ratio
            body = route.fetch().json()
            config = {**body["config"], "diagnose.vanishing_ratio": value}
            route.fulfill(json={**body, "config": config})

        page.route("**/data/plugin/gradexp/summary?*", lambda route, _request: own(route))
        frame.locator("#run").select_option(SWEEP_RUNS[0])
        frame.locator("#heatmap").wait_for()
        assert f"below {ratio:g} of the head" in frame.locator(".what").text_content()
        counts[ratio] = frame.locator("#heatmap").evaluate(magenta)
        page.close()
    # Every layer under the head is below 0.999 of it somewhere; nothing below 1e-30.
    assert counts[0.999] > 0 and counts[1e-30] == 0, counts
