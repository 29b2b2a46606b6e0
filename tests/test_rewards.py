"""Rewards: the registry, composites, weight-free terms, and the real scorers against their
official reference code (tiny configs, random weights, no downloads)."""

import importlib
import json
import math
import warnings

import pytest
import torch
from conftest import WORDS

import common
import lrm
import refiners
import rewards
import toy


def _images(batch=3, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator)


@pytest.fixture(scope="module")
def clip_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-tokenizer")
    toy.tiny_clip_tokenizer(WORDS).save_pretrained(folder)
    return str(folder)


# -----------------------------------------------------------------------------
# specs and composites


def test_parse_spec_names_args_weights():
    terms = rewards.parse_reward_spec("imagereward:1,vlm:0.5, length:0.1,structure:0.1,lrm:runs/lrm:0.25,lrm:runs/x")
    assert [(t.name, t.arg, t.weight) for t in terms] == [
        ("imagereward", None, 1.0), ("vlm", None, 0.5), ("length", None, 0.1), ("structure", None, 0.1),
        ("lrm", "runs/lrm", 0.25), ("lrm", "runs/x", 1.0),
    ]
    assert rewards.parse_reward_spec("jpeg")[0].weight == 1.0
    assert rewards.parse_reward_spec("clip:/models/clip:-2")[0].weight == -2.0


@pytest.mark.parametrize("spec, message", [
    ("", "empty reward spec"),
    ("   ", "empty reward spec"),
    ("imagereward,,jpeg", "empty term"),
    ("nosuchreward", "unknown reward 'nosuchreward'"),
    ("jpeg:0.5,nosuch:1", "unknown reward 'nosuch'"),
    ("lrm:path:heavy", "bad weight 'heavy'"),
    ("jpeg:nan", "must be finite"),
    ("jpeg:inf", "must be finite"),
    ("jpeg:heavy", "takes no argument"),
    ("lrm", "needs the path"),
    ("lrm::1", "empty argument"),
])
def test_bad_specs_are_user_errors(spec, message):
    with pytest.raises(common.UserError, match=message) as info:
        rewards.build_reward(spec)
    if message.startswith(("unknown", "empty reward spec", "empty term")):  # the message lists the valid names
        assert all(name in str(info.value) for name in rewards.REWARDS)


def test_registry_has_every_documented_name():
    names = {"imagereward", "hpsv2", "aesthetic", "pickscore", "clip", "vlm", "jpeg", "jpeg-incompressibility",
             "length", "structure", "toy-aesthetic", "toy-faithful", "lrm"}
    assert names <= set(rewards.REWARDS)


def test_composite_is_the_weighted_sum_and_keeps_terms():
    images = _images(4)
    answers = ["<prompt>a red circle</prompt>", "a red circle", "<prompt></prompt>", "<prompt>a square</prompt>"]
    prompts = ["a circle"] * 4
    reward = rewards.build_reward("jpeg:2,structure:-0.5,toy-aesthetic")
    total = reward(images, prompts, answers=answers)
    assert total.shape == (4,) and total.dtype == torch.float32 and not total.requires_grad
    jpeg = -rewards.jpeg_sizes(images)
    structure = torch.tensor([1.0, 0.0, 0.0, 1.0])
    toy_aesthetic = toy.TOY_REWARDS["toy-aesthetic"](images, prompts)
    torch.testing.assert_close(reward.last_terms["jpeg"], jpeg)
    torch.testing.assert_close(reward.last_terms["structure"], structure)
    torch.testing.assert_close(total, 2 * jpeg - 0.5 * structure + toy_aesthetic)
    assert reward.last_nonfinite == 0
    assert reward.inputs == {"images", "answers"}
    assert set(reward.term_means()) == {"jpeg", "structure", "toy-aesthetic"}


