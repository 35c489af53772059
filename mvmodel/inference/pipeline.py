"""Multi-view Text2World generation: T5 -> EDM Euler sampling with guidance -> per-view tokenizer decode.

    pipe = MultiviewGenerationPipeline(resolve_model("checkpoints", NAME), t5_dir=..., tokenizer_dir=...)
    videos = pipe.generate([{"front": "...", "left": "...", ...}], seed=1)   # [uint8 [V, T, H, W, 3]]

Stages, each holding the GPU only while it runs (the 7B 6-view run fits one 80 GB GPU):

1. ``encode_prompts``: the T5 encoder is loaded, encodes every distinct prompt ([512, 1024] fp32 each, padding rows
   zeroed as upstream), and is deleted before anything else is loaded.
2. ``sample``: the DiT (built on the meta device, then materialised on the GPU and filled from the checkpoint
   tensor by tensor) runs upstream's sampler (cosmos-multiview.md §7.4): Karras sigmas (rho 7, 80 -> 0.0002, then 0),
   noise N(0,1) * sqrt(80^2+1) from a CPU generator seeded with ``seed``, per step
   F = F_c + g (F_c - F_u) on the net output with the conditional and unconditional passes batched in one forward
   (B = 2; uncond = zero text, everything else shared), D = c_skip x + c_out F, x <- x + (x - D)/s_k (s_{k+1} - s_k)
   in fp32, rounded to the net dtype between steps. The latent is kept on the CPU afterwards.
3. ``decode``: the DiT goes back to the CPU, the tokenizer comes to the GPU and decodes one view at a time
   (latent / sigma_data, then clamp(1 + x, 0, 2) / 2 * 255 -> uint8, as upstream), then leaves it again.

Split across GPUs (``cp_group``: the ranks of one generation, e.g. ``torchrun --nproc_per_node=N``): the DiT runs
with the trainer's context parallelism (``mvmodel.trainer.context_parallel``: each rank holds 1/N of every view's
tokens, the joint self-attention exchanges heads by all-to-all, the final layer all-gathers the output), so every
rank gets the full network output and makes the same Euler update: all ranks hold the same latent, with no
further communication. Rank 0 alone runs T5 (one 11B encoder load instead of N; its embeddings, 2 MB per
prompt, are broadcast) and the tokenizer decode (the other ranks' latents are identical, so decoding there would
only repeat it); the other ranks return None for each video.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..diffusion import Condition, EDMScaling, VideoCondition, karras_sigmas
from ..device import resolve_device  # noqa: F401 - re-exported: the CLI and tests import it from here
from ..networks import MultiviewDiT, load_cosmos_checkpoint
from ..networks.precision import Precision, apply_precision, set_sampling_step
from .model_dir import ModelSpec

log = logging.getLogger("mvmodel.inference")
SIGMA_DATA = 0.5
T5_LENGTH = 512


class NonFiniteError(ValueError):
    """Weights or a sample hold NaN/inf: generating would only write a black or noise video."""


def check_finite_weights(net: torch.nn.Module, where: str) -> None:
    """Refuse a net with NaN/inf anywhere (a diverged run's or damaged checkpoint): one tensor at a time, on the
    net's device, so the check costs a fraction of a second even for the 7B on a GPU."""
    for name, t in net.state_dict().items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise NonFiniteError(f"{where}: weight {name} {tuple(t.shape)} holds {bad} non-finite values "
                                     f"(NaN/inf); refusing to generate from a diverged or damaged checkpoint")


def free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def encode_prompts(texts: Sequence[str], t5_dir: str, device: torch.device, dtype: torch.dtype = torch.float32,
                   batch_size: int = 8) -> dict[str, Tensor]:
    """{text: [512, D] float32 on the CPU} for every distinct text; the encoder is freed before returning."""
    from ..data.t5_embeddings import T5TextEncoder

    unique = list(dict.fromkeys(texts))
    enc = T5TextEncoder(t5_dir, device=str(device), dtype=dtype, max_length=T5_LENGTH)
    out: dict[str, Tensor] = {}
    try:
        for i in range(0, len(unique), batch_size):
            chunk = unique[i:i + batch_size]
            tok = enc.tokenizer(chunk, truncation=True, padding="max_length", max_length=T5_LENGTH,
                                return_tensors="pt")
            ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
            hidden = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            hidden = hidden * mask[..., None].float()  # rows past the prompt (after EOS) are zeros, as upstream
            out.update(zip(chunk, hidden.cpu().unbind(0)))
    finally:
        del enc
        free_accelerator_memory()
    return out


def build_network(spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                  attention_backend: str = "auto") -> MultiviewDiT:
    """The spec's net on ``device`` in ``dtype``, weights from ``spec.weights`` (strict: every key must fit).

    Built on the meta device and materialised directly on ``device``; the checkpoint is memory-mapped and copied
    tensor by tensor, so host memory never holds a second full copy.
    """
    cfg = spec.net_config.replace(attention_backend=attention_backend)
    with torch.device("meta"):
        net = MultiviewDiT(cfg, dtype=dtype)
    net = net.to_empty(device=device)
    with torch.no_grad():  # a checkpoint without it keeps upstream's arange (it is not used by the math)
        net.pos_embedder.seq.copy_(torch.arange(net.pos_embedder.seq.numel(), dtype=torch.float32))
    try:
        report = load_cosmos_checkpoint(net, spec.weights, strict=True, remap_cameras=False)
    except ValueError as exc:
        raise ValueError(f"{spec.weights} does not fit the net described by {spec.source} "
                         f"({cfg.n_views} views):\n{exc}") from exc
    log.info("loaded %s: %s", spec.weights, str(report).splitlines()[0])
    if spec.lora is not None:
        load_lora_adapters(net, spec.lora)
    check_finite_weights(net, str(spec.weights))
    return net.eval().requires_grad_(False)


def load_lora_adapters(net: MultiviewDiT, lora: dict) -> None:
    """Add a LoRA job's adapters to the loaded base (unmerged: the base weights stay as loaded); strict."""
    from ..networks.checkpoint import read_state_dict  # noqa: PLC0415
    from ..networks.lora import add_lora  # noqa: PLC0415

    add_lora(net, lora["rank"], lora["alpha"], lora["targets"])
    sd = {k[len("net."):] if k.startswith("net.") else k: v for k, v in read_state_dict(lora["adapters"]).items()}
    own = {k: v for k, v in net.state_dict().items() if "_lora.net." in k}
    if set(sd) != set(own):
        missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        raise ValueError(f"{lora['adapters']}: adapters do not match rank {lora['rank']} on {lora['targets']}: "
                         f"missing {missing[:4]}, unexpected {extra[:4]}")
    with torch.no_grad():
        for k, v in sd.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"{lora['adapters']}: {k} has shape {list(v.shape)}, expected {list(own[k].shape)}")
            own[k].copy_(v)
    log.info("added %d LoRA adapter tensors from %s", len(sd), lora["adapters"])


