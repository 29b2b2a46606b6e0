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
import lrm
import promptloop
import refiners
import reports
import rewards

REPO = Path(__file__).resolve().parents[1]

REWARDS = ("toy-aesthetic", "jpeg")  # weight-free rewards of the registry: they score any image


def run_evaluate(args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared machine: one intra-op thread avoids oversubscription (20x slower with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        self.rewrite, self.previews = rewrite, []

    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        from types import SimpleNamespace

        self.previews.append(previews)

        prompts = [self.rewrite(p) for p in current_prompts]
        return SimpleNamespace(prompts=prompts, answers=[refiners.format_answer(p) for p in prompts],
                               fallback=torch.zeros(len(prompts), dtype=torch.bool))


def _config(**overrides):
    config = evaluate.Config(refine_steps=2, steps=3, batch_size=2)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_baseline_is_the_stock_pipeline_and_the_pairs_share_their_noise(sd15):
    prompts = ["a red circle", "a blue square", "a large triangle"]
    scorers = {name: rewards.build_reward(name) for name in REWARDS}

    # an identity refiner changes nothing: the refined image is the baseline image, bit for bit
    records, seconds, fallbacks, refinements, sheet, evaluations = evaluate.evaluate_backbone(
        sd15, ScriptedRefiner(), scorers, prompts, [0, 1], _config(), sheet_prompts=2)
    assert evaluations == {"baseline": 3, "refined": 3}  # denoiser evaluations per image: N = 3 steps
    assert len(records) == 6 and refinements == 6 * 2 and fallbacks == 0
    assert all(r["scores"]["baseline"] == r["scores"]["refined"] for r in records)
    assert torch.equal(sheet["baseline"][0], sheet["refined"][0]) and len(sheet["baseline"]) == 2
    assert seconds["baseline"] > 0 and seconds["refined"] > 0

    # baseline = stock diffusers with that image's own generator (seed 1, prompt 2)
    stock = sd15.pipe(prompts[2], num_inference_steps=3, guidance_scale=sd15.spec.guidance,
                      generator=evaluate.image_generators(1, [2])[0], output_type="pt").images
    expected = scorers["toy-aesthetic"](stock.float(), prompts[2:])[0].item()
    (record,) = [r for r in records if r["seed"] == 1 and r["prompt_index"] == 2]
    assert record["scores"]["baseline"]["toy-aesthetic"] == pytest.approx(expected, abs=1e-6)

    # the batch does not change an image's noise: batch size 1 gives the same baseline images, up to
    # float rounding (batched convolutions sum in another order). Images, not scores, are compared:
    # a discrete score (a JPEG's byte count, a shape mask) can jump on a rounding difference.
    single, *_, single_sheet, _ = evaluate.evaluate_backbone(sd15, None, scorers, prompts, [0, 1], _config(batch_size=1),
                                                          sheet_prompts=2)
    torch.testing.assert_close(torch.stack(single_sheet["baseline"]), torch.stack(sheet["baseline"]), atol=1e-4, rtol=0)
    assert all("refined" not in r["scores"] for r in single)

    # different seeds draw different noise
    assert records[0]["scores"]["baseline"] != records[3]["scores"]["baseline"]

    # a refiner that rewrites the prompt changes the refined image only
    rewriter = ScriptedRefiner(lambda p: "a green square on a red background")
    rewritten, *_ = evaluate.evaluate_backbone(sd15, rewriter, scorers, prompts, [0, 1], _config())
    assert [r["scores"]["baseline"] for r in rewritten] == [r["scores"]["baseline"] for r in records]
    assert all(r["refined_prompt"] == "a green square on a red background" for r in rewritten)
    assert any(r["scores"]["refined"] != r["scores"]["baseline"] for r in rewritten)
    assert all(p.std() > 0 for p in rewriter.previews)  # the refiner saw the denoised estimate

    # the no-feedback ablation: the refiner sees grey previews, the prompt rewrite still applies
    blind = ScriptedRefiner(lambda p: "a green square on a red background")
    blinded, *_ = evaluate.evaluate_backbone(sd15, blind, scorers, prompts, [0], _config(blank_preview=True))
    assert blind.previews and all(torch.all(p == 0.5) for p in blind.previews)
    # the same batch as `rewritten`'s seed 0 and the same prompts written: the same images, bit for bit
    assert [r["scores"] for r in blinded] == [r["scores"] for r in rewritten[:3]]


# -----------------------------------------------------------------------------
# end to end, offline, as a user runs it


@pytest.mark.slow
def test_full_evaluation_end_to_end(tiny_sd15_dir, tiny_sdxl_dir, tiny_refiner_dir, prompt_file, tmp_path):
    out = tmp_path / "eval"
    result = run_evaluate([
        "--backbones", f"{tiny_sd15_dir},{tiny_sdxl_dir}", "--refiner", tiny_refiner_dir,
        "--rewards", ",".join(REWARDS), "--prompts", prompt_file, "--seeds", "0,1",
        "--steps", "3", "--refine-steps", "2", "--batch-size", "2", "--sheet-prompts", "2", "--out", out,
        "--max-new-tokens", "12", "--temperature", "0", "--preview-decoder", "linear",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("results.md", "results.csv", "results.json", "results.png", "samples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    data = json.loads((out / "results.json").read_text())
    assert data["num_prompts"] == 3 and data["seeds"] == [0, 1]
    assert len(data["images"]) == 2 * 3 * 2  # backbones x prompts x seeds, each scored by both rewards
    assert all(set(r["scores"]["refined"]) == set(REWARDS) for r in data["images"])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["backbone"], r["reward"]) for r in rows] == [  # folders are labelled by their name
        (b.name, w) for b in (tiny_sd15_dir, tiny_sdxl_dir) for w in REWARDS]

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
    assert "| backbone | reward |" in md and "toy-aesthetic" in md and "python evaluate.py" in md
    from PIL import Image

    assert Image.open(out / "samples.png").size[0] >= 4 * reports.CELL  # 2 backbones x (baseline, refined)


@pytest.mark.slow
def test_baseline_only_with_an_aligned_unet_and_a_lora(tiny_sd15_dir, prompt_file, tmp_path, monkeypatch):
    """--refiner none evaluates the backbone alone; --unet / --lora put an aligned variant over it
    (the paper's composition runs)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = common.load_backbone(str(tiny_sd15_dir)).pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))

    def run(*variant):
        out = tmp_path / f"eval{len(variant)}"
        monkeypatch.setattr(sys, "argv", [
            "evaluate.py", "--backbones", str(tiny_sd15_dir), "--refiner", "none", "--rewards", "toy-aesthetic+jpeg:0.01",
            "--prompts", str(prompt_file), "--limit", "2", "--seeds", "3", "--steps", "2", "--out", str(out), *variant,
        ])
        evaluate.main()
        return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()

    (plain, _), (aligned, md) = run(), run("--unet", str(tiny_sd15_dir), "--lora", str(tmp_path / "lora"))
    (row,) = aligned["rows"]
    assert row["backbone"] == f"{tiny_sd15_dir.name}+unet:{tiny_sd15_dir.name}+lora:lora" and row["n"] == 2
    assert row["reward"] == "toy-aesthetic+jpeg:0.01"  # a composite, written with '+' in the list
    assert row["refined_mean"] is None and row["win_rate"] is None and "| – |" in md
    assert row["baseline_mean"] != plain["rows"][0]["baseline_mean"]  # the LoRA changed the images


@pytest.mark.slow
def test_evaluation_on_flow_matching_backbones(tiny_sd3_dir, tiny_flux_dir, tiny_refiner_dir, prompt_file, tmp_path, monkeypatch):
    """SD3 (without its T5 encoder, --no-t5) and FLUX backbones through the whole evaluation."""
    def run(backbones, out, *extra):
        monkeypatch.setattr(sys, "argv", [
            "evaluate.py", "--backbones", backbones, "--refiner", str(tiny_refiner_dir), "--rewards", "toy-aesthetic",
            "--prompts", str(prompt_file), "--limit", "2", "--seeds", "0", "--steps", "3", "--refine-steps", "1",
            "--size", "64", "--max-new-tokens", "8", "--out", str(tmp_path / out), *extra,
        ])
        evaluate.main()
        return json.loads((tmp_path / out / "results.json").read_text())

    data = run(f"{tiny_sd3_dir},{tiny_flux_dir}", "both")
    assert [row["backbone"] for row in data["rows"]] == [tiny_sd3_dir.name, tiny_flux_dir.name]
    assert all(row["n"] == 2 and row["refined_mean"] is not None for row in data["rows"])
    no_t5 = run(str(tiny_sd3_dir), "no-t5", "--no-t5")
    assert no_t5["rows"][0]["baseline_mean"] != data["rows"][0]["baseline_mean"]  # zeros instead of T5 tokens


# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit 2, no traceback


@pytest.mark.slow
@pytest.mark.parametrize("case", ["backbone", "reward", "empty prompts", "seeds", "answers reward", "search without lrm", "search count",
                                  "best-of without search"])
def test_bad_input_is_one_clear_line(case, tiny_sd15_dir, prompt_file, tmp_path, monkeypatch, capsys):
    args = {"--backbones": str(tiny_sd15_dir), "--refiner": "none", "--rewards": "toy-aesthetic",
            "--prompts": str(prompt_file), "--seeds": "0", "--out": str(tmp_path / "eval")}
    if case == "backbone":
        args["--backbones"] = f"{tiny_sd15_dir},no-such-backbone"
    elif case == "reward":
        args["--rewards"] = "toy-aesthetic,no-such-reward"
    elif case == "empty prompts":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n  \n")
        args["--prompts"] = str(empty)
    elif case == "seeds":
        args["--seeds"] = "0,one"
    elif case == "search without lrm":
        args["--search"] = "2,4"
    elif case == "search count":
        args["--search"] = "1,4"
    elif case == "best-of without search":
        args["--best-of"] = "2,3"
    else:  # `structure` scores the refiner's answers: a baseline image has none
        args["--rewards"] = "toy-aesthetic,structure"
    argv = [x for pair in args.items() for x in pair]
    if case == "backbone":  # once as a user meets it: a fresh process
        result = run_evaluate(argv)
        code, stderr = result.returncode, result.stderr
    else:  # the same path (common.run_cli around main) in-process: no interpreter start-up per case
        monkeypatch.setattr(sys, "argv", ["evaluate.py", *argv])
        with pytest.raises(SystemExit) as exit_info:
            common.run_cli(evaluate.main)
        code, stderr = exit_info.value.code, capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    keyword = {"backbone": "no-such-backbone", "reward": "no-such-reward", "empty prompts": "prompt", "seeds": "seeds",
               "answers reward": "structure", "search without lrm": "--lrm", "search count": ">= 2",
               "best-of without search": "--search"}[case]
    assert keyword in lines[0]


def test_search_arms_share_the_noise_and_count_the_evaluations_made(sd15):
    """--search 2: the search and best-of-2 arms beside baseline and refined; best-of-n's first
    candidate starts from the other arms' noise (so best-of-1 would be the refined arm). The search
    costs what it ran: 1 step of one row per image, then 2 x 2 of its two distinct candidates (5, not
    2 x 3); it is compared with best-of at that cost: refined (3) and best-of-2 (6) mixed, w = 2/3."""
    from test_search import CandidateRefiner, ScriptedScore

    prompts = ["a red circle", "a blue square", "a large triangle"]
    noise = evaluate.candidate_noise(sd15, 1, [0, 2], 3)
    assert noise.shape == (2, 3, *common.latent_shape(sd15)) and not torch.equal(noise[:, 0], noise[:, 1])
    drawn = promptloop.refined_sample(sd15, [prompts[0], prompts[2]], None, num_steps=2, generator=evaluate.image_generators(1, [0, 2]))
    given = promptloop.refined_sample(sd15, [prompts[0], prompts[2]], None, num_steps=2, latents=noise[:, 0])
    assert torch.equal(drawn.images, given.images)

    scorers = {"toy-aesthetic": rewards.build_reward("toy-aesthetic")}
    records, seconds, _, _, sheet, evaluations = evaluate.evaluate_backbone(
        sd15, CandidateRefiner(2), scorers, prompts, [0], _config(search="2"), sheet_prompts=1, score=ScriptedScore(2))
    assert evaluations == {"baseline": 3, "refined": 3, "search 2": 5, "best-of-2": 6}
    assert all(set(r["scores"]) == set(evaluations) == set(r["evaluations"]) for r in records) and set(seconds) == set(evaluations)
    assert set(sheet) == {"baseline", "refined", "final_prompts"}
    timing = {sd15.name: {"seconds": seconds, "evaluations": evaluations, "steps": 3}}
    rows = evaluate.search_summary(records, ["toy-aesthetic"], [sd15.name], timing, 0.95)
    assert [r["arm"] for r in rows] == list(evaluations) and [r["evaluations"] for r in rows] == [3, 3, 5, 6]
    assert rows[2]["equal_cost_best_of"] == "refined / best-of-2, w 0.67" and not rows[3]["equal_cost_best_of"]
    matched = [(r["scores"]["refined"]["toy-aesthetic"] + 2 * r["scores"]["best-of-2"]["toy-aesthetic"]) / 3 for r in records]
    assert rows[2]["vs_equal_cost_mean"] == pytest.approx(np.mean([r["scores"]["search 2"]["toy-aesthetic"] - x for r, x in zip(records, matched)]))
    refined = [r for r in rows if r["arm"] == "refined"][0]
    assert refined["vs_refined_mean"] == 0 and refined["win_rate_vs_refined"] == 0.5
    by_hand = np.mean([r["scores"]["search 2"]["toy-aesthetic"] - r["scores"]["baseline"]["toy-aesthetic"] for r in records])
    assert rows[2]["vs_baseline_mean"] == pytest.approx(by_hand)


@pytest.mark.slow
def test_search_end_to_end(tiny_sd15_dir, tiny_refiner_dir, prompt_file, tmp_path, monkeypatch):
    lrm_dir = tmp_path / "lrm"
    lrm.save_lrm(lrm.LatentRewardModel(common.load_backbone(str(tiny_sd15_dir)), lrm.LRMConfig(backbone=str(tiny_sd15_dir), hidden=16,
                                                                                                   ensemble_draws=2)), lrm_dir)
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", [
        "evaluate.py", "--backbones", str(tiny_sd15_dir), "--refiner", str(tiny_refiner_dir), "--rewards", "toy-aesthetic",
        "--prompts", str(prompt_file), "--limit", "2", "--seeds", "0", "--steps", "3", "--refine-steps", "2", "--max-new-tokens", "8",
        "--out", str(out), "--lrm", str(lrm_dir), "--search", "2,3", "--best-of", "2,4"])
    evaluate.main()
    data = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in data["search_rows"]] == ["baseline", "refined", "search 2", "search 3", "best-of-2", "best-of-4"]
    assert [r["evaluations"] for r in data["search_rows"] if r["arm"].startswith("best-of")] == [6, 12]
    assert "## LRM-guided search vs best-of-n" in (out / "results.md").read_text()
    assert (out / "search.png").stat().st_size > 0 and len((out / "search.csv").read_text().splitlines()) == 7


# -----------------------------------------------------------------------------
# the latent reward model's preference accuracy per noise bucket, next to a pixel reward


def _jpeg(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _toy_image(with_shape):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), (0, 0, 230))
    if with_shape:
        ImageDraw.Draw(image).rectangle([6, 6, 25, 25], fill=(230, 0, 0))
    return image


@pytest.mark.parametrize("folder", ["tiny_sd15_dir", "tiny_sd3_dir"])
def test_preference_accuracy_per_noise_bucket(folder, prompt_file, tmp_path, monkeypatch, request):
    """A UNet LRM and an MMDiT one: the pairs are encoded by each backbone's own VAE (4 / 16 channels)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    torch.manual_seed(0)
    folder = request.getfixturevalue(folder)
    backbone = common.load_backbone(str(folder))
    lrm_dir = tmp_path / "lrm"
    lrm.save_lrm(lrm.LatentRewardModel(backbone, lrm.LRMConfig(backbone=str(folder), hidden=16, ensemble_draws=2)), lrm_dir)
    shape, blank = _jpeg(_toy_image(True)), _jpeg(_toy_image(False))
    # label_0 = P(image 0 preferred). toy-aesthetic prefers the large contrasting shape: it agrees
    # with pairs 0-2, disagrees with pair 3; pair 4 is a tie (left out), pair 5 has no label (skipped)
    rows = [(shape, blank, 1.0), (blank, shape, 0.0), (shape, blank, 1.0), (shape, blank, 0.0), (shape, blank, 0.5), (shape, blank, None)]
    table = pa.table({
        "caption": ["a red square on a blue background"] * len(rows), "jpg_0": [r[0] for r in rows], "jpg_1": [r[1] for r in rows],
        "label_0": [r[2] for r in rows], "label_1": [None if r[2] is None else 1 - r[2] for r in rows],
        "has_label": [r[2] is not None for r in rows], "are_different": [True] * len(rows),
    })
    pq.write_table(table, tmp_path / "test.parquet")

    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", [
        "evaluate.py", "--backbones", str(folder), "--refiner", "none", "--rewards", "toy-aesthetic",
        "--prompts", str(prompt_file), "--limit", "1", "--seeds", "0", "--steps", "1", "--out", str(out),
        "--lrm", str(lrm_dir), "--preference-data", str(tmp_path / "test.parquet"),
    ])
    evaluate.main()
    data = json.loads((out / "results.json").read_text())
    accuracy = {(r["scorer"], r["bucket"]): r for r in data["lrm_accuracy"]}
    assert [b for s, b in accuracy if s == "lrm"] == [f"σ {lo:.1f}-{hi:.1f}" for lo, hi in lrm.NOISE_BUCKETS]
    assert all(r["n"] == 4 for r in data["lrm_accuracy"])  # the tie and the unlabelled row are left out
    assert accuracy[("toy-aesthetic", "clean")]["accuracy"] == pytest.approx(0.75)
    assert data["preference_pairs"]["used"] == 5 and data["preference_pairs"]["no_label"] == 1
    assert data["preference_pairs"]["ties"] == 1
    assert "## Preference accuracy" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_trained_lrm_reaches_its_accuracy_on_held_out_toy_pairs(tmp_path, monkeypatch):
    """The LRM trained briefly on the toy pairs, then evaluate.py --lrm on 128 held-out test pairs:
    well above chance at low noise and noise-ensembled (the test split's noise ceiling is 0.88),
    and the toy aesthetic itself -- the labels' hidden rule -- near that ceiling."""
    import train_reward

    lrm_dir = tmp_path / "lrm"
    monkeypatch.setattr(sys, "argv", [
        "train_reward.py", "--data", str(common.TOY_DIR / "pickapic-toy"), "--backbone", "toy", "--out", str(lrm_dir),
        "--steps", "120", "--max-pairs", "800", "--max-val-pairs", "32", "--eval-every", "0", "--ensemble-draws", "4",
        "--device", "cpu", "--threads", "1"])
    train_reward.main()
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", [
        "evaluate.py", "--backbones", "toy", "--refiner", "none", "--rewards", "toy-aesthetic", "--prompts", "toy",
        "--limit", "1", "--seeds", "0", "--steps", "1", "--out", str(out), "--lrm", str(lrm_dir),
        "--preference-data", str(common.TOY_DIR / "pickapic-toy"), "--preference-split", "test", "--preference-limit", "128",
        "--device", "cpu"])
    evaluate.main()
    accuracy = {(r["scorer"], r["bucket"]): r["accuracy"] for r in json.loads((out / "results.json").read_text())["lrm_accuracy"]}
    assert accuracy[("lrm", "σ 0.0-0.2")] >= 0.7, accuracy
    assert accuracy[("lrm, noise-ensembled (4 draws at t ~ U[0, 400))", "clean")] >= 0.7, accuracy
    assert accuracy[("lrm, noise-ensembled (4 draws at σ = 0.2, 0.5, 0.7)", "clean")] >= 0.7, accuracy
    assert accuracy[("lrm", "σ 0.0-0.2")] > accuracy[("lrm", "σ 0.8-1.0")] - 0.05  # noise does not help
    assert accuracy[("toy-aesthetic", "clean")] >= 0.82, accuracy