def test_nonfinite_scores_are_reported_and_left_nan(monkeypatch):
    def factory(arg, device, dtype):
        return lambda images, prompts, **_: torch.tensor([1.0, math.nan, math.inf, -2.0])

    monkeypatch.setitem(rewards.REWARDS, "flaky", factory)
    reward = rewards.build_reward("flaky:0.5,toy-faithful")
    with pytest.warns(RuntimeWarning, match=r"2/4 samples .*flaky: 2"):
        total = reward(_images(4), ["a circle"] * 4)
    assert reward.last_nonfinite == 2
    assert torch.isnan(total[1]) and torch.isnan(total[2])  # inf becomes NaN too: "skip this sample"
    assert torch.isfinite(total[[0, 3]]).all()
    # a weight-0 term is only logged: its NaNs are reported but leave the sum alone
    reward = rewards.build_reward("flaky:0,toy-faithful")
    with pytest.warns(RuntimeWarning, match=r"0/4 samples .*flaky: 2"):
        total = reward(_images(4), ["a circle"] * 4)
    assert torch.isfinite(total).all() and reward.last_nonfinite == 0
    assert torch.isnan(reward.last_terms["flaky"][1])
    # a healthy call resets the count and warns nothing
    monkeypatch.setitem(rewards.REWARDS, "flaky", lambda a, d, t: lambda images, prompts, **_: torch.ones(4))
    reward = rewards.build_reward("flaky")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reward(_images(4), ["a"] * 4)
    assert reward.last_nonfinite == 0


def test_wrong_number_of_scores_is_an_error(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "short", lambda a, d, t: lambda images, prompts, **_: torch.ones(2))
    with pytest.raises(ValueError, match="returned"):
        rewards.build_reward("short")(_images(3), ["a"] * 3)


# -----------------------------------------------------------------------------
# weight-free terms


def test_jpeg_prefers_flat_images():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = _images(1, 64)
    images = torch.cat([flat, noisy])
    compress = rewards.build_reward("jpeg")(images, ["a", "b"])
    incompress = rewards.build_reward("jpeg-incompressibility")(images, ["a", "b"])
    assert compress[0] > compress[1] and incompress[1] > incompress[0]
    torch.testing.assert_close(compress, -incompress)


def test_length_score_against_budget(clip_tokenizer_dir):
    torch.testing.assert_close(rewards.length_score(torch.tensor([5, 77, 96, 154, 300])),
                               torch.tensor([1.0, 1.0, 1.0 - 19 / 77, 0.0, 0.0]))
    reward = rewards.build_reward(f"length:{clip_tokenizer_dir}")
    short, long_ = "a red circle", " ".join(["red"] * 100)  # 3 + 2 tokens; 100 + 2 tokens
    scores = reward(None, ["a circle", "a circle"], refined_prompts=[short, long_])
    torch.testing.assert_close(scores, torch.tensor([1.0, 2 - 102 / 77]))
    assert reward.inputs == {"refined_prompts"}
    # without refined prompts the user prompts are scored
    assert reward(None, [long_]).item() == pytest.approx(2 - 102 / 77)


def test_length_reads_a_pipeline_folder_or_backbone_alias(tiny_sd15_dir, monkeypatch):
    reward = rewards.build_reward(f"length:{tiny_sd15_dir}")
    assert reward(None, ["a"], refined_prompts=["a red circle"]).item() == 1.0
    monkeypatch.setitem(common.BACKBONES, "tiny", common.BackboneSpec(str(tiny_sd15_dir), 2, 1.0))
    reward = rewards.build_reward("length:tiny")
    assert reward(None, ["a"], refined_prompts=[" ".join(["red"] * 100)]).item() == pytest.approx(2 - 102 / 77)


