"""The latent reward model and train_reward.py: the math by hand, bad data, learning, resume, DDP."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import WORDS
from PIL import Image
from safetensors.torch import load_file

import common
import lrm
import runs
import toy

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "train_reward.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contended ones (and so do the subprocesses)."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = omp

# -----------------------------------------------------------------------------
# the math, against hand-computed values

PHI_1 = 0.8413447460685429  # Phi(1)


def test_thurstone_probability_and_variance():
    v = lrm.noise_variance(torch.tensor([1.0, 0.5, 0.0]), 0.5, 2.0)
    assert torch.allclose(v, torch.tensor([0.5, 1.5, 2.5]))  # grows as alpha_bar falls
    p = lrm.thurstone_probability(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.5, 2.0]))
    # (1 - 0) / sqrt(2 * 0.5) = 1;  1 / sqrt(4) = 0.5
    assert torch.allclose(p, torch.tensor([PHI_1, 0.6914624612740131]), atol=1e-6)


def test_thurstone_nll_with_ties():
    r_w, r_l, v = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5])
    assert lrm.thurstone_nll(r_w, r_l, v, torch.tensor([1.0])).item() == pytest.approx(-math.log(PHI_1), abs=1e-6)
    tie = -(0.5 * math.log(PHI_1) + 0.5 * math.log(1 - PHI_1))
    assert lrm.thurstone_nll(r_w, r_l, v, torch.tensor([0.5])).item() == pytest.approx(tie, abs=1e-6)


def test_fidelity_loss_by_hand_and_finite_gradients():
    p = torch.tensor([0.8, 0.5, 0.8, 0.8], requires_grad=True)
    y = torch.tensor([1.0, 0.5, 0.5, 0.0])
    expected = [1 - math.sqrt(0.8), 0.0, 1 - math.sqrt(0.4) - math.sqrt(0.1), 1 - math.sqrt(0.2)]
    loss = lrm.fidelity_loss(p, y)
    assert loss.item() == pytest.approx(sum(expected) / 4, abs=1e-6)
    loss.backward()
    assert torch.isfinite(p.grad).all()  # y = 0 and y = 1 must not give 0/0 gradients
    assert lrm.fidelity_loss(torch.tensor([0.5]), torch.tensor([0.5])).item() == pytest.approx(0.0, abs=1e-6)


def test_bradley_terry_by_hand():
    r_w, r_l = torch.tensor([1.0]), torch.tensor([0.0])
    assert lrm.bradley_terry_probability(r_w, r_l).item() == pytest.approx(0.7310585786, abs=1e-6)
    assert lrm.bradley_terry_nll(r_w, r_l, torch.tensor([1.0])).item() == pytest.approx(0.3132616875, abs=1e-6)
    assert lrm.preference_loss("bradley-terry", r_w, r_l, None, torch.tensor([1.0])).item() == pytest.approx(0.3132616875, abs=1e-6)


def test_accuracy_and_ece_by_hand():
    p = torch.tensor([0.9, 0.9, 0.6, 0.6, 0.3])
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5])  # the tie is left out of both
    assert lrm.pairwise_accuracy(p, y) == pytest.approx(0.75)
    # confidence 0.9: accuracy 1/2 -> |0.5 - 0.9| = 0.4, weight 1/2; confidence 0.6: |1 - 0.6| = 0.4, weight 1/2
    assert lrm.expected_calibration_error(p, y) == pytest.approx(0.4)
    assert lrm.expected_calibration_error(torch.tensor([0.75, 0.25]), torch.tensor([1.0, 0.0])) == pytest.approx(0.25)


def test_ensemble_accuracies_by_hand():
    # image 0 is preferred in all three pairs; each draw gets one pair wrong, their mean none
    draws_0 = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]) + 0.5
    draws_1 = torch.zeros(3, 3)
    single, ensemble = lrm.ensemble_accuracies(draws_0, draws_1, torch.ones(3))
    assert single == pytest.approx(2 / 3) and ensemble == 1.0


# -----------------------------------------------------------------------------
# preference data in the Pick-a-Pic v2 schema, labelled by a known rule: the brighter image wins

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]
RESOLUTION = 32  # pixels the pairs are encoded at: 8x8 latents (the toy VAE downsamples 4x) keep the tests fast


def _png(rng, brightness, size=32):
    image = np.full((size, size, 3), 255.0 * brightness)
    lo, hi = rng.integers(4, 12), rng.integers(20, 28)
    image[lo:hi, lo:hi] = np.array(COLOURS[rng.integers(3)]) * (0.5 + brightness / 2)
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pairs(path, n, seed, tie_margin=0.03):
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different", "num_example_per_prompt")}
    for _ in range(n):
        b0, b1 = rng.uniform(0.05, 0.95, 2)
        label = 0.5 if abs(b0 - b1) < tie_margin else float(b0 > b1)
        rows["caption"].append(str(rng.choice(["a red square", "a blue square on a green background", "a square"])))
        rows["jpg_0"].append(_png(rng, b0))
        rows["jpg_1"].append(_png(rng, b1))
        rows["label_0"].append(label)
        rows["label_1"].append(1 - label)
        rows["has_label"].append(True)
        rows["are_different"].append(True)
        rows["num_example_per_prompt"].append(1)
    pq.write_table(pa.table(rows), path)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    write_pairs(folder / "train.parquet", 128, seed=0)
    write_pairs(folder / "validation.parquet", 64, seed=1)
    # as toy.py writes it: the accuracy a perfect reward model reaches (the rule is exact here)
    (folder / "labels.json").write_text(json.dumps({"validation": {"noise_ceiling": 1.0}}))
    return folder


def _scaled_vae_pipeline(builder, folder, vae="toy-sd15"):
    """A tiny pipeline with the real UNet structure and the toy world's *trained* VAE: a random VAE
    of SD's depth keeps little of what an image shows (brightness correlates -0.8 with the trained
    VAE's latents, 0.1 with a random one's), a trained one keeps it, as the real VAEs do. Its scaling
    factor is set so the test images' latents have unit variance (how SD chose 0.18215)."""
    from diffusers import AutoencoderKL

    pipe = builder(WORDS)
    pipe = type(pipe)(**{**pipe.components, "vae": AutoencoderKL.from_pretrained(common.TOY_DIR / vae / "vae")})
    rng = np.random.default_rng(0)
    pixels = torch.stack([lrm.image_to_tensor(Image.open(io.BytesIO(_png(rng, b))), RESOLUTION) for b in np.linspace(0.05, 0.95, 16)])
    std = lrm.encode_latents(pipe.vae, pixels).std().item() / pipe.vae.config.scaling_factor
    pipe.vae.register_to_config(scaling_factor=1 / std)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return _scaled_vae_pipeline(toy.tiny_sd15_pipeline, tmp_path_factory.mktemp("sd15-scaled"))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return _scaled_vae_pipeline(toy.tiny_sdxl_pipeline, tmp_path_factory.mktemp("sdxl-scaled"))


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """SD3.5-M-shaped (MMDiT with dual attention, CLIP-L + CLIP-G + T5) on toy-sd3's trained 16-channel VAE."""
    return _scaled_vae_pipeline(toy.tiny_sd3_pipeline, tmp_path_factory.mktemp("sd3-scaled"), vae="toy-sd3")


