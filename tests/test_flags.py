"""Every command-line flag of every script is exercised: a meta-test reads the test files for each
flag, and behaviour tests cover the flags no other test uses, each with an assertion that fails
if the flag did nothing (compared with the default run where the effect is relative)."""

import ast
import contextlib
import dataclasses
import importlib
import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train_refiner import lowercase_reward, policy_dir, tiny_args  # noqa: F401 (policy_dir: a fixture)
from test_train_reward import (  # noqa: F401 (fixtures)
    base_args,
    cache,
    pairs_dir,
    run_train,
    sd3_dir,
    sd15_dir,
    write_pairs,
)

import common
import lrm
import promptloop
import runs
import toy

TESTS = Path(__file__).resolve().parent
SCRIPTS = {"sample": "Config", "train_reward": "Config", "train_refiner": "Config", "evaluate": "Config",
           "bench": "Config", "build_toy_world": "ToyConfig"}


# -----------------------------------------------------------------------------
# the meta-test
#
# The rule: a flag of script S is covered when some test *passes it to S at a value other than its
# field's default*. Read statically from the test files' syntax trees:
#   - a test "runs S" when its body (with the test-file helpers it calls, e.g. tiny_args, run_train)
#     names S's module (`S.main()`, `tr.train(...)` after `import train_refiner as tr`,
#     `S.parse_config(...)`, `S.Config(...)`) or the file S.py (a subprocess argv, sys.argv);
#   - the flags it passes are the "--flag" strings in its argument lists (`[..., "--flag", value]`,
#     `("--flag", value)`, `f(..., "--flag", value)`, `{"--flag": value}`, "--flag=value"), each
#     with the element after it as its value, and the keywords of an `S.Config(field=value)` call;
#   - the value must not be the default: a literal is parsed with S's Config and compared with the
#     field's default (`--lora-rank 16` does not count, `--no-t5` and a bare `--blank-preview` do),
#     nor is it what the default resolves to on the tests' CPU (`--device cpu`, `--dtype fp32`);
#     a value computed in the test (a tmp_path, a loop variable) counts as given.
# Limits, kept on purpose: a test that runs two scripts counts its flags for both; a flag passed
# only to check its error message counts; the assertions on the effect are the reviewer's to read.

# What --device auto / --dtype auto resolve to on the CPU the tests run on: passing these changes nothing.
SAME_AS_DEFAULT = {"device": "cpu", "dtype": "fp32"}
TEST_FILES = sorted(TESTS.glob("test_*.py")) + [TESTS / "conftest.py"]


def script_aliases(tree):
    """The names a test file gives the scripts' modules: {'tr': 'train_refiner', 'bench': 'bench'}."""
    return {alias.asname or alias.name: alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
            for alias in node.names if alias.name in SCRIPTS}


def flag_elements(node):
    """(flag string, value node or None) for each "--flag" string in an argument list or dict under node."""
    for seq in ast.walk(node):
        if isinstance(seq, ast.Dict):
            pairs = zip(seq.keys, seq.values)
        elif isinstance(seq, (ast.List, ast.Tuple, ast.Call)):
            items = [e.value if isinstance(e, ast.Starred) else e for e in (seq.args if isinstance(seq, ast.Call) else seq.elts)]
            pairs = zip(items, items[1:] + [None])
        else:
            continue
        for key, value in pairs:
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("--"):
                name, eq, text = key.value.partition("=")
                if eq:
                    yield name, ast.Constant(text)
                elif isinstance(value, ast.Constant) and str(value.value).startswith("--"):
                    yield name, None  # a bare switch, followed by the next flag
                else:
                    yield name, value


def parse_value(config_class, flag, value):
    """config_class's field after [flag, value] (value None: a bare switch); None if it is no flag of it."""
    args = [flag] if value is None else [flag, str(value)]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return common.parse_config(config_class, args)
    except (SystemExit, common.UserError, ValueError):
        return None


def all_test_functions():
    """Every function in the test files: (name, node, the file's tree, the file's script aliases)."""
    found = []
    for path in TEST_FILES:
        tree = ast.parse(path.read_text())
        aliases = script_aliases(tree)
        found += [(node.name, node, path, aliases) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    return found


def scripts_named(nodes, aliases):
    """The scripts the nodes run: a module attribute (`tr.train`, `bench.parse_config`) or a path to S.py."""
    scripts = set()
    for sub in (sub for node in nodes for sub in ast.walk(node)):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in aliases:
            scripts.add(aliases[sub.value.id])
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            scripts |= {s for s in SCRIPTS if re.search(rf"(^|[/\\]){s}\.py$", sub.value)}
    return scripts


def parametrized_scripts(function):
    """(script, case) for each case of a @pytest.mark.parametrize over scripts: a script's name, or a
    tuple that starts with one (the flags in the rest of the tuple are that script's)."""
    for decorator in function.decorator_list:
        if (isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", None) == "parametrize"
                and len(decorator.args) > 1 and isinstance(decorator.args[1], (ast.List, ast.Tuple))):
            for case in decorator.args[1].elts:
                first = case.elts[0] if isinstance(case, ast.Tuple) and case.elts else case
                if isinstance(first, ast.Constant) and first.value in SCRIPTS:
                    yield first.value, case


def own_parts(node):
    """What a function passes to every script it runs: its body, and the cases of its parametrize
    decorators that are not led by a script's name (those are their script's alone)."""
    if not isinstance(node, ast.FunctionDef):
        return [node]
    led = {id(case) for _, case in parametrized_scripts(node)}
    cases = [case for d in node.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "parametrize"
             for arg in d.args[1:2] if isinstance(arg, (ast.List, ast.Tuple)) for case in arg.elts if id(case) not in led]
    return node.body + cases


def passed_flags(script, nodes, aliases):
    """The fields of script's config that the nodes pass at a value that counts (the rule above)."""
    config_class = getattr(importlib.import_module(script), SCRIPTS[script])
    fields, defaults, passed = {f.name for f in dataclasses.fields(config_class)}, config_class(), set()

    def counts(name, literal):
        return literal not in (getattr(defaults, name), SAME_AS_DEFAULT.get(name))

    for node in (part for node in nodes for part in own_parts(node)):
        for flag_text, value in flag_elements(node):
            name = flag_text[2:].replace("-", "_")
            name = name[3:] if name.startswith("no_") and name[3:] in fields else name
            if name not in fields:
                continue
            if value is None or isinstance(value, ast.Constant):  # a literal: parsed as the script would
                config = parse_value(config_class, flag_text, None if value is None else value.value)
                if config is None or not counts(name, getattr(config, name)) or value is not None and not counts(name, value.value):
                    continue
            passed.add(name)  # or a value computed in the test
        for call in ast.walk(node):  # S.Config(field=value)
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == SCRIPTS[script]
                    and isinstance(call.func.value, ast.Name) and aliases.get(call.func.value.id) == script):
                passed |= {k.arg for k in call.keywords if k.arg in fields
                           and (not isinstance(k.value, ast.Constant) or counts(k.arg, k.value.value))}
    return passed


