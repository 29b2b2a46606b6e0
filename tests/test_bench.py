"""bench.py: the timing helper, the training steps that rows 5 and 6 measure, the CLI smoke run;
architectures.py: the full-size architectures bench.py builds (on the meta device: shapes only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import architectures
import bench
import common
import overlap
import refiners

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
ROW_IDS = {"1a", "1b", "1c", "2a", "2b", "3a", "3b", "3c", "4", "5", "6a", "6b", "6c", "7a", "7b", "7c", "8", "9", "10a", "10b", "10c", "11", "12"}
GPU_ROWS = {"3b", "3c", "6a", "6b", "6c"}
OVERHEAD_ROWS = {"3a", "3b", "3c", "9"}  # refined vs plain: the ratio is refined / plain


def test_time_side_by_side_interleaves_variants_after_warmup():
    calls = []
    times = bench.time_side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                    repeats=3, warmup=2, device=torch.device("cpu"))
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-ups, then one of each per round
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_lrm_trainer_trains_the_head_only():
    backbone = architectures.random_sd15("tiny", 64, torch.device("cpu"), torch.float32)
    model, step = bench.lrm_trainer(backbone, 2, torch.Generator().manual_seed(0))
    head_before = [p.detach().clone() for p in model.head.parameters()]
    unet_before = next(model.denoiser.parameters()).detach().clone()
    loss = step(torch.randn(4, *common.latent_shape(backbone)))
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))
    assert torch.equal(unet_before, next(model.denoiser.parameters()))  # the backbone stays frozen


def test_refiner_train_step_updates_lora_weights():
    """The step whose peak memory row 6a measures on a GPU, run here at tiny size."""
    refiner = architectures.random_qwen_refiner("tiny", torch.device("cpu"), torch.float32, max_new_tokens=6)
    params = refiners.add_lora(refiner, rank=16, alpha=32)
    assert params and all(p.requires_grad for p in params)
    outputs = bench.refiner_rollout_outputs(refiner, batch=2, refine_steps=2)
    assert len(outputs) == 2 and outputs[0].completion_ids.shape[0] == 2
    before = [p.detach().clone() for p in params]
    bench.refiner_train_step(refiner, params, torch.optim.AdamW(params, lr=1e-2), outputs)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("flags, message", [
    (["--repeats", "2"], "--repeats must be >= 3"),
    (["--rows", "1,13"], "--rows must name entries among"),
    (["--fast-decode", "yes"], "--fast-decode must be one of"),
    (["--batches", "1,x"], "--batches must be comma-separated integers"),
    (["--preview-sizes", "448,14"], "--preview-sizes must be comma-separated integers >= 28"),
    (["--full-backbones", "sd3"], "--full-backbones must name entries among"),
    (["--backbone", "sd15"], "--backbone must be a toy backbone"),
    (["--size", "huge"], "--size must be full or tiny"),
    (["--flow-resolution", "1000"], "--flow-resolution must be a multiple of 64"),
])
@pytest.mark.slow
def test_bad_flags_are_one_line_errors(flags, message):
    run = subprocess.run([sys.executable, "bench.py", *flags], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("error:") and message in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_quick_run_writes_every_row(tmp_path):
    run = subprocess.run([sys.executable, "bench.py", "--quick", "--threads", "1", "--out", str(tmp_path)],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = {row["row"]: row for row in metrics["rows"]}
    assert set(rows) == ROW_IDS
    for name, row in rows.items():
        assert row["device"] and row["compared"] and row["target"]
        if row.get("skipped"):  # only the GPU rows may be skipped, and only without CUDA
            assert name in GPU_ROWS and not torch.cuda.is_available() and "GPU" in row["skipped"]
            assert row["ratio"] is None
            continue
        if "params" in row:  # row 7: counted, not timed
            assert row["total_params"] > row["params"]["transformer"] > 1e9, name
            continue
        if "parts" in row:  # row 12: one refinement part by part; decode is a difference of two timings
            parts = {part: t["median_s"] for part, t in row["parts"].items()}
            assert set(parts) == {"preview", "processor", "prefill", "decode", "re-encode", "denoiser step"}, name
            assert row["total_s"] == pytest.approx(sum(t for part, t in parts.items() if part != "denoiser step"))
            assert row["denoiser_steps"] == pytest.approx(row["total_s"] / parts["denoiser step"])
            continue
        if name == "10b":  # a difference of two timings (1 + N vs 1 tokens): at tiny size it is noise and may be < 0
            assert all(abs(t) < 10 for side in ("baseline", "candidate") for t in row[side]["times_s"])
            continue
        if name == "10c":  # --quick times batch 2: the rows share the chat template's text before the image
            assert int(row["notes"].split(" shared text tokens")[0].rsplit(" ", 1)[1]) > 0, row["notes"]
        key = "median_s" if "median_s" in row["baseline"] else "peak_gib"
        base, cand = row["baseline"][key], row["candidate"][key]
        assert base > 0 and cand > 0, name
        # the ratio is the one of the two measurements it reports: refined / plain for the overhead
        # rows (lower is better), baseline / candidate for the others (> 1: the design wins)
        assert row["ratio"] == pytest.approx(cand / base if name in OVERHEAD_ROWS else base / cand, rel=1e-9), name
        if key == "median_s":
            assert len(row["baseline"]["times_s"]) == len(row["candidate"]["times_s"]) == 3, name
    for name in ROW_IDS - GPU_ROWS:
        assert f"{name} " in run.stdout  # the printed table has the row


def test_full_size_flow_configs_have_the_released_parameter_counts():
    """Row 7 counts the released architectures: FLUX.1's transformer is its published 12 B (11.90 B),
    T5-XXL's encoder 4.76 B, CLIP-G 0.69 B; SD3.5-Large's MMDiT 8.1 B."""
    rows = {row["row"]: row for row in bench.row_flow_parameters(None, None, None, None)}
    assert round(rows["7c"]["params"]["transformer"] / 1e9, 2) == 11.90
    assert round(rows["7a"]["params"]["t5_xxl"] / 1e9, 2) == 4.76 and round(rows["7a"]["params"]["clip_g"] / 1e9, 2) == 0.69
    assert round(rows["7b"]["params"]["transformer"] / 1e9, 1) == 8.1
    assert rows["7a"]["params"]["transformer"] < rows["7b"]["params"]["transformer"] < rows["7c"]["params"]["transformer"]


@pytest.mark.slow
def test_sampling_rows_on_the_flow_matching_toy(tmp_path):
    run = subprocess.run([sys.executable, "bench.py", "--quick", "--rows", "3", "--backbone", "toy-sd3", "--threads", "1",
                          "--out", str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    row = {r["row"]: r for r in json.loads((tmp_path / "metrics.json").read_text())["rows"]}["3a"]
    assert "sd3" in row["notes"]
    # the ratio is refined / plain of the medians reported beside it (an overhead: > 1 = slower)
    assert row["ratio"] == pytest.approx(row["candidate"]["median_s"] / row["baseline"]["median_s"])


@pytest.mark.slow
@pytest.mark.parametrize("preview", ["vae", "taesd", "linear"])
def test_sd35m_refined_vs_plain_row_at_tiny_size(preview, tmp_path):
    """Row 3c runs on a GPU only (full size); its code is exercised here on the tiny SD3.5-M shape."""
    cfg = bench.parse_config(["--size", "tiny", "--sampling-steps", "2", "--refine-steps", "1", "--max-new-tokens", "4",
                              "--preview-decoder", preview])
    bench.check_config(cfg)
    cpu = torch.device("cpu")
    refiner = architectures.random_qwen_refiner("tiny", cpu, torch.float32, 4)
    backbone = architectures.random_sd35m("tiny", 64, cpu, torch.float32)
    row = bench.full_overhead_row(cfg, "3c", "SD3.5-M", backbone, refiner, cpu, torch.float32, str(tmp_path))
    assert row["row"] == "3c" and "40 steps, CFG 4.5, 64 px, T5 256 tokens" in row["notes"]
    assert len(row["candidate"]["times_s"]) == 3 and row["baseline"]["label"] == "plain"
    assert row["ratio"] == pytest.approx(row["candidate"]["median_s"] / row["baseline"]["median_s"])  # refined / plain


def test_full_size_sd35m_of_row_3c_builds_with_the_released_shapes():
    """Built on the meta device (shapes only): the row-3c backbone is SD3.5-Medium's architecture."""
    backbone = architectures.random_sd35m("full", 1024, torch.device("meta"), torch.bfloat16)
    pipe = backbone.pipe
    assert backbone.family == "sd3" and common.latent_shape(backbone) == (16, 128, 128)
    assert round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e9, 2) == 2.24
    assert round(sum(p.numel() for p in pipe.text_encoder_3.parameters()) / 1e9, 2) == 4.76
    assert pipe.transformer.config.dual_attention_layers == tuple(range(13)) and pipe.vae.config.scaling_factor == 1.5305


