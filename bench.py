"""
bench.py: the performance ratios that justify the design, measured side by side in one run.

    python bench.py                                # every row at full size (SD1.5-sized random weights)
    python bench.py --rows 1,2,5 --threads 1       # the full-size CPU rows (~17 min on one busy core)
    python bench.py --rows 3,4 --repeats 5         # the toy-size sampling rows, more repeats
    python bench.py --rows 3,4 --backbone toy-sd3  # the same on the flow-matching toy backbone
    python bench.py --quick                        # tiny architectures, seconds: a smoke test
    python bench.py --device cuda                  # with a GPU the full-size GPU rows (3b, 3c, 6, 9, 12) run too (bf16)

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
  9  refined vs plain at the paper's cost (SD1.5 512 px, SDXL 1024 px + Qwen2.5-VL-3B) over batch x
     answer length x decode path (full size: GPU only)
  10 the refiner's prefill per preview size and with / without the prefix cache, and its time per
     generated token, plain loop vs fast path
  11 the peak memory of a GRPO rollout's refiner call: generate keeping every step's logits vs the lean loop
  12 one refinement part by part (preview decode, processor, prefill, decode, prompt re-encoding) next to
     one denoiser step, per batch: what each lever of the refined-sampling overhead could save

Results go to the terminal (a table) and to OUT/metrics.json. Only ratios are meant to be quoted:
the absolute times of a shared machine are noise, but variants timed in turn, round after round,
see the same load.

Simplifications on purpose: the full-size models are *random-weight* architectures built from
their configs (architectures.py): speed and memory depend on the architecture, not on the weights,
and nothing is downloaded. Their tokenizers are the tiny byte-level ones of toy.py: CLIP pads every
prompt to 77 tokens anyway; the refiner's chat prompt comes out longer than with Qwen's own BPE, and
a random refiner never ends its answer early, so the full-size refined-sampling overhead is an upper bound.
"""

import functools
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import architectures
import common
import lrm
import overlap
import promptloop
import refiners
import runs
import toy

# -----------------------------------------------------------------------------
# config

ROWS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12")
FULL_BACKBONES = {"sd15": ("SD1.5", architectures.random_sd15, 512), "sdxl": ("SDXL", architectures.random_sdxl, 1024)}
DECODE_MODES = {"both": ("off", "on"), "off": ("off",), "on": ("on",)}  # --fast-decode: the refiner's decode paths to time
GPU_COMMAND = "python bench.py --rows 9,10,11 --device cuda"


@dataclass
class Config(common.RunFlags):
    rows: str = field(default="1,2,3,4,5,6,7,8,9,10,11,12", metadata={"help": "comma-separated rows to run (see the module docstring): 1..12"})
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
    overlaps: str = field(default="0", metadata={"help": "rows 3a, 9: --overlap D values to time (each refinement runs beside the next D denoiser steps)"})
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
    for flag, minimum in (("batches", 1), ("answer_lengths", 1), ("preview_sizes", 28), ("overlaps", 0)):
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
# measuring: variants timed in turn, round after round, median per variant; peak memory

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


def peak_memory(fn, device, interval=0.001):
    """Peak memory (GiB) while fn() runs, weights already resident included: the allocated GPU
    memory on a GPU, else the resident memory of this process, sampled every `interval` s."""
    free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**30
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


def median_ratio(baseline, candidate):
    return statistics.median(baseline) / statistics.median(candidate)


def summary(times):
    return dict(median_s=statistics.median(times), times_s=[round(t, 4) for t in times])


def ratio_row(row, compared, baseline, candidate, ratio, target, device, notes="", target_ok=None):
    """One table row: two measured variants (label, times) and their ratio (> 1 = the design wins,
    except overhead rows, where the target says which way)."""
    return dict(row=row, compared=compared, baseline=dict(label=baseline[0], **summary(baseline[1])),
                candidate=dict(label=candidate[0], **summary(candidate[1])), ratio=ratio, target=target,
                meets_target=target_ok, device=device_name(device), notes=notes)


def memory_row(row, compared, baseline, candidate, device, notes):
    """Peak GiB of two variants; ratio = baseline / candidate (> 1: the candidate saves memory)."""
    return dict(row=row, compared=compared, baseline=dict(label=baseline[0], peak_gib=round(baseline[1], 3)),
                candidate=dict(label=candidate[0], peak_gib=round(candidate[1], 3)), ratio=baseline[1] / candidate[1],
                target="report", meets_target=None, device=device_name(device), notes=notes)


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
# what the rows share: the toy models, preview decoders, random latents, the LRM


