"""`ppflower reproduce`: every cell of Table I comes from a stage's own output; stages resume."""

from __future__ import annotations

import json
import re

import pytest

from experiments.reproduce import reproduce


def table_text(out) -> str:
    return (out / "table1.md").read_text()


@pytest.mark.slow
def test_smoke_preset_table_is_measured_and_resumable(tmp_path, data_dir, vgg_weights):
    out, work = tmp_path / "results", tmp_path / "work"
    result = reproduce("smoke", out, work, data_dir, vgg_weights, log=lambda *a: None)
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["plain", "tanaka", "pixel", "pixel-per-image", "gan", "alpha0.005", "alpha0.1"]
    # accuracies: exactly the stage outputs (ψ metrics, the user's metrics from the Flower run)
    for row, stage in [("plain", "psi-resnet20"), ("tanaka", "psi-resnet20-tanaka"), ("pixel", "psi-resnet20-pixel"),
                       ("pixel-per-image", "psi-resnet20-pixel-per-image"), ("gan", "psi-resnet20-gan")]:
        measured = json.loads((out / f"{stage}.json").read_text())["test-accuracy"]
        assert rows[row]["resnet20"]["measured"] == round(100 * measured, 2)
    for alpha in ("0.005", "0.1"):
        user = json.loads((out / f"transform-resnet20-a{alpha}" / "user-0.json").read_text())
        assert rows[f"alpha{alpha}"]["resnet20"]["measured"] == round(100 * user["test-accuracy"], 2)
        assert user["alpha"] == float(alpha)
    # attack rows: medians from each attack's own per-image results; Tanaka has 6 channels, no protected PSNR
    for row in ("tanaka", "pixel", "pixel-per-image", "gan", "alpha0.005", "alpha0.1"):
        attack = json.loads((out / "attack" / f"{row}.json").read_text())
        assert rows[row]["itn-psnr"]["median"] == attack["psnr-estimated"]["median"]
        assert rows[row]["recognisability-itn"] == attack["recognisability-estimated"]
        assert 0.0 <= attack["recognisability-estimated"] <= 1.0
    # the stronger attacker: a sweep of the preset's weights on α = 0.005, the chosen one on every α row
    sweep = json.loads((out / "strong_sweep.json").read_text())
    assert sweep["row"] == "alpha0.005" and set(sweep["val-mse"]) == {"0.01", "0.1"}
    assert f"{sweep['chosen']:g}" == min(sweep["val-mse"], key=sweep["val-mse"].get)
    for row in ("alpha0.005", "alpha0.1"):
        strong = json.loads((out / "attack" / f"{row}-strong.json").read_text())
        restorer = json.loads((out / "attack" / f"{row}-restorer.json").read_text())
        assert strong["config"]["perceptual"] == sweep["chosen"] and restorer["method"] == "restorer"
        # every attacker trained and was measured on the 8-bit images the provider received (the default wire)
        assert {a["wire"] for a in (strong, restorer, json.loads((out / "attack" / f"{row}.json").read_text()))} \
            == {"uint8"} == {rows[row]["wire"]}
        # the best attack: the strongest of the three, by each criterion separately
        three = [rows[row]["itn-psnr"]["median"], strong["psnr-estimated"]["median"],
                 restorer["psnr-estimated"]["median"]]
        assert rows[row]["best-attack-psnr"] == max(three)
        assert rows[row]["recognisability-best-attack"] == max(
            a["recognisability-estimated"] for a in (strong, restorer, json.loads(
                (out / "attack" / f"{row}.json").read_text())))
        leak = rows[row]["label-leakage"]  # what the user inferred of the provider's labels, from its user-0.json
        user = json.loads((out / f"transform-resnet20-a{row[5:]}" / "user-0.json").read_text())
        assert leak == user["label-leakage"] and leak["chance"] == 0.1 and 0.0 <= leak["known-10-accuracy"] <= 1.0
    summary = json.loads((out / "attack" / "summary.json").read_text())
    assert set(summary["alpha0.005"]["attackers"]) == {"ITN", "ITN+feat", "restorer"}
    # the grad-noise defence: the α = 0.005 row beside h_θ trained with the smoke preset's noise level
    defence = json.loads((out / "defence.json").read_text())
    assert [p["grad-noise"] for p in defence["points"]] == [0.0, 4.0]
    assert defence["points"][0]["label-leakage"] == rows["alpha0.005"]["label-leakage"]
    noisy = json.loads((out / "transform-resnet20-a0.005-noise4" / "run.json").read_text())
    assert noisy["config"]["grad-noise"] == 4.0 and "grad-noise" in table_text(out)
    assert rows["tanaka"]["recognisability-protected"] is None  # 6 channels: nothing for an image classifier
    assert 0.0 <= rows["pixel"]["recognisability-protected"] <= 1.0
    # the budget curve: h_θ after each kept epoch (the smoke preset: α = 0.005 after epoch 1)
    budget = json.loads((out / "budget_curve.json").read_text())
    assert set(budget["alphas"]) == {"0.005"}
    assert [p["epoch"] for p in budget["alphas"]["0.005"]] == [1]
    assert 0.0 <= budget["alphas"]["0.005"][0]["test-accuracy"] <= 1.0
    assert rows["tanaka"]["protected-psnr"] is None and rows["pixel"]["protected-psnr"]["median"] > 0
    assert rows["alpha0.005"]["resnet20"]["paper"] == 91.72 and rows["gan"]["resnet20"]["paper"] is None
    table = (out / "table1.md").read_text()
    assert "Deviations from the paper" in table and f"| {rows['pixel']['resnet20']['measured']:.2f} |" in table
    best = rows["alpha0.005"]  # the best attack's cells name the attacker that reached them
    assert f"{best['best-attack-psnr']:.2f} ({best['best-attack-psnr-by']})" in table or \
        f"{best['best-attack-psnr']:.2f} / {best['best-attack-ssim']:.3f} ({best['best-attack-psnr-by']})" in table
    for fig in ("fig5_alpha.png", "fig6_attack.png", "fig7_psnr_boxplot.png", "fig_frontier.png",
                "fig_budget_curve.png", "fig_defence.png"):
        assert (out / fig).stat().st_size > 10_000
    # provenance names the data and weights relative to the repo, not by this machine's directories
    from experiments.reproduce import REPO

    # (a whole path only: this test's own tmp dir has a "work" folder, which a bare substring "/work/" matched)
    machine_path = re.compile(r"(?<![\w./~-])" + re.escape(f"{REPO.parent}/"))
    for path in [*out.glob("*.json"), *out.glob("*/*.json"), out / "table1.md"]:
        assert not machine_path.search(path.read_text()), path
    stages = json.loads((out / "stages.json").read_text())
    # ψ, observer, 2 h_θ + 1 with grad-noise, 2 attacks, 2 strong sweeps + 1 strong, 6 restorers (2 α rows, GAN, 3
    # baselines), GAN, 4 baseline ψ, 4 baseline attacks (the budget curve's one point is α = 0.005's selected h_θ,
    # whose attack is reused)
    assert all(s["finished"] and s["attempts"] == 1 for s in stages.values()) and len(stages) == 25, sorted(stages)
    # a second run finds every stage done and only rewrites the report
    again = reproduce("smoke", out, work, data_dir, vgg_weights, log=lambda *a: None)
    assert again["rows"] == result["rows"]
    assert all(s["attempts"] == 1 for s in json.loads((out / "stages.json").read_text()).values())