def test_structure_per_answer_and_per_refinement():
    good, bad = refiners.format_answer("a red circle"), "sure! a red circle"
    torch.testing.assert_close(rewards.structure_score([good, bad, "<prompt> </prompt>"]), torch.tensor([1.0, 0.0, 0.0]))
    # answers[k][b]: fraction of the K answers of each sample that followed the format
    torch.testing.assert_close(rewards.structure_score([[good, bad], [good, good]]), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(rewards.structure_score([None, good]), torch.tensor([0.0, 1.0]))  # no answer
    with pytest.raises(common.UserError, match="needs a refiner"):
        rewards.build_reward("structure")(None, ["a"])


def test_toy_rewards_come_from_the_toy_world():
    images, prompts = _images(2), ["a red circle", "a square"]
    for name in ("toy-aesthetic", "toy-faithful"):
        torch.testing.assert_close(rewards.build_reward(name)(images, prompts), toy.TOY_REWARDS[name](images, prompts))


def test_lrm_hook_calls_lrm_reward(monkeypatch):
    seen = {}

    def fake_lrm_reward(path, device, dtype, backbone=None):
        seen.update(path=path, device=device, dtype=dtype, backbone=backbone)
        return lambda images, prompts, *, latents=None, **_: latents.flatten(1).mean(1)

    monkeypatch.setattr(lrm, "lrm_reward", fake_lrm_reward)
    reward = rewards.build_reward("lrm:some/dir:0.5")
    latents = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(reward(None, ["a"] * 3, latents=latents), 0.5 * latents.flatten(1).mean(1))
    assert seen == dict(path="some/dir", device=torch.device("cpu"), dtype=torch.float32, backbone=None)
    assert reward.inputs == {"latents"}


def _assert_bf16_close(bf16, fp32):
    """bfloat16 scoring (what a GPU run uses) runs end to end and stays near the float32 scores."""
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert (bf16 - fp32).abs().max() <= 0.05 * fp32.abs().max() + 0.02, (bf16, fp32)


# -----------------------------------------------------------------------------
# VLM judge (tiny random Qwen2.5-VL)


def test_expected_rating():
    logits = torch.full((2, 10), -1e4)
    logits[0, 7] = 0.0  # all mass on "7"
    logits[1, [0, 9]] = 0.0  # half on "0", half on "9"
    torch.testing.assert_close(rewards.expected_rating(logits), torch.tensor([7 / 9, 0.5]))


def test_vlm_judge_batched_equals_one_by_one(tiny_refiner_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    reward = rewards.build_reward(f"vlm:{tiny_refiner_dir}")
    judge = reward.fns[0]
    tokenizer = judge.processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(judge.digit_ids) == list("0123456789")
    images, prompts = _images(3, 56), ["a red circle", "a large blue square on a green background", "a"]
    scores = reward(images, prompts)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    assert scores.std() > 1e-6  # prompts and images differ: so do the scores
    # reference: the same question asked one sample at a time (no padding), by hand
    model = AutoModelForImageTextToText.from_pretrained(tiny_refiner_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_refiner_dir)
    for image, prompt, score in zip(common.to_pil(images), prompts, scores):
        text = processor.apply_chat_template(rewards.vlm_judge_messages(prompt), tokenize=False, add_generation_prompt=True)
        assert prompt in text
        with torch.no_grad():
            logits = model(**processor(text=[text], images=[image], return_tensors="pt")).logits[0, -1]
        probs = torch.softmax(logits[judge.digit_ids], -1)
        assert score.item() == pytest.approx((probs * torch.arange(10)).sum().item() / 9, abs=1e-5)
    _assert_bf16_close(rewards.build_reward(f"vlm:{tiny_refiner_dir}", dtype=torch.bfloat16)(images, prompts), scores)


# -----------------------------------------------------------------------------
# CLIP score and PickScore: transformers CLIP + processor, as PickScore's official code


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = toy.tiny_clip_tokenizer(WORDS)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24, logit_scale_init_value=2.0,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def _pickscore_reference(folder, prompt, pil_images):
    """PickScore's README `calc_probs` (before the softmax), verbatim but for transformers 5's
    get_*_features returning an output object (its .pooler_output is the old tensor)."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    image_inputs = processor(images=pil_images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(**image_inputs).pooler_output
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs).pooler_output
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return model.logit_scale.exp() * (text_embs @ image_embs.T)[0]


def test_pickscore_and_clip_score_match_the_reference(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = _images(3, 40)
    prompts = ["a red circle", "a large blue square on a green background " * 8, "a"]  # the 2nd is truncated
    pickscore = rewards.build_reward(f"pickscore:{tiny_clip_dir}")(images, prompts)
    reference = torch.stack([_pickscore_reference(tiny_clip_dir, [p], [im])[0] for p, im in zip(prompts, common.to_pil(images))])
    torch.testing.assert_close(pickscore, reference, atol=1e-4, rtol=0)
    # CLIP score = 100 max(cos, 0): the model's own logits_per_image / logit_scale
    clip_score = rewards.build_reward(f"clip:{tiny_clip_dir}")(images, prompts)
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)
    inputs = processor(text=prompts, images=common.to_pil(images), padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        cosine = model(**inputs).logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(clip_score, 100 * cosine.clamp(min=0), atol=1e-4, rtol=0)
    assert pickscore.std() > 1e-3  # different images and prompts: different scores
    _assert_bf16_close(rewards.build_reward(f"pickscore:{tiny_clip_dir}", dtype=torch.bfloat16)(images, prompts), pickscore)
    _assert_bf16_close(rewards.build_reward(f"clip:{tiny_clip_dir}", dtype=torch.bfloat16)(images, prompts), clip_score)


def test_hub_scorers_fail_offline_with_one_clear_line():
    for name in ("clip", "pickscore", "aesthetic", "hpsv2", "imagereward", "vlm"):
        with pytest.raises(common.UserError, match="cannot load"):
            rewards.build_reward(name)


def _randomised(module, seed=0):
    """Random weights of unit-order effect (the official inits leave heads at ~0 output or biases at 0,
    which would let a parity test pass for the wrong reason)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=generator) * (2 / fan_in) ** 0.5 if p.dim() > 1 else 0.1 * torch.randn(p.shape, generator=generator))
    return module