def toy_models(cfg, device, dtype):
    """The toy world's backbone (--backbone) and refiner where built (python build_toy_world.py), else the
    tiny random ones of the tests; float32 on a CPU. Returns (backbone, refiner, which: a line saying which were used)."""
    dtype = torch.float32 if device.type == "cpu" else dtype
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
        refiner = architectures.random_qwen_refiner("tiny", device, dtype, cfg.max_new_tokens, cfg.seed)
        which.append("tiny random refiner (toy refiner not built)")
    return backbone, refiner, ", ".join(which)


def make_preview_decoder(kind, backbone, folder):
    taesd = kind == "taesd" and backbone.spec.taesd is None
    source = architectures.random_taesd_folder(Path(folder) / f"taesd-{backbone.name}", backbone.pipe.vae.config) if taesd else None
    return promptloop.PreviewDecoder(kind, backbone, taesd_source=source)


def random_latents(backbone, rows, seed):
    """(rows, C, h, w) standard normal latents of the backbone, on its device and in its dtype."""
    latents = torch.randn((rows, *common.latent_shape(backbone)), generator=torch.Generator().manual_seed(seed))
    return latents.to(backbone.device, backbone.denoiser.dtype)


def latent_reward_model(backbone, **config):
    return lrm.LatentRewardModel(backbone, lrm.LRMConfig(backbone=backbone.name, **config))


# -----------------------------------------------------------------------------
# rows 1 and 8: latent reward vs decode + pixel scorer


def lrm_vs_pixel_times(cfg, model, scorers, device):
    """Times of the LRM (1 draw, cfg.lrm_draws draws) and of the VAE decode + each pixel scorer on the
    same random latents, side by side; a pixel reward's time = the decode of that round + the scorer."""
    backbone = model.backbone
    decoder = promptloop.PreviewDecoder("vae", backbone)  # the full VAE decode a pixel reward needs
    latents = random_latents(backbone, cfg.batch, cfg.seed)
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
    backbone = architectures.random_sd15(cfg.size, cfg.resolution, device, dtype, cfg.seed)
    model = latent_reward_model(backbone).eval()
    scorers = {"aesthetic": architectures.random_aesthetic(cfg.size, Path(tmp) / "aesthetic", device, dtype, cfg.seed),
               "imagereward": architectures.random_imagereward(cfg.size, tmp, device, dtype, cfg.seed)}
    times, pixel, shape = lrm_vs_pixel_times(cfg, model, scorers, device)
    rows = []
    for row, name, label in (("1a", "aesthetic", "CLIP ViT-L/14 aesthetic"), ("1b", "imagereward", "ImageReward (BLIP ViT-L)")):
        ratio = median_ratio(pixel[name], times["lrm"])
        rows.append(ratio_row(row, f"reward per image: VAE decode + {label} vs LRM (1 draw)", (f"decode+{name}", pixel[name]),
                              ("lrm", times["lrm"]), ratio, ">= 8x", device, shape, ratio >= 8))
    ratio = median_ratio(pixel["imagereward"], times["lrm_ensemble"])
    rows.append(ratio_row("1c", f"reward per image: VAE decode + ImageReward vs LRM noise ensemble ({cfg.lrm_draws} draws)",
                          ("decode+imagereward", pixel["imagereward"]), ("lrm_ensemble", times["lrm_ensemble"]), ratio, ">= 8x",
                          device, f"{shape}; the draws run one after another (LatentRewardModel.ensemble_score)", ratio >= 8))
    rows[0]["notes"] += f"; VAE decode alone = {median_ratio(times['decode'], times['lrm']):.1f}x the LRM"
    return rows


def row_flow_lrm_vs_pixel(cfg, device, dtype, tmp):
    """Row 8: DiNa-LRM's setting, the LRM on SD3.5-Medium's first 12 of its 24 MMDiT blocks (taps
    after 4, 8, 12) vs decode + ImageReward; one draw (DiNa-LRM scores at one fixed noise level)."""
    backbone = architectures.random_sd35m(cfg.size, cfg.flow_resolution, device, dtype, cfg.seed, t5=False)
    model = latent_reward_model(backbone).eval()
    blocks = len(backbone.denoiser.transformer_blocks)
    scorers = {"imagereward": architectures.random_imagereward(cfg.size, tmp, device, dtype, cfg.seed)}
    times, pixel, shape = lrm_vs_pixel_times(replace(cfg, lrm_draws=1), model, scorers, device)
    ratio, decode_over_lrm = median_ratio(pixel["imagereward"], times["lrm"]), median_ratio(times["decode"], times["lrm"])
    return [ratio_row("8", f"reward per image, SD3.5-M: VAE decode + ImageReward vs LRM (first {model.taps[-1]} of {blocks} MMDiT blocks)",
                      ("decode+imagereward", pixel["imagereward"]), ("lrm", times["lrm"]), ratio, "report", device,
                      f"{shape}, {dtype}; taps after blocks {model.taps}; no T5 encoder (77 CLIP + 256 zero T5 tokens); "
                      f"VAE decode alone = {decode_over_lrm:.2f}x the LRM")]


