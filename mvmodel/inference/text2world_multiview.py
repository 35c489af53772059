"""Multi-view Text2World generation from per-view prompts (upstream's ``text2world_multiview.py`` CLI).

    python -m mvmodel.inference.text2world_multiview --checkpoint_dir checkpoints \
        --diffusion_transformer_dir Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview \
        --prompt "..." --prompt_left "..." --prompt_right "..." --prompt_back "..." \
        --prompt_back_left "..." --prompt_back_right "..." --video_save_name output

Writes ``{video_save_folder}/{name}.mp4`` (views in time), ``{name}_grid.mp4`` (2x3 mosaic) and ``{name}.txt``.
The model folder may be the released one, a ``_post-trained`` copy, one made by ``mvmodel.inference.model_dir``
(``model.pt`` + ``mvworld.json``), a trainer job folder or a ``.pt`` file; its net decides the number of views and
which prompts are used (5-view nets: front, left, right, back_left, back_right). ``--batch_input_path`` takes a
JSONL file, one object per line with the keys ``prompt`` (required), ``prompt_left`` ... ``prompt_back_right``
(default: the command line's), optionally ``seed`` (default ``--seed`` + line index) and ``video_save_name``
(default: the line index). Unlike upstream, ``--tokenizer_dir`` is honoured (``builtin`` = the weight-free
built-in tokenizer) and one GPU suffices: T5, DiT and tokenizer take turns on it.

Guardrails (``mvmodel.guardrail``) run by default, unlike upstream's multi-view scripts, which load them and never
call them: every view's prompt goes through the blocklist and Llama-Guard-3-8B before T5 runs, and every generated
frame of every view through the video content filter before anything is written; faces are pixelated in what is
written. A blocked prompt or video writes nothing and exits with status 3 and the guard's message; a guard that
cannot run stops the generation (status 2). ``--guardrail_dir`` (default ``--checkpoint_dir``) holds
``meta-llama/Llama-Guard-3-8B`` and ``nvidia/Cosmos-Guardrail1`` as ``python -m mvmodel.download`` lays them out;
``--disable_guardrail`` turns them off.

Several GPUs split one generation (context parallelism; rank 0 runs T5 and the decode and writes the files)::

    torchrun --standalone --nproc_per_node=2 -m mvmodel.inference.text2world_multiview --num_gpus 2 ...
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..device import resolve_device
from ..networks.precision import (DEFAULT_BF16_BLOCKS, DEFAULT_BF16_STEPS, PRECISIONS, Precision, parse_blocks,
                                  resolve_precision)
from .model_dir import RELEASED_NAME, RELEASED_V2W_NAME, SLOT_ARGS, INFERENCE_DEFAULTS, resolve_model
from .video_io import check_save_name

_LEAD = "The video is captured from a camera mounted on a car. The camera is facing "
DEFAULT_PROMPTS = {"left": _LEAD + "to the left. ", "right": _LEAD + "to the right.", "back": _LEAD + "backwards.",
                   "back_left": _LEAD + "the rear left side.", "back_right": _LEAD + "the rear right side."}
V2W_DESCRIPTION = ("Multi-view Video2World generation: continue every camera from its first frames (upstream's "
                   "video2world_multiview.py CLI).")
TOKENIZER_NAME = "Cosmos-Tokenize1-CV8x8x8-720p"
T5_NAME = "google-t5/t5-11b"
log = logging.getLogger("mvmodel.inference")


def build_parser(video2world: bool = False) -> argparse.ArgumentParser:
    """Text2World's flags; with ``video2world`` also upstream's Video2World input flags (same machinery)."""
    mod = "video2world_multiview" if video2world else "text2world_multiview"
    desc = V2W_DESCRIPTION if video2world else __doc__.split("\n\n")[0]
    ap = argparse.ArgumentParser(prog=f"python -m mvmodel.inference.{mod}", description=desc)
    a = ap.add_argument
    a("--checkpoint_dir", default="checkpoints", help="folder holding the model, tokenizer and T5 folders")
    a("--diffusion_transformer_dir", default=RELEASED_V2W_NAME if video2world else RELEASED_NAME,
      help="model folder under --checkpoint_dir (any name: released, _post-trained, our exports, trainer jobs)")
    if video2world:
        a("--input_image_or_video_path", default=None,
          help="an mp4 with the views concatenated in time (prompt order, equal blocks; the last "
               "--num_input_frames of each are used), or a folder with one mp4 per camera (<camera>.mp4, or "
               "our dataset layout videos/<camera>/<clip>.mp4); required unless every --batch_input_path line "
               "has visual_input")
        a("--num_input_frames", type=int, default=1, choices=[1, 9],
          help="conditioning frames per view: 1 or 9 (1 or 2 latent frames)")
        a("--input_start_frame", type=int, default=None,
          help="folder input: first input frame of each camera (default: the last --num_input_frames frames)")
        a("--input_clip", default=None, help="dataset-layout folder input: the clip name (default: the only clip)")
    a("--n_views", type=int, default=None, help="check that the model has this many views (default: the model's)")
    a("--prompt", default=None, help="front camera prompt (required unless --batch_input_path)")
    for slot, arg in SLOT_ARGS.items():
        if slot != "front":
            a(f"--{arg}", default=None,
              help=f"{slot.replace('_', '-')} camera prompt (default: {DEFAULT_PROMPTS[slot]!r})")
    a("--batch_input_path", default=None, help="JSONL file of prompt sets (see the module docstring)")
    a("--frame_repeat_negative_condition", type=float, default=10.0,
      help="frame_repeat value of the back_left/back_right views (upstream's constant condition; 0 disables)")
    a("--height", type=int, default=None, help=f"default: the model's, else {INFERENCE_DEFAULTS['height']}")
    a("--width", type=int, default=None, help=f"default: the model's, else {INFERENCE_DEFAULTS['width']}")
    a("--num_video_frames", type=int, default=None, help="frames per view, 1 + 8k (default: the model's, else 57)")
    a("--num_steps", type=int, default=35, help="Euler steps (network calls with guidance batched)")
    a("--guidance", type=float, default=7.0, help="classifier-free guidance g: F_c + g (F_c - F_u); 0 = none")
    a("--fps", type=float, default=None, help="output fps, also the RoPE time scale (default: the model's, else 24)")
    a("--seed", type=int, default=1)
    a("--t5_dir", default=None, help=f"T5 encoder folder (default: <checkpoint_dir>/{T5_NAME})")
    a("--tokenizer_dir", default=None,
      help=f"tokenizer folder with encoder.jit/decoder.jit/mean_std.pt, or 'builtin' "
           f"(default: the model's, else <checkpoint_dir>/{TOKENIZER_NAME})")
    a("--video_save_name", default="output")
    a("--video_save_folder", default="outputs/")
    a("--device", default=None, help="default: cuda when available, else cpu")
    a("--dtype", default=None, choices=["bfloat16", "float32", "float16"], help="DiT dtype (default: bf16 on GPU)")
    a("--t5_dtype", default="float32", choices=["bfloat16", "float32"])
    a("--attention_backend", default="auto", choices=["auto", "sdpa", "mvkernels", "hybrid", "fa4"])
    a("--precision", default="bf16", choices=list(PRECISIONS),
      help="DiT precision while sampling: bf16 (default); fp8 = 8-bit self-attention (INT8 Q.K^T, FP8 P.V; Hopper "
           "with mvkernels.mv_attention_int8) and FP8 linears (torchao, compute capability >= 8.9); fp8-attn / "
           "fp8-linear = only one of them. Where a part cannot run it says so in one line and runs bf16")
    a("--bf16_blocks", default=None, metavar="I,J,...",
      help="transformer blocks kept fully bf16 under an 8-bit precision, negative from the end, 'none' for none "
           f"(default: {','.join(map(str, DEFAULT_BF16_BLOCKS))} = first and last)")
    a("--bf16_steps", type=int, default=DEFAULT_BF16_STEPS,
      help=f"first sampling steps run fully bf16 under an 8-bit precision (default {DEFAULT_BF16_STEPS})")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile each transformer block (default: on with a CUDA device, where the measured per-step "
           "time includes it; off on the CPU). The first step compiles: a one-time cost on top of it")
    a("--sequential_cfg", action="store_true", help="run cond and uncond as two forwards instead of one of batch 2")
    a("--no_offload", action="store_true", help="keep the DiT on the GPU while decoding")
    a("--no_progress", action="store_true", help="no per-step progress bar")
    a("--save_latents", action="store_true", help="also write {name}_latent.pt (the sampled latent, fp32)")
    # Upstream flags kept so that its commands run unchanged.
    a("--num_gpus", type=int, default=1,
      help="GPUs splitting each generation (context parallelism); > 1 under torchrun --nproc_per_node=N")
    a("--negative_prompt", default=None, help="ignored, as upstream's multi-view model (uncond = zero text)")
    a("--disable_prompt_upsampler", action="store_true", help="accepted; there is no prompt upsampler")
    a("--disable_guardrail", action="store_true",
      help="do not run the guardrails (prompt blocklist and Llama Guard 3, video content filter, face pixelation)")
    a("--guardrail_dir", default=None,
      help="folder holding meta-llama/Llama-Guard-3-8B and nvidia/Cosmos-Guardrail1 (default: --checkpoint_dir)")
    a("--offload_guardrail_models", action="store_true",
      help="run the guardrail models on the CPU (by default they use the GPU only while they run)")
    for what in ("diffusion_transformer", "tokenizer", "text_encoder_model", "prompt_upsampler"):
        a(f"--offload_{what}", action="store_true", help="accepted; models leave the GPU when not in use anyway")
    return ap


def prompt_sets(args, slots: tuple[str, ...]) -> list[tuple[str, int, dict[str, str]]]:
    """[(save name, seed, {slot: prompt})] from the command line or the JSONL file."""
    return [(name, seed, ps) for name, seed, ps, _ in prompt_sets_with(args, slots)]


def prompt_sets_with(args, slots: tuple[str, ...], extra_keys: tuple[str, ...] = ()
                     ) -> list[tuple[str, int, dict[str, str], dict]]:
    """``prompt_sets`` plus, per set, the JSONL line's ``extra_keys`` values (e.g. Video2World's
    ``visual_input``; {} on the command line)."""
    given = {s: getattr(args, arg) for s, arg in SLOT_ARGS.items()}
    base = {s: given[s] if given[s] is not None else DEFAULT_PROMPTS.get(s) for s in SLOT_ARGS}
    for s in SLOT_ARGS:
        if s not in slots and given[s] is not None:  # kept as upstream (ignored), but said plainly
            log.warning("--%s is not used: this model has %d cameras (%s) and none of them is %r, so no %s view "
                        "is generated", SLOT_ARGS[s], len(slots), ", ".join(slots), s, s.replace("_", "-"))
    if args.batch_input_path is None:
        if not (args.prompt or "").strip():
            raise ValueError("--prompt (the front camera's prompt) is required unless --batch_input_path is given")
        return [(check_save_name(args.video_save_name, "--video_save_name"), args.seed, {s: base[s] for s in slots},
                 {})]
    path = Path(args.batch_input_path)
    if not path.is_file():
        raise FileNotFoundError(f"--batch_input_path {path} does not exist")
    keys = set(SLOT_ARGS.values()) | {"seed", "video_save_name"} | set(extra_keys)
    out, line_of = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON: {exc}") from exc
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(item).__name__}")
        if set(item) - keys:
            raise ValueError(f"{path}:{n}: unknown keys {sorted(set(item) - keys)}; expected some of {sorted(keys)}")
        if not str(item.get("prompt") or "").strip():
            raise ValueError(f"{path}:{n}: no \"prompt\" (the front camera's prompt)")
        i = len(out)
        ps = {s: str(item.get(SLOT_ARGS[s]) or base[s] or "") for s in slots}
        seed = item.get("seed", args.seed + i)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"{path}:{n}: \"seed\" must be an integer, got {seed!r}")
        name = check_save_name(str(item.get("video_save_name", i)), f"{path}:{n}: video_save_name")
        if name in line_of:  # the later video would overwrite the earlier one
            raise ValueError(f"{path}:{n}: video_save_name {name!r} is already used on line {line_of[name]}")
        line_of[name] = n
        out.append((name, seed, ps, {k: item[k] for k in extra_keys if k in item}))
    if not out:
        raise ValueError(f"--batch_input_path {path} holds no prompt sets")
    return out


def precision_of(args, num_blocks: int) -> Precision:
    """``--precision/--bf16_blocks/--bf16_steps`` as a Precision, checked against the net's block count."""
    try:
        p = Precision(args.precision, parse_blocks(args.bf16_blocks), args.bf16_steps)
        p.block_set(num_blocks)
    except ValueError as exc:
        raise ValueError(str(exc) if str(exc).startswith("--") else f"--{exc}") from None
    return p


