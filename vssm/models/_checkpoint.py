"""Reading checkpoint files for their tensors only.

The official Vim and VMamba checkpoints are training snapshots: besides the weights they pickle an
argparse Namespace (Vim) or a yacs CfgNode (VMamba). ``torch.load(weights_only=True)``, which timm uses,
refuses them, and ``weights_only=False`` would run whatever the pickle asks for and needs yacs installed.
`read_checkpoint` unpickles with torch's own allow-list of safe globals (tensors, storages, dtypes, plain
containers) and turns every other global into an inert placeholder, so the weights load and nothing else
in the file is executed or needed.
"""
import os
import pickle
import types

import torch

__all__ = ["read_checkpoint", "unwrap_state_dict", "load_pretrained_file", "own_loader"]


class _Skipped(dict):
    """Stands in for any pickled object that is not a tensor or a plain container; keeps nothing."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def _allowed_globals():
    from torch import _weights_only_unpickler
    return _weights_only_unpickler._get_allowed_globals()


class _TensorsOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _allowed_globals().get(f"{module}.{name}", _Skipped)


_tensors_only = types.SimpleNamespace(Unpickler=_TensorsOnlyUnpickler, __name__="vssm_tensors_only",
                                      load=pickle.load)


def read_checkpoint(path):
    """The object stored in a checkpoint file (.pth/.pt/.bin or .safetensors), keeping tensors, numbers,
    strings and plain containers; other pickled objects (training arguments, configs) become empty
    placeholders and no code of theirs runs."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tensors_only)


def unwrap_state_dict(checkpoint, key="model"):
    """The state_dict inside a training snapshot: checkpoint[key] if present (also 'state_dict'), else the
    checkpoint itself; a DataParallel/DDP 'module.' prefix is removed."""
    if isinstance(checkpoint, dict):
        for k in (key, "state_dict"):
            if isinstance(checkpoint.get(k), dict):
                checkpoint = checkpoint[k]
                break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()
            if isinstance(v, torch.Tensor)}


def load_pretrained_file(model, path, filter_fn):
    """Load a checkpoint file into model through filter_fn(checkpoint, model). The classifier is skipped
    when its shape differs (another number of classes); any other missing or unexpected key is an error
    that lists them."""
    state_dict = filter_fn(read_checkpoint(path), model)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "head") + "."
    own = model.state_dict()
    skipped = [k for k in state_dict if k.startswith(classifier) and (k not in own or own[k].shape != state_dict[k].shape)]
    for k in skipped:
        del state_dict[k]
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not (skipped and k.startswith(classifier))]
    if missing or unexpected:
        raise RuntimeError(f"{type(model).__name__}: checkpoint {path} does not match the model: missing keys "
                           f"{missing}, unexpected keys {unexpected}")


def own_loader(kwargs):
    """timm.create_model kwargs in which a weight file or URL given by pretrained_cfg_overlay is read by the
    model's own ``load_pretrained`` (timm otherwise treats an overlaid file as a plain timm state_dict)."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    overlay.setdefault("custom_load", True)
    return dict(kwargs, pretrained_cfg_overlay=overlay)
