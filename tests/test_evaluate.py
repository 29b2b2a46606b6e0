"""evaluate.py: the statistics against hand-computed values, same-noise pairing, a full run end to
end on tiny models (subprocess, offline), and bad inputs."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import evaluate

REPO = Path(__file__).resolve().parents[1]

# -----------------------------------------------------------------------------
# weight-free stand-in rewards with the registry's call signature; used next to (not instead of)
# common.build_reward, so the tests do not depend on which scorers the registry holds.


class StandInReward:
    """(images, prompts, *, refined_prompts, answers, latents) -> (B,) float32 CPU tensor."""

    def __init__(self, fn):
        self.fn, self.last_terms = fn, {}

    def __call__(self, images, prompts, *, refined_prompts=None, answers=None, latents=None):
        scores = self.fn(images).float().cpu()
        self.last_terms = {"score": scores}
        return scores


STAND_INS = {
    "test-brightness": lambda images: images.mean(dim=(1, 2, 3)),
    "test-redness": lambda images: images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3)),
}


def install_stand_ins(module, set_attribute=setattr):
    """Stand-in rewards by name on top of the registry; a text-file prompt reader if none exists yet.
    (In-process tests pass monkeypatch.setattr so that common is restored afterwards.)"""
    real_build = getattr(module, "build_reward", None)

    def build_reward(spec, device="cpu", dtype=torch.float32):
        if spec in STAND_INS:
            return StandInReward(STAND_INS[spec])
        if real_build is not None:
            return real_build(spec, device, dtype)
        raise common.UserError(f"unknown reward '{spec}': use one of {', '.join(STAND_INS)}")

    set_attribute(module, "build_reward", build_reward)
    if not hasattr(module, "load_prompts"):

        def load_prompts(source, split="test", limit=None, seed=0):
            lines = [line.strip() for line in Path(source).read_text().splitlines() if line.strip()]
            if not lines:
                raise common.UserError(f"no prompts in '{source}'")
            return lines[:limit] if limit else lines

        set_attribute(module, "load_prompts", load_prompts)


DRIVER = f"""
import sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
import common, evaluate, test_evaluate
test_evaluate.install_stand_ins(common)
sys.argv[0] = "evaluate.py"
common.run_cli(evaluate.main)
"""


def run_evaluate(args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-c", DRIVER, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square on a green background\n\na large triangle\n")
    return path


# -----------------------------------------------------------------------------
# statistics against hand-computed values


def test_t_quantile_matches_the_tables():
    # two-sided 95% (p = 0.975) and one-sided 95% values from any t table
    assert evaluate.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert evaluate.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert evaluate.t_quantile(0.975, 9) == pytest.approx(2.2622, abs=1e-4)
    assert evaluate.t_quantile(0.95, 10) == pytest.approx(1.8125, abs=1e-4)
    assert evaluate.t_quantile(0.975, 10_000) == pytest.approx(1.9602, abs=1e-3)  # -> the normal 1.96
    assert evaluate.t_quantile(0.025, 4) == pytest.approx(-2.7764, abs=1e-4)


def test_mean_ci_by_hand():
    # [1..5]: mean 3, s = sqrt(2.5), se = s / sqrt(5) = 0.70711, half = 2.7764 * 0.70711 = 1.96324
    ci = evaluate.mean_ci([1, 2, 3, 4, 5])
    assert ci.n == 5 and ci.mean == pytest.approx(3.0)
    assert ci.low == pytest.approx(3 - 1.96324, abs=1e-4) and ci.high == pytest.approx(3 + 1.96324, abs=1e-4)
    # 90%: t_{0.95, 4} = 2.1318 -> half = 1.50743
    assert evaluate.mean_ci([1, 2, 3, 4, 5], 0.90).high == pytest.approx(3 + 1.50743, abs=1e-4)
    one = evaluate.mean_ci([0.7])
    assert one.mean == pytest.approx(0.7) and math.isnan(one.low) and math.isnan(one.high)
    assert evaluate.mean_ci([]).n == 0


def test_paired_difference_and_win_rate_by_hand():
    refined, baseline = [2, 4, 6, 5], [1, 3, 4, 5]
    # differences [1, 1, 2, 0]: mean 1, s = sqrt(2/3), se = 0.408248, t_{0.975, 3} = 3.18245 -> half 1.29923
    d = evaluate.paired_difference(refined, baseline)
    assert d.mean == pytest.approx(1.0) and d.n == 4
    assert d.low == pytest.approx(1 - 1.29923, abs=1e-4) and d.high == pytest.approx(1 + 1.29923, abs=1e-4)
    # pairing matters: the separate intervals overlap although every pair moved up or stayed
    assert evaluate.mean_ci(refined).low < evaluate.mean_ci(baseline).high
    # 3 wins, 1 tie -> (3 + 0.5) / 4
    assert evaluate.win_rate(refined, baseline) == pytest.approx(0.875)
    assert evaluate.win_rate(baseline, refined) == pytest.approx(0.125)
    assert evaluate.win_rate([1, 1], [1, 1]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        evaluate.paired_difference([1, 2], [1])


def test_nonfinite_pairs_are_dropped_and_counted():
    refined, baseline, dropped = evaluate.finite_pairs([1.0, math.nan, 3.0, 4.0], [0.0, 1.0, math.inf, 2.0])
    assert dropped == 2 and refined.tolist() == [1.0, 4.0] and baseline.tolist() == [0.0, 2.0]


def test_summarize_reports_both_arms_and_timing():
    records = [
        {"backbone": "b", "scores": {"baseline": {"r": x}, "refined": {"r": y}}}
        for x, y in [(1, 2), (3, 4), (4, 6), (5, 5)]
    ]
    timing = {"b": {"seconds": {"baseline": 2.0, "refined": 3.0}, "fallbacks": 1, "refinements": 8}}
    (row,) = evaluate.summarize(records, ["r"], ["b"], timing, 0.95)
    assert row["baseline_mean"] == pytest.approx(3.25) and row["refined_mean"] == pytest.approx(4.25)
    assert row["diff_mean"] == pytest.approx(1.0) and row["win_rate"] == pytest.approx(0.875)
    assert row["baseline_s_per_image"] == pytest.approx(0.5) and row["overhead"] == pytest.approx(1.5)
    assert row["fallback_rate"] == pytest.approx(1 / 8)


# -----------------------------------------------------------------------------
# same initial noise for both arms, independent of the batch


class ScriptedRefiner:
    """Returns `rewrite(prompt)` for every prompt (identity by default), with the Refiner's output shape."""

    def __init__(self, rewrite=lambda p: p):
        self.rewrite = rewrite

    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        from types import SimpleNamespace

        prompts = [self.rewrite(p) for p in current_prompts]
        return SimpleNamespace(prompts=prompts, answers=[common.format_answer(p) for p in prompts],
                               fallback=torch.zeros(len(prompts), dtype=torch.bool))


