"""Tokenizers: the built-in space-to-depth tokenizer's exact properties, chunking and per-view wrappers, and the
TorchScript loader on real encoder.jit / decoder.jit / mean_std.pt files in upstream's layout."""
from __future__ import annotations

import pytest
import torch

from mvmodel.diffusion import latents_from_video, video_from_latents
from mvmodel.tokenizer import JITVideoTokenizer, SpaceToDepthTokenizer, load_tokenizer, space_to_depth_basis


def test_basis_is_orthonormal():
    b = space_to_depth_basis().reshape(16, -1)
    torch.testing.assert_close(b @ b.T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-12)


def test_shapes_causal_time_and_exact_inverse():
    tok = SpaceToDepthTokenizer(pixel_chunk_duration=17)
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 34, 16, 24, generator=g) * 2 - 1  # two 17-frame chunks
    z = tok.encode(video)
    assert z.shape == (1, 16, 6, 2, 3)  # 2 chunks x (1 + 16/8) latent frames
    torch.testing.assert_close(tok.encode(tok.decode(z)), z, rtol=0, atol=1e-5)
    # a clip in the span (built by decoding) is reproduced exactly by encode -> decode
    x = tok.decode(torch.randn(1, 16, 3, 2, 3, generator=g))
    torch.testing.assert_close(tok.decode(tok.encode(x)), x, rtol=0, atol=1e-5)
    # causal: the first latent frame of a chunk depends only on the chunk's first pixel frame
    v2 = video.clone()
    v2[:, :, 1:17] = 0
    assert torch.equal(tok.encode(v2)[:, :, 0], z[:, :, 0]) and not torch.equal(tok.encode(v2)[:, :, 1], z[:, :, 1])
    # a constant grey video maps to luma DC only
    grey = torch.full((1, 3, 17, 8, 8), 0.5)
    zg = tok.encode(grey)
    assert zg[0, 0].allclose(torch.tensor(0.5 * 3**0.5)) and zg[0, 1:].abs().max() < 1e-6


def test_views_and_chunking_match_per_view_encoding():
    tok = SpaceToDepthTokenizer(pixel_chunk_duration=9, max_enc_batch_size=2, max_dec_batch_size=1)
    g = torch.Generator().manual_seed(1)
    video = torch.rand(2, 3, 3 * 18, 16, 16, generator=g) * 2 - 1  # 3 views x 2 chunks of 9
    z = tok.encode_views(video, 3)
    assert z.shape == (2, 16, 3 * 4, 2, 2)
    for v in range(3):
        torch.testing.assert_close(z[:, :, v * 4:(v + 1) * 4], tok.encode(video[:, :, v * 18:(v + 1) * 18]))
    assert tok.decode_views(z, 3).shape == video.shape
    with pytest.raises(ValueError, match="multiple of pixel_chunk_duration=9"):
        tok.encode(video[:, :, :10])
    with pytest.raises(ValueError, match="divisible by n_views=4"):
        tok.encode_views(video, 4)
    with pytest.raises(ValueError, match="1 \\+ a multiple of 8"):
        SpaceToDepthTokenizer(pixel_chunk_duration=10)


def test_torchscript_directory_round_trip(tmp_path):
    ref = SpaceToDepthTokenizer(pixel_chunk_duration=17)
    # non-trivial normalisation, stored as upstream: (mean, std) viewed as [16, -1] (extra columns are cut)
    ref.export_torchscript(tmp_path)
    mean, std = torch.randn(16, 5), torch.rand(16, 5) + 0.5
    torch.save((mean, std), tmp_path / "mean_std.pt")
    tok = JITVideoTokenizer.from_directory(tmp_path, dtype=torch.float32, pixel_chunk_duration=17)
    assert tok.mean.shape == (1, 16, 3, 1, 1)
    video = torch.rand(2, 3, 2 * 17, 16, 16) * 2 - 1
    z = tok.encode_views(video, 2)
    raw = SpaceToDepthTokenizer(pixel_chunk_duration=17).encode_views(video, 2)
    torch.testing.assert_close(z, (raw - mean[None, :, [0, 1, 2, 0, 1, 2], None, None]) /
                               std[None, :, [0, 1, 2, 0, 1, 2], None, None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tok.encode_views(tok.decode_views(z, 2), 2), z, rtol=1e-4, atol=1e-4)
    bf = load_tokenizer(tmp_path, pixel_chunk_duration=17)  # bf16 by default, as upstream
    assert bf.encode(video[:, :, :17]).dtype == torch.bfloat16


def test_bad_directory_lists_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder.jit, decoder.jit, mean_std.pt"):
        JITVideoTokenizer.from_directory(tmp_path / "missing")
    (tmp_path / "encoder.jit").write_bytes(b"not torchscript")
    with pytest.raises(FileNotFoundError, match="lacks decoder.jit, mean_std.pt"):
        JITVideoTokenizer.from_directory(tmp_path)
    (tmp_path / "decoder.jit").write_bytes(b"x")
    torch.save({"mean": 1}, tmp_path / "mean_std.pt")
    with pytest.raises(ValueError, match="encoder.jit"):
        JITVideoTokenizer.from_directory(tmp_path)


def test_latents_from_video_scaling_and_uint8_round_trip():
    tok = SpaceToDepthTokenizer(pixel_chunk_duration=9)
    grey = torch.full((1, 3, 2 * 9, 16, 16), 128, dtype=torch.uint8)  # 2 views of a constant clip
    z = latents_from_video(grey, tok, n_views=2)
    assert z.shape == (1, 16, 4, 2, 2)
    torch.testing.assert_close(z[0, 0], torch.full((4, 2, 2), 0.5 * 3**0.5 * (128 / 127.5 - 1)))  # x sigma_data
    back = video_from_latents(z, tok, n_views=2)
    assert back.dtype == torch.uint8 and (back.int() - 128).abs().max() <= 1
