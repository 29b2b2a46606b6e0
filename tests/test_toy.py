"""The toy world: grammar, pixel rewards, preference labels (pure functions), the training code
paths on tiny models, and the committed artifacts (backbones follow prompts, pairs schema)."""

import io
import json

import pytest
import torch
from PIL import Image

import build_toy_world
import common
import promptloop
import refiners
import runs
import toy

TOY_DIR = common.TOY_DIR


def draw(**attrs):
    return toy.draw_toy_image(**attrs)[None]  # (1, 3, 32, 32)


# -----------------------------------------------------------------------------
# grammar


def test_prompt_splits_are_disjoint_and_deterministic():
    train, test = toy.toy_prompts("train"), toy.toy_prompts("test")
    assert len(train) > 200 and len(test) > 50
    assert not set(train) & set(test)
    assert toy.toy_prompts("test") == test
    assert toy.toy_prompts("train", n=5, seed=1) == toy.toy_prompts("train", n=5, seed=1)
    assert toy.toy_prompts("train", n=5, seed=1) != toy.toy_prompts("train", n=5, seed=2)
    assert len(toy.toy_prompts("test", n=500)) == 500  # more than the split: drawn again
    partial = toy.toy_prompts("train", kind="partial")
    assert "a circle" in partial + toy.toy_prompts("test", kind="partial")
    full_keys = {"size", "colour", "background"}
    assert all(not full_keys <= set(toy.parse_toy_prompt(p)) for p in partial)
    assert all(full_keys <= set(toy.parse_toy_prompt(p)) for p in toy.toy_prompts("test", kind="full"))
    open_ = toy.toy_prompts("train", kind="open")
    assert len(open_) > 50 and all("background" not in toy.parse_toy_prompt(p) for p in open_)
    assert runs.load_prompts("toy-open", "test") == toy.toy_prompts("test", kind="open")
    with pytest.raises(ValueError, match="train' or 'test'"):
        toy.toy_prompts("validation")
    with pytest.raises(common.UserError, match="train' or 'test'"):
        runs.load_prompts("toy", "validation")


def test_parse_round_trips_every_caption():
    for prompt in toy.toy_prompts("train") + toy.toy_prompts("test"):
        assert toy.toy_caption(**toy.parse_toy_prompt(prompt)) == prompt
    named = toy.parse_toy_prompt("a large red circle on a blue background, sharp and bright")
    assert named == dict(size="large", colour="red", shape="circle", background="blue")
    assert toy.parse_toy_prompt("a blue circle") == dict(colour="blue", shape="circle")
    assert toy.parse_toy_prompt("a dog") == {}


def test_dataset_is_deterministic_with_partial_captions():
    images, captions, attributes = toy.toy_dataset(40, seed=3)
    again, captions_again, _ = toy.toy_dataset(40, seed=3)
    assert images.shape == (40, 3, 32, 32) and torch.equal(images, again) and captions == captions_again
    partial = [toy.TOY_PROMPT_KINDS["partial"](toy.parse_toy_prompt(c)) for c in captions]
    assert any(partial) and not all(partial)
    for caption, attrs in zip(captions, attributes):  # a caption never contradicts its image
        assert all(attrs[k] == v for k, v in toy.parse_toy_prompt(caption).items())


# -----------------------------------------------------------------------------
# pixel rewards


def test_analyze_reads_drawn_images():
    images, _, attributes = toy.toy_dataset(120, seed=0)
    found = toy.toy_analyze(images)
    for key in ("shape", "colour", "size", "background"):
        assert all(f[key] == a[key] for f, a in zip(found, attributes)), key


