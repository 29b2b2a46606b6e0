"""sample.py as a user runs it: outputs on disk, and bad input -> one line, non-zero exit, no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # every test here starts sample.py in a subprocess

REPO = Path(__file__).resolve().parents[1]


def run_sample(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args], capture_output=True, text=True, env=env, timeout=600)


def test_sample_writes_images_and_trajectory(tiny_sd15_dir, tiny_refiner_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_sample("--backbone", str(tiny_sd15_dir), "--refiner", str(tiny_refiner_dir), "--prompt", "a red circle",
                      "--prompt", "a square", "a triangle", "--steps", "6", "--refine-steps", "2",
                      "--preview-decoder", "linear", "--seed", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "trajectory.json").read_text())
    assert record["schedule"] == [2, 4] and record["seed"] == 3
    assert [item["user_prompt"] for item in record["items"]] == ["a red circle", "a square", "a triangle"]
    for item in record["items"]:
        assert Image.open(out / item["image"]).size == (64, 64)
        assert len(item["refinements"]) == 2
        assert all(r["fallback"] for r in item["refinements"])  # a random refiner never answers in format
    assert record["fallbacks"] == 6
    picture = Image.open(out / "trajectory.png")
    assert picture.width >= 3 * 192 and picture.height >= 3 * 192  # 3 rows, 2 previews + final


def test_sample_with_lrm_guided_search(tiny_sd15_dir, tiny_refiner_dir, tmp_path):
    """--search 3 --lrm DIR: every refinement's 3 candidates and their scores in trajectory.json, the kept one marked."""
    import common
    import lrm

    lrm.save_lrm(lrm.LatentRewardModel(common.load_backbone(str(tiny_sd15_dir)), lrm.LRMConfig(backbone=str(tiny_sd15_dir), hidden=16,
                                                                                                   ensemble_draws=2)), tmp_path / "lrm")
    out = tmp_path / "out"
    proc = run_sample("--backbone", str(tiny_sd15_dir), "--refiner", str(tiny_refiner_dir), "--prompt", "a red circle", "a square",
                      "--steps", "6", "--refine-steps", "2", "--search", "3", "--lrm", str(tmp_path / "lrm"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "trajectory.json").read_text())
    assert record["search"] == 3 and record["schedule"] == [2, 4]
    for item in record["items"]:
        for step in item["refinements"]:
            scores = [c["score"] for c in step["candidates"]]
            assert len(scores) == 3 and scores[step["chosen"]] == max(scores)
            assert step["prompt"] == step["candidates"][step["chosen"]]["prompt"]
    assert (out / "trajectory.png").is_file()


def test_sample_without_refiner_sdxl(tiny_sdxl_dir, tmp_path):
    proc = run_sample("--backbone", str(tiny_sdxl_dir), "--refiner", "none", "--prompt", "a circle", "--steps", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "trajectory.json").read_text())
    assert record["schedule"] == [] and not (tmp_path / "trajectory.png").exists()


