"""
toy.py: the offline toy world as a module -- the project's CartPole.

    grammar            captions "a [small|large] [<colour>] <shape> [on a <colour> background]",
                       their parser, the user prompts split into train / test
    toy rewards        weight-free pixel rewards: toy_aesthetic (contrast and size of the shape)
                       and toy_faithfulness (the image shows what the user asked for)
    drawing            procedural images of the grammar, the data set the toy backbones learn
    tiny architectures SD1.5- and SDXL-shaped diffusers pipelines and a Qwen2.5-VL with its
                       processor and chat template: the real block structure, narrow widths;
                       the tests and the toy world build them, save them with `save_pretrained`
                       and load them with `from_pretrained` like the real models

It imports none of the project's other modules; the artifacts (trained toy backbones, toy refiner,
toy preference pairs) are built by `python build_toy_world.py` and committed in toy_world/.
The heavy libraries (diffusers, transformers) are imported inside the builders that need them.
"""

import math
import re

import torch

# -----------------------------------------------------------------------------
# the toy grammar
#
# A toy image is one shape (circle, square, triangle) of one colour and size, centred on a plain
# background of another colour. Captions come from a closed grammar; the shape is always named,
# size, colour and background may be left out ("a circle", "a red square", ...):
#     a [small|large] [<colour>] <shape> [on a <colour> background]
# An attribute the caption leaves out is drawn at random by the data set, so the backbones learn
# to leave it free. The background is settled in the first sampling steps and cannot be repainted
# by a later prompt; the shape's colour and size can. So a refiner that *sees* the emerging image
# can choose a shape colour that suits the background it finds there.

TOY_COLOURS = {  # name -> RGB in [0, 1]; far apart in RGB and spread in luminance
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.20, 0.85),
    "yellow": (0.95, 0.85, 0.10),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
}
TOY_SHAPES = ("circle", "square", "triangle")
TOY_SIZES = {"small": 0.20, "large": 0.36}  # half-extent of the shape as a fraction of the image side
TOY_WORDS = ["a", "on", "background", *TOY_SIZES, *TOY_COLOURS, *TOY_SHAPES]  # whole-word tokens


def toy_caption(shape, colour=None, size=None, background=None):
    """Caption of the toy grammar; None leaves an attribute out."""
    words = ["a"] + [w for w in (size, colour) if w] + [shape]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def parse_toy_prompt(prompt):
    """The attributes a prompt names: a dict with some of shape, colour, size, background.

    Tolerant of extra words (refined prompts may add some): the background is the colour word
    right before "background", the shape colour the first other colour word before the shape."""
    words = re.findall(r"[a-z]+", prompt.lower())
    named = {}
    background_at = None
    for i, word in enumerate(words):
        if word == "background" and i > 0 and words[i - 1] in TOY_COLOURS:
            background_at = i - 1
            named["background"] = words[i - 1]
            break
    shape_at = next((i for i, w in enumerate(words) if w in TOY_SHAPES), None)
    if shape_at is not None:
        named["shape"] = words[shape_at]
    for i, word in enumerate(words[: shape_at if shape_at is not None else len(words)]):
        if word in TOY_COLOURS and i != background_at and "colour" not in named:
            named["colour"] = word
        if word in TOY_SIZES and "size" not in named:
            named["size"] = word
    return named


def _all_toy_captions():
    captions = []
    for shape in TOY_SHAPES:
        for size in (None, *TOY_SIZES):
            for colour in (None, *TOY_COLOURS):
                for background in (None, *TOY_COLOURS):
                    if colour is None or colour != background:
                        captions.append(toy_caption(shape, colour, size, background))
    return captions


def _names_everything(named):
    return all(k in named for k in ("size", "colour", "background"))


TOY_PROMPT_KINDS = {  # which user prompts of the grammar a kind selects (from the attributes it names)
    "all": lambda named: True,
    "full": _names_everything,
    "partial": lambda named: not _names_everything(named),
    "open": lambda named: "background" not in named,  # as users mostly write: the background left free
}