def test_aesthetic_prefers_contrast_size_and_a_clean_background():
    aesthetic = toy.toy_aesthetic
    strong = draw(shape="circle", colour="white", size="large", background="black")
    faint_small = draw(shape="circle", colour="red", size="small", background="black")
    small = draw(shape="circle", colour="white", size="small", background="black")
    faint = draw(shape="circle", colour="yellow", size="large", background="white")
    scores = aesthetic(torch.cat([strong, faint_small, small, faint]))
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    assert scores[0] > scores[2] > scores[1]  # size matters, contrast matters
    assert scores[0] > scores[3]
    blotchy = strong.clone()
    blotchy[..., :, :16] = torch.tensor(toy.TOY_COLOURS["blue"]).view(1, 3, 1, 1)  # two backgrounds
    assert aesthetic(blotchy) < aesthetic(strong) - 0.1
    # the best shape colour depends on the background: what a refiner that sees the preview exploits
    on_black = aesthetic(torch.cat([draw(shape="square", colour=c, size="large", background="black") for c in ("white", "blue")]))
    on_white = aesthetic(torch.cat([draw(shape="square", colour=c, size="large", background="white") for c in ("black", "yellow")]))
    assert on_black[0] > on_black[1] and on_white[0] > on_white[1]


def test_faithfulness_detects_wrong_attributes():
    image = draw(shape="circle", colour="red", size="large", background="blue")
    prompts = ["a large red circle on a blue background", "a red circle", "a circle",
               "a green circle", "a red square", "a small red circle on a blue background", "a dog"]
    scores = toy.toy_faithfulness(image.repeat(len(prompts), 1, 1, 1), prompts)
    assert scores.tolist()[:3] == [1.0, 1.0, 1.0]
    assert scores[3] == 0.5 and scores[4] == 0.5  # one of two named attributes wrong
    assert scores[5] == 0.75
    assert scores[6] == 1.0  # names nothing of the grammar


# -----------------------------------------------------------------------------
# preference labels


def test_thurstone_labels_and_noise_ceiling():
    generator = torch.Generator().manual_seed(0)
    s0, s1 = torch.rand(4000, generator=generator), torch.rand(4000, generator=generator)
    exact = build_toy_world.thurstone_labels(s0, s1, noise=0.0, tie_margin=0.0, generator=generator)
    assert build_toy_world.noise_ceiling(s0, s1, exact) == 1.0
    noisy = build_toy_world.thurstone_labels(s0, s1, noise=0.2, tie_margin=0.05, generator=generator)
    ceiling = build_toy_world.noise_ceiling(s0, s1, noisy)
    assert 0.6 < ceiling < 0.95
    ties = (noisy == 0.5).float().mean()
    assert 0.05 < ties < 0.3
    assert set(noisy.unique().tolist()) == {0.0, 0.5, 1.0}


# -----------------------------------------------------------------------------
# training code paths on tiny models (a few steps: shapes, dropout, SDXL conditioning)


def test_min_snr_weights():
    alpha_bar = torch.tensor([0.01, 0.5, 5 / 6, 0.99])  # SNR 0.0101, 1, 5, 99
    weights = build_toy_world.min_snr_weights(alpha_bar, gamma=5.0)
    assert torch.allclose(weights[:3], torch.ones(3)) and torch.isclose(weights[3], torch.tensor(5 / 99))


def test_training_steps_run_on_tiny_pipelines():
    images, captions, _ = toy.toy_dataset(16, seed=0)
    for builder in (toy.tiny_sd15_pipeline, toy.tiny_sdxl_pipeline):
        pipe = builder(toy.TOY_WORDS)
        build_toy_world.train_toy_vae(pipe.vae, images, steps=2, batch_size=4, log=lambda _: None)
        assert pipe.vae.config.scaling_factor > 0
        before = [p.clone() for p in pipe.unet.parameters()][:3]
        build_toy_world.train_toy_backbone(pipe, images, captions, steps=2, batch_size=4, caption_dropout=0.5, log=lambda _: None)
        assert any(not torch.equal(b, a) for b, a in zip(before, pipe.unet.parameters()))
    drop = torch.tensor([True, False])
    conditioning = build_toy_world.text_conditioning(pipe, ["a circle", "a red square"], drop)  # SDXL
    assert conditioning["encoder_hidden_states"][0].abs().sum() == 0  # the zero unconditional input
    assert conditioning["added_cond_kwargs"]["text_embeds"][0].abs().sum() == 0
    assert conditioning["added_cond_kwargs"]["time_ids"].shape == (2, 6)


