"""
reports.py: evaluate.py's outputs -- the tables a person reads, the files a program reads, the pictures.

    markdown   results.md: baseline vs refined per backbone x reward, the search arms, the LRM's
               preference accuracy (markdown_table, search_table, lrm_table, write_markdown)
    csv, json  results.csv / search.csv (write_csv), results.json (write_json: NaN written as null)
    pictures   results.png and search.png (matplotlib, plot_rewards / plot_search), samples.png
               (PIL, sample_sheet: baseline vs refined from the same noise, the refined prompt under each)

Each writer takes the plain dicts evaluate.py built (rows of its summaries, per-image records, a
meta dict) and computes nothing new: the statistics live in evaluate.py, where the tests find them.
"""

import csv
import json
import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import common

# -----------------------------------------------------------------------------
# markdown: results.md


def _num(x, digits=3):
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _interval(mean, low, high):
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]" if math.isfinite(low) else f"{mean:.3f}"


def markdown_table(rows, confidence):
    pct = f"{confidence:.0%}"
    lines = [
        f"| backbone | reward | n | baseline ({pct} CI) | refined ({pct} CI) | refined − baseline ({pct} CI) | win rate | s/img baseline | s/img refined | overhead |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['reward']} | {r['n']} | {_interval(r['baseline_mean'], r['baseline_low'], r['baseline_high'])} "
            f"| {_interval(r['refined_mean'], r['refined_low'], r['refined_high'])} | {_interval(r['diff_mean'], r['diff_low'], r['diff_high'])} "
            f"| {_num(r['win_rate'], 2)} | {_num(r['baseline_s_per_image'])} | {_num(r['refined_s_per_image'])} | {_num(r['overhead'], 2)}{'×' * math.isfinite(r['overhead'])} |"
        )
    return "\n".join(lines)


def search_table(rows, confidence):
    pct = f"{confidence:.0%}"
    lines = [f"| backbone | reward | arm | denoiser evals / image | mean ({pct} CI) | − refined ({pct} CI, paired) "
             f"| − baseline ({pct} CI, paired) | win rate vs refined | s / image | − best-of at equal cost ({pct} CI, paired) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['reward']} | {r['arm']} | {_num(r['evaluations'], 1)} | {_interval(r['mean'], r['low'], r['high'])} "
              f"| {_interval(r['vs_refined_mean'], r['vs_refined_low'], r['vs_refined_high'])} "
              f"| {_interval(r['vs_baseline_mean'], r['vs_baseline_low'], r['vs_baseline_high'])} | {_num(r['win_rate_vs_refined'], 2)} "
              f"| {_num(r['s_per_image'])} | {_equal_cost(r)} |" for r in rows]
    return "\n".join(lines)


def _equal_cost(row):
    if not row["equal_cost_best_of"]:
        return "—"
    return f"{_interval(row['vs_equal_cost_mean'], row['vs_equal_cost_low'], row['vs_equal_cost_high'])} ({row['equal_cost_best_of']})"


def lrm_table(rows):
    lines = ["| scorer | noise bucket | accuracy | pairs |", "|---|---|---|---|"]
    lines += [f"| {r['scorer']} | {r['bucket']} | {_num(r['accuracy'])} | {r['n']} |" for r in rows]
    return "\n".join(lines)