def toy_prompts(split="train", n=None, seed=0, kind="all"):
    """User prompts of the toy world, split once and for all (20% held out as "test").

    kind: "all", "partial" (leaves size, colour or background free: room for refinement),
          "full" (names all three) or "open" (leaves the background free: only a refiner that
          sees the preview knows which background it got). n: draw n prompts (without
          replacement while possible) with `seed`.
    The split is a fixed permutation, independent of `seed`, so train and test never overlap."""
    import random

    if split not in ("train", "test"):
        raise ValueError(f"toy prompt split must be 'train' or 'test', got '{split}'")
    if kind not in TOY_PROMPT_KINDS:
        raise ValueError(f"toy prompt kind must be one of {', '.join(TOY_PROMPT_KINDS)}, got '{kind}'")
    captions = _all_toy_captions()
    random.Random(1234).shuffle(captions)
    n_test = len(captions) // 5
    chosen = captions[:n_test] if split == "test" else captions[n_test:]
    chosen = [c for c in chosen if TOY_PROMPT_KINDS[kind](parse_toy_prompt(c))]
    chosen = sorted(chosen)
    if n is None:
        return chosen
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        out += rng.sample(chosen, min(len(chosen), n - len(out)))
    return out


def _luminance(rgb):
    return rgb @ torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype)


def toy_contrast(rgb_a, rgb_b):
    """Perceived contrast of two colours (..., 3) -> (...) in [0, 1]: half colour distance, half luminance."""
    colour = (rgb_a - rgb_b).norm(dim=-1) / math.sqrt(3)
    return 0.5 * colour + 0.5 * (_luminance(rgb_a) - _luminance(rgb_b)).abs()


def _nearest_toy_colour(rgb):
    palette = torch.tensor(list(TOY_COLOURS.values()), dtype=rgb.dtype)
    return list(TOY_COLOURS)[int((palette - rgb).norm(dim=-1).argmin())]


