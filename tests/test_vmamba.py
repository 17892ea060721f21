"""VMamba on timm: the official computation, official checkpoints, the fused cross-scan, the timm API, sizes.

`official_ss2d` / `official_forward` below are the released model's forward (forward_type v05_noz, patch embed
v2, downsample v3, channels-first LayerNorm2d) written out from its definition in MzeroMiko/VMamba's
`classification/models/vmamba.py`, with the official state_dict names and layouts: the four scan orders by
explicit indexing (row-major, column-major, both reversed), the per-direction projections on the scanned
sequences, the scan stepped one position at a time in float64 (tests/scan_truth.py), and the merge back to
row-major. vssm's model (projections on the map, one fused `cross_selective_scan`) must give the same outputs.
"""
import importlib.util
import math
import pickle
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import timm

import vssm  # noqa: F401  (registers the models)
from model_checks import assert_cuda_matches_cpu
from scan_truth import loop_scan
from vssm.kernels import cross_merge, cross_scan, selective_scan
from vssm.models.vmamba import SS2D, checkpoint_filter_fn

VARIANTS = ["vmamba_tiny", "vmamba_small", "vmamba_base"]
# parameters and state_dict keys of the official modules with 1000 classes (vmamba_tiny_s1l8,
# vmamba_small_s2l15, vmamba_base_s2l15)
OFFICIAL_PARAMS = [30_249_064, 50_147_752, 88_557_800]
OFFICIAL_KEYS = [276, 402, 402]
SMALL = dict(depths=(1, 2, 1, 1), dims=16)  # a reduced VMamba for CPU tests


def randomize(model, seed=0):
    """Random weights everywhere, including A_logs, Ds, dt biases and norms (not the init's constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_logs"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.5 - 1.0)
            elif name.endswith("dt_projs_bias"):
                p.copy_(torch.randn(p.shape, generator=g) - 1.0)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 1.0 / math.sqrt(p[0].numel())))
    return model


def small(name="vmamba_tiny", seed=0, **kwargs):
    return randomize(timm.create_model(name, **dict(SMALL, **kwargs)), seed).eval()


# ------------------------------------------------------------------------------------------------------
# the official layout and computation
# ------------------------------------------------------------------------------------------------------
def to_official(sd, conv_weights=(), legacy=False):
    """vssm state_dict -> the official key layout. Linear2d weights stay 2-D except for keys matching
    `conv_weights` (saved (out, in, 1, 1)); legacy=True uses the old names the official loader still renames."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"stages\.(\d+)\.downsample\.(conv|norm)\.(.+)", k)
        if m:  # official: the conv + LN at the END of the previous stage, Sequential(-, conv, -, LN)
            k = f"layers.{int(m[1]) - 1}.downsample.{1 if m[2] == 'conv' else 3}.{m[3]}"
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(norm1|ss2d|norm2|mlp)\.(.+)", k)
        if m:
            part = {"norm1": "ln_1" if legacy else "norm", "ss2d": "self_attention" if legacy else "op"}.get(m[3], m[3])
            k = f"layers.{m[1]}.blocks.{m[2]}.{part}.{m[4].replace('dwconv.', 'conv2d.')}"
        m = re.match(r"stem\.(conv1|norm1|conv2|norm2)\.(.+)", k)
        if m:  # official: Sequential(conv, -, LN, -, GELU, conv, -, LN)
            k = f"patch_embed.{dict(conv1=0, norm1=2, conv2=5, norm2=7)[m[1]]}.{m[2]}"
        if k.startswith("norm."):
            k = ("" if legacy else "classifier.") + k
        if k.startswith("head.fc."):
            k = ("head." if legacy else "classifier.head.") + k[len("head.fc."):]
        if v.dim() == 2 and any(re.search(p, k) for p in conv_weights):
            v = v[:, :, None, None]
        out[k] = v.clone()
    return out


def scan_positions(H, W):
    """For each of the four scan orders, the row-major position visited at every step."""
    hh, ww = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    rows = (hh * W + ww).flatten()         # step s -> (s // W, s % W)
    cols = (hh * W + ww).t().flatten()     # step s -> (s % H, s // H)
    return [rows, cols, rows.flip(0), cols.flip(0)]