def test_full_size_backbones_are_built_on_the_target_device():
    """Row 9's SDXL is stable-diffusion-xl-base-1.0's UNet (2.567 B parameters), SD1.5's UNet 0.86 B:
    built where they run (here the meta device: no weights are made on the CPU and copied)."""
    sdxl = architectures.random_sdxl("full", 1024, torch.device("meta"), torch.bfloat16)
    assert round(architectures.parameter_count(sdxl.pipe.unet) / 1e9, 3) == 2.567
    assert round(architectures.parameter_count(sdxl.pipe.text_encoder_2) / 1e9, 2) == 0.69
    sd15 = architectures.random_sd15("full", 512, torch.device("meta"), torch.bfloat16)
    assert round(architectures.parameter_count(sd15.pipe.unet) / 1e9, 2) == 0.86
    modules = [sdxl.pipe.unet, sdxl.pipe.vae, sdxl.pipe.text_encoder, sd15.pipe.text_encoder]
    assert all(p.is_meta and p.dtype == torch.bfloat16 for module in modules for p in module.parameters())


def test_random_weights_come_from_the_seed():
    """On the CPU a module built under random_weights(seed) is the one a plain seeded build makes."""
    from diffusers import AutoencoderKL

    tiny = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=2)
    with architectures.random_weights("cpu", 3):
        built = AutoencoderKL(**tiny)
    torch.manual_seed(3)
    plain, other = AutoencoderKL(**tiny), AutoencoderKL(**tiny)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), plain.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), other.state_dict().values()))


