"""rope3d_angles against upstream's construction (cosmos-multiview.md §5): buffers cast to bf16 by the model's
.to(bfloat16), then the table built from them. The re-statement below follows upstream's module structure (float
buffers, a dtype cast of the whole module, then generate_embeddings), independently of mvkernels' code."""
import math

import pytest
import torch

import mvkernels


class UpstreamLikeRope(torch.nn.Module):
    def __init__(self, head_dim, len_h, len_w, len_t, h_ratio=1.0, w_ratio=1.0, t_ratio=1.0):
        super().__init__()
        self.register_buffer("seq", torch.arange(max(len_h, len_w, len_t), dtype=torch.float))
        dim_h = head_dim // 6 * 2
        dim_t = head_dim - 2 * dim_h
        self.register_buffer("spatial", torch.arange(0, dim_h, 2)[: dim_h // 2].float() / dim_h, persistent=False)
        self.register_buffer("temporal", torch.arange(0, dim_t, 2)[: dim_t // 2].float() / dim_t, persistent=False)
        self.ntk = (h_ratio ** (dim_h / (dim_h - 2)), w_ratio ** (dim_h / (dim_h - 2)), t_ratio ** (dim_t / (dim_t - 2)))

    def forward(self, n_views, T, H, W, fps):
        hf = 1.0 / ((10000.0 * self.ntk[0]) ** self.spatial)
        wf = 1.0 / ((10000.0 * self.ntk[1]) ** self.spatial)
        tf = 1.0 / ((10000.0 * self.ntk[2]) ** self.temporal)
        fps = torch.tensor([fps], dtype=self.seq.dtype)
        et = torch.outer(self.seq[:T] / fps[:1] * 24.0, tf)
        eh, ew = torch.outer(self.seq[:H], hf), torch.outer(self.seq[:W], wf)
        parts = [et[:, None, None].expand(T, H, W, -1), eh[None, :, None].expand(T, H, W, -1),
                 ew[None, None].expand(T, H, W, -1)]
        one = torch.cat(parts * 2, dim=-1).reshape(T * H * W, -1).float()
        return torch.cat([one] * n_views, 0)


@pytest.mark.parametrize("n_views, T, H, W, head_dim, fps", [
    (5, 8, 30, 53, 128, 10.0),   # Waymo post-training grid (63,600 tokens)
    (6, 8, 30, 53, 128, 24.0),   # released 6-view inference
    (2, 3, 5, 7, 32, 30.0),      # tiny config, odd grid
])
@pytest.mark.parametrize("quirk", [True, False])
def test_matches_upstream_construction(n_views, T, H, W, head_dim, fps, quirk):
    up = UpstreamLikeRope(head_dim, 120, 120, 128, t_ratio=2.0)
    if quirk:
        up = up.to(torch.bfloat16)
    expected = up(n_views, T, H, W, fps)
    got = mvkernels.rope3d_angles(n_views, T, H, W, head_dim, fps, t_extrapolation_ratio=2.0, bf16_quirk=quirk)
    assert got.dtype == torch.float32 and got.shape == (n_views * T * H * W, head_dim)
    assert torch.equal(got, expected)


def test_layout_order_and_values_fp32():
    T, H, W, D = 3, 4, 5, 128
    a = mvkernels.rope3d_angles(2, T, H, W, D, fps=10.0, t_extrapolation_ratio=2.0, bf16_quirk=False)
    assert torch.equal(a[:, :64], a[:, 64:])                    # [phi, phi]
    assert torch.equal(a[: T * H * W], a[T * H * W:])           # views share positions
    grid = a[: T * H * W].reshape(T, H, W, D)
    theta_t = 10000 * 2 ** (44 / 42)
    assert math.isclose(theta_t, 20671.16, rel_tol=1e-6)
    t, h, w = 2, 3, 4
    row = grid[t, h, w]
    # temporal block: p_t = t / fps * 24 = 2.4 t; spatial blocks: plain indices
    for i in (0, 1, 21):
        assert row[i].item() == pytest.approx(2.4 * t * theta_t ** (-2 * i / 44), rel=1e-5)
    for j in (0, 1, 20):
        assert row[22 + j].item() == pytest.approx(h * 10000 ** (-2 * j / 42), rel=1e-5)
        assert row[43 + j].item() == pytest.approx(w * 10000 ** (-2 * j / 42), rel=1e-5)


def test_bf16_quirk_quantises_like_upstream():
    a = mvkernels.rope3d_angles(1, 8, 60, 60, 128, fps=24.0)
    assert torch.equal(a, a.bfloat16().float())  # every angle is a bf16 value
    exact = mvkernels.rope3d_angles(1, 8, 60, 60, 128, fps=24.0, bf16_quirk=False)
    assert 0 < (a - exact).abs().max() <= 0.25  # coarse near the largest angles (§5.4: 0.25 rad at ~38)


@pytest.mark.parametrize("kw, match", [
    (dict(n_views=0), "n_views"), (dict(T=-1), "T"), (dict(head_dim=7), "head_dim"), (dict(fps=0), "fps"),
])
def test_bad_arguments(kw, match):
    args = dict(n_views=1, T=2, H=2, W=2, head_dim=32, fps=24.0) | kw
    with pytest.raises(ValueError, match=match):
        mvkernels.rope3d_angles(**args)