def test_bad_rows_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    good = _png(rng, 0.5)
    rows = dict(
        caption=["ok", "tie", "corrupt", "no label", "unlabelled", "same image"],
        jpg_0=[good, good, b"not an image", good, good, good],
        jpg_1=[good, good, good, good, good, good],
        label_0=[1.0, 0.5, 1.0, None, 0.0, 1.0],
        has_label=[True, True, True, True, False, True],
        are_different=[True, True, True, True, True, False],
    )
    pq.write_table(pa.table(rows), tmp_path / "train.parquet")
    counts = {}
    pairs = list(lrm.iter_preference_pairs(str(tmp_path), "train", counts))
    assert [p["caption"] for p in pairs] == ["ok", "tie"]
    assert pairs[1]["label_0"] == 0.5
    assert counts == dict(rows=6, used=2, ties=1, no_label=2, not_different=1, bad_image=1, bad_caption=0)


def test_missing_columns_and_missing_data_are_user_errors(tmp_path):
    pq.write_table(pa.table(dict(caption=["a"], jpg_0=[b"x"], label_0=[1.0])), tmp_path / "train.parquet")
    with pytest.raises(common.UserError, match="jpg_1"):
        list(lrm.iter_preference_pairs(str(tmp_path / "train.parquet")))
    with pytest.raises(common.UserError, match="split 'test'"):
        lrm.preference_data_files(str(tmp_path), "test")
    with pytest.raises(common.UserError, match="not found"):
        lrm.preference_data_files(str(tmp_path / "nothing.parquet"), "train")