def write_markdown(path, rows, meta, lrm_rows=None, search_rows=None):
    config = meta["config"]
    refined = config["refiner"] not in (None, "", "none")
    notes = [
        f"- refiner: `{config['refiner']}`" + (f" + adapter `{config['adapter']}`" if config["adapter"] else "")
        + (f", K = {config['refine_steps']} refinements, preview decoder `{config['preview_decoder']}`"
           + (", blank previews" if config["blank_preview"] else "") + f", temperature {config['temperature']}"
           if refined else " (baseline only)"),
        f"- prompts: `{config['prompts']}` (split {config['split']}), {meta['num_prompts']} prompts × seeds {meta['seeds']}",
        f"- intervals: Student's t, {config['confidence']:.0%}, an image is the unit; the difference is paired (same seed, same prompt, same initial noise)",
        "- win rate: share of pairs where the refined image scores higher (ties count half)",
        "- seconds per image: pipeline calls (refiner included), timed side by side batch by batch; overhead = refined / baseline",
    ]
    for backbone, t in meta["timing"].items():
        if t["refinements"]:
            notes.append(f"- `{backbone}`: {t['fallbacks']} of {t['refinements']} refiner answers unusable (current prompt kept), refinements before steps {t['schedule']}")
    dropped = sum(r["nonfinite_dropped"] for r in rows)
    if dropped:
        notes.append(f"- {dropped} non-finite scores dropped (with their pair)")
    text = [
        "# Evaluation: baseline vs refined", "",
        markdown_table(rows, config["confidence"]), "",
        *notes, "",
        "Reproduce:", "", "```", meta["command"], "```", "",
    ]
    if search_rows:
        text += [
            "## LRM-guided search vs best-of-n", "",
            f"Scorer: the latent reward model `{config['lrm']}`. search M: at each refinement M candidate prompts, each "
            "distinct one continued to the next refinement point (the last to the end), the one whose latents the LRM "
            "scores best kept. best-of-n: n whole refined images from n initial noises (the first the other arms'), the "
            "LRM's pick by final latents. Denoiser evaluations: those made per image (a search runs one row per image "
            "before its first refinement, one per distinct candidate after); both cost M (n) x the refiner rows of the "
            "refined arm. Best-of at equal cost: the two best-of arms around the search's cost (the refined arm is "
            "best-of-1), the dearer with probability w, so that the mixture costs what the search did; paired per image.", "",
            search_table(search_rows, config["confidence"]), "",
        ]
    if lrm_rows:
        counts = meta["preference_pairs"]
        text += [
            "## Preference accuracy on held-out pairs", "",
            f"`{config['lrm']}` on `{config['preference_data']}` (split {config['preference_split']}): "
            f"{counts['used']} pairs used of {counts['rows']} rows, {counts['ties']} ties (left out of the accuracy). "
            "The LRM scores noisy latents: both images of a pair share t and eps.", "",
            lrm_table(lrm_rows), "",
        ]
    Path(path).write_text("\n".join(text))


# -----------------------------------------------------------------------------
# csv and json: results.csv, search.csv, results.json


CSV_FIELDS = [
    "backbone", "reward", "n", "baseline_mean", "baseline_low", "baseline_high", "refined_mean", "refined_low",
    "refined_high", "diff_mean", "diff_low", "diff_high", "win_rate", "baseline_s_per_image", "refined_s_per_image",
    "overhead", "fallback_rate", "nonfinite_dropped",
]


def write_csv(path, rows, fields=CSV_FIELDS):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in fields})


