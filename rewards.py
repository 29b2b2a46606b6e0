"""
rewards.py: the reward registry -- every scorer the refiner can be trained or evaluated on, by name.

    python train_refiner.py --reward imagereward                      # one reward
    python train_refiner.py --reward imagereward:1,vlm:0.5,length:0.1 # a weighted sum
    python evaluate.py --rewards toy-aesthetic,toy-faithful           # several, side by side

    real scorers     ImageReward, HPSv2.1, the LAION aesthetic predictor v2, PickScore, CLIP score:
                     official checkpoints and preprocessing, rebuilt on transformers / open_clip
                     (the PyPI packages image-reward and hpsv2 do not work with transformers 5)
    the VLM judge    a local chat VLM's expected 0-9 rating, one forward pass
    weight-free      JPEG (in)compressibility, prompt length, answer structure, the toy rewards
    lrm:PATH         the latent reward model (lrm.py): scores latents, no decode
    composites       parse_reward_spec / build_reward: a weighted sum of terms

REWARDS maps a name to a small factory; adding a reward is adding one entry. Weights are read
with safetensors or torch.load(weights_only=True) only.
"""

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (
    BACKBONES,
    UNREADABLE_ERRORS,
    UserError,
    is_hub_id,
    load_failure,
    pick_device,
    to_pil,
)
from refiners import chat_inputs, parse_answer
from runs import read_tensors

# A reward function scores a batch, one number per sample:
#     fn(images, prompts, *, refined_prompts=None, answers=None, latents=None) -> (B,) float32, CPU
# images: (B, 3, H, W) in [0, 1] (any device); prompts: the *user* prompts; refined_prompts: the
# prompts finally used; answers: the refiner's raw answers; latents: the backbone's final latents.
# REWARDS maps a name to a small factory(arg, device, dtype) -> fn, where `arg` is the optional
# ":ARG" of the spec (a local folder/file instead of the hub id, the LRM path, ...). A spec such
# as "imagereward:1,vlm:0.5,length:0.1,structure:0.1" is a weighted sum (build_reward).
#
# Non-finite scores are never averaged away: a sample whose weighted sum is NaN/inf gets NaN,
# Reward.last_nonfinite counts them (and a RuntimeWarning says which term produced them), and
# callers skip those samples (e.g. `torch.isfinite(rewards)`).


def _as_scores(values, batch_size, label):
    """Anything a scorer returns -> (B,) float32 on CPU, detached; a wrong shape is a bug."""
    scores = torch.as_tensor(values).detach().float().cpu().reshape(-1)
    if scores.shape != (batch_size,):
        raise ValueError(f"reward '{label}' returned {tuple(scores.shape)} scores for a batch of {batch_size}")
    return scores


def _no_arg(name, arg):
    if arg is not None:
        raise UserError(f"reward '{name}' takes no argument, got '{arg}' (a weight must be a number)")


def _uses(fn, *inputs):
    """Tag a reward function with the inputs it reads (so callers can skip e.g. the VAE decode)."""
    fn.reward_inputs = frozenset(inputs)
    return fn


def jpeg_sizes(images, quality=95):
    """Size in kB of each image saved as JPEG: DDPO's (in)compressibility measure. (B,)"""
    import io

    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_reward(arg, device, dtype, sign=-1.0):
    """jpeg = compressibility = -size in kB; jpeg-incompressibility = +size in kB (weight-free)."""
    _no_arg("jpeg", arg)
    return _uses(lambda images, prompts, **_: sign * jpeg_sizes(images), "images")


def length_score(num_tokens, budget=77):
    """Refined-prompt length against the text encoder's budget: 1 while the prompt fits, falling
    linearly to 0 at twice the budget (tokens past the budget are cut off and cannot steer the image).
    num_tokens: (B,) counts including the begin/end tokens."""
    return (2.0 - num_tokens.float() / budget).clamp(0.0, 1.0)