def covered_flags():
    """{script: {field name: the test functions that pass it to the script at a value that counts}}."""
    functions = all_test_functions()
    by_name = {}
    for name, node, path, _ in functions:
        by_name.setdefault(name, []).append((path, node))

    def with_helpers(node, path, seen):
        """node and the test-file functions it calls, transitively (a helper's own file first)."""
        nodes = [node]
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in by_name:
                defs = by_name[call.func.id]
                helper = next((n for p, n in defs if p == path), defs[0][1])
                if helper not in seen:
                    seen.add(helper)
                    nodes += with_helpers(helper, path, seen)
        return nodes

    covered = {script: {} for script in SCRIPTS}
    for test, node, path, aliases in functions:
        nodes, cases = with_helpers(node, path, {node}), list(parametrized_scripts(node))
        passed = [(script, passed_flags(script, nodes, aliases)) for script in scripts_named(nodes, aliases) | {s for s, _ in cases}]
        passed += [(script, passed_flags(script, [case], aliases)) for script, case in cases]
        for script, names in passed:
            for name in names:
                covered[script].setdefault(name, set()).add(test)
    return covered


def test_every_flag_of_every_script_is_exercised():
    """Each field of each script's config is passed to that script, at a value other than its
    default, by some test (the rule above)."""
    covered = covered_flags()
    missing = [f"{script}.py {common.flag(f.name)}" for script, class_name in SCRIPTS.items()
               for f in dataclasses.fields(getattr(importlib.import_module(script), class_name)) if f.name not in covered[script]]
    assert not missing, f"flags no test passes to their script at a non-default value: {', '.join(missing)}"


# -----------------------------------------------------------------------------
# train_reward.py: data selection, the Thurstone variance, the optimizer


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, sd15_dir, cache):  # noqa: F811 (the imported fixtures)
    """One short run with its own data: --data holds train (48 pairs) and fit (40 pairs, every one a
    tie); --val-data holds validation (8) and dev (24); the variance and ensemble flags are set."""
    root = tmp_path_factory.mktemp("reward-flags")
    (root / "data").mkdir()
    (root / "val").mkdir()
    write_pairs(root / "data" / "train.parquet", 48, seed=10)
    write_pairs(root / "data" / "fit.parquet", 40, seed=11, tie_margin=2.0)  # |b0 - b1| < 1: all ties
    write_pairs(root / "data" / "validation.parquet", 16, seed=12)
    write_pairs(root / "val" / "validation.parquet", 8, seed=13)
    write_pairs(root / "val" / "dev.parquet", 24, seed=14)
    out = root / "run"
    args = base_args(root / "data", sd15_dir, out, cache, 2) + [
        "--train-split", "fit", "--val-data", root / "val", "--val-split", "dev", "--max-pairs", 20,
        "--v0", 0.3, "--kappa", 1.5, "--ensemble-t-max", 250]
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_train(args, monkeypatch)
    return out


@pytest.mark.slow
def test_train_split_val_data_val_split_and_max_pairs(reward_run):
    """--train-split fit trains on the all-ties file, --max-pairs 20 of its 40 rows;
    --val-data / --val-split validate on the other folder's dev file (24 pairs)."""
    metrics = json.loads((reward_run / "metrics.json").read_text())
    assert metrics["train_pairs"] == 20
    assert metrics["train_rows"]["used"] == 20 and metrics["train_rows"]["ties"] == 20  # fit.parquet, not train
    assert metrics["final"]["pairs"] == 24 and metrics["val_rows"]["rows"] == 24


