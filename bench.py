"""
bench.py: the performance ratios that justify the design, measured side by side in one run.

    python bench.py                                # every row at full size (SD1.5-sized random weights)
    python bench.py --rows 1,2,5 --threads 1       # the full-size CPU rows (~17 min on one busy core)
    python bench.py --rows 3,4 --repeats 5         # the toy-size sampling rows, more repeats
    python bench.py --rows 3,4 --backbone toy-sd3  # the same on the flow-matching toy backbone
    python bench.py --quick                        # tiny architectures, seconds: a smoke test
    python bench.py --device cuda                  # with a GPU the full-size GPU rows (3b, 6) run too (bf16)

On a CPU shared with other jobs, --threads 1 gives steadier numbers: with more threads than free
cores, every parallel op waits for its slowest thread.

Rows (each: what is compared, the median of >= 3 repeats after a warm-up, the ratio, the device):
  1  reward per image: LRM (UNet down blocks + mid block on the latent) vs VAE decode + a pixel
     scorer (CLIP ViT-L/14 aesthetic, ImageReward's BLIP ViT-L), and the LRM's noise ensemble
  2  preview decoder per refinement step: full VAE vs TAESD vs the linear latent->RGB map
  3  refined (K refinements) vs plain sampling on the same backbone: toy size; full size
     (SD1.5, SD3.5-Medium + Qwen2.5-VL-3B) on a GPU only
  4  GRPO rollouts: all B*G trajectories in one refined_sample call vs one trajectory at a time
  5  an LRM training step from cached latents vs encoding the pair with the VAE every step
  6  peak GPU memory of a train_refiner and a train_reward step at full size (GPU only)
  7  the flow-matching transformers at full size (SD3.5-Medium, SD3.5-Large, FLUX.1-dev): parameters
     of every component, counted on PyTorch's meta device (nothing is allocated), and bf16 weights
  8  reward per image in DiNa-LRM's setting: the LRM on SD3.5-Medium's first 12 of 24 MMDiT blocks vs
     its VAE decode + ImageReward (1024 px; without T5-XXL, whose 4.7 B fp32 weights do not fit a
     24 GiB CPU machine next to the rest: the transformer still sees 77 + 256 text tokens)

Results go to the terminal (a table) and to OUT/metrics.json. Only ratios are meant to be quoted:
the absolute times of a shared machine are noise, but variants timed in turn, round after round,
see the same load.

Simplifications on purpose: the full-size models are *random-weight* architectures built from
their configs (SD1.5's UNet / VAE / CLIP text encoder, CLIP ViT-L/14, ImageReward's BLIP ViT-L +
BERT, TAESD, Qwen2.5-VL-3B): speed and memory depend on the architecture, not on the weights, and
nothing is downloaded. Their tokenizers are the tiny byte-level ones of toy.py: CLIP pads every
prompt to 77 tokens anyway; the refiner's chat prompt comes out longer than with Qwen's own BPE, and
a random refiner never ends its answer early (it writes --max-new-tokens tokens), so the full-size
refined-sampling overhead is an upper bound.
"""

import functools
import gc
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import common
import lrm
import promptloop
import refiners
import rewards
import runs
import toy

# -----------------------------------------------------------------------------
# config

ROWS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11")


@dataclass
class Config(common.RunFlags):
    rows: str = field(default="1,2,3,4,5,6,7,8,9,10,11", metadata={"help": "comma-separated rows to run (see the module docstring): 1..11"})
    backbone: str = field(default="toy", metadata={"help": "toy backbone of the toy-size sampling rows 3a and 4: toy | toy-sdxl | toy-sd3"})
    repeats: int = field(default=3, metadata={"help": "timed repeats per variant (>= 3); the median is reported"})
    warmup: int = field(default=1, metadata={"help": "untimed warm-up calls per variant before the repeats"})
    size: str = field(default="full", metadata={"help": "architectures of rows 1, 2, 5: full (SD1.5-sized, 512 px) or tiny (the test-sized ones)"})
    quick: bool = field(default=False, metadata={"help": "smoke test; overrides --size (tiny), --sampling-steps 4, --max-new-tokens 8, --lrm-draws 2, --memory-batch 2 and B=1 G=2 in row 4"})
    batch: int = field(default=1, metadata={"help": "images (rows 1, 2, 3) or pairs (row 5) per call"})
    resolution: int = field(default=512, metadata={"help": "image side in pixels at --size full (latents are 1/8 of it)"})
    flow_resolution: int = field(default=1024, metadata={"help": "image side of row 8 (SD3.5-Medium) at --size full"})
    sampling_steps: int = field(default=20, metadata={"help": "denoising steps of the toy-size sampling rows (3a, 4)"})
    refine_steps: int = field(default=5, metadata={"help": "K of row 3 (inference); row 4 uses 2, the training value"})
    prompts_per_step: int = field(default=2, metadata={"help": "B of row 4 (GRPO prompts per step)"})
    group_size: int = field(default=4, metadata={"help": "G of row 4 (trajectories per prompt); its target is >= 0.7 G"})
    preview_decoder: str = field(default="vae", metadata={"help": "preview decoder of the sampling rows 3 and 4: vae | taesd | linear"})
    max_new_tokens: int = field(default=96, metadata={"help": "longest refiner answer in tokens (the Refiner's default)"})
    lrm_draws: int = field(default=8, metadata={"help": "noise-ensemble draws of row 1c (the lrm reward's default)"})
    memory_batch: int = field(default=8, metadata={"help": "row 6: pairs per train_reward step and trajectories per train_refiner minibatch"})
    full_backbones: str = field(default="sd15,sdxl", metadata={"help": "row 9: sd15 (512 px, 50 steps, CFG 7.5) and/or sdxl (1024 px, 50 steps, CFG 5)"})
    batches: str = field(default="1,4,8", metadata={"help": "rows 9, 10: images (= refiner rows) per call"})
    answer_lengths: str = field(default="16,32,64", metadata={"help": "row 9: refiner answers forced to these lengths in tokens"})
    fast_decode: str = field(default="both", metadata={"help": "rows 9, 10: the refiner's decode path: both | on | off"})
    preview_sizes: str = field(default="448,224", metadata={"help": "row 10: refiner preview sides in px; the first is the decode rows' one"})
    decode_tokens: int = field(default=32, metadata={"help": "row 10: tokens timed after the first (ms per token)"})
    rollout_rows: int = field(default=16, metadata={"help": "row 11: refiner rows of one rollout call (B*G)"})
    rollout_tokens: int = field(default=64, metadata={"help": "row 11: answer length in tokens (forced)"})
    rollout_preview: int = field(default=448, metadata={"help": "row 11: refiner preview side in px"})
    out: str = field(default="runs/bench", metadata={"help": "output folder: metrics.json"})


def parse_config(args=None):
    return common.parse_config(Config, args)