def load_clip_tokenizer(source=None):
    """CLIP tokenizer by hub id or folder; a backbone alias (e.g. `toy`, `sd15`) or a diffusers
    pipeline folder gives the pipeline's own `tokenizer/`."""
    from transformers import AutoTokenizer

    source = source or "openai/clip-vit-large-patch14"
    is_backbone = source in BACKBONES
    source = BACKBONES[source].source if is_backbone else source
    subfolder = "tokenizer" if is_backbone or Path(source, "tokenizer").is_dir() else ""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer '{source}': {str(e).strip().splitlines()[0]}") from e
    if len(tokenizer) < 1000 and not Path(source).is_dir():
        # transformers 5 + HF_HUB_OFFLINE can hand back a near-empty tokenizer from a hub id
        raise UserError(f"tokenizer '{source}' has only {len(tokenizer)} tokens (offline without a cache?)")
    return tokenizer


def length_reward(arg, device, dtype):
    """length[:BACKBONE|TOKENIZER]: scores the refined prompt (the user prompt when there is none)
    with length_score; the budget is the tokenizer's model_max_length (77 for CLIP). Default: the
    CLIP ViT-L/14 tokenizer (SD1.5's); `length:toy` reads the toy backbone's, offline."""
    tokenizer = load_clip_tokenizer(arg)

    def fn(images, prompts, *, refined_prompts=None, **_):
        texts = list(refined_prompts if refined_prompts is not None else prompts)
        counts = torch.tensor([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])
        return length_score(counts, tokenizer.model_max_length)

    return _uses(fn, "refined_prompts")


def structure_score(answers):
    """1 if an answer followed the required format (parse_answer accepts it), else 0.

    answers: one answer per sample (answers[b]), or one list per refinement (answers[k][b], as
    RefinedSample.prompts), in which case a sample scores the fraction of its answers that did.
    A missing answer (None) did not follow the format."""
    if answers and isinstance(answers[0], (list, tuple)):
        per_step = torch.stack([structure_score(step) for step in answers])  # (K, B)
        return per_step.mean(0)
    return torch.tensor([float(isinstance(a, str) and parse_answer(a) is not None) for a in answers], dtype=torch.float32)


def structure_reward(arg, device, dtype):
    _no_arg("structure", arg)

    def fn(images, prompts, *, answers=None, **_):
        if answers is None:
            raise UserError("reward 'structure' scores the refiner's answers: it needs a refiner")
        return structure_score(answers)

    return _uses(fn, "answers")


TOY_REWARDS = ("toy-aesthetic", "toy-faithful")  # toy.TOY_REWARDS, named here so that the toy world loads only when asked for


def toy_reward(name):
    """Factory of the toy reward `name` (toy.TOY_REWARDS): a weight-free pixel score."""

    def factory(arg, device, dtype):
        _no_arg(name, arg)
        import toy

        score = toy.TOY_REWARDS[name]
        return _uses(lambda images, prompts, **_: score(images, prompts), "images")

    return factory


def lrm_factory(arg, device, dtype, backbone=None):
    """lrm:PATH -> the latent reward model saved by train_reward.py, scoring final latents. backbone:
    the sampler's, which the LRM runs on instead of a copy of its own when it is its model (lrm.load_lrm)."""
    if not arg:
        raise UserError("reward 'lrm' needs the path of a trained latent reward model: lrm:PATH")
    import lrm  # the latent reward model imports this module's neighbours; load it only when asked for

    return _uses(lrm.lrm_reward(arg, device, dtype, backbone), "latents")


# --- real scorers: official checkpoints, official preprocessing -----------------------------------
# Every scorer takes the images as the official code takes them, as 8-bit PIL images (to_pil),
# and preprocesses them exactly as that code does; the weights are read with safetensors or
# torch.load(weights_only=True) only.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/CLIP's normalisation (also BLIP's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _load_error(what, source, error):
    """The UserError of a scorer that failed to load from `source`: the library's first line, or, for
    a weights file cut short or garbled (not a not-found / bad-config error), that file named."""
    return UserError(f"cannot load {what} '{source}': {load_failure(error, source)}")


def _weights_file(source, filename, repo):
    """A local file, `filename` inside a local folder, or the file from hub repo `repo`."""
    if source is not None and Path(source).is_file():
        return str(source)
    if source is not None and Path(source, filename).is_file():
        return str(Path(source, filename))
    if source is not None and not is_hub_id(source):
        raise UserError(f"'{source}' is neither a weights file nor a folder holding {filename}")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(source or repo, filename)
    except Exception as e:  # offline, missing file, no such repo: one clear line
        raise _load_error(f"{filename} from", source or repo, e) from e


