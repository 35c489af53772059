"""Checkpoint loading: round trips through real torch.save files, upstream's wrappers and prefixes, strict errors,
and the 6-view -> 5-view camera remap keeping the pretrained latent/padding columns and view contributions."""
from __future__ import annotations

import io

import pytest
import torch

from mvmodel.diffusion import DiffusionModel
from mvmodel.networks import (RELEASED_6VIEW_CAMERAS, WAYMO_5VIEW_CAMERAS, MultiviewDiT, load_cosmos_checkpoint,
                              meta_device, tiny, to_cosmos_state_dict)

from model_reference import randomize_


def _six_view(seed=0, **kw) -> MultiviewDiT:
    net = MultiviewDiT(tiny(n_views=6, view_condition_dim=6, add_repeat_frame_embedding=True,
                            camera_names=RELEASED_6VIEW_CAMERAS, attention_backend="sdpa", **kw))
    randomize_(net, seed)
    return net


def _five_view(Dv=3, **kw) -> MultiviewDiT:
    return MultiviewDiT(tiny(n_views=5, view_condition_dim=Dv, add_repeat_frame_embedding=False,
                             camera_names=WAYMO_5VIEW_CAMERAS, attention_backend="sdpa", **kw))


def _same(a: MultiviewDiT, b: MultiviewDiT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_round_trip_file_formats(tmp_path):
    src = _six_view()
    dm = DiffusionModel(src)
    path = tmp_path / "iter_000000200_reg_model.pt"
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in dm.state_dict().items()}, path)
    dst = DiffusionModel(_six_view(seed=9))
    rep = load_cosmos_checkpoint(dst, path)
    assert rep.ok and not rep.remapped and len(rep.loaded) == len(dm.state_dict())
    for k, v in dm.state_dict().items():  # bf16 file into an fp32 model
        torch.testing.assert_close(dst.state_dict()[k], v.to(torch.bfloat16).float())
    # {"model": ...} wrapper with net. prefix, TE _extra_state entries (as BytesIO), fp32
    sd = to_cosmos_state_dict(src, dm.logvar)
    sd["net.blocks.block0.blocks.0.block.attn.attn_op._extra_state"] = io.BytesIO(b"fp8")
    torch.save({"model": sd, "ema": {}}, tmp_path / "model.pt")
    net = _six_view(seed=5)
    rep = load_cosmos_checkpoint(net, tmp_path / "model.pt")
    assert _same(net, src) and any("_extra_state" in k for k in rep.skipped)
    assert {"logvar.0.freqs", "logvar.0.phases", "logvar.1.weight"} <= set(rep.skipped)
    # flat dict without the net. prefix
    net = _six_view(seed=6)
    load_cosmos_checkpoint(net, src.state_dict())
    assert _same(net, src)


def test_meta_device_load_assigns_in_model_dtype():
    src = _six_view()
    with meta_device():
        net = MultiviewDiT(src.config, dtype=torch.bfloat16)
    rep = load_cosmos_checkpoint(net, to_cosmos_state_dict(src))
    assert rep.ok
    assert all(not p.is_meta and p.dtype == torch.bfloat16 for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())
    torch.testing.assert_close(net.state_dict()["x_embedder.proj.1.weight"].float(),
                               src.state_dict()["x_embedder.proj.1.weight"].bfloat16().float())


def test_strict_and_non_strict_reports():
    src = _six_view()
    sd = to_cosmos_state_dict(src)
    del sd["net.blocks.block1.blocks.2.block.layer1.weight"]
    sd["net.extra_pos_embedder.pos_emb_h"] = torch.zeros(16, 64)
    sd["net.final_layer.linear.weight"] = torch.zeros(3, 64)
    net = _six_view(seed=2)
    before = net.state_dict()["blocks.block0.blocks.0.block.attn.to_q.0.weight"].clone()
    with pytest.raises(ValueError, match=r"(?s)missing.*layer1.*unexpected.*extra_pos_embedder.*final_layer.linear"):
        load_cosmos_checkpoint(net, sd)
    assert torch.equal(net.state_dict()["blocks.block0.blocks.0.block.attn.to_q.0.weight"], before)  # untouched
    rep = load_cosmos_checkpoint(net, sd, strict=False)
    assert rep.missing == ["blocks.block1.blocks.2.block.layer1.weight"]
    assert rep.unexpected == ["extra_pos_embedder.pos_emb_h"]
    assert rep.mismatched == [("final_layer.linear.weight", (64, 64), (3, 64))]
    assert torch.equal(net.state_dict()["blocks.block0.blocks.0.block.attn.to_q.0.weight"],
                       src.state_dict()["blocks.block0.blocks.0.block.attn.to_q.0.weight"])
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_cosmos_checkpoint(net, "/nonexistent/nope.pt")
    with pytest.raises(ValueError, match="MultiviewDiT"):
        load_cosmos_checkpoint(torch.nn.Linear(2, 2), sd)