def test_a_stage_that_failed_after_writing_its_output_runs_again(tmp_path):
    """A Flower run writes run.json even when its users failed: that output must not count as a finished stage (the
    cpu reproduce once went on with a failed α row and then stopped at its missing metrics)."""
    from experiments.reproduce import StageRunner
    from pp_flower.errors import PPFlowerError

    done, calls = tmp_path / "stage" / "run.json", []

    def failing() -> None:
        calls.append("fail")
        done.parent.mkdir(exist_ok=True)
        done.write_text("{}")
        raise PPFlowerError("the users failed")

    def working() -> None:
        calls.append("ok")
        done.write_text('{"ok": true}')

    runner = StageRunner(tmp_path / "out", lambda: "data", log=lambda *a: None)
    (tmp_path / "out").mkdir()
    with pytest.raises(PPFlowerError):
        runner.stage("s", done, failing, "cmd")
    again = StageRunner(tmp_path / "out", lambda: "data", log=lambda *a: None)  # a rerun of the command
    again.stage("s", done, working, "cmd")
    again.stage("s", done, working, "cmd")  # now finished: skipped
    assert calls == ["fail", "ok"]
    assert json.loads((tmp_path / "out" / "stages.json").read_text())["s"]["finished"] is True


def test_provenance_rewrites_whole_paths_of_this_checkout_only():
    """Results name files relative to the repo; a path that merely contains the repo's parent's name (the GPU run's
    /tmp/work/psi with the repo at /work/main) stays whole instead of becoming "/tmp../psi"."""
    from pathlib import Path

    from experiments.reproduce.report import portable

    root = Path("/work/main")
    text = 'ppflower curve --classifier /tmp/work/psi/best.pt --out /work/main/results/x --data "/work/shared/d"'
    expected = 'ppflower curve --classifier /tmp/work/psi/best.pt --out results/x --data "../shared/d"'
    assert portable(text, root) == expected
    assert portable("x=/work/main/a /work/mainly/b", root) == "x=a ../mainly/b"