def check_config(cfg):
    """Apply --quick, check the invariants; returns the rows to run."""
    if cfg.quick:
        cfg.size, cfg.sampling_steps, cfg.max_new_tokens, cfg.lrm_draws = "tiny", 4, 8, 2
        cfg.prompts_per_step, cfg.group_size, cfg.memory_batch = 1, 2, 2
        cfg.batches, cfg.answer_lengths, cfg.decode_tokens, cfg.preview_sizes = "2", "8", 4, "56,28"
        cfg.rollout_rows, cfg.rollout_tokens, cfg.rollout_preview = 4, 8, 56
    rows = common.parse_list(cfg.rows, "--rows", ROWS)
    if cfg.repeats < 3:
        raise common.UserError(f"--repeats must be >= 3 (a median of fewer is not a measurement), got {cfg.repeats}")
    if cfg.size not in ("full", "tiny"):
        raise common.UserError(f"--size must be full or tiny, got '{cfg.size}'")
    if cfg.fast_decode not in DECODE_MODES:
        raise common.UserError(f"--fast-decode must be one of {', '.join(DECODE_MODES)}, got '{cfg.fast_decode}'")
    for flag, minimum in (("batches", 1), ("answer_lengths", 1), ("preview_sizes", 28)):
        common.parse_ints(getattr(cfg, flag), "--" + flag.replace("_", "-"), minimum)
    common.parse_list(cfg.full_backbones, "--full-backbones", FULL_BACKBONES)
    if cfg.preview_decoder not in promptloop.PreviewDecoder.KINDS:
        raise common.UserError(f"--preview-decoder must be one of {', '.join(promptloop.PreviewDecoder.KINDS)}")
    common.require(cfg, positive=("batch", "sampling_steps", "refine_steps", "prompts_per_step", "group_size", "max_new_tokens",
                                  "lrm_draws", "memory_batch", "decode_tokens", "rollout_rows", "rollout_tokens"),
                   non_negative=("threads", "warmup", "rollout_preview"))
    if not cfg.backbone.startswith("toy") or cfg.backbone not in common.BACKBONES:
        raise common.UserError(f"--backbone must be a toy backbone: {', '.join(b for b in common.BACKBONES if b.startswith('toy'))}")
    for name in ("resolution", "flow_resolution"):
        if getattr(cfg, name) < 64 or getattr(cfg, name) % 64:
            raise common.UserError(f"--{name.replace('_', '-')} must be a multiple of 64, got {getattr(cfg, name)}")
    return rows


# -----------------------------------------------------------------------------
# timing: variants interleaved, round after round, median per variant

PROMPT = "a large red circle on a blue background"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(variants, repeats, warmup, device):
    """{label: fn()} -> {label: [seconds per repeat]}.

    Every variant is warmed up, then each round times every variant once, in turn: a change of load
    on a shared machine hits all variants alike, so their ratio stays meaningful."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {label: [] for label in variants}
    for _ in range(repeats):
        for label, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[label].append(time.perf_counter() - start)
    return times


def summary(times):
    return dict(median_s=statistics.median(times), times_s=[round(t, 4) for t in times])


def ratio_row(row, compared, baseline, candidate, ratio, target, device, notes="", target_ok=None):
    """One table row: two measured variants (label, times) and their ratio (> 1 = the design wins,
    except overhead rows, where the target says which way)."""
    return dict(row=row, compared=compared, baseline=dict(label=baseline[0], **summary(baseline[1])),
                candidate=dict(label=candidate[0], **summary(candidate[1])), ratio=ratio, target=target,
                meets_target=target_ok, device=device_name(device), notes=notes)


def skipped_row(row, compared, target, device, reason="needs a GPU (CUDA)"):
    return dict(row=row, compared=compared, skipped=reason, ratio=None, target=target, meets_target=None,
                device=device_name(device), notes="")


def device_name(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# architectures with random weights, built from their configs (nothing is downloaded)

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
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
TINY_TEXT = dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, pad_token_id=0)
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


def sd15_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def random_sd15(size, resolution, device, dtype, seed=0):
    """A common.Backbone: SD1.5's architecture with random weights (size full) or the tiny test one."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size == "tiny":
        pipe = toy.tiny_sd15_pipeline(toy.TOY_WORDS, image_size=64, seed=seed)
        resolution = 64
    else:
        tokenizer = toy.tiny_clip_tokenizer(toy.TOY_WORDS)
        torch.manual_seed(seed)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id))
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD15_VAE), text_encoder=text.eval(), tokenizer=tokenizer,
            unet=UNet2DConditionModel(**SD15_UNET), scheduler=sd15_scheduler(), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    spec = common.BackboneSpec(source=f"random {size} SD1.5 architecture", steps=50, guidance=7.5, size=resolution)
    return common.Backbone(pipe, f"sd15-random-{size}", spec)


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
        pipe = toy.tiny_sd3_pipeline(toy.TOY_WORDS, image_size=64, seed=seed, t5=t5)
        resolution = 64
    else:
        clip_tokenizer, t5_tokenizer = toy.tiny_clip_tokenizer(toy.TOY_WORDS), toy.tiny_t5_tokenizer(toy.TOY_WORDS)
        ids = dict(bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id)
        torch.manual_seed(seed)
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER), scheduler=toy.flow_scheduler(shift=3.0),
            vae=AutoencoderKL(**dict(FLOW_VAE, **toy.SD3_VAE_SCALE)),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**SD15_TEXT, **ids)).eval(), tokenizer=clip_tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT, **ids)).eval(), tokenizer_2=clip_tokenizer,
            text_encoder_3=T5EncoderModel(T5Config(**T5_XXL_ENCODER, pad_token_id=t5_tokenizer.pad_token_id,
                                                   eos_token_id=t5_tokenizer.eos_token_id)).eval() if t5 else None,
            tokenizer_3=t5_tokenizer if t5 else None,
        )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    spec = common.BackboneSpec(source=f"random {size} SD3.5-Medium architecture", steps=40, guidance=4.5, size=resolution,
                               taesd=None)
    return common.Backbone(pipe, f"sd35m-random-{size}", spec)


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
    torch.manual_seed(seed)
    if size == "full":
        model = rewards.ImageRewardModel()
    else:
        model = rewards.ImageRewardModel(text_config=TINY_TEXT, vision_config=dict(TINY_VISION, layer_norm_eps=1e-6))
    return rewards.imagereward_scorer(model.to(device, dtype).eval(), bert_tokenizer(folder), device, dtype)


