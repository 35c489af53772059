"""Upstream's composed net configs (cosmos-multiview.md §4.1) build verbatim through ``from_cosmos_config``."""
import pytest
import torch

from mvmodel.networks import MultiviewDiT
from mvmodel.networks.config import from_upstream_kwargs

_COMMON = dict(max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16, patch_spatial=2,
               patch_temporal=1, concat_padding_mask=True, block_config="FA-CA-MLP", model_channels=4096,
               num_blocks=28, num_heads=32, mlp_ratio=4.0, block_x_format="THWBD", crossattn_emb_channels=1024,
               use_cross_attn_mask=False, pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop",
               affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=256, rope_h_extrapolation_ratio=1.0,
               rope_w_extrapolation_ratio=1.0, rope_t_extrapolation_ratio=2.0, extra_h_extrapolation_ratio=1.0,
               extra_w_extrapolation_ratio=1.0, extra_t_extrapolation_ratio=1.0, traj_condition_dim=0,
               concat_traj_embedding=False, concat_view_embedding=True)

# The released 6-view inference net (networks.general_dit_multiview.MultiviewGeneralDIT), every composed key.
RELEASED_INFERENCE = dict(_COMMON, _target_="cosmos_predict1.diffusion.networks.general_dit_multiview.MultiviewGeneralDIT",
                          extra_per_block_abs_pos_emb=True, extra_per_block_abs_pos_emb_type="sincos", n_views=6,
                          view_condition_dim=6, add_repeat_frame_embedding=True)

# The Waymo training net (training.networks.general_dit_multiview.MultiviewGeneralDIT): LazyCall fills in every
# default of the training GeneralDIT signature, hence the window / fps / timestamp keys.
WAYMO_TRAINING = dict(_COMMON, _target_="cosmos_predict1.diffusion.training.networks.general_dit_multiview.MultiviewGeneralDIT",
                      extra_per_block_abs_pos_emb=False, extra_per_block_abs_pos_emb_type="sincos", n_views=5,
                      view_condition_dim=3, add_repeat_frame_embedding=False, window_block_indexes=[], window_sizes=[],
                      spatial_attn_win_size=1, temporal_attn_win_size=1, use_memory_save=False, use_checkpoint=False,
                      min_fps=1, max_fps=30, additional_timestamp_channels=None, layer_mask=None,
                      legacy_patch_emb=False)


@pytest.mark.parametrize("cfg,patch_in,n_tensors", [(RELEASED_INFERENCE, 92, 571), (WAYMO_TRAINING, 80, 569)])
def test_composed_upstream_nets_build(cfg, patch_in, n_tensors):
    net = MultiviewDiT.from_cosmos_config(cfg, device="meta", attention_backend="sdpa")
    sd = net.state_dict()
    assert sd["x_embedder.proj.1.weight"].shape == (4096, patch_in)
    assert len(sd) == n_tensors
    assert net.config.extra_per_block_abs_pos_emb is cfg["extra_per_block_abs_pos_emb"]
    assert net.config.n_views == cfg["n_views"]


def test_small_waymo_training_config_runs():
    """The training keys are inert: a small net from them runs a forward."""
    cfg = dict(WAYMO_TRAINING, model_channels=64, num_heads=2, num_blocks=1, adaln_lora_dim=16, crossattn_emb_channels=32,
               max_img_h=32, max_img_w=32, max_frames=16)
    net = MultiviewDiT.from_cosmos_config(cfg, attention_backend="sdpa")
    x = torch.randn(1, 16, 5 * 2, 4, 4)
    out = net(x, torch.zeros(1), torch.randn(1, 5 * 8, 32), fps=torch.tensor([10.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("key,value", [("additional_timestamp_channels", {"fps": 256}), ("window_block_indexes", [0, 3]),
                                       ("window_sizes", [4, 8, 8]), ("legacy_patch_emb", True),
                                       ("use_cross_attn_mask", True), ("pos_emb_cls", "sincos")])
def test_unsupported_values_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=f"{key}=.*not supported"):
        from_upstream_kwargs(dict(WAYMO_TRAINING, **{key: value}))
