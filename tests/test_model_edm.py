"""EDM scalars, loss and uncertainty head against the §7 formulas (float64), CFG dropout and conditioning from a
batch, the Karras schedule, guidance on D vs on F, and a short Euler sampling run."""
from __future__ import annotations

import math

import pytest
import torch

from mvmodel.diffusion import (Condition, Denoiser, DiffusionModel, EDMScaling, UncertaintyHead, condition_from_batch,
                               condition_uncondition, drop_text, edm_loss, initial_noise, karras_sigmas, sample_euler,
                               sample_sigma, video_to_model_range)
from mvmodel.networks import MultiviewDiT, tiny

from model_reference import randomize_


def test_scaling_matches_formulas():
    sd = 0.5
    for s in (0.0002, 0.3, 1.0, 80.0):
        sig = torch.tensor([s], dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = EDMScaling(sd)(sig)
        assert c_skip.item() == pytest.approx(sd**2 / (s**2 + sd**2), rel=1e-12)
        assert c_out.item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_in.item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_noise.item() == pytest.approx(0.25 * math.log(s), rel=1e-12)
        assert EDMScaling(sd).loss_weight(sig).item() == pytest.approx((s**2 + sd**2) / (s * sd) ** 2, rel=1e-12)


def test_sigma_distribution():
    s = sample_sigma(20000, generator=torch.Generator().manual_seed(0))
    ln = s.double().log()
    assert abs(ln.mean().item()) < 0.03 and abs(ln.std().item() - 1) < 0.03
    assert (s > 0).all()


def test_uncertainty_head_keys_and_formula():
    head = UncertaintyHead(128, generator=torch.Generator().manual_seed(0)).double()
    assert set(head.state_dict()) == {"0.freqs", "0.phases", "1.weight"}
    c = torch.tensor([-1.3, 0.2], dtype=torch.float64)
    ref = (math.sqrt(2) * torch.cos(c[:, None] * head[0].freqs + head[0].phases)) @ head[1].weight.T
    torch.testing.assert_close(head(c), ref, rtol=1e-5, atol=1e-6)  # fp32 inside, as upstream


def test_loss_matches_kendall_formula():
    g = torch.Generator().manual_seed(0)
    x0, d = torch.randn(2, 4, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    sigma, u = torch.tensor([0.1, 3.0], dtype=torch.float64), torch.tensor([[0.5], [-0.2]], dtype=torch.float64)
    out = edm_loss(x0, d, sigma, u, EDMScaling(0.5))
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    per = lam[:, None, None] * (x0 - d) ** 2 * torch.exp(-u)[:, :, None] + u[:, :, None]
    assert out["loss"].item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert out["edm"].item() == pytest.approx((lam[:, None, None] * (x0 - d) ** 2).mean().item(), rel=1e-6)


def _net() -> MultiviewDiT:
    net = MultiviewDiT(tiny(attention_backend="sdpa"))
    randomize_(net, seed=2)
    return net


def _batch(B=2, V=3, M=7):
    g = torch.Generator().manual_seed(3)
    return {"t5_text_embeddings": torch.randn(B, V * M, 32, generator=g), "fps": torch.tensor([10.0] * B),
            "padding_mask": torch.zeros(B, 1, 64, 96), "frame_repeat": torch.tensor([[0.0, 0.0, 10.0]] * B),
            "video": torch.randint(0, 256, (B, 3, V * 9, 64, 96), dtype=torch.uint8, generator=g)}


def test_conditioning_and_text_dropout():
    b = _batch()
    c = condition_from_batch(b, n_views=3)
    torch.testing.assert_close(c.frame_repeat, torch.tensor([[0.0, 0.0, 1.0]] * 2))  # divided by 10
    assert c.fps.tolist() == [10.0, 10.0] and c.padding_mask.shape == (2, 1, 64, 96)
    cond, uncond = condition_uncondition(b, n_views=3)
    assert torch.equal(cond.crossattn_emb, b["t5_text_embeddings"]) and not uncond.crossattn_emb.any()
    assert torch.equal(uncond.frame_repeat, cond.frame_repeat) and torch.equal(uncond.fps, cond.fps)
    text = torch.ones(4000, 6, 2)
    dropped = drop_text(text, 0.2, torch.Generator().manual_seed(0))
    per_sample = dropped.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1).all(1)).all()  # whole sample (all views) together
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.2) < 0.03
    with pytest.raises(ValueError, match="t5_text_embeddings"):
        condition_from_batch({"fps": 1}, n_views=3)
    with pytest.raises(ValueError, match="V=4"):
        condition_from_batch(b, n_views=4)
    v = video_to_model_range(b["video"])
    assert v.min() >= -1 and v.max() <= 1


