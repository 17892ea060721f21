"""DiffuSSM: the block against the paper's equations written out per position, the bidirectional SSM against
a version with explicit flips, DiT's conditioning (null class, learned sigma, classifier-free guidance),
gradients, checkpoints, sizes and errors.

`paper_block` below is Sec. 3.2 of Yan, Gu, Rush (arXiv:2311.18257) one token and one pixel at a time, with
the backward scan done the usual way (flip the sequence, scan forward, flip back); vssm's block (einsum
layouts, ``reverse=True`` scans) must compute the same thing from the same weights.
"""
import io
import math

import pytest
import torch
import torch.nn.functional as F
import timm

import vssm  # noqa: F401  (registers the models)
from scan_truth import loop_scan
from vssm.models.diffussm import BiSSM, DiffuSSM

D_XL, DEPTH_XL = 1152, 29
VARIANTS = {  # name: (in_chans, latent side, num_classes)
    "diffussm_xl_256": (4, 32, 1000),
    "diffussm_xl_512": (4, 64, 1000),
    "diffussm_tiny_8": (1, 8, 10),
}
SMALL = dict(hidden_size=16, depth=2)  # a reduced DiffuSSM for CPU tests


def randomize(model, seed=0):
    """Random weights everywhere (the adaLN-Zero init leaves gates and the output layer at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log") or name.endswith("A_b_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.5 - 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


def tiny(seed=0, **kwargs):
    args = dict(input_size=8, in_chans=2, num_classes=5, hidden_size=16, depth=2, downscale_ratio=2, d_state=4)
    return randomize(DiffuSSM(**dict(args, **kwargs)), seed).eval()


def inputs(model, batch=2, size=(8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_chans, *size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=g)
    return x, t, y


# ------------------------------------------------------------------------------------------------------
# the paper's block, written out
# ------------------------------------------------------------------------------------------------------
def bissm_with_flips(ssm, u):
    """Bidirectional SSM on u (batch, D, L): per-position float64 loop scans; the backward direction scans
    the flipped sequence forward and flips the result back. Returns (batch, 2D, L)."""
    def direction(u, x_proj, dt_proj, A_log, D):
        x_dbl = torch.einsum("od,bdl->bol", x_proj.weight.double(), u)
        dt, B, C = x_dbl.split([ssm.dt_rank, ssm.d_state, ssm.d_state], dim=1)
        delta = torch.einsum("dr,brl->bdl", dt_proj.weight.double(), dt)
        y, _ = loop_scan(u, delta, -torch.exp(A_log.double()), B, C, D.double(), None,
                         dt_proj.bias.double(), delta_softplus=True)
        return y

    u = u.double()
    y = direction(u, ssm.x_proj, ssm.dt_proj, ssm.A_log, ssm.D)
    y_b = direction(u.flip(-1), ssm.x_proj_b, ssm.dt_proj_b, ssm.A_b_log, ssm.D_b).flip(-1)
    return torch.cat([y, y_b], dim=1)


def paper_block(blk, x, c):
    """x + gate * W^3(act(W^2 I') * act(W^1 I)) with U_{Mj+k} = act(W^up_k act(W^0 I_j)), Y = BiSSM(U),
    I'_{j, kD_m:(k+1)D_m} = act(W^down_k Y_{Mj+k}), D_m = 2D/M; token by token in float64."""
    f = torch.float64
    act = lambda v: F.gelu(v, approximate="tanh")  # noqa: E731
    lin = lambda v, m: v @ m.weight.to(f).t() + m.bias.to(f)  # noqa: E731
    x, c = x.to(f), c.to(f)
    mod = lin(F.silu(c), blk.adaLN_modulation[-1])
    shift, scale, gate = mod.chunk(3, dim=1) if blk.adaln_gate else (*mod.chunk(2, dim=1), torch.ones_like(c))
    I = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    batch, J, D = I.shape
    M = blk.downscale_ratio
    Dm = 2 * D // M
    U = torch.zeros(batch, J * M, D, dtype=f)
    for j in range(J):
        a = act(lin(I[:, j], blk.proj_in))
        for k in range(M):
            U[:, M * j + k] = act(a @ blk.up_weight[k].to(f).t() + blk.up_bias[k].to(f))
    Y = bissm_with_flips(blk.ssm, U.transpose(1, 2)).transpose(1, 2)  # (batch, L, 2D)
    I2 = torch.zeros(batch, J, 2 * D, dtype=f)
    for j in range(J):
        for k in range(M):
            I2[:, j, k * Dm:(k + 1) * Dm] = act(Y[:, M * j + k] @ blk.down_weight[k].to(f).t() + blk.down_bias[k].to(f))
    O = lin(act(lin(I2, blk.fc_ssm)) * act(lin(I, blk.fc_skip)), blk.proj_out)
    return x + gate[:, None] * O


@pytest.mark.parametrize("M,adaln_gate", [(2, True), (4, False)])
def test_block_matches_paper_equations(M, adaln_gate):
    model = tiny(downscale_ratio=M, adaln_gate=adaln_gate, depth=1).double()
    blk = model.blocks[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)  # J = 5 tokens: L = 5 M positions
    c = torch.randn(2, 16, generator=g, dtype=torch.float64)
    # the scan's float64 reference (chunked closed form) and the loop agree to ~1e-8, layout errors are O(1)
    torch.testing.assert_close(blk(x, c), paper_block(blk, x, c), rtol=1e-6, atol=1e-7)


def test_bissm_reverse_scan_equals_flips():
    """reverse=True (no copies) against flip -> forward scan -> flip: outputs and every gradient; channels-last
    (batch, L, D) in, (batch, L, 2D) out."""
    torch.manual_seed(0)
    ssm = randomize(BiSSM(12, d_state=4), seed=4).double()
    u = torch.randn(2, 17, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 17, 24, dtype=torch.float64)
    out = ssm(u)
    assert out.shape == (2, 17, 24)
    ref = bissm_with_flips(ssm, u.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    grads = torch.autograd.grad((out * w).sum(), [u, *ssm.parameters()])
    grads_ref = torch.autograd.grad((ref * w).sum(), [u, *ssm.parameters()])
    for (name, _), a, b in zip([("u", None), *ssm.named_parameters()], grads, grads_ref):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # the backward half really runs right-to-left: the last position of y_b sees only the last input (to
    # rounding: the reference's closed form centres each chunk's log-decay on values of the whole chunk)
    v = u.detach().clone()
    v[:, 0] += 1.0
    torch.testing.assert_close(ssm(v)[:, -1, 12:], out[:, -1, 12:].detach(), rtol=0, atol=1e-12)
    assert not torch.equal(ssm(v)[:, -1, :12], out[:, -1, :12].detach())


def test_tokens_group_adjacent_pixels():
    """With no blocks, output pixel (r, c) depends on input pixels (r, c') of its token only: c // M == c' // M."""
    model = tiny(depth=0, downscale_ratio=2)
    x, t, y = inputs(model, batch=1)
    base = model(x, t, y)
    for r, col in [(0, 0), (3, 5), (7, 6)]:
        x2 = x.clone()
        x2[0, :, r, col] += 1.0
        changed = (model(x2, t, y) != base).any(dim=1)[0]
        expect = torch.zeros_like(changed)
        expect[r, col - col % 2: col - col % 2 + 2] = True
        assert torch.equal(changed, expect)


# ------------------------------------------------------------------------------------------------------
# registered models, sizes
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_registered_shapes(name):
    in_chans, side, num_classes = VARIANTS[name]
    model = randomize(timm.create_model(name, **SMALL), seed=2).eval()
    assert (model.in_chans, model.input_size, model.num_classes) == (in_chans, (side, side), num_classes)
    assert model.pretrained_cfg["input_size"] == (in_chans, side, side)
    x = torch.randn(1, in_chans, side, side)
    y = torch.tensor([num_classes - 1])
    with torch.no_grad():
        out = model(x, torch.tensor([500.0]), y)
    assert out.shape == (1, 2 * in_chans, side, side) and torch.isfinite(out).all()
    assert out.abs().sum() > 0


def xl_param_count(D=D_XL, depth=DEPTH_XL, M=2, C=4, classes=1000, N=16, gate=True):
    """Parameters from the paper's widths: per block W^0 (D x D), W^up (M of D x D), W^down (M of 2D x 2D/M),
    W^1 (D x 2D), W^2 (2D x 2D), W^3 (2D x D), adaLN (D x 3D or 2D), two selective SSMs of width D."""
    R = math.ceil(D / 16)
    ssm = 2 * (D * (R + 2 * N) + R * D + D + D * N + D)
    block = (D * D + D) + M * (D * D + D) + (2 * D * 2 * D + 2 * D) + (D * 2 * D + 2 * D) \
        + (2 * D * 2 * D + 2 * D) + (2 * D * D + D) + (D * (3 if gate else 2) * D + (3 if gate else 2) * D) + ssm
    embed = (M * C * D + D) + (256 * D + D + D * D + D) + (classes + 1) * D
    final = (D * 2 * D + 2 * D) + (D * M * 2 * C + M * 2 * C)
    return depth * block + embed + final


@pytest.mark.parametrize("name", ["diffussm_xl_256", "diffussm_xl_512"])
def test_xl_parameter_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
        ungated = timm.create_model(name, adaln_gate=False)
    assert len(model.blocks) == DEPTH_XL and model.hidden_size == D_XL and model.downscale_ratio == 2
    n = sum(p.numel() for p in model.parameters())
    assert n == xl_param_count() == 711_607_696
    # without adaLN-Zero's gate: the paper's "about 673M"
    assert sum(p.numel() for p in ungated.parameters()) == xl_param_count(gate=False) == 673_088_272


def test_tiny_config():
    model = timm.create_model("diffussm_tiny_8")
    assert (model.hidden_size, len(model.blocks), model.in_chans, model.num_classes) == (128, 6, 1, 10)
    assert model.y_embedder.embedding_table.num_embeddings == 11  # 10 digits + the null class


def test_position_embedding_marks_where_a_token_is():
    """DiT's fixed sin-cos embedding of the token grid: with no blocks, the same pixel pair gives different
    outputs at different places, exactly by the embedding's difference passed through the final layer."""
    model = randomize(tiny(depth=0), seed=3).eval()
    x = torch.zeros(1, model.in_chans, 8, 8)
    x[..., 0, 0:2] = x[..., 5, 4:6] = torch.tensor([0.5, -1.0])
    t, y = torch.tensor([100]), torch.tensor([3])
    out = model(x, t, y)
    assert not torch.allclose(out[..., 0, 0:2], out[..., 5, 4:6])
    from timm.layers import build_sincos2d_pos_embed
    pos = build_sincos2d_pos_embed([8, 4], model.hidden_size)  # token grid: 8 rows of 4 pixel pairs
    c = model.condition(t, y)
    tokens = model.x_embedder(x.permute(0, 2, 3, 1).reshape(1, 32, -1)) + pos
    expect = model.final_layer(tokens, c).reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    assert torch.allclose(out, expect, atol=1e-6)
    assert not any("pos" in name for name, _ in model.named_parameters())


def test_other_sizes_run():
    """The position embedding is built for the input's grid: any height, and any width that is a multiple
    of M."""
    model = tiny()
    for size in [(8, 8), (3, 10), (5, 2)]:
        x, t, y = inputs(model, size=size)
        assert model(x, t, y).shape == (2, 4, *size)


# ------------------------------------------------------------------------------------------------------
# conditioning: learned sigma, null class, classifier-free guidance
# ------------------------------------------------------------------------------------------------------
def test_learned_sigma_channels():
    model = tiny()
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (2, 4, 8, 8)  # noise (C channels) then variance values (C channels)
    eps, var = out.split(2, dim=1)
    assert not torch.allclose(eps, var)
    fixed = tiny(learn_sigma=False)
    assert fixed(x, t, y).shape == (2, 2, 8, 8)
    assert fixed.final_layer.linear.out_features == 2 * 2  # M pixels x C channels


def test_forward_with_cfg():
    """DiT's convention: a doubled batch [x; x] with labels [y; null] in, guided noise in both halves out."""
    model = tiny()
    x, t, y = inputs(model, batch=3)
    y = torch.tensor([0, 4, 2])
    null = torch.full_like(y, model.num_classes)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert not torch.allclose(cond, uncond, atol=1e-4)
    x2, t2, y2 = torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]), torch.cat([y, null])  # 2nd half unused
    for scale in (4.0, 1.5):
        out = model.forward_with_cfg(x2, t2, y2, scale)
        assert out.shape == (6,) + cond.shape[1:]
        guided = uncond[:, :2] + scale * (cond[:, :2] - uncond[:, :2])
        torch.testing.assert_close(out[:3, :2], guided, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[3:, :2], guided, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[:3, 2:], cond[:, 2:], rtol=1e-5, atol=1e-6)  # variance: not guided
        torch.testing.assert_close(out[3:, 2:], uncond[:, 2:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.forward_with_cfg(x2, t2, y2, 1.0)[:3], cond, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="doubled batch"):
        model.forward_with_cfg(x, t, y, 2.0)


def test_label_dropout_uses_null_class():
    model = tiny(class_dropout_prob=1.0)
    x, t, y = inputs(model)
    y = torch.tensor([1, 3])
    null_out = model(x, t, torch.full_like(y, model.num_classes))
    assert not torch.allclose(model(x, t, y), null_out)  # eval: no dropout
    model.train()
    torch.testing.assert_close(model(x, t, y), null_out)


def test_scalar_timestep_and_unconditional():
    model = tiny()
    x, t, y = inputs(model)
    torch.testing.assert_close(model(x, torch.tensor(321.0), y), model(x, torch.full((2,), 321.0), y))
    assert not torch.allclose(model(x, torch.tensor(321.0), y), model(x, torch.tensor(20.0), y))
    uncond = tiny(num_classes=0)
    assert uncond.y_embedder is None and uncond(x, t).shape == (2, 4, 8, 8)


def test_identity_at_init():
    """adaLN-Zero: each block is the identity and the output is zero before training (gate or W^3 zeroed)."""
    for gate in (True, False):
        model = DiffuSSM(input_size=8, in_chans=2, num_classes=5, hidden_size=16, depth=2, d_state=4,
                         adaln_gate=gate)
        h, c = torch.randn(2, 32, 16), torch.randn(2, 16)
        for blk in model.blocks:
            torch.testing.assert_close(blk(h, c), h)
        x, t, y = inputs(model)
        assert torch.equal(model(x, t, y), torch.zeros(2, 4, 8, 8))


# ------------------------------------------------------------------------------------------------------
# training: gradients, checkpointing, state dicts
# ------------------------------------------------------------------------------------------------------
def test_backward_reaches_every_parameter():
    model = tiny(class_dropout_prob=0.0).train()
    x, t, y = inputs(model)
    x.requires_grad_(True)
    loss = (model(x, t, y) * torch.randn(2, 4, 8, 8)).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.startswith("y_embedder"):  # only the rows of the labels used
            assert p.grad[y].abs().sum() > 0
        else:
            assert p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_grad_checkpointing_same_gradients():
    model = tiny(class_dropout_prob=0.0).train()
    x, t, y = inputs(model)
    w = torch.randn(2, 4, 8, 8)
    grads = torch.autograd.grad((model(x, t, y) * w).sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    grads_ckpt = torch.autograd.grad((model(x, t, y) * w).sum(), list(model.parameters()))
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(a, b)


def test_state_dict_round_trip():
    model = tiny(seed=0)
    x, t, y = inputs(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = tiny(seed=7)
    assert not torch.allclose(other(x, t, y), model(x, t, y))
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other(x, t, y), model(x, t, y))
    y2 = torch.cat([y, torch.full_like(y, model.num_classes)])
    assert torch.equal(other.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y2, 3.0),
                       model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), y2, 3.0))


