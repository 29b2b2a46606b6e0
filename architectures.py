"""
architectures.py: the released models' architectures with random weights, built from their configs,
and the refiners bench.py and the tests drive -- nothing is downloaded.

    configs         SD1.5, SDXL-base, SD3.5-Medium/-Large, FLUX.1-dev, CLIP-L/-G, T5-XXL,
                    Qwen2.5-VL-3B: the values of their released config.json files
    random_*        a common.Backbone, a reward scorer or a Refiner of such an architecture with
                    random weights (size full) or the tiny test one of toy.py (size tiny)
    refiner_view    another refiner over the same model: plain or fast decoding, answers of a
                    fixed length (bench.py times given answer lengths)
    generate_keeping_logits   transformers' generate: the reference the refiner's own loop is tested against

A leaf, like toy.py: bench.py and the tests import it, the method's modules never do. Speed and
memory depend on the architecture, not on the weights; the tokenizers are toy.py's tiny ones.
Full-size modules are built on the target device directly (a 3.5 B SDXL built on the CPU and then
copied to a GPU takes minutes); their weights are the seed's (on the CPU, those of a plain build).
"""

import contextlib
import math
from pathlib import Path

import torch

import common
import refiners
import rewards
import toy

# -----------------------------------------------------------------------------
# the released configs

# stable-diffusion-v1-5: unet/config.json, vae/config.json, text_encoder/config.json
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
CLIP_L14_VISION = dict(  # openai/clip-vit-large-patch14 (the LAION aesthetic predictor's tower)
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="quick_gelu",
)
# stable-diffusion-xl-base-1.0: unet/config.json (2.57 B), vae (SD1.5's layout), CLIP-L + OpenCLIP bigG text towers
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)
CLIP_G_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
# the flow-matching transformers (their released diffusers / transformers configs)
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35L_TRANSFORMER = dict(SD35M_TRANSFORMER, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                         pos_embed_max_size=192, dual_attention_layers=())
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                            axes_dims_rope=(16, 56, 56))
T5_XXL_ENCODER = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False)
FLOW_VAE = dict(SD15_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
# Qwen/Qwen2.5-VL-3B-Instruct config.json (text and vision tower)
QWEN25_VL_3B_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN25_VL_3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2, hidden_act="silu",
)
# the tiny reward towers of size tiny
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TINY_TEXT = dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, pad_token_id=0)


def parameter_count(module):
    """Parameters of a module (built on the meta device, it holds shapes only: nothing is allocated)."""
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def random_weights(device, seed):
    """Modules built inside get random weights from `seed`, allocated on `device` directly."""
    torch.manual_seed(seed)
    with torch.device(device):
        yield


def clip_token_ids(tokenizer):
    """The special token ids a CLIP text config takes from its tokenizer."""
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


# -----------------------------------------------------------------------------
# backbones: SD1.5, SDXL, SD3.5-Medium


def sd15_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def random_backbone(pipe, name, label, size, device, dtype, steps, guidance, resolution, **spec):
    """The pipeline in dtype on device, as a common.Backbone named `name`-random-`size` with its
    model card's sampling steps and guidance."""
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    spec = common.BackboneSpec(source=f"random {size} {label} architecture", steps=steps, guidance=guidance, size=resolution, **spec)
    return common.Backbone(pipe, f"{name}-random-{size}", spec)


def random_sd15(size, resolution, device, dtype, seed=0):
    """A common.Backbone: SD1.5's architecture with random weights (size full) or the tiny test one."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size == "tiny":
        pipe, resolution = toy.tiny_sd15_pipeline(toy.TOY_WORDS, image_size=64, seed=seed), 64
    else:
        tokenizer = toy.tiny_clip_tokenizer(toy.TOY_WORDS)
        with random_weights(device, seed):
            text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **clip_token_ids(tokenizer))).eval()
            vae, unet = AutoencoderKL(**SD15_VAE), UNet2DConditionModel(**SD15_UNET)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sd15_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return random_backbone(pipe, "sd15", "SD1.5", size, device, dtype, steps=50, guidance=7.5, resolution=resolution)


def random_sdxl(size, resolution, device, dtype, seed=0):
    """A common.Backbone: SDXL-base's architecture with random weights (size full) or the tiny test one."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if size == "tiny":
        pipe, resolution = toy.tiny_sdxl_pipeline(toy.TOY_WORDS, image_size=64, seed=seed), 64
    else:
        tokenizer = toy.tiny_clip_tokenizer(toy.TOY_WORDS)
        ids = clip_token_ids(tokenizer)
        with random_weights(device, seed):
            vae, text = AutoencoderKL(**SDXL_VAE), CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **ids)).eval()
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT, **ids)).eval()
            unet = UNet2DConditionModel(**SDXL_UNET)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                         unet=unet, scheduler=sd15_scheduler())
    return random_backbone(pipe, "sdxl", "SDXL", size, device, dtype, steps=50, guidance=5.0, resolution=resolution)


