"""Guardrail overhead of one 6-view, 57-frame 480 x 848 generation on one GPU (issue 23, item 4).

What the CLI runs per generation, with random-weight models of the real sizes (the released weights are gated):
  * Llama-Guard-3-8B (bf16) on the 6 distinct view prompts: prefill of ~``--prompt_tokens`` tokens (the chat
    template with 14 categories is ~230 tokens, plus the prompt) and greedy decoding of 3 tokens (a real answer,
    "safe" then <|eot_id|>) and of 100 tokens (the ``max_new_tokens`` bound, an upper limit);
  * the video content filter (SigLIP-so400m-384 vision tower fp32 + the 1152-512-256-7 classifier) on all
    6 x 57 = 342 frames (a safe video is classified entirely), through ``VideoContentSafetyFilter``;
  * RetinaFace-R50 (fp32) face detection at 480 x 848 on the 342 frames, through ``RetinaFaceFilter`` (its class
    head biased to "no face": random weights would report thousands of faces; pixelating a few costs little);
  * moving each model to the GPU and back (the CLI loads each guard only for its stage);
and, with ``--guardrail_dir`` holding the real checkpoints, the CLI's ``Guardrails`` end to end, loads from disk
included. The denominator is 35 sampling steps of the 7B 6-view net (``bench_inference_step``, auto backend;
T5 and the decode excluded, so the percentage is an upper bound). Target: <= 5 %.

Run on a GPU:  python benches/bench_guardrail.py [--guardrail_dir checkpoints] [--step_seconds S]
               pytest benches/bench_guardrail.py -s
Dry run of the logic on a CPU with tiny models: MVB_DEVICE=cpu python benches/bench_guardrail.py --small
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
DEVICE = os.environ.get("MVB_DEVICE", "cuda")
V, T, H, W = 6, 57, 480, 848


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn, rep: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    _sync()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _free():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _move_seconds(model) -> float:
    """GPU -> CPU -> GPU of a model's weights (the per-stage load when the weights are already in host memory)."""
    _sync()
    t0 = time.perf_counter()
    model.to("cpu")
    model.to(DEVICE)
    _sync()
    return (time.perf_counter() - t0) / 2


def llama_guard(small: bool, prompt_tokens: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = (LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2) if small else
           LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=131072))  # Llama-Guard-3-8B's config.json
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (V, prompt_tokens), device=DEVICE)
    out = {"llama_params_B": params / 1e9}

    @torch.inference_mode()
    def prompts(n_new):
        for v in range(V):  # one prompt at a time, as the CLI runs them
            model.generate(ids[v:v + 1], attention_mask=torch.ones_like(ids[v:v + 1]), max_new_tokens=n_new,
                           min_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=None)

    out["llama_6_prompts_3_tokens_s"] = _timed(lambda: prompts(3))
    out["llama_6_prompts_100_tokens_s"] = _timed(lambda: prompts(100), rep=1)
    out["llama_move_s"] = _move_seconds(model)
    del model
    _free()
    return out


def video_guards(small: bool) -> dict:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from mvmodel.guardrail.face_blur import RetinaFaceFilter
    from mvmodel.guardrail.retinaface import RetinaFace
    from mvmodel.guardrail.video_filter import FEATURES, SafetyClassifier, VideoContentSafetyFilter

    t, h, w = (3, 64, 96) if small else (T, H, W)
    vcfg = (SiglipVisionConfig(hidden_size=FEATURES, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16) if small else
            SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                               image_size=384, patch_size=14))  # so400m-patch14-384
    with torch.device(DEVICE):
        encoder = SiglipVisionModel(vcfg)
    clf = SafetyClassifier()
    with torch.no_grad():  # every frame Safe: the whole video is classified (no early exit)
        clf.network.layers[6].bias[0] = 1e4
    vf = VideoContentSafetyFilter.from_modules(encoder, clf, DEVICE)
    frames = torch.randint(0, 256, (V * t, h, w, 3), dtype=torch.uint8)  # decoded frames live on the CPU
    out = {"frames": V * t, "siglip_params_M": sum(p.numel() for p in encoder.parameters()) / 1e6}
    out["content_filter_s"] = _timed(lambda: vf.first_unsafe(frames), rep=2)
    out["content_filter_move_s"] = _move_seconds(encoder)
    del vf, encoder
    _free()
    with torch.device(DEVICE):
        net = RetinaFace()
    with torch.no_grad():  # random heads would call thousands of boxes faces; driving scenes have a few
        for head in net.ClassHead:
            head.conv1x1.bias.copy_(torch.tensor([8.0, -8.0]).repeat(2))
    ff = RetinaFaceFilter(net, DEVICE)
    out["face_blur_s"] = _timed(lambda: ff.pixelate_faces(frames), rep=2)
    out["face_blur_move_s"] = _move_seconds(net)
    del ff, net
    _free()
    return out