def _json_safe(value):
    """NaN is not JSON: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json(path, value):
    """results.json: indented, every NaN / inf as null."""
    Path(path).write_text(json.dumps(_json_safe(value), indent=1))


# -----------------------------------------------------------------------------
# pictures: results.png, search.png, samples.png


def plot_rewards(path, rows, backbone_labels, reward_labels, confidence):
    """One panel per reward (scales differ), bars per backbone: baseline vs refined, CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel_width = max(3.5, 1.0 + 1.3 * len(backbone_labels))
    fig, axes = plt.subplots(1, len(reward_labels), figsize=(panel_width * len(reward_labels), 3.6), squeeze=False)
    x = np.arange(len(backbone_labels))
    for ax, label in zip(axes[0], reward_labels):
        by_backbone = {r["backbone"]: r for r in rows if r["reward"] == label}
        for offset, arm, color in ((-0.2, "baseline", "#9aa5b1"), (0.2, "refined", "#2f6fdf")):
            means = np.array([by_backbone[b][f"{arm}_mean"] for b in backbone_labels], dtype=float)
            if not np.isfinite(means).any():
                continue
            lows = np.array([by_backbone[b][f"{arm}_low"] for b in backbone_labels], dtype=float)
            highs = np.array([by_backbone[b][f"{arm}_high"] for b in backbone_labels], dtype=float)
            errors = np.nan_to_num(np.stack([means - lows, highs - means]))
            ax.bar(x + offset, means, 0.4, yerr=errors, capsize=4, color=color, label=arm)
        ax.set_xticks(x, backbone_labels, rotation=15)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        # bars of rewards with a large offset hide differences: zoom on the range of the intervals
        spans = [by_backbone[b][k] for b in backbone_labels for k in ("baseline_low", "baseline_high", "refined_low", "refined_high", "baseline_mean", "refined_mean")]
        spans = [s for s in spans if s is not None and math.isfinite(s)]
        if spans and min(spans) > 0 and (max(spans) - min(spans)) < 0.5 * max(spans):
            margin = 0.15 * (max(spans) - min(spans) + 1e-9)
            ax.set_ylim(min(spans) - margin, max(spans) + margin)
    axes[0][0].set_ylabel(f"mean reward ({confidence:.0%} CI)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_search(path, rows, backbone_labels, reward_labels, confidence):
    """Reward against the denoiser evaluations made per image: search M and best-of-n from the
    refined arm (M = n = 1) on, the baseline as a dashed line; one panel per backbone x reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(backbone_labels), len(reward_labels), figsize=(4.2 * len(reward_labels), 3.4 * len(backbone_labels)),
                             squeeze=False)
    for axes_row, backbone in zip(axes, backbone_labels):
        for ax, label in zip(axes_row, reward_labels):
            mine = {r["arm"]: r for r in rows if r["backbone"] == backbone and r["reward"] == label}
            for prefix, color in (("search", "#2f6fdf"), ("best-of", "#e07b39")):
                line = [mine["refined"]] + [r for arm, r in mine.items() if arm.startswith(prefix)]
                x = np.array([r["evaluations"] for r in line], dtype=float)
                y = np.array([r["mean"] for r in line], dtype=float)
                errors = np.nan_to_num(np.stack([y - np.array([r["low"] for r in line], dtype=float),
                                                 np.array([r["high"] for r in line], dtype=float) - y]))
                ax.errorbar(x, y, yerr=errors, marker="o", capsize=3, color=color, label=f"{prefix} (1: refined)")
            ax.axhline(mine["baseline"]["mean"], color="#9aa5b1", linestyle="--", label="baseline (no refiner)")
            ax.set_xscale("log", base=2)
            ticks = sorted({r["evaluations"] for arm, r in mine.items() if not arm.startswith("search")})  # a search's cost is its own
            ax.set_xticks(ticks, [f"{e:.0f}" for e in ticks])
            ax.minorticks_off()
            ax.set_xlabel("denoiser evaluations per image")
            ax.set_title(f"{backbone}: {label}")
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean reward ({confidence:.0%} CI)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CELL = 160  # px: toy images are upscaled so that a person can see them


def sample_sheet(sheets, prompts, title):
    """Rows = prompts, columns = backbone x (baseline, refined); the user prompt over each row,
    the final refined prompt under each refined image."""
    font, line_height, chars, gap = common.caption_font(12), 15, CELL // 7, 12
    columns = [(backbone, arm) for backbone, sheet in sheets.items() for arm in ("baseline", "refined") if arm in sheet]
    lefts, x = [], 0
    for c, (backbone, arm) in enumerate(columns):  # a gap between backbones
        x += gap if c and arm == "baseline" else 0
        lefts.append(x)
        x += CELL
    rows = min(len(sheet["baseline"]) for sheet in sheets.values())
    captions = {backbone: [textwrap.wrap("refined prompt: " + p, chars)[:6] for p in sheet["final_prompts"]]
                for backbone, sheet in sheets.items() if "refined" in sheet}
    caption_lines = max([len(lines) for per_prompt in captions.values() for lines in per_prompt], default=0)
    width = max(x, 2 * CELL)  # room for the prompt even with one column
    row_height = line_height * 3 + CELL + line_height * caption_lines + 10
    image = Image.new("RGB", (width, 40 + line_height + rows * row_height), "white")
    draw = ImageDraw.Draw(image)
    for j, line in enumerate(textwrap.wrap(title, width // 7)[:2]):
        draw.text((4, 4 + line_height * j), line, fill="black", font=font)
    for left, (backbone, arm) in zip(lefts, columns):
        draw.text((left + 4, 40), f"{backbone}: {arm}", fill="gray", font=font)
    for b in range(rows):
        top = 40 + line_height + b * row_height
        for j, line in enumerate(textwrap.wrap(f"user prompt: {prompts[b]}", width // 7)[:2]):
            draw.text((4, top + 2 + line_height * j), line, fill="black", font=font)
        for left, (backbone, arm) in zip(lefts, columns):
            tile = common.to_pil(sheets[backbone][arm][b].unsqueeze(0))[0].resize((CELL, CELL), Image.NEAREST)
            image.paste(tile, (left, top + line_height * 3))
            if arm == "refined":
                for j, line in enumerate(captions[backbone][b]):
                    draw.text((left + 4, top + line_height * 3 + CELL + 2 + line_height * j), line, fill="black", font=font)
    return image