@pytest.mark.slow
def test_v0_kappa_and_ensemble_t_max_are_saved_and_used(reward_run):
    """The saved model carries --v0 / --kappa / --ensemble-t-max: v(t) = v0 + kappa (1 - abar_t),
    and noise ensembling draws t from [0, 250)."""
    config = json.loads((reward_run / "lrm_config.json").read_text())
    assert (config["v0"], config["kappa"], config["ensemble_t_max"]) == (0.3, 1.5, 250)
    model = lrm.load_lrm(reward_run)
    t = torch.tensor([0, 100, 500, 999])
    expected = 0.3 + 1.5 * (1 - model.alphas_cumprod[t])
    torch.testing.assert_close(model.variance(t), expected.float())
    latents, prompts = torch.randn(2, 4, 8, 8), ["a red square", "a square"]

    def ensemble(**kwargs):
        return model.ensemble_score(latents, prompts, generator=torch.Generator().manual_seed(0), **kwargs)

    torch.testing.assert_close(ensemble(), ensemble(t_max=250))
    assert not torch.allclose(ensemble(), ensemble(t_max=400))  # 400: the default


def test_blocks_and_ensemble_levels_are_saved_and_used(pairs_dir, sd3_dir, cache, tmp_path, monkeypatch):  # noqa: F811
    """On an SD3-shaped backbone: --blocks 3 runs 3 of its 4 joint blocks (features after 1, 2, 3);
    --ensemble-levels 0.3 0.6 scores clean latents at sigma 0.3, 0.6, 0.3, ... instead of random t."""
    out = tmp_path / "run"
    run_train(base_args(pairs_dir, sd3_dir, out, cache, 2) + ["--blocks", 3, "--ensemble-levels", 0.3, 0.6, "--ensemble-draws", 4,
                                                              "--variance", "dina", "--loss", "thurstone-fidelity"], monkeypatch)
    config = json.loads((out / "lrm_config.json").read_text())
    assert (config["blocks"], config["ensemble_levels"], config["variance"]) == (3, [0.3, 0.6], "dina")
    model = lrm.load_lrm(out)
    assert model.taps == [1, 2, 3] and model.feature_norm.normalized_shape[0] == 3 * 10 * model.denoiser.inner_dim
    latents, prompts = torch.randn(2, 16, 8, 8), ["a red square", "a square"]

    def ensemble(**kwargs):
        return model.ensemble_score(latents, prompts, generator=torch.Generator().manual_seed(0), **kwargs)

    torch.testing.assert_close(ensemble(), ensemble(levels=[0.3, 0.6]))
    assert not torch.allclose(ensemble(), ensemble(levels=[]))  # random t ~ U[0, 400)
    metrics = json.loads((out / "metrics.json").read_text())["final"]
    assert metrics["levels"] == [0.2, 0.5, 0.7] and 0 <= metrics["levels_ensemble_accuracy"] <= 1  # validation: DiNa-LRM's levels


@pytest.fixture(scope="module")
def clip_and_decay_runs(tmp_path_factory, pairs_dir, sd15_dir, cache):  # noqa: F811 (the imported fixtures)
    """Two 3-step runs with a rank-2 LoRA (its B starts at 0), the same seed and so the same
    initial weights: one with --grad-clip 1e-12, one with --weight-decay 100."""
    root = tmp_path_factory.mktemp("reward-optimizer")
    runs = {}
    for name, extra in (("clip", ["--grad-clip", 1e-12]), ("decay", ["--weight-decay", 100])):
        with pytest.MonkeyPatch.context() as monkeypatch:
            run_train(base_args(pairs_dir, sd15_dir, root / name, cache, 3) + ["--lora-rank", 2] + extra, monkeypatch)
        runs[name] = load_file(root / name / "model.safetensors")
    return runs


def head_norm(weights):
    return torch.sqrt(sum((v.float() ** 2).sum() for k, v in weights.items() if "lora_" not in k)).item()


@pytest.mark.slow
def test_grad_clip_bounds_the_update(clip_and_decay_runs):
    """Gradients clipped to norm 1e-12 are ~1e-4 of AdamW's eps: the LoRA stays at its zero start
    (with the default clip of 1.0 each step moves it by ~lr)."""
    lora_b = [v for k, v in clip_and_decay_runs["clip"].items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) < 1e-7


@pytest.mark.slow
def test_weight_decay_shrinks_the_weights(clip_and_decay_runs):
    """--weight-decay 100 shrinks the head by lr * 100 per step (~25% over the 3 warm-up steps) next
    to the clipped run, whose weights are still the shared initial ones."""
    assert head_norm(clip_and_decay_runs["decay"]) < 0.85 * head_norm(clip_and_decay_runs["clip"])


# -----------------------------------------------------------------------------
# train_refiner.py: prompts, the monitor, LoRA, the GRPO loss


HELDOUT = ["a red circle", "a blue square on a green background", "a large triangle"]