def random_taesd_folder(folder, vae_config=None, seed=0):
    """AutoencoderTiny's default config *is* TAESD's architecture (TAESD3 / TAEF1: the same with 16
    latent channels and their VAE's scale and shift); saved so PreviewDecoder loads it."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    flow = {} if vae_config is None or vae_config.latent_channels == 4 else dict(
        latent_channels=16, scaling_factor=vae_config.scaling_factor, shift_factor=vae_config.shift_factor)
    AutoencoderTiny(**flow).save_pretrained(folder)
    return str(folder)


def random_qwen_refiner(size, device, dtype, max_new_tokens, seed=0):
    """A refiners.Refiner: Qwen2.5-VL-3B's architecture with random weights (size full, previews
    resized to 448 px as Refiner.from_pretrained does for hub models) or the tiny test one."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if size == "tiny":
        processor = toy.tiny_qwen_processor(toy.TOY_WORDS)
        model = toy.tiny_qwen_model(processor, seed=seed)
        return refiners.Refiner(model.to(device, dtype), processor, max_new_tokens=max_new_tokens)
    processor = toy.tiny_qwen_processor(toy.TOY_WORDS, image_pixels=448 * 448)  # 16x16 merged vision tokens
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in toy.QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(QWEN25_VL_3B_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=QWEN25_VL_3B_VISION, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    return refiners.Refiner(model.eval(), processor, max_new_tokens=max_new_tokens, preview_size=448)


def toy_models(cfg, device, dtype):
    """The toy world's backbone (--backbone) and refiner where built (python build_toy_world.py), else the
    tiny random ones of the tests. Returns (backbone, refiner, which: a line saying which were used)."""
    if (Path(common.BACKBONES[cfg.backbone].source) / "model_index.json").is_file():
        backbone, which = common.load_backbone(cfg.backbone, device=device, dtype=dtype), [f"backbone {cfg.backbone}"]
    else:
        flow = cfg.backbone == "toy-sd3"
        pipe = toy.tiny_sd3_pipeline(toy.TOY_WORDS, seed=cfg.seed) if flow else toy.tiny_sd15_pipeline(toy.TOY_WORDS, image_size=32, seed=cfg.seed)
        pipe.to(device, dtype).set_progress_bar_config(disable=True)
        name = "tiny-sd3" if flow else "tiny-sd15"
        backbone = common.Backbone(pipe, name, common.BackboneSpec(f"tiny random {name}-shaped pipeline", 20, 4.0, 64 if flow else 32))
        which = [f"tiny random {name} backbone (toy world not built)"]
    if (Path(refiners.REFINERS["toy-refiner"]) / "config.json").is_file():
        refiner = refiners.load_refiner("toy-refiner", device=device, dtype=dtype, max_new_tokens=cfg.max_new_tokens)
        which.append("refiner toy-refiner")
    else:
        refiner = random_qwen_refiner("tiny", device, dtype, cfg.max_new_tokens, cfg.seed)
        which.append("tiny random refiner (toy refiner not built)")
    return backbone, refiner, ", ".join(which)


def make_preview_decoder(kind, backbone, folder):
    taesd = kind == "taesd" and backbone.spec.taesd is None
    source = random_taesd_folder(Path(folder) / f"taesd-{backbone.name}", backbone.pipe.vae.config) if taesd else None
    return promptloop.PreviewDecoder(kind, backbone, taesd_source=source)


# -----------------------------------------------------------------------------
# row 1: latent reward vs decode + pixel scorer


def lrm_vs_pixel_times(cfg, model, scorers, device, dtype):
    """Times of the LRM (1 draw, cfg.lrm_draws draws) and of the VAE decode + each pixel scorer on the
    same random latents, side by side; a pixel reward's time = the decode of that round + the scorer."""
    backbone = model.backbone
    decoder = promptloop.PreviewDecoder("vae", backbone)  # the full VAE decode a pixel reward needs
    latents = torch.randn((cfg.batch, *common.latent_shape(backbone)), generator=torch.Generator().manual_seed(cfg.seed)).to(device, dtype)
    prompts = [PROMPT] * cfg.batch
    images = {}

    def lrm_score(draws):
        # what the `lrm:` reward runs: text conditioning + `draws` noisy copies through the blocks that run
        return lambda: model.ensemble_score(latents, prompts, draws=draws, generator=torch.Generator().manual_seed(0))

    def decode():
        images["x"] = decoder(latents)

    variants = {"lrm": lrm_score(1), "decode": decode}
    if cfg.lrm_draws > 1:
        variants["lrm_ensemble"] = lrm_score(cfg.lrm_draws)
    variants |= {name: (lambda scorer=scorer: scorer(images["x"], prompts)) for name, scorer in scorers.items()}
    times = time_side_by_side(variants, cfg.repeats, cfg.warmup, device)
    pixel = {name: [d + s for d, s in zip(times["decode"], times[name])] for name in scorers}
    return times, pixel, f"batch {cfg.batch}, {backbone.spec.size} px, latents {tuple(latents.shape[1:])}, {cfg.size} size"


def row_lrm_vs_pixel(cfg, device, dtype, tmp):
    backbone = random_sd15(cfg.size, cfg.resolution, device, dtype, cfg.seed)
    model = lrm.LatentRewardModel(backbone, lrm.LRMConfig(backbone=backbone.name)).eval()
    scorers = {"aesthetic": random_aesthetic(cfg.size, Path(tmp) / "aesthetic", device, dtype, cfg.seed),
               "imagereward": random_imagereward(cfg.size, tmp, device, dtype, cfg.seed)}
    times, pixel, shape = lrm_vs_pixel_times(cfg, model, scorers, device, dtype)
    lrm_1, lrm_d = statistics.median(times["lrm"]), statistics.median(times["lrm_ensemble"])
    rows = []
    for row, name, label in (("1a", "aesthetic", "CLIP ViT-L/14 aesthetic"), ("1b", "imagereward", "ImageReward (BLIP ViT-L)")):
        ratio = statistics.median(pixel[name]) / lrm_1
        rows.append(ratio_row(row, f"reward per image: VAE decode + {label} vs LRM (1 draw)", (f"decode+{name}", pixel[name]),
                              ("lrm", times["lrm"]), ratio, ">= 8x", device, shape, ratio >= 8))
    ratio = statistics.median(pixel["imagereward"]) / lrm_d
    rows.append(ratio_row("1c", f"reward per image: VAE decode + ImageReward vs LRM noise ensemble ({cfg.lrm_draws} draws)",
                          ("decode+imagereward", pixel["imagereward"]), ("lrm_ensemble", times["lrm_ensemble"]), ratio, ">= 8x",
                          device, f"{shape}; the draws run one after another (LatentRewardModel.ensemble_score)", ratio >= 8))
    decode_over_unet = statistics.median(times["decode"]) / lrm_1
    rows[0]["notes"] += f"; VAE decode alone = {decode_over_unet:.1f}x the LRM"
    return rows


def row_flow_lrm_vs_pixel(cfg, device, dtype, tmp):
    """Row 8: DiNa-LRM's setting, the LRM on SD3.5-Medium's first 12 of its 24 MMDiT blocks (taps
    after 4, 8, 12) vs decode + ImageReward; one draw (DiNa-LRM scores at one fixed noise level)."""
    resolution = cfg.flow_resolution
    backbone = random_sd35m(cfg.size, resolution, device, dtype, cfg.seed, t5=False)
    model = lrm.LatentRewardModel(backbone, lrm.LRMConfig(backbone=backbone.name)).eval()
    blocks = len(backbone.denoiser.transformer_blocks)
    scorers = {"imagereward": random_imagereward(cfg.size, tmp, device, dtype, cfg.seed)}
    times, pixel, shape = lrm_vs_pixel_times(replace(cfg, lrm_draws=1), model, scorers, device, dtype)
    ratio = statistics.median(pixel["imagereward"]) / statistics.median(times["lrm"])
    decode_over_lrm = statistics.median(times["decode"]) / statistics.median(times["lrm"])
    return [ratio_row("8", f"reward per image, SD3.5-M: VAE decode + ImageReward vs LRM (first {model.taps[-1]} of {blocks} MMDiT blocks)",
                      ("decode+imagereward", pixel["imagereward"]), ("lrm", times["lrm"]), ratio, "report", device,
                      f"{shape}, {dtype}; taps after blocks {model.taps}; no T5 encoder (77 CLIP + 256 zero T5 tokens); "
                      f"VAE decode alone = {decode_over_lrm:.2f}x the LRM")]


# -----------------------------------------------------------------------------
# row 2: preview decoders


def row_preview_decoders(cfg, device, dtype, tmp):
    backbone = random_sd15(cfg.size, cfg.resolution, device, dtype, cfg.seed)
    decoders = {kind: make_preview_decoder(kind, backbone, tmp) for kind in promptloop.PreviewDecoder.KINDS}
    x0 = torch.randn((cfg.batch, *common.latent_shape(backbone)), generator=torch.Generator().manual_seed(cfg.seed)).to(device, dtype)
    decoders["linear"](x0)  # the linear map is fitted once, on the first preview (one VAE decode), before timing
    times = time_side_by_side({kind: (lambda d=d: d(x0)) for kind, d in decoders.items()}, cfg.repeats, cfg.warmup, device)
    notes = f"cost per refinement step; batch {cfg.batch}, latents {tuple(x0.shape[1:])}, {cfg.size} size; random TAESD (AutoencoderTiny default config)"
    return [
        ratio_row("2a", "preview per refinement step: VAE decode vs TAESD", ("vae", times["vae"]), ("taesd", times["taesd"]),
                  statistics.median(times["vae"]) / statistics.median(times["taesd"]), "report (~16x at 512 px)", device, notes),
        ratio_row("2b", "preview per refinement step: VAE decode vs linear latent->RGB", ("vae", times["vae"]),
                  ("linear", times["linear"]), statistics.median(times["vae"]) / statistics.median(times["linear"]), "report",
                  device, notes + "; linear previews are at latent resolution"),
    ]


# -----------------------------------------------------------------------------
# row 3: refined vs plain sampling


class TimedRefiner:
    """A Refiner whose refine() calls are timed and whose generated tokens are counted (for the notes)."""

    def __init__(self, refiner):
        self.refiner, self.seconds, self.tokens, self.answers = refiner, 0.0, 0, 0

    def refine(self, *args):
        start = time.perf_counter()
        out = self.refiner.refine(*args)  # returns CPU tensors: the device work is done
        self.seconds += time.perf_counter() - start
        self.tokens += int(out.completion_mask.sum())
        self.answers += len(out.prompts)
        return out


def overhead_times(cfg, backbone, refiners_by_label, decoder, num_steps, guidance, device, batch=None):
    """Plain vs refined sampling (one variant per refiner of {label: refiner}) of the same batch
    from the same initial latents, timed side by side.

    Returns (times, notes): times[label] and times["plain"]; notes[label] says how much of a
    refined run the refiner's calls took and how long its answers were."""
    batch = batch or cfg.batch
    prompts = [PROMPT] * batch
    latents = torch.randn((batch, *common.latent_shape(backbone)), generator=torch.Generator().manual_seed(cfg.seed))
    latents = latents.to(device, backbone.denoiser.dtype)
    timed = {label: TimedRefiner(refiner) for label, refiner in refiners_by_label.items()}

    def sample(refiner):
        torch.manual_seed(cfg.seed)  # the refiner's token sampling
        return promptloop.refined_sample(backbone, prompts, refiner, refine_steps=cfg.refine_steps,
                                     num_steps=num_steps, guidance=guidance, generator=torch.Generator().manual_seed(cfg.seed),
                                     latents=latents, preview_decoder=decoder)

    if decoder.kind == "linear":
        decoder(latents)  # the linear map is fitted on its first preview: before timing
    variants = {"plain": functools.partial(sample, None)}
    variants.update({label: functools.partial(sample, refiner) for label, refiner in timed.items()})
    times = time_side_by_side(variants, cfg.repeats, cfg.warmup, device)
    runs = cfg.repeats + cfg.warmup
    notes = {label: f"refiner calls {t.seconds / runs:.3f}s of a refined run, {t.tokens / max(1, t.answers):.0f} tokens per answer "
                    f"(max {t.refiner.max_new_tokens})" for label, t in timed.items()}
    return times, notes


def row_refined_overhead(cfg, device, dtype, tmp):
    rows = []
    toy_dtype = torch.float32 if device.type == "cpu" else dtype
    backbone, refiner, which = toy_models(cfg, device, toy_dtype)
    decoder = make_preview_decoder(cfg.preview_decoder, backbone, tmp)
    variants = {f"refined, fast {mode}": refiner_view(refiner, fast_decode=mode == "on") for mode in DECODE_MODES[cfg.fast_decode]}
    times, notes = overhead_times(cfg, backbone, variants, decoder, cfg.sampling_steps, backbone.spec.guidance, device)
    for label in variants:
        ratio = statistics.median(times[label]) / statistics.median(times["plain"])
        rows.append(ratio_row("3a", f"sampling, toy size: refined (K={cfg.refine_steps}, {label.split(', ')[1]} decode) vs plain",
                              ("plain", times["plain"]), (label, times[label]), ratio, "report (overhead; <= 1.3x is the full-size target)",
                              device, f"{which}; batch {cfg.batch}, {cfg.sampling_steps} steps, preview {cfg.preview_decoder}; {notes[label]}"))
    del backbone, refiner, decoder
    free_memory()
    compared = f"sampling, full size (SD1.5 + Qwen2.5-VL-3B): refined (K={cfg.refine_steps}) vs plain"
    if device.type != "cuda":
        rows.append(skipped_row("3b", compared, "<= 1.3x", device))
        rows.append(skipped_row("3c", "sampling, full size (SD3.5-M + Qwen2.5-VL-3B): refined vs plain", "<= 1.3x", device))
        return rows
    backbone = random_sd15(cfg.size, cfg.resolution, device, dtype, cfg.seed)
    refiner = random_qwen_refiner(cfg.size, device, dtype, cfg.max_new_tokens, cfg.seed)
    decoder = make_preview_decoder(cfg.preview_decoder, backbone, tmp)
    times, notes = overhead_times(cfg, backbone, {"refined": refiner}, decoder, 50, 7.5, device)
    notes = notes["refined"]
    ratio = statistics.median(times["refined"]) / statistics.median(times["plain"])
    rows.append(ratio_row("3b", compared, ("plain", times["plain"]), ("refined", times["refined"]), ratio, "<= 1.3x", device,
                          f"{cfg.size} size, {dtype}; batch {cfg.batch}, 50 steps, CFG 7.5, {backbone.spec.size} px, preview "
                          f"{cfg.preview_decoder}; {notes}; a random refiner never stops early (upper bound)", ratio <= 1.3))
    del backbone, decoder
    free_memory()
    rows.append(flow_overhead_row(cfg, refiner, device, dtype, tmp))
    return rows


def flow_overhead_row(cfg, refiner, device, dtype, tmp, resolution=1024):
    """Row 3c: refined vs plain on SD3.5-Medium (random weights, its model card's 40 steps, CFG 4.5)."""
    backbone = random_sd35m(cfg.size, resolution, device, dtype, cfg.seed)
    decoder = make_preview_decoder(cfg.preview_decoder, backbone, tmp)
    times, notes = overhead_times(cfg, backbone, {"refined": refiner}, decoder, 40, 4.5, device)
    notes = notes["refined"]
    ratio = statistics.median(times["refined"]) / statistics.median(times["plain"])
    return ratio_row("3c", f"sampling, full size (SD3.5-M + Qwen2.5-VL-3B): refined (K={cfg.refine_steps}) vs plain",
                     ("plain", times["plain"]), ("refined", times["refined"]), ratio, "<= 1.3x", device,
                     f"{cfg.size} size, {dtype}; batch {cfg.batch}, 40 steps, CFG 4.5, {backbone.spec.size} px, T5 256 tokens, "
                     f"preview {cfg.preview_decoder}; {notes}; a random refiner never stops early (upper bound)", ratio <= 1.3)


# -----------------------------------------------------------------------------
# row 4: GRPO rollouts batched vs one at a time


def row_grpo_batching(cfg, device, dtype, tmp):
    toy_dtype = torch.float32 if device.type == "cpu" else dtype
    backbone, refiner, which = toy_models(cfg, device, toy_dtype)
    decoder = make_preview_decoder(cfg.preview_decoder, backbone, tmp)
    b, g, k = cfg.prompts_per_step, cfg.group_size, 2
    words = ["circle", "square", "triangle"]
    rows = [f"a {words[i % 3]}" for i in range(b) for _ in range(g)]  # (B*G,) group members adjacent
    # a group shares its initial noise (common random numbers), as train_refiner.py rolls out
    latents = torch.randn((b, *common.latent_shape(backbone)), generator=torch.Generator().manual_seed(cfg.seed))
    latents = latents.repeat_interleave(g, 0).to(device, toy_dtype)
    if decoder.kind == "linear":
        decoder(latents)  # the linear map is fitted on its first preview: before timing

    def rollout(indices, policy=refiner):
        torch.manual_seed(cfg.seed)
        return promptloop.refined_sample(backbone, [rows[i] for i in indices], policy, refine_steps=k, num_steps=cfg.sampling_steps,
                                     generator=torch.Generator().manual_seed(cfg.seed), latents=latents[indices],
                                     preview_decoder=decoder)

    everything = list(range(b * g))
    times = time_side_by_side({
        "one_at_a_time": lambda: [rollout([i]) for i in everything], "batched": lambda: rollout(everything),
        # the same without the refiner: how well the backbone alone batches on this device (the ceiling)
        "plain_one_at_a_time": lambda: [rollout([i], None) for i in everything], "plain_batched": lambda: rollout(everything, None),
    }, cfg.repeats, cfg.warmup, device)
    median = {label: statistics.median(t) for label, t in times.items()}
    ratio = median["one_at_a_time"] / median["batched"]
    plain = median["plain_one_at_a_time"] / median["plain_batched"]
    target = 0.7 * g
    return [ratio_row("4", f"GRPO rollouts, B={b} G={g}: one trajectory at a time vs all B*G in one refined_sample call",
                      ("one_at_a_time", times["one_at_a_time"]), ("batched", times["batched"]), ratio, f">= {target:.1f}x (0.7 G)",
                      device, f"{which}; K={k}, {cfg.sampling_steps} steps, preview {cfg.preview_decoder}; throughput ratio; "
                      f"plain sampling (no refiner) batches {plain:.2f}x on this device", ratio >= target)]


# -----------------------------------------------------------------------------
# row 5: LRM training from cached latents vs encoding every step


def lrm_train_step(model, optimizer, latents_0, latents_1, captions, targets, generator):
    """One train_reward.py step: both images of a pair noised with the same (t, eps), rewards in one
    forward, noise-calibrated Thurstone NLL, AdamW on the trainable weights."""
    t = torch.randint(0, model.num_timesteps, (len(latents_0),), generator=generator)
    noise = torch.randn(latents_0.shape, generator=generator).to(latents_0.device, latents_0.dtype)
    r_0, r_1 = lrm.pair_rewards(model, latents_0, latents_1, noise, t.to(latents_0.device), captions)
    loss = lrm.preference_loss("thurstone-nll", r_0, r_1, model.variance(t.to(r_0.device)), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def row_lrm_cached_latents(cfg, device, dtype, tmp):
    backbone = random_sd15(cfg.size, cfg.resolution, device, dtype, cfg.seed)
    model = lrm.LatentRewardModel(backbone, lrm.LRMConfig(backbone=backbone.name)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    side = backbone.spec.size
    generator = torch.Generator().manual_seed(cfg.seed)
    # uint8 pixels, as train_reward.py holds the decoded pairs in memory
    pixels = torch.randint(0, 256, (2 * cfg.batch, 3, side, side), dtype=torch.uint8, generator=generator)
    vae = backbone.pipe.vae
    cache = lrm.encode_latents(vae, pixels)  # (2B, C, h, w): the cache, encoded once
    captions, targets = [PROMPT] * cfg.batch, torch.ones(cfg.batch, device=device)

    def step(latents):
        latents = latents.to(device, dtype)
        return lrm_train_step(model, optimizer, latents[: cfg.batch], latents[cfg.batch:], captions, targets, generator)

    times = time_side_by_side({
        "encode_each_step": lambda: step(lrm.encode_latents(vae, pixels)),
        "cached_latents": lambda: step(cache[torch.arange(2 * cfg.batch)]),
    }, cfg.repeats, cfg.warmup, device)
    return [ratio_row("5", "LRM training step: encode the pair with the VAE every step vs cached latents",
                      ("encode_each_step", times["encode_each_step"]), ("cached_latents", times["cached_latents"]),
                      statistics.median(times["encode_each_step"]) / statistics.median(times["cached_latents"]), "report", device,
                      f"batch {cfg.batch} pair(s), {side} px, {cfg.size} size; frozen UNet (down+mid), head trained")]


# -----------------------------------------------------------------------------
# row 6: peak GPU memory of the training steps


def peak_memory(fn, device):
    """Peak allocated GPU memory (GiB) while fn() runs, weights already resident included."""
    free_memory()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def refiner_train_step(refiner, params, optimizer, outputs):
    """The memory-relevant part of a train_refiner.py update: teacher-forced log-probs of every
    refinement action of a minibatch, one backward per action (as train_refiner.py does), AdamW on
    the LoRA weights. A policy-gradient surrogate stands in for the clipped GRPO loss (same graph)."""
    refiner.model.train()
    optimizer.zero_grad(set_to_none=True)
    for out in outputs:
        logprobs = refiner.token_logprobs(out.inputs, out.completion_ids, out.completion_mask)
        advantages = torch.linspace(-1, 1, len(logprobs), device=logprobs.device).unsqueeze(1)
        loss = -(logprobs.float() * advantages).sum() / out.completion_mask.sum().clamp(min=1)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    refiner.model.eval()


def refiner_rollout_outputs(refiner, batch, refine_steps):
    """K RefinerOutputs of a minibatch of `batch` trajectories (random 512 px previews)."""
    previews = torch.rand((batch, 3, 512, 512), generator=torch.Generator().manual_seed(0))
    return [refiner.refine(previews, [PROMPT] * batch, [PROMPT] * batch, s, 50) for s in range(1, refine_steps + 1)]


def row_peak_memory(cfg, device, dtype, tmp):
    compared = ("train_refiner step (Qwen2.5-VL-3B + LoRA r16): gradient checkpointing off vs on",
                "train_reward step (SD1.5 LRM, LoRA r8 on down/mid attention): gradient checkpointing off vs on",
                "train_reward step (SD1.5 LRM): LoRA r8 (checkpointing off) vs frozen UNet")
    if device.type != "cuda":
        return [skipped_row(f"6{c}", text, "report", device) for c, text in zip("abc", compared)]
    rows = []
    # train_refiner: a minibatch of memory_batch trajectories x K=2 actions of <= 64 tokens
    refiner = random_qwen_refiner(cfg.size, device, dtype, 64, cfg.seed)
    params = refiners.add_lora(refiner, rank=16, alpha=32)  # as train_refiner.py's defaults
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    outputs = refiner_rollout_outputs(refiner, cfg.memory_batch, 2)
    step = functools.partial(refiner_train_step, refiner, params, optimizer, outputs)  # binds the objects, not the names deleted below
    off = peak_memory(step, device)
    refiner.model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    on = peak_memory(step, device)
    rows.append(memory_row("6a", compared[0], ("checkpointing off", off), ("checkpointing on", on), device,
                           f"{cfg.size} size, {dtype}; {cfg.memory_batch} trajectories x K=2 actions x 64 tokens, 448 px previews"))
    del refiner, params, optimizer, outputs, step
    free_memory()
    # train_reward: memory_batch pairs at the backbone's size
    peaks = {}
    for name, rank, checkpointing in (("frozen", 0, False), ("lora", 8, False), ("lora+checkpointing", 8, True)):
        backbone = random_sd15(cfg.size, cfg.resolution, device, dtype, cfg.seed)
        model = lrm.LatentRewardModel(backbone, lrm.LRMConfig(backbone=backbone.name, lora_rank=rank)).train()
        if checkpointing:
            backbone.pipe.unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        latents = torch.randn((2 * cfg.memory_batch, *common.latent_shape(backbone)), device=device, dtype=dtype)
        captions, targets = [PROMPT] * cfg.memory_batch, torch.ones(cfg.memory_batch, device=device)
        generator = torch.Generator().manual_seed(cfg.seed)
        peaks[name] = peak_memory(functools.partial(lrm_train_step, model, optimizer, latents[: cfg.memory_batch],
                                                    latents[cfg.memory_batch:], captions, targets, generator), device)
        del backbone, model, optimizer, latents
        free_memory()
    notes = f"{cfg.size} size, {dtype}; {cfg.memory_batch} pairs at {cfg.resolution if cfg.size == 'full' else 64} px"
    rows.append(memory_row("6b", compared[1], ("checkpointing off", peaks["lora"]), ("checkpointing on", peaks["lora+checkpointing"]), device, notes))
    rows.append(memory_row("6c", compared[2], ("lora r8", peaks["lora"]), ("frozen", peaks["frozen"]), device, notes))
    return rows


# -----------------------------------------------------------------------------
# row 7: the flow-matching transformers at full size (their released diffusers / transformers configs)

SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35L_TRANSFORMER = dict(SD35M_TRANSFORMER, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                         pos_embed_max_size=192, dual_attention_layers=())
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                            axes_dims_rope=(16, 56, 56))
CLIP_G_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL_ENCODER = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False)
FLOW_VAE = dict(SD15_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


def parameter_count(build):
    """Parameters of the module `build()` returns, built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def row_flow_parameters(cfg, device, dtype, tmp):
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    clip_l = parameter_count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SD15_TEXT)))
    clip_l_plain = parameter_count(lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT)))  # FLUX: no projection
    clip_g = parameter_count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT)))
    t5 = parameter_count(lambda: T5EncoderModel(T5Config(**T5_XXL_ENCODER)))
    vae = parameter_count(lambda: AutoencoderKL(**FLOW_VAE))
    qwen = parameter_count(lambda: random_qwen_refiner_model_meta())
    models = {
        "7a": ("SD3.5-Medium (sd35m)", {"transformer": parameter_count(lambda: SD3Transformer2DModel(**SD35M_TRANSFORMER)),
                                        "clip_l": clip_l, "clip_g": clip_g, "t5_xxl": t5, "vae": vae}),
        "7b": ("SD3.5-Large (sd35l)", {"transformer": parameter_count(lambda: SD3Transformer2DModel(**SD35L_TRANSFORMER)),
                                       "clip_l": clip_l, "clip_g": clip_g, "t5_xxl": t5, "vae": vae}),
        "7c": ("FLUX.1-dev / -schnell (flux-dev, flux-schnell)", {
            "transformer": parameter_count(lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)), "clip_l": clip_l_plain,
            "t5_xxl": t5, "vae": vae}),
    }
    rows = []
    for row, (name, counts) in models.items():
        total = sum(counts.values())
        parts = ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in counts.items())
        notes = (f"{parts}; bf16 weights {2 * total / 2**30:.1f} GiB, without T5 {2 * (total - counts['t5_xxl']) / 2**30:.1f} GiB; "
                 f"+ the refiner Qwen2.5-VL-3B {qwen / 1e9:.2f} B = {2 * qwen / 2**30:.1f} GiB")
        rows.append(dict(row=row, compared=f"{name}: parameters, transformer / all components", params=counts, total_params=total,
                         baseline=None, candidate=None, ratio=None, target="report", meets_target=None, device="meta", notes=notes))
    return rows


def random_qwen_refiner_model_meta():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=QWEN25_VL_3B_TEXT, vision_config=QWEN25_VL_3B_VISION))


def memory_row(row, compared, baseline, candidate, device, notes):
    """Peak GiB of two variants; ratio = baseline / candidate (> 1: the candidate saves memory)."""
    return dict(row=row, compared=compared, baseline=dict(label=baseline[0], peak_gib=round(baseline[1], 3)),
                candidate=dict(label=candidate[0], peak_gib=round(candidate[1], 3)), ratio=baseline[1] / candidate[1],
                target="report", meets_target=None, device=device_name(device), notes=notes)


# -----------------------------------------------------------------------------
# rows 9-11: the refiner at the paper's cost -- refined vs plain over batch x answer length x
# decode path (SD1.5 512 px, SDXL 1024 px), the refiner's prefill and ms per token, and the
# memory of a GRPO rollout's refiner call (the lean loop vs generate keeping every step's logits)

# stable-diffusion-xl-base-1.0: unet/config.json (2.57 B), vae (SD1.5's layout), CLIP-L + OpenCLIP bigG text towers
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025)


def random_sdxl(size, resolution, device, dtype, seed=0):
    """A common.Backbone: SDXL-base's architecture with random weights (size full) or the tiny test one."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if size == "tiny":
        pipe, resolution = toy.tiny_sdxl_pipeline(toy.TOY_WORDS, image_size=64, seed=seed), 64
    else:
        tokenizer = toy.tiny_clip_tokenizer(toy.TOY_WORDS)
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(seed)
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SDXL_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT, **ids)).eval(),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT, **ids)).eval(), tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=UNet2DConditionModel(**SDXL_UNET), scheduler=sd15_scheduler(),
        )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    spec = common.BackboneSpec(source=f"random {size} SDXL architecture", steps=50, guidance=5.0, size=resolution)
    return common.Backbone(pipe, f"sdxl-random-{size}", spec)


