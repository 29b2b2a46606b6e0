"""
runs.py: the plumbing of a run -- prompt sources, seeding, checkpoints and the DDP collectives.

    prompt sources   toy prompts, text files, Pick-a-Pic captions (parquet or hub)
    seeding          one seed per part of a run (mix_seed), every generator seeded (seed_everything)
    checkpoints      atomic save, --resume with a config check, log.jsonl trimmed to the checkpoint;
                     weights files read with one clear error naming a file that is cut short or garbled
    distributed      plain DDP under torchrun: set-up, all-reduce, gather, the ranks' divergence

Used by train_refiner.py, train_reward.py and evaluate.py; nothing here knows the method.
"""

import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import (
    UNREADABLE_ERRORS,
    UserError,
    first_line,
    is_hub_id,
    pick_device,
    unreadable,
)

# -----------------------------------------------------------------------------
# prompt sources (text file, Pick-a-Pic captions, toy prompts)
#
#     toy                          the toy grammar's prompts (toy.toy_prompts; splits train / test;
#                                  drawn with `seed`, repeating once all are used)
#     toy-partial | toy-open       those that leave an attribute free | the background free
#     | toy-full                    | those that name everything (see toy_prompts)
#     prompts.txt                  one prompt per line, blank lines skipped (one set: `split` unused)
#     data.parquet | FOLDER        Pick-a-Pic v2 schema, only the `caption` column is read; in a
#                                  folder the files of the split (parquet_split_files) when there
#                                  are such files, else all of them
#     pickapic | HUB_ID            a hub data set via `datasets`, streamed (no full download of
#                                  the images), e.g. yuvalkirstain/pickapic_v2
# Captions are stripped, deduplicated (first occurrence kept, source order), non-strings and
# empty ones skipped and counted.

PROMPT_SOURCES = {"pickapic": "yuvalkirstain/pickapic_v2"}
CAPTION_COLUMN = "caption"


def parquet_split_files(folder, split):
    """The parquet files of one split in a folder: `{split}.parquet`, `{split}-*.parquet` (the hub's
    layout, e.g. data/train-00000-of-00645.parquet) or any file in a subfolder named `split`."""
    files = sorted(Path(folder).rglob("*.parquet"))
    return [f for f in files if re.fullmatch(rf"{re.escape(split)}(-.*)?\.parquet", f.name) or f.parent.name == split]


def _check_caption_column(files):
    import pyarrow.parquet as pq

    for f in files:
        try:
            names = pq.read_schema(f).names
        except Exception as e:  # pyarrow raises its own ArrowInvalid for files that are not parquet
            raise UserError(f"cannot read parquet file '{f}': {first_line(e)}") from e
        if CAPTION_COLUMN not in names:
            raise UserError(f"'{f}' has no '{CAPTION_COLUMN}' column (columns: {', '.join(names[:8])})")