def test_rollout_memory_variants_do_the_same_work():
    """Row 11 compares two ways of the same call: same seed -> the same log-probs from generate
    keeping the logits as from the lean loop (forced lengths, so both decode every token)."""
    refiner = architectures.random_qwen_refiner("tiny", torch.device("cpu"), torch.float32, 8)
    inputs = refiner._inputs(torch.rand(3, 3, 32, 32), ["a circle"] * 3, ["a red circle"] * 3, 2, 10)
    torch.manual_seed(0)
    kept_tokens, kept = architectures.generate_keeping_logits(refiner, inputs, 8, 8)
    torch.manual_seed(0)
    tokens, lean, mask = architectures.refiner_view(refiner, fixed_length=True).generate(inputs, 8)
    assert mask.all() and kept.shape == lean.shape == (3, 8) and torch.equal(tokens, kept_tokens)
    torch.testing.assert_close(lean, kept, rtol=0, atol=1e-6)
    cpu = torch.device("cpu")
    resident = bench.peak_memory(lambda: None, cpu)
    assert bench.peak_memory(lambda: torch.ones(64, 2**20).sum(), cpu) > resident + 0.2  # the 256 MiB tensor is seen


def test_decoding_rows_follow_their_flags(tmp_path):
    """Rows 9-11 at tiny size take their grid from the flags (which --quick would override)."""
    cfg = bench.parse_config(["--size", "tiny", "--threads", "1", "--full-backbones", "sd15", "--batches", "1",
                              "--answer-lengths", "3", "--fast-decode", "off", "--preview-sizes", "56,28", "--decode-tokens", "2",
                              "--rollout-rows", "2", "--rollout-tokens", "5", "--rollout-preview", "28"])
    bench.check_config(cfg)
    cpu = torch.device("cpu")
    grid = bench.row_refined_grid(cfg, cpu, torch.float32, str(tmp_path))
    assert [row["candidate"]["label"] for row in grid] == ["3 tokens, fast off"] and "batch 1" in grid[0]["compared"]
    assert "3 tokens per answer" in grid[0]["notes"]  # the answers were forced to the length
    decoding = bench.row_refiner_decoding(cfg, cpu, torch.float32, str(tmp_path))
    assert [row["row"] for row in decoding] == ["10a", "10c"]  # one decode path: no default-vs-fast row
    assert "; 0 shared text tokens" in decoding[1]["notes"]  # batch 1: nothing to share
    assert "56 px: 4 vision" in decoding[0]["notes"] and "28 px: 1 vision" in decoding[0]["notes"]
    memory = bench.row_rollout_memory(cfg, cpu, torch.float32, str(tmp_path))
    assert "2 rows x 5 tokens" in memory[0]["compared"] and "preview 28 px" in memory[0]["notes"]


