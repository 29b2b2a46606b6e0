"""
Rewards across backbones, baseline vs refined: the tables behind the paper's claims.

    python evaluate.py --backbones toy,toy-sdxl --refiner ADAPTER_DIR --rewards toy-aesthetic,toy-faithful \\
        --prompts toy --seeds 0,1 --out out/eval                                    # toy world, CPU
    python evaluate.py --backbones sd15,sdxl,sdxl-turbo --refiner ADAPTER_DIR \\
        --rewards imagereward,hpsv2,aesthetic --prompts yuvalkirstain/pickapic_v2 --limit 500 --seeds 0
    python evaluate.py --backbones sd15 --unet dpo-sd15 --refiner ADAPTER_DIR ...  # composition with Diffusion-DPO
    python evaluate.py --backbones sd15 --refiner none ...                         # baseline only
    python evaluate.py --backbones toy --refiner none --rewards toy-aesthetic \
        --lrm runs/lrm --preference-data toy_world/pickapic-toy ...               # + LRM accuracy per noise bucket
    python evaluate.py --backbones toy --refiner toy-refiner --adapter ADAPTER_DIR --lrm runs/lrm --search 2,4,8 \
        --best-of 2,3,4,5,6,8 ...                                      # + LRM-guided search vs best-of-n

A composite reward goes into the list with '+' between its terms: --rewards imagereward,imagereward:1+vlm:0.5.
One process on one device (--device auto: the GPU if there is one); to spread the work over
several GPUs, run one backbone per process with its own --out.

For every backbone, every (seed, prompt) is sampled twice from the *same* initial noise (one
torch.Generator per image, seeded by seed and prompt index): once with the plain pipeline
(the baseline, bit-identical to stock diffusers) and once with the refiner rewriting the prompt
at K steps. Each image is generated once and scored by every reward. Per backbone x reward:

    mean with a 95% confidence interval (Student's t) for baseline and refined,
    the paired difference refined - baseline (same seed, same prompt) with its t interval,
    the win rate of refined over baseline (ties count half),
    seconds per image of both runs (timed side by side, batch by batch) and their ratio.

Writes to --out (the writers live in reports.py): results.md (the table a person reads), results.csv,
results.json (all of it, plus every image's scores so any number can be recomputed), results.png
(reward by backbone, baseline vs refined, with the intervals) and samples.png (a few prompts,
baseline vs refined).

With --lrm and --preference-data it also reports the latent reward model's preference accuracy
per noise bucket next to the pixel rewards' accuracy on the same pairs (lrm.preference_accuracy).

With --lrm and --search 2,4,8 it adds the arms "search M" (at each refinement M candidate prompts,
each distinct one continued to the next refinement point, the one whose latents the LRM scores best
kept: search.Search) and, per n of --best-of (default: the same counts), "best-of-n" (n whole
refined images from n initial noises, the first the other arms' noise, the LRM's pick by final
latents). Every arm counts the denoiser evaluations it makes per image (RefinedSample.evaluations:
a search runs one row per image before its first refinement and one per distinct candidate after).
Their table (in results.md; search.csv) gives every arm's mean, its actual cost and its paired
difference from the refined and the baseline arm, and each search's paired difference from
best-of at the search's actual cost (equal_cost_best_of: the two best-of arms around that cost,
mixed; the refined arm is best-of-1); search.png plots reward against denoiser evaluations.

Statistics, said plainly: an image is the unit; the intervals treat the prompts x seeds images
of a cell as independent draws (seeds of one prompt are not quite independent, so with few
prompts the intervals are somewhat optimistic). Left out on purpose: multiple-comparison
correction across the table, human preference studies.
"""

import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common
import lrm
import overlap
import promptloop
import refiners
import reports
import rewards
import runs
import search