def official_ss2d(sd, pre, x):
    """SS2D with forward_type v05_noz on (batch, C, H, W) float64, official parameter names and layouts."""
    w = lambda n: sd[pre + n].double()  # noqa: E731
    Wi = w("in_proj.weight")
    h = torch.einsum("oc,bchw->bohw", Wi.reshape(Wi.shape[0], -1), x)
    h = F.silu(F.conv2d(h, w("conv2d.weight"), padding=1, groups=h.shape[1]))
    batch, D, H, W = h.shape
    L = H * W
    orders = scan_positions(H, W)
    xs = torch.stack([h.flatten(2)[..., o] for o in orders], 1)                 # (batch, 4, D, L)
    R, N = w("dt_projs_weight").shape[2], w("A_logs").shape[1]
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, w("x_proj_weight"))
    dts, Bs, Cs = x_dbl.split([R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, w("dt_projs_weight"))
    ys, _ = loop_scan(xs.reshape(batch, 4 * D, L), dts.reshape(batch, 4 * D, L), -w("A_logs").exp(), Bs, Cs,
                      w("Ds"), delta_bias=w("dt_projs_bias").reshape(-1), delta_softplus=True)
    ys = ys.view(batch, 4, D, L)
    y = sum(ys[:, k][..., torch.argsort(o)] for k, o in enumerate(orders)).view(batch, D, H, W)
    y = F.layer_norm(y.permute(0, 2, 3, 1), (D,), w("out_norm.weight"), w("out_norm.bias"), 1e-5)
    Wo = w("out_proj.weight")
    return torch.einsum("od,bhwd->bohw", Wo.reshape(Wo.shape[0], -1), y)


def official_forward(sd, x, depths):
    """The official VSSM forward (v05_noz, patch embed v2, downsample v3, ln2d) in float64."""
    w = lambda n: sd[n].double()  # noqa: E731
    ln2d = lambda t, pre: F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), w(pre + ".weight"),  # noqa: E731
                                       w(pre + ".bias"), 1e-5).permute(0, 3, 1, 2)
    lin2d = lambda t, pre: torch.einsum("oc,bchw->bohw", w(pre + ".weight").flatten(1), t) \
        + w(pre + ".bias")[:, None, None]  # noqa: E731
    x = x.double()
    x = F.conv2d(x, w("patch_embed.0.weight"), w("patch_embed.0.bias"), stride=2, padding=1)
    x = F.gelu(ln2d(x, "patch_embed.2"))
    x = ln2d(F.conv2d(x, w("patch_embed.5.weight"), w("patch_embed.5.bias"), stride=2, padding=1), "patch_embed.7")
    for i, depth in enumerate(depths):
        for j in range(depth):
            pre = f"layers.{i}.blocks.{j}."
            x = x + official_ss2d(sd, pre + "op.", ln2d(x, pre + "norm"))
            x = x + lin2d(F.gelu(lin2d(ln2d(x, pre + "norm2"), pre + "mlp.fc1")), pre + "mlp.fc2")
        if i < len(depths) - 1:
            pre = f"layers.{i}.downsample."
            x = ln2d(F.conv2d(x, w(pre + "1.weight"), w(pre + "1.bias"), stride=2, padding=1), pre + "3")
    x = ln2d(x, "classifier.norm").mean((2, 3))
    return x @ w("classifier.head.weight").t() + w("classifier.head.bias")


def test_matches_official_computation():
    model = small()
    sd = to_official(model.state_dict())
    img = torch.randn(2, 3, 32, 44)
    ref = official_forward(sd, img, SMALL["depths"])
    assert (model(img).double() - ref).norm() / ref.norm() < 1e-5
    out = model.double()(img.double())  # in float64 down to the norms' eps
    assert (out - ref).norm() / ref.norm() < 1e-10


def test_official_parameter_counts_and_keys():
    for name, params, keys in zip(VARIANTS, OFFICIAL_PARAMS, OFFICIAL_KEYS):
        with torch.device("meta"):
            model = timm.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == params, name
        official = to_official(model.state_dict())
        assert len(official) == keys, name
        # every official name maps back onto exactly this model's keys and shapes
        mapped = checkpoint_filter_fn(official, model)
        assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------
# SS2D: the fused cross-scan against the official math and against the unfused kernels
# ------------------------------------------------------------------------------------------------------
def random_ss2d(dim=8, d_state=1, ssm_ratio=2.0, dtype=torch.float64, seed=0):
    ss2d = SS2D(dim, ssm_ratio=ssm_ratio, d_state=d_state).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ss2d.named_parameters():
            scale = 0.5 if p.dim() == 1 else 1 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * scale)
            if name == "A_logs":
                p.copy_(torch.rand(p.shape, generator=g, dtype=dtype) * 2.5 - 1.0)
            elif name == "out_norm.weight":
                p.add_(1.0)
    return ss2d


