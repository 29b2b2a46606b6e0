"""
Refined generation: while the diffusion model samples, a refiner MLLM looks at the denoised
estimate at K evenly spaced steps and rewrites the prompt used for the remaining steps.

    python sample.py --backbone toy --refiner toy-refiner --prompt "a circle"          # toy world, CPU
    python sample.py --backbone sd15 --refiner qwen2.5-vl-3b --adapter ADAPTER_DIR --prompt "a cat"
    python sample.py --backbone sdxl-turbo --steps 4 --refine-steps 2 --prompt "a fox" --prompt "a boat"
    python sample.py --backbone sd15 --refiner none --prompt "a cat"                   # the plain pipeline
    python sample.py --backbone toy --refiner toy-refiner --search 4 --lrm LRM_DIR --prompt "a circle"  # LRM-guided search

Several prompts run as one batch on one device (--device cuda:N); to spread many prompts over
several GPUs, run one process per GPU with its own prompts and --out. Writes to --out: one PNG per
prompt, `trajectory.png` (the preview seen at each refinement with the prompt in force after it)
and `trajectory.json`.

With --search M --lrm DIR the refiner proposes M candidate prompts at each refinement, each
distinct one is continued to the next refinement point (the last to the end), a latent reward
model (train_reward.py) scores the latents they reach and each image keeps its best candidate
(search.Search): no decode, no pixel reward in the loop, at most M x the denoiser evaluations
after the first refinement. Every candidate and its score goes into trajectory.json and
trajectory.png.

Left out on purpose: negative-prompt refinement (the refiner rewrites the positive prompt
only, as in the paper), image-to-image and inpainting pipelines.
"""

import json
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import common
import lrm
import overlap
import promptloop
import refiners
import search