FULL_BACKBONES = {"sd15": ("SD1.5", random_sd15, 512), "sdxl": ("SDXL", random_sdxl, 1024)}
DECODE_MODES = {"both": ("off", "on"), "off": ("off",), "on": ("on",)}
GPU_COMMAND = "python bench.py --rows 9,10,11 --device cuda"


def refiner_view(refiner, **changes):
    """Another Refiner over the same model and processor (answer length, decode path, preview size)."""
    settings = dict(temperature=refiner.temperature, max_new_tokens=refiner.max_new_tokens, do_sample=refiner.do_sample,
                    preview_size=refiner.preview_size, fast_decode=refiner.fast_decode, min_new_tokens=refiner.min_new_tokens)
    return refiners.Refiner(refiner.model, refiner.processor, **{**settings, **changes})


def grid_target(backbone, batch, tokens):
    """The issue's GPU targets for refined / plain: 32-token answers; SD1.5 batch 8 and 1, SDXL any batch."""
    if tokens != 32:
        return None
    if backbone == "sdxl":
        return 1.15
    return {8: 1.3, 1: 1.5}.get(batch)


def row_refined_grid(cfg, device, dtype, tmp):
    """Row 9: refined (K refinements, answers forced to each length) vs plain, per backbone and batch."""
    backbones, batches = common.parse_list(cfg.full_backbones, "--full-backbones", FULL_BACKBONES), common.parse_ints(cfg.batches, "--batches", minimum=1)
    lengths, modes = common.parse_ints(cfg.answer_lengths, "--answer-lengths", minimum=1), DECODE_MODES[cfg.fast_decode]
    if device.type != "cuda" and cfg.size == "full":
        return [skipped_row("9", "sampling, full size (SD1.5 512 px, SDXL 1024 px) + Qwen2.5-VL-3B: refined vs plain over batch x "
                            "answer length x decode path", "<= 1.3x / 1.5x / 1.15x", device, f"needs a GPU (CUDA): {GPU_COMMAND}")]
    refiner = random_qwen_refiner(cfg.size, device, dtype, max(lengths), cfg.seed)
    rows = []
    for key in backbones:
        name, build, resolution = FULL_BACKBONES[key]
        backbone = build(cfg.size, resolution, device, dtype, cfg.seed)
        decoder = make_preview_decoder(cfg.preview_decoder, backbone, tmp)
        steps, guidance = backbone.spec.steps, backbone.spec.guidance
        for batch in batches:
            variants = {f"{n} tokens, fast {mode}": refiner_view(refiner, max_new_tokens=n, min_new_tokens=n, fast_decode=mode == "on")
                        for n in lengths for mode in modes}
            times, notes = overhead_times(cfg, backbone, variants, decoder, steps, guidance, device, batch=batch)
            for label in variants:
                ratio = statistics.median(times[label]) / statistics.median(times["plain"])
                target = grid_target(key, batch, int(label.split()[0]))
                rows.append(ratio_row(
                    "9", f"{name} {backbone.spec.size} px, batch {batch}: refined (K={cfg.refine_steps}, {label}) vs plain",
                    ("plain", times["plain"]), (label, times[label]), ratio, f"<= {target}x" if target else "report", device,
                    f"{cfg.size} size, {dtype}; {steps} steps, CFG {guidance}, preview {cfg.preview_decoder}, refiner previews "
                    f"{refiner.preview_size} px; {notes[label]}", None if target is None else ratio <= target))
        del backbone, decoder
        free_memory()
    return rows


