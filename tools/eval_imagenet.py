"""Top-1/top-5 accuracy of any timm model (vssm's or timm's) on an ImageFolder: ImageNet-1k val, ImageNet-V2,
or any subset of their classes.

    python tools/eval_imagenet.py --model vmamba_tiny --pretrained --data /data/imagenet/val --amp
    python tools/eval_imagenet.py --model vim_tiny_patch16_224 --checkpoint vim_t_midclstok_76p1acc.pth \\
        --data /data/imagenetv2-matched-frequency --output vim_t_v2.json

Weights: --pretrained takes the model's default pretrained tag (or the one in the name, `vim_tiny_patch16_224.in1k`);
--checkpoint reads a file through `pretrained_cfg_overlay=dict(file=...)`: official Vim/VMamba training snapshots,
timm state_dicts (.pth/.safetensors). Preprocessing is the model's pretrained cfg (resolve_data_config +
timm's eval transform: resize to img_size / crop_pct, center crop), --img-size / --crop-pct override it.

Class folders -> the model's class indices, first rule that covers every folder:
  1. --class-map FILE (timm's format: a .txt with one folder name per line, line i = class i; or a .pkl dict);
  2. ImageNet synsets (`n01440764`) of the model's label set (timm.data.infer_imagenet_subset, e.g. 1000 classes ->
     imagenet-1k): the synset's index in timm.data.ImageNetInfo, so a folder of any subset of synsets works;
  3. integers below num_classes (ImageNet-V2's folders `0` ... `999`): that index;
  4. as many folders as the model has classes: sorted folder names (timm's ImageFolder order).
Otherwise it stops and names the folders it cannot place. The model's full output is ranked (top-k over all of
its classes, not only the folder's).
"""
import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
from timm.data import ImageNetInfo, create_dataset, create_loader, infer_imagenet_subset, resolve_data_config
from timm.data.readers.class_map import load_class_map
from timm.utils import AverageMeter, accuracy
from timm.utils.misc import natural_key
from tqdm import tqdm

import vssm  # noqa: F401  (registers vssm's models with timm)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def class_folders(root):
    """Names of the class sub-folders of root."""
    names = sorted((d.name for d in os.scandir(root) if d.is_dir()), key=natural_key)
    if not names:
        raise SystemExit(f"eval_imagenet: {root} has no class sub-folders (ImageFolder layout: root/<class>/*.jpg)")
    return names


def map_classes(names, num_classes, imagenet_subset=None, class_map=None):
    """(folder name -> model class index, the rule that mapped them); see the module docs for the rules."""
    if class_map:
        mapping = load_class_map(class_map)
        how = f"class map {class_map}"
    elif imagenet_subset and set(names) <= set(synsets := ImageNetInfo(imagenet_subset).label_names()):
        index = {s: i for i, s in enumerate(synsets)}
        mapping, how = {n: index[n] for n in names}, f"{imagenet_subset} synsets"
    elif all(n.isdigit() and int(n) < num_classes for n in names):
        mapping, how = {n: int(n) for n in names}, "folder names are class indices"
    elif len(names) == num_classes:
        mapping, how = {n: i for i, n in enumerate(names)}, "sorted folder names"
    else:
        raise SystemExit(f"eval_imagenet: cannot map the {len(names)} class folders (e.g. {names[:5]}) to the model's "
                         f"{num_classes} classes: they are neither {imagenet_subset or 'ImageNet'} synsets nor class "
                         f"indices; give --class-map")
    unknown = [n for n in names if n not in mapping or not 0 <= mapping[n] < num_classes]
    if unknown:
        raise SystemExit(f"eval_imagenet: folders {unknown[:10]} have no class below {num_classes} in {how}")
    return {n: mapping[n] for n in names}, how