@torch.no_grad()
def toy_analyze(images, border=2):
    """Read a toy image from its pixels. images: (B, 3, H, W) in [0, 1].

    Background = median colour of a `border`-pixel frame. Shape mask = pixels farther from it
    than half the largest distance (so a faint shape is still found; its faintness is the
    contrast). Returns a list of dicts: background / colour (nearest palette names), shape,
    size, area (mask fraction), extent (bbox side / image side), contrast, clean (1 = uniform
    background frame, 0 = blotchy)."""
    images = images.detach().float().cpu().clamp(0, 1)
    b, _, h, w = images.shape
    frame = torch.ones(h, w, dtype=torch.bool)
    frame[border:h - border, border:w - border] = False
    results = []
    for image in images:
        pixels = image.permute(1, 2, 0)  # (H, W, 3)
        background = pixels[frame].median(dim=0).values  # (3,)
        distance = (pixels - background).norm(dim=-1)  # (H, W)
        # non-uniform frame = a background that changed its mind half way (or noise)
        frame_spread = distance[frame].mean().item()
        clean = max(0.0, 1.0 - frame_spread / 0.3)  # two backgrounds half and half: ~0.3-0.5
        # the shape never reaches the frame: frame pixels are left out of the mask, so a decoder's
        # rim artefacts along the image edge cannot stretch the shape's bounding box
        inner = distance.masked_fill(frame, 0.0)
        peak = inner.flatten().quantile(0.99).item()  # robust to a few outlier pixels
        mask = inner > max(0.5 * peak, 0.1) if peak > 0.15 else torch.zeros(h, w, dtype=torch.bool)
        area = mask.float().mean().item()
        info = dict(background=_nearest_toy_colour(background), area=area, clean=clean, contrast=0.0,
                    colour=None, shape=None, size=None, extent=0.0)
        if mask.sum() >= 4:
            rows = torch.where(mask.sum(1) >= 1)[0]
            cols = torch.where(mask.sum(0) >= 1)[0]
            top, bottom, left, right = rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()
            height, width = bottom - top + 1, right - left + 1
            shape_rgb = pixels[mask].mean(0)
            # shape from the mask: fill of its bounding box (square 1, circle pi/4, triangle 1/2)
            # and the width of its top third vs its bottom third (a triangle points up)
            fill = mask[top:bottom + 1, left:right + 1].float().mean().item()
            third = max(1, height // 3)
            top_width = mask[top:top + third].float().sum(1).mean().item()
            bottom_width = mask[bottom + 1 - third:bottom + 1].float().sum(1).mean().item()
            if top_width < 0.65 * bottom_width:
                shape = "triangle"
            elif fill > 0.88:
                shape = "square"
            else:
                shape = "circle"
            extent = max(height / h, width / w)
            info.update(colour=_nearest_toy_colour(shape_rgb), shape=shape, extent=extent,
                        size="large" if extent > 0.56 else "small",
                        contrast=toy_contrast(shape_rgb, background).item())
        results.append(info)
    return results


def toy_aesthetic(images, prompts=None, **_):
    """Toy "aesthetic" on pixels, (B, 3, H, W) in [0, 1] -> (B,) float32 in [0, 1].

    (0.6 contrast(shape, background) + 0.4 min(1, area / 0.3)) x (0.5 + 0.5 clean):
    a large shape that stands out on a clean background scores high. The prompt is ignored.
    What a refiner can learn: add "large"; choose a shape colour that contrasts with the
    background (the best one depends on it: white on black, black on white). The toy
    backbones settle the background in their first steps (build_toy_world.py, `background_settles`): after
    that a prompt can no longer repaint it, but can still recolour and resize the shape. So when
    the user leaves the background free, only a refiner that *sees* it in the preview can pick
    the right colour; a blind one can only guess (see build_toy_world.py, stage "measure")."""
    scores = [
        (0.6 * r["contrast"] + 0.4 * min(1.0, r["area"] / 0.3)) * (0.5 + 0.5 * r["clean"])
        for r in toy_analyze(images)
    ]
    return torch.tensor(scores, dtype=torch.float32)


def toy_faithfulness(images, prompts, **_):
    """Toy faithfulness to the (user) prompt: the fraction of attributes the prompt names that
    the image shows (shape, colour, size, background). (B,) float32 in [0, 1]; a prompt naming
    nothing of the grammar scores 1."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scores = []
    for found, prompt in zip(toy_analyze(images), prompts):
        named = parse_toy_prompt(prompt)
        scores.append(sum(found[k] == v for k, v in named.items()) / len(named) if named else 1.0)
    return torch.tensor(scores, dtype=torch.float32)


TOY_REWARDS = {"toy-aesthetic": toy_aesthetic, "toy-faithful": toy_faithfulness}


# -----------------------------------------------------------------------------
# tiny tokenizers: byte-level BPE alphabets, plus whole words for a small vocabulary


def _byte_level_vocab(words, end_of_word=""):
    """A byte-level BPE vocab (every byte is a token) plus merges that spell `words`.

    `end_of_word` is CLIP's "</w>" suffix; Qwen2 (GPT-2 style) marks a leading space
    with "Ġ" instead. Returns (vocab dict, merges: list of symbol pairs)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    if end_of_word:
        for ch in alphabet:
            vocab[ch + end_of_word] = len(vocab)
    merges = []
    for word in words:
        symbols = list(word)
        if end_of_word:
            symbols[-1] = symbols[-1] + end_of_word
        # merge left to right: ((a b) c) d ...
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in vocab:
                vocab[merged] = len(vocab)
            symbols = [merged] + symbols[2:]
    return vocab, merges


def tiny_clip_tokenizer(words=(), model_max_length=77):
    from transformers import CLIPTokenizer

    vocab, merges = _byte_level_vocab(words, end_of_word="</w>")
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# A compact version of Qwen2.5-VL's chat template: same tokens, same layout.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_processor(words=(), image_pixels=56 * 56):
    """Qwen2.5-VL processor: byte-level Qwen2 tokenizer + the real image processor.

    `image_pixels` bounds the resized image (multiples of 28 px per side), so a
    56x56 preview becomes 2x2 merged vision tokens."""
    from transformers import (
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    vocab, merges = _byte_level_vocab(["Ġ" + w for w in words])
    for special in QWEN_SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    image_processor = Qwen2VLImageProcessor(
        min_pixels=image_pixels, max_pixels=image_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video_processor = Qwen2VLVideoProcessor(min_pixels=image_pixels, max_pixels=image_pixels)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=QWEN_CHAT_TEMPLATE)


def tiny_qwen_model(processor, hidden=64, layers=2, heads=4, vision_hidden=32, vision_depth=1, seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = hidden // heads
    # multimodal rope: the three sections (time, height, width) split head_dim / 2
    mrope = [head_dim // 2 - 2 * (head_dim // 8), head_dim // 8, head_dim // 8]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
            out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return model.eval()


# -----------------------------------------------------------------------------
# tiny diffusion pipelines (SD1.5- and SDXL-shaped), ordinary diffusers objects
#
# The real models' block layouts (their diffusers configs), kept as they are; only the widths
# shrink. SD1.5: four levels, two layers per block, cross-attention in the first three down
# blocks, no downsampler after the last one; VAE: four levels of two layers (8x downsampling).
# SDXL: three levels, no attention in the first down block, transformer depth (1, 2, 10), here
# (1, 1, 2). A layout that only a toy has would hide the bugs that show at full size.

SD15_UNET_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
)
SDXL_UNET_BLOCKS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, transformer_layers_per_block=(1, 1, 2),
)


def _tiny_unet(cross_dim, sample_size, blocks, channels, addition=None, seed=0, norm_groups=4):
    """A UNet2DConditionModel with the block layout `blocks` (e.g. SD15_UNET_BLOCKS) and the
    widths `channels` (one per block). addition: SDXL's pooled-text + time-ids input width.
    norm_groups: GroupNorm groups; 4 channels or more per group, as SD's 32 groups of 320 have
    10 (fewer make GroupNorm an instance norm, which removes each map's mean level)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=channels,
                  cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=norm_groups, **blocks)
    if addition is not None:  # SDXL: pooled text embedding + size/crop "time ids"
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=addition)
    return UNet2DConditionModel(**kwargs)


def _tiny_vae(seed=0, channels=(8, 16, 16, 16), norm_groups=2, layers=2, latent_channels=4, **flow):
    """An AutoencoderKL with one level per entry of `channels` (each but the last halves the side).
    norm_groups: GroupNorm groups. With one channel per group GroupNorm is an instance norm,
    which subtracts each channel's image mean: the absolute colour of a flat image is lost.
    flow: SD3/FLUX's VAE (FLOW_VAE): 16 latent channels, no quant convs, a shift and a scale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=layers, norm_num_groups=norm_groups, sample_size=32, **flow,
    )


def _tiny_text_encoder(tokenizer, hidden, projection=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _tiny_t5_encoder(tokenizer, hidden=64, seed=0):
    """T5 v1.1's encoder (gated-GELU feed-forward, relative position buckets), as SD3 and FLUX use T5-XXL."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden, num_layers=2,
                      num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config).eval()


def tiny_t5_tokenizer(words=()):
    """A T5 (Unigram, sentencepiece-style) tokenizer: each word one piece, letters as a fallback."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd15_pipeline(words=(), image_size=64, seed=0, unet_blocks=SD15_UNET_BLOCKS, unet_channels=(16, 16, 32, 32),
                       unet_norm_groups=4, vae_channels=(8, 16, 16, 16), vae_norm_groups=2, vae_layers=2):
    """SD1.5-shaped: CLIPTextModel + UNet2DConditionModel + AutoencoderKL, DDIM. The defaults keep
    SD1.5's layout (64 px -> 8x8 latents); the toy world passes its own (build_toy_world.py)."""
    from diffusers import StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer(words)
    vae = _tiny_vae(seed, vae_channels, vae_norm_groups, vae_layers)
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=_tiny_text_encoder(tokenizer, 32, seed=seed), tokenizer=tokenizer,
        unet=_tiny_unet(32, latent_size, unet_blocks, unet_channels, seed=seed, norm_groups=unet_norm_groups), scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(words=(), image_size=64, seed=0, unet_blocks=SDXL_UNET_BLOCKS, unet_channels=(16, 32, 32),
                       unet_norm_groups=4, vae_channels=(8, 16, 16, 16), vae_norm_groups=2, vae_layers=2):
    """SDXL-shaped: two text encoders (the second with a projection = pooled embedding),
    a UNet with text_time additional conditioning, AutoencoderKL, DDIM."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer = tiny_clip_tokenizer(words)
    vae = _tiny_vae(seed, vae_channels, vae_norm_groups, vae_layers)
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    hidden_1, hidden_2 = 16, 32
    # projection_class_embeddings_input_dim = pooled dim + 6 time ids * addition_time_embed_dim
    unet = _tiny_unet(hidden_1 + hidden_2, latent_size, unet_blocks, unet_channels, addition=hidden_2 + 6 * 8, seed=seed,
                      norm_groups=unet_norm_groups)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=_tiny_text_encoder(tokenizer, hidden_1, seed=seed),
        text_encoder_2=_tiny_text_encoder(tokenizer, hidden_2, projection=hidden_2, seed=seed + 1),
        tokenizer=tokenizer, tokenizer_2=tiny_clip_tokenizer(words), unet=unet, scheduler=_scheduler(),
    )


# Flow-matching transformers, their real layouts, narrow (the diffusers configs of the released
# models). SD3.5-Medium: 24 MMDiT blocks, the first 13 with a second, image-only attention
# (MMDiT-X), RMS qk-norm, 2x2 patches; SD3.5-Large: 38 blocks, qk-norm, no dual attention. Text:
# CLIP-L and CLIP-G (penultimate hidden states, projected pooled outputs) + T5-XXL tokens.
# FLUX.1: 19 double-stream + 38 single-stream blocks over 2x2-packed latents (64 input channels),
# 3-axis RoPE, CLIP-L pooled + T5-XXL tokens, a guidance embedding in -dev, none in -schnell.
# Both: a 16-channel VAE with a shift and no quant convs, flow-matching Euler (shift 3; FLUX
# shifts with the image size).
SD35M_TRANSFORMER = dict(num_layers=4, dual_attention_layers=(0, 1), qk_norm="rms_norm")
SD35L_TRANSFORMER = dict(num_layers=4, dual_attention_layers=(), qk_norm="rms_norm")
FLUX_TRANSFORMER = dict(num_layers=1, num_single_layers=2)
FLOW_VAE = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
SD3_VAE_SCALE = dict(scaling_factor=1.5305, shift_factor=0.0609)  # the released VAEs' values
FLUX_VAE_SCALE = dict(scaling_factor=0.3611, shift_factor=0.1159)


def flow_scheduler(dynamic=False, shift=3.0):
    """FlowMatchEulerDiscreteScheduler as SD3 (shift 3) / FLUX.1-dev (shift by image size) / -schnell (shift 1) configure it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        return FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def tiny_sd3_pipeline(words=(), image_size=64, seed=0, transformer=SD35M_TRANSFORMER, heads=2, head_dim=16,
                      clip_hidden=(16, 32), t5_hidden=64, vae_channels=(8, 16, 16, 16), vae_norm_groups=2, vae_layers=2,
                      shift=3.0, t5=True):
    """SD3-shaped: CLIP-L + CLIP-G (with projections) + T5 encoder, SD3Transformer2DModel (MMDiT),
    a 16-channel AutoencoderKL with shift, flow-matching Euler. t5=False: no T5 (SD3's option)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_l, clip_g = clip_hidden
    vae = _tiny_vae(seed, vae_channels, vae_norm_groups, vae_layers, **FLOW_VAE, **SD3_VAE_SCALE)
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    torch.manual_seed(seed)
    denoiser = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=t5_hidden, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=clip_l + clip_g, pos_embed_max_size=latent_size, **transformer,
    )
    tokenizer_3 = tiny_t5_tokenizer(words)
    return StableDiffusion3Pipeline(
        transformer=denoiser, scheduler=flow_scheduler(shift=shift), vae=vae,
        text_encoder=_tiny_text_encoder(tiny_clip_tokenizer(words), clip_l, projection=clip_l, seed=seed),
        tokenizer=tiny_clip_tokenizer(words),
        text_encoder_2=_tiny_text_encoder(tiny_clip_tokenizer(words), clip_g, projection=clip_g, seed=seed + 1),
        tokenizer_2=tiny_clip_tokenizer(words),
        text_encoder_3=_tiny_t5_encoder(tokenizer_3, t5_hidden, seed=seed + 2) if t5 else None,
        tokenizer_3=tokenizer_3 if t5 else None,
    )


def tiny_flux_pipeline(words=(), image_size=64, seed=0, guidance_embeds=True, transformer=FLUX_TRANSFORMER, heads=2,
                       head_dim=16, clip_hidden=32, t5_hidden=64, vae_channels=(8, 16, 16, 16), vae_norm_groups=2,
                       vae_layers=2):
    """FLUX.1-shaped: CLIP-L (pooled) + T5 encoder, FluxTransformer2DModel (double- and
    single-stream blocks, RoPE), a 16-channel AutoencoderKL with shift, flow-matching Euler.
    guidance_embeds=True is FLUX.1-dev (distilled guidance, dynamic shift); False is -schnell."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    vae = _tiny_vae(seed, vae_channels, vae_norm_groups, vae_layers, **FLOW_VAE, **FLUX_VAE_SCALE)
    torch.manual_seed(seed)
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)  # FLUX.1: (16, 56, 56) of 128
    denoiser = FluxTransformer2DModel(
        patch_size=1, in_channels=64, attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=t5_hidden,
        pooled_projection_dim=clip_hidden, guidance_embeds=guidance_embeds, axes_dims_rope=rope, **transformer,
    )
    tokenizer_2 = tiny_t5_tokenizer(words)
    return FluxPipeline(
        transformer=denoiser, scheduler=flow_scheduler(dynamic=guidance_embeds, shift=3.0 if guidance_embeds else 1.0),
        vae=vae, text_encoder=_tiny_text_encoder(tiny_clip_tokenizer(words), clip_hidden, seed=seed),
        tokenizer=tiny_clip_tokenizer(words), text_encoder_2=_tiny_t5_encoder(tokenizer_2, t5_hidden, seed=seed + 2),
        tokenizer_2=tokenizer_2,
    )


