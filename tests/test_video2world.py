"""Video2World multi-view: the net option (condition-mask channel, upstream's state dict), a Text2World checkpoint
initialising it, and the conditioning math against upstream's formulas written out here
(cosmos_predict1 ``DiffusionMultiviewV2WModel.generate_samples_from_batch`` / ``_augment_noise_with_latent`` for
sampling, ``ExtendDiffusionModel.denoise`` for training)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mvmodel.diffusion import Condition, DiffusionModel, EDMScaling
from mvmodel.diffusion.video2world import (DEFAULT_AUGMENT_SIGMA, arch_invariant_noise, condition_indicator,
                                           inference_condition, latent_frames_of_input, training_condition)
from mvmodel.inference.pipeline import euler_step_cfg
from mvmodel.networks import MultiviewDiT, load_cosmos_checkpoint, preset, to_cosmos_state_dict
from tests.test_upstream_configs import RELEASED_INFERENCE

V, T, H, W = 3, 4, 4, 6  # tiny preset: 3 views


def _tiny(v2w: bool, seed: int = 0, **kw) -> MultiviewDiT:
    torch.manual_seed(seed)
    net = MultiviewDiT(preset("tiny", video2world=v2w, attention_backend="sdpa", **kw))
    with torch.no_grad():  # a non-trivial output (the fresh init zeroes the last AdaLN projections)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def _cond(B=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Condition(torch.randn(B, V * 8, 32, generator=g), torch.full((B,), 10.0), None,
                     torch.zeros(B, V))


# ---------------------------------------------------------------------------------------------- the net
def test_upstream_video2world_config_builds_96_channel_net_with_text2world_keys():
    v2w = dict(RELEASED_INFERENCE, _target_="cosmos_predict1.diffusion.networks."
               "general_dit_video_conditioned_multiview.MultiviewVideoExtendGeneralDIT")
    net = MultiviewDiT.from_cosmos_config(v2w, device="meta", attention_backend="sdpa")
    t2w = MultiviewDiT.from_cosmos_config(RELEASED_INFERENCE, device="meta", attention_backend="sdpa")
    sd, sd_t = net.state_dict(), t2w.state_dict()
    assert net.config.video2world and sd["x_embedder.proj.1.weight"].shape == (4096, 96)
    assert len(sd) == 571 and list(sd) == list(sd_t)  # upstream: the T2W keys, only x_embedder's shape changes
    assert [k for k in sd if sd[k].shape != sd_t[k].shape] == ["x_embedder.proj.1.weight"]
    assert net.num_parameters() - t2w.num_parameters() == 4096 * 4
    assert preset("cosmos_7b_video2world_multiview_6view").patch_in_channels == 24


def test_mask_channel_changes_the_output_and_is_refused_by_text2world_nets():
    net = _tiny(True)
    x, t, c = torch.randn(1, 16, V * T, H, W), torch.zeros(1), _cond()
    mask = torch.zeros(1, 1, V * T, H, W)
    mask[:, :, ::T] = 1
    a = net(x, t, **c.to_kwargs())
    b = net(x, t, **c.to_kwargs(), condition_video_input_mask=mask)
    assert a.shape == x.shape and not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"condition_video_input_mask must be \[1, 1, 12, 4, 6\]"):
        net(x, t, **c.to_kwargs(), condition_video_input_mask=mask[:, :, :5])
    with pytest.raises(ValueError, match="Text2World net"):
        _tiny(False)(x, t, **c.to_kwargs(), condition_video_input_mask=mask)


def test_text2world_checkpoint_initialises_video2world_net_with_zero_mask_channel():
    t2w = _tiny(False)
    v2w = MultiviewDiT(preset("tiny", video2world=True, attention_backend="sdpa"))
    report = load_cosmos_checkpoint(v2w, to_cosmos_state_dict(t2w), strict=True)
    assert "condition-mask input channel" in str(report) and "columns 64..67" in str(report)
    W2, W1 = v2w.x_embedder.proj[1].weight, t2w.x_embedder.proj[1].weight
    assert (W2[:, 64:68] == 0).all() and torch.equal(W2[:, :64], W1[:, :64]) and torch.equal(W2[:, 68:], W1[:, 64:])
    x, t, c = torch.randn(1, 16, V * T, H, W), torch.zeros(1), _cond()
    mask = torch.ones(1, 1, V * T, H, W)
    with torch.no_grad():  # the loaded net computes what the Text2World net did, whatever the mask says
        torch.testing.assert_close(v2w(x, t, **c.to_kwargs(), condition_video_input_mask=mask),
                                   t2w(x, t, **c.to_kwargs()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="x_embedder"):  # the other way round is a shape mismatch
        load_cosmos_checkpoint(_tiny(False), to_cosmos_state_dict(v2w), strict=True)


def test_text2world_6view_checkpoint_into_5view_video2world_net_remaps_cameras():
    six = _tiny(False, n_views=6, view_condition_dim=6, camera_names=("front", "front_left", "front_right", "back",
                                                                      "back_left", "back_right"))
    five = MultiviewDiT(preset("tiny", n_views=5, view_condition_dim=3, add_repeat_frame_embedding=False,
                               video2world=True, camera_names=("pinhole_front_left", "pinhole_front",
                                                               "pinhole_front_right", "pinhole_side_left",
                                                               "pinhole_side_right")))
    report = load_cosmos_checkpoint(five, to_cosmos_state_dict(six), strict=False)
    assert not report.mismatched and "zero-initialised" in str(report) and "SVD" in str(report)
    assert (five.x_embedder.proj[1].weight[:, 64:68] == 0).all()


# ---------------------------------------------------------------------------------------------- the math
def _c(sigma):  # EDM preconditioning with sigma_data 0.5, written out
    s = torch.as_tensor(sigma, dtype=torch.float32)
    return 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()


def test_indicator_and_input_frames():
    ind = condition_indicator(V, T, 2)
    assert ind.shape == (1, 1, V * T, 1, 1)
    assert ind.flatten().tolist() == [1, 1, 0, 0] * V  # the first frames of EACH view
    assert [latent_frames_of_input(n) for n in (1, 9)] == [1, 2]  # upstream's compute_num_latent_frames
    per = condition_indicator(V, T, torch.tensor([0, 1, 2]), batch=3).reshape(3, V, T)
    assert (per.sum(2) == torch.tensor([[0.0], [1.0], [2.0]])).all()  # per sample, the same count in every view


def test_arch_invariant_noise_is_numpy_randomstate():
    n = arch_invariant_noise((2, 3, 4), seed=7)
    assert n.dtype == torch.float32
    assert np.array_equal(n.numpy(), np.random.RandomState(7).standard_normal((2, 3, 4)).astype(np.float32))


class _Recorder(torch.nn.Module):
    """Wraps the net, keeping every forward's inputs (x, timesteps, kwargs)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []
        self.x_embedder = net.x_embedder

    def forward(self, x, t, **kw):
        self.calls.append((x.clone(), t.clone(), {k: v for k, v in kw.items()}))
        return self.net(x, t, **kw)


