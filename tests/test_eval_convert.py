"""tools/eval_imagenet.py on a generated ImageFolder and tools/convert_checkpoint.py on official-layout files of
reduced Vim and VMamba models (CPU)."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import vssm  # noqa: F401  (registers the models)
from test_vim import randomize as randomize_vim
from test_vmamba import SMALL as VMAMBA, small as small_vmamba, to_official as vmamba_to_official

ROOT = Path(__file__).resolve().parents[1]
VIM = dict(embed_dim=32, depth=2)  # a reduced vim_tiny_patch16_224
SYNSETS = [7, 281, 954]  # ImageNet-1k classes of the generated folders (not the first three: the mapping matters)
DECOYS = [3, 500, 640, 999]  # other classes the test model also favours


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_tool, convert_tool = load_tool("eval_imagenet"), load_tool("convert_checkpoint")


# ------------------------------------------------------------------------------------------------------
# tools/eval_imagenet.py
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    """root/<synset>/*.JPEG: 4 + 5 + 6 random 64x48 images of three ImageNet classes."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    rng = np.random.default_rng(0)
    names = ImageNetInfo().label_names()
    for count, index in zip((4, 5, 6), SYNSETS):
        (root / names[index]).mkdir(parents=True)
        for j in range(count):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / names[index] / f"ILSVRC2012_val_{index:03d}{j}.JPEG")
    return root


@pytest.fixture(scope="module")
def vim_checkpoint(tmp_path_factory):
    """An official-layout snapshot of a random reduced Vim whose classifier favours the folders' classes and four
    decoys, so that the images decide among 7 classes: top-1 and top-5 are neither 0 nor 100%."""
    model = randomize_vim(timm.create_model("vim_tiny_patch16_224", **VIM), seed=3).eval()
    with torch.no_grad():
        favoured = SYNSETS + DECOYS
        model.head.bias[favoured] += 20
        model.head.weight[favoured] *= 8
    path = tmp_path_factory.mktemp("ckpt") / "vim_t_midclstok.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    return path, model


def direct_accuracy(model, root, img_size):
    """Top-1/top-5 % computed here: the model's eval transform on every image, labels from the synsets."""
    config = resolve_data_config(dict(img_size=img_size), model=model)
    transform = create_transform(**config)
    index = {s: i for i, s in enumerate(ImageNetInfo().label_names())}
    images, labels = [], []
    for folder in sorted(root.iterdir()):
        for file in sorted(folder.iterdir()):
            images.append(transform(Image.open(file).convert("RGB")))
            labels.append(index[folder.name])
    with torch.no_grad():
        top5 = model(torch.stack(images)).topk(5, dim=1).indices
    labels = torch.tensor(labels)
    return (100 * (top5[:, 0] == labels).float().mean().item(),
            100 * (top5 == labels[:, None]).any(1).float().mean().item())


def eval_args(data, checkpoint, *extra):
    return ["--model", "vim_tiny_patch16_224", "--checkpoint", str(checkpoint), "--data", str(data),
            "--model-kwargs", json.dumps(VIM), "--img-size", "64", "--batch-size", "4", "--workers", "0",
            "--device", "cpu", *extra]


def test_eval_cli_on_a_synset_subset(imagefolder, vim_checkpoint, tmp_path):
    path, model = vim_checkpoint
    top1, top5 = direct_accuracy(model, imagefolder, img_size=64)
    assert 0 < top1 < top5 < 100  # the test data can tell a right mapping from a wrong one
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_imagenet.py"),
                           *eval_args(imagefolder, path, "--output", str(out))],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert (result["images"], result["classes"], result["class_mapping"]) == (15, 3, "imagenet-1k synsets")
    assert result["data_config"]["input_size"] == [3, 64, 64] and result["data_config"]["interpolation"] == "bicubic"
    assert result["top1"] == pytest.approx(top1, abs=1e-4) and result["top5"] == pytest.approx(top5, abs=1e-4)
    assert f"top-1 {top1:.3f}%" in proc.stdout


def test_eval_imagenet_v2_layout_and_class_map(imagefolder, vim_checkpoint, tmp_path):
    """Folders named by class index (ImageNet-V2), or by any name with --class-map, give the same accuracy."""
    path, model = vim_checkpoint
    top1, top5 = direct_accuracy(model, imagefolder, img_size=64)
    synsets = ImageNetInfo().label_names()
    v2, named = tmp_path / "v2", tmp_path / "named"
    for index in SYNSETS:
        for target in (v2 / str(index), named / f"class{index}"):
            target.mkdir(parents=True)
            for f in (imagefolder / synsets[index]).iterdir():
                (target / f.name).symlink_to(f)
    result = eval_tool.main(eval_args(v2, path))
    assert result["class_mapping"] == "folder names are class indices"
    assert (result["top1"], result["top5"]) == pytest.approx((top1, top5), abs=1e-4)
    bf16 = eval_tool.main(eval_args(v2, path, "--amp", "--channels-last"))  # bf16 autocast: one image may flip
    assert bf16["amp"] == "bf16" and bf16["channels_last"]
    assert (bf16["top1"], bf16["top5"]) == pytest.approx((top1, top5), abs=100 / 15 + 1e-4)

    with pytest.raises(SystemExit, match=r"cannot map the 3 class folders.*class281"):
        eval_tool.main(eval_args(named, path))
    class_map = tmp_path / "classes.txt"  # timm's format: line i names class i
    class_map.write_text("\n".join(f"class{i}" if i in SYNSETS else f"unused{i}" for i in range(1000)) + "\n")
    result = eval_tool.main(eval_args(named, path, "--class-map", str(class_map)))
    assert (result["top1"], result["top5"]) == pytest.approx((top1, top5), abs=1e-4)


def test_eval_refuses_a_checkpoint_with_other_classes(imagefolder, tmp_path):
    model = timm.create_model("vim_tiny_patch16_224", num_classes=10, **VIM)
    path = tmp_path / "ten.pth"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(SystemExit, match="has 10 classes, the model 1000; pass --num-classes 10"):
        eval_tool.main(eval_args(imagefolder, path))


# ------------------------------------------------------------------------------------------------------
# tools/convert_checkpoint.py
# ------------------------------------------------------------------------------------------------------
def vim_official(tmp_path):
    """hustvl/Vim's training snapshot of a random reduced Vim (its keys are the official ones)."""
    src = randomize_vim(timm.create_model("vim_tiny_patch16_224", **VIM), seed=1).eval()
    official = {k: v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    torch.save({"model": official, "model_ema": {k: v + 1 for k, v in official.items()}, "epoch": 299,
                "args": argparse.Namespace(model="vim_tiny", lr=5e-4)}, path)
    return "vim_tiny_patch16_224", VIM, src, official, path, torch.randn(2, 3, 64, 64)


def vmamba_official(tmp_path):
    """MzeroMiko/VMamba's snapshot of a random reduced VMamba, some Linear weights saved 4-D as 1x1 convs."""
    src = small_vmamba(seed=1)
    path = tmp_path / "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    torch.save({"model": vmamba_to_official(src.state_dict(), conv_weights=[r"mlp\.fc1", r"op\.in_proj"]),
                "epoch": 264}, path)
    return "vmamba_tiny", VMAMBA, src, vmamba_to_official(src.state_dict()), path, torch.randn(2, 3, 48, 40)


def convert(name, kwargs, *paths_and_options):
    return convert_tool.main(["--model", name, "--model-kwargs", json.dumps(kwargs), *map(str, paths_and_options)])


@pytest.mark.parametrize("make", [vim_official, vmamba_official])
def test_convert_to_safetensors_and_back(make, tmp_path):
    name, kwargs, src, official, path, img = make(tmp_path)
    out = tmp_path / "timm.safetensors"
    convert(name, kwargs, path, out)
    assert load_file(out).keys() == src.state_dict().keys()
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(img), src(img), rtol=0, atol=0)

    back = tmp_path / "official.pth"
    convert(name, kwargs, out, back)  # a .pth output: the official layout
    saved = torch.load(back, weights_only=True)
    assert list(saved) == ["model"] and saved["model"].keys() == official.keys()
    for k, v in official.items():
        torch.testing.assert_close(saved["model"][k], v, rtol=0, atol=0, msg=k)


def test_convert_the_ema_weights(tmp_path):
    name, kwargs, src, official, path, img = vim_official(tmp_path)
    out = tmp_path / "ema.safetensors"
    convert(name, kwargs, path, out, "--key", "model_ema")
    ema = load_file(out)
    assert all(torch.equal(ema[k], v + 1) for k, v in official.items())
    with pytest.raises(SystemExit, match="has no 'model_ema' entry"):
        convert(name, kwargs, out, tmp_path / "x.safetensors", "--key", "model_ema")


def test_convert_refuses_checkpoints_that_do_not_match(tmp_path):
    name, kwargs, src, official, path, img = vmamba_official(tmp_path)
    del official["layers.1.blocks.1.op.Ds"]
    official["layers.0.blocks.0.op.x_proj_bias"] = torch.zeros(4, 3)
    bad = tmp_path / "bad.pth"
    torch.save({"model": official}, bad)
    with pytest.raises(SystemExit, match=r"1 missing keys \['stages\.1\.blocks\.1\.ss2d\.Ds'\]; 1 unexpected keys "
                                         r"\['stages\.0\.blocks\.0\.ss2d\.x_proj_bias'\]"):
        convert(name, kwargs, bad, tmp_path / "out.safetensors")
    # the right keys for another width; another family altogether
    with pytest.raises(SystemExit, match=r"shape mismatches \['stem\.conv1\.weight: \(8, 3, 3, 3\) vs model "):
        convert(name, dict(kwargs, dims=32), path, tmp_path / "out.safetensors")
    with pytest.raises(SystemExit, match=r"does not match Vim .*missing keys \['cls_token', 'pos_embed'"):
        convert("vim_tiny_patch16_224", VIM, path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_no_official_layout_for_other_families(tmp_path):
    model = timm.create_model("diffussm_tiny_8")
    path = tmp_path / "diffussm.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(SystemExit, match="no official key layout known for DiffuSSM"):
        convert("diffussm_tiny_8", {}, path, tmp_path / "official.pth")
    convert("diffussm_tiny_8", {}, path, tmp_path / "timm.safetensors")  # to timm needs no official layout
    assert load_file(tmp_path / "timm.safetensors").keys() == model.state_dict().keys()