def test_cached_latents_row_measures_the_cache_winning():
    """Row 5 at tiny size: a train_reward step on cached latents is faster than one that encodes the
    pair with the VAE first (the encode is pure extra work: measured 1.43x here), and the ratio is
    encode / cached of the medians reported beside it."""
    cfg = bench.parse_config(["--size", "tiny", "--repeats", "5", "--batch", "2"])
    row, = bench.row_lrm_cached_latents(cfg, torch.device("cpu"), torch.float32, None)
    assert (row["baseline"]["label"], row["candidate"]["label"]) == ("encode_each_step", "cached_latents")
    assert row["ratio"] == pytest.approx(row["baseline"]["median_s"] / row["candidate"]["median_s"])
    assert row["ratio"] > 1.05, row


def test_flow_resolution_sets_row_8s_image_side(monkeypatch):
    """--flow-resolution is the side of row 8's full-size SD3.5-Medium: built here on the meta device
    (shapes only) and stopped before any timing, the backbone the row would score is 768 px."""
    built, original = [], architectures.random_sd35m

    def build(size, resolution, device, dtype, seed=0, t5=True):
        built.append(original(size, resolution, torch.device("meta"), dtype, seed, t5))
        raise StopIteration

    monkeypatch.setattr(architectures, "random_sd35m", build)
    cfg = bench.parse_config(["--rows", "8", "--flow-resolution", "768"])
    bench.check_config(cfg)
    with pytest.raises(StopIteration):
        bench.row_flow_lrm_vs_pixel(cfg, torch.device("cpu"), torch.bfloat16, None)
    backbone, = built
    assert backbone.spec.size == 768 and common.latent_shape(backbone) == (16, 96, 96)
    assert backbone.pipe.text_encoder_3 is None  # row 8 runs without T5


def test_overlaps_time_one_variant_per_delay(monkeypatch, tmp_path):
    """--overlaps 0,1 times refined sampling twice per decode path: synchronously and with the
    refinement overlapped by one step (the hook refined_sample got), each against plain."""
    delays = []
    hook = overlap.overlap_hook
    monkeypatch.setattr(overlap, "overlap_hook", lambda delay: delays.append(delay) or hook(delay))
    cfg = bench.parse_config(["--quick", "--rows", "3", "--overlaps", "0,1", "--refine-steps", "1", "--fast-decode", "off", "--threads", "1",
                              "--warmup", "0", "--out", str(tmp_path)])
    bench.check_config(cfg)
    rows = bench.row_refined_overhead(cfg, torch.device("cpu"), torch.float32, str(tmp_path))
    toy_rows = [row for row in rows if row["row"] == "3a"]
    assert [row["candidate"]["label"] for row in toy_rows] == ["refined, fast off", "refined, fast off, overlap 1"]
    assert "--overlap 1" in toy_rows[1]["compared"] and "overlap" not in toy_rows[0]["compared"]
    assert sorted(set(delays)) == [0, 1] and delays.count(1) == cfg.repeats  # every timed call of the variant overlapped