class RecordingReward:
    """lowercase_reward (test_train_refiner.py) that records every call's images and user prompts."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts, **kwargs):
        self.calls.append((images.clone(), list(prompts)))
        return lowercase_reward(images, prompts, **kwargs)


@pytest.fixture(scope="module")
def refiner_runs(tmp_path_factory, tiny_sd15_dir, policy_dir):  # noqa: F811 (the imported fixtures)
    """One GRPO step (2 prompts x 2 trajectories, 2 epochs x 2 minibatches: 4 updates) per variant.
    All share --max-prompts 3, --heldout-prompts FILE, --monitor-rewards toy-faithful,
    --lora-targets q_proj,v_proj and --lora-alpha 8; each variant changes one GRPO flag."""
    import train_refiner as tr

    root = tmp_path_factory.mktemp("refiner-flags")
    heldout = root / "heldout.txt"
    heldout.write_text("\n".join(HELDOUT) + "\n")
    variants = {"default": [], "no_kl": ["--kl-coef", "0"], "tight_clip": ["--clip-epsilon", "1e-6"],
                "flat_advantages": ["--kl-coef", "0", "--advantage-eps", "1e20"], "tiny_grad": ["--max-grad-norm", "1e-12"]}
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra in variants.items():
            out = root / name
            args = tiny_args(tiny_sd15_dir, policy_dir, out, "--steps", "1", "--refine-steps", "1", "--learning-rate", "1e-2",
                             "--monitor-every", "0", "--reward", "unused", "--max-prompts", "3", "--heldout-prompts", str(heldout),
                             "--monitor-rewards", "toy-faithful", "--lora-targets", "q_proj,v_proj", "--lora-alpha", "8", *extra)
            reward, stdout = RecordingReward(), io.StringIO()
            with contextlib.redirect_stdout(stdout):
                metrics = tr.train(common.parse_config(tr.Config, args), reward=reward)
            records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            runs[name] = dict(out=out, metrics=metrics, calls=reward.calls, stdout=stdout.getvalue(),
                              step=next(r for r in records if "reward_mean" in r),
                              adapter=load_file(out / "adapter_model.safetensors"))
    finally:
        torch.set_num_threads(threads)
    return runs


def max_lora_b(adapter):
    return max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k)


@pytest.mark.slow
def test_heldout_prompts_max_prompts_and_monitor_rewards(refiner_runs):
    """The monitor (unrefined, start, end) scores exactly the --heldout-prompts file; the rollout
    draws from the first 3 training prompts only; toy-faithful's held-out mean is in the metrics."""
    run = refiner_runs["default"]
    (unrefined, start, rollout, end) = run["calls"]  # steps 1, --monitor-every 0
    assert unrefined[1] == start[1] == end[1] == HELDOUT
    assert len(rollout[1]) == 4 and set(rollout[1]) <= set(runs.load_prompts("toy", "train", 3, 0))
    assert "train prompts 3 |" in run["stdout"]
    faithful = toy.toy_faithfulness(end[0], end[1]).mean().item()
    assert run["metrics"]["heldout_end"]["toy-faithful"] == pytest.approx(faithful, abs=1e-6)
    assert "toy-faithful" in run["metrics"]["heldout_start"] and "toy-faithful" in run["metrics"]["heldout_unrefined"]