def test_training_loss_and_denoise_consistency():
    net = _net()
    dm = DiffusionModel(net)
    cond = condition_from_batch(_batch(), n_views=3)
    g = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(2, 16, 6, 8, 12, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.7, 4.0])
    out = dm.training_loss(x0, cond, sigma=sigma, epsilon=eps)
    pred = dm.denoise(x0 + sigma[:, None, None, None, None] * eps, sigma, cond)
    ref = edm_loss(x0, pred.x0, sigma, pred.logvar, EDMScaling(0.5))
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)
    torch.testing.assert_close(pred.eps, (x0 + sigma[:, None, None, None, None] * eps - pred.x0) / sigma[:, None, None, None, None])
    out["loss"].backward()
    assert dm.logvar[1].weight.grad is not None and net.x_embedder.proj[1].weight.grad is not None
    assert set(k.split(".")[0] for k in dm.state_dict()) == {"net", "logvar"}


def test_karras_schedule():
    s = karras_sigmas(35)
    assert s.shape == (36,) and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0, rel=1e-12) and s[-2].item() == pytest.approx(0.0002, rel=1e-9)
    k = 17
    ref = (80 ** (1 / 7) + k / 34 * (0.0002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[k].item() == pytest.approx(ref, rel=1e-12)
    assert initial_noise((4000,), generator=torch.Generator().manual_seed(0)).std().item() == pytest.approx(
        math.sqrt(80**2 + 1), rel=0.05)


def test_guidance_on_denoised_equals_guidance_on_net_output():
    net = _net().double()
    den = Denoiser(net)
    cond, uncond = condition_uncondition(_batch(B=1), n_views=3, dtype=torch.float64)
    x = torch.randn(1, 16, 6, 8, 12, dtype=torch.float64)
    s, g = 2.5, 7.0
    c_skip, c_out, c_in, c_noise = EDMScaling(0.5)(torch.tensor([s], dtype=torch.float64))
    f_c = net(x * c_in, c_noise, **cond.to_kwargs())
    f_u = net(x * c_in, c_noise, **uncond.to_kwargs())
    ref = c_skip * x + c_out * (f_c + g * (f_c - f_u))
    torch.testing.assert_close(den.guided(x, s, cond, uncond, g).double(), ref, rtol=1e-5, atol=1e-5)


def test_sampler_runs_and_is_deterministic():
    net = _net()
    den = Denoiser(net)
    cond, uncond = condition_uncondition(_batch(B=1), n_views=3)
    noise = initial_noise((1, 16, 6, 8, 12), generator=torch.Generator().manual_seed(1))
    steps = []
    a = sample_euler(den, noise, cond, uncond, num_steps=4, callback=lambda i, x: steps.append(i))
    b = sample_euler(den, noise, cond, uncond, num_steps=4)
    assert steps == [0, 1, 2, 3] and torch.equal(a, b) and torch.isfinite(a).all()
    assert a.abs().max() < noise.abs().max()  # moved from sigma 80 noise to data scale
    single = sample_euler(den, noise, cond, None, num_steps=2)
    assert single.shape == noise.shape
    assert isinstance(cond, Condition)