@dataclass
class Config(common.RunFlags, common.SamplingFlags):
    prompt: list[str] = field(default_factory=list, metadata={"help": "user prompt; repeat the flag or give several for one batch", "action": "extend"})
    backbone: str = field(default="toy", metadata={"help": "sd15 | sdxl | sdxl-turbo | sd35m | sd35l | flux-dev | flux-schnell | toy | toy-sdxl | toy-sd3 | hub id | diffusers folder"})
    refiner: str = field(default="toy-refiner", metadata={"help": "qwen2.5-vl-3b | toy-refiner | hub id | folder (model or PEFT adapter) | none"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT LoRA adapter folder put over --refiner (e.g. from train_refiner.py)"})
    unet: str | None = field(default=None, metadata={"help": "aligned UNet over the backbone: dpo-sd15 | dpo-sdxl | hub id | folder"})
    lora: str | None = field(default=None, metadata={"help": "diffusers LoRA (folder or hub id) loaded on the backbone"})
    refine_steps: int = field(default=5, metadata={"help": "K: number of refinements, evenly spaced (capped at steps-1)"})
    steps: int | None = field(default=None, metadata={"help": "N sampling steps (default: the backbone's, e.g. 50 for sd15, 4 for sdxl-turbo)"})
    guidance: float | None = field(default=None, metadata={"help": "CFG scale (default: the backbone's; 0 for sdxl-turbo); FLUX: its distilled guidance"})
    true_cfg: float = field(default=1.0, metadata={"help": "FLUX only: classifier-free guidance scale with --negative-prompt (two passes per step; 1 = off)"})
    size: int | None = field(default=None, metadata={"help": "image side in pixels (default: the backbone's)"})
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt (used with CFG)"})
    search: int = field(default=1, metadata={"help": "M candidate prompts per refinement, the best kept by --lrm's score of the latents they reach (1 = off)"})
    lrm: str | None = field(default=None, metadata={"help": "latent reward model folder (train_reward.py) that scores the --search candidates"})
    temperature: float = field(default=1.0, metadata={"help": "refiner sampling temperature; 0 = greedy"})
    out: str = field(default="out/sample", metadata={"help": "output folder"})


def check(config):
    if not config.prompt or any(not p.strip() for p in config.prompt):
        raise common.UserError("give at least one non-empty --prompt")
    common.require(config, positive=("steps", "size", "search"), non_negative=("refine_steps", "temperature", "guidance", "overlap"))
    if (config.search > 1) != (config.lrm is not None):
        raise common.UserError("--search M (M > 1) and --lrm DIR go together: the latent reward model scores the candidates")
    if config.search > 1 and config.refiner == "none":
        raise common.UserError("--search needs a refiner to propose candidate prompts")
    if config.true_cfg < 1:
        raise common.UserError(f"--true-cfg must be >= 1 (1 = off), got {config.true_cfg}")
    if config.search > 1 and config.overlap:
        raise common.UserError("--search and --overlap do not go together: a search's candidates look ahead synchronously")
    if config.preview_decoder not in promptloop.PreviewDecoder.KINDS:
        raise common.UserError(f"--preview-decoder must be one of {', '.join(promptloop.PreviewDecoder.KINDS)}")


# -----------------------------------------------------------------------------
# the trajectory picture: one row per prompt, one column per refinement + the final image

CELL = 192  # px: small toy previews are upscaled so that a person can see them


def trajectory_picture(result, labels):
    """Previews (nearest-upscaled) with the prompt in force after each refinement under them."""
    font, line_height, chars = common.caption_font(13), 16, CELL // 7
    columns = [(f"step {s}: preview", p) for s, p in zip(result.schedule, result.previews)] + [("final", result.images)]
    rows = len(result.images)
    texts = [[result.prompts[k + 1][b] if k < len(result.schedule) else result.final_prompts[b]
              for k in range(len(columns))] for b in range(rows)]
    wrapped = [[textwrap.wrap(t, chars)[:6] for t in row] for row in texts]
    for k, found in enumerate(result.candidates):  # search: every candidate, its score, the kept one marked
        for b in range(rows):
            wrapped[b][k] += ["candidates:"] + [
                textwrap.shorten(f"{'*' if j == found['chosen'][b] else ' '}{score:.2f} {prompt}", chars, placeholder="..")
                for j, (prompt, score) in enumerate(zip(found["prompts"][b], found["scores"][b].tolist()))]
    text_height = line_height * (2 + max(len(w) for row in wrapped for w in row))
    sheet = Image.new("RGB", (CELL * len(columns), rows * (CELL + text_height) + 20), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), labels, fill="black", font=font)
    for b in range(rows):
        top = 20 + b * (CELL + text_height)
        for c, (title, images) in enumerate(columns):
            tile = common.to_pil(images[b : b + 1])[0].resize((CELL, CELL), Image.NEAREST)
            sheet.paste(tile, (c * CELL, top))
            draw.text((c * CELL + 4, top + CELL + 2), title + (" -> prompt:" if c < len(result.schedule) else " image, prompt:"), fill="gray", font=font)
            for j, line in enumerate(wrapped[b][c]):
                draw.text((c * CELL + 4, top + CELL + 2 + line_height * (j + 1)), line, fill="black", font=font)
    return sheet


def slug(text, n=40):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def search_hook(config, backbone, device, dtype):
    """--search M --lrm DIR: search.Search, its candidates scored by the LRM. The LRM runs on the
    sampler's copy of its backbone when it is the same model (lrm.load_lrm); an aligned UNet, a LoRA
    or a T5 left out make the sampler's another model."""
    plain = config.unet is None and config.lora is None and config.t5
    model = lrm.load_lrm(config.lrm, device, dtype, backbone if plain else None)
    return search.Search(config.search, lrm.search_scorer(model, backbone))


# -----------------------------------------------------------------------------


def main():
    config = common.parse_config(Config)
    check(config)
    device, dtype = common.setup_run(config)
    backbone = common.load_backbone(config.backbone, device, dtype, unet=config.unet, lora=config.lora, t5=config.t5)
    refiner = refiners.load_refiner(
        config.refiner, adapter=config.adapter, device=device, dtype=dtype,
        temperature=config.temperature or 1.0, do_sample=config.temperature > 0,
        fast_decode=config.fast_decode, preview_size=config.preview_size,
    )
    hook = overlap.overlap_hook(config.overlap)  # None: plain (synchronous) refined sampling
    if config.search > 1:
        hook = search_hook(config, backbone, device, dtype)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)  # the refiner samples with the global generator
    generator = torch.Generator(device).manual_seed(config.seed)
    t0 = time.time()
    result = promptloop.refined_sample(
        backbone, config.prompt, refiner, refine_steps=config.refine_steps, num_steps=config.steps,
        guidance=config.guidance, generator=generator, negative_prompt=config.negative_prompt,
        preview_decoder=config.preview_decoder, size=config.size, true_cfg=config.true_cfg, hook=hook,
    )
    seconds = time.time() - t0

    files = []
    for b, image in enumerate(common.to_pil(result.images)):
        files.append(f"{b:03d}_{slug(config.prompt[b])}.png")
        image.save(out / files[-1])
    fallbacks = sum(int(o.fallback.sum()) for o in result.refiner_outputs)
    items = []
    for b, user_prompt in enumerate(config.prompt):
        steps = [
            {"step": s, "applied_step": applied, "prompt": result.prompts[k + 1][b], "answer": o.answers[b], "fallback": bool(o.fallback[b])}
            for k, (s, applied, o) in enumerate(zip(result.schedule, result.applied_steps, result.refiner_outputs))
        ]
        for step, found in zip(steps, result.candidates):
            step["candidates"] = [{"prompt": p, "score": round(float(v), 5)} for p, v in zip(found["prompts"][b], found["scores"][b])]
            step["chosen"] = int(found["chosen"][b])
        items.append({"user_prompt": user_prompt, "image": files[b], "final_prompt": result.final_prompts[b], "refinements": steps})
    num_steps = config.steps or backbone.spec.steps
    record = {
        "backbone": config.backbone, "refiner": config.refiner, "adapter": config.adapter, "seed": config.seed,
        "steps": num_steps, "guidance": backbone.spec.guidance if config.guidance is None else config.guidance,
        "refine_steps": config.refine_steps, "schedule": result.schedule, "overlap": config.overlap, "preview_decoder": config.preview_decoder,
        "search": config.search, "lrm": config.lrm,
        "fallbacks": fallbacks, "seconds": round(seconds, 3), "items": items,
    }
    (out / "trajectory.json").write_text(json.dumps(record, indent=2))
    if result.schedule:
        label = f"{config.backbone} + {config.refiner}, seed {config.seed}, {num_steps} steps, refined before steps {result.schedule}"
        label += f", best of {config.search} candidates by the LRM (*)" if hook else ""
        trajectory_picture(result, label).save(out / "trajectory.png")
    elif refiner is not None:
        print(f"note: {num_steps} sampling step(s) leave no room for refinement; plain sampling was run")
    print(f"{len(files)} image(s) in {seconds:.1f}s -> {out}/ (refinements at steps {result.schedule}, {fallbacks} fallback(s))")
    for item in items:
        print(f"  {item['user_prompt']!r} -> {item['final_prompt']!r}")


if __name__ == "__main__":
    common.run_cli(main)