def test_pairs_rows_on_tiny_backbones(sd15, sdxl):
    # --image-size (32) is not the tiny backbones' size (64): the pairs take the backbones' own
    config = build_toy_world.ToyConfig(pair_steps=1, images_per_prompt=2, label_noise=0.05, tie_margin=0.01)
    backbones = {"toy-sd15": sd15, "toy-sdxl": sdxl}
    rows, s0, s1, label_0 = build_toy_world.toy_pairs(backbones, 5, config, seed=0, split="test", log=lambda _: None)
    assert len(rows) == 5 == len(s0) == len(label_0)
    assert all(set(build_toy_world.PICKAPIC_COLUMNS) <= set(row) for row in rows)
    for row in rows:
        assert row["image_0_uid"] != row["image_1_uid"] and row["label_0"] + row["label_1"] == 1.0
        assert {row["model_0"], row["model_1"]} <= set(backbones)
        assert Image.open(io.BytesIO(row["jpg_1"])).size == (64, 64)
    again = build_toy_world.toy_pairs(backbones, 5, config, seed=0, split="test", log=lambda _: None)[0]
    assert [r["jpg_0"] for r in again] == [r["jpg_0"] for r in rows]  # deterministic from the seed


def test_scripted_refiners_keep_the_user_attributes():
    previews = torch.cat([draw(shape="circle", colour="black", size="small", background="white"),
                          draw(shape="circle", colour="white", size="small", background="black")])
    users = ["a circle", "a red triangle"]
    seeing = build_toy_world.ScriptedRefiner(True).refine(previews, users, users, 1, 4).prompts
    blind = build_toy_world.ScriptedRefiner(False).refine(previews, users, users, 1, 4).prompts
    # seeing: the most contrasting colour against the background in the preview (and names it)
    assert seeing == ["a large black circle on a white background", "a large white triangle on a black background"]
    # blind: the best colour on average over the backgrounds it could meet, the same for both previews
    assert blind == ["a large white circle", "a large white triangle"]
    # the faithful oracle sees as well but keeps the colour the user named
    faithful = build_toy_world.ScriptedRefiner(True, faithful=True).refine(previews, users, users, 1, 4).prompts
    assert faithful == ["a large black circle on a white background", "a large red triangle on a black background"]
    users = ["a small red triangle on a white background"]  # a named background is known to both
    assert build_toy_world.ScriptedRefiner(False).refine(previews[:1], users, users, 1, 4).prompts == [
        "a small black triangle on a white background"]


def test_cli_rejects_bad_flags(tmp_path):
    with pytest.raises(common.UserError):
        build_toy_world.main(["--stages", "data,weights", "--out", str(tmp_path)])
    with pytest.raises(common.UserError):
        build_toy_world.main(["--stages", "pairs", "--images-per-prompt", "1", "--out", str(tmp_path)])


def test_data_stage_writes_a_parquet(tmp_path):
    build_toy_world.main(["--stages", "data", "--out", str(tmp_path), "--dataset-size", "12"])
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "data.parquet").to_pylist()
    assert len(table) == 12 and Image.open(io.BytesIO(table[0]["image"])).size == (32, 32)
    assert json.loads((tmp_path / "metrics.json").read_text())["data"]["images"] == 12


@pytest.mark.slow
def test_backbones_stage_in_parallel_equals_one_after_the_other(tmp_path):
    # the stage end to end at a few steps: the two backbones trained in two worker processes
    # are bit-identical to the ones trained in this process, and load as ordinary backbones
    args = ["--stages", "backbones", "--dataset-size", "16", "--vae-steps", "2", "--unet-steps", "3",
            "--batch-size", "4", "--eval-samples", "2"]
    build_toy_world.main(args + ["--out", str(tmp_path / "parallel")])
    build_toy_world.main(args + ["--out", str(tmp_path / "serial"), "--no-parallel"])
    for name in ("toy-sd15", "toy-sdxl"):
        a, b = (common.load_backbone(str(tmp_path / mode / name)) for mode in ("parallel", "serial"))
        assert a.family == b.family == {"toy-sd15": "sd", "toy-sdxl": "sdxl"}[name]
        for p, q in zip(a.pipe.unet.parameters(), b.pipe.unet.parameters(), strict=True):
            assert torch.equal(p, q)
        assert torch.equal(a.pipe.vae.decoder.conv_out.weight, b.pipe.vae.decoder.conv_out.weight)
    metrics = json.loads((tmp_path / "parallel" / "metrics.json").read_text())["backbones"]
    assert metrics["toy-sd15"]["train_seconds"] > 0 and "prompt_following" in metrics["toy-sdxl"]