def real_guardrails(guardrail_dir: str, small: bool) -> dict:
    """The CLI's Guardrails on the real checkpoints: loads from disk included (needs the gated downloads)."""
    from mvmodel.guardrail import Guardrails

    t, h, w = (3, 64, 96) if small else (T, H, W)
    g = Guardrails(guardrail_dir, DEVICE)
    prompts = [(f"view {v}", f"The video is captured from a camera mounted on a car, view {v}, on a sunny highway.")
               for v in range(V)]
    t0 = time.perf_counter()
    g.check_prompts(prompts)
    # a smooth synthetic road scene: real content filters call noise unsafe more often than driving footage
    y = torch.linspace(0, 1, h)[:, None, None]
    frame = (torch.cat([0.4 + 0.3 * y.expand(h, w, 1), 0.4 + 0.2 * y.expand(h, w, 1), 0.5 - 0.1 * y.expand(h, w, 1)],
                       -1) * 255).to(torch.uint8)
    g.check_video(frame.expand(V, t, h, w, 3).contiguous(), [f"view {v}" for v in range(V)])
    _sync()
    return {"real_total_s": time.perf_counter() - t0, **{f"real {k} s": round(v, 3) for k, v in g.timings.items()}}


def dit_35_steps(small: bool) -> float:
    from bench_inference_step import run as step_run

    return 35 * step_run(small=small, variants=["auto"], rep=2)["auto"]["s_per_step"]


def run(small: bool = False, guardrail_dir: str | None = None, step_seconds: float | None = None,
        prompt_tokens: int = 400) -> dict:
    res = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "small": small}
    res.update(llama_guard(small, prompt_tokens))
    res.update(video_guards(small))
    res["guard_s"] = (res["llama_6_prompts_3_tokens_s"] + res["content_filter_s"] + res["face_blur_s"]
                      + res["llama_move_s"] + res["content_filter_move_s"] + res["face_blur_move_s"])
    res["guard_worst_s"] = res["guard_s"] - res["llama_6_prompts_3_tokens_s"] + res["llama_6_prompts_100_tokens_s"]
    if guardrail_dir:
        res.update(real_guardrails(guardrail_dir, small))
    if step_seconds is None and not (DEVICE == "cpu"):
        res["generation_35_steps_s"] = dit_35_steps(small)
    elif step_seconds is not None:
        res["generation_35_steps_s"] = 35 * step_seconds
    if "generation_35_steps_s" in res:
        gen = res["generation_35_steps_s"]
        res["overhead_pct"] = 100 * res["guard_s"] / gen
        res["overhead_worst_pct"] = 100 * res["guard_worst_s"] / gen
        if "real_total_s" in res:
            res["overhead_real_pct"] = 100 * res["real_total_s"] / gen
    for k, v in res.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    print(json.dumps(res))
    return res


def test_guardrail_overhead():
    res = run(small=os.environ.get("MVB_SMALL") == "1", guardrail_dir=os.environ.get("MVB_GUARDRAIL_DIR"))
    assert res["guard_s"] > 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny models and frames (a logic check, seconds)")
    ap.add_argument("--guardrail_dir", default=None, help="also run the CLI's guardrails on the real checkpoints")
    ap.add_argument("--step_seconds", type=float, default=None,
                    help="seconds per sampling step of the 7B net (default: measured with bench_inference_step)")
    ap.add_argument("--prompt_tokens", type=int, default=400, help="Llama Guard input length per prompt")
    a = ap.parse_args()
    run(a.small, a.guardrail_dir, a.step_seconds, a.prompt_tokens)
