"""Convert official Vim / VMamba checkpoints to timm-style safetensors, and back.

    python tools/convert_checkpoint.py --model vim_tiny_patch16_224 vim_t_midclstok_76p1acc.pth vim_tiny.safetensors
    python tools/convert_checkpoint.py --model vmamba_tiny vmamba_tiny.safetensors vssm1_tiny.pth --to official

To timm (the default for a .safetensors output): the weights of a training snapshot ('model', or --key model_ema)
go through the model's `checkpoint_filter_fn` (official key names -> ours, Vim's position embedding resampled to
the model's grid), are loaded strictly into `timm.create_model(--model, **--model-kwargs)`, and saved as they are
(dtype kept). The file then loads with `pretrained_cfg_overlay=dict(file=...)` or any safetensors reader.

To official (the default for other outputs): a timm/vssm state_dict (or an official file) is loaded the same way,
mapped to the official repositories' key layout (Vim: the same names; VMamba: patch_embed.*, layers.i.blocks.j.op.*,
the downsample at the end of the previous stage, classifier.*), checked to map back to the same tensors, and saved
with torch.save as {'model': state_dict}, which hustvl/Vim's and MzeroMiko/VMamba's --resume / --pretrained read.
Other model families have no official layout here.

Any key the model lacks or needs, or a shape that differs, stops the conversion with the keys named.
"""
import argparse
import importlib
import json
import re
from pathlib import Path

import timm
import torch

import vssm  # noqa: F401  (registers vssm's models with timm)
from vssm.models._checkpoint import read_checkpoint, unwrap_state_dict


def _vmamba_official_key(k):
    """One vssm VMamba key -> the official one (the inverse of vssm.models.vmamba._official_key)."""
    m = re.match(r"stem\.(conv1|norm1|conv2|norm2)\.(.+)", k)
    if m:  # official patch_embed: Sequential(conv, -, LN, -, GELU, conv, -, LN)
        return f"patch_embed.{dict(conv1=0, norm1=2, conv2=5, norm2=7)[m[1]]}.{m[2]}"
    m = re.match(r"stages\.(\d+)\.downsample\.(conv|norm)\.(.+)", k)
    if m:  # official: the conv + LN closing the previous stage, Sequential(-, conv, -, LN)
        return f"layers.{int(m[1]) - 1}.downsample.{1 if m[2] == 'conv' else 3}.{m[3]}"
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(norm1|ss2d|norm2|mlp)\.(.+)", k)
    if m:
        part = dict(norm1="norm", ss2d="op").get(m[3], m[3])
        rest = re.sub(r"^dwconv\.", "conv2d.", m[4]) if m[3] == "ss2d" else m[4]
        return f"layers.{m[1]}.blocks.{m[2]}.{part}.{rest}"
    return re.sub(r"^norm\.", "classifier.norm.", re.sub(r"^head\.fc\.", "classifier.head.", k))


# model class -> our state_dict to the official one (Vim's names are the official ones)
TO_OFFICIAL = {
    "Vim": lambda sd: dict(sd),
    "VMamba": lambda sd: {_vmamba_official_key(k): v for k, v in sd.items()},
}


def filter_fn_of(model):
    """The model module's checkpoint_filter_fn (identity where it has none)."""
    return getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", lambda sd, model: sd)


def mismatch(state_dict, model):
    """A message naming missing/unexpected keys and shape differences, or '' when state_dict fits the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    def named(what, keys, most=12):
        more = f" and {len(keys) - most} more" if len(keys) > most else ""
        return f"{len(keys)} {what} {keys[:most]}{more}"
    return "; ".join(named(what, keys) for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                          ("shape mismatches", shapes)) if keys)


def load_weights(path, model, key="model"):
    """The weights in path (a training snapshot's `key` entry, or a plain state_dict) mapped to the model's keys
    and loaded strictly into it; a ValueError names the keys that do not fit."""
    checkpoint = read_checkpoint(path)
    if key != "model" and not (isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict)):
        raise ValueError(f"{path} has no '{key}' entry")
    state_dict = filter_fn_of(model)(unwrap_state_dict(checkpoint, key), model)
    problems = mismatch(state_dict, model)
    if problems:
        raise ValueError(f"{path} does not match {type(model).__name__} ({model.pretrained_cfg.get('architecture')}"
                         f"): {problems}")
    model.load_state_dict(state_dict, strict=True)
    return state_dict


def to_timm(state_dict, output, metadata):
    from safetensors.torch import save_file
    # a fresh contiguous copy of each tensor: safetensors refuses views and shared storage
    save_file({k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state_dict.items()},
              str(output), metadata={"format": "pt", **metadata})


def to_official(state_dict, model, output):
    name = type(model).__name__
    if name not in TO_OFFICIAL:
        raise ValueError(f"no official key layout known for {name}; official layouts: {sorted(TO_OFFICIAL)}")
    official = {k: v.detach().clone() for k, v in TO_OFFICIAL[name](state_dict).items()}
    back = filter_fn_of(model)(dict(official), model)  # the model's own loader must read it back unchanged
    if back.keys() != state_dict.keys() or any(not torch.equal(back[k], state_dict[k]) for k in back):
        raise RuntimeError(f"{name}: the official layout does not map back onto the model's state_dict")
    torch.save({"model": official}, output)
    return official


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--model", required=True, help="timm model name the checkpoint belongs to")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON of extra timm.create_model arguments")
    p.add_argument("--to", choices=["timm", "official"],
                   help="output layout (default: timm for a .safetensors output, else official)")
    p.add_argument("--key", default="model", help="entry of a training snapshot to convert (e.g. model_ema)")
    args = p.parse_args(argv)
    to = args.to or ("timm" if args.output.suffix == ".safetensors" else "official")

    model = timm.create_model(args.model, **args.model_kwargs)
    try:
        state_dict = load_weights(args.input, model, args.key)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        if to == "timm":
            to_timm(state_dict, args.output, dict(model=args.model, source=args.input.name))
        else:
            to_official(state_dict, model, args.output)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"convert_checkpoint: {e}")
    params = sum(v.numel() for v in state_dict.values())
    print(f"{args.input} -> {args.output} ({to} layout): {args.model}, {len(state_dict)} tensors, "
          f"{params / 1e6:.2f}M values, loads strictly")
    return state_dict


if __name__ == "__main__":
    main()