@pytest.mark.slow
def test_sd3_stage_builds_a_flow_matching_backbone(tmp_path):
    build_toy_world.main(["--stages", "sd3", "--out", str(tmp_path), "--dataset-size", "16", "--vae-steps", "2",
                          "--unet-steps", "3", "--batch-size", "4", "--eval-samples", "2"])
    backbone = common.load_backbone(str(tmp_path / "toy-sd3"))
    assert backbone.family == "sd3" and (backbone.spec.size, backbone.spec.text_length) == (32, 16)
    assert common.latent_shape(backbone) == (16, 8, 8)
    assert backbone.pipe.vae.config.shift_factor != toy.SD3_VAE_SCALE["shift_factor"]  # measured on the toy latents
    metrics = json.loads((tmp_path / "metrics.json").read_text())["sd3"]
    assert metrics["background_sigma"] == round(build_toy_world.settle_sigma(700, toy._scheduler(), 4), 4)
    assert set(metrics["prompt_following"]) == {"colour", "shape", "size", "background"} and "seeing" in metrics["preview_feedback"]


def test_settle_sigma_has_the_ddpm_timesteps_signal_to_noise_ratio():
    schedule = toy._scheduler()
    for t in (100, 500, 700, 900):
        sigma = build_toy_world.settle_sigma(t, schedule)
        alpha_bar = float(schedule.alphas_cumprod[t])
        assert ((1 - sigma) / sigma) ** 2 == pytest.approx(alpha_bar / (1 - alpha_bar), rel=1e-9)
        # 4x the latent dimensions: the SNR per dimension 4x lower, as SD3's shift by sqrt(4) gives
        sigma_4 = build_toy_world.settle_sigma(t, schedule, dimension_ratio=4)
        assert ((1 - sigma_4) / sigma_4) ** 2 == pytest.approx(alpha_bar / (1 - alpha_bar) / 4, rel=1e-9)
        assert sigma_4 == pytest.approx(build_toy_world.shift_sigma(sigma, 2.0))
    assert build_toy_world.settle_sigma(900, schedule) > build_toy_world.settle_sigma(700, schedule)  # more noise
    scheduler = toy.flow_scheduler(shift=3.0)  # the scheduler samples on the same shift
    scheduler.set_timesteps(20)
    torch.testing.assert_close(scheduler.sigmas[:20], build_toy_world.shift_sigma(torch.linspace(1, scheduler.sigma_min, 20), 3.0))


def test_toy_vae_with_a_shift_gets_zero_mean_unit_variance_latents():
    images, _, _ = toy.toy_dataset(64, seed=0)
    vae = toy._tiny_vae(0, (8, 8), 2, 1, **toy.FLOW_VAE, **toy.SD3_VAE_SCALE)
    build_toy_world.train_toy_vae(vae, images, 2, batch_size=4, log=lambda *a: None)
    with torch.no_grad():
        z = vae.encode(images * 2 - 1).latent_dist.mode()
    scaled = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(scaled.mean())) < 1e-4 and float(scaled.std()) == pytest.approx(1.0, rel=1e-3)


def test_uninformative_background_says_nothing_about_the_image():
    generator = torch.Generator().manual_seed(0)
    out = [build_toy_world.uninformative_background("a large red circle on a blue background", generator) for _ in range(400)]
    named = [toy.parse_toy_prompt(c) for c in out]
    assert all(n["colour"] == "red" and n["size"] == "large" and n["shape"] == "circle" for n in named)
    backgrounds = [n.get("background") for n in named]
    assert 0.4 < backgrounds.count(None) / 400 < 0.6  # dropped half the time
    assert set(backgrounds) == {None, *toy.TOY_COLOURS}  # else a random colour of the palette


# -----------------------------------------------------------------------------
# committed artifacts