# -----------------------------------------------------------------------------
# row 2: preview decoders


def row_preview_decoders(cfg, device, dtype, tmp):
    backbone = architectures.random_sd15(cfg.size, cfg.resolution, device, dtype, cfg.seed)
    decoders = {kind: make_preview_decoder(kind, backbone, tmp) for kind in promptloop.PreviewDecoder.KINDS}
    x0 = random_latents(backbone, cfg.batch, cfg.seed)
    decoders["linear"](x0)  # the linear map is fitted once, on the first preview (one VAE decode), before timing
    times = time_side_by_side({kind: (lambda d=d: d(x0)) for kind, d in decoders.items()}, cfg.repeats, cfg.warmup, device)
    notes = f"cost per refinement step; batch {cfg.batch}, latents {tuple(x0.shape[1:])}, {cfg.size} size; random TAESD (AutoencoderTiny default config)"
    return [
        ratio_row("2a", "preview per refinement step: VAE decode vs TAESD", ("vae", times["vae"]), ("taesd", times["taesd"]),
                  median_ratio(times["vae"], times["taesd"]), "report (~16x at 512 px)", device, notes),
        ratio_row("2b", "preview per refinement step: VAE decode vs linear latent->RGB", ("vae", times["vae"]),
                  ("linear", times["linear"]), median_ratio(times["vae"], times["linear"]), "report",
                  device, notes + "; linear previews are at latent resolution"),
    ]


# -----------------------------------------------------------------------------
# rows 3 and 9: refined vs plain sampling


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


def overhead_times(cfg, backbone, refiners_by_label, decoder, num_steps, guidance, device, batch=None, delays=None):
    """Plain vs refined sampling (one variant per refiner of {label: refiner}) of the same batch
    from the same initial latents, timed side by side; delays[label]: the variant's --overlap D (0).

    Returns (times, notes): times[label] and times["plain"]; notes[label] says how much of a
    refined run the refiner's calls took and how long its answers were."""
    batch = batch or cfg.batch
    prompts = [PROMPT] * batch
    latents = random_latents(backbone, batch, cfg.seed)
    timed = {label: TimedRefiner(refiner) for label, refiner in refiners_by_label.items()}

    def sample(refiner, delay=0):
        torch.manual_seed(cfg.seed)  # the refiner's token sampling
        return promptloop.refined_sample(backbone, prompts, refiner, refine_steps=cfg.refine_steps,
                                         num_steps=num_steps, guidance=guidance, generator=torch.Generator().manual_seed(cfg.seed),
                                         latents=latents, preview_decoder=decoder, hook=overlap.overlap_hook(delay))

    if decoder.kind == "linear":
        decoder(latents)  # the linear map is fitted on its first preview: before timing
    variants = {"plain": functools.partial(sample, None)}
    variants.update({label: functools.partial(sample, refiner, (delays or {}).get(label, 0)) for label, refiner in timed.items()})
    times = time_side_by_side(variants, cfg.repeats, cfg.warmup, device)
    runs = cfg.repeats + cfg.warmup
    notes = {label: f"refiner calls {t.seconds / runs:.3f}s of a refined run, {t.tokens / max(1, t.answers):.0f} tokens per answer "
                    f"(max {t.refiner.max_new_tokens})" for label, t in timed.items()}
    return times, notes


def overhead_row(row, compared, times, label, target, device, notes, limit=None):
    """A refined-vs-plain row: the ratio refined / plain (an overhead), within `limit` where given."""
    ratio = median_ratio(times[label], times["plain"])
    return ratio_row(row, compared, ("plain", times["plain"]), (label, times[label]), ratio, target, device, notes,
                     None if limit is None else ratio <= limit)