def load_weights(path):
    """A state dict from .safetensors or a torch file (weights_only); {'state_dict': sd} unwrapped.
    UserError naming the file if it is cut short or garbled (runs.read_tensors)."""
    state = read_tensors(path, "cannot load reward model weights")
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _openai_clip_transform(size):
    """openai/CLIP's `_transform` (clip.load), also ImageReward's: PIL bicubic resize of the short
    side, centre crop, to tensor, normalise."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
        T.Lambda(lambda image: image.convert("RGB")), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def _pixels(images, transform, device, dtype):
    """(B, 3, H, W) in [0, 1] -> 8-bit PIL -> official transform -> (B, 3, S, S) on device."""
    return torch.stack([transform(image) for image in to_pil(images)]).to(device, dtype)


def _pooled(output):
    """get_image/text_features returns a tensor (transformers 4) or an output with .pooler_output (5)."""
    return output if torch.is_tensor(output) else output.pooler_output


def aesthetic_mlp(input_size=768):
    """The LAION improved aesthetic predictor v2 head (sac+logos+ava1-l14-linearMSE: no activations;
    the same head, on BLIP text features, is ImageReward's). Dropout is inactive in eval mode."""
    return torch.nn.Sequential(
        torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )


def _clip_model(source, device, dtype, what):
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(source, dtype=dtype).to(device).eval()
    except UNREADABLE_ERRORS as e:
        raise _load_error(what, source, e) from e


def _processor(source, what):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _load_error(f"{what} processor", source, e) from e
    if len(processor.tokenizer) < 1000 and not Path(source).is_dir():
        raise UserError(f"{what} processor '{source}': tokenizer has only {len(processor.tokenizer)} tokens (offline without a cache?)")
    return processor


def clip_embeddings(model, processor, images, prompts):
    """L2-normalised CLIP image and text embeddings, (B, D) each, as the official PickScore code
    computes them (processor on PIL images; text padded, truncated to 77 tokens)."""
    device, dtype = model.device, model.dtype
    pixel_values = processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(device, dtype)
    text = processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
    image_embeds = _pooled(model.get_image_features(pixel_values=pixel_values)).float()
    text_embeds = _pooled(model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])).float()
    return F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1)


def clip_reward(arg, device, dtype):
    """clip[:FOLDER]: CLIP score 100 * max(cos(image, prompt), 0) (Hessel et al.'s CLIPScore without
    the 2.5 rescaling, as torchmetrics reports it) with openai/clip-vit-large-patch14."""
    source = arg or "openai/clip-vit-large-patch14"
    model, processor = _clip_model(source, device, dtype, "CLIP"), _processor(source, "CLIP")

    @torch.no_grad()
    def fn(images, prompts, **_):
        image_embeds, text_embeds = clip_embeddings(model, processor, images, prompts)
        return 100 * (image_embeds * text_embeds).sum(-1).clamp(min=0)

    return _uses(fn, "images")