@pytest.mark.parametrize("d_state", [1, 2])
@pytest.mark.parametrize("hw", [(5, 7), (6, 3)])
def test_ss2d_matches_official_math(d_state, hw):
    """Forward and every gradient of the fused SS2D equal the official v05_noz computation (float64)."""
    ss2d = random_ss2d(d_state=d_state)
    x = torch.randn(2, 8, *hw, dtype=torch.float64, requires_grad=True)
    sd = {k.replace("dwconv.", "conv2d."): v for k, v in ss2d.state_dict(keep_vars=True).items()}
    ref = official_ss2d(sd, "", x)
    out = ss2d(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # SS2D runs channels-last
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    grad_out = torch.randn_like(out)
    params = [x] + list(ss2d.parameters())
    grads = torch.autograd.grad(out, params, grad_out)
    names = ["x"] + [n for n, _ in ss2d.named_parameters()]
    ref_params = [x] + [sd[n.replace("dwconv.", "conv2d.")] for n in names[1:]]
    ref_grads = torch.autograd.grad(ref, ref_params, grad_out)
    for n, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10, msg=n)


def unfused_scan(ss2d, x):
    """The SS2D core with cross-scan copies: cross_scan -> per-direction projections on the sequences ->
    one grouped selective_scan -> cross_merge (the official forward_corev2 order of operations)."""
    batch, D, H, W = x.shape
    K, R, N = 4, ss2d.dt_rank, ss2d.d_state
    xs = cross_scan(x)                                                               # (batch, 4, D, L)
    x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, ss2d.x_proj_weight)
    dts, Bs, Cs = x_dbl.split([R, N, N], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, ss2d.dt_projs_weight)
    ys = selective_scan(xs.reshape(batch, K * D, -1), dts.reshape(batch, K * D, -1), -ss2d.A_logs.float().exp(),
                        Bs.contiguous(), Cs.contiguous(), ss2d.Ds.float(),
                        delta_bias=ss2d.dt_projs_bias.float().view(-1), delta_softplus=True)
    return cross_merge(ys.view(batch, K, D, H, W)).view(batch, D, H, W)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hw", [(6, 9), (9, 4)])
def test_fused_cross_scan_matches_unfused_kernels(device, hw):
    """SS2D.scan (projections on the map + cross_selective_scan) == cross_scan/selective_scan/cross_merge,
    forward and gradients, in float32 (on CUDA both run the Triton kernels)."""
    ss2d = random_ss2d(dim=16, dtype=torch.float32).to(device)
    x = torch.randn(2, ss2d.d_inner, *hw, device=device, requires_grad=True)
    out, ref = ss2d.scan(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), unfused_scan(ss2d, x)  # scan: channels-last
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(out)
    params = [x] + list(ss2d.parameters())
    grads = torch.autograd.grad(out, params, grad_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, params, grad_out, allow_unused=True)
    for (n, _), g, r in zip([("x", x)] + list(ss2d.named_parameters()), grads, ref_grads):
        if r is None:  # in_proj, dwconv, out_norm, out_proj are outside the scan
            assert g is None, n
            continue
        assert (g - r).norm() <= 1e-4 * r.norm() + 1e-6, n