@pytest.mark.slow
def test_lora_targets_and_alpha(refiner_runs):
    """--lora-targets q_proj,v_proj puts LoRA weights on those layers only; --lora-alpha is saved."""
    run = refiner_runs["default"]
    config = json.loads((run["out"] / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 8 and config["r"] == 16
    layers = {re.search(r"\.(\w+_proj)\.lora_", k).group(1) for k in run["adapter"]}
    assert layers == {"q_proj", "v_proj"}


@pytest.mark.slow
def test_kl_coef_changes_the_update(refiner_runs):
    """After the first of the 4 updates the policy has left the reference: the k3 KL term (default
    0.04) pulls it back, --kl-coef 0 does not, so the adapters differ."""
    default, no_kl = refiner_runs["default"], refiner_runs["no_kl"]
    assert max((default["adapter"][k] - no_kl["adapter"][k]).abs().max().item() for k in default["adapter"]) > 1e-4
    assert default["step"]["kl"] > 0


@pytest.mark.slow
def test_clip_epsilon_clips_more_tokens(refiner_runs):
    """With --clip-epsilon 1e-6 every moved ratio leaves the trust region: far more clipped tokens."""
    assert refiner_runs["tight_clip"]["step"]["clip_fraction"] > refiner_runs["default"]["step"]["clip_fraction"] + 0.1


@pytest.mark.slow
def test_advantage_eps_scales_the_advantages(refiner_runs):
    """(r - mean) / (std + 1e20) is ~0: without the KL term nothing moves the policy (LoRA B stays
    at its zero start); the same run with the default eps moves it."""
    assert max_lora_b(refiner_runs["no_kl"]["adapter"]) > 1e-3
    assert max_lora_b(refiner_runs["flat_advantages"]["adapter"]) < 1e-8


@pytest.mark.slow
def test_max_grad_norm_bounds_the_update(refiner_runs):
    """Gradients clipped to norm 1e-12 leave AdamW's steps ~1e-5 of the default run's."""
    assert max_lora_b(refiner_runs["default"]["adapter"]) > 1e-3
    assert max_lora_b(refiner_runs["tiny_grad"]["adapter"]) < 1e-5


# -----------------------------------------------------------------------------
# evaluate.py: the confidence level, the prompt split


@pytest.mark.slow
def test_confidence_sets_the_interval_width_and_split_the_prompts(tiny_sd15_dir, tmp_path, monkeypatch):
    """--confidence 0.5 vs 0.95: the same images and mean, intervals narrower by the ratio of the t
    quantiles; --split train draws the toy prompts of the train split."""
    import sys

    import evaluate

    def run(confidence):
        out = tmp_path / confidence
        monkeypatch.setattr(sys, "argv", [
            "evaluate.py", "--backbones", str(tiny_sd15_dir), "--refiner", "none", "--rewards", "toy-aesthetic", "--prompts", "toy",
            "--split", "train", "--limit", "4", "--seeds", "0", "--steps", "2", "--confidence", confidence,
            "--device", "cpu", "--out", str(out)])
        evaluate.main()
        return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()

    (narrow, narrow_md), (wide, _) = run("0.5"), run("0.95")
    assert [r["prompt"] for r in narrow["images"]] == runs.load_prompts("toy", "train", 4, 0)
    (a,), (b,) = narrow["rows"], wide["rows"]
    assert a["n"] == b["n"] == 4 and a["baseline_mean"] == b["baseline_mean"]
    ratio = (a["baseline_high"] - a["baseline_low"]) / (b["baseline_high"] - b["baseline_low"])
    assert ratio == pytest.approx(evaluate.t_quantile(0.75, 3) / evaluate.t_quantile(0.975, 3), rel=1e-6)
    assert ratio < 0.5 and "50%" in narrow_md


# -----------------------------------------------------------------------------
# --threads of train_refiner.py and evaluate.py: set before anything is loaded


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop


def test_threads_of_train_refiner_and_evaluate(monkeypatch, tmp_path):
    import sys

    import evaluate
    import train_refiner

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(common, "pick_dtype", _stop)  # both scripts: right after the threads (common.setup_run)
    with pytest.raises(_Stop):
        train_refiner.train(common.parse_config(train_refiner.Config, tiny_args("b", "r", tmp_path, "--threads", "3")))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--threads", "5", "--out", str(tmp_path)])
    with pytest.raises(_Stop):
        evaluate.main()
    assert calls == [3, 5]


# -----------------------------------------------------------------------------
# bench.py: rows 1 and 6 called directly at tiny size


def test_lrm_draws_warmup_and_batch_reach_row_1(tmp_path, monkeypatch):
    """Row 1 times the LRM with 1 draw and with --lrm-draws draws, each --warmup + --repeats times,
    on --batch latents."""
    import bench

    cfg = bench.parse_config(["--rows", "1", "--size", "tiny", "--lrm-draws", "3", "--warmup", "2", "--batch", "2",
                              "--repeats", "3"])
    bench.check_config(cfg)
    calls, ensemble_score = [], lrm.LatentRewardModel.ensemble_score

    def recording(self, latents, prompts, draws=None, **kwargs):
        calls.append((len(latents), draws))
        return ensemble_score(self, latents, prompts, draws=draws, **kwargs)

    monkeypatch.setattr(lrm.LatentRewardModel, "ensemble_score", recording)
    rows = bench.row_lrm_vs_pixel(cfg, torch.device("cpu"), torch.float32, str(tmp_path))
    assert sorted(calls) == [(2, 1)] * 5 + [(2, 3)] * 5
    (row_1c,) = [r for r in rows if r["row"] == "1c"]
    assert "(3 draws)" in row_1c["compared"] and len(row_1c["candidate"]["times_s"]) == 3


def test_memory_batch_sets_row_6_refiner_minibatch(monkeypatch, tmp_path):
    """Row 6 runs on a GPU only; its refiner half is run here on the CPU up to the rollout, which
    must hold --memory-batch trajectories."""
    import architectures
    import bench

    class Stop(Exception):
        pass

    cfg = bench.parse_config(["--rows", "6", "--size", "tiny", "--memory-batch", "3"])
    bench.check_config(cfg)
    batches = []

    def rollout(refiner, batch, refine_steps):
        batches.append(batch)
        raise Stop

    tiny = architectures.random_qwen_refiner
    monkeypatch.setattr(architectures, "random_qwen_refiner", lambda size, device, dtype, *a: tiny(size, torch.device("cpu"), torch.float32, *a))
    monkeypatch.setattr(bench, "refiner_rollout_outputs", rollout)
    with pytest.raises(Stop):
        bench.row_peak_memory(cfg, torch.device("cuda"), torch.float32, str(tmp_path))  # a device object: no GPU is touched
    assert batches == [3]


# -----------------------------------------------------------------------------
# build_toy_world.py: a tiny world, stage by stage


@pytest.fixture(scope="module")
def toy_build(tmp_path_factory):
    """The backbones, pairs and refiner stages at a few steps, 16 px, recording what the backbone
    training and the pair sampling see; the pairs stage is built three times (default labels,
    noise-free labels, every pair a tie)."""
    import build_toy_world as btw

    out = tmp_path_factory.mktemp("toy-world")
    size = ["--out", str(out), "--image-size", "16"]
    seen = dict(settled=0, drops=[], pair_steps=[], lrs=[])
    uninformative, conditioning, refined_sample = btw.uninformative_background, btw.text_conditioning, promptloop.refined_sample
    train_backbone = btw.train_toy_backbone

    def recording_training(pipe, images, captions, steps, batch_size, lr, *args, **kwargs):
        seen["lrs"].append(lr)
        return train_backbone(pipe, images, captions, steps, batch_size, lr, *args, **kwargs)

    def settled(caption, generator):
        seen["settled"] += 1
        return uninformative(caption, generator)

    def recording_conditioning(pipe, captions, drop):
        seen["drops"] += drop.tolist()
        return conditioning(pipe, captions, drop)

    def recording_sample(*args, **kwargs):
        seen["pair_steps"].append(kwargs.get("num_steps"))
        return refined_sample(*args, **kwargs)

    def pairs(*flags):
        btw.main(["--stages", "pairs", *size, "--pairs-train", "5", "--pairs-validation", "3", "--pairs-test", "2",
                  "--pair-steps", "2", *flags])
        return {split: pq.read_table(out / "pickapic-toy" / f"{split}.parquet").to_pylist() for split in ("train", "validation", "test")}

    threads = torch.get_num_threads()  # main() sets its --threads (1)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(io.StringIO()):
            monkeypatch.setattr(btw, "uninformative_background", settled)
            monkeypatch.setattr(btw, "text_conditioning", recording_conditioning)
            monkeypatch.setattr(btw, "train_toy_backbone", recording_training)
            btw.main(["--stages", "backbones", *size, "--no-parallel", "--dataset-size", "16", "--vae-steps", "2",
                      "--unet-steps", "3", "--batch-size", "4", "--eval-samples", "2", "--sample-steps", "3",
                      "--background-settles", "1000", "--caption-dropout", "1.0", "--lr", "0.003", "--guidance", "2.5"])
            monkeypatch.setattr(promptloop, "refined_sample", recording_sample)
            default = pairs()
            monkeypatch.setattr(promptloop, "refined_sample", refined_sample)
            exact = pairs("--label-noise", "0", "--tie-margin", "0")
            ties = pairs("--tie-margin", "10")
            btw.main(["--stages", "refiner", *size, "--refiner-steps", "2"])
    finally:
        torch.set_num_threads(threads)
    return dict(out=out, seen=seen, default=default, exact=exact, ties=ties,
                metrics=json.loads((out / "metrics.json").read_text()))


@pytest.mark.slow
def test_toy_backbone_flags(toy_build):
    """--sample-steps, --image-size and --guidance become the backbones' promptloop.json defaults;
    --lr is the learning rate each backbone is trained with; --background-settles 1000 (above every training t) makes every training caption's background
    uninformative; --caption-dropout 1 drops every caption."""
    for name in ("toy-sd15", "toy-sdxl"):
        defaults = json.loads((toy_build["out"] / name / "promptloop.json").read_text())
        assert defaults["steps"] == 3 and defaults["size"] == 16 and defaults["guidance"] == 2.5
        assert common.load_backbone(str(toy_build["out"] / name)).spec.steps == 3
    seen = toy_build["seen"]
    assert seen["lrs"] == [0.003, 0.003]
    assert seen["settled"] == 2 * 3 * 4  # 2 backbones x 3 steps x batch 4
    assert len(seen["drops"]) == 2 * 3 * 4 and all(seen["drops"])


@pytest.mark.slow
def test_toy_pairs_flags(toy_build):
    """--pairs-train/-validation/-test set the parquet row counts; --pair-steps the sampling steps of
    the pair images (16 px: --image-size); --label-noise 0 --tie-margin 0 labels every pair by its
    true aesthetic order, --tie-margin 10 makes every pair a tie."""
    for build in ("default", "exact", "ties"):
        assert {split: len(rows) for split, rows in toy_build[build].items()} == dict(train=5, validation=3, test=2)
    assert toy_build["seen"]["pair_steps"] and set(toy_build["seen"]["pair_steps"]) == {2}
    assert Image.open(io.BytesIO(toy_build["default"]["train"][0]["jpg_0"])).size == (16, 16)

    def rows(build):
        return [row for split in ("train", "validation", "test") for row in toy_build[build][split]]

    truth = [float(r["toy_aesthetic_0"] > r["toy_aesthetic_1"]) for r in rows("exact")]
    assert [r["label_0"] for r in rows("exact")] == truth
    # the same images with the default noise: some label disagrees (so the check above says something)
    assert [r["toy_aesthetic_0"] for r in rows("default")] == [r["toy_aesthetic_0"] for r in rows("exact")]
    assert [r["label_0"] for r in rows("default")] != truth
    assert all(r["label_0"] == 0.5 for r in rows("ties"))
    labels = json.loads((toy_build["out"] / "pickapic-toy" / "labels.json").read_text())
    assert labels["tie_margin"] == 10 and labels["train"]["ties"] == 1.0


@pytest.mark.slow
def test_toy_refiner_steps(toy_build):
    """--refiner-steps sets the toy refiner's supervised steps."""
    assert toy_build["metrics"]["refiner"]["train_steps"] == 2
    assert (toy_build["out"] / "toy-refiner" / "config.json").is_file()


# -----------------------------------------------------------------------------
# the run flags (seed, device, dtype, threads) of each script: in force at its first load


def _first_load(seen):
    """A loader stand-in: records the device, dtype, torch threads and torch seed in force, then stops."""

    def load(*args, **kwargs):
        values = [*args, *kwargs.values()]
        seen.update(device=next(v for v in values if isinstance(v, torch.device)), dtype=next(v for v in values if isinstance(v, torch.dtype)),
                    threads=torch.get_num_threads(), seed=torch.initial_seed())
        raise _Stop

    return load


@pytest.mark.parametrize("script, extra", [
    ("sample", ["--prompt", "a circle"]), ("train_reward", ["--seed", "7"]), ("train_refiner", ["--prompts", "toy"]),
    ("evaluate", ["--seed", "7", "--limit", "4"]), ("bench", ["--seed", "7", "--rows", "1"])])
def test_run_flags_are_in_force_at_the_first_load(script, extra, monkeypatch, tmp_path):
    """--device cuda --dtype fp16 reach the script's first loader (nothing touches a GPU before it);
    --threads 2 is set before it; --seed 7 seeds torch before it where the script seeds first
    (train_reward, bench) and draws evaluate's toy prompts."""
    import sys

    import rewards

    module = importlib.import_module(script)
    argv = [f"{script}.py", "--device", "cuda", "--dtype", "fp16", "--threads", "2", "--out", str(tmp_path), *extra]
    seen, drawn = {}, []
    if script == "bench":
        monkeypatch.setattr(module, "device_name", str)  # its cuda branch asks the GPU's name
        monkeypatch.setitem(module.ROW_FUNCTIONS, "1", _first_load(seen))
    else:  # the backbone or the rewards, whichever the script loads first
        monkeypatch.setattr(common, "load_backbone", _first_load(seen))
        monkeypatch.setattr(rewards, "build_reward", _first_load(seen))
    load_prompts = runs.load_prompts
    monkeypatch.setattr(runs, "load_prompts", lambda *args: drawn.append(load_prompts(*args)) or drawn[-1])
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(_Stop), contextlib.redirect_stdout(io.StringIO()):
            module.main()
    finally:
        torch.set_num_threads(threads)
    assert seen["device"] == torch.device("cuda") and seen["dtype"] == torch.float16 and seen["threads"] == 2
    if script in ("train_reward", "bench"):
        assert seen["seed"] == 7
    if script == "evaluate":
        assert drawn == [load_prompts("toy", "test", 4, 7)] != [load_prompts("toy", "test", 4, 0)]


def test_toy_world_seed_and_threads(monkeypatch, tmp_path):
    """build_toy_world.py --seed 7 --threads 2 are in force when its first stage starts (default 0, 1)."""
    import build_toy_world as btw

    seen = {}

    def first_stage(config, out, log):
        seen.update(threads=torch.get_num_threads(), seed=torch.initial_seed())
        raise _Stop

    monkeypatch.setattr(btw, "build_toy_data", first_stage)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(_Stop), contextlib.redirect_stdout(io.StringIO()):
            btw.main(["--stages", "data", "--out", str(tmp_path), "--seed", "7", "--threads", "2"])
    finally:
        torch.set_num_threads(threads)
    assert seen == dict(threads=2, seed=7)


# -----------------------------------------------------------------------------
# the sampling flags (--fast-decode, --preview-size, ...) reach the refiner the script loads


def loaded_refiner(monkeypatch):
    """Make refiners.load_refiner stop the script once it has loaded the refiner; returns the list it
    is put in and the real load_refiner."""
    import refiners

    loaded, load_refiner = [], refiners.load_refiner

    def load_and_stop(*args, **kwargs):
        loaded.append(load_refiner(*args, **kwargs))
        raise _Stop

    monkeypatch.setattr(refiners, "load_refiner", load_and_stop)
    return loaded, load_refiner


def vision_tokens(refiner):
    """How many merged vision tokens the refiner's processor makes of a 32 px preview (28 px each)."""
    inputs = refiner._inputs(torch.rand(1, 3, 32, 32), ["a circle"], ["a circle"], 1, 2)
    return int(inputs["image_grid_thw"].prod()) // 4


def test_sample_fast_decode_and_preview_size(monkeypatch, tmp_path):
    """sample.py --fast-decode on loads the FastRefiner on a CPU too (auto: only on a GPU);
    --preview-size 112 resizes its previews to 112 px: (112 / 28)^2 = 16 vision tokens."""
    import sys

    import refiners
    import sample

    loaded, load_refiner = loaded_refiner(monkeypatch)
    monkeypatch.setattr(common, "load_backbone", lambda *args, **kwargs: None)
    monkeypatch.setattr(sys, "argv", ["sample.py", "--prompt", "a circle", "--device", "cpu", "--fast-decode", "on",
                                      "--preview-size", "112", "--out", str(tmp_path)])
    with pytest.raises(_Stop):
        sample.main()
    (refiner,) = loaded
    assert type(refiner) is refiners.FastRefiner and refiner.preview_size == 112 and vision_tokens(refiner) == 16
    default = load_refiner(str(common.TOY_DIR / "toy-refiner"))
    assert type(default) is refiners.Refiner and vision_tokens(default) != 16


def test_evaluate_fast_decode_preview_size_and_adapter(monkeypatch, tmp_path):
    """evaluate.py --adapter puts the toy GRPO adapter over the toy refiner (its LoRA weights loaded,
    its logits not the base model's); --fast-decode on: the FastRefiner; --preview-size 56: 4 tokens."""
    import sys

    import evaluate
    import refiners

    adapter = common.TOY_DIR / "adapters" / "grpo-toy-composite"
    loaded, load_refiner = loaded_refiner(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--rewards", "toy-aesthetic", "--device", "cpu", "--adapter", str(adapter),
                                      "--fast-decode", "on", "--preview-size", "56", "--out", str(tmp_path)])
    with pytest.raises(_Stop), contextlib.redirect_stdout(io.StringIO()):
        evaluate.main()
    (refiner,) = loaded
    assert type(refiner) is refiners.FastRefiner and refiner.preview_size == 56 and vision_tokens(refiner) == 4
    lora = {k: v for k, v in refiner.model.state_dict().items() if "lora_B" in k}
    saved = load_file(adapter / "adapter_model.safetensors")
    assert lora and all(any(torch.equal(v, s) for s in saved.values()) for v in lora.values())
    base = load_refiner(str(common.TOY_DIR / "toy-refiner"), preview_size=56)
    inputs = refiner._inputs(torch.rand(1, 3, 32, 32), ["a circle"], ["a circle"], 1, 2)
    with torch.no_grad():
        assert not torch.allclose(refiner.model(**inputs).logits, base.model(**inputs).logits, atol=1e-3)


def test_evaluate_guidance_and_blank_preview_reach_every_arm(monkeypatch):
    """evaluate.py --guidance 2.5 --blank-preview: each arm's refined_sample call gets them (default:
    None, the backbone's own guidance, and the real preview)."""
    import evaluate

    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs)
        raise _Stop

    monkeypatch.setattr(promptloop, "refined_sample", record)
    for flags in ([], ["--guidance", "2.5", "--blank-preview"]):
        arms = evaluate.sampling_arms(None, object(), common.parse_config(evaluate.Config, flags))
        for sample_arm in arms.values():
            with pytest.raises(_Stop):
                sample_arm(["a circle"], 0, [0])
    assert [(c["guidance"], c["blank_preview"]) for c in calls] == [(None, False)] * 2 + [(2.5, True)] * 2