def pickscore_reward(arg, device, dtype):
    """pickscore[:FOLDER]: PickScore v1 = logit_scale.exp() * cos(image, prompt), its official code
    (yuvalkirstain/PickScore_v1, processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K)."""
    source = arg or "yuvalkirstain/PickScore_v1"
    has_processor = arg is not None and any(Path(source, f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))
    processor = _processor(source if has_processor else "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "PickScore")
    model = _clip_model(source, device, dtype, "PickScore")

    @torch.no_grad()
    def fn(images, prompts, **_):
        image_embeds, text_embeds = clip_embeddings(model, processor, images, prompts)
        return model.logit_scale.exp().float() * (image_embeds * text_embeds).sum(-1)

    return _uses(fn, "images")


AESTHETIC_HEAD = ("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")


def aesthetic_reward(arg, device, dtype):
    """aesthetic[:FOLDER]: LAION improved aesthetic predictor v2 (simple_inference.py): the CLIP
    ViT-L/14 image embedding (openai/CLIP preprocessing), L2-normalised, through the MLP head.
    FOLDER holds a transformers CLIP ViT-L/14 and sac+logos+ava1-l14-linearMSE.pth."""
    clip_source = arg or "openai/clip-vit-large-patch14"
    head_file = _weights_file(arg or AESTHETIC_HEAD[0], AESTHETIC_HEAD[1], AESTHETIC_HEAD[0])
    model = _clip_model(clip_source, device, dtype, "CLIP ViT-L/14")
    head = aesthetic_mlp(model.config.projection_dim)
    head.load_state_dict({k.removeprefix("layers."): v for k, v in load_weights(head_file).items()})
    head = head.to(device, torch.float32).eval()
    transform = _openai_clip_transform(model.config.vision_config.image_size)

    @torch.no_grad()
    def fn(images, prompts, **_):
        embeds = _pooled(model.get_image_features(pixel_values=_pixels(images, transform, device, dtype))).float()
        return head(F.normalize(embeds, dim=-1)).squeeze(-1)

    return _uses(fn, "images")


def hps_transform(size):
    """HPSv2's validation transform, as img_score.py builds it (its open_clip fork's
    image_transform(resize_longest_max=True)): to tensor *first*, bicubic resize of the *long* side
    to `size`, zero padding to a centred square (no crop), normalise."""
    from torchvision.transforms import functional as TF

    def transform(image):
        pixels = TF.to_tensor(image.convert("RGB"))  # (3, H, W)
        height, width = pixels.shape[1:]
        scale = size / max(height, width)
        if scale != 1.0:
            new_height, new_width = round(height * scale), round(width * scale)
            pixels = TF.resize(pixels, [new_height, new_width], TF.InterpolationMode.BICUBIC)
            pad_h, pad_w = size - new_height, size - new_width
            pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return TF.normalize(pixels, CLIP_MEAN, CLIP_STD)

    return transform


def load_hps_model(checkpoint, model_name="ViT-H-14", device="cpu", dtype=torch.float32):
    """open_clip `model_name` with the HPSv2 checkpoint's weights (all of them: strict load)."""
    import open_clip

    model = open_clip.create_model(model_name, pretrained=None)
    model.load_state_dict(load_weights(checkpoint), strict=True)
    return model.to(device, dtype).eval(), open_clip.get_tokenizer(model_name)


def hps_scorer(model, tokenizer, device, dtype):
    """HPSv2 score = cos(image, prompt) of the fine-tuned open_clip model (img_score.py: image_features
    @ text_features.T, both already normalised by the model, diagonal)."""
    transform = hps_transform(model.visual.image_size[0])

    @torch.no_grad()
    def fn(images, prompts, **_):
        image_features = model.encode_image(_pixels(images, transform, device, dtype), normalize=True)
        text_features = model.encode_text(tokenizer(list(prompts)).to(device), normalize=True)
        return (image_features.float() * text_features.float()).sum(-1)

    return _uses(fn, "images")


def hpsv2_reward(arg, device, dtype):
    """hpsv2[:FILE]: HPS v2.1 (xswu/HPSv2 HPS_v2.1_compressed.pt) on open_clip ViT-H-14."""
    checkpoint = _weights_file(arg, "HPS_v2.1_compressed.pt", "xswu/HPSv2")
    return hps_scorer(*load_hps_model(checkpoint, "ViT-H-14", device, dtype), device, dtype)


# ImageReward = BLIP ViT-L/16 image encoder + BERT-base text encoder with cross-attention to the
# image tokens (the BLIP "med" text encoder) + the aesthetic MLP head on the [CLS] feature,
# standardised with the official mean/std. transformers' BlipVisionModel / BlipTextModel are ports
# of exactly these BLIP modules; imagereward_state_dict maps the official tensor names onto them.
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_TEXT = dict(  # BLIP's med_config.json (bert-base-uncased + [DEC] + [ENC] tokens)
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
)
IMAGEREWARD_VISION = dict(  # BLIP create_vit("large", 224): ViT-L/16, timm LayerNorm eps 1e-6
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu",
)
# official tensors ImageReward.score never reads (BLIP's contrastive projections, a fixed buffer)
IMAGEREWARD_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


class ImageRewardModel(torch.nn.Module):
    def __init__(self, text_config=None, vision_config=None):
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        vision = BlipVisionConfig(**(vision_config or IMAGEREWARD_VISION))
        text = BlipTextConfig(**(text_config or IMAGEREWARD_TEXT), encoder_hidden_size=vision.hidden_size)
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = aesthetic_mlp(text.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1+N, 1024)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask).last_hidden_state  # (B, L, 768)
        reward = self.mlp(text[:, 0].float()).squeeze(-1)  # the [CLS] feature
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _imagereward_name(name):
    """Official ImageReward.pt tensor name -> ImageRewardModel name (None: not used by the score)."""
    if name.startswith(IMAGEREWARD_UNUSED):
        return None
    if name.startswith("mlp.layers."):
        return "mlp." + name.removeprefix("mlp.layers.")
    if name.startswith("blip.text_encoder."):
        return "text." + name.removeprefix("blip.text_encoder.")  # the med BERT *is* BlipTextModel
    if not name.startswith("blip.visual_encoder."):
        raise KeyError(f"unexpected tensor in an ImageReward checkpoint: {name}")
    name = name.removeprefix("blip.visual_encoder.")
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if name in fixed:
        return "vision." + fixed[name]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    renames = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
               "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    if match is None or match.group(2) not in renames:
        raise KeyError(f"unexpected tensor in an ImageReward checkpoint: blip.visual_encoder.{name}")
    block, module, kind = match.groups()
    return f"vision.encoder.layers.{block}.{renames[module]}.{kind}"