def _caption_rows(source, split):
    """Iterate the raw caption column of a parquet file/folder or a hub data set."""
    import datasets

    try:
        if Path(source).exists():
            files = [source] if Path(source).is_file() else parquet_split_files(source, split) or sorted(Path(source).rglob("*.parquet"))
            files = [str(f) for f in files]
            if not files:
                raise UserError(f"no parquet files in '{source}'")
            _check_caption_column(files)
            rows = datasets.load_dataset("parquet", data_files=files, split="train", columns=[CAPTION_COLUMN])
        else:
            rows = datasets.load_dataset(source, split=split, streaming=True, columns=[CAPTION_COLUMN])
        for row in rows:
            yield row[CAPTION_COLUMN]
    except UserError:
        raise
    except (OSError, ValueError, KeyError, ImportError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as e:
        raise UserError(f"cannot read captions ('{CAPTION_COLUMN}' column) from '{source}' split '{split}': {first_line(e)}") from e


def load_prompts(source, split="train", limit=None, seed=0):
    """User prompts from a source (see above) -> list[str], at most `limit` (the first ones).

    seed: draws the toy prompts (the other sources are read in their own order)."""
    if not isinstance(source, str) or not source.strip():
        raise UserError("empty prompt source: use 'toy', a text file, a parquet file/folder or a hub id")
    if limit is not None and limit < 1:
        raise UserError(f"prompt limit must be >= 1, got {limit}")
    import toy

    source = PROMPT_SOURCES.get(source, source)
    if source == "toy" or source.startswith("toy-") and source[4:] in toy.TOY_PROMPT_KINDS:
        try:
            prompts = toy.toy_prompts(split, limit, seed, kind=source[4:] or "all")
        except ValueError as e:
            raise UserError(str(e)) from e
    elif Path(source).is_file() and not source.endswith(".parquet"):
        try:
            lines = Path(source).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file '{source}': {e}") from e
        prompts = _distinct_prompts(lines, limit)[0]
    elif Path(source).exists() or is_hub_id(source):  # parquet or hub id
        prompts, skipped = _distinct_prompts(_caption_rows(source, split), limit)
        if skipped:
            print(f"prompts: skipped {skipped} empty or non-text captions in '{source}'", file=sys.stderr)
    else:
        raise UserError(f"prompt source '{source}' not found: use 'toy', a text file, a parquet file/folder or a hub id")
    if not prompts:
        raise UserError(f"no prompts in '{source}' (split '{split}')")
    return prompts


def train_and_heldout_prompts(source, heldout_source="", limit=None, heldout=16, seed=0):
    """(train, held-out) prompts: the 'train' split of `source` (at most `limit`) and `heldout`
    prompts of the 'test' split of `heldout_source`, or of `source` when it is empty. A source
    without splits (a text file) has the held-out prompts drawn out of it (a fifth at most)."""
    train = load_prompts(source, "train", limit, seed)
    if heldout_source:
        return train, load_prompts(heldout_source, "test", heldout, seed)
    held = load_prompts(source, "test", heldout, seed)
    if set(held) & set(train):
        held = random.Random(seed).sample(train, min(heldout, len(train) // 5))
        train = [p for p in train if p not in set(held)]
        if not held or not train:
            raise UserError(f"too few prompts in '{source}' to hold some out: give --heldout-prompts")
    return train, held


def _distinct_prompts(rows, limit):
    """Stripped, deduplicated strings in order; stops at `limit`. Returns (prompts, skipped)."""
    seen, prompts, skipped = set(), [], 0
    for row in rows:
        text = " ".join(row.split()) if isinstance(row, str) else ""
        if not text:
            skipped += 1
            continue
        if text not in seen:
            seen.add(text)
            prompts.append(text)
            if limit is not None and len(prompts) >= limit:
                break
    return prompts, skipped


# -----------------------------------------------------------------------------
# training utilities


def mix_seed(seed, offset):
    """A seed for one part of a run (a step, an image, a rank) from the run's --seed: far apart for
    different seeds, so runs with seeds 0 and 1 share no part's draws."""
    return seed * 1_000_003 + offset


def seed_everything(seed):
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path, state):
    """Atomic: write to a temp file in the same folder, then rename over the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_tensors(path, what):
    """The dict in a .safetensors file or a torch file (torch.load weights_only: tensors and plain
    containers, never code). UserError '{what}: cannot read PATH: reason' if it cannot be read."""
    from safetensors.torch import load_file

    try:
        if str(path).endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_ERRORS as e:
        raise UserError(f"{what}: {unreadable(e, path)}") from e


def load_checkpoint(path):
    return read_tensors(path, "--resume")


def resume_checkpoint(path, config, may_change):
    """The checkpoint `--resume` continues from; UserError if there is none (a typo in --out must not
    start a fresh run silently, as nanoGPT and HF Trainer refuse too) or if it was written with a
    different config, apart from the fields in `may_change` (run length, logging, device, ...)."""
    from dataclasses import asdict

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise UserError(f"--resume: {path} is not a checkpoint of this script (no config in it)")
    changed = sorted(k for k, v in asdict(config).items() if k not in may_change and state["config"].get(k) != v)
    if changed:
        raise UserError(f"--resume: {path} was written with a different {', '.join(changed)}")
    return state


def trim_log(path, step):
    """Keep the lines of log.jsonl up to `step` (a resumed run redoes the steps after its checkpoint);
    step 0, a fresh run, keeps none. A line cut short by a kill, or one without a step, is dropped."""
    path = Path(path)
    kept = []
    for line in path.read_text().splitlines() if path.is_file() and step > 0 else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(kept))


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """Plain DDP under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set); a single process otherwise.

    nccl on GPUs (one per process), gloo on CPU."""
    if "RANK" not in os.environ:
        return Distributed(0, 1, pick_device(device))
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def barrier(dist_info):
    if dist_info.world_size > 1:
        torch.distributed.barrier()


def all_sum(value, dist_info):
    """Sum of a float over ranks (token counts, reward sums)."""
    tensor = torch.tensor(float(value), dtype=torch.float64, device=dist_info.device)
    if dist_info.world_size > 1:
        torch.distributed.all_reduce(tensor)
    return tensor.item()


def all_reduce_gradients(params, dist_info):
    """Average gradients over ranks (what DDP does; done by hand where a model also runs generate()
    and peft's disable_adapter(), which DDP's forward wrapper does not cover)."""
    if dist_info.world_size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
        p.grad /= dist_info.world_size


def all_gather(values, dist_info):
    """(N,) on each rank -> (world * N,) everywhere, on the CPU (for logging over all ranks)."""
    if dist_info.world_size == 1:
        return values
    gathered = [torch.zeros_like(values, device=dist_info.device) for _ in range(dist_info.world_size)]
    torch.distributed.all_gather(gathered, values.to(dist_info.device))
    return torch.cat(gathered).cpu()


def rank_divergence(params, dist_info):
    """Largest |w_rank - w_rank0| over all parameters and ranks: 0.0 when the ranks are in sync."""
    if dist_info.world_size == 1:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in params]).to(dist_info.device)
    reference = flat.clone()
    torch.distributed.broadcast(reference, 0)
    gap = (flat - reference).abs().max()
    torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
    return gap.item()


def cleanup_distributed(dist_info):
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