def _view_contribution(net: MultiviewDiT, fr: torch.Tensor | None = None) -> torch.Tensor:
    """What the patch embedding adds per view from the view channels: [V, D, 4]."""
    cfg = net.config
    W = net.x_embedder.proj[1].weight.detach().double()
    n_fixed = cfg.in_channels + 1
    Wv = W[:, n_fixed * 4:].reshape(W.shape[0], cfg.view_condition_dim, 4)
    e = net.view_embeddings.weight.detach().double()
    if cfg.add_repeat_frame_embedding:
        e = e + net.repeat_frame_embedding.bias.detach().double()
    return torch.einsum("dck,vc->vdk", Wv, e)


@pytest.mark.parametrize("Dv", [3, 6, 8])
def test_camera_remap_six_to_five(Dv):
    src = _six_view()
    dst = _five_view(Dv)
    rep = load_cosmos_checkpoint(dst, to_cosmos_state_dict(src))
    assert rep.ok and set(rep.remapped) == {"x_embedder.proj.1.weight", "view_embeddings.weight"}
    assert {"repeat_frame_embedding.weight", "repeat_frame_embedding.bias"} <= set(rep.skipped)
    n_fixed = 17 * 4
    torch.testing.assert_close(dst.x_embedder.proj[1].weight[:, :n_fixed], src.x_embedder.proj[1].weight[:, :n_fixed])
    u_src, u_dst = _view_contribution(src), _view_contribution(dst)
    # WAYMO order: front_left, front, front_right, side_left, side_right -> release indices 1, 0, 2, 4, 5
    matched = u_src[[1, 0, 2, 4, 5]]
    err = ((u_dst - matched).norm() / matched.norm()).item()
    if Dv >= 5:  # enough view dims for 5 matched cameras: the pretrained per-view input is reproduced exactly
        assert err < 1e-5
    else:
        assert 0 < err < 1 and any("SVD" in n for n in rep.notes)
    # everything else is loaded unchanged
    assert torch.equal(dst.state_dict()["blocks.block1.blocks.1.block.attn.to_k.0.weight"],
                       src.state_dict()["blocks.block1.blocks.1.block.attn.to_k.0.weight"])


def test_camera_remap_equal_dims_copies_rows_by_name_and_meta():
    src = _six_view()
    with meta_device():
        dst = MultiviewDiT(tiny(n_views=4, view_condition_dim=6, add_repeat_frame_embedding=True, attention_backend="sdpa",
                                camera_names=("back", "front", "new_cam", "front_left")))
    rep = load_cosmos_checkpoint(dst, to_cosmos_state_dict(src))
    assert rep.ok
    E_src, E_dst = src.view_embeddings.weight, dst.view_embeddings.weight
    for t, s in ((0, 3), (1, 0), (3, 1)):
        assert torch.equal(E_dst[t], E_src[s])
    assert any("new_cam" in n for n in rep.notes)
    torch.testing.assert_close(dst.x_embedder.proj[1].weight, src.x_embedder.proj[1].weight)
    with pytest.raises(ValueError, match="camera names"):
        load_cosmos_checkpoint(MultiviewDiT(tiny(n_views=5, view_condition_dim=3, add_repeat_frame_embedding=False)),
                               to_cosmos_state_dict(src))


def test_bad_files_and_values(tmp_path):
    net = _six_view()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*garbage.pt"):
        load_cosmos_checkpoint(net, tmp_path / "garbage.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="dict of tensors, got list"):
        load_cosmos_checkpoint(net, tmp_path / "list.pt")
    sd = to_cosmos_state_dict(net)
    sd["net.affline_norm.weight"] = "oops"
    with pytest.raises(ValueError, match="affline_norm.weight.*holds str"):
        load_cosmos_checkpoint(net, sd)
