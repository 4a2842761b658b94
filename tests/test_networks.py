"""Networks of dbae.nn: shapes, conditioning, encoder bounds, gradient flow, batch
independence of the decoder and parameter counts (SPEC 1, 9, 11)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dbae.config import ModelConfig, get_preset
from dbae.errors import ConfigError
from dbae.nn import Decoder, Encoder, ScoreUNet, count_parameters
from dbae.nn.encoder import INITIAL_SIG, log_sig_bias
from dbae.nn.layers import AttentionBlock, timestep_embedding


def build(model: ModelConfig, stochastic: bool | None = None) -> tuple[ScoreUNet, Encoder, Decoder]:
    enc_cfg = model.encoder if stochastic is None else dataclasses.replace(model.encoder, stochastic=stochastic)
    args = (model.image_size, model.image_channels, model.z_dim)
    return ScoreUNet(model.unet, *args), Encoder(enc_cfg, *args), Decoder(model.decoder, *args)


def perturb_zero_init(module: torch.nn.Module, std: float = 0.05) -> None:
    """Give the zero-initialised weights (and their biases) small random values, so the
    output of a fresh network is not identically zero and every path carries gradient."""
    with torch.no_grad():
        for m in module.modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.nn.Parameter) and w.dim() > 1 and not w.any():
                w.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0.0, std)


def unet_inputs(model: ModelConfig, batch: int, gen: torch.Generator):
    shape = (batch, model.image_channels, model.image_size, model.image_size)
    x_in = torch.randn(shape, generator=gen)
    x_T = torch.randn(shape, generator=gen)
    c_noise = 250 * torch.log(torch.rand(batch, generator=gen).clamp_min(1e-4))
    z = torch.randn(batch, model.z_dim, generator=gen)
    return x_in, c_noise, x_T, z


@pytest.mark.parametrize("preset", ["tiny16", "shapes32"])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes(preset: str, batch: int) -> None:
    torch.manual_seed(0)
    model = get_preset(preset).model
    unet, enc_sto, dec = build(model, stochastic=True)
    enc_det = Encoder(dataclasses.replace(model.encoder, stochastic=False), model.image_size, 3, model.z_dim)
    gen = torch.Generator().manual_seed(1)
    x_in, c_noise, x_T, z = unet_inputs(model, batch, gen)
    image_shape = (batch, model.image_channels, model.image_size, model.image_size)
    with torch.no_grad():
        assert unet(x_in, c_noise, x_T, z).shape == image_shape
        mu, sig = enc_sto(x_in)
        assert mu.shape == sig.shape == (batch, model.z_dim)
        z_det, none = enc_det(x_in)
        assert z_det.shape == (batch, model.z_dim) and none is None
        assert dec(z).shape == image_shape
    assert enc_sto.stochastic and not enc_det.stochastic


def test_unet_is_zero_at_init_and_depends_on_every_input() -> None:
    torch.manual_seed(0)
    model = get_preset("tiny16").model
    unet = ScoreUNet(model.unet, model.image_size, model.image_channels, model.z_dim).eval()
    gen = torch.Generator().manual_seed(2)
    x_in, c_noise, x_T, z = unet_inputs(model, 3, gen)
    with torch.no_grad():
        assert not unet(x_in, c_noise, x_T, z).any()  # zero-initialised output conv
        perturb_zero_init(unet)
        base = unet(x_in, c_noise, x_T, z)
        assert base.abs().mean() > 1e-4
        for changed in (
            unet(x_in + 0.5 * torch.randn_like(x_in), c_noise, x_T, z),
            unet(x_in, c_noise + 50.0, x_T, z),
            unet(x_in, c_noise, x_T + 0.5 * torch.randn_like(x_T), z),
            unet(x_in, c_noise, x_T, z + 0.5 * torch.randn_like(z)),
        ):
            assert (changed - base).abs().max() > 1e-4
        # one sample's output does not depend on the rest of its batch
        assert torch.allclose(unet(x_in[1:2], c_noise[1:2], x_T[1:2], z[1:2]), base[1:2], atol=1e-5)


def test_stochastic_encoder_bounds() -> None:
    torch.manual_seed(0)
    model = get_preset("tiny16").model
    enc = Encoder(model.encoder, model.image_size, model.image_channels, model.z_dim)
    x = torch.randn(4, model.image_channels, model.image_size, model.image_size)
    with torch.no_grad():
        for scale in (1.0, 1e4):  # ordinary and saturated heads
            enc.head.weight.mul_(scale)
            mu, sig = enc(x)
            assert torch.isfinite(mu).all() and torch.isfinite(sig).all()
            assert (mu.abs() <= 5).all()
            assert (sig > 0.01).all() and (sig <= torch.exp(torch.tensor(5.0)) + 0.01).all()
        assert (mu.abs() > 4.99).any()  # the saturated head reaches the soft clamp


def test_stochastic_encoder_starts_with_small_sig_and_default_mu_head() -> None:
    """Issue 22: sig starts at INITIAL_SIG for every input and dimension (SPEC 1's formula
    applied to the head's initial l); the mu half of the head and the deterministic head keep
    their random initialisation."""
    model = get_preset("tiny16").model
    args = (model.image_size, model.image_channels, model.z_dim)
    torch.manual_seed(0)
    enc = Encoder(model.encoder, *args)
    enc_det = Encoder(dataclasses.replace(model.encoder, stochastic=False), *args)
    x = torch.randn(4, model.image_channels, model.image_size, model.image_size)
    with torch.no_grad():
        mu, sig = enc(x)
    assert torch.allclose(sig, torch.full_like(sig, INITIAL_SIG), rtol=1e-5)
    assert mu.std(0).mean() > 1e-3  # the mean still depends on the input
    d = model.z_dim
    assert enc.head.weight[:d].abs().sum() > 0 and enc_det.head.weight.abs().sum() > 0
    assert math.isclose(math.exp(5 * math.tanh(log_sig_bias(0.5) / 5)) + 0.01, 0.5, rel_tol=1e-12)


@pytest.mark.parametrize("stochastic", [True, False])
def test_gradients_reach_all_three_networks(stochastic: bool) -> None:
    torch.manual_seed(0)
    model = get_preset("tiny16").model
    nets = build(model, stochastic=stochastic)
    unet, enc, dec = nets
    for net in nets:
        perturb_zero_init(net)
    gen = torch.Generator().manual_seed(3)
    x0, c_noise, _, _ = unet_inputs(model, 2, gen)
    mu, sig = enc(x0)
    z = mu if sig is None else mu + sig * torch.randn_like(mu)
    x_T = dec(z)
    x_t = 0.5 * x_T + 0.5 * x0 + 0.1 * torch.randn_like(x0)  # a bridge-like sample
    unet(x_t, c_noise, x_T, z).square().mean().backward()
    for name, net in zip(("unet", "encoder", "decoder"), nets):
        for pname, p in net.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
        assert any(p.grad.abs().sum() > 0 for p in net.parameters()), name


def test_decoder_is_batch_independent_and_mode_independent() -> None:
    torch.manual_seed(0)
    for preset in ("tiny16", "shapes32"):
        model = get_preset(preset).model
        dec = Decoder(model.decoder, model.image_size, model.image_channels, model.z_dim)
        z = torch.randn(4, model.z_dim)
        with torch.no_grad():
            dec.eval()
            batch_out = dec(z)
            for i in range(4):
                assert torch.allclose(dec(z[i : i + 1]), batch_out[i : i + 1], atol=1e-5)
            dec.train()
            assert torch.allclose(dec(z), batch_out, atol=1e-5)


def test_decoder_skip_excitation_wiring() -> None:
    def pairs(preset: str) -> list[str]:
        model = get_preset(preset).model
        return sorted(Decoder(model.decoder, model.image_size, 3, model.z_dim).excitations.keys())

    with torch.device("meta"):
        assert pairs("ffhq128") == ["4", "5"]  # 4x4 -> 64x64, 8x8 -> 128x128
        assert pairs("celeba64") == ["4"]  # 4x4 -> 64x64
        assert pairs("shapes32") == ["3"]  # 4x4 -> 32x32
        assert pairs("tiny16") == ["2"]  # 4x4 -> 16x16
        model = get_preset("tiny16").model
        no_se = dataclasses.replace(model.decoder, skip_excitation=False)
        assert len(Decoder(no_se, 16, 3, 16).excitations) == 0
        assert len(Decoder(dataclasses.replace(model.decoder, channels=(32, 16)), 8, 3, 16).excitations) == 0


def test_bf16_autocast_forward() -> None:
    torch.manual_seed(0)
    model = get_preset("tiny16").model
    unet, enc, dec = build(model)
    for net in (unet, enc, dec):
        perturb_zero_init(net)
    x0, c_noise, _, _ = unet_inputs(model, 2, torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mu, _ = enc(x0)
        x_T = dec(mu)
        out = unet(x0, c_noise, x_T, mu)
    assert out.shape == x0.shape and torch.isfinite(out.float()).all()


def test_layers() -> None:
    c = torch.tensor([0.0, -1151.3, -2.5])
    emb = timestep_embedding(c, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert timestep_embedding(c, 7).shape == (3, 7)
    with pytest.raises(ConfigError):
        AttentionBlock(48, 32)
    attn = AttentionBlock(32, 16, 8)
    x = torch.randn(2, 32, 4, 4)
    assert torch.equal(attn(x), x)  # zero-initialised output projection


def _sizes(name: str) -> dict[str, int]:
    model = get_preset(name).model
    with torch.device("meta"):
        unet, enc, dec = build(model)
        enc_det = build(model, stochastic=False)[1]
    sizes = {k: count_parameters(m) for k, m in (("unet", unet), ("enc", enc), ("enc_det", enc_det), ("dec", dec))}
    sizes["total"] = sizes["unet"] + sizes["enc"] + sizes["dec"]
    return sizes


def test_parameter_counts_ffhq128() -> None:
    s = _sizes("ffhq128")
    assert s["total"] == pytest.approx(161e6, rel=0.10)
    assert s["unet"] == pytest.approx(105e6, rel=0.15)
    assert s["enc"] == pytest.approx(24.8e6, rel=0.15)
    assert s["enc_det"] == pytest.approx(24.8e6, rel=0.15)
    assert s["dec"] == pytest.approx(32.3e6, rel=0.15)
    # the stochastic head only doubles the output width of the last linear layer
    assert s["enc"] - s["enc_det"] == 512 * (512 + 1)


def test_parameter_counts_celeba64() -> None:
    assert _sizes("celeba64")["total"] == pytest.approx(120e6, rel=0.15)


def test_fused_emb_projections_compute_the_same_unet():
    """ScoreUNet.fuse_emb_projections stacks the ResBlocks' scale-shift Linears into one: the
    same outputs (float32, to GEMM blocking), one Linear instead of one per block, and the
    per-block weights are gone from the state dict (held once)."""
    import copy

    from dbae.nn.layers import ResBlock

    cfg = get_preset("tiny16").model
    torch.manual_seed(0)
    unet = ScoreUNet(cfg.unet, cfg.image_size, cfg.image_channels, cfg.z_dim).eval()
    torch.nn.init.normal_(unet.out[2].weight, std=0.05)  # non-zero last convs: the projections matter
    for block in unet.modules():
        if isinstance(block, ResBlock):
            torch.nn.init.normal_(block.out_conv.weight, std=0.05)
    fused = copy.deepcopy(unet)
    fused.fuse_emb_projections()
    fused.fuse_emb_projections()  # a second call changes nothing
    blocks = [m for m in fused.modules() if isinstance(m, ResBlock)]
    widths = [2 * b.out_conv.out_channels for b in blocks]
    assert fused.emb_proj_fused.out_features == sum(widths) and [b.emb_columns[1] - b.emb_columns[0] for b in blocks] == widths
    assert not any("emb_proj." in k for k in fused.state_dict()) and any("emb_proj." in k for k in unet.state_dict())
    g = torch.Generator().manual_seed(1)
    x, x_T = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
    z, c = torch.randn(3, cfg.z_dim, generator=g), torch.randn(3, generator=g)
    with torch.no_grad():
        want = unet(x, c, x_T, z)
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(fused(x, c, x_T, z), want, rtol=1e-5, atol=1e-5)
        # the wrong columns would change the output: swap two blocks' slices
        blocks[0].emb_columns, blocks[-1].emb_columns = blocks[-1].emb_columns, blocks[0].emb_columns
        if widths[0] == widths[-1]:
            assert (fused(x, c, x_T, z) - want).abs().max() > 1e-4


def test_attention_reaches_the_fused_sdpa_kernels():
    """q, k and v reach scaled_dot_product_attention with a unit-stride last dimension, which
    the fused kernels (flash, memory-efficient) require: restricted to the flash kernel (the
    CPU one here), the block runs and gives what the math path gives. With the transposed
    views it had before, every call fell back to the math path (on CUDA, bf16 computed in
    float32 with the L x L scores materialised)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    block = AttentionBlock(64, 16, num_groups=8).eval()
    torch.nn.init.normal_(block.proj.weight, std=0.1)  # the output projection starts at zero
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fused = block(x)
        with sdpa_kernel([SDPBackend.MATH]):
            math = block(x)
    assert (fused - x).abs().max() > 1e-3
    torch.testing.assert_close(fused, math, rtol=1e-5, atol=1e-5)