def imagereward_state_dict(official):
    """Official ImageReward.pt state dict -> ImageRewardModel state dict (every used tensor mapped)."""
    return {new: value for name, value in official.items() if (new := _imagereward_name(name)) is not None}


def load_imagereward_tokenizer(source="google-bert/bert-base-uncased"):
    """BLIP's init_tokenizer: bert-base-uncased + bos [DEC] + additional [ENC]."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _load_error("ImageReward tokenizer", source, e) from e
    if len(tokenizer) < 1000 and not Path(source).is_dir():
        raise UserError(f"tokenizer '{source}' has only {len(tokenizer)} tokens (offline without a cache?)")
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def imagereward_scorer(model, tokenizer, device, dtype):
    """ImageReward.score, batched: prompts padded to 35 tokens, images through BLIP's transform."""
    transform = _openai_clip_transform(model.vision.config.image_size)
    model.mlp.float()  # the official head runs in float32 on .float() features

    @torch.no_grad()
    def fn(images, prompts, **_):
        text = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt").to(device)
        return model(_pixels(images, transform, device, dtype), text["input_ids"], text["attention_mask"])

    return _uses(fn, "images")


def load_imagereward(source=None, device="cpu", dtype=torch.float32, vision_config=None):
    """(ImageRewardModel, tokenizer) as the official ImageReward.load builds them: ImageReward.pt and
    med_config.json from THUDM/ImageReward (or a local folder holding them, optionally with the
    bert-base-uncased tokenizer files; or the .pt file itself). vision_config: ViT-L/16 unless given."""
    checkpoint = _weights_file(source, "ImageReward.pt", "THUDM/ImageReward")
    folder = Path(checkpoint).parent if source is not None else None
    if folder is not None and (folder / "med_config.json").is_file():
        med_config = json.loads((folder / "med_config.json").read_text())
    else:
        med_config = json.loads(Path(_weights_file(None, "med_config.json", "THUDM/ImageReward")).read_text())
    text_config = {k: med_config[k] for k in IMAGEREWARD_TEXT if k in med_config}
    model = ImageRewardModel(text_config, vision_config)
    model.load_state_dict(imagereward_state_dict(load_weights(checkpoint)), strict=True)
    has_tokenizer = folder is not None and any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json"))
    tokenizer = load_imagereward_tokenizer(str(folder) if has_tokenizer else "google-bert/bert-base-uncased")
    return model.to(device, dtype).eval(), tokenizer


