"""
Builds the offline toy world: the project's CartPole.

    python toy.py                      # full build into toy_world/ (see --help)

This file also holds the builders of *tiny architectures* (SD1.5- and
SDXL-shaped pipelines, a tiny Qwen2.5-VL with its processor and chat template)
that both the toy world and the tests use. They are ordinary diffusers /
transformers objects, saved and loaded with `save_pretrained` /
`from_pretrained` like the real models.
"""

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from common import TOY_COLOURS, TOY_SHAPES, TOY_SIZES, TOY_WORDS, toy_caption

# -----------------------------------------------------------------------------
# tiny tokenizers: byte-level BPE alphabets, plus whole words for a small vocabulary


def _byte_level_vocab(words, end_of_word=""):
    """A byte-level BPE vocab (every byte is a token) plus merges that spell `words`.

    `end_of_word` is CLIP's "</w>" suffix; Qwen2 (GPT-2 style) marks a leading space
    with "Ġ" instead. Returns (vocab dict, merges: list of symbol pairs)."""
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


def _tiny_unet(cross_dim, sample_size, addition=None, channels=(32, 64), seed=0):
    torch.manual_seed(seed)
    kwargs = dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=8, norm_num_groups=8,
    )
    if addition is not None:  # SDXL: pooled text embedding + size/crop "time ids"
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=addition)
    return UNet2DConditionModel(**kwargs)


def _tiny_vae(seed=0, channels=(16, 32)):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def _tiny_text_encoder(tokenizer, hidden, projection=None, seed=0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection or hidden,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _scheduler():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd15_pipeline(words=(), image_size=32, seed=0, unet_channels=(32, 64), vae_channels=(16, 32)):
    """SD1.5-shaped: CLIPTextModel + UNet2DConditionModel + AutoencoderKL, DDIM."""
    tokenizer = tiny_clip_tokenizer(words)
    vae = _tiny_vae(seed, vae_channels)
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=_tiny_text_encoder(tokenizer, 32, seed=seed), tokenizer=tokenizer,
        unet=_tiny_unet(32, latent_size, channels=unet_channels, seed=seed), scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(words=(), image_size=32, seed=0, unet_channels=(32, 64), vae_channels=(16, 32)):
    """SDXL-shaped: two text encoders (the second with a projection = pooled embedding),
    a UNet with text_time additional conditioning, AutoencoderKL, DDIM."""
    tokenizer = tiny_clip_tokenizer(words)
    vae = _tiny_vae(seed, vae_channels)
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    hidden_1, hidden_2 = 16, 32
    # projection_class_embeddings_input_dim = pooled dim + 6 time ids * addition_time_embed_dim
    unet = _tiny_unet(hidden_1 + hidden_2, latent_size, addition=hidden_2 + 6 * 8, channels=unet_channels, seed=seed)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=_tiny_text_encoder(tokenizer, hidden_1, seed=seed),
        text_encoder_2=_tiny_text_encoder(tokenizer, hidden_2, projection=hidden_2, seed=seed + 1),
        tokenizer=tokenizer, tokenizer_2=tiny_clip_tokenizer(words), unet=unet, scheduler=_scheduler(),
    )


# -----------------------------------------------------------------------------
# toy data set: procedural images of the toy grammar (see common.py, "toy world")


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


def random_caption(attributes, rng, p_full=0.4):
    """Caption of `attributes`: the full one with probability p_full, else each of size, colour,
    background left out with probability 1/2 (the shape is always named)."""
    if rng.random() < p_full:
        return toy_caption(**attributes)
    kept = {k: v for k, v in attributes.items() if k == "shape" or rng.random() < 0.5}
    return toy_caption(**kept)


def toy_dataset(n, seed=0, image_size=32, p_full=0.4):
    """n procedural (image, caption, attributes): images (n, 3, H, W) in [0, 1], deterministic from seed."""
    import random

    rng = random.Random(seed)
    images, captions, attributes = [], [], []
    for _ in range(n):
        attrs = sample_toy_attributes(rng)
        offset = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))
        images.append(draw_toy_image(**attrs, image_size=image_size, offset=offset))
        captions.append(random_caption(attrs, rng, p_full))
        attributes.append(attrs)
    return torch.stack(images), captions, attributes