def _config(**overrides):
    config = evaluate.Config(refine_steps=2, steps=3, batch_size=2)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_baseline_is_the_stock_pipeline_and_the_pairs_share_their_noise(sd15):
    prompts = ["a red circle", "a blue square", "a large triangle"]
    rewards = {name: StandInReward(fn) for name, fn in STAND_INS.items()}

    # an identity refiner changes nothing: the refined image is the baseline image, bit for bit
    records, seconds, fallbacks, refinements, sheet = evaluate.evaluate_backbone(
        sd15, ScriptedRefiner(), rewards, prompts, [0, 1], _config(), sheet_prompts=2)
    assert len(records) == 6 and refinements == 6 * 2 and fallbacks == 0
    assert all(r["scores"]["baseline"] == r["scores"]["refined"] for r in records)
    assert torch.equal(sheet["baseline"][0], sheet["refined"][0]) and len(sheet["baseline"]) == 2
    assert seconds["baseline"] > 0 and seconds["refined"] > 0

    # baseline = stock diffusers with that image's own generator (seed 1, prompt 2)
    stock = sd15.pipe(prompts[2], num_inference_steps=3, guidance_scale=sd15.spec.guidance,
                      generator=evaluate.image_generators(1, [2])[0], output_type="pt").images
    expected = STAND_INS["test-brightness"](stock.float())[0].item()
    (record,) = [r for r in records if r["seed"] == 1 and r["prompt_index"] == 2]
    assert record["scores"]["baseline"]["test-brightness"] == pytest.approx(expected, abs=1e-6)

    # the batch does not change an image's noise: batch size 1 gives the same baseline scores
    single, *_ = evaluate.evaluate_backbone(sd15, None, rewards, prompts, [0, 1], _config(batch_size=1))
    # (equal up to float rounding: batched convolutions sum in a different order)
    for one, batched in zip(single, records):
        for name in rewards:
            assert one["scores"]["baseline"][name] == pytest.approx(batched["scores"]["baseline"][name], abs=1e-5)
    assert all("refined" not in r["scores"] for r in single)

    # different seeds draw different noise
    assert records[0]["scores"]["baseline"] != records[3]["scores"]["baseline"]

    # a refiner that rewrites the prompt changes the refined image only
    rewritten, *_ = evaluate.evaluate_backbone(
        sd15, ScriptedRefiner(lambda p: "a green square on a red background"), rewards, prompts, [0, 1], _config())
    assert [r["scores"]["baseline"] for r in rewritten] == [r["scores"]["baseline"] for r in records]
    assert all(r["refined_prompt"] == "a green square on a red background" for r in rewritten)
    assert any(r["scores"]["refined"] != r["scores"]["baseline"] for r in rewritten)


