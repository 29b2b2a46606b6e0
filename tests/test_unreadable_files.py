"""A weights file cut short or garbled, wherever the user hands one in, is one clear error naming it.

Each loader of a user-given file -- an LRM folder, a LoRA adapter, a refiner or VLM-judge folder, a
reward head, a --resume checkpoint, a latent cache -- gets a valid artifact (the tiny models of
conftest.py or the toy world) with its .safetensors / .pt file broken, and must raise
common.UserError that names the file (runs.read_tensors, common.unreadable); the scripts then exit 2
with one line on stderr, never a SafetensorError or unpickling traceback (subprocess runs, slow tier).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import common
import lrm
import refiners
import rewards
import runs

REPO = Path(__file__).resolve().parents[1]
ADAPTER = common.TOY_DIR / "adapters" / "grpo-toy-composite"
BREAKS = ("first-100-bytes", "half", "random-bytes")


def break_file(path, how):
    """Cut `path` short (its first 100 bytes, its first half) or overwrite it with as many random bytes."""
    data = Path(path).read_bytes()
    broken = {"first-100-bytes": data[:100], "half": data[: len(data) // 2],
              "random-bytes": bytes(torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(0)).tolist())}
    Path(path).write_bytes(broken[how])


def names(path):
    """pytest.raises' match for a UserError that names `path`."""
    return re.escape(f"cannot read '{path}'")


@pytest.fixture(scope="module")
def lrm_dir(tiny_sd15_dir, tmp_path_factory):
    """A valid LRM folder (lrm_config.json + model.safetensors) on the tiny SD1.5."""
    folder = tmp_path_factory.mktemp("lrm")
    config = lrm.LRMConfig(backbone=str(tiny_sd15_dir), hidden=16)
    lrm.save_lrm(lrm.LatentRewardModel(common.load_backbone(str(tiny_sd15_dir)), config), folder)
    return folder


def broken_copy(folder, tmp_path, file, how="first-100-bytes"):
    copy = Path(shutil.copytree(folder, tmp_path / Path(folder).name))
    break_file(copy / file, how)
    return copy


# -----------------------------------------------------------------------------
# the loaders (fast tier)