def test_evaluate_preference_split_seed_and_limit(monkeypatch, tmp_path):
    """evaluate.py --preference-split validation --preference-limit 5 --seed 3: the LRM's preference
    accuracy is read from that split, for that many pairs, with that seed's noise."""
    import sys

    import evaluate

    seen = []

    def accuracy(*args):
        seen.append(args)
        raise _Stop

    monkeypatch.setattr(lrm, "load_lrm", lambda *args: "the lrm")
    monkeypatch.setattr(lrm, "preference_accuracy", accuracy)
    data = common.TOY_DIR / "pickapic-toy"
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--refiner", "none", "--rewards", "toy-aesthetic", "--device", "cpu",
                                      "--lrm", "x", "--preference-data", str(data), "--preference-split", "validation",
                                      "--preference-limit", "5", "--seed", "3", "--out", str(tmp_path)])
    with pytest.raises(_Stop), contextlib.redirect_stdout(io.StringIO()):
        evaluate.main()
    ((model, scorers, source, split, limit, seed, device, dtype),) = seen
    assert (model, source, split, limit, seed) == ("the lrm", str(data), "validation", 5, 3)


def test_train_refiner_policy_flags(monkeypatch, tmp_path):
    """train_refiner.py --fast-decode on --preview-size 56 --temperature 0.5 --lora-rank 4
    --preview-decoder linear: the policy its monitor samples with is a FastRefiner on 56 px previews
    at temperature 0.5 with rank-4 LoRA matrices, its previews decoded by the linear map."""
    import refiners
    import train_refiner as tr

    seen = {}

    def monitor(backbone, refiner, prompts, reward, others, config, preview_decoder, refined=True):
        seen.update(refiner=refiner, preview_decoder=preview_decoder)
        raise _Stop

    monkeypatch.setattr(tr, "monitor", monitor)
    args = tiny_args(common.TOY_DIR / "toy-sd15", common.TOY_DIR / "toy-refiner", tmp_path, "--fast-decode", "on",
                     "--preview-size", "56", "--temperature", "0.5", "--lora-rank", "4", "--preview-decoder", "linear")
    with pytest.raises(_Stop), contextlib.redirect_stdout(io.StringIO()):
        tr.train(common.parse_config(tr.Config, args), reward=lowercase_reward)
    refiner = seen["refiner"]
    assert type(refiner) is refiners.FastRefiner and refiner.preview_size == 56 and vision_tokens(refiner) == 4
    assert refiner.temperature == 0.5
    shapes = [p.shape for name, p in refiner.model.named_parameters() if "lora_" in name]
    assert shapes and all(4 in shape for shape in shapes)
    assert {shape[0] for name, shape in zip(["A", "B"] * len(shapes), shapes) if name == "A"} == {4}
    assert seen["preview_decoder"].kind == "linear"