# -----------------------------------------------------------------------------
# toy data set: procedural images of the toy grammar


def draw_toy_image(shape, colour, size, background, image_size=32, offset=(0.0, 0.0), supersample=4):
    """One toy image, (3, H, W) in [0, 1]: `shape` of `colour` and `size` on `background`.

    Drawn at `supersample` x resolution and average-pooled, so edges are anti-aliased.
    offset: (dx, dy) shift of the centre, as a fraction of the image side."""
    n = image_size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n - 0.5  # pixel centres in [-0.5, 0.5]
    y, x = torch.meshgrid(coords - offset[1], coords - offset[0], indexing="ij")
    r = TOY_SIZES[size]
    if shape == "circle":
        inside = x**2 + y**2 <= r**2
    elif shape == "square":
        inside = (x.abs() <= r * 0.9) & (y.abs() <= r * 0.9)  # same visual weight as the circle
    elif shape == "triangle":  # pointing up, base = height = 2r
        inside = (y >= -r) & (y <= r) & (x.abs() <= (y + r) / 2)
    else:
        raise ValueError(f"unknown toy shape '{shape}'")
    fg = torch.tensor(TOY_COLOURS[colour]).view(3, 1, 1)
    bg = torch.tensor(TOY_COLOURS[background]).view(3, 1, 1)
    image = torch.where(inside, fg, bg)  # (3, n, n)
    return torch.nn.functional.avg_pool2d(image[None], supersample)[0]


