"""Rewards: the registry, composites, weight-free terms, and the real scorers against their
official reference code (tiny configs, random weights, no downloads)."""

import math
import warnings

import pytest
import torch

import common
import toy
from conftest import WORDS


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
    terms = common.parse_reward_spec("imagereward:1,vlm:0.5, length:0.1,structure:0.1,lrm:runs/lrm:0.25,lrm:runs/x")
    assert [(t.name, t.arg, t.weight) for t in terms] == [
        ("imagereward", None, 1.0), ("vlm", None, 0.5), ("length", None, 0.1), ("structure", None, 0.1),
        ("lrm", "runs/lrm", 0.25), ("lrm", "runs/x", 1.0),
    ]
    assert common.parse_reward_spec("jpeg")[0].weight == 1.0
    assert common.parse_reward_spec("clip:/models/clip:-2")[0].weight == -2.0


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
        common.build_reward(spec)
    if "unknown" in message or "empty" in message:
        for name in ("imagereward", "hpsv2", "jpeg", "length", "structure", "toy-aesthetic", "lrm"):
            assert name in str(info.value) or "empty argument" in message


def test_registry_has_every_documented_name():
    names = {"imagereward", "hpsv2", "aesthetic", "pickscore", "clip", "vlm", "jpeg", "jpeg-incompressibility",
             "length", "structure", "toy-aesthetic", "toy-faithful", "lrm"}
    assert names <= set(common.REWARDS)


def test_composite_is_the_weighted_sum_and_keeps_terms():
    images = _images(4)
    answers = ["<prompt>a red circle</prompt>", "a red circle", "<prompt></prompt>", "<prompt>a square</prompt>"]
    prompts = ["a circle"] * 4
    reward = common.build_reward("jpeg:2,structure:-0.5,toy-aesthetic")
    total = reward(images, prompts, answers=answers)
    assert total.shape == (4,) and total.dtype == torch.float32 and not total.requires_grad
    jpeg = -common.jpeg_sizes(images)
    structure = torch.tensor([1.0, 0.0, 0.0, 1.0])
    toy_aesthetic = common.TOY_REWARDS["toy-aesthetic"](images, prompts)
    torch.testing.assert_close(reward.last_terms["jpeg"], jpeg)
    torch.testing.assert_close(reward.last_terms["structure"], structure)
    torch.testing.assert_close(total, 2 * jpeg - 0.5 * structure + toy_aesthetic)
    assert reward.last_nonfinite == 0
    assert reward.inputs == {"images", "answers"}
    assert set(reward.term_means()) == {"jpeg", "structure", "toy-aesthetic"}


def test_nonfinite_scores_are_reported_and_left_nan(monkeypatch):
    def factory(arg, device, dtype):
        return lambda images, prompts, **_: torch.tensor([1.0, math.nan, math.inf, -2.0])

    monkeypatch.setitem(common.REWARDS, "flaky", factory)
    reward = common.build_reward("flaky:0.5,toy-faithful")
    with pytest.warns(RuntimeWarning, match=r"2/4 samples .*flaky: 2"):
        total = reward(_images(4), ["a circle"] * 4)
    assert reward.last_nonfinite == 2
    assert torch.isnan(total[1]) and torch.isnan(total[2])  # inf becomes NaN too: "skip this sample"
    assert torch.isfinite(total[[0, 3]]).all()
    # a healthy call resets the count and warns nothing
    monkeypatch.setitem(common.REWARDS, "flaky", lambda a, d, t: lambda images, prompts, **_: torch.ones(4))
    reward = common.build_reward("flaky")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reward(_images(4), ["a"] * 4)
    assert reward.last_nonfinite == 0


def test_wrong_number_of_scores_is_an_error(monkeypatch):
    monkeypatch.setitem(common.REWARDS, "short", lambda a, d, t: lambda images, prompts, **_: torch.ones(2))
    with pytest.raises(ValueError, match="returned"):
        common.build_reward("short")(_images(3), ["a"] * 3)


# -----------------------------------------------------------------------------
# weight-free terms


def test_jpeg_prefers_flat_images():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = _images(1, 64)
    images = torch.cat([flat, noisy])
    compress = common.build_reward("jpeg")(images, ["a", "b"])
    incompress = common.build_reward("jpeg-incompressibility")(images, ["a", "b"])
    assert compress[0] > compress[1] and incompress[1] > incompress[0]
    torch.testing.assert_close(compress, -incompress)


def test_length_score_against_budget(clip_tokenizer_dir):
    torch.testing.assert_close(common.length_score(torch.tensor([5, 77, 96, 154, 300])),
                               torch.tensor([1.0, 1.0, 1.0 - 19 / 77, 0.0, 0.0]))
    reward = common.build_reward(f"length:{clip_tokenizer_dir}")
    short, long_ = "a red circle", " ".join(["red"] * 100)  # 3 + 2 tokens; 100 + 2 tokens
    scores = reward(None, ["a circle", "a circle"], refined_prompts=[short, long_])
    torch.testing.assert_close(scores, torch.tensor([1.0, 2 - 102 / 77]))
    assert reward.inputs == {"refined_prompts"}
    # without refined prompts the user prompts are scored
    assert reward(None, [long_]).item() == pytest.approx(2 - 102 / 77)