def random_sd35m(size, resolution, device, dtype, seed=0, t5=True):
    """A common.Backbone: SD3.5-Medium's architecture with random weights (size full: MMDiT-X 2.2 B,
    CLIP-L, CLIP-G, T5-XXL, 16-channel VAE) or the tiny test one. t5=False: no T5 (SD3's option)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    if size == "tiny":
        pipe, resolution = toy.tiny_sd3_pipeline(toy.TOY_WORDS, image_size=64, seed=seed, t5=t5), 64
    else:
        clip_tokenizer, t5_tokenizer = toy.tiny_clip_tokenizer(toy.TOY_WORDS), toy.tiny_t5_tokenizer(toy.TOY_WORDS)
        ids = clip_token_ids(clip_tokenizer)
        with random_weights(device, seed):
            transformer, vae = SD3Transformer2DModel(**SD35M_TRANSFORMER), AutoencoderKL(**dict(FLOW_VAE, **toy.SD3_VAE_SCALE))
            text = CLIPTextModelWithProjection(CLIPTextConfig(**SD15_TEXT, **ids)).eval()
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT, **ids)).eval()
            text_3 = T5EncoderModel(T5Config(**T5_XXL_ENCODER, pad_token_id=t5_tokenizer.pad_token_id,
                                             eos_token_id=t5_tokenizer.eos_token_id)).eval() if t5 else None
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=toy.flow_scheduler(shift=3.0), vae=vae, text_encoder=text, tokenizer=clip_tokenizer,
            text_encoder_2=text_2, tokenizer_2=clip_tokenizer, text_encoder_3=text_3, tokenizer_3=t5_tokenizer if t5 else None)
    return random_backbone(pipe, "sd35m", "SD3.5-Medium", size, device, dtype, steps=40, guidance=4.5, resolution=resolution, taesd=None)


def random_taesd_folder(folder, vae_config=None, seed=0):
    """AutoencoderTiny's default config *is* TAESD's architecture (TAESD3 / TAEF1: the same with 16
    latent channels and their VAE's scale and shift); saved so PreviewDecoder loads it."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    flow = {} if vae_config is None or vae_config.latent_channels == 4 else dict(
        latent_channels=16, scaling_factor=vae_config.scaling_factor, shift_factor=vae_config.shift_factor)
    AutoencoderTiny(**flow).save_pretrained(folder)
    return str(folder)


# -----------------------------------------------------------------------------
# pixel rewards: the aesthetic predictor (CLIP ViT-L/14 + MLP) and ImageReward (BLIP ViT-L + BERT)


