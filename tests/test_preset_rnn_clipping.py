"""experiment=rnn_clipping (Pascanu et al. 2013): the preset sweeps the four clip modes
over seeds 0-2 and logs every step; the claim module finds an exploding step (a gradient
spike and a loss jump) from the measurements and judges the claim from them: exploding
unclipped runs and tamed norm-clipped ones reproduce it, calm unclipped runs do not."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from conftest import REPO_ROOT, composed
from gradexp.report import RunRow

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from claims import rnn_clipping as claim  # noqa: E402

CALM_NORMS = [60.0] + [2.0, 3.0, 1.5, 2.5] * 10
CALM_LOSSES = [1.8] + [0.2, 0.18, 0.17, 0.16] * 10


def explode(series: list[float], at: int, factor: float) -> list[float]:
    out = list(series)
    out[at] *= factor
    return out


def fake_run(root: Path, clip: str, seed: int, norms: list[float], losses: list[float]) -> RunRow:
    """A run directory with one logged step per entry; diverged when the last loss is
    not finite (the final test loss then absent), else completed at the last loss."""
    path = root / f"{clip}_{seed}"
    path.mkdir(parents=True)
    with SummaryWriter(str(path)) as writer:
        for step, (norm, loss) in enumerate(zip(norms, losses)):
            writer.add_scalar("grad/norm_pre_clip", norm, step)
            writer.add_scalar("loss/train", loss, step)
    diverged = bool(losses) and not math.isfinite(losses[-1])
    metrics = {"loss/test": losses[-1]} if losses and not diverged else {}
    summary = {"status": "diverged" if diverged else "completed", "metrics": metrics}
    (path / "summary.json").write_text(json.dumps(summary))
    return RunRow(
        path.name, path, {"clip": clip, "seed": str(seed)}, summary, summary["status"], None
    )


def test_the_preset_logs_every_step_of_an_rnn_with_radius_above_one():
    cfg = composed("experiment=rnn_clipping")
    assert (cfg.model.name, cfg.model.recurrent_init, cfg.model.recurrent_scale) == (
        "rnn",
        "orthogonal",
        1.5,
    )
    assert (cfg.optim.name, cfg.trainer.log_every, cfg.data.name) == ("sgd", 1, "adding")


def test_a_spike_and_a_jump_make_an_exploding_step(tmp_path: Path):
    calm = fake_run(tmp_path, "none", 0, CALM_NORMS, CALM_LOSSES)
    assert not claim.exploded(calm) and claim.tamed(calm)
    # the norm spikes 50x at step 20 and the loss follows 40x at step 22
    norms = explode(CALM_NORMS, 20, 50.0)
    losses = explode(CALM_LOSSES, 22, 40.0 * 0.16 / CALM_LOSSES[22])
    spiky = fake_run(tmp_path, "none", 1, norms, losses)
    ratio, step = claim.spike(spiky)
    assert step == 20 and ratio is not None and ratio > 20
    assert claim.jump(spiky)[1] == 22 and claim.exploded(spiky) and not claim.tamed(spiky)
    # a spike the loss does not follow is no exploding step
    assert not claim.exploded(fake_run(tmp_path, "none", 2, norms, CALM_LOSSES))
    diverged = fake_run(tmp_path, "none", 3, norms[:25] + [math.inf], losses[:25] + [math.nan])
    assert claim.spike(diverged) == (math.inf, 25) and claim.exploded(diverged)


def sweep(root: Path, unclipped: list[tuple[list[float], list[float]]]) -> list[RunRow]:
    runs = [fake_run(root, "none", s, n, loss) for s, (n, loss) in enumerate(unclipped)]
    tamed = [v * 0.9 for v in CALM_LOSSES]  # below the calm unclipped losses
    for clip in ("value", "norm", "agc"):
        runs += [fake_run(root, clip, s, CALM_NORMS, tamed) for s in range(3)]
    return runs


def test_the_claim_is_judged_from_the_runs(tmp_path: Path):
    norms = explode(CALM_NORMS, 20, 50.0)
    nan_run = (norms[:25] + [math.inf], explode(CALM_LOSSES, 22, 60.0)[:25] + [math.nan])
    jumpy = (norms, explode(CALM_LOSSES, 22, 60.0))
    result = claim.evaluate(
        sweep(tmp_path / "a", [nan_run, jumpy, (CALM_NORMS, CALM_LOSSES)]), tmp_path / "fig"
    )
    assert result.verdict == "reproduced", result.why
    assert "2/3" in result.why and result.table.count("\n") == 5
    assert [p.name for p in result.figures] == ["rnn_clipping_spikes.png"]
    calm = claim.evaluate(sweep(tmp_path / "b", [(CALM_NORMS, CALM_LOSSES)] * 3), tmp_path / "fig")
    assert calm.verdict == "partly", calm.why  # norm clipping tames, but nothing exploded


def test_tiny_runs_do_not_crash_the_claim(tmp_path: Path):
    runs = [fake_run(tmp_path, "none", 0, [5.0], [1.0]), fake_run(tmp_path, "norm", 0, [], [])]
    result = claim.evaluate(runs, tmp_path / "fig")
    assert result.verdict in ("partly", "not reproduced")