def row_refined_overhead(cfg, device, dtype, tmp):
    backbone, refiner, which = toy_models(cfg, device, dtype)
    decoder = make_preview_decoder(cfg.preview_decoder, backbone, tmp)
    variants, delays, what = {}, {}, {}
    for mode in DECODE_MODES[cfg.fast_decode]:
        for delay in overlap_delays(cfg):
            label = f"refined, fast {mode}" + (f", overlap {delay}" if delay else "")
            variants[label], delays[label] = architectures.refiner_view(refiner, fast=mode == "on"), delay
            what[label] = f"fast {mode} decode" + (f", --overlap {delay}" if delay else "")
    times, notes = overhead_times(cfg, backbone, variants, decoder, cfg.sampling_steps, backbone.spec.guidance, device, delays=delays)
    rows = [overhead_row("3a", f"sampling, toy size: refined (K={cfg.refine_steps}, {what[label]}) vs plain", times,
                         label, "report (overhead; <= 1.3x is the full-size target)", device,
                         f"{which}; batch {cfg.batch}, {cfg.sampling_steps} steps, preview {cfg.preview_decoder}; {notes[label]}")
            for label in variants]
    del backbone, refiner, decoder
    free_memory()
    full = (("3b", "SD1.5", architectures.random_sd15, cfg.resolution), ("3c", "SD3.5-M", architectures.random_sd35m, 1024))
    if device.type != "cuda":
        return rows + [skipped_row(row, full_overhead_compared(cfg, name), "<= 1.3x", device) for row, name, *_ in full]
    refiner = architectures.random_qwen_refiner(cfg.size, device, dtype, cfg.max_new_tokens, cfg.seed)
    for row, name, build, resolution in full:
        rows.append(full_overhead_row(cfg, row, name, build(cfg.size, resolution, device, dtype, cfg.seed), refiner, device, dtype, tmp))
        free_memory()
    return rows


def full_overhead_compared(cfg, name):
    return f"sampling, full size ({name} + Qwen2.5-VL-3B): refined (K={cfg.refine_steps}) vs plain"


def full_overhead_row(cfg, row, name, backbone, refiner, device, dtype, tmp):
    """Rows 3b, 3c: refined vs plain on a random full-size backbone, at its model card's steps and CFG."""
    decoder = make_preview_decoder(cfg.preview_decoder, backbone, tmp)
    steps, guidance = backbone.spec.steps, backbone.spec.guidance
    times, notes = overhead_times(cfg, backbone, {"refined": refiner}, decoder, steps, guidance, device)
    text = ", T5 256 tokens" if backbone.family == "sd3" else ""
    return overhead_row(row, full_overhead_compared(cfg, name), times, "refined", "<= 1.3x", device,
                        f"{cfg.size} size, {dtype}; batch {cfg.batch}, {steps} steps, CFG {guidance}, {backbone.spec.size} px{text}, "
                        f"preview {cfg.preview_decoder}; {notes['refined']}; a random refiner never stops early (upper bound)", 1.3)


def grid_target(backbone, batch, tokens):
    """The GPU targets for refined / plain (the paper reports ~1.2x for 5 refinements): 32-token answers;
    SD1.5 batch 1 and 8, SDXL batch 1."""
    if tokens != 32:
        return None
    if backbone == "sdxl":
        return 1.15 if batch == 1 else None
    return {1: 1.3, 8: 1.2}.get(batch)


def overlap_delays(cfg):
    return common.parse_ints(cfg.overlaps, "--overlaps", minimum=0)


def row_refined_grid(cfg, device, dtype, tmp):
    """Row 9: refined (K refinements, answers forced to each length) vs plain, per backbone and batch."""
    backbones, batches = common.parse_list(cfg.full_backbones, "--full-backbones", FULL_BACKBONES), common.parse_ints(cfg.batches, "--batches", minimum=1)
    lengths, modes = common.parse_ints(cfg.answer_lengths, "--answer-lengths", minimum=1), DECODE_MODES[cfg.fast_decode]
    if device.type != "cuda" and cfg.size == "full":
        return [skipped_row("9", "sampling, full size (SD1.5 512 px, SDXL 1024 px) + Qwen2.5-VL-3B: refined vs plain over batch x "
                            "answer length x decode path", "<= 1.3x / 1.5x / 1.15x", device, f"needs a GPU (CUDA): {GPU_COMMAND}")]
    refiner = architectures.random_qwen_refiner(cfg.size, device, dtype, max(lengths), cfg.seed)
    rows = []
    for key in backbones:
        name, build, resolution = FULL_BACKBONES[key]
        backbone = build(cfg.size, resolution, device, dtype, cfg.seed)
        decoder = make_preview_decoder(cfg.preview_decoder, backbone, tmp)
        steps, guidance = backbone.spec.steps, backbone.spec.guidance
        for batch in batches:
            variants, delays = {}, {}
            for n in lengths:
                for mode in modes:
                    for delay in overlap_delays(cfg):
                        label = f"{n} tokens, fast {mode}" + (f", overlap {delay}" if delay else "")
                        variants[label] = architectures.refiner_view(refiner, fast=mode == "on", fixed_length=True, max_new_tokens=n)
                        delays[label] = delay
            times, notes = overhead_times(cfg, backbone, variants, decoder, steps, guidance, device, batch=batch, delays=delays)
            for label in variants:
                limit = grid_target(key, batch, int(label.split()[0]))
                rows.append(overhead_row(
                    "9", f"{name} {backbone.spec.size} px, batch {batch}: refined (K={cfg.refine_steps}, {label}) vs plain", times, label,
                    f"<= {limit}x" if limit else "report", device, f"{cfg.size} size, {dtype}; {steps} steps, CFG {guidance}, preview "
                    f"{cfg.preview_decoder}, refiner previews {refiner.preview_size} px; {notes[label]}", limit))
        del backbone, decoder
        free_memory()
    return rows