@pytest.mark.slow
def test_cli_missing_columns_one_line_error(tmp_path, sd15_dir):
    pq.write_table(pa.table(dict(caption=["a"], jpg_0=[b"x"], label_0=[1.0])), tmp_path / "bad.parquet")
    proc = subprocess.run([sys.executable, SCRIPT, "--data", str(tmp_path / "bad.parquet"), "--backbone", str(sd15_dir),
                           "--out", str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: preference data") and "jpg_1" in proc.stderr


# -----------------------------------------------------------------------------
# the model: SD1.5 and SDXL backbones, options, save/load, the lrm reward


def test_model_options_save_load_and_reward(sdxl_dir, tmp_path):
    backbone = common.load_backbone(str(sdxl_dir))
    config = lrm.LRMConfig(str(sdxl_dir), hidden=32, vfe_scale=1.0, lora_rank=2, variance="learned", ensemble_draws=3)
    model = lrm.LatentRewardModel(backbone, config).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and not any(n.startswith("denoiser.") and "lora_" not in n for n in trainable)
    assert not any("up_blocks" in n for n in trainable)  # the up blocks never run
    # one optimizer step so that LoRA B (zero at init) and the variance move
    x, t = torch.randn(4, 4, 16, 16), torch.tensor([10, 300, 600, 900])
    cond = model.text_conditioning(["a red circle", "a square", "a blue square", "a"])
    r = model(x, t, cond)
    lrm.thurstone_nll(r[:2], r[2:], model.variance(t[:2]), torch.tensor([1.0, 0.0])).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert model.log_v0.item() != pytest.approx(math.log(0.5))
    assert any(v.abs().sum() > 0 for k, v in model.trainable_state_dict().items() if "lora_B" in k)
    assert (model.variance(torch.tensor([900])) > model.variance(torch.tensor([10]))).all()

    model.eval()
    prompts = ["a red circle", "a square"]
    scores = model.score(x[:2], prompts, 500)
    lrm.save_lrm(model, tmp_path / "lrm")
    assert json.loads((tmp_path / "lrm" / "lrm_config.json").read_text())["backbone"] == str(sdxl_dir)
    loaded = lrm.load_lrm(tmp_path / "lrm")  # loads its own backbone from the config
    assert torch.allclose(loaded.score(x[:2], prompts, 500), scores, atol=1e-5)
    ensembled = loaded.ensemble_score(x[:2], prompts, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(ensembled, scores)
    # the batched ensemble is the mean of the single draws, drawn in the same order (t, then eps)
    generator, singles = torch.Generator().manual_seed(0), []
    cond = loaded.text_conditioning(prompts)
    for _ in range(3):
        t_draw = torch.randint(0, loaded.config.ensemble_t_max, (2,), generator=generator)
        noise = torch.randn(x[:2].shape, generator=generator)
        singles.append(loaded(lrm.noisy_latents(x[:2], noise, loaded.alphas_cumprod[t_draw]), t_draw, cond))
    torch.testing.assert_close(ensembled, torch.stack(singles).mean(0), atol=1e-5, rtol=1e-5)

    reward = lrm.lrm_reward(str(tmp_path / "lrm"))
    out = reward(torch.rand(2, 3, 32, 32), prompts, latents=x[:2])
    assert out.shape == (2,) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out, reward(None, prompts, latents=x[:2]))  # the same latents, the same reward
    with pytest.raises(common.UserError, match="latents"):
        reward(torch.rand(2, 3, 32, 32), prompts)


# -----------------------------------------------------------------------------
# training: learning, resume, DDP


def run_train(args, monkeypatch):
    """train_reward.main() in this process (saves the interpreter start of a subprocess)."""
    import train_reward

    monkeypatch.setattr(sys, "argv", ["train_reward.py", *map(str, args)])
    train_reward.main()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One latent cache for the module: the pairs are encoded once per backbone."""
    return tmp_path_factory.mktemp("latent-cache")


def base_args(data, backbone, out, cache, steps):
    return ["--data", data, "--backbone", backbone, "--out", out, "--cache-dir", cache, "--steps", steps,
            "--batch-size", 16, "--hidden", 64, "--warmup-steps", 5, "--lr", 2e-3, "--max-val-pairs", 32,
            "--ensemble-draws", 2, "--resolution", RESOLUTION, "--device", "cpu", "--threads", 1, "--seed", 0]


@pytest.mark.slow
@pytest.mark.parametrize("backbone, variance", [("sd15_dir", "fixed"), ("sd3_dir", "dina")])
def test_training_learns_the_preference(backbone, variance, pairs_dir, cache, tmp_path, monkeypatch, request):
    """A UNet backbone (DDPM noising, our v(t)) and an SD3-shaped MMDiT (flow-matching noising, DiNa-LRM's v)."""
    out = tmp_path / "run"
    backbone = request.getfixturevalue(backbone)
    run_train(base_args(pairs_dir, backbone, out, cache, 40) + ["--eval-every", 30, "--val-draws", 2, "--variance", variance,
                                                                "--loss", "thurstone-fidelity"], monkeypatch)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["val_draws"] == 2 and metrics["config"]["variance"] == variance
    buckets = metrics["final"]["buckets"]
    # the brighter image wins; chance is 0.5
    assert buckets["0.0-0.2"]["accuracy"] >= 0.8, buckets
    assert metrics["final"]["ensemble_accuracy"] >= 0.7, metrics["final"]
    assert metrics["train_rows"]["used"] == 128 and len(metrics["history"]) == 1 and metrics["noise_ceiling"] == 1.0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 41))
    assert (out / "model.safetensors").is_file() and list(cache.glob("*.safetensors"))


def test_encoding_every_step_matches_the_cache(pairs_dir, sd15_dir, cache, tmp_path, monkeypatch):
    run_train(base_args(pairs_dir, sd15_dir, tmp_path / "cached", cache, 3), monkeypatch)
    run_train(base_args(pairs_dir, sd15_dir, tmp_path / "uncached", cache, 3) + ["--cache-latents", "false"], monkeypatch)
    a, b = load_file(tmp_path / "cached" / "model.safetensors"), load_file(tmp_path / "uncached" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert json.loads((tmp_path / "uncached" / "metrics.json").read_text())["cache_latents"] is False


@pytest.mark.slow
def test_sdxl_lora_vfe_learned_variance_fidelity(pairs_dir, sdxl_dir, cache, tmp_path, monkeypatch):
    args = base_args(pairs_dir, sdxl_dir, tmp_path / "xl", cache, 3)
    run_train(args + ["--lora-rank", 2, "--vfe-scale", 1.0, "--variance", "learned", "--loss", "thurstone-fidelity"], monkeypatch)
    model = lrm.load_lrm(tmp_path / "xl")
    assert model.config.lora_rank == 2 and model.config.variance == "learned"
    assert model.log_v0.item() != pytest.approx(math.log(0.5))


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(pairs_dir, sd15_dir, cache, tmp_path, monkeypatch):
    steps, save_every = 30, 5
    run_train(base_args(pairs_dir, sd15_dir, tmp_path / "full", cache, steps) + ["--save-every", save_every], monkeypatch)

    args = base_args(pairs_dir, sd15_dir, tmp_path / "killed", cache, steps) + ["--save-every", save_every]
    proc = subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "ckpt.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "killed" / "model.safetensors").exists(), "the run was not interrupted"
    assert runs.load_checkpoint(ckpt)["step"] < steps

    run_train(args + ["--resume"], monkeypatch)
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.allclose(full[k], resumed[k], atol=1e-5) for k in full)
    log = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, steps + 1))  # no duplicated steps