def net_dtype(net: MultiviewDiT) -> torch.dtype:
    return net.x_embedder.proj[1].weight.dtype


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None else torch.cat([a, b])


@torch.no_grad()
def euler_step_cfg(net: MultiviewDiT, x: Tensor, sigma: float, sigma_next: float, cond: Condition,
                   uncond: Condition | None, guidance: float, batch_cfg: bool = True,
                   scaling: EDMScaling = EDMScaling(SIGMA_DATA), video: VideoCondition | None = None) -> Tensor:
    """One Euler step of upstream's sampler. x [1, 16, V*T, h, w] in the net dtype -> next x (same dtype).

    With ``uncond`` the net sees a batch of 2 (cond, uncond) in one forward unless ``batch_cfg`` is False.
    ``video`` (Video2World): the condition region of the input is the augmented condition latent, the guided
    output there is replaced so that x0 equals it, and the step starts from that composed input, as upstream's
    ``DiffusionMultiviewV2WModel.generate_samples_from_batch`` (``mvmodel.diffusion.video2world``).
    """
    dt = net_dtype(net)
    s = torch.tensor([sigma], dtype=torch.float32, device=x.device)  # diffusers keeps sigmas in fp32
    c_skip, c_out, c_in, c_noise = scaling(s)
    ind = None
    if video is not None:
        ind = video.active_indicator(s)
        x = video.compose(x, s, ind).to(dt)
    xf = x.float()
    x_in = (xf * c_in).to(dt)
    t = c_noise.to(dt)
    if uncond is None or guidance == 0:
        f = net(x_in, t, **cond.to_kwargs()).float()
    elif batch_cfg:
        both = Condition(*(_cat(getattr(cond, f.name), getattr(uncond, f.name)) for f in dataclasses.fields(Condition)))
        f_c, f_u = net(torch.cat([x_in, x_in]), t.expand(2), **both.to_kwargs()).float().chunk(2)
        f = f_c + guidance * (f_c - f_u)
    else:
        f_c = net(x_in, t, **cond.to_kwargs()).float()
        f_u = net(x_in, t, **uncond.to_kwargs()).float()
        f = f_c + guidance * (f_c - f_u)
    if video is not None:
        f = video.replace_output(f, xf, s, ind)
    d = c_skip * xf + c_out * f
    return (xf + (xf - d) / sigma * (sigma_next - sigma)).to(dt)