def test_sample_every_option(tiny_sd15_dir, tiny_refiner_dir, tmp_path):
    """--unet, --lora, --adapter, --negative-prompt, --guidance, --size, --temperature 0 (greedy), --dtype, --device."""
    from conftest import WORDS
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    import refiners
    import toy

    toy.tiny_sd15_pipeline(WORDS, seed=1).unet.save_pretrained(tmp_path / "aligned" / "unet")
    unet = toy.tiny_sd15_pipeline(WORDS).unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    base = refiners.load_refiner(str(tiny_refiner_dir))
    get_peft_model(base.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(tmp_path / "adapter")

    def run(out, *extra):
        proc = run_sample("--backbone", str(tiny_sd15_dir), "--refiner", str(tiny_refiner_dir), "--adapter", str(tmp_path / "adapter"),
                          "--prompt", "a red circle", "--steps", "4", "--refine-steps", "1", "--temperature", "0",
                          "--guidance", "3.0", "--negative-prompt", "a square", "--size", "48", "--device", "cpu",
                          "--dtype", "fp32", "--out", str(tmp_path / out), *extra)
        assert proc.returncode == 0, proc.stderr
        return Image.open(tmp_path / out / "000_a-red-circle.png")

    plain = run("plain")
    assert plain.size == (48, 48)
    assert json.loads((tmp_path / "plain" / "trajectory.json").read_text())["guidance"] == 3.0
    assert plain.tobytes() == run("again").tobytes()  # greedy refiner + fixed seed: the same image
    assert plain.tobytes() != run("aligned", "--unet", str(tmp_path / "aligned")).tobytes()
    assert plain.tobytes() != run("lora", "--lora", str(tmp_path / "lora")).tobytes()


def test_sample_on_flow_matching_backbones(tiny_sd3_dir, tiny_flux_dir, tiny_refiner_dir, tmp_path):
    """SD3 with its refiner and without its T5 encoder (--no-t5); FLUX with --true-cfg and a negative prompt."""
    proc = run_sample("--backbone", str(tiny_sd3_dir), "--refiner", str(tiny_refiner_dir), "--prompt", "a red circle",
                      "--steps", "4", "--refine-steps", "2", "--no-t5", "--out", str(tmp_path / "sd3"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "sd3" / "trajectory.json").read_text())
    assert record["schedule"] == [1, 3] and Image.open(tmp_path / "sd3" / record["items"][0]["image"]).size == (64, 64)

    def flux(out, *extra):
        proc = run_sample("--backbone", str(tiny_flux_dir), "--refiner", "none", "--prompt", "a red circle", "--steps", "3",
                          "--size", "64", "--out", str(tmp_path / out), *extra)
        assert proc.returncode == 0, proc.stderr
        return Image.open(tmp_path / out / "000_a-red-circle.png").tobytes()

    plain = flux("plain")
    assert flux("cfg", "--true-cfg", "3.0", "--negative-prompt", "a blue square") != plain
    assert flux("t5", "--t5", "true") == plain


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "non-empty --prompt"),
        ([], "non-empty --prompt"),
        (["--prompt", "a cat", "--backbone", "sd16"], "unknown backbone"),
        (["--prompt", "a cat", "--backbone", "./no/such/folder"], "not found"),
        (["--prompt", "a cat", "--refine-steps", "-1"], "--refine-steps"),
        (["--prompt", "a cat", "--preview-decoder", "jpeg"], "--preview-decoder"),
        (["--prompt", "a cat", "--no-t5"], "only SD3 pipelines can run without their T5 encoder"),
        (["--prompt", "a cat", "--true-cfg", "3"], "true CFG is FLUX's"),
        (["--prompt", "a cat", "--true-cfg", "0.5"], "--true-cfg must be >= 1"),
        (["--prompt", "a cat", "--search", "3"], "--search M (M > 1) and --lrm DIR go together"),
        (["--prompt", "a cat", "--search", "0"], "--search"),
        (["--prompt", "a cat", "--search", "2", "--lrm", "x", "--refiner", "none"], "needs a refiner"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    proc = run_sample(*args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and message in lines[-1] and lines[-1].startswith("error:")


def test_sample_with_overlap_records_when_each_prompt_took_effect(tiny_sd15_dir, tiny_refiner_dir, tmp_path):
    """--overlap 1: trajectory.json gives each refinement's preview step and the step its prompt
    took effect (one later); --overlap 2 with refinements at steps 2 and 4 of 6 is refused in one line;
    --threads sets torch's threads (recorded nowhere else: the run just has to take it)."""
    out = tmp_path / "out"
    common_args = ["--backbone", str(tiny_sd15_dir), "--refiner", str(tiny_refiner_dir), "--prompt", "a red circle",
                   "--steps", "6", "--refine-steps", "2", "--threads", "1", "--out", str(out)]
    proc = run_sample(*common_args, "--overlap", "1")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "trajectory.json").read_text())
    assert record["overlap"] == 1 and record["schedule"] == [2, 4]
    assert [(r["step"], r["applied_step"]) for r in record["items"][0]["refinements"]] == [(2, 3), (4, 5)]
    bad = run_sample(*common_args, "--overlap", "2")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [bad.stderr.strip().splitlines()[-1]]
    assert "--overlap 2" in bad.stderr.strip().splitlines()[-1]