def random_aesthetic(size, folder, device, dtype, seed=0):
    """rewards.aesthetic_reward on a folder holding a random CLIP ViT-L/14 (tiny text tower: the
    aesthetic predictor never runs it) and a random head, saved like the official files."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision = CLIP_L14_VISION if size == "full" else TINY_VISION
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    projection = 768 if size == "full" else 32
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)).save_pretrained(folder)
    head = rewards.aesthetic_mlp(projection)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, Path(folder) / rewards.AESTHETIC_HEAD[1])
    return rewards.aesthetic_reward(str(folder), device, dtype)


def bert_tokenizer(folder):
    """A BERT WordPiece tokenizer over a small vocabulary, with BLIP's [DEC] / [ENC] tokens added."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *toy.TOY_WORDS]
    (Path(folder) / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(Path(folder) / "vocab.txt"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def random_imagereward(size, folder, device, dtype, seed=0):
    """rewards.imagereward_scorer on ImageReward's architecture (BLIP ViT-L/16 + BERT with
    cross-attention + MLP head) with random weights."""
    with random_weights(device, seed):
        if size == "full":
            model = rewards.ImageRewardModel()
        else:
            model = rewards.ImageRewardModel(text_config=TINY_TEXT, vision_config=dict(TINY_VISION, layer_norm_eps=1e-6))
    return rewards.imagereward_scorer(model.to(device, dtype).eval(), bert_tokenizer(folder), device, dtype)


# -----------------------------------------------------------------------------
# the refiner: Qwen2.5-VL-3B, answers of a fixed length, and transformers' generate as the reference


def random_qwen_refiner(size, device, dtype, max_new_tokens, seed=0):
    """A refiners.Refiner (a FastRefiner on a GPU, as --fast-decode auto): Qwen2.5-VL-3B's
    architecture with random weights (size full, previews resized to 448 px as
    Refiner.from_pretrained does for hub models) or the tiny test one."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    refiner_class = refiners.refiner_class("auto", device)
    if size == "tiny":
        processor = toy.tiny_qwen_processor(toy.TOY_WORDS)
        model = toy.tiny_qwen_model(processor, seed=seed)
        return refiner_class(model.to(device, dtype), processor, max_new_tokens=max_new_tokens)
    processor = toy.tiny_qwen_processor(toy.TOY_WORDS, image_pixels=448 * 448)  # 16x16 merged vision tokens
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in toy.QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(QWEN25_VL_3B_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=QWEN25_VL_3B_VISION, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    with random_weights(device, seed):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return refiner_class(model.eval(), processor, max_new_tokens=max_new_tokens, preview_size=448)


class FixedLength:
    """A refiner that never ends an answer early: every answer is max_new_tokens long (bench.py
    times given answer lengths; a random refiner would stop anywhere). The end tokens are banned
    from the choice only: the log-probs stay the policy's, as teacher forcing recomputes them."""

    def choose_token(self, scores):
        return super().choose_token(scores.index_fill(1, torch.tensor(self.eos_ids, device=scores.device), -math.inf))


class FixedLengthRefiner(FixedLength, refiners.Refiner):
    pass


class FixedLengthFastRefiner(FixedLength, refiners.FastRefiner):
    pass


REFINER_CLASSES = {(False, False): refiners.Refiner, (True, False): refiners.FastRefiner,  # (fast, fixed length)
                   (False, True): FixedLengthRefiner, (True, True): FixedLengthFastRefiner}


def refiner_view(refiner, fast=None, fixed_length=None, **changes):
    """Another refiner over the same model and processor: fast decoding or not, answers of a fixed
    length or not (None: as `refiner`), and its settings with `changes` (max_new_tokens, preview_size,
    prefix_cache, ...)."""
    fast = isinstance(refiner, refiners.FastRefiner) if fast is None else fast
    fixed_length = isinstance(refiner, FixedLength) if fixed_length is None else fixed_length
    settings = dict(temperature=refiner.temperature, max_new_tokens=refiner.max_new_tokens, do_sample=refiner.do_sample,
                    max_words=refiner.max_words, preview_size=refiner.preview_size, prefix_cache=refiner.prefix_cache)
    return REFINER_CLASSES[fast, fixed_length](refiner.model, refiner.processor, **{**settings, **changes})


def generate_keeping_logits(refiner, inputs, max_new_tokens, min_new_tokens=0, top_k=0, top_p=1.0):
    """What Refiner.refine did before its own loop: transformers' generate with output_logits=True,
    then the chosen tokens' log-probs from the stacked (rows, tokens, vocab) logits. Returns
    (tokens, log-probs) on the CPU. top_k / top_p None: generate fills them from the model's
    generation_config, then with its own default top_k 50 (what the old refine did)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=refiner.do_sample, temperature=refiner.temperature if refiner.do_sample else None, top_k=top_k, top_p=top_p,
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_token_id=refiner.eos_ids, pad_token_id=refiner.pad_id,
        suppress_tokens=refiner.suppressed, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = refiner.model.generate(**{k: v.to(refiner.model.device) for k, v in inputs.items()}, generation_config=config)
        completion = out.sequences[:, inputs["input_ids"].shape[1]:]
        logits = torch.stack(out.logits, 1)
        logprobs = torch.log_softmax(refiner._policy_logits(logits), -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    return completion.cpu(), logprobs.cpu()