def imagereward_reward(arg, device, dtype):
    """imagereward[:FILE|FOLDER]: THUDM/ImageReward (BLIP ViT-L + med BERT + MLP)."""
    return imagereward_scorer(*load_imagereward(arg, device, dtype), device, dtype)


# --- the VLM judge --------------------------------------------------------------------------------
# A local chat VLM (default Qwen2.5-VL-3B-Instruct, the refiner's base) replaces the paper's
# proprietary judge: it is asked for a 0-9 rating of how well the image matches the user prompt,
# and the score is the expected rating under its next-token distribution restricted to the ten
# digit tokens, from one forward pass (smoother than a sampled rating), scaled to [0, 1].

VLM_JUDGE_QUESTION = (
    "Rate how well this image matches the description \"{prompt}\", from 0 (not at all) to 9 "
    "(perfectly). Answer with a single digit."
)


def vlm_judge_messages(prompt):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": VLM_JUDGE_QUESTION.format(prompt=prompt)}]}]


def expected_rating(digit_logits):
    """(B, 10) logits of the tokens "0".."9" -> (B,) expected rating / 9, in [0, 1]."""
    probs = torch.softmax(digit_logits.float(), -1)
    return (probs * torch.arange(10, dtype=probs.dtype, device=probs.device)).sum(-1) / 9


class VLMJudge:
    def __init__(self, model, processor, image_size=None):
        self.model, self.processor, self.image_size = model, processor, image_size
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"  # every row's last column is then its answer position
        self.digit_ids = []
        for digit in "0123456789":
            ids = tokenizer.encode(digit, add_special_tokens=False)
            if len(ids) != 1:
                raise UserError(f"VLM judge: the tokenizer has no single token for '{digit}'")
            self.digit_ids.append(ids[0])

    @torch.no_grad()
    def __call__(self, images, prompts, **_):
        inputs = chat_inputs(self.processor, [vlm_judge_messages(p) for p in prompts], images, self.image_size).to(self.model.device)
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # (B, V) next-token logits
        return expected_rating(logits[:, self.digit_ids])


def vlm_reward(arg, device, dtype):
    """vlm[:ID|FOLDER]: the local VLM judge (default Qwen/Qwen2.5-VL-3B-Instruct)."""
    from transformers import AutoModelForImageTextToText

    source = arg or "Qwen/Qwen2.5-VL-3B-Instruct"
    processor = _processor(source, "VLM judge")
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).to(device).eval()
    except UNREADABLE_ERRORS as e:
        raise _load_error("VLM judge", source, e) from e
    # hub models see 448 px (16x16 merged vision tokens for Qwen2.5-VL); a folder uses its processor's own
    judge = VLMJudge(model, processor, image_size=None if Path(source).is_dir() else 448)
    return _uses(judge, "images")


REWARDS = {
    "imagereward": imagereward_reward,
    "hpsv2": hpsv2_reward,
    "aesthetic": aesthetic_reward,
    "pickscore": pickscore_reward,
    "clip": clip_reward,
    "vlm": vlm_reward,
    "jpeg": jpeg_reward,
    "jpeg-incompressibility": functools.partial(jpeg_reward, sign=1.0),
    "length": length_reward,
    "structure": structure_reward,
    **{name: toy_reward(name) for name in TOY_REWARDS},
    "lrm": lrm_factory,
}


@dataclass
class RewardTerm:
    name: str
    arg: str | None
    weight: float

    @property
    def label(self):
        return self.name if self.arg is None else f"{self.name}:{self.arg}"


def _valid_names():
    return ", ".join(REWARDS)