# -----------------------------------------------------------------------------
# end to end, offline, as a user runs it


def test_full_evaluation_end_to_end(tiny_sd15_dir, tiny_sdxl_dir, tiny_refiner_dir, prompt_file, tmp_path):
    out = tmp_path / "eval"
    result = run_evaluate([
        "--backbones", f"{tiny_sd15_dir},{tiny_sdxl_dir}", "--refiner", tiny_refiner_dir,
        "--rewards", "test-brightness,test-redness", "--prompts", prompt_file, "--seeds", "0,1",
        "--steps", "3", "--refine-steps", "2", "--batch-size", "2", "--sheet-prompts", "2", "--out", out,
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("results.md", "results.csv", "results.json", "results.png", "samples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    data = json.loads((out / "results.json").read_text())
    assert data["num_prompts"] == 3 and data["seeds"] == [0, 1]
    assert len(data["images"]) == 2 * 3 * 2  # backbones x prompts x seeds, each scored by both rewards
    assert all(set(r["scores"]["refined"]) == {"test-brightness", "test-redness"} for r in data["images"])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(Path(r["backbone"]).name, r["reward"]) for r in rows] == [
        (Path(b).name, w) for b in (tiny_sd15_dir, tiny_sdxl_dir) for w in ("test-brightness", "test-redness")]

    # every number of the table can be recomputed from the per-image scores in results.json
    for row in data["rows"]:
        mine = [r for r in data["images"] if r["backbone"] == row["backbone"]]
        base = [r["scores"]["baseline"][row["reward"]] for r in mine]
        refined = [r["scores"]["refined"][row["reward"]] for r in mine]
        assert row["n"] == 6
        assert row["baseline_mean"] == pytest.approx(np.mean(base))
        assert row["refined_high"] == pytest.approx(evaluate.mean_ci(refined).high)
        assert row["diff_low"] == pytest.approx(evaluate.paired_difference(refined, base).low)
        assert row["win_rate"] == pytest.approx(evaluate.win_rate(refined, base))
        assert row["baseline_s_per_image"] > 0 and row["overhead"] > 0
    timing = data["timing"][rows[0]["backbone"]]
    assert timing["schedule"] == [1, 2] and timing["refinements"] == 6 * 2

    md = (out / "results.md").read_text()
    assert "| backbone | reward |" in md and "test-redness" in md and "python evaluate.py" in md
    from PIL import Image

    assert Image.open(out / "samples.png").size[0] == 4 * evaluate.CELL  # 2 backbones x (baseline, refined)


def test_baseline_only_with_an_aligned_unet(tiny_sd15_dir, prompt_file, tmp_path, monkeypatch):
    """--refiner none evaluates the backbone alone; --unet puts another UNet over it (composition runs)."""
    install_stand_ins(common, monkeypatch.setattr)
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", [
        "evaluate.py", "--backbones", str(tiny_sd15_dir), "--unet", str(tiny_sd15_dir), "--refiner", "none",
        "--rewards", "test-brightness", "--prompts", str(prompt_file), "--limit", "2", "--seeds", "3",
        "--steps", "2", "--out", str(out),
    ])
    evaluate.main()
    data = json.loads((out / "results.json").read_text())
    (row,) = data["rows"]
    assert row["backbone"].endswith(f"+unet:{tiny_sd15_dir.name}") and row["n"] == 2
    assert row["refined_mean"] is None and row["win_rate"] is None
    assert "| – |" in (out / "results.md").read_text()


# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, no traceback


@pytest.mark.parametrize("case", ["backbone", "reward", "empty prompts", "seeds"])
def test_bad_input_is_one_clear_line(case, tiny_sd15_dir, tiny_refiner_dir, prompt_file, tmp_path):
    args = {"--backbones": str(tiny_sd15_dir), "--refiner": "none", "--rewards": "test-brightness",
            "--prompts": str(prompt_file), "--seeds": "0", "--out": str(tmp_path / "eval")}
    if case == "backbone":
        args["--backbones"] = f"{tiny_sd15_dir},no-such-backbone"
    elif case == "reward":
        args["--rewards"] = "test-brightness,no-such-reward"
    elif case == "empty prompts":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n  \n")
        args["--prompts"] = str(empty)
    else:
        args["--seeds"] = "0,one"
    result = run_evaluate([x for pair in args.items() for x in pair])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    keyword = {"backbone": "no-such-backbone", "reward": "no-such-reward", "empty prompts": "prompt", "seeds": "seeds"}[case]
    assert keyword in lines[0]