@dataclass
class Config(common.RunFlags, common.SamplingFlags):
    backbones: str = field(default="toy,toy-sdxl", metadata={"help": "comma-separated: sd15 | sdxl | sdxl-turbo | sd35m | sd35l | flux-dev | flux-schnell | toy | toy-sdxl | toy-sd3 | hub id | diffusers folder"})
    refiner: str = field(default="toy-refiner", metadata={"help": "qwen2.5-vl-3b | toy-refiner | hub id | folder (model or PEFT adapter) | none (baseline only)"})
    adapter: str | None = field(default=None, metadata={"help": "PEFT LoRA adapter folder put over --refiner (e.g. from train_refiner.py)"})
    rewards: str = field(default="toy-aesthetic,toy-faithful", metadata={"help": "comma-separated reward specs from the registry; write a composite with '+' between its terms, e.g. imagereward:1+vlm:0.5"})
    prompts: str = field(default="toy", metadata={"help": "prompt source: text file (one per line) | toy | Pick-a-Pic hub id or parquet"})
    split: str = field(default="test", metadata={"help": "split of the prompt source (hub data sets and the toy prompts)"})
    limit: int = field(default=16, metadata={"help": "number of prompts (0 = all)"})
    seeds: str = field(default="0,1", metadata={"help": "comma-separated seeds; every prompt is sampled once per seed"})
    refine_steps: int = field(default=5, metadata={"help": "K: number of refinements, evenly spaced (capped at steps-1)"})
    steps: int | None = field(default=None, metadata={"help": "N sampling steps (default: each backbone's own)"})
    guidance: float | None = field(default=None, metadata={"help": "CFG scale (default: each backbone's own)"})
    size: int | None = field(default=None, metadata={"help": "image side in pixels (default: each backbone's own)"})
    unet: str | None = field(default=None, metadata={"help": "aligned UNet put over every backbone: dpo-sd15 | dpo-sdxl | hub id | folder"})
    lora: str | None = field(default=None, metadata={"help": "diffusers LoRA (folder or hub id) loaded on every backbone"})
    blank_preview: bool = field(default=False, metadata={"help": "show the refiner a grey preview (the no-feedback ablation)"})
    temperature: float = field(default=1.0, metadata={"help": "refiner sampling temperature; 0 = greedy"})
    max_new_tokens: int = field(default=96, metadata={"help": "refiner answer budget in tokens (a cut-off answer is unusable: current prompt kept)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per pipeline call"})
    confidence: float = field(default=0.95, metadata={"help": "confidence level of the intervals"})
    sheet_prompts: int = field(default=4, metadata={"help": "prompts shown in samples.png (first seed)"})
    lrm: str | None = field(default=None, metadata={"help": "latent reward model folder: its preference accuracy per noise bucket (with --preference-data), the scorer of --search"})
    search: str = field(default="", metadata={"help": "comma-separated candidate counts M (>= 2), e.g. 2,4,8: adds the arms LRM-guided search M and best-of-n (needs --lrm)"})
    best_of: str = field(default="", metadata={"help": "with --search: comma-separated n (>= 2) of the best-of-n arms (default: the --search counts); "
                                                   "give the n around each search's actual cost, e.g. 2,3,4,5,6,8, for its equal-cost comparison"})
    preference_data: str | None = field(default=None, metadata={"help": "preference pairs (Pick-a-Pic v2 schema: hub id or parquet) for --lrm"})
    preference_split: str = field(default="test", metadata={"help": "split of --preference-data"})
    preference_limit: int = field(default=256, metadata={"help": "number of preference pairs (0 = all)"})
    out: str = field(default="out/eval", metadata={"help": "output folder"})


def reward_specs(text):
    """'a,b:1+c:0.5' -> {'a': 'a', 'b:1+c:0.5': 'b:1,c:0.5'}: label -> registry spec."""
    return {label: label.replace("+", ",") for label in common.parse_list(text, "--rewards")}


def search_counts(text, flag="--search"):
    """'2,4,8' -> [2, 4, 8]: candidate counts of --search or --best-of ('' -> none)."""
    return common.parse_ints(text, flag, minimum=2) if text.strip() else []


def best_of_counts(config):
    """The n of the best-of-n arms: --best-of, else the --search counts (none without --search)."""
    return (search_counts(config.best_of, "--best-of") or search_counts(config.search)) if search_counts(config.search) else []


def backbone_labels(names, variant=""):
    """Short labels for the tables: an alias as is, a folder by its name (made unique)."""
    labels = []
    for name in names:
        label = Path(name).name if Path(name).is_dir() else name
        while label + variant in labels:
            label += "'"
        labels.append(label + variant)
    return labels