def make_condition(text: Tensor, n_views: int, fps: float, height: int, width: int, frame_repeat: Sequence[float],
                   device: torch.device, dtype: torch.dtype) -> tuple[Condition, Condition]:
    """(cond, uncond) of one sample. text [V*512, D]; frame_repeat [V] raw values (divided by 10 here, as
    upstream's FrameRepeatAttr); padding mask all zeros; uncond = zero text, everything else identical."""
    emb = text[None].to(device=device, dtype=dtype)
    fr = torch.tensor([list(frame_repeat)], dtype=torch.float32, device=device) / 10.0
    cond = Condition(emb, torch.tensor([float(fps)], device=device),
                     torch.zeros(1, 1, height, width, device=device), fr)
    if fr.shape != (1, n_views):
        raise ValueError(f"frame_repeat needs {n_views} values, got {list(frame_repeat)}")
    return cond, cond.uncondition()


class MultiviewGenerationPipeline:
    """Loads lazily; keeps each model on ``device`` only while its stage runs (see the module docstring)."""

    def __init__(self, spec: ModelSpec, *, t5_dir: str | None, tokenizer_dir: str | None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 attention_backend: str = "auto", t5_dtype: torch.dtype = torch.float32,
                 batch_cfg: bool = True, offload: bool = True, progress: bool = True, compile: bool = False,
                 cp_group=None, precision: Precision | None = None) -> None:
        self.spec = spec
        self.cp_group = cp_group if cp_group is not None and dist.get_world_size(cp_group) > 1 else None
        # Global rank of the group's first member: it encodes the prompts and decodes the videos.
        self.lead = dist.get_global_rank(self.cp_group, 0) if self.cp_group is not None else 0
        self.is_lead = self.cp_group is None or dist.get_rank() == self.lead
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.t5_dir, self.tokenizer_dir, self.t5_dtype = t5_dir, tokenizer_dir, t5_dtype
        self.attention_backend, self.batch_cfg = attention_backend, batch_cfg
        self.offload, self.progress, self.compile = offload, progress, compile
        # 8-bit attention / FP8 linears (mvmodel.networks.precision): applied once, when sampling first needs the
        # net (after T5 has left the GPU), and switched per step
        self.precision = precision or Precision()
        self._precision_applied = False
        self._net: MultiviewDiT | None = None
        self._tokenizer = None

    # ------------------------------------------------------------------ stages
    def encode_prompts(self, texts: Sequence[str]) -> dict[str, Tensor]:
        if self.t5_dir is None:
            raise ValueError("no T5 directory given (--t5_dir)")
        if self._net is not None and self.offload:
            self._net.to("cpu")  # the T5 encoder gets the accelerator to itself
            free_accelerator_memory()
        emb = encode_prompts(texts, self.t5_dir, self.device, self.t5_dtype)
        width = next(iter(emb.values())).shape[-1]
        if width != self.spec.net_config.crossattn_emb_channels:
            raise ValueError(f"T5 at {self.t5_dir} gives {width}-wide embeddings but the net's cross-attention "
                             f"expects {self.spec.net_config.crossattn_emb_channels} (crossattn_emb_channels)")
        return emb

    def network(self) -> MultiviewDiT:
        if self._tokenizer is not None and self.offload:
            self._tokenizer.to("cpu")
            free_accelerator_memory()
        if self._net is None:
            self._net = build_network(self.spec, self.device, self.dtype, self.attention_backend)
            if self.cp_group is not None:  # hooks only: weights and keys unchanged
                from ..trainer.context_parallel import enable_context_parallel

                enable_context_parallel(self._net, self.cp_group)
            if self.compile:  # in place, per transformer block: state-dict keys and the loaded weights unchanged
                for block in self._net.blocks.values():
                    block.compile()
        else:
            self._net.to(self.device)
        return self._net

    def tokenizer(self, num_video_frames: int):
        from ..tokenizer import SpaceToDepthTokenizer, load_tokenizer

        if self._net is not None and self.offload:
            self._net.to("cpu")
            free_accelerator_memory()
        tok = self._tokenizer
        if tok is None or tok.pixel_chunk_duration != num_video_frames:
            if self.tokenizer_dir in (None, "builtin"):
                tok = SpaceToDepthTokenizer(pixel_chunk_duration=num_video_frames, max_dec_batch_size=1)
            else:
                tok_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
                tok = load_tokenizer(self.tokenizer_dir, pixel_chunk_duration=num_video_frames,
                                     max_dec_batch_size=1, device="cpu", dtype=tok_dtype)
            self._tokenizer = tok
        return tok.to(self.device)

    @torch.no_grad()
    def sample(self, text: Tensor, *, seed: int, num_steps: int = 35, guidance: float = 7.0, fps: float = 24.0,
               num_video_frames: int = 57, height: int = 480, width: int = 848,
               frame_repeat: Sequence[float] | None = None,
               callback: Callable[[int, Tensor], None] | None = None,
               video: VideoCondition | None = None) -> Tensor:
        """text [V*512, D] -> sampled x0 [1, 16, V*T', H/8, W/8] float32 on the CPU (tokenizer latents x
        sigma_data, the diffusion model's data space). ``callback(step, x)`` after every step."""
        V = self.spec.n_views
        check_video_size(num_video_frames, height, width)
        check_sampling_options(num_steps, guidance, fps)
        net = self.network()
        if not self._precision_applied:
            self.precision = apply_precision(net, self.precision)  # what actually runs (a fallback is logged)
            self._precision_applied = True
        shape = (1, 16, V * (1 + (num_video_frames - 1) // 8), height // 8, width // 8)
        gen = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(shape, generator=gen) * math.sqrt(80.0**2 + 1)  # diffusers' init_noise_sigma
        cond, uncond = make_condition(text, V, fps, height, width, frame_repeat or [0.0] * V, self.device,
                                      net_dtype(net))
        if video is not None:  # both branches keep the condition frames' mask (guidance differs in the text only)
            video = dataclasses.replace(video, gt=video.gt.to(self.device), indicator=video.indicator.to(self.device),
                                        augment_sigma=video.augment_sigma.to(self.device),
                                        noise=video.noise.to(self.device))
            mask = video.input_mask().to(net_dtype(net))
            cond = dataclasses.replace(cond, condition_video_input_mask=mask)
            uncond = dataclasses.replace(uncond, condition_video_input_mask=mask)
        sigmas = karras_sigmas(num_steps).float().tolist()
        x = noise.to(self.device, net_dtype(net))
        steps = range(num_steps)
        if self.progress and self.is_lead:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"sampling {V} views", unit="step")
        for i in steps:
            set_sampling_step(net, i)  # bf16 for the first precision.bf16_steps steps
            x = euler_step_cfg(net, x, sigmas[i], sigmas[i + 1], cond, uncond, guidance, self.batch_cfg,
                               video=video)
            if not bool(torch.isfinite(x).all()):  # one sync per step: negligible next to a forward
                raise NonFiniteError(f"sampling produced NaN/inf at step {i + 1}/{num_steps} (sigma {sigmas[i]:.4g}, "
                                     f"guidance {guidance:g}, dtype {net_dtype(net)}); nothing is saved. Check the "
                                     f"weights {self.spec.weights} and the options")
            if callback is not None:
                callback(i, x)
        return x.float().cpu()

    @torch.no_grad()
    def encode_condition(self, frames: Tensor, num_video_frames: int, height: int, width: int) -> Tensor:
        """Video2World input frames uint8 [V, N, H, W, 3] (net view order) -> condition latent
        [1, 16, V*T', h, w] (x sigma_data, on the CPU): normalised, resized, zero-padded to ``num_video_frames``
        and encoded one view at a time, as upstream."""
        from .video2world_input import frames_to_model_input

        tok = self.tokenizer(num_video_frames)
        x = frames_to_model_input(frames, num_video_frames, height, width)
        z = tok.encode_views(x.to(self.device), frames.shape[0]).float() * SIGMA_DATA  # casts to its own dtype
        if self.offload:
            tok.to("cpu")
            free_accelerator_memory()
        return z.cpu()

    @torch.no_grad()
    def decode(self, latent: Tensor, num_video_frames: int) -> Tensor:
        """latent [1, 16, V*T', h, w] -> uint8 [V, T, 8h, 8w, 3] (CPU), one view at a time."""
        tok = self.tokenizer(num_video_frames)
        V = self.spec.n_views
        views = []
        for z in latent.reshape(16, V, -1, *latent.shape[-2:]).unbind(1):  # [16, T', h, w] per view
            x = tok.decode((z[None] / SIGMA_DATA).to(self.device)).float()  # [1, 3, T, H, W]
            views.append(((1.0 + x[0]).clamp(0, 2) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).cpu())
        if self.offload:
            tok.to("cpu")
            free_accelerator_memory()
        return torch.stack(views)

    # ------------------------------------------------------------------ all together
    def generate(self, prompt_sets: Sequence[dict[str, str]], *, seeds: Sequence[int], num_steps: int = 35,
                 guidance: float = 7.0, fps: float = 24.0, num_video_frames: int = 57, height: int = 480,
                 width: int = 848, frame_repeat_negative_condition: float = 10.0,
                 input_frames: Sequence[Tensor] | None = None, num_input_frames: int = 1) -> list[Tensor]:
        """One video per prompt set ({slot: text} covering every slot of the net); returns uint8 [V, T, H, W, 3]
        per set, views in the net's order. All prompts are encoded first, all latents sampled, then decoded.

        ``input_frames`` (Video2World nets): uint8 [V, N, H, W, 3] per prompt set; the first
        ``latent_frames_of_input(num_input_frames)`` latent frames of every view are conditioned on them
        (``num_input_frames=0``: none, the net's Text2World mode, which its training includes)."""
        if bool(self.spec.net_config.video2world) != (input_frames is not None):
            raise ValueError(f"{self.spec.weights}: a {'Video2World' if self.spec.net_config.video2world else 'Text2World'}"
                             f" net; " + ("input frames are required (mvmodel.inference.video2world_multiview)"
                                          if input_frames is None else "it takes no input frames"))
        slots = self.spec.slots
        for i, ps in enumerate(prompt_sets):
            missing = [s for s in slots if not (ps.get(s) or "").strip()]
            if missing:
                raise ValueError(f"prompt set {i}: no prompt for view slot(s) {missing} of the "
                                 f"{len(slots)}-view model (slots {list(slots)})")
        check_video_size(num_video_frames, height, width)
        check_sampling_options(num_steps, guidance, fps)
        if self.t5_dir is None or not (Path(self.t5_dir) / "config.json").is_file():  # before the DiT loads
            raise FileNotFoundError(f"{self.t5_dir}: no T5 checkpoint (config.json missing); pass --t5_dir")
        if self.cp_group is not None:
            check_context_parallel(self.spec.net_config, num_video_frames, height, width,
                                   dist.get_world_size(self.cp_group))
        # The DiT first: bad weights are refused before minutes of T5 loading (encode_prompts offloads it again).
        self.network()
        texts = [ps[s] for ps in prompt_sets for s in slots]
        emb = self.encode_prompts(texts) if self.is_lead else None
        if self.cp_group is not None:  # one T5 run; CPU tensors pickled (the backend moves them as needed)
            box = [emb]
            dist.broadcast_object_list(box, src=self.lead, group=self.cp_group,
                                       device=self.device if self.device.type == "cuda" else None)
            emb = box[0]
        fr = [frame_repeat_negative_condition if s in ("back_left", "back_right") else 0.0 for s in slots]
        latents = []
        for i, (ps, seed) in enumerate(zip(prompt_sets, seeds, strict=True)):
            text = torch.cat([emb[ps[s]] for s in slots])  # [V*512, D], view-major as the net expects
            video = None
            if input_frames is not None:
                from ..diffusion.video2world import inference_condition, latent_frames_of_input

                gt = self.encode_condition(input_frames[i], num_video_frames, height, width)
                n_t = latent_frames_of_input(num_input_frames) if num_input_frames else 0
                video = inference_condition(gt, self.spec.n_views, n_t, seed)
            log.info("sample %d/%d (seed %d)", i + 1, len(prompt_sets), seed)
            latents.append(self.sample(text, seed=seed, num_steps=num_steps, guidance=guidance, fps=fps,
                                       num_video_frames=num_video_frames, height=height, width=width,
                                       frame_repeat=fr, video=video))
        self.latents = latents  # [1, 16, V*T', h, w] per video (the same on every rank of a CP group)
        if not self.is_lead:
            return [None] * len(latents)
        return [self.decode(z, num_video_frames) for z in latents]

    def summary(self) -> dict[str, Any]:
        return {"weights": str(self.spec.weights), "config": self.spec.source, "n_views": self.spec.n_views,
                "slots": list(self.spec.slots), "device": str(self.device), "dtype": str(self.dtype),
                "precision": self.precision.mode}


def check_sampling_options(num_steps: int, guidance: float, fps: float | None) -> None:
    """Options that would silently give a NaN (all-black) or meaningless video are refused before any work
    (``fps`` None: not known yet)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"--num_steps {num_steps}: must be an integer >= 1")
    if not math.isfinite(guidance):
        raise ValueError(f"--guidance {guidance}: must be a finite number (0 = no guidance; upstream uses 7)")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"--fps {fps}: must be a finite number > 0 (the output frame rate and RoPE time scale)")


def check_context_parallel(net_config, num_video_frames: int, height: int, width: int, n: int) -> None:
    """Each view's tokens must split evenly over the ``n`` ranks (``--num_gpus``)."""
    t = (1 + (num_video_frames - 1) // 8) // net_config.patch_temporal
    per_view = t * (height // 8 // net_config.patch_spatial) * (width // 8 // net_config.patch_spatial)
    if per_view % n:
        raise ValueError(f"--num_gpus {n}: each view has {per_view} tokens ({num_video_frames} frames at "
                         f"{height}x{width}), not divisible by {n}; choose --num_gpus dividing {per_view}")


def check_video_size(num_video_frames: int, height: int, width: int) -> None:
    if num_video_frames < 1 or (num_video_frames - 1) % 8:
        raise ValueError(f"--num_video_frames {num_video_frames}: must be 1 + a multiple of 8 (the causal "
                         f"tokenizer's 8x time compression), e.g. 57")
    if height < 16 or width < 16 or height % 16 or width % 16:
        raise ValueError(f"--height {height} / --width {width}: must be multiples of 16 (8x tokenizer x 2x2 patches)")