def test_length_reads_a_pipeline_folder(tiny_sd15_dir):
    reward = common.build_reward(f"length:{tiny_sd15_dir}")
    assert reward(None, ["a"], refined_prompts=["a red circle"]).item() == 1.0


def test_structure_per_answer_and_per_refinement():
    good, bad = common.format_answer("a red circle"), "sure! a red circle"
    torch.testing.assert_close(common.structure_score([good, bad, "<prompt> </prompt>"]), torch.tensor([1.0, 0.0, 0.0]))
    # answers[k][b]: fraction of the K answers of each sample that followed the format
    torch.testing.assert_close(common.structure_score([[good, bad], [good, good]]), torch.tensor([1.0, 0.5]))
    with pytest.raises(common.UserError, match="needs a refiner"):
        common.build_reward("structure")(None, ["a"])


def test_toy_rewards_come_from_the_toy_world():
    images, prompts = _images(2), ["a red circle", "a square"]
    for name in ("toy-aesthetic", "toy-faithful"):
        torch.testing.assert_close(common.build_reward(name)(images, prompts), common.TOY_REWARDS[name](images, prompts))


def test_lrm_hook_calls_lrm_reward(monkeypatch):
    seen = {}

    def fake_lrm_reward(path, device, dtype):
        seen.update(path=path, device=device, dtype=dtype)
        return lambda images, prompts, *, latents=None, **_: latents.flatten(1).mean(1)

    monkeypatch.setattr(common, "lrm_reward", fake_lrm_reward, raising=False)
    reward = common.build_reward("lrm:some/dir:0.5")
    latents = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(reward(None, ["a"] * 3, latents=latents), 0.5 * latents.flatten(1).mean(1))
    assert seen == dict(path="some/dir", device=torch.device("cpu"), dtype=torch.float32)
    assert reward.inputs == {"latents"}


# -----------------------------------------------------------------------------
# VLM judge (tiny random Qwen2.5-VL)


def test_expected_rating():
    logits = torch.full((2, 10), -1e4)
    logits[0, 7] = 0.0  # all mass on "7"
    logits[1, [0, 9]] = 0.0  # half on "0", half on "9"
    torch.testing.assert_close(common.expected_rating(logits), torch.tensor([7 / 9, 0.5]))


def test_vlm_judge_batched_equals_one_by_one(tiny_refiner_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    reward = common.build_reward(f"vlm:{tiny_refiner_dir}")
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
        text = processor.apply_chat_template(common.vlm_judge_messages(prompt), tokenize=False, add_generation_prompt=True)
        assert prompt in text
        with torch.no_grad():
            logits = model(**processor(text=[text], images=[image], return_tensors="pt")).logits[0, -1]
        probs = torch.softmax(logits[judge.digit_ids], -1)
        assert score.item() == pytest.approx((probs * torch.arange(10)).sum().item() / 9, abs=1e-5)


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
    pickscore = common.build_reward(f"pickscore:{tiny_clip_dir}")(images, prompts)
    reference = torch.stack([_pickscore_reference(tiny_clip_dir, [p], [im])[0] for p, im in zip(prompts, common.to_pil(images))])
    torch.testing.assert_close(pickscore, reference, atol=1e-4, rtol=0)
    # CLIP score = 100 max(cos, 0): the model's own logits_per_image / logit_scale
    clip_score = common.build_reward(f"clip:{tiny_clip_dir}")(images, prompts)
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)
    inputs = processor(text=prompts, images=common.to_pil(images), padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        cosine = model(**inputs).logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(clip_score, 100 * cosine.clamp(min=0), atol=1e-4, rtol=0)
    assert pickscore.std() > 1e-3  # different images and prompts: different scores


def test_hub_scorers_fail_offline_with_one_clear_line():
    for name in ("clip", "pickscore", "aesthetic", "hpsv2", "imagereward", "vlm"):
        with pytest.raises(common.UserError, match="cannot load"):
            common.build_reward(name)


# -----------------------------------------------------------------------------
# LAION aesthetic v2: reference = improved-aesthetic-predictor's simple_inference.py on openai/CLIP


def test_aesthetic_matches_simple_inference(tmp_path):
    import numpy as np
    from transformers import CLIPConfig, CLIPModel

    import rewards_reference

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
    reference_mlp = mlp_module.MLP(768).eval()
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
    scores = common.build_reward(f"aesthetic:{tmp_path}")(images, ["x"] * 3)

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
    assert scores.std() > 1e-4