def sample_toy_attributes(rng):
    """Random full attributes (shape, colour, size, background), colour != background."""
    colours = list(TOY_COLOURS)
    colour = rng.choice(colours)
    background = rng.choice([c for c in colours if c != colour])
    return dict(shape=rng.choice(TOY_SHAPES), colour=colour, size=rng.choice(list(TOY_SIZES)), background=background)


def partial_attributes(attributes, rng, p_keep):
    """Some of `attributes`: the shape always, each other one with probability p_keep."""
    return {k: v for k, v in attributes.items() if k == "shape" or rng.random() < p_keep}


def random_caption(attributes, rng, p_full=0.5):
    """Caption of `attributes`: the full one with probability p_full, else a partial one (each
    attribute but the shape left out with probability 1/2)."""
    if rng.random() < p_full:
        return toy_caption(**attributes)
    return toy_caption(**partial_attributes(attributes, rng, 0.5))


def toy_dataset(n, seed=0, image_size=32, p_full=0.5):
    """n procedural (image, caption, attributes): images (n, 3, H, W) in [0, 1], deterministic from seed."""
    import random

    rng = random.Random(seed)
    images, captions, attributes = [], [], []
    for _ in range(n):
        attrs = sample_toy_attributes(rng)
        offset = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))  # +-1 px at 32 px
        images.append(draw_toy_image(**attrs, image_size=image_size, offset=offset))
        captions.append(random_caption(attrs, rng, p_full))
        attributes.append(attrs)
    return torch.stack(images), captions, attributes
