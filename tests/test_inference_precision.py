"""``--precision`` / ``--bf16_blocks`` / ``--bf16_steps`` of text2world_multiview on CPU: bad values are one-line
errors before any model loads; an 8-bit precision on the CPU says in one line per part that it runs bf16, and the
video is then the bf16 one."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from mvmodel.inference.text2world_multiview import build_parser
from test_inference import FRAMES, H, W, _cli, _decode, env  # noqa: F401 - env is the shared fixture

ARGS = ["--diffusion_transformer_dir", "Tiny-Multiview_post-trained", "--prompt", "A truck.", "--seed", "3"]


def test_flags_parse_with_defaults():
    a = build_parser().parse_args([])
    assert (a.precision, a.bf16_blocks, a.bf16_steps) == ("bf16", None, 0)
    a = build_parser().parse_args(["--precision", "fp8-attn", "--bf16_blocks", "0,-1", "--bf16_steps", "3"])
    assert (a.precision, a.bf16_blocks, a.bf16_steps) == ("fp8-attn", "0,-1", 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--precision", "int4"])


@pytest.mark.parametrize("extra, match", [
    (["--bf16_blocks", "2"], r"^--bf16_blocks: block 2 is out of range for a 2-block net \(expected 0..1, or "
                             r"-2..-1 from the end\)$"),
    (["--bf16_blocks", "first"], r"^--bf16_blocks 'first': expected comma-separated block indices"),
    (["--bf16_steps", "-1"], r"^--bf16_steps=-1: expected an integer >= 0"),
])
def test_bad_flags_are_one_line_errors(env, tmp_path, extra, match):  # noqa: F811
    with pytest.raises(ValueError, match=match) as e:
        _cli(env, tmp_path, *ARGS, "--precision", "fp8", *extra)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.mp4"))


def test_fp8_on_cpu_says_so_and_runs_bf16(env, tmp_path, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO):
        fp8 = _cli(env, tmp_path / "fp8", *ARGS, "--precision", "fp8", "--bf16_blocks", "none", "--bf16_steps", "1")
    said = [r.getMessage() for r in caplog.records if r.name == "mvmodel.precision"]
    assert len(said) == 2 and "attention runs in bf16" in said[0] and "linears run in bf16" in said[1], said
    bf16 = _cli(env, tmp_path / "bf16", *ARGS)
    a, b = (_decode(p[0]["video"])[0].astype(int) for p in (fp8, bf16))
    assert a.shape == (5 * FRAMES, H, W, 3) and np.abs(a - b).mean() < 0.5  # the same video up to H.264