def test_help_explains_every_flag(capsys):
    import train_reward

    with pytest.raises(SystemExit) as exit_info:
        common.parse_config(train_reward.Config, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--loss" in text and "thurstone-fidelity" in text and "--resume" in text


def test_resume_without_checkpoint_is_user_error(tmp_path, monkeypatch, pairs_dir, sd15_dir):
    with pytest.raises(common.UserError, match="no checkpoint"):
        run_train(base_args(pairs_dir, sd15_dir, tmp_path / "none", tmp_path / "cache", 3) + ["--resume"], monkeypatch)


@pytest.mark.slow
def test_torchrun_two_processes_match_one(pairs_dir, sd15_dir, cache, tmp_path, monkeypatch):
    common_args = ["--loss", "bradley-terry"]
    run_train(base_args(pairs_dir, sd15_dir, tmp_path / "one", cache, 4) + common_args, monkeypatch)
    args = base_args(pairs_dir, sd15_dir, tmp_path / "two", cache, 4) + common_args
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    proc = subprocess.run([*torchrun, *map(str, args)], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    # the same global batches, noise and mean gradient: only the reduction order differs
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)


def test_eval_every_zero_validates_at_the_end_only(pairs_dir, sd15_dir, cache, tmp_path, monkeypatch):
    """--eval-every 0 used to divide by zero; now it means: validate once, at the end."""
    out = tmp_path / "run"
    run_train(base_args(pairs_dir, sd15_dir, out, cache, 2) + ["--eval-every", 0, "--save-every", 1], monkeypatch)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"] == [] and "0.0-0.2" in metrics["final"]["buckets"]


@pytest.mark.parametrize("flags, message", [
    (["--save-every", 0], "--save-every must be > 0"), (["--steps", -1], "--steps must be > 0"),
    (["--lr", "nan"], "--lr must be a finite number"), (["--resolution", 30], "multiple of"),
    (["--max-pairs", 0], "--max-pairs must be > 0"), (["--resume"], "no checkpoint"),
    (["--variance", "dina", "--loss", "bradley-terry"], "needs a Thurstone loss"),
    (["--ensemble-levels", 0.5, 1.5], "--ensemble-levels are noise levels"), (["--blocks", 2], "blocks is for SD3 / FLUX"),
])
def test_bad_values_are_one_clear_error(pairs_dir, sd15_dir, cache, tmp_path, monkeypatch, flags, message):
    with pytest.raises(common.UserError, match=message):
        run_train(base_args(pairs_dir, sd15_dir, tmp_path / "run", cache, 2) + flags, monkeypatch)


def test_training_loss_calibrates_each_pair_at_its_own_noise_level(sd15):
    """train_reward's step (pair_loss): the Thurstone variance of each pair is v(t) of the t its
    two images were noised to, so the loss of a pair at high noise is calibrated differently from
    one at low noise. Taking the variance at t = 0 (or at any other t) in the step fails it."""
    import train_reward

    torch.manual_seed(0)
    model = lrm.LatentRewardModel(sd15, lrm.LRMConfig(backbone=str(sd15.name), hidden=16))
    latents = torch.randn(4, *common.latent_shape(sd15))
    noise, t = torch.randn(2, *common.latent_shape(sd15)), torch.tensor([900, 10])
    targets = torch.tensor([1.0, 1.0])
    loss, r_0, r_1, variance = train_reward.pair_loss(model, latents[:2], latents[2:], noise, t, ["a circle"] * 2, targets,
                                                      "thurstone-nll")
    assert loss.requires_grad  # the step trains through it
    torch.testing.assert_close(variance, model.variance(t))
    assert variance[0] > variance[1]  # v(t) grows with the noise level
    torch.testing.assert_close(loss, lrm.preference_loss("thurstone-nll", r_0, r_1, model.variance(t), targets))
    at_zero = lrm.preference_loss("thurstone-nll", r_0, r_1, model.variance(torch.zeros_like(t)), targets)
    assert not torch.isclose(loss, at_zero)