# The target is colour >= 90% and shape >= 70%. Measured on 60 samples (build_toy_world.py --stages measure):
# toy 100% / 82%, toy-sdxl 100% / 95%, toy-sd3 97% / 60% (this test's draw: toy 100% / 73%); the flow toy
# binds the shape less well (below the target, reported as such).
@pytest.mark.slow
@pytest.mark.parametrize("alias,min_shape", [("toy", 0.7), ("toy-sdxl", 0.7), ("toy-sd3", 0.45)])
def test_committed_backbones_follow_prompts(alias, min_shape):
    backbone = common.load_backbone(alias)
    assert backbone.family == {"toy": "sd", "toy-sdxl": "sdxl", "toy-sd3": "sd3"}[alias]
    assert len(backbone.pipe.tokenizer) < 1000 and backbone.pipe.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]
    rates = build_toy_world.prompt_following(backbone, n=60, seed=123)
    # backgrounds are read only in the first steps (they settle early, by design): 83-88% measured
    assert rates["colour"] >= 0.9 and rates["background"] >= 0.75 and rates["shape"] >= min_shape, rates


class _FixedPrompt:
    def __init__(self, prompt):
        self.prompt = prompt

    def refine(self, previews, user_prompts, current_prompts, step, num_steps):
        return refiners.RefinerOutput.from_prompts([self.prompt] * len(user_prompts))


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["toy", "toy-sd3"])
def test_committed_backbone_settles_the_background_before_the_first_refinement(alias):
    # what makes the preview worth looking at: at the first training refinement (step 7 of 20)
    # a new prompt can still recolour the shape, but no longer repaint the background.
    # (toy and toy-sd3, the backbones GRPO trains on; toy-sdxl learned it less firmly: see the README)
    backbone = common.load_backbone(alias)
    assert promptloop.refinement_schedule(20, 2)[0] == 7
    user = ["a large white circle on a black background"] * 16
    found = {}
    for name, prompt in (("background", "a large white circle on a red background"),
                         ("colour", "a large red circle on a black background")):
        images = promptloop.refined_sample(backbone, user, _FixedPrompt(prompt), refine_steps=2, num_steps=20,
                                       generator=torch.Generator().manual_seed(0)).images
        found[name] = toy.toy_analyze(images)
    assert sum(r["background"] == "black" for r in found["background"]) >= 14  # the late "red background" is ignored
    assert sum(r["colour"] == "red" for r in found["colour"]) >= 14  # the late "red circle" is obeyed


def test_committed_pairs_have_the_pickapic_schema():
    import pyarrow.parquet as pq

    folder = TOY_DIR / "pickapic-toy"
    stored = json.loads((folder / "labels.json").read_text())
    for split in ("train", "validation", "test"):
        table = pq.read_table(folder / f"{split}.parquet")
        assert set(build_toy_world.PICKAPIC_COLUMNS) <= set(table.column_names)
        rows = table.to_pylist()
        assert len(rows) == stored[split]["pairs"] >= 100
        labels = torch.tensor([r["label_0"] for r in rows])
        assert torch.equal(labels + torch.tensor([r["label_1"] for r in rows]), torch.ones(len(rows)))
        assert set(labels.unique().tolist()) == {0.0, 0.5, 1.0}
        assert 0.0 < (labels == 0.5).float().mean() < 0.3
        row = rows[0]
        assert Image.open(io.BytesIO(row["jpg_0"])).format == "JPEG"
        assert row["model_0"] in ("toy-sd15", "toy-sdxl") and row["caption"]
        assert row["best_image_uid"] in (row["image_0_uid"], row["image_1_uid"], "")
        s0 = torch.tensor([r["toy_aesthetic_0"] for r in rows])
        s1 = torch.tensor([r["toy_aesthetic_1"] for r in rows])
        ceiling = build_toy_world.noise_ceiling(s0, s1, labels)
        assert abs(ceiling - stored[split]["noise_ceiling"]) < 1e-6
        assert 0.6 < ceiling < 0.98  # noisy, but far above chance
    # the stored true scores are the toy aesthetic of the images as stored (what annotators see)
    for row in rows[:8]:
        assert abs(toy.toy_aesthetic(build_toy_world._unjpeg(row["jpg_1"])[None]).item() - row["toy_aesthetic_1"]) < 1e-6


def test_toy_world_is_small():
    total = sum(f.stat().st_size for f in TOY_DIR.rglob("*") if f.is_file())
    assert total <= 40 * 2**20, f"toy_world/ is {total / 2**20:.1f} MB"