@pytest.mark.parametrize("how", BREAKS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_and_checkpoint_files_that_are_broken_are_named(suffix, how, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / f"weights{suffix}"
    state = {"weight": torch.randn(64, 64)}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    torch.testing.assert_close(rewards.load_weights(path), state)  # intact, it loads
    break_file(path, how)
    for load in (rewards.load_weights, runs.load_checkpoint):
        with pytest.raises(common.UserError, match=names(path)):
            load(path)


@dataclass
class RunConfig:
    steps: int = 1


def test_resume_names_a_broken_checkpoint_and_refuses_one_of_another_kind(tmp_path):
    path = tmp_path / "checkpoint.pt"
    runs.save_checkpoint(path, dict(step=1, config={"steps": 1}))
    assert runs.resume_checkpoint(path, RunConfig(), may_change=())["step"] == 1
    runs.save_checkpoint(path, {"weight": torch.zeros(2)})  # a state dict, not a run's checkpoint
    with pytest.raises(common.UserError, match="not a checkpoint"):
        runs.resume_checkpoint(path, RunConfig(), may_change=())
    break_file(path, "half")
    with pytest.raises(common.UserError, match=f"--resume: {names(path)}"):
        runs.resume_checkpoint(path, RunConfig(), may_change=())


@pytest.mark.parametrize("how", BREAKS)
def test_refiner_with_a_broken_adapter_names_its_file(how, tmp_path):
    adapter = broken_copy(ADAPTER, tmp_path, "adapter_model.safetensors", how)
    with pytest.raises(common.UserError, match=f"cannot load refiner 'toy-refiner': {names(adapter / 'adapter_model.safetensors')}"):
        refiners.load_refiner("toy-refiner", adapter=str(adapter))
    with pytest.raises(common.UserError, match=names(adapter / "adapter_model.safetensors")):  # the adapter folder as the refiner
        refiners.load_refiner(str(adapter))


def test_refiner_with_a_garbled_adapter_config_names_it(tmp_path):
    adapter = broken_copy(ADAPTER, tmp_path, "adapter_config.json", "random-bytes")
    with pytest.raises(common.UserError, match=names(adapter / "adapter_config.json")):
        refiners.load_refiner(str(adapter))


def test_refiner_and_vlm_judge_folders_with_broken_weights_name_the_file(tiny_refiner_dir, tmp_path):
    folder = broken_copy(tiny_refiner_dir, tmp_path, "model.safetensors", "half")
    with pytest.raises(common.UserError, match=f"cannot load refiner '{re.escape(str(folder))}': {names(folder / 'model.safetensors')}"):
        refiners.load_refiner(str(folder))
    with pytest.raises(common.UserError, match=f"cannot load VLM judge '{re.escape(str(folder))}': {names(folder / 'model.safetensors')}"):
        rewards.vlm_reward(str(folder), "cpu", torch.float32)


@pytest.mark.parametrize("how", BREAKS)
def test_lrm_with_broken_weights_names_the_file(lrm_dir, how, tmp_path):
    lrm.load_lrm(lrm_dir)  # intact, it loads
    folder = broken_copy(lrm_dir, tmp_path, "model.safetensors", how)
    with pytest.raises(common.UserError, match=f"cannot load latent reward model '{re.escape(str(folder))}': {names(folder / 'model.safetensors')}"):
        lrm.load_lrm(folder)
    with pytest.raises(common.UserError, match=names(folder / "model.safetensors")):  # the reward lrm:PATH
        rewards.build_reward(f"lrm:{folder}")


@pytest.mark.parametrize("config_text", ["{\"backbone\": \"toy\"", "[1, 2]", "{\"backbone\": \"toy\", \"no_such_field\": 1}"])
def test_lrm_with_a_broken_config_names_it(lrm_dir, config_text, tmp_path):
    folder = Path(shutil.copytree(lrm_dir, tmp_path / "lrm"))
    (folder / "lrm_config.json").write_text(config_text)
    with pytest.raises(common.UserError, match=names(folder / "lrm_config.json")):
        lrm.load_lrm(folder)


@pytest.mark.parametrize("how", BREAKS)
def test_broken_latent_cache_is_named(how, tmp_path):
    """train_reward.py's latent cache: a file cut short is named (and how to recover), not a traceback."""
    from safetensors.torch import save_file

    import train_reward

    cfg = SimpleNamespace(cache_latents=True, cache_dir=str(tmp_path / "cache"), out=str(tmp_path))
    backbone = SimpleNamespace(spec=SimpleNamespace(source="tiny"))
    dist = runs.Distributed(0, 1, torch.device("cpu"))
    data = tmp_path / "pairs.parquet"
    data.write_bytes(b"")  # only its name and mtime key the cache
    args = (cfg, backbone, dist, str(data), "train", 64, None, None)
    path = train_reward.cache_path(*args[:2], *args[3:])
    path.parent.mkdir()
    latents = torch.randn(4, 4, 8, 8)
    save_file({"latents_0": latents, "latents_1": latents.clone(), "labels": torch.ones(4)}, path,
              metadata={"captions": json.dumps(["a"] * 4), "counts": json.dumps({"rows": 4})})
    assert train_reward.load_split(*args)["captions"] == ["a"] * 4  # intact, it loads
    break_file(path, how)
    with pytest.raises(common.UserError, match=f"latent cache: {names(path)}.*delete it"):
        train_reward.load_split(*args)


# -----------------------------------------------------------------------------
# the scripts: exit 2, one line on stderr, no traceback (slow tier)

# library output a run prints before it fails: progress bars off, warnings off
QUIET = dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONWARNINGS="ignore",
             TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
# diffusers draws "Loading pipeline components" whatever the environment says
PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[")


def run_script(script, *args):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, **QUIET), timeout=600, cwd=REPO)


def stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]


def assert_one_clear_line(proc, path):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = stderr_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("error:") and f"cannot read '{path}'" in lines[0], proc.stderr


@pytest.mark.slow
def test_sample_with_a_broken_adapter_exits_2_with_one_line(tmp_path):
    adapter = broken_copy(ADAPTER, tmp_path, "adapter_model.safetensors", "random-bytes")
    proc = run_script("sample.py", "--refiner", "toy-refiner", "--adapter", adapter, "--prompt", "a red circle",
                      "--out", tmp_path / "out", "--device", "cpu")
    assert_one_clear_line(proc, adapter / "adapter_model.safetensors")


@pytest.mark.slow
def test_train_refiner_with_a_broken_lrm_reward_or_checkpoint_exits_2_with_one_line(lrm_dir, tmp_path):
    folder = broken_copy(lrm_dir, tmp_path, "model.safetensors")
    args = ["--backbone", "toy", "--refiner", "toy-refiner", "--prompts", "toy", "--device", "cpu"]
    proc = run_script("train_refiner.py", *args, "--reward", f"lrm:{folder}", "--out", tmp_path / "run")
    assert_one_clear_line(proc, folder / "model.safetensors")
    assert not proc.stderr.strip().count("\n")  # nothing else on stderr: the files are read before any model loads
    checkpoint = tmp_path / "resumed" / "checkpoint.pt"
    runs.save_checkpoint(checkpoint, dict(step=1, config={}))
    break_file(checkpoint, "first-100-bytes")
    proc = run_script("train_refiner.py", *args, "--reward", "jpeg", "--out", checkpoint.parent, "--resume")
    assert_one_clear_line(proc, checkpoint)