# -----------------------------------------------------------------------------
# LAION aesthetic v2: reference = improved-aesthetic-predictor's simple_inference.py on openai/CLIP


def test_aesthetic_matches_simple_inference(tmp_path):
    import numpy as np
    import rewards_reference
    from transformers import CLIPConfig, CLIPModel

    clip_model, clip_clip = rewards_reference.openai_clip()
    tokenizer = toy.tiny_clip_tokenizer(WORDS)
    torch.manual_seed(0)
    # ViT-L/14's structure, shrunk: 768-d embedding (the MLP's input), 2 layers, 64 px input
    reference_clip = clip_model.CLIP(embed_dim=768, image_resolution=64, vision_layers=2, vision_width=64,
                                     vision_patch_size=16, context_length=77, vocab_size=len(tokenizer),
                                     transformer_width=32, transformer_heads=2, transformer_layers=1).eval()
    with torch.no_grad():  # openai's init leaves some tensors at exactly 0 / 1: randomise everything
        for p in reference_clip.parameters():
            p.add_(0.02 * torch.randn_like(p))
    mlp_module = rewards_reference.imagereward()[0]  # ImageReward.py holds the same MLP class
    reference_mlp = _randomised(mlp_module.MLP(768).eval())
    # ours: the same weights in transformers' layout, and the official head file
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                           image_size=64, patch_size=16, hidden_act="quick_gelu"),
        projection_dim=768,
    )
    ours = CLIPModel(config)
    converted = rewards_reference.openai_clip_to_transformers(reference_clip.state_dict())
    missing, unexpected = ours.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    ours.save_pretrained(tmp_path)
    torch.save(reference_mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")

    images = _images(3, 96)[:, :, :80]  # not square: resize of the short side + centre crop
    scores = rewards.build_reward(f"aesthetic:{tmp_path}")(images, ["x"] * 3)

    preprocess = clip_clip._transform(reference_clip.visual.input_resolution)
    reference = []
    for pil_image in common.to_pil(images):  # simple_inference.py, per image
        image = preprocess(pil_image).unsqueeze(0)
        with torch.no_grad():
            image_features = reference_clip.encode_image(image)
        im_emb_arr = image_features.cpu().detach().numpy()
        im_emb_arr = im_emb_arr / np.linalg.norm(im_emb_arr, 2, -1, keepdims=True)  # its `normalized`
        with torch.no_grad():
            reference.append(reference_mlp(torch.from_numpy(im_emb_arr).float()).item())
    torch.testing.assert_close(scores, torch.tensor(reference), atol=1e-4, rtol=0)
    assert scores.std() > 1e-3
    _assert_bf16_close(rewards.build_reward(f"aesthetic:{tmp_path}", dtype=torch.bfloat16)(images, ["x"] * 3), scores)


def test_aesthetic_clip_covers_openai_vit_l14_at_full_size():
    """openai's ViT-L/14 (clip.load("ViT-L/14"), which simple_inference.py uses) maps tensor for tensor,
    shape for shape, onto transformers' CLIP ViT-L/14 (openai/clip-vit-large-patch14's config), the
    model the aesthetic scorer loads; built on the meta device."""
    import rewards_reference
    from transformers import CLIPConfig, CLIPModel

    clip_model, _ = rewards_reference.openai_clip()
    config = CLIPConfig(  # openai/clip-vit-large-patch14/config.json
        text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=768,
    )
    with torch.device("meta"):
        openai = clip_model.CLIP(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024,
                                 vision_patch_size=14, context_length=77, vocab_size=49408, transformer_width=768,
                                 transformer_heads=12, transformer_layers=12)
        ours = CLIPModel(config)
    converted = rewards_reference.openai_clip_to_transformers(openai.state_dict())
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items() if "position_ids" not in k}
    assert {k: v.shape for k, v in converted.items()} == ours_shapes
    assert sum(v.numel() for v in converted.values()) > 400e6


