"""Vim on timm: the official model's computation, official checkpoints, the timm API, sizes and errors.

`official_forward` below is the released model's forward written out step by step from hustvl/Vim's
`models_mamba.py` and its `mamba_simple.py` (bimamba v2): the backward direction made by flipping x and z,
a causal conv and scan on the flipped sequence, and flipping back; the scan stepped one position at a time
in float64. vssm's model (no flips, `reverse=True`) must give the same logits from the same weights.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F
import timm

import vssm  # noqa: F401  (registers the models)
from model_checks import assert_cuda_matches_cpu
from scan_truth import loop_scan
from vssm.models.vim import Vim, resample_pos_embed

VARIANTS = ["vim_tiny_patch16_224", "vim_tiny_patch16_stride8_224", "vim_small_patch16_224",
            "vim_small_patch16_stride8_224", "vim_base_patch16_224"]
# parameters of the official constructors with 1000 classes (counted on the official modules)
OFFICIAL_PARAMS = [7_148_008, 7_250_344, 25_796_584, 26_001_256, 97_598_440]
SMALL = dict(embed_dim=32, depth=3)  # a reduced Vim for CPU tests


def randomize(model, seed=0):
    """Random weights everywhere, including A_log, D, biases and norms (not the init's constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log") or name.endswith("A_b_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.5 - 0.5)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 1.0 / math.sqrt(p[0].numel())))
    return model


# ------------------------------------------------------------------------------------------------------
# the official computation
# ------------------------------------------------------------------------------------------------------
def official_mixer(sd, pre, h, d_state=16):
    """mamba_simple.Mamba.forward with bimamba_type='v2', if_divide_out=True, on (batch, L, D) float64."""
    w = lambda n: sd[pre + n].double()  # noqa: E731
    L = h.shape[1]
    xz = torch.einsum("ed,bld->bel", w("in_proj.weight"), h)

    def one_direction(xz, sfx):
        x, z = xz.chunk(2, dim=1)
        conv_w = w(f"conv1d{sfx}.weight")
        x = F.silu(F.conv1d(x, conv_w, w(f"conv1d{sfx}.bias"), padding=conv_w.shape[-1] - 1,
                            groups=x.shape[1])[..., :L])
        x_dbl = torch.einsum("oe,bel->bol", w(f"x_proj{sfx}.weight"), x)
        R = w(f"dt_proj{sfx}.weight").shape[1]
        dt, B, C = x_dbl.split([R, d_state, d_state], dim=1)
        delta = torch.einsum("er,brl->bel", w(f"dt_proj{sfx}.weight"), dt)
        A = -torch.exp(w("A_log" if sfx == "" else "A_b_log"))
        y, _ = loop_scan(x, delta, A, B, C, w("D" if sfx == "" else "D_b"), z,
                         w(f"dt_proj{sfx}.bias"), delta_softplus=True)
        return y

    out = one_direction(xz, "")
    out_b = one_direction(xz.flip([-1]), "_b")
    return torch.einsum("de,ble->bld", w("out_proj.weight"), ((out + out_b.flip([-1])) / 2).transpose(1, 2))


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def official_forward(sd, img, patch=16, stride=16):
    """VisionMamba.forward_features + head for the released flags (middle cls token, abs pos embed, fused
    add+RMSNorm with fp32 residual, final norm, the middle token to the head), in float64."""
    x = F.conv2d(img.double(), sd["patch_embed.proj.weight"].double(), sd["patch_embed.proj.bias"].double(),
                 stride=stride).flatten(2).transpose(1, 2)
    M = x.shape[1]
    p = M // 2
    x = torch.cat([x[:, :p], sd["cls_token"].double().expand(x.shape[0], -1, -1), x[:, p:]], dim=1)
    x = x + sd["pos_embed"].double()
    depth = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    residual, hidden = None, x
    for i in range(depth):
        residual = hidden if residual is None else residual + hidden
        hidden = official_mixer(sd, f"layers.{i}.mixer.", rms_norm(residual, sd[f"layers.{i}.norm.weight"]))
    feat = rms_norm(residual + hidden, sd["norm_f.weight"])[:, p]
    return feat @ sd["head.weight"].double().t() + sd["head.bias"].double()


@pytest.mark.parametrize("stride,size", [(16, (64, 48)), (8, (48, 40))])
def test_matches_official_computation(stride, size):
    model = randomize(Vim(img_size=size, patch_size=16, stride=stride, num_classes=7, **SMALL)).eval()
    img = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model(img)
        truth = official_forward(model.state_dict(), img, stride=stride)
    assert ours.shape == (2, 7)
    assert (ours.double() - truth).norm() / truth.norm() < 1e-5


def test_official_parameter_counts_and_keys():
    for name, count in zip(VARIANTS, OFFICIAL_PARAMS):
        with torch.device("meta"):
            model = timm.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == count, name
    sd = model.state_dict()  # vim_base: the official layout, 6 + 24 x 17 + 1 keys
    assert len(sd) == 415
    assert sd["layers.23.mixer.x_proj_b.weight"].shape == (80, 1536)
    assert sd["pos_embed"].shape == (1, 197, 768)


# ------------------------------------------------------------------------------------------------------
# official checkpoints
# ------------------------------------------------------------------------------------------------------
def official_checkpoint(tmp_path, model, name="vim_t_midclstok_76p1acc.pth"):
    """A file like the released ones: vim/main.py's training snapshot, weights under 'model', with an
    argparse Namespace that timm's weights_only loader refuses."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 1 for k, v in sd.items()}  # must not be the one loaded: the official eval reads 'model'
    path = tmp_path / name
    torch.save({"model": sd, "model_ema": ema, "optimizer": {"state": {}}, "epoch": 299,
                "args": argparse.Namespace(model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_"
                                           "with_midclstok_div2", lr=5e-4)}, path)
    return path


def test_official_checkpoint_loads_through_timm(tmp_path):
    source = randomize(timm.create_model("vim_tiny_patch16_224", **SMALL)).eval()
    path = official_checkpoint(tmp_path, source)
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **SMALL).eval()
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(img), source(img))

    # another resolution: the position embedding is resampled at load, the class row kept in the middle
    big = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            img_size=288, **SMALL).eval()
    assert big.pos_embed.shape == (1, 18 * 18 + 1, 32)
    torch.testing.assert_close(big.pos_embed[:, 162], source.pos_embed[:, 98])
    img = torch.randn(1, 3, 288, 288)
    with torch.no_grad():  # and equals resampling on the fly in the 224 model
        torch.testing.assert_close(big(img), source(img))

    # another number of classes: everything but the classifier loads
    ten = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            num_classes=10, **SMALL)
    torch.testing.assert_close(ten.layers[2].mixer.A_b_log, source.layers[2].mixer.A_b_log)
    assert ten.head.weight.shape == (10, 32)


def test_stride8_checkpoint_and_timm_style_file(tmp_path):
    source = randomize(timm.create_model("vim_small_patch16_stride8_224", **SMALL)).eval()
    assert source.pos_embed.shape == (1, 27 * 27 + 1, 32)
    from safetensors.torch import save_file
    path = tmp_path / "vim_s_plus.safetensors"
    save_file(source.state_dict(), str(path))
    model = timm.create_model("vim_small_patch16_stride8_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **SMALL).eval()
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(img), source(img))


def test_checkpoint_with_wrong_keys_is_refused(tmp_path):
    source = timm.create_model("vim_tiny_patch16_224", **SMALL)
    sd = source.state_dict()
    sd.pop("layers.1.mixer.D_b")
    sd["layers.1.mixer.rope.freqs"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(RuntimeError, match=r"missing keys \['layers.1.mixer.D_b'\].*unexpected keys "
                                           r"\['layers.1.mixer.rope.freqs'\]"):
        timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          **SMALL)


def test_pretrained_cfgs_point_at_the_release():
    cfg = timm.models.get_pretrained_cfg("vim_small_patch16_stride8_224.in1k")
    assert cfg.url == "https://huggingface.co/hustvl/Vim-small-midclstok/resolve/main/vim_s_midclstok_ft_81p6acc.pth"
    assert cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic" and cfg.mean == (0.485, 0.456, 0.406)
    assert timm.list_models("vim_*", pretrained=True) == sorted(v + ".in1k" for v in VARIANTS)


# ------------------------------------------------------------------------------------------------------
# the timm API
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_every_variant(name):
    model = timm.create_model(name, depth=2, num_classes=5, drop_path_rate=0.1, img_size=96)
    img = torch.randn(2, 3, 96, 96, requires_grad=True)
    out = model(img)
    assert out.shape == (2, 5)
    out.square().sum().backward()
    assert img.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    grid = 11 if "stride8" in name else 6
    feats = model.forward_features(img)
    assert feats.shape == (2, grid * grid + 1, model.embed_dim)


@pytest.mark.parametrize("name,grid", [("vim_tiny_patch16_224", 14), ("vim_tiny_patch16_stride8_224", 27)])
def test_features_only(name, grid):
    model = timm.create_model(name, features_only=True, out_indices=(0, 2), depth=3, embed_dim=32)
    maps = model(torch.randn(2, 3, 224, 224))
    assert [m.shape for m in maps] == [(2, 32, grid, grid)] * 2
    assert model.feature_info.reduction() == [16 if grid == 14 else 8] * 2
    assert model.feature_info.channels() == [32, 32]


def test_forward_intermediates():
    model = randomize(timm.create_model("vim_tiny_patch16_224", **SMALL)).eval()
    img = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        final, inter = model.forward_intermediates(img, indices=[0, 2])
        torch.testing.assert_close(final, model.forward_features(img))
        assert [t.shape for t in inter] == [(2, 32, 6, 8)] * 2
        nlc = model.forward_intermediates(img, indices=1, output_fmt="NLC", norm=True, intermediates_only=True)
        assert nlc[0].shape == (2, 48, 32)
        # the last block's stream, normalised, is the final output without its class token
        torch.testing.assert_close(nlc[0], torch.cat([final[:, :24], final[:, 25:]], dim=1))
        with_cls = model.forward_intermediates(img, indices=1, return_prefix_tokens=True, intermediates_only=True,
                                               norm=True)
        torch.testing.assert_close(with_cls[0][1], final[:, 24:25])
        early = model.forward_intermediates(img, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[0])
    kept = model.prune_intermediate_layers([1])
    assert kept == [1] and len(model.layers) == 2 and model.num_classes == 0


@pytest.mark.parametrize("size", [(224, 224), (160, 96), (32, 320)])
def test_any_input_size(size):
    model = timm.create_model("vim_tiny_patch16_224", depth=2, embed_dim=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 1000)
        assert model.forward_features(torch.randn(1, 3, *size)).shape[1] == size[0] * size[1] // 256 + 1


def test_resample_pos_embed_keeps_the_middle_class_row():
    pos = torch.randn(1, 4 * 4 + 1, 8)
    same = resample_pos_embed(pos, (4, 4))
    assert same is pos
    out = resample_pos_embed(pos, (2, 6))
    assert out.shape == (1, 13, 8)
    torch.testing.assert_close(out[:, 6], pos[:, 8])  # the class row moves from index 8 to 12 // 2
    constant = torch.ones(1, 17, 8)  # a constant grid stays constant
    torch.testing.assert_close(resample_pos_embed(constant, (5, 3)), torch.ones(1, 16, 8))


def test_grad_checkpointing_gives_the_same_gradients():
    model = randomize(timm.create_model("vim_tiny_patch16_224", **SMALL))
    img = torch.randn(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        model(img).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    ckpt = grads()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], msg=n)


def test_reset_classifier_and_pooling():
    model = randomize(timm.create_model("vim_tiny_patch16_224", **SMALL)).eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(img)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 8])
        model.reset_classifier(3, "avg")
        assert model(img).shape == (2, 3)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True),
                                   torch.cat([feats[:, :8], feats[:, 9:]], 1).mean(1))
        model.reset_classifier(0)
        assert model(img).shape == (2, 32)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


def test_autocast_bf16_close_to_float32():
    model = randomize(timm.create_model("vim_tiny_patch16_224", **SMALL)).eval()
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(img)
    assert (low.float() - ref).norm() / ref.norm() < 0.05


def test_bad_input_is_named():
    model = timm.create_model("vim_tiny_patch16_224", depth=1, embed_dim=32)
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, height, width\), got \(2, 1, 64, 64\)"):
        model(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected images of shape"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"height 70 .* expected a multiple of 16"):
        model(torch.randn(1, 3, 70, 64))
    plus = timm.create_model("vim_tiny_patch16_stride8_224", depth=1, embed_dim=32)
    with pytest.raises(ValueError, match=r"width 44 .* expected 16 \+ a multiple of 8"):
        plus(torch.randn(1, 3, 48, 44))
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("vim_tiny_patch16_224", depth=1, global_pool="max")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the model on the Triton kernels")
def test_cuda_triton_matches_cpu_reference():
    model = randomize(timm.create_model("vim_tiny_patch16_224", embed_dim=64, depth=4))
    assert_cuda_matches_cpu(model, torch.randn(4, 3, 224, 224), bf16_tol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: Dynamo traces the Triton kernels")
def test_cuda_torch_compile_runs_the_fused_kernels(monkeypatch):
    """Compiled inference and training on CUDA run each direction as the fused `mamba_inner` ops (the composed
    path is never taken) and match eager, outputs and every parameter's gradient."""
    import vssm.kernels.inner as inner
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the patch embedding's conv, both sides

    def composed(*args, **kwargs):
        raise AssertionError("mamba_inner took its composed path under torch.compile on CUDA")
    model = randomize(timm.create_model("vim_tiny_patch16_224", depth=2, embed_dim=64)).cuda()
    img = torch.randn(2, 3, 64, 96, device="cuda")
    params = [p for p in model.parameters()]
    ref = model(img)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    monkeypatch.setattr(inner, "_composed", composed)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(img), ref, rtol=1e-4, atol=1e-4)
    out = compiled(img)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for (name, _), g, r in zip(model.named_parameters(), torch.autograd.grad(out.square().sum(), params), ref_grads):
        assert (g - r).norm() <= 1e-3 * r.norm(), name


def test_torch_compile_matches_eager():
    model = randomize(timm.create_model("vim_tiny_patch16_224", depth=2, embed_dim=32)).eval()
    img = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(img), model(img), rtol=1e-4, atol=1e-5)