# ------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------
def test_clear_errors():
    model = tiny()
    x, t, y = inputs(model)
    shape_msg = r"\(batch, 2, height, width\).*downscale ratio 2.*\(batch, 2, 8, 8\).*got \(2, 3, 8, 8\)"
    with pytest.raises(ValueError, match=shape_msg):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match=r"width a multiple of the downscale ratio 2.*got \(2, 2, 8, 7\)"):
        model(torch.randn(2, 2, 8, 7), t, y)
    with pytest.raises(ValueError, match=r"got \(2, 64\)"):
        model(torch.randn(2, 64), t, y)
    with pytest.raises(ValueError, match=r"t must be a scalar or of shape \(2,\).*got shape \(3,\)"):
        model(x, torch.rand(3), y)
    with pytest.raises(ValueError, match=r"t must be .*got shape \(2, 1\)"):
        model(x, torch.rand(2, 1), y)
    for bad in (torch.tensor([0, 6]), torch.tensor([-1, 2])):
        with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\] \(5 is the null class"):
            model(x, t, bad)
    with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \(2,\), got \(2,\) torch.float32"):
        model(x, t, y.float())
    with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \(2,\), got NoneType"):
        model(x, t)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\]"):
        model.forward_with_cfg(x, t, torch.tensor([9, 0]), 2.0)  # a doubled batch of 1 with a bad id
    uncond = tiny(num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, y)
    with pytest.raises(ValueError, match="class-conditional"):
        uncond.forward_with_cfg(x, t, y, 2.0)
    with pytest.raises(ValueError, match="multiple of the downscale ratio"):
        DiffuSSM(input_size=(8, 6), downscale_ratio=4, hidden_size=16, depth=1)
    # valid edge ids: 0 and the null class
    assert model(x, t, torch.tensor([0, 5])).shape == (2, 4, 8, 8)


def test_torch_compile_matches_eager():
    """Dynamo captures DiffuSSM (around the CPU reference scan; aot_eager keeps the test fast): forward and
    every parameter's gradient as in eager."""
    model = randomize(timm.create_model("diffussm_tiny_8", **SMALL), seed=2).eval()  # no label dropout
    x = torch.randn(2, model.in_chans, *model.input_size, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([500.0, 20.0]), torch.tensor([1, 3])
    out, ref = torch.compile(model, backend="aot_eager")(x, t, y), model(x, t, y)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    for g, r in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