@pytest.mark.parametrize("sigma,sigma_next", [(2.5, 1.7), (0.02, 0.005)])
def test_sampling_step_matches_upstream_formulas(sigma, sigma_next):
    net = _tiny(True)
    g = torch.Generator().manual_seed(3)
    gt = torch.randn(1, 16, V * T, H, W, generator=g) * 0.5
    xt = torch.randn(1, 16, V * T, H, W, generator=g) * sigma
    video = inference_condition(gt, V, num_condition_t=2, seed=5)
    cond = _cond()
    mask = video.input_mask()
    cond = Condition(cond.crossattn_emb, cond.fps, cond.padding_mask, cond.frame_repeat, mask)
    rec = _Recorder(net)
    guidance = 3.0
    out = euler_step_cfg(rec, xt, sigma, sigma_next, cond, cond.uncondition(), guidance)  # batched cond/uncond
    out = euler_step_cfg(rec, xt, sigma, sigma_next, cond, cond.uncondition(), guidance, video=video)

    # upstream, written out: augment with the fixed noise, mix with the c_in ratio, guidance on F, replace F.
    ind = condition_indicator(V, T, 2)
    aug = gt + torch.from_numpy(np.random.RandomState(5).standard_normal(gt.shape).astype(np.float32)) * 0.001
    c_skip, c_out, c_in = _c(sigma)
    _, _, c_in_aug = _c(DEFAULT_AUGMENT_SIGMA)
    new_xt = ind * (aug * c_in_aug / c_in) + (1 - ind) * xt
    x_in, _, kw = rec.calls[-1]
    torch.testing.assert_close(x_in[0], new_xt[0] * c_in, rtol=1e-6, atol=1e-6)
    # the uncond half of the batch keeps the condition frames and their mask; only the text differs
    assert torch.equal(x_in[0], x_in[1]) and torch.equal(kw["condition_video_input_mask"][0], mask[0])
    assert torch.equal(kw["condition_video_input_mask"][1], mask[0]) and (kw["crossattn_emb"][1] == 0).all()
    with torch.no_grad():
        f_c = net(new_xt * c_in, torch.log(torch.tensor([sigma])) / 4, **cond.to_kwargs())
        f_u = net(new_xt * c_in, torch.log(torch.tensor([sigma])) / 4, **cond.uncondition().to_kwargs())
    f = f_c + guidance * (f_c - f_u)
    f = ind * (gt - c_skip * new_xt) / c_out + (1 - ind) * f  # _reverse_precondition_output(latent, new_xt, sigma)
    x0 = c_skip * new_xt + c_out * f
    torch.testing.assert_close(ind * x0, ind * gt, rtol=1e-5, atol=1e-5)  # x0 equals the condition latent there
    expect = new_xt + (new_xt - x0) / sigma * (sigma_next - sigma)  # scheduler.step(F, t, new_xt)
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)


