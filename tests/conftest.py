"""Shared fixtures: tiny models built in-process (no network, no downloads).

Does a test guard anything? Plant the bug by hand and watch which test fails. Change one line of
product code to the bug, run the fast tests that should catch it, restore the line exactly (`git
diff FILE` shows only what was there before). For example, flip the sign of GRPO's advantage in
train_refiner.group_advantages, `(r - mean) / (std + eps)` -> `(mean - r) / (std + eps)`:

    pytest -q -m "not slow" tests/test_grpo_math.py tests/test_train_refiner.py

must fail (test_grpo_math's hand-computed advantages and the one-step test that the better
completion's log-prob rises). A bug that no fast test catches is a missing test: write it, see it
fail on the planted bug, pass on the real code. A test that cannot fail this way (a fit scored on
its own data, `ratio > 0`, "this flag changes nothing") guards nothing."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# tiny models: one thread each is fastest, and subprocesses (torchrun pairs) do not oversubscribe
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import common  # noqa: E402
import refiners  # noqa: E402
import toy  # noqa: E402

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "on", "background", "large", "small"]


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd15")
    toy.tiny_sd15_pipeline(WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    toy.tiny_sdxl_pipeline(WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd3")
    toy.tiny_sd3_pipeline(WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux")
    toy.tiny_flux_pipeline(WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_refiner_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen")
    processor = toy.tiny_qwen_processor(WORDS)
    toy.tiny_qwen_model(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def sd15(tiny_sd15_dir):
    return common.load_backbone(str(tiny_sd15_dir))


@pytest.fixture
def sdxl(tiny_sdxl_dir):
    return common.load_backbone(str(tiny_sdxl_dir))


@pytest.fixture
def sd3(tiny_sd3_dir):
    return common.load_backbone(str(tiny_sd3_dir))


@pytest.fixture
def flux(tiny_flux_dir):
    return common.load_backbone(str(tiny_flux_dir))


@pytest.fixture
def refiner(tiny_refiner_dir):
    torch.manual_seed(0)
    return refiners.load_refiner(str(tiny_refiner_dir), max_new_tokens=12)