def row_refiner_decoding(cfg, device, dtype, tmp):
    """Row 10: the refiner's prefill per call at each preview size, and its ms per generated token
    on the default loop vs the fast path. A call that generates 1 token is the prefill (+ one
    sampling step); (time of 1 + N tokens - time of 1) / N is the decode time per token."""
    batches, sizes, n = common.parse_ints(cfg.batches, "--batches", minimum=1), common.parse_ints(cfg.preview_sizes, "--preview-sizes", minimum=28), cfg.decode_tokens
    modes = DECODE_MODES[cfg.fast_decode]
    refiner = random_qwen_refiner(cfg.size, device, dtype, n + 1, cfg.seed)
    image_pad = refiner.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows = []
    for batch in batches:
        previews = torch.rand((batch, 3, 512, 512), generator=torch.Generator().manual_seed(cfg.seed))
        inputs = {size: refiner_view(refiner, preview_size=size)._inputs(previews, [PROMPT] * batch, [PROMPT] * batch, 10, 50)
                  for size in sizes}
        views = {mode: refiner_view(refiner, fast_decode=mode == "on") for mode in modes}
        variants = {}
        for mode in modes:  # decode timed at the first preview size
            variants[f"{mode} 1"] = functools.partial(views[mode].generate, inputs[sizes[0]], 1, 1)
            variants[f"{mode} {1 + n}"] = functools.partial(views[mode].generate, inputs[sizes[0]], 1 + n, 1 + n)
        variants.update({f"prefill {size} px": functools.partial(views[modes[0]].generate, inputs[size], 1, 1) for size in sizes[1:]})
        times = time_side_by_side(variants, cfg.repeats, cfg.warmup, device)
        times[f"prefill {sizes[0]} px"] = times[f"{modes[0]} 1"]  # the same call
        tokens = {size: f"{int((inputs[size]['input_ids'][0] == image_pad).sum())} vision of {inputs[size]['input_ids'].shape[1]} tokens"
                  for size in sizes}
        common_notes = f"{cfg.size} size, {dtype}; batch {batch}; decode path {modes[0]} for the prefill"
        for size in sizes[1:]:
            base, cand = times[f"prefill {sizes[0]} px"], times[f"prefill {size} px"]
            rows.append(ratio_row("10a", f"refiner prefill per call, batch {batch}: preview {sizes[0]} px vs {size} px",
                                  (f"{sizes[0]} px", base), (f"{size} px", cand), statistics.median(base) / statistics.median(cand),
                                  "report", device, f"{common_notes}; {sizes[0]} px: {tokens[sizes[0]]}, {size} px: {tokens[size]}"))
        per_token = {mode: [(long - short) / n for long, short in zip(times[f"{mode} {1 + n}"], times[f"{mode} 1"])] for mode in modes}
        if len(modes) == 2:
            ratio = statistics.median(per_token["off"]) / statistics.median(per_token["on"])
            rows.append(ratio_row("10b", f"refiner s per generated token, batch {batch}: default loop (dynamic cache) vs fast "
                                  "(static cache, compiled)", ("default", per_token["off"]), ("fast", per_token["on"]), ratio, "report",
                                  device, f"{cfg.size} size, {dtype}; preview {sizes[0]} px ({tokens[sizes[0]]}); (t(1+{n}) - t(1)) / {n} "
                                  "tokens per repeat; the compile happens in the warm-up"))
    return rows


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