# -----------------------------------------------------------------------------
# row 4: GRPO rollouts batched vs one at a time


def row_grpo_batching(cfg, device, dtype, tmp):
    backbone, refiner, which = toy_models(cfg, device, dtype)
    decoder = make_preview_decoder(cfg.preview_decoder, backbone, tmp)
    b, g, k = cfg.prompts_per_step, cfg.group_size, 2
    words = ["circle", "square", "triangle"]
    rows = [f"a {words[i % 3]}" for i in range(b) for _ in range(g)]  # (B*G,) group members adjacent
    # a group shares its initial noise (common random numbers), as train_refiner.py rolls out
    latents = random_latents(backbone, b, cfg.seed).repeat_interleave(g, 0)
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


def lrm_trainer(backbone, pairs, generator, **config):
    """A LatentRewardModel (LRMConfig `config`) and step(latents) -> loss, one train_reward.py step
    on (2 * pairs, C, h, w) latents (the pairs' first images, then their second ones): both images
    of a pair noised with the same (t, eps), rewards in one forward, noise-calibrated Thurstone NLL,
    AdamW on the trainable weights. Returns (model, step)."""
    model = latent_reward_model(backbone, **config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    captions, targets = [PROMPT] * pairs, torch.ones(pairs, device=backbone.device)

    def step(latents):
        latents = latents.to(backbone.device, backbone.denoiser.dtype)
        t = torch.randint(0, model.num_timesteps, (pairs,), generator=generator)
        noise = torch.randn((pairs, *latents.shape[1:]), generator=generator).to(latents.device, latents.dtype)
        r_0, r_1 = lrm.pair_rewards(model, latents[:pairs], latents[pairs:], noise, t.to(latents.device), captions)
        loss = lrm.preference_loss("thurstone-nll", r_0, r_1, model.variance(t.to(r_0.device)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return model, step


def row_lrm_cached_latents(cfg, device, dtype, tmp):
    backbone = architectures.random_sd15(cfg.size, cfg.resolution, device, dtype, cfg.seed)
    side = backbone.spec.size
    generator = torch.Generator().manual_seed(cfg.seed)
    # uint8 pixels, as train_reward.py holds the decoded pairs in memory
    pixels = torch.randint(0, 256, (2 * cfg.batch, 3, side, side), dtype=torch.uint8, generator=generator)
    vae = backbone.pipe.vae
    cache = lrm.encode_latents(vae, pixels)  # (2B, C, h, w): the cache, encoded once
    _, step = lrm_trainer(backbone, cfg.batch, generator)
    times = time_side_by_side({
        "encode_each_step": lambda: step(lrm.encode_latents(vae, pixels)),
        "cached_latents": lambda: step(cache[torch.arange(2 * cfg.batch)]),
    }, cfg.repeats, cfg.warmup, device)
    return [ratio_row("5", "LRM training step: encode the pair with the VAE every step vs cached latents",
                      ("encode_each_step", times["encode_each_step"]), ("cached_latents", times["cached_latents"]),
                      median_ratio(times["encode_each_step"], times["cached_latents"]), "report", device,
                      f"batch {cfg.batch} pair(s), {side} px, {cfg.size} size; frozen UNet (down+mid), head trained")]


# -----------------------------------------------------------------------------
# row 6: peak GPU memory of the training steps


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
    refiner = architectures.random_qwen_refiner(cfg.size, device, dtype, 64, cfg.seed)
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
        backbone = architectures.random_sd15(cfg.size, cfg.resolution, device, dtype, cfg.seed)
        _, step = lrm_trainer(backbone, cfg.memory_batch, torch.Generator().manual_seed(cfg.seed), lora_rank=rank)
        if checkpointing:
            backbone.pipe.unet.enable_gradient_checkpointing()
        latents = torch.randn((2 * cfg.memory_batch, *common.latent_shape(backbone)), device=device, dtype=dtype)
        peaks[name] = peak_memory(functools.partial(step, latents), device)
        del backbone, step, latents
        free_memory()
    notes = f"{cfg.size} size, {dtype}; {cfg.memory_batch} pairs at {cfg.resolution if cfg.size == 'full' else 64} px"
    rows.append(memory_row("6b", compared[1], ("checkpointing off", peaks["lora"]), ("checkpointing on", peaks["lora+checkpointing"]), device, notes))
    rows.append(memory_row("6c", compared[2], ("lora r8", peaks["lora"]), ("frozen", peaks["frozen"]), device, notes))
    return rows


# -----------------------------------------------------------------------------
# row 7: the flow-matching transformers at full size (their released diffusers / transformers configs)


def row_flow_parameters(cfg, device, dtype, tmp):
    """Row 7: the parameters of every component of the released flow-matching models (and of the
    refiner), built on the meta device: shapes only, nothing is allocated."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch, count, meta = architectures, architectures.parameter_count, torch.device("meta")
    sd35m = arch.random_sd35m("full", 1024, meta, torch.float32).pipe
    with meta:
        sd35l, flux = SD3Transformer2DModel(**arch.SD35L_TRANSFORMER), FluxTransformer2DModel(**arch.FLUX_DEV_TRANSFORMER)
        clip_l_plain = CLIPTextModel(CLIPTextConfig(**arch.SD15_TEXT))  # FLUX: CLIP-L without the projection
    qwen = count(arch.random_qwen_refiner("full", meta, torch.float32, 1).model)
    shared = dict(t5_xxl=count(sd35m.text_encoder_3), vae=count(sd35m.vae))
    sd3 = dict(clip_l=count(sd35m.text_encoder), clip_g=count(sd35m.text_encoder_2), **shared)
    models = {
        "7a": ("SD3.5-Medium (sd35m)", dict(transformer=count(sd35m.transformer), **sd3)),
        "7b": ("SD3.5-Large (sd35l)", dict(transformer=count(sd35l), **sd3)),
        "7c": ("FLUX.1-dev / -schnell (flux-dev, flux-schnell)", dict(transformer=count(flux), clip_l=count(clip_l_plain), **shared)),
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


# -----------------------------------------------------------------------------
# rows 10, 11: the refiner's prefill and time per token; the memory of a GRPO rollout's refiner
# call (the lean loop vs generate keeping every step's logits)


def row_refiner_decoding(cfg, device, dtype, tmp):
    """Row 10: the refiner's prefill per call at each preview size, and its ms per generated token
    on the default loop vs the fast path. A call that generates 1 token is the prefill (+ one
    sampling step); (time of 1 + N tokens - time of 1) / N is the decode time per token."""
    batches, sizes, n = common.parse_ints(cfg.batches, "--batches", minimum=1), common.parse_ints(cfg.preview_sizes, "--preview-sizes", minimum=28), cfg.decode_tokens
    modes = DECODE_MODES[cfg.fast_decode]
    refiner = architectures.random_qwen_refiner(cfg.size, device, dtype, n + 1, cfg.seed)
    image_pad = refiner.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows = []
    for batch in batches:
        previews = torch.rand((batch, 3, 512, 512), generator=torch.Generator().manual_seed(cfg.seed))
        inputs = {size: architectures.refiner_view(refiner, preview_size=size)._inputs(previews, [PROMPT] * batch, [PROMPT] * batch, 10, 50)
                  for size in sizes}
        views = {mode: architectures.refiner_view(refiner, fast=mode == "on", fixed_length=True) for mode in modes}
        variants = {}
        for mode in modes:  # decode timed at the first preview size
            variants[f"{mode} 1"] = functools.partial(views[mode].generate, inputs[sizes[0]], 1)
            variants[f"{mode} {1 + n}"] = functools.partial(views[mode].generate, inputs[sizes[0]], 1 + n)
        variants.update({f"prefill {size} px": functools.partial(views[modes[0]].generate, inputs[size], 1) for size in sizes[1:]})
        uncached = architectures.refiner_view(views[modes[0]], prefix_cache=False)
        variants["prefill, no prefix cache"] = functools.partial(uncached.generate, inputs[sizes[0]], 1)
        times = time_side_by_side(variants, cfg.repeats, cfg.warmup, device)
        times[f"prefill {sizes[0]} px"] = times[f"{modes[0]} 1"]  # the same call
        tokens = {size: f"{int((inputs[size]['input_ids'][0] == image_pad).sum())} vision of {inputs[size]['input_ids'].shape[1]} tokens"
                  for size in sizes}
        common_notes = f"{cfg.size} size, {dtype}; batch {batch}; decode path {modes[0]} for the prefill"
        for size in sizes[1:]:
            base, cand = times[f"prefill {sizes[0]} px"], times[f"prefill {size} px"]
            rows.append(ratio_row("10a", f"refiner prefill per call, batch {batch}: preview {sizes[0]} px vs {size} px",
                                  (f"{sizes[0]} px", base), (f"{size} px", cand), median_ratio(base, cand),
                                  "report", device, f"{common_notes}; {sizes[0]} px: {tokens[sizes[0]]}, {size} px: {tokens[size]}"))
        shared = refiners.shared_prefix_length(refiners.padding_before_image(inputs[sizes[0]]))
        rows.append(ratio_row("10c", f"refiner prefill per call, batch {batch}: no prefix cache vs prefix cache",
                              ("no prefix cache", times["prefill, no prefix cache"]), ("prefix cache", times[f"prefill {sizes[0]} px"]),
                              median_ratio(times["prefill, no prefix cache"], times[f"prefill {sizes[0]} px"]), "report", device,
                              f"{common_notes}; preview {sizes[0]} px ({tokens[sizes[0]]}); {shared} shared text tokens before the "
                              "image computed once at batch 1 (none at batch 1: nothing to share)"))
        per_token = {mode: [(long - short) / n for long, short in zip(times[f"{mode} {1 + n}"], times[f"{mode} 1"])] for mode in modes}
        if len(modes) == 2:
            rows.append(ratio_row("10b", f"refiner s per generated token, batch {batch}: default loop (dynamic cache) vs fast "
                                  "(static cache, compiled)", ("default", per_token["off"]), ("fast", per_token["on"]),
                                  median_ratio(per_token["off"], per_token["on"]), "report",
                                  device, f"{cfg.size} size, {dtype}; preview {sizes[0]} px ({tokens[sizes[0]]}); (t(1+{n}) - t(1)) / {n} "
                                  "tokens per repeat; the compile happens in the warm-up"))
    return rows


def row_rollout_memory(cfg, device, dtype, tmp):
    """Row 11: the peak memory of one refiner call of a GRPO rollout (B*G rows, answers forced to
    --rollout-tokens): generate keeping every step's logits (the old way) vs the lean loop."""
    rows, tokens = cfg.rollout_rows, cfg.rollout_tokens
    refiner = architectures.refiner_view(architectures.random_qwen_refiner(cfg.size, device, dtype, tokens, cfg.seed), fixed_length=True,
                                         preview_size=cfg.rollout_preview or None)
    previews = torch.rand((rows, 3, 512, 512), generator=torch.Generator().manual_seed(cfg.seed))
    inputs = refiner._inputs(previews, [PROMPT] * rows, [PROMPT] * rows, 10, 50)
    resident = peak_memory(lambda: None, device)
    peaks = {"kept": peak_memory(functools.partial(architectures.generate_keeping_logits, refiner, inputs, tokens, tokens), device),
             "lean": peak_memory(functools.partial(refiner.generate, inputs, tokens), device)}
    vocab = refiner.model.config.get_text_config().vocab_size
    logits_gib = rows * tokens * vocab * 4 / 2**30
    what = "peak RSS of the process" if device.type != "cuda" else "peak allocated GPU memory"
    return [memory_row("11", f"GRPO rollout refiner call, {rows} rows x {tokens} tokens: generate keeping the logits vs the lean loop",
                       ("generate + logits", peaks["kept"]), ("lean loop", peaks["lean"]), device,
                       f"{cfg.size} size, {dtype}; {what}, weights included ({resident:.2f} GiB before the calls); one (rows, tokens, "
                       f"vocab {vocab}) fp32 tensor = {logits_gib:.2f} GiB; preview {refiner.preview_size} px; decode path "
                       f"{'fast' if isinstance(refiner, refiners.FastRefiner) else 'default'} for the lean loop")]


def row_refinement_breakdown(cfg, device, dtype, tmp):
    """Row 12: where one refinement's time goes, part by part, per batch: the preview decode of x0_hat,
    the processor (the CPU-side image preprocessing and chat template), the refiner's prefill, its
    decoding of an answer of the first --answer-lengths tokens (t(1 + T) - t(1)), and the prompt
    re-encoding; next to one denoiser step (the UNet on the CFG batch) for scale. The refiner
    decodes on the path --fast-decode names first (auto: the fast path on a GPU)."""
    key = common.parse_list(cfg.full_backbones, "--full-backbones", FULL_BACKBONES)[0]
    name, build, resolution = FULL_BACKBONES[key]
    tokens, modes = common.parse_ints(cfg.answer_lengths, "--answer-lengths", minimum=1)[0], DECODE_MODES[cfg.fast_decode]
    if device.type != "cuda" and cfg.size == "full":
        return [skipped_row("12", f"one refinement, part by part ({name} + Qwen2.5-VL-3B)", "report", device,
                            "needs a GPU (CUDA): python bench.py --rows 12 --device cuda --batches 1,8 --answer-lengths 32")]
    backbone = build(cfg.size, resolution, device, dtype, cfg.seed)
    pipe, decoder = backbone.pipe, make_preview_decoder(cfg.preview_decoder, backbone, tmp)
    refiner = architectures.refiner_view(architectures.random_qwen_refiner(cfg.size, device, dtype, tokens + 1, cfg.seed),
                                         fast=modes[-1] == "on", fixed_length=True)
    rows = []
    for batch in common.parse_ints(cfg.batches, "--batches", minimum=1):
        prompts = [PROMPT] * batch
        x0 = random_latents(backbone, batch, cfg.seed).to(device, dtype)  # (B, C, h, w)
        previews = decoder(x0).float().cpu()
        inputs = refiner._inputs(previews, prompts, prompts, 10, 50)
        embeds = promptloop.encode_prompts(pipe, prompts)["prompt_embeds"]
        text = torch.cat([embeds, embeds])  # the CFG batch: (2B, L, D)
        unet_kwargs = {}
        if backbone.family == "sdxl":  # SDXL's added conditioning: pooled text and the size / crop ids
            pooled = promptloop.encode_prompts(pipe, prompts)["add_text_embeds"]
            ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device, dtype=dtype)
            unet_kwargs = dict(added_cond_kwargs=dict(text_embeds=torch.cat([pooled, pooled]), time_ids=ids.repeat(2 * batch, 1)))
        with torch.no_grad():
            variants = {
                "preview": lambda: decoder(x0),
                "processor": lambda: refiner._inputs(previews, prompts, prompts, 10, 50),
                "prefill": lambda: refiner.generate(inputs, 1),
                "prefill + decode": lambda: refiner.generate(inputs, 1 + tokens),
                "re-encode": lambda: promptloop.encode_prompts(pipe, prompts),
                "denoiser step": lambda: pipe.unet(torch.cat([x0, x0]), 500, encoder_hidden_states=text, **unet_kwargs),
            }
            times = time_side_by_side(variants, cfg.repeats, cfg.warmup, device)
        times["decode"] = [long - short for long, short in zip(times.pop("prefill + decode"), times["prefill"])]
        parts = {part: statistics.median(t) for part, t in times.items() if part != "denoiser step"}
        step = statistics.median(times["denoiser step"])
        rows.append(dict(row="12", compared=f"one refinement, part by part: {name} {backbone.spec.size} px, batch {batch}",
                         parts={part: summary(t) for part, t in times.items()}, total_s=sum(parts.values()),
                         denoiser_steps=sum(parts.values()) / step, ratio=None, target="report", meets_target=None,
                         device=device_name(device), notes=f"{cfg.size} size, {dtype}; preview {cfg.preview_decoder}, refiner "
                         f"previews {refiner.preview_size} px, {tokens}-token answers, decode path {modes[-1]}"))
    return rows


# -----------------------------------------------------------------------------
# main: run the rows, print the table, write the JSON

ROW_FUNCTIONS = {"1": row_lrm_vs_pixel, "2": row_preview_decoders, "3": row_refined_overhead, "4": row_grpo_batching,
                 "5": row_lrm_cached_latents, "6": row_peak_memory, "7": row_flow_parameters, "8": row_flow_lrm_vs_pixel,
                 "9": row_refined_grid, "10": row_refiner_decoding, "11": row_rollout_memory,
                 "12": row_refinement_breakdown}


def format_row(row):
    if row.get("skipped"):
        return f"{row['row']:<3} {row['compared'][:78]:<78} {'skipped: ' + row['skipped']:>36}  {row['device']}"
    if "parts" in row:  # row 12: the parts' medians, their sum, and the sum in denoiser steps
        parts = " | ".join(f"{part} {t['median_s'] * 1000:.1f}ms" for part, t in row["parts"].items())
        return (f"{row['row']:<3} {row['compared'][:78]:<78} {row['total_s']:>8.3f}s = {row['denoiser_steps']:.1f} denoiser steps "
                f"{row['device']}\n      {parts}")
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