def check_classifier(model, path):
    """Stop if the checkpoint's classifier has another number of classes than the model: the loaders would skip
    it and evaluate a random classifier."""
    import importlib
    from vssm.models._checkpoint import read_checkpoint, unwrap_state_dict
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    state_dict = unwrap_state_dict(read_checkpoint(path))
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    key = model.pretrained_cfg.get("classifier", "head") + ".weight"
    own = model.state_dict().get(key)
    if key in state_dict and own is not None and state_dict[key].shape[0] != own.shape[0]:
        raise SystemExit(f"eval_imagenet: {path} has {state_dict[key].shape[0]} classes, the model "
                         f"{own.shape[0]}; pass --num-classes {state_dict[key].shape[0]}")


def create_model(args):
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.checkpoint:
        overlay = dict(file=str(args.checkpoint))
        if args.num_classes is not None:  # timm drops a checkpoint's classifier when the cfg's count differs
            overlay["num_classes"] = args.num_classes
        model = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        check_classifier(model, args.checkpoint)
    else:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    return model.eval()


def evaluate(model, loader, device, amp=None, channels_last=False):
    """(top-1 %, top-5 %, images) over the loader."""
    top1, top5 = AverageMeter(), AverageMeter()
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else nullcontext()
    bar = tqdm(loader, desc="eval", unit="batch")
    with torch.inference_mode():
        for images, target in bar:
            images, target = images.to(device), target.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast:
                output = model(images)
            acc1, acc5 = accuracy(output.float(), target, topk=(1, 5))
            top1.update(acc1.item(), images.shape[0])
            top5.update(acc5.item(), images.shape[0])
            bar.set_postfix(top1=f"{top1.avg:.2f}", top5=f"{top5.avg:.2f}")
    return top1.avg, top5.avg, top1.count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name, optionally with a pretrained tag")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--pretrained", action="store_true", help="the model's default pretrained weights")
    weights.add_argument("--checkpoint", type=Path, help="official Vim/VMamba file or timm .pth/.safetensors")
    p.add_argument("--data", type=Path, required=True, help="ImageFolder root: <data>/<class>/<image>")
    p.add_argument("--class-map", help="folder -> class index file (timm's .txt or .pkl); see the rules above")
    p.add_argument("--num-classes", type=int, help="the checkpoint's number of classes (default: the model's)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON of extra timm.create_model arguments")
    p.add_argument("--img-size", type=int, help="evaluation resolution (default: the pretrained cfg's)")
    p.add_argument("--crop-pct", type=float, help="center-crop fraction (default: the pretrained cfg's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", nargs="?", const="bf16", choices=list(AMP_DTYPES), help="autocast dtype (bare: bf16)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--output", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    model = create_model(args)
    names = class_folders(args.data)
    subset = infer_imagenet_subset(model)
    class_to_idx, how = map_classes(names, model.num_classes, subset, args.class_map)
    config = resolve_data_config(dict(img_size=args.img_size, crop_pct=args.crop_pct), model=model)
    dataset = create_dataset("", root=str(args.data), search_split=False, class_map=class_to_idx)
    cuda = device.type == "cuda"
    loader = create_loader(dataset, **config, batch_size=args.batch_size, num_workers=args.workers,
                           use_prefetcher=cuda, device=device, pin_memory=cuda)
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)

    print(f"{args.model}: {len(dataset)} images in {len(names)} classes ({how}), input {config['input_size']}, "
          f"crop_pct {config['crop_pct']}, {config['interpolation']}, device {device}, amp {args.amp or 'off'}")
    start = time.perf_counter()
    top1, top5, count = evaluate(model, loader, device, args.amp, args.channels_last)
    seconds = time.perf_counter() - start
    cfg = model.pretrained_cfg
    result = dict(model=args.model, weights=str(args.checkpoint) if args.checkpoint else "pretrained",
                  pretrained_cfg=f"{cfg.get('architecture')}.{cfg.get('tag')}", data=str(args.data), images=count,
                  classes=len(names), class_mapping=how, top1=top1, top5=top5,
                  data_config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                  batch_size=args.batch_size, device=str(device), amp=args.amp, channels_last=args.channels_last,
                  seconds=seconds, img_per_s=count / seconds)
    print(f"{args.model}: top-1 {top1:.3f}%  top-5 {top5:.3f}%  ({count} images, {count / seconds:.1f} img/s)")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