def peak_rss_gib(fn, interval=0.001):
    """Peak resident memory (GiB) of this process while fn() runs, sampled every `interval` s (CPU)."""
    import os
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    peak, done = [rss()], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(interval)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], rss()) / 2**30


def row_rollout_memory(cfg, device, dtype, tmp):
    """Row 11: the peak memory of one refiner call of a GRPO rollout (B*G rows, answers forced to
    --rollout-tokens): generate keeping every step's logits (the old way) vs the lean loop."""
    rows, tokens = cfg.rollout_rows, cfg.rollout_tokens
    refiner = refiner_view(random_qwen_refiner(cfg.size, device, dtype, tokens, cfg.seed), preview_size=cfg.rollout_preview or None)
    previews = torch.rand((rows, 3, 512, 512), generator=torch.Generator().manual_seed(cfg.seed))
    inputs = refiner._inputs(previews, [PROMPT] * rows, [PROMPT] * rows, 10, 50)
    measure = functools.partial(peak_memory, device=device) if device.type == "cuda" else peak_rss_gib
    free_memory()
    resident = peak_rss_gib(lambda: None) if device.type != "cuda" else torch.cuda.memory_allocated(device) / 2**30
    peaks = {"kept": measure(functools.partial(generate_keeping_logits, refiner, inputs, tokens, tokens)),
             "lean": measure(functools.partial(refiner.generate, inputs, tokens, tokens))}
    vocab = refiner.model.config.get_text_config().vocab_size
    logits_gib = rows * tokens * vocab * 4 / 2**30
    what = "peak RSS of the process" if device.type != "cuda" else "peak allocated GPU memory"
    return [memory_row("11", f"GRPO rollout refiner call, {rows} rows x {tokens} tokens: generate keeping the logits vs the lean loop",
                       ("generate + logits", peaks["kept"]), ("lean loop", peaks["lean"]), device,
                       f"{cfg.size} size, {dtype}; {what}, weights included ({resident:.2f} GiB before the calls); one (rows, tokens, "
                       f"vocab {vocab}) fp32 tensor = {logits_gib:.2f} GiB; preview {refiner.preview_size} px; decode path "
                       f"{'fast' if refiner.fast_decoding else 'default'} for the lean loop")]


