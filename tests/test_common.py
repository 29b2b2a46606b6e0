"""common.py's small helpers: config checks, resume, log trimming, paths vs hub ids, sizes."""

import json
import sys
from dataclasses import dataclass, field

import pytest
import torch

import common
import promptloop
import runs


@dataclass
class _Config:
    steps: int = field(default=10, metadata={"help": "steps"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    every: int = field(default=0, metadata={"help": "interval, 0 = never"})
    size: int | None = field(default=None, metadata={"help": "side"})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_for_every_script(value):
    with pytest.raises(common.UserError, match="--lr must be a finite number"):
        common.parse_config(_Config, [f"--lr={value}"])
    assert common.parse_config(_Config, ["--lr", "0.5"]).lr == 0.5


def test_require_names_the_first_bad_field():
    common.require(_Config(), positive=("steps", "lr", "size"), non_negative=("every",))  # size None: a default
    with pytest.raises(common.UserError, match="--steps must be > 0, got 0"):
        common.require(_Config(steps=0), positive=("steps", "lr"))
    with pytest.raises(common.UserError, match="--every must be >= 0, got -1"):
        common.require(_Config(every=-1), non_negative=("every",))
    with pytest.raises(common.UserError, match="--lr must be > 0"):
        common.require(_Config(lr=-1e-3), positive=("lr",))


def test_resume_refuses_a_missing_checkpoint_and_a_changed_config(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(common.UserError, match="no checkpoint"):
        runs.resume_checkpoint(path, _Config(), {"steps"})
    runs.save_checkpoint(path, {"config": {"steps": 10, "lr": 1e-3, "every": 0, "size": None}, "step": 4})
    assert runs.resume_checkpoint(path, _Config(steps=20), {"steps"})["step"] == 4  # steps may change
    with pytest.raises(common.UserError, match="different lr"):
        runs.resume_checkpoint(path, _Config(lr=1e-2), {"steps"})


def test_trim_log_keeps_the_checkpointed_steps_and_drops_a_cut_line(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in (0, 1, 2, 3, 4)]
    log.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # the last line cut short by a kill
    runs.trim_log(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 1, 2, 3]
    runs.trim_log(log, 0)  # a fresh run keeps nothing
    assert log.read_text() == ""
    runs.trim_log(tmp_path / "missing.jsonl", 3)  # no log yet: an empty one
    assert (tmp_path / "missing.jsonl").read_text() == ""


def test_paths_and_hub_ids(tmp_path):
    for hub_id in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "Qwen/Qwen2.5-VL-3B-Instruct", "yuvalkirstain/pickapic_v2"):
        assert common.is_hub_id(hub_id) and not common.looks_like_path(hub_id)
    for path in ("./model", "/abs/dir", "~/dir", "a/b/c", "data.parquet", "data/train.parquet", "ImageReward.pt", str(tmp_path)):
        assert common.looks_like_path(path) and not common.is_hub_id(path), path
    assert not common.is_hub_id("sd15")  # an alias is neither


def test_parquet_split_files_do_not_mix_similar_split_names(tmp_path):
    for name in ("train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "validation.parquet",
                 "validation_unique.parquet", "test.parquet"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"")
    names = lambda split: [f.name for f in runs.parquet_split_files(tmp_path, split)]  # noqa: E731
    assert names("train") == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert names("validation") == ["validation.parquet"]
    assert names("validation_unique") == ["validation_unique.parquet"]
    assert names("dev") == []


def test_image_side_and_latent_shape(sd15):
    f = sd15.pipe.vae_scale_factor
    assert common.image_side(sd15) == sd15.pipe.unet.config.sample_size * f  # the UNet's native size
    assert common.latent_shape(sd15, 16 * f) == (4, 16, 16)
    for bad in (f + 1, f // 2):
        with pytest.raises(common.UserError, match=f"multiple of {f}"):
            common.image_side(sd15, bad)
    with pytest.raises(common.UserError, match=f"multiple of {f}"):
        promptloop.refined_sample(sd15, ["a circle"], num_steps=1, size=f + 1)


def test_refined_sample_scores_with_every_input_a_reward_reads(sd15):
    seen = {}

    def reward(images, prompts, *, refined_prompts=None, answers=None, latents=None):
        seen.update(prompts=prompts, refined_prompts=refined_prompts, answers=answers, latents=latents)
        return images.mean((1, 2, 3))

    result = promptloop.refined_sample(sd15, ["a circle", "a square"], num_steps=2, generator=torch.Generator().manual_seed(0))
    scores = result.score(reward)
    torch.testing.assert_close(scores, result.images.mean((1, 2, 3)))
    assert seen["prompts"] == ["a circle", "a square"] and seen["answers"] is None
    assert torch.equal(seen["latents"], result.latents)
    with pytest.raises(ValueError, match="1 scores for 2 images"):
        result.score(lambda images, prompts, **_: torch.zeros(1))


def test_an_unknown_dtype_is_a_user_error_in_every_script(tmp_path, monkeypatch):
    """--dtype is checked where it is resolved (common.pick_dtype), so the scripts that pick their
    device themselves (train_refiner.py and train_reward.py under torchrun) refuse it in one line too."""
    import train_refiner
    import train_reward

    with pytest.raises(common.UserError, match="--dtype must be one of"):
        common.pick_dtype("fp64", torch.device("cpu"))
    with pytest.raises(common.UserError, match="--dtype must be one of"):
        train_refiner.train(train_refiner.Config(dtype="fp64", backbone="toy", refiner="toy-refiner", reward="toy-aesthetic",
                                                 out=str(tmp_path / "refiner")))
    monkeypatch.setattr(sys, "argv", ["train_reward.py", "--dtype", "fp64", "--out", str(tmp_path / "lrm")])
    with pytest.raises(common.UserError, match="--dtype must be one of"):
        train_reward.main()