def check(config):
    common.require(config, positive=("steps", "size", "batch_size", "max_new_tokens"),
                   non_negative=("refine_steps", "limit", "temperature", "guidance", "sheet_prompts", "preference_limit", "threads", "overlap"))
    if not 0 < config.confidence < 1:
        raise common.UserError(f"--confidence must be in (0, 1), got {config.confidence}")
    if config.preview_decoder not in promptloop.PreviewDecoder.KINDS:
        raise common.UserError(f"--preview-decoder must be one of {', '.join(promptloop.PreviewDecoder.KINDS)}")
    if config.preference_data is not None and config.lrm is None:
        raise common.UserError("--preference-data needs --lrm (the latent reward model whose accuracy it measures)")
    if search_counts(config.search) and (config.lrm is None or config.refiner == "none"):
        raise common.UserError("--search needs --lrm DIR (the candidates' scorer) and a --refiner (their proposer)")
    if search_counts(config.best_of, "--best-of") and not search_counts(config.search):
        raise common.UserError("--best-of is the comparison of --search: give --search too")
    if search_counts(config.search) and config.overlap:
        raise common.UserError("--search and --overlap do not go together: a search's candidates look ahead synchronously")
    common.parse_ints(config.seeds, "--seeds")
    reward_specs(config.rewards)
    for name in common.parse_list(config.backbones, "--backbones"):
        common.backbone_spec(name)  # unknown alias / missing folder -> UserError before any loading


# -----------------------------------------------------------------------------
# statistics (imported by the tests)