# -----------------------------------------------------------------------------
# main: run the rows, print the table, write the JSON

ROW_FUNCTIONS = {"1": row_lrm_vs_pixel, "2": row_preview_decoders, "3": row_refined_overhead, "4": row_grpo_batching,
                 "5": row_lrm_cached_latents, "6": row_peak_memory, "7": row_flow_parameters, "8": row_flow_lrm_vs_pixel,
                 "9": row_refined_grid, "10": row_refiner_decoding, "11": row_rollout_memory}


def format_row(row):
    if row.get("skipped"):
        return f"{row['row']:<3} {row['compared'][:78]:<78} {'skipped: ' + row['skipped']:>36}  {row['device']}"
    if "params" in row:
        numbers = f"{row['params']['transformer'] / 1e9:.2f} B / {row['total_params'] / 1e9:.2f} B"
        return f"{row['row']:<3} {row['compared'][:78]:<78} {numbers:>24} {'-':>8} {row['target']:>20} {'':<6} {row['device']}"
    base, cand = row["baseline"], row["candidate"]
    if "peak_gib" in base:
        numbers = f"{base['peak_gib']:.2f} / {cand['peak_gib']:.2f} GiB"
    else:
        numbers = f"{base['median_s']:.3f}s / {cand['median_s']:.3f}s"
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x" if row["ratio"] < 1000 else f"{row['ratio']:.2e}x"
    verdict = {True: "ok", False: "MISSED", None: ""}[row["meets_target"]]
    return f"{row['row']:<3} {row['compared'][:78]:<78} {numbers:>24} {ratio:>8} {row['target'][:20]:>20} {verdict:<6} {row['device']}"


def main():
    cfg = parse_config()
    rows = check_config(cfg)
    device, dtype = common.setup_run(cfg)
    torch.set_flush_denormal(True)  # random weights must not hit the slow denormal path on CPU
    runs.seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench: rows {','.join(rows)} | size {cfg.size} | repeats {cfg.repeats} after {cfg.warmup} warm-up | {device_name(device)}, {dtype}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for number in rows:
            start = time.perf_counter()
            new = ROW_FUNCTIONS[number](cfg, device, dtype, tmp)
            free_memory()
            for row in new:
                print(format_row(row), flush=True)
            print(f"    (row {number} took {time.perf_counter() - start:.0f}s)", flush=True)
            results.extend(new)
    metrics = dict(config=asdict(cfg), device=device_name(device), dtype=str(dtype), torch=torch.__version__, rows=results)
    tmp_path = out / "metrics.json.tmp"
    tmp_path.write_text(json.dumps(metrics, indent=2))
    tmp_path.replace(out / "metrics.json")
    print(f"wrote {out / 'metrics.json'}")


if __name__ == "__main__":
    common.run_cli(main)