def test_indicator_switches_off_once_sigma_reaches_sigma_aug():
    net = _tiny(True)
    gt = torch.randn(1, 16, V * T, H, W)
    video = inference_condition(gt, V, num_condition_t=1, seed=1)
    assert video.active_indicator(torch.tensor([0.0011])).sum() == V
    for s in (0.001, 0.0002):  # upstream: `if augment_sigma >= sigma: indicator = 0`
        assert video.active_indicator(torch.tensor([s])).sum() == 0
    cond = _cond()
    cond = Condition(cond.crossattn_emb, cond.fps, None, cond.frame_repeat, video.input_mask())
    xt = torch.randn(1, 16, V * T, H, W) * 0.0002
    with_video = euler_step_cfg(net, xt, 0.0002, 0.0, cond, cond.uncondition(), 2.0, video=video)
    plain = euler_step_cfg(net, xt, 0.0002, 0.0, cond, cond.uncondition(), 2.0)
    torch.testing.assert_close(with_video, plain, rtol=0, atol=0)  # the last step denoises every frame
    assert (video.input_mask().sum() > 0)  # the net's mask channel stays on (upstream zeroes the indicator only)


def test_training_loss_matches_upstream_extend_model():
    net = _tiny(True)
    model = DiffusionModel(net)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, V * T, H, W, generator=g) * 0.5
    sigma, eps = torch.tensor([0.7, 3.0]), torch.randn(x0.shape, generator=g)
    video = training_condition(x0, V, num_condition_t=torch.tensor([2, 1]), dropout=0.0,
                               generator=torch.Generator().manual_seed(1))
    video.keep = torch.tensor([True, False])  # sample 1: dropped condition (the uncond training case)
    cond = _cond(B=2)
    rec = _Recorder(net)
    model.net = rec
    out = model.training_loss(x0, cond, sigma=sigma, epsilon=eps, video=video)

    ind = video.indicator
    x_sigma = x0 + sigma.reshape(-1, 1, 1, 1, 1) * eps
    c_skip, c_out, c_in = (v.reshape(-1, 1, 1, 1, 1) for v in _c(sigma))
    s_aug = video.augment_sigma.reshape(-1, 1, 1, 1, 1)
    _, _, c_in_aug = _c(s_aug)
    aug = (x0 + s_aug * video.noise) * c_in_aug / c_in
    aug[1] = 0  # zero_condition_region_condition_mask
    new_xt = ind * aug + (1 - ind) * x_sigma
    x_in, _, kw = rec.calls[-1]
    torch.testing.assert_close(x_in, new_xt * c_in, rtol=1e-5, atol=1e-6)
    m = kw["condition_video_input_mask"]
    assert (m[0] == ind[0].expand(1, V * T, H, W)).all() and (m[1] == 0).all()
    with torch.no_grad():
        f = net(new_xt * c_in, torch.log(sigma) / 4, **cond.to_kwargs(), condition_video_input_mask=m)
    x0_pred = ind * x0 + (1 - ind) * (c_skip * new_xt + c_out * f)  # replaced: no loss in the region
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    u = model.logvar(torch.log(sigma) / 4).reshape(-1, 1, 1, 1, 1)
    loss = (lam.reshape(-1, 1, 1, 1, 1) * (x0 - x0_pred) ** 2 * torch.exp(-u) + u).mean()
    torch.testing.assert_close(out["loss"], loss, rtol=1e-5, atol=1e-6)


def test_training_condition_draws():
    x0 = torch.zeros(4000, 16, V * T, 1, 1)
    vc = training_condition(x0, V, max_condition_t=2, dropout=0.2, generator=torch.Generator().manual_seed(0))
    n = vc.indicator.reshape(4000, V, T).sum(2)
    assert (n == n[:, :1]).all() and set(n[:, 0].tolist()) == {0.0, 1.0, 2.0}  # 0-2, same in every view
    ls = vc.augment_sigma.log()
    assert abs(float(ls.mean()) + 3) < 0.15 and abs(float(ls.std()) - 2) < 0.1  # ln sigma_aug ~ N(-3, 2)
    assert abs(float((~vc.keep).float().mean()) - 0.2) < 0.03
    with pytest.raises(ValueError, match="max_condition_t=5"):
        training_condition(x0[:1], V, max_condition_t=5)