def parse_reward_spec(spec):
    """'name', 'name:WEIGHT', 'name:ARG' or 'name:ARG:WEIGHT', comma-separated -> [RewardTerm].

    The last ':' part is a weight when it is a number; e.g. 'imagereward:1,vlm:0.5',
    'lrm:runs/lrm', 'lrm:runs/lrm:0.5'. Weights may be 0 (a term that is only logged)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty reward spec: use a name or a weighted sum such as 'imagereward:1,length:0.1' of: {_valid_names()}")
    terms = []
    for part in spec.split(","):
        name, *rest = [piece.strip() for piece in part.strip().split(":")]
        if not name:
            raise UserError(f"empty term in reward spec '{spec}': valid names are {_valid_names()}")
        if name not in REWARDS:
            raise UserError(f"unknown reward '{name}' in '{spec}': valid names are {_valid_names()}")
        weight = 1.0
        if rest:
            try:
                weight = float(rest[-1])
                rest = rest[:-1]
            except ValueError:
                if len(rest) > 1:  # name:ARG:WEIGHT with a weight that is not a number
                    raise UserError(f"bad weight '{rest[-1]}' for reward '{name}' in '{spec}': must be a number") from None
            if not math.isfinite(weight):
                raise UserError(f"bad weight '{weight}' for reward '{name}' in '{spec}': must be finite")
        arg = ":".join(rest) if rest else None
        if arg == "":
            raise UserError(f"empty argument for reward '{name}' in '{spec}'")
        terms.append(RewardTerm(name, arg, weight))
    return terms


class Reward:
    """A weighted sum of reward terms, callable like a reward function -> (B,) float32 on CPU.

    After each call: last_terms[label] = (B,) scores of each term (for logging), last_nonfinite =
    number of samples whose sum is NaN/inf (they are NaN in the result; skip them)."""

    def __init__(self, terms, fns, spec=""):
        self.terms, self.fns, self.spec = terms, fns, spec
        self.last_terms, self.last_nonfinite = {}, 0

    @property
    def inputs(self):
        """What the terms read: a subset of {"images", "refined_prompts", "answers", "latents"}."""
        return frozenset().union(*(getattr(fn, "reward_inputs", {"images"}) for fn in self.fns))

    @torch.no_grad()
    def __call__(self, images, prompts, *, refined_prompts=None, answers=None, latents=None):
        batch_size = len(prompts)
        total = torch.zeros(batch_size)
        self.last_terms, bad = {}, {}
        for term, fn in zip(self.terms, self.fns):
            scores = _as_scores(
                fn(images, prompts, refined_prompts=refined_prompts, answers=answers, latents=latents),
                batch_size, term.label,
            )
            self.last_terms[term.label] = scores
            if not torch.isfinite(scores).all():
                bad[term.label] = int((~torch.isfinite(scores)).sum())
            if term.weight != 0:  # a weight-0 term is only logged: its NaNs must not void the sum
                total = total + term.weight * scores
        nonfinite = ~torch.isfinite(total)
        total[nonfinite] = math.nan  # +inf - inf, inf * w, ...: all become "skip this sample"
        self.last_nonfinite = int(nonfinite.sum())
        if bad:
            import warnings

            counts = ", ".join(f"{label}: {n}" for label, n in bad.items())
            warnings.warn(f"reward '{self.spec}': {self.last_nonfinite}/{batch_size} samples have a "
                          f"non-finite reward ({counts}); they are NaN and must be skipped", RuntimeWarning)
        return total

    def term_means(self):
        """{label: mean over the finite scores of the last call} for one-line logs."""
        return {label: s[torch.isfinite(s)].mean().item() if torch.isfinite(s).any() else math.nan
                for label, s in self.last_terms.items()}


def check_reward_spec(spec):
    """What can be checked of a spec before any model loads: its names and weights (parse_reward_spec)
    and the files of each lrm: term (lrm.read_lrm), whose model may load later, on the sampler's
    backbone (train_refiner.py). Returns the terms."""
    terms = parse_reward_spec(spec)
    for term in terms:
        if term.name == "lrm" and term.arg:
            import lrm

            lrm.read_lrm(term.arg)
    return terms


def build_reward(spec, device="cpu", dtype=torch.float32, backbone=None):
    """A Reward from a spec (see parse_reward_spec); bad specs raise UserError listing the names.
    backbone: the sampler's loaded backbone, which lrm: terms run on when it is their LRM's model."""
    terms = parse_reward_spec(spec)
    factories = REWARDS | {"lrm": functools.partial(lrm_factory, backbone=backbone)}  # the other scorers are models of their own
    fns = [factories[term.name](term.arg, pick_device(device) if isinstance(device, str) else device, dtype)
           for term in terms]
    return Reward(terms, fns, spec)