# -----------------------------------------------------------------------------
# HPS v2.1: reference = hpsv2's own open_clip fork and img_score.py

TINY_OPEN_CLIP = {  # ViT-H-14's config, shrunk
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_hps_architecture_matches_the_fork_at_full_size():
    """Every tensor of HPSv2's ViT-H-14 (its open_clip fork) exists in open_clip's ViT-H-14 with the
    same shape, and nothing more (built on the meta device: no memory, no download)."""
    import open_clip
    import rewards_reference

    fork = rewards_reference.hpsv2_open_clip()
    assert fork.get_model_config("ViT-H-14") == open_clip.get_model_config("ViT-H-14")
    with torch.device("meta"):
        theirs = fork.CLIP(**fork.get_model_config("ViT-H-14")).state_dict()
        ours = open_clip.create_model("ViT-H-14", pretrained=None, device="meta").state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
    assert len(theirs) > 500


def test_hps_matches_img_score(tmp_path, monkeypatch):
    import open_clip
    import rewards_reference

    fork = rewards_reference.hpsv2_open_clip()
    fork_factory = importlib.import_module("hpsv2.src.open_clip.factory")
    monkeypatch.setitem(fork_factory._MODEL_CONFIGS, "tiny-hps", TINY_OPEN_CLIP)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-hps", TINY_OPEN_CLIP)
    torch.manual_seed(0)
    # img_score.initialize_model's call, with the tiny architecture and no pretrained download
    model, _, preprocess_val = fork.create_model_and_transforms(
        "tiny-hps", None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False,
    )
    _randomised(model)
    model.eval()
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    tokenizer = fork.get_tokenizer("tiny-hps")

    images = _images(3, 96)[:, :, :72]
    prompts = ["a red circle", "a large blue square on a green background " * 10, "a"]
    ours = rewards.hps_scorer(*rewards.load_hps_model(str(checkpoint), "tiny-hps"), "cpu", torch.float32)(images, prompts)
    reference = []
    for pil_image, prompt in zip(common.to_pil(images), prompts):  # img_score.score, per image
        with torch.no_grad():
            image = preprocess_val(pil_image).unsqueeze(0)
            text = tokenizer([prompt])
            outputs = model(image, text)
            image_features, text_features = outputs["image_features"], outputs["text_features"]
            reference.append(torch.diagonal(image_features @ text_features.T)[0].item())
    torch.testing.assert_close(ours, torch.tensor(reference), atol=1e-4, rtol=0)
    assert ours.std() > 1e-3
    bf16 = torch.bfloat16
    _assert_bf16_close(rewards.hps_scorer(*rewards.load_hps_model(str(checkpoint), "tiny-hps", dtype=bf16), "cpu", bf16)(images, prompts), ours)


# -----------------------------------------------------------------------------
# ImageReward: reference = the image-reward package's ImageReward.score on its BLIP modules

MED_CONFIG = {  # BLIP's configs/med_config.json, which THUDM/ImageReward ships as med_config.json
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
    "encoder_width": 768, "add_cross_attention": True,
}
TINY_BLIP_VIT = dict(patch_size=32, embed_dim=64, depth=2, num_heads=4)  # BLIP's ViT, shrunk (224 px in)


def _v4_invert_attention_mask(self, encoder_attention_mask):
    mask = encoder_attention_mask[:, None, :, :] if encoder_attention_mask.dim() == 3 else encoder_attention_mask[:, None, None, :]
    mask = mask.to(dtype=self.dtype)
    return (1.0 - mask) * torch.finfo(self.dtype).min


def _reference_imagereward(monkeypatch, tmp_path, med_config, vit=None, tokenizer_dir=None):
    """The official ImageReward(med_config) -- optionally with a smaller ViT and a local tokenizer."""
    import rewards_reference
    from transformers import BertTokenizer

    image_reward, vit_module, med, blip_pretrain = rewards_reference.imagereward()
    # med.BertModel calls transformers 4's init_weights(), which under transformers 5 needs state
    # that post_init() sets up; the initial values do not matter here (every test overwrites them)
    monkeypatch.setattr(med.BertModel, "init_weights", lambda self: None)
    # and two transformers 4 ModuleUtilsMixin helpers it calls, as transformers 4.26 defined them
    monkeypatch.setattr(med.BertModel, "invert_attention_mask", _v4_invert_attention_mask, raising=False)
    monkeypatch.setattr(med.BertModel, "get_head_mask", lambda self, head_mask, layers: [None] * layers if head_mask is None else head_mask, raising=False)
    if vit is not None:
        monkeypatch.setattr(blip_pretrain, "create_vit", lambda name, image_size, *args: (
            vit_module.VisionTransformer(img_size=image_size, **vit), vit["embed_dim"]))
    blip = importlib.import_module("ImageReward.models.BLIP.blip")
    folder = tokenizer_dir or tmp_path  # init_tokenizer reads 'bert-base-uncased': point it to a local one

    class LocalBertTokenizer(BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            return super().from_pretrained(folder, *args, **kwargs)

        @property
        def additional_special_tokens_ids(self):  # transformers 4 name of extra_special_tokens' ids
            return self.convert_tokens_to_ids(self.extra_special_tokens)

    monkeypatch.setattr(blip, "BertTokenizer", LocalBertTokenizer)
    (tmp_path / "med_config.json").write_text(json.dumps(med_config))
    return image_reward.ImageReward(med_config=str(tmp_path / "med_config.json"), device="cpu").eval()


@pytest.fixture(scope="module")
def bert_tokenizer_dir(tmp_path_factory):
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz", "##s"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def test_imagereward_mapping_covers_the_official_checkpoint(monkeypatch, tmp_path, bert_tokenizer_dir):
    """Full size, on the meta device: every tensor of the official ImageReward model (the state dict
    ImageReward.pt holds) maps onto ours with its shape; the only ones left out are those the score
    never reads."""
    import types

    import rewards_reference

    vit_module = rewards_reference.imagereward()[1]
    # vit.py turns its drop-path schedule into Python floats with .item(): compute that list on the CPU
    cpu_linspace = lambda *args, **kwargs: torch.linspace(*args, **kwargs, device="cpu")  # noqa: E731
    monkeypatch.setattr(vit_module, "torch", types.SimpleNamespace(**{**vars(torch), "linspace": cpu_linspace}))
    with torch.device("meta"):
        reference = _reference_imagereward(monkeypatch, tmp_path, MED_CONFIG, tokenizer_dir=bert_tokenizer_dir)
        ours = rewards.ImageRewardModel()
    official = reference.state_dict()
    mapped = rewards.imagereward_state_dict(official)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    left_out = sorted(set(official) - {k for k in official if rewards._imagereward_name(k) is not None})
    assert left_out == ["blip.text_encoder.embeddings.position_ids", "blip.text_proj.bias", "blip.text_proj.weight",
                        "blip.vision_proj.bias", "blip.vision_proj.weight"]
    assert sum(v.numel() for v in mapped.values()) > 400e6  # ViT-L + BERT-base: the real size


def test_imagereward_matches_the_official_score(monkeypatch, tmp_path, bert_tokenizer_dir):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(bert_tokenizer_dir)
    med_config = dict(MED_CONFIG, num_hidden_layers=1, intermediate_size=128, max_position_embeddings=64,
                      vocab_size=len(tokenizer) + 2)  # + [DEC] + [ENC]
    torch.manual_seed(0)
    reference = _randomised(_reference_imagereward(monkeypatch, tmp_path, med_config, TINY_BLIP_VIT, bert_tokenizer_dir))
    # the folder layout of THUDM/ImageReward: ImageReward.pt + med_config.json (+ tokenizer files here)
    torch.save(reference.state_dict(), tmp_path / "ImageReward.pt")
    tokenizer.save_pretrained(tmp_path)
    vision = dict(rewards.IMAGEREWARD_VISION, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, patch_size=32)
    model, our_tokenizer = rewards.load_imagereward(str(tmp_path), vision_config=vision)
    assert len(our_tokenizer) == med_config["vocab_size"]

    images = _images(3, 96)[:, :, :80]
    prompts = ["a red circle", "a large blue square on a green background " * 5, "a small triangle"]
    ours = rewards.imagereward_scorer(model, our_tokenizer, "cpu", torch.float32)(images, prompts)
    with torch.no_grad():
        expected = torch.tensor([reference.score(p, im) for p, im in zip(prompts, common.to_pil(images))])
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert ours.std() > 1e-2
    model, our_tokenizer = rewards.load_imagereward(str(tmp_path), dtype=torch.bfloat16, vision_config=vision)
    _assert_bf16_close(rewards.imagereward_scorer(model, our_tokenizer, "cpu", torch.bfloat16)(images, prompts), ours)