def t_quantile(p, df):
    """Quantile of Student's t with `df` degrees of freedom, e.g. t_quantile(0.975, 4) = 2.776.

    Bisection on the CDF; the CDF is 1/2 + the integral of the density from 0 (Simpson's rule),
    which keeps the project free of scipy for one number."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x):
        grid = np.linspace(0.0, x, 2001)  # an even number of intervals for Simpson
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
        weights = np.ones_like(grid)
        weights[1:-1:2], weights[2:-1:2] = 4, 2
        return 0.5 + (x / 2000 / 3) * float(weights @ density)

    low, high = 0.0, 1.0
    while cdf(high) < p:  # bracket the quantile
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int


def mean_ci(values, confidence=0.95):
    """Mean and its two-sided t interval: mean +- t_{(1+c)/2, n-1} * s / sqrt(n), s the sample
    std (n-1). Fewer than two values -> the interval is NaN (nothing to say about the spread)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = t_quantile((1 + confidence) / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(refined, baseline, confidence=0.95):
    """Mean of refined - baseline over pairs that share seed and prompt, with its t interval.

    Pairing removes the spread between prompts and noises, so the interval of the difference is
    much narrower than the two separate intervals suggest."""
    refined, baseline = np.asarray(refined, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if refined.shape != baseline.shape:
        raise ValueError(f"paired scores need equal shapes, got {refined.shape} and {baseline.shape}")
    return mean_ci(refined - baseline, confidence)


def win_rate(refined, baseline):
    """Fraction of pairs where refined scores above baseline; a tie counts half."""
    refined, baseline = np.asarray(refined, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if refined.shape != baseline.shape:
        raise ValueError(f"paired scores need equal shapes, got {refined.shape} and {baseline.shape}")
    if refined.size == 0:
        return math.nan
    return float(((refined > baseline) + 0.5 * (refined == baseline)).mean())


def finite_pairs(refined, baseline):
    """Drop pairs where either score is NaN/inf (reported, never averaged): (refined, baseline, dropped)."""
    refined, baseline = np.asarray(refined, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    keep = np.isfinite(refined) & np.isfinite(baseline)
    return refined[keep], baseline[keep], int((~keep).sum())


# -----------------------------------------------------------------------------
# generation and scoring


def image_generators(seed, indices, candidate=0):
    """One CPU generator per image, seeded by (seed, prompt index): an image's initial noise does not
    depend on the batch it lands in, and every arm starts from the same noise. Best-of-n's candidate
    j > 0 draws from its own generators (offset by j x 2^32 / golden ratio: a CPU generator keeps only
    the low 32 bits of its seed)."""
    return [torch.Generator("cpu").manual_seed(runs.mix_seed(seed, i + candidate * 0x9E3779B9)) for i in indices]


def candidate_noise(backbone, seed, indices, n, size=None):
    """(B, n, C, h, w) initial noises of best-of-n: candidate 0 is the noise the pipeline draws from
    image_generators(seed, indices) (the other arms' noise), candidate j the same draw from its own."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (len(indices), *common.latent_shape(backbone, size))
    return torch.stack([randn_tensor(shape, generator=image_generators(seed, indices, j), device=backbone.device,
                                     dtype=backbone.denoiser.dtype) for j in range(n)], 1)


def latent_reward_models(lrm_model, scorers):
    """The latent reward models a run holds to its end: --lrm's (or None) and the lrm: rewards'."""
    held = [lrm_model, *(getattr(fn, "lrm_model", None) for reward in scorers.values() for fn in reward.fns)]
    return [model for model in held if model is not None]


def load_sampler(name, lrm_models, config, device, dtype):
    """Backbone `name` to sample with (--unet, --lora, --t5 applied): the copy that one of the run's
    latent reward models already holds when it is that model (lrm.shares_backbone), rather than a
    second one; else its own load. An aligned UNet, a LoRA or a T5 left out make it another model."""
    spec = common.backbone_spec(name)
    plain = config.unet is None and config.lora is None and config.t5
    holder = next((model for model in lrm_models if plain and lrm.shares_backbone(model.config, spec)), None)
    if holder is not None:
        return common.Backbone(holder.backbone.pipe, name, spec)
    return common.load_backbone(name, device, dtype, unet=config.unet, lora=config.lora, t5=config.t5)


def sampling_arms(backbone, refiner, config, score=None):
    """Arm name -> sample(prompts, seed, indices) -> RefinedSample: baseline, refined, search M per
    --search M, best-of-n per --best-of n."""
    kwargs = dict(
        refine_steps=config.refine_steps, num_steps=config.steps, guidance=config.guidance, size=config.size,
        preview_decoder=config.preview_decoder, blank_preview=config.blank_preview,
    )

    def plain(arm_refiner, hook=None):
        return lambda prompts, seed, indices, **more: promptloop.refined_sample(
            backbone, prompts, arm_refiner, generator=image_generators(seed, indices), hook=hook, **(kwargs | more))

    def best_of(m):
        return lambda prompts, seed, indices, **more: search.best_of_sample(
            backbone, prompts, m, score, candidate_noise(backbone, seed, indices, m, config.size), refiner=refiner, **(kwargs | more))[0]

    refined = plain(refiner, overlap.overlap_hook(config.overlap))  # --overlap D: the refiner beside the denoiser
    arms = {"baseline": plain(None)} | ({"refined": refined} if refiner is not None else {})
    arms |= {f"search {m}": plain(refiner, search.Search(m, score)) for m in search_counts(config.search)}
    return arms | {f"best-of-{n}": best_of(n) for n in best_of_counts(config)}


def evaluate_backbone(backbone, refiner, scorers, prompts, seeds, config, sheet_prompts=0, score=None):
    """Sample every (seed, prompt) in every arm (sampling_arms) from the same initial noise, score each
    image with every reward. Returns (records: one dict per (seed, prompt), seconds per arm, refiner
    fallbacks, refinement count (of the refined arm), sheet: the first seed's first `sheet_prompts`
    images of the baseline and refined arms, denoiser evaluations per image of each arm (mean))."""
    arms = sampling_arms(backbone, refiner, config, score)
    # warm-up on one prompt, a few steps, so that one-time costs (lazy init, allocator) are not timed:
    # one refinement, before step D + 1 of 2D + 2, leaves --overlap D its steps
    for sample in arms.values():
        sample(prompts[:1], 0, [0], num_steps=2 + 2 * config.overlap, refine_steps=1)

    records, seconds, fallbacks, refinements = [], {arm: 0.0 for arm in arms}, 0, 0
    sheet = {arm: [] for arm in arms if arm in ("baseline", "refined")} | {"final_prompts": []}
    batches = [(seed, start) for seed in seeds for start in range(0, len(prompts), config.batch_size)]
    for seed, start in tqdm(batches, desc=backbone.name, leave=False):
        indices = list(range(start, min(start + config.batch_size, len(prompts))))
        user_prompts = [prompts[i] for i in indices]
        samples, scores = {}, {}
        for arm, sample in arms.items():  # side by side, batch by batch: shared machine load hits all
            torch.manual_seed(runs.mix_seed(seed, start))  # the refiner samples with the global generator (same --batch-size, same result)
            t0 = time.perf_counter()
            samples[arm] = sample(user_prompts, seed, indices)
            seconds[arm] += time.perf_counter() - t0
            scores[arm] = {label: samples[arm].score(reward).double().numpy() for label, reward in scorers.items()}
        refined = samples.get("refined")
        if refined is not None:
            fallbacks += sum(int(o.fallback.sum()) for o in refined.refiner_outputs)
            refinements += len(refined.refiner_outputs) * len(indices)
        for b, i in enumerate(indices):
            records.append({
                "backbone": backbone.name, "seed": seed, "prompt_index": i, "prompt": prompts[i],
                "refined_prompt": refined.final_prompts[b] if refined is not None else None,
                "scores": {arm: {label: float(scores[arm][label][b]) for label in scorers} for arm in arms},
                "evaluations": {arm: int(samples[arm].evaluations[b]) for arm in arms},  # denoiser evaluations made
            })
        if seed == seeds[0]:
            take = [b for b, i in enumerate(indices) if i < sheet_prompts]
            for arm in sheet:
                if arm != "final_prompts":
                    sheet[arm] += [samples[arm].images[b] for b in take]
            sheet["final_prompts"] += [refined.final_prompts[b] if refined is not None else prompts[indices[b]] for b in take]
        line = " | ".join(f"{label} " + " ".join(f"{arm if arm.startswith(('search', 'best')) else arm[:4]} {np.mean(scores[arm][label]):.3f}" for arm in arms) for label in scorers)
        tqdm.write(f"{backbone.name} seed {seed} prompts {start:04d}-{indices[-1]:04d} | {line}")
    evaluations = {arm: float(np.mean([r["evaluations"][arm] for r in records])) for arm in arms}
    return records, seconds, fallbacks, refinements, sheet, evaluations


def summarize(records, reward_labels, backbone_labels, timing, confidence):
    """One row per backbone x reward: the numbers of the table."""
    rows = []
    for backbone in backbone_labels:
        mine = [r for r in records if r["backbone"] == backbone]
        has_refined = any("refined" in r["scores"] for r in mine)
        t = timing[backbone]
        n_images = len(mine)
        base_s = t["seconds"]["baseline"] / n_images
        refined_s = t["seconds"]["refined"] / n_images if has_refined else math.nan
        for label in reward_labels:
            base = np.array([r["scores"]["baseline"][label] for r in mine])
            row = {"backbone": backbone, "reward": label}
            if has_refined:
                refined = np.array([r["scores"]["refined"][label] for r in mine])
                refined, base, dropped = finite_pairs(refined, base)
                base_ci, refined_ci = mean_ci(base, confidence), mean_ci(refined, confidence)
                diff_ci, win = paired_difference(refined, base, confidence), win_rate(refined, base)
            else:
                dropped = int((~np.isfinite(base)).sum())
                base_ci = mean_ci(base[np.isfinite(base)], confidence)
                refined_ci = diff_ci = Interval(math.nan, math.nan, math.nan, 0)
                win = math.nan
            row.update(
                n=base_ci.n, nonfinite_dropped=dropped,
                baseline_mean=base_ci.mean, baseline_low=base_ci.low, baseline_high=base_ci.high,
                refined_mean=refined_ci.mean, refined_low=refined_ci.low, refined_high=refined_ci.high,
                diff_mean=diff_ci.mean, diff_low=diff_ci.low, diff_high=diff_ci.high, win_rate=win,
                baseline_s_per_image=base_s, refined_s_per_image=refined_s, overhead=refined_s / base_s,
                fallback_rate=t["fallbacks"] / t["refinements"] if t["refinements"] else math.nan,
            )
            rows.append(row)
    return rows


def equal_cost_best_of(cost, costs):
    """The best-of arms around a search's actual cost: (the cheaper, the dearer, w), where running the
    dearer with probability w, else the cheaper, costs `cost` on average: w = (cost - c_low) /
    (c_high - c_low); its expected score per image is (1 - w) s_low + w s_high. None outside the costs.

    >>> equal_cost_best_of(70.0, {"refined": 20.0, "best-of-2": 40.0, "best-of-4": 80.0})
    ('best-of-2', 'best-of-4', 0.75)"""
    ordered = sorted(costs.items(), key=lambda item: item[1])
    for (low, c_low), (high, c_high) in zip(ordered, ordered[1:]):
        if c_low <= cost <= c_high:
            return low, high, (cost - c_low) / (c_high - c_low)
    return None


def search_summary(records, reward_labels, backbone_labels, timing, confidence):
    """With --search: one row per backbone x reward x arm, in the arms' order: the arm's mean, its
    denoiser evaluations per image (the mean of those made), its paired difference from the refined
    and from the baseline arm, its win rate over the refined arm, seconds per image; a search's
    paired difference from best-of at its actual cost (equal_cost_best_of; the refined arm is best-of-1)."""
    rows = []
    for backbone in backbone_labels:
        mine, t = [r for r in records if r["backbone"] == backbone], timing[backbone]
        costs = {arm: float(np.mean([r["evaluations"][arm] for r in mine])) for arm in mine[0]["evaluations"]}
        best_of_costs = {arm: cost for arm, cost in costs.items() if arm == "refined" or arm.startswith("best-of")}
        for label in reward_labels:
            scores = {arm: np.array([r["scores"][arm][label] for r in mine]) for arm in costs}
            for arm, cost in costs.items():
                keep = np.isfinite(scores[arm]) & np.isfinite(scores["refined"]) & np.isfinite(scores["baseline"])
                ci = mean_ci(scores[arm][keep], confidence)
                vs_refined = paired_difference(scores[arm][keep], scores["refined"][keep], confidence)
                vs_baseline = paired_difference(scores[arm][keep], scores["baseline"][keep], confidence)
                match = equal_cost_best_of(cost, best_of_costs) if arm.startswith("search") else None
                vs_equal_cost, equal_cost = Interval(math.nan, math.nan, math.nan, 0), ""
                if match is not None:
                    low, high, w = match
                    pair = keep & np.isfinite(scores[low]) & np.isfinite(scores[high])
                    matched = (1 - w) * scores[low][pair] + w * scores[high][pair]
                    vs_equal_cost, equal_cost = paired_difference(scores[arm][pair], matched, confidence), f"{low} / {high}, w {w:.2f}"
                rows.append(dict(
                    backbone=backbone, reward=label, arm=arm, n=ci.n, nonfinite_dropped=int((~keep).sum()),
                    evaluations=cost, mean=ci.mean, low=ci.low, high=ci.high,
                    vs_refined_mean=vs_refined.mean, vs_refined_low=vs_refined.low, vs_refined_high=vs_refined.high,
                    vs_baseline_mean=vs_baseline.mean, vs_baseline_low=vs_baseline.low, vs_baseline_high=vs_baseline.high,
                    win_rate_vs_refined=win_rate(scores[arm][keep], scores["refined"][keep]), s_per_image=t["seconds"][arm] / len(mine),
                    equal_cost_best_of=equal_cost, vs_equal_cost_mean=vs_equal_cost.mean, vs_equal_cost_low=vs_equal_cost.low,
                    vs_equal_cost_high=vs_equal_cost.high,
                ))
    return rows


# -----------------------------------------------------------------------------


def main():
    config = common.parse_config(Config)
    check(config)
    device, dtype = common.setup_run(config)
    seeds = common.parse_ints(config.seeds, "--seeds")
    searched = bool(search_counts(config.search))  # the search and best-of-M arms run
    specs = reward_specs(config.rewards)
    backbone_names = common.parse_list(config.backbones, "--backbones")
    prompts = runs.load_prompts(config.prompts, config.split, config.limit or None, config.seed)  # UserError if none
    # every reward is built (and every spec checked) before the first image is drawn
    scorers = {label: rewards.build_reward(spec, device, dtype) for label, spec in specs.items()}
    for label, reward in scorers.items():
        if "answers" in getattr(reward, "inputs", ()):
            raise common.UserError(f"reward '{label}' scores the refiner's answers, which baseline images do not have; leave it out")
    refiner = refiners.load_refiner(
        config.refiner, adapter=config.adapter, device=device, dtype=dtype,
        temperature=config.temperature or 1.0, do_sample=config.temperature > 0, max_new_tokens=config.max_new_tokens,
        fast_decode=config.fast_decode, preview_size=config.preview_size,
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    variant = "".join(f"+{kind}:{Path(value).name or value}" for kind, value in (("unet", config.unet), ("lora", config.lora)) if value)
    print(f"{len(prompts)} prompts x {len(seeds)} seeds on {', '.join(backbone_names)}{variant}; rewards {', '.join(specs)}; refiner {config.refiner}")

    # the LRM's preference accuracy first: a bad --lrm / --preference-data fails before the long part
    lrm_model = lrm.load_lrm(config.lrm, device, dtype) if config.lrm else None
    lrm_rows, pair_counts = (lrm.preference_accuracy(lrm_model, scorers, config.preference_data, config.preference_split,
                                                     config.preference_limit, config.seed, device, dtype)
                             if config.preference_data else (None, None))
    if lrm_rows:
        print(reports.lrm_table(lrm_rows))

    records, timing, sheets = [], {}, {}
    labels = backbone_labels(backbone_names, variant)
    lrm_models = latent_reward_models(lrm_model, scorers)
    for name, label in zip(backbone_names, labels):
        backbone = load_sampler(name, lrm_models, config, device, dtype)
        backbone.name = label
        score = lrm.search_scorer(lrm_model, backbone) if searched else None
        mine, seconds, fallbacks, refinements, sheet, evaluations = evaluate_backbone(
            backbone, refiner, scorers, prompts, seeds, config, sheet_prompts=config.sheet_prompts, score=score
        )
        num_steps = config.steps or backbone.spec.steps
        schedule = promptloop.refinement_schedule(num_steps, config.refine_steps) if refiner is not None else []
        records += mine
        timing[label] = {"source": name, "seconds": seconds, "images": len(mine), "fallbacks": fallbacks, "refinements": refinements,
                         "steps": num_steps, "schedule": schedule, "evaluations": evaluations}
        sheets[label] = sheet
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = summarize(records, list(specs), labels, timing, config.confidence)
    search_rows = search_summary(records, list(specs), labels, timing, config.confidence) if searched else None
    meta = {
        "config": asdict(config), "command": shlex.join(["python", "evaluate.py", *sys.argv[1:]]),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "num_prompts": len(prompts), "seeds": seeds,
        "timing": timing, "preference_pairs": pair_counts,
    }
    reports.write_markdown(out / "results.md", rows, meta, lrm_rows, search_rows)
    reports.write_csv(out / "results.csv", rows)
    reports.write_json(out / "results.json", meta | {"rows": rows, "search_rows": search_rows, "lrm_accuracy": lrm_rows, "images": records})
    reports.plot_rewards(out / "results.png", rows, labels, list(specs), config.confidence)
    if search_rows:
        reports.write_csv(out / "search.csv", search_rows, fields=list(search_rows[0]))
        reports.plot_search(out / "search.png", search_rows, labels, list(specs), config.confidence)
    title = (f"baseline vs refined ({Path(config.refiner).name}), seed {seeds[0]}, same initial noise per pair"
             if refiner is not None else f"baseline (no refiner), seed {seeds[0]}")
    reports.sample_sheet(sheets, prompts, title).save(out / "samples.png")

    print(reports.markdown_table(rows, config.confidence))
    if search_rows:
        print(reports.search_table(search_rows, config.confidence))
    print(f"-> {out}/results.md, results.csv, results.json, results.png, samples.png" + (", search.csv, search.png" if search_rows else ""))


if __name__ == "__main__":
    common.run_cli(main)