def test_train_refiner_guidance_reaches_the_pipeline(monkeypatch):
    """train_refiner.py --guidance 2.5 is the refined_sample call's guidance; the default -1 leaves
    it None (the backbone's own)."""
    import train_refiner as tr

    calls = []

    def record(*args, **kwargs):
        calls.append(kwargs["guidance"])

    monkeypatch.setattr(promptloop, "refined_sample", record)
    for flags in ([], ["--guidance", "2.5"]):
        tr.sample(None, None, ["a circle"], None, None, common.parse_config(tr.Config, flags), None)
    assert calls == [None, 2.5]


# -----------------------------------------------------------------------------
# bench.py: --resolution (full-size rows), --prompts-per-step and --group-size (row 4)


def test_resolution_sets_the_full_size_latents(monkeypatch):
    """--resolution 256: row 1's full-size SD1.5 (built on the meta device: no memory, no time)
    makes 256 px images, (4, 32, 32) latents; the default 512 makes (4, 64, 64)."""
    import architectures
    import bench

    built, random_sd15 = [], architectures.random_sd15

    def build_and_stop(*args):
        built.append(random_sd15(*args))
        raise _Stop

    monkeypatch.setattr(architectures, "random_sd15", build_and_stop)
    for flags in ([], ["--resolution", "256"]):
        cfg = bench.parse_config(["--rows", "1", *flags])
        bench.check_config(cfg)
        with pytest.raises(_Stop):
            bench.row_lrm_vs_pixel(cfg, torch.device("meta"), torch.float32, "unused")
    assert [common.latent_shape(b) for b in built] == [(4, 64, 64), (4, 32, 32)]


def test_prompts_per_step_and_group_size_shape_row_4(monkeypatch, tmp_path):
    """Row 4 rolls out --prompts-per-step 3 x --group-size 2 trajectories in its batched call, the
    members of a group adjacent and on the same initial noise."""
    import bench

    calls = []

    def record(backbone, prompts, refiner, **kwargs):
        calls.append((prompts, kwargs["latents"]))
        raise _Stop

    def time_batched(variants, *args):
        variants["batched"]()

    monkeypatch.setattr(promptloop, "refined_sample", record)
    monkeypatch.setattr(bench, "time_side_by_side", time_batched)
    cfg = bench.parse_config(["--rows", "4", "--size", "tiny", "--preview-decoder", "vae", "--prompts-per-step", "3",
                              "--group-size", "2"])
    bench.check_config(cfg)
    with pytest.raises(_Stop):
        bench.row_grpo_batching(cfg, torch.device("cpu"), torch.float32, str(tmp_path))
    ((prompts, latents),) = calls
    assert prompts == ["a circle", "a circle", "a square", "a square", "a triangle", "a triangle"]
    assert len(latents) == 6 and torch.equal(latents[0], latents[1]) and not torch.equal(latents[1], latents[2])
