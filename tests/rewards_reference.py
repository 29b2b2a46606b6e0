"""Loads the *released reference code* of the reward models for the parity tests.

The reference packages are installed without their dependencies (see requirements notes):
    pip install --no-deps image-reward==1.5 hpsv2==1.2.0 openai-clip==1.0.1
Their package `__init__`s pull in things that do not import here (pkg_resources, clint, a
transformers-4-only API, a tokenizer download), so the modules the scores are computed with are
loaded straight from their files, under their own package names, with stubs for *imports* only
(no behaviour is replaced: a stub is a name the import needs, never one the scoring calls).
"""

import contextlib
import importlib
import importlib.util
import sys
import types

import pytest


def _package_dir(package):
    if getattr(sys.modules.get(package), "__path__", None):
        return sys.modules[package].__path__[0]
    spec = importlib.util.find_spec(package)  # does not execute the package's __init__
    if spec is None:
        pytest.skip(f"reference package '{package}' is not installed (pip install --no-deps ...)")
    return spec.submodule_search_locations[0]


def _empty_package(name, path):
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module
    return module


@contextlib.contextmanager
def _import_stubs(**stubs):
    """Make `import NAME` / `from NAME import x` succeed for modules that are not installed, during
    the imports of the reference code only (stubs[NAME] = the attributes the import statement names)."""
    added = []
    for name, attributes in stubs.items():
        top = name.split(".")[0]
        if name in sys.modules or (top not in added and importlib.util.find_spec(top) is not None):
            continue
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module
        added.append(name)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def openai_clip():
    """openai/CLIP: (clip.model, clip.clip) -- the architecture and `_transform`."""
    import packaging.version

    root = _package_dir("clip")
    _empty_package("clip", root)
    with _import_stubs(pkg_resources=dict(packaging=types.SimpleNamespace(version=packaging.version))):
        return importlib.import_module("clip.model"), importlib.import_module("clip.clip")


def hpsv2_open_clip():
    """HPSv2's open_clip fork (hpsv2/src/open_clip) without hpsv2/__init__ (needs clint, requests)."""
    root = _package_dir("hpsv2")
    _empty_package("hpsv2", root)
    _empty_package("hpsv2.src", root + "/src")
    _empty_package("hpsv2.src.open_clip", root + "/src/open_clip")
    if "hpsv2.src.open_clip.tokenizer" not in sys.modules:
        # the wheel lacks its BPE vocab file (tokenizer.py reads it at import, next to __file__):
        # run the fork's tokenizer.py with __file__ in openai/CLIP's package, which ships that file
        spec = importlib.util.spec_from_file_location("hpsv2.src.open_clip.tokenizer", root + "/src/open_clip/tokenizer.py")
        module = importlib.util.module_from_spec(spec)
        module.__file__ = _package_dir("clip") + "/tokenizer.py"
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    if not hasattr(sys.modules["hpsv2.src.open_clip"], "create_model"):
        del sys.modules["hpsv2.src.open_clip"]  # now import the real package __init__
    with _import_stubs(turtle=dict(forward=None)):  # factory.py has a stray `from turtle import forward`
        return importlib.import_module("hpsv2.src.open_clip")


def imagereward():
    """ImageReward's own modules: (ImageReward.ImageReward, models.BLIP.vit, .med, .blip_pretrain)."""
    root = _package_dir("ImageReward")
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    _empty_package("ImageReward", root)
    _empty_package("ImageReward.models", root + "/models")
    _empty_package("ImageReward.models.BLIP", root + "/models/BLIP")
    # med.py imports these three from transformers.modeling_utils (their transformers 4 home)
    moved = [n for n in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")
             if not hasattr(modeling_utils, n)]
    for name in moved:
        setattr(modeling_utils, name, getattr(pytorch_utils, name, None))
    fairscale = {"fairscale": {}, "fairscale.nn": {}, "fairscale.nn.checkpoint": {},  # vit.py: grad checkpointing only
                 "fairscale.nn.checkpoint.checkpoint_activations": dict(checkpoint_wrapper=None)}
    try:
        with _import_stubs(**fairscale):
            return (
                importlib.import_module("ImageReward.ImageReward"),
                importlib.import_module("ImageReward.models.BLIP.vit"),
                importlib.import_module("ImageReward.models.BLIP.med"),
                importlib.import_module("ImageReward.models.BLIP.blip_pretrain"),
            )
    finally:
        for name in moved:
            delattr(modeling_utils, name)


def openai_clip_to_transformers(state_dict):
    """openai/CLIP tensor names -> transformers CLIPModel names (the layout of the hub's
    openai/clip-vit-large-patch14, which holds the same weights as openai's ViT-L-14.pt)."""
    import torch

    out = {}
    for name, value in state_dict.items():
        tower = "vision_model." if name.startswith("visual.") else "text_model."
        key = name.removeprefix("visual.")
        if key.startswith("transformer.resblocks."):
            _, _, layer, rest = key.split(".", 3)
            base = f"{tower}encoder.layers.{layer}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for part, chunk in zip("qkv", value.chunk(3)):
                    out[f"{base}self_attn.{part}_proj.{kind}"] = chunk
                continue
            rest = (rest.replace("attn.out_proj", "self_attn.out_proj").replace("ln_1", "layer_norm1")
                    .replace("ln_2", "layer_norm2").replace("mlp.c_fc", "mlp.fc1").replace("mlp.c_proj", "mlp.fc2"))
            out[base + rest] = value
            continue
        fixed = {
            "class_embedding": "vision_model.embeddings.class_embedding",
            "positional_embedding": f"{tower}embeddings.position_embedding.weight",
            "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
            "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
            "ln_post.weight": "vision_model.post_layernorm.weight", "ln_post.bias": "vision_model.post_layernorm.bias",
            "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
            "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
            "logit_scale": "logit_scale",
        }
        if key == "proj":
            out["visual_projection.weight"] = value.t()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t()
        elif key in fixed:
            out[fixed[key]] = value
        elif key in ("input_resolution", "context_length", "vocab_size"):
            continue
        else:
            raise KeyError(name)
    return {k: torch.as_tensor(v) for k, v in out.items()}