# ------------------------------------------------------------------------------------------------------
# official checkpoints
# ------------------------------------------------------------------------------------------------------
@pytest.fixture
def official_file(tmp_path, monkeypatch):
    """An official-format training snapshot of a random reduced vmamba_tiny: {'model', 'model_ema', ...,
    'config': a yacs CfgNode}, with 4-D Linear2d weights in places and legacy key names in 'model_ema'.
    yacs is mimicked (a dict subclass with attributes in its __dict__, pickled like yacs' CfgNode) and gone
    again before loading."""
    src, ema = small(seed=1), small(seed=2)
    yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__.update(__immutable__=True, __deprecated_keys__=set(), __renamed_keys__={},
                                 __new_allowed__=False)

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs_config.CfgNode, yacs.config = CfgNode, yacs_config
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", yacs_config)
    config = CfgNode({"MODEL": CfgNode({"TYPE": "vssm", "DROP_PATH_RATE": 0.2}), "TRAIN": CfgNode({"EPOCHS": 300})})
    path = tmp_path / "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    torch.save({
        "model": to_official(src.state_dict(), conv_weights=[r"mlp\.fc1", r"op\.in_proj"]),
        "model_ema": to_official(ema.state_dict(), conv_weights=[r"out_proj"], legacy=True),
        "optimizer": {"state": {0: {"exp_avg": torch.randn(3)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "max_accuracy": np.float64(82.6), "max_accuray_ema": 82.5, "epoch": 264, "config": config,
    }, path)
    monkeypatch.delitem(sys.modules, "yacs")
    monkeypatch.delitem(sys.modules, "yacs.config")
    return path, src, ema


def test_official_checkpoint_loads_through_timm(official_file):
    path, src, ema = official_file
    with pytest.raises(pickle.UnpicklingError):  # what timm's weights-only loader runs into
        torch.load(path, weights_only=True)
    if importlib.util.find_spec("yacs") is None:
        with pytest.raises(ModuleNotFoundError, match="yacs"):  # and a plain load needs yacs
            torch.load(path, weights_only=False)
    model = timm.create_model("vmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    img = torch.randn(2, 3, 48, 40)
    torch.testing.assert_close(model.eval()(img), src(img), rtol=0, atol=0)
    model.load_pretrained(str(path), use_ema=True)  # legacy names, 4-D out_proj weights
    torch.testing.assert_close(model(img), ema(img), rtol=0, atol=0)

    # another number of classes (head skipped), grey images (first conv summed), features only
    tuned = timm.create_model("vmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=7, in_chans=1, **SMALL).eval()
    torch.testing.assert_close(tuned.stem.conv1.weight, src.stem.conv1.weight.sum(1, keepdim=True))
    grey = img[:, :1]
    torch.testing.assert_close(tuned.forward_features(grey), src.forward_features(grey.expand(-1, 3, -1, -1)),
                               rtol=1e-5, atol=1e-5)
    feats = timm.create_model("vmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              features_only=True, **SMALL).eval()
    for f, r in zip(feats(img), src.forward_intermediates(img, intermediates_only=True)):
        torch.testing.assert_close(f, r, rtol=0, atol=0)


def test_timm_format_files_and_state_dicts(tmp_path):
    src = small(seed=3)
    img = torch.randn(1, 3, 32, 32)
    path = tmp_path / "vmamba.pth"
    torch.save(src.state_dict(), path)
    from safetensors.torch import save_file
    save_file(src.state_dict(), tmp_path / "vmamba.safetensors")
    overlays = [dict(file=str(path)), dict(file=str(tmp_path / "vmamba.safetensors")),
                dict(state_dict=to_official(src.state_dict()))]
    for overlay in overlays:
        model = timm.create_model("vmamba_tiny", pretrained=True, pretrained_cfg_overlay=overlay, **SMALL).eval()
        torch.testing.assert_close(model(img), src(img), rtol=0, atol=0)


def test_checkpoint_with_wrong_keys_is_refused(tmp_path):
    sd = to_official(small().state_dict())
    del sd["layers.1.blocks.1.op.Ds"]
    sd["layers.0.blocks.0.op.x_proj_bias"] = torch.zeros(4, 3)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd, "epoch": 1}, path)
    with pytest.raises(RuntimeError, match=r"stages\.1\.blocks\.1\.ss2d\.Ds.*stages\.0\.blocks\.0\.ss2d\.x_proj_bias"):
        timm.create_model("vmamba_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)


# ------------------------------------------------------------------------------------------------------
# the timm API
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_every_variant(name):
    torch.manual_seed(0)
    model = timm.create_model(name, depths=(1, 1, 1, 1), dims=16, drop_path_rate=0.1)
    img = torch.randn(2, 3, 64, 48)
    out = model(img)
    assert out.shape == (2, 1000)
    out.logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    model.eval()
    feats = model.forward_features(img)
    assert feats.shape == (2, 128, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 128)


def test_features_only():
    model = timm.create_model("vmamba_small", features_only=True, **SMALL)
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]
    two = timm.create_model("vmamba_small", features_only=True, out_indices=(1, 3), **SMALL)
    assert [f.shape[1] for f in two(torch.randn(1, 3, 32, 32))] == [32, 128]


def test_forward_intermediates_and_pruning():
    model = small()
    img = torch.randn(2, 3, 48, 32)
    final, inter = model.forward_intermediates(img)
    torch.testing.assert_close(final, model.forward_features(img))
    x = model.stem(img)
    for i, stage in enumerate(model.stages):  # the stage outputs, before the final norm
        x = stage(x)  # (B, H, W, C)
        torch.testing.assert_close(inter[i], x.permute(0, 3, 1, 2))
    normed = model.forward_intermediates(img, indices=1, norm=True, intermediates_only=True)
    assert len(normed) == 1
    torch.testing.assert_close(normed[0], final)
    early = model.forward_intermediates(img, indices=[0, 1], stop_early=True, intermediates_only=True)
    for a, b in zip(early, inter[:2]):
        torch.testing.assert_close(a, b)
    kept = model.prune_intermediate_layers(indices=[0, 1])
    assert list(kept) == [0, 1] and len(model.stages) == 2
    final2, inter2 = model.forward_intermediates(img)
    torch.testing.assert_close(final2, inter[1])
    torch.testing.assert_close(model(img), inter[1])  # no norm, no pooling, no classifier left


@pytest.mark.parametrize("size", [(33, 47), (20, 71), (5, 3), (1, 1)])
def test_any_input_size(size):
    """Odd sizes: every k3 s2 p1 conv rounds up, stage i has ceil(side / 2^(i+2)) positions."""
    model = small()
    img = torch.randn(2, 3, *size)
    final, inter = model.forward_intermediates(img)
    H, W = size
    for i, t in enumerate(inter):
        s = 2 ** (i + 2)
        assert t.shape[2:] == (-(-H // s), -(-W // s))
    out = model(img)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    torch.testing.assert_close(model(img[1:]), out[1:], rtol=1e-5, atol=1e-5)  # rows are independent


def test_grad_checkpointing_gives_the_same_gradients():
    model = randomize(timm.create_model("vmamba_tiny", drop_path_rate=0.2, **SMALL)).train()
    img = torch.randn(2, 3, 24, 32)

    def grads():
        model.zero_grad()
        torch.manual_seed(7)
        model(img).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_reset_classifier_and_groups():
    model = small()
    img = torch.randn(2, 3, 32, 32)
    pre = model.forward_head(model.forward_features(img), pre_logits=True)
    model.reset_classifier(5)
    assert model(img).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    torch.testing.assert_close(model(img), pre)
    model.reset_classifier(3, global_pool="max")
    assert model(img).shape == (2, 3)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sorted(n for g in groups.values() for n in g) == sorted(n for n, _ in model.named_parameters())


def test_autocast_bf16_and_bf16_weights():
    model = small()
    img = torch.randn(2, 3, 32, 48)
    ref = model(img)
    seen = []  # the scan's float32 output is normalised in float32, as in the official "oflex" path
    hook = model.stages[0].blocks[0].ss2d.out_norm.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(img)
    hook.remove()
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 5e-2
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    half = model.to(torch.bfloat16)
    out = half(img.bfloat16())
    assert out.dtype == torch.bfloat16 and (out.float() - ref).norm() / ref.norm() < 1e-1


def test_autocast_norms_write_the_linear_dtype(monkeypatch):
    """Under autocast the block norms write bf16 for the Linears after them: exactly what the Linears'
    own cast of a float32 norm output would give (same model output, bit for bit)."""
    model = small()
    img = torch.randn(2, 3, 32, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(img)
    norm_type = type(model.stages[0].blocks[0].norm1)
    forward = norm_type.forward
    monkeypatch.setattr(norm_type, "forward", lambda self, x, out_dtype=None: forward(self, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(img)
    assert torch.equal(out, ref)


def test_torch_compile():
    """Dynamo captures the model around the CPU reference scan (one opaque call); aot_eager keeps the test
    fast, the default inductor backend compiles the same graphs (a minute of C++ codegen on a small CPU)."""
    model = small(depths=(1, 1, 1, 1))
    img = torch.randn(1, 3, 32, 48)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(img), model(img), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: Dynamo traces the Triton scan")
def test_cuda_torch_compile_traces_the_triton_scan():
    """On CUDA the whole model, scan kernels included, is one graph (fullgraph: no break at the scan), and
    the compiled forward and backward match eager."""
    model = randomize(timm.create_model("vmamba_tiny", depths=(1, 1, 2, 1), dims=32)).cuda()
    img = torch.randn(2, 3, 64, 96, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    out, ref = compiled(img), model(img)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    grads_ref = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3)


def test_bad_input_is_named():
    model = small()
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\), got \(3, 32, 32\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\), got \(1, 4, 32, 32\)"):
        model.forward_intermediates(torch.randn(1, 4, 32, 32))
    feats = timm.create_model("vmamba_tiny", features_only=True, in_chans=1, **SMALL)
    with pytest.raises(ValueError, match=r"\(batch, 1, height, width\)"):
        feats(torch.randn(1, 3, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the model on the Triton kernels")
def test_cuda_triton_matches_cpu_reference():
    model = randomize(timm.create_model("vmamba_tiny", depths=(2, 2, 2, 2), dims=64))
    assert_cuda_matches_cpu(model, torch.randn(4, 3, 224, 160), bf16_tol=5e-2)