def check_numbers(args) -> None:
    """Numeric options that would otherwise yield a NaN (black) video or a broken file, refused up front."""
    from .pipeline import check_sampling_options

    check_sampling_options(args.num_steps, args.guidance, args.fps)  # fps None: the model's, checked later
    if not math.isfinite(args.frame_repeat_negative_condition):
        raise ValueError(f"--frame_repeat_negative_condition {args.frame_repeat_negative_condition}: must be finite")


def prepare_output_folder(folder: str | Path) -> Path:
    """Create --video_save_folder and prove it writable (a real file, not os.access, which root always passes)
    before any model is loaded, so that a long generation never ends in an unwritable folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mvworld_write_test_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--video_save_folder {folder}: cannot write there ({e.strerror or e})") from None
    return folder


def setup_gpus(args) -> tuple[object | None, bool]:
    """(context-parallel group or None, whether this process writes files) for ``--num_gpus``; joins torchrun's
    process group when it is more than 1 (NCCL on cuda:LOCAL_RANK, gloo with --device cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.num_gpus < 1 or args.num_gpus != world:
        raise ValueError(f"--num_gpus {args.num_gpus}: expected a count >= 1 equal to the number of processes "
                         f"({world}); launch with torchrun --nproc_per_node={max(args.num_gpus, 1)} for several")
    if args.num_gpus == 1:
        return None, True
    from ..trainer.parallelize import init_distributed

    info = init_distributed(args.device or "auto")
    args.device = str(info.device)
    if not info.is_main:
        args.no_progress = True
        logging.getLogger().setLevel(logging.WARNING)
    return dist.group.WORLD, info.is_main


def _on_main(cp_group, is_main: bool, fn):
    """Run a guard on rank 0 only (one Llama Guard load, not one per rank); its verdict reaches every rank."""
    from ..guardrail import GuardrailBlocked, GuardrailError

    if cp_group is None:
        return fn()
    verdict = [None]
    if is_main:
        try:
            fn()
        except (GuardrailBlocked, GuardrailError) as exc:
            verdict = [(isinstance(exc, GuardrailBlocked), str(exc))]
    dist.broadcast_object_list(verdict, src=0, group=cp_group)
    if verdict[0] is not None:
        blocked, msg = verdict[0]
        raise (GuardrailBlocked if blocked else GuardrailError)(msg)
    return None


def make_guardrails(args, device, ckpt: Path):
    """The guardrails of this run, or None with --disable_guardrail; missing checkpoints are one error line."""
    if args.disable_guardrail:
        log.warning("guardrails disabled (--disable_guardrail): prompts and videos are not checked and faces are "
                    "not pixelated")
        return None
    from ..guardrail import Guardrails

    return Guardrails(args.guardrail_dir or ckpt, device, offload=args.offload_guardrail_models)


def run(argv: list[str] | None = None, *, video2world: bool = False) -> list[dict[str, Path]]:
    """Parse, generate and save; returns the written paths per video. Raises ValueError / OSError (user errors).
    ``video2world``: the Video2World CLI (input frames; the model must be a Video2World net)."""
    from .pipeline import MultiviewGenerationPipeline, check_video_size
    from .video_io import save_outputs

    args = build_parser(video2world).parse_args(argv)
    cp_group, is_main = setup_gpus(args)
    check_numbers(args)
    device = resolve_device(args.device)
    ckpt = Path(args.checkpoint_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--checkpoint_dir {ckpt} does not exist")
    spec = resolve_model(ckpt, args.diffusion_transformer_dir)
    if args.n_views is not None and args.n_views != spec.n_views:
        raise ValueError(f"--n_views {args.n_views} does not match the model: {spec.weights} is a {spec.n_views}-view "
                         f"net (views {list(spec.slots)}, from {spec.source})")
    kind = "Video2World" if spec.net_config.video2world else "Text2World"
    if bool(spec.net_config.video2world) != video2world:
        other = "video2world_multiview" if spec.net_config.video2world else "text2world_multiview"
        raise ValueError(f"{spec.weights} is a {kind} net ({spec.source}); use python -m mvmodel.inference.{other}")
    # Checked and resolved before any model loads: what cannot run on this device is said here, in one line.
    dtype = getattr(torch, args.dtype) if args.dtype else None
    net_dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)  # the pipeline's default
    precision = resolve_precision(precision_of(args, spec.net_config.num_blocks), device, net_dtype)
    sets = prompt_sets_with(args, spec.slots, ("visual_input",) if video2world else ())
    opt = {k: getattr(args, k) if getattr(args, k) is not None else spec.defaults.get(k, v)
           for k, v in INFERENCE_DEFAULTS.items()}
    check_video_size(int(opt["num_video_frames"]), int(opt["height"]), int(opt["width"]))
    if not (math.isfinite(float(opt["fps"])) and float(opt["fps"]) > 0):  # the model folder's default
        raise ValueError(f"fps {opt['fps']} from {spec.source}: must be a finite number > 0 (pass --fps)")
    t5_dir = args.t5_dir or str(ckpt / T5_NAME)
    tok_dir = args.tokenizer_dir or spec.tokenizer_dir or str(ckpt / TOKENIZER_NAME)
    if tok_dir != "builtin" and not Path(tok_dir).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tok_dir} does not exist (--tokenizer_dir; 'builtin' for the "
                                f"built-in tokenizer)")
    if args.negative_prompt:
        log.warning("--negative_prompt is ignored: the multi-view model's unconditional branch is zero text")
    extra = {}
    if video2world:  # every input is read and checked before any model loads
        from .video2world_input import load_input_frames

        cams = spec.net_config.camera_names
        frames = []
        for name, _, _, ex in sets:
            src = ex.get("visual_input") or args.input_image_or_video_path
            if not src:
                raise ValueError("--input_image_or_video_path is required (or \"visual_input\" on every "
                                 "--batch_input_path line)")
            try:
                frames.append(load_input_frames(src, slots=spec.slots, cameras=cams, n_views=args.n_views,
                                                num_input_frames=args.num_input_frames,
                                                start=args.input_start_frame, clip=args.input_clip))
            except (ValueError, OSError) as exc:
                raise type(exc)(f"{name}: {exc}" if len(sets) > 1 else str(exc)) from None
        extra = dict(input_frames=frames, num_input_frames=args.num_input_frames)
    out_dir = prepare_output_folder(args.video_save_folder)
    guard = make_guardrails(args, device, ckpt)
    t0 = time.time()
    if guard is not None:  # before T5: a blocked prompt costs no generation
        _on_main(cp_group, is_main, lambda: guard.check_prompts(
            [(f"video {name!r}, {slot} camera", ps[slot]) for name, _, ps, _ in sets
             for slot in sorted(spec.slots, key=list(SLOT_ARGS).index)]))  # front first, as the outputs list them
    pipe = MultiviewGenerationPipeline(spec, t5_dir=t5_dir, tokenizer_dir=tok_dir, device=device, dtype=dtype,
                                       attention_backend=args.attention_backend, t5_dtype=getattr(torch, args.t5_dtype),
                                       batch_cfg=not args.sequential_cfg, offload=not args.no_offload,
                                       progress=not args.no_progress, cp_group=cp_group, precision=precision,
                                       compile=args.compile if args.compile is not None else device.type == "cuda")
    log.info(kind + " model %s (%s), %d views %s; %d video(s) of %d frames at %dx%d, %s fps, %d steps, guidance %g%s",
             spec.weights, spec.source, spec.n_views, list(spec.slots), len(sets), opt["num_video_frames"],
             opt["height"], opt["width"], opt["fps"], args.num_steps, args.guidance,
             f"; context parallel over {args.num_gpus} ranks" if cp_group is not None else "")
    videos = pipe.generate([s[2] for s in sets], seeds=[s[1] for s in sets], num_steps=args.num_steps,
                           guidance=args.guidance, fps=float(opt["fps"]), num_video_frames=int(opt["num_video_frames"]),
                           height=int(opt["height"]), width=int(opt["width"]),
                           frame_repeat_negative_condition=args.frame_repeat_negative_condition, **extra)
    written = []
    if not is_main:  # rank 0 writes every file
        return written
    if guard is not None:  # every video is checked before any file is written
        order = sorted(range(spec.n_views), key=lambda v: list(SLOT_ARGS).index(spec.slots[v]))  # front first
        checked = []
        for (name, *_), video in zip(sets, videos):
            out = torch.empty_like(video)
            out[order] = guard.check_video(video[order], [f"video {name!r}, {spec.slots[v]} camera" for v in order])
            checked.append(out)
        videos = checked
        log.info("guardrails: %.1f s of %.1f s (%s)", sum(v for k, v in guard.timings.items()), time.time() - t0,
                 ", ".join(f"{k} {v:.1f} s" for k, v in guard.timings.items()))
    for (name, _, ps, _), video, latent in zip(sets, videos, pipe.latents):
        paths = save_outputs(out_dir, name, video, spec.slots, ps, float(opt["fps"]))
        log.info("saved %s, %s, %s", *paths.values())
        if args.save_latents:
            paths["latent"] = Path(args.video_save_folder) / f"{name}_latent.pt"
            torch.save(latent, paths["latent"])
        written.append(paths)
    log.info("done in %.1f s", time.time() - t0)
    return written


def main(argv: list[str] | None = None, *, video2world: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    from ..guardrail import GuardrailBlocked

    try:
        run(argv, video2world=video2world)
    except GuardrailBlocked as exc:  # the content, not the command, is refused: its own status
        print(f"blocked: {exc}", file=sys.stderr)
        sys.exit(3)
    except (ValueError, OSError) as exc:  # user and environment errors: one line, no traceback; bugs still trace
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
