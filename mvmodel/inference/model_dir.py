"""Which network a checkpoint directory holds, and which prompt drives each of its views.

A model directory is ``<checkpoint_dir>/<diffusion_transformer_dir>/`` (cosmos-multiview.md §9.4) holding
``model.pt`` (a flat state dict with upstream's ``net.*`` keys) and, for our checkpoints, ``mvworld.json``::

    {"format": "mvworld.model/1",
     "net": {"preset": "cosmos_7b_multiview_waymo", "overrides": {...}}   # or every DiTConfig field by name
     "camera_names": ["pinhole_front_left", ...],   # optional: the net's view order (default: the net config's)
     "prompt_slots": ["left", "front", ...],        # optional: the prompt of each view (default: from the names)
     "fps": 10, "num_video_frames": 57, "height": 480, "width": 848,   # optional inference defaults
     "tokenizer_dir": null}                         # optional: relative to the model directory, or "builtin"

Without ``mvworld.json`` (the released model, or a ``_post-trained`` copy made as upstream's guide says) the net
is one of the two 7B layouts, told apart by the checkpoint's view-embedding shape: [6, 6] with the repeat-frame
embedding = the released 6-view net, [5, 3] without it = the Waymo 5-view post-training net. Also accepted: a
``.pt`` file, or a trainer job folder (``config.json`` + ``checkpoints/``), whose newest EMA checkpoint is used.

Prompt slots are upstream's prompt arguments: front (``--prompt``), left, right, back, back_left, back_right. A
camera's slot comes from the direction words of its name (``pinhole_front_left`` -> left, ``pinhole_side_right``
-> back_right, as upstream's 5-view inference places the side cameras), so the view order of training never
decides which prompt a view gets (spec §11.5).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..networks import DiTConfig, preset
from ..networks.checkpoint import read_state_dict, split_state_dict

log = logging.getLogger(__name__)

CONFIG_NAME = "mvworld.json"
FORMAT = "mvworld.model/1"
RELEASED_NAME = "Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview"
RELEASED_V2W_NAME = "Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview"
SLOTS = ("front", "left", "right", "back", "back_left", "back_right")
SLOT_ARGS = {"front": "prompt", "left": "prompt_left", "right": "prompt_right", "back": "prompt_back",
             "back_left": "prompt_back_left", "back_right": "prompt_back_right"}
INFERENCE_DEFAULTS = {"fps": 24.0, "num_video_frames": 57, "height": 480, "width": 848}
_ITER_EMA = re.compile(r"^iter_(\d{9})_ema_model\.pt$")


@dataclass
class ModelSpec:
    """What to build and how to drive it. ``slots[v]`` is the prompt slot of net view ``v``."""

    weights: Path
    net_config: DiTConfig
    slots: tuple[str, ...]
    source: str
    defaults: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: str | None = None  # from the model's config; "builtin" or a path; None = not specified
    lora: dict[str, Any] | None = None
    """A LoRA job's adapters: {"adapters": file, "rank", "alpha", "targets"}; ``weights`` is then the frozen base
    (the job's ``checkpoint.load_path``) they are added to."""

    @property
    def n_views(self) -> int:
        return self.net_config.n_views


def slot_of_camera(name: str) -> str:
    """``pinhole_front_left`` -> "left", ``camera_back`` -> "back", ``pinhole_side_right`` -> "back_right"."""
    words = set(re.split(r"[^a-z]+", name.lower()))
    if "rear" in words:
        words.add("back")
    side = "left" if "left" in words else "right" if "right" in words else None
    if "back" in words or ("side" in words and side):
        return f"back_{side}" if side else "back"
    if side:
        return side
    if "front" in words or "center" in words:
        return "front"
    raise ValueError(f"camera name {name!r} has no direction word (front, back/rear, left, right, side): set "
                     f"\"prompt_slots\" in {CONFIG_NAME} to say which prompt ({', '.join(SLOTS)}) drives it")


def _slots(names, explicit, where: str) -> tuple[str, ...]:
    slots = tuple(explicit) if explicit is not None else tuple(slot_of_camera(n) for n in names)
    bad = [s for s in slots if s not in SLOTS]
    if bad:
        raise ValueError(f"{where}: unknown prompt slots {bad}; expected some of {list(SLOTS)}")
    if len(set(slots)) != len(slots):
        raise ValueError(f"{where}: two views share a prompt slot: {list(zip(names or slots, slots))}")
    return slots


def _net_from_json(net: Any, where: str) -> DiTConfig:
    if not isinstance(net, dict):
        raise ValueError(f"{where}: \"net\" must be an object, got {type(net).__name__}")
    try:
        if "preset" in net:
            extra = set(net) - {"preset", "overrides"}
            if extra:
                raise ValueError(f"unexpected keys {sorted(extra)} beside \"preset\"/\"overrides\"")
            return preset(net["preset"], **dict(net.get("overrides") or {}))
        return DiTConfig(**net)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad \"net\" description: {exc}") from exc


def net_config_to_json(cfg: DiTConfig) -> dict[str, Any]:
    """Every DiTConfig field (tuples as lists); ``attention_backend`` is a runtime choice and is left out."""
    out = {}
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        if f.name == "attention_backend" or (f.name == "self_attn_connectivity" and not isinstance(val, str)):
            continue
        out[f.name] = list(val) if isinstance(val, tuple) else val
    return out


def infer_released_config(state_dict: dict[str, Any], where: str) -> DiTConfig:
    """The 7B layout a config-less checkpoint has (by shapes only; works on meta/mmapped tensors)."""
    net, _, _, _ = split_state_dict(state_dict)
    ve, xe = net.get("view_embeddings.weight"), net.get("x_embedder.proj.1.weight")
    if ve is None or xe is None:
        raise ValueError(f"{where}: not a multi-view DiT checkpoint (no net.view_embeddings.weight / "
                         f"net.x_embedder.proj.1.weight among its {len(state_dict)} keys)")
    n_blocks = len({k.split(".")[1] for k in net if k.startswith("blocks.")})
    shape, width, repeat = tuple(ve.shape), xe.shape[0], "repeat_frame_embedding.weight" in net
    # Video2World nets have one more patch-embed input channel (the condition mask): p*p*r = 4 more columns.
    v2w = xe.shape[1] == (16 + 1 + 1 + shape[1]) * 4
    if width == 4096 and n_blocks == 28 and shape == (6, 6) and repeat:
        return preset("cosmos_7b_multiview_6view", video2world=v2w)
    if width == 4096 and n_blocks == 28 and shape == (5, 3) and not repeat:
        return preset("cosmos_7b_multiview_waymo", video2world=v2w)
    raise ValueError(f"{where}: no {CONFIG_NAME} beside it and the net (width {width}, {n_blocks} blocks, view "
                     f"embedding {list(shape)}, repeat-frame embedding {repeat}) is neither the released 6-view 7B "
                     f"nor the 5-view Waymo 7B; write {CONFIG_NAME} describing it (see mvmodel.inference.model_dir)")


def _from_mvworld_json(path: Path, weights: Path) -> ModelSpec:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: expected a JSON object with \"format\": \"{FORMAT}\"")
    cfg = _net_from_json(meta.get("net"), str(path))
    names = meta.get("camera_names") or cfg.camera_names
    if names is not None:
        if len(names) != cfg.n_views:
            raise ValueError(f"{path}: {len(names)} camera_names for a {cfg.n_views}-view net")
        cfg = cfg.replace(camera_names=tuple(names))
    explicit = meta.get("prompt_slots")
    if names is None and explicit is None:
        raise ValueError(f"{path}: give \"camera_names\" or \"prompt_slots\" so each view gets a prompt")
    slots = _slots(names, explicit, str(path))
    if len(slots) != cfg.n_views:
        raise ValueError(f"{path}: {len(slots)} prompt_slots for a {cfg.n_views}-view net")
    defaults = {k: meta[k] for k in INFERENCE_DEFAULTS if meta.get(k) is not None}
    tok = meta.get("tokenizer_dir")
    if tok and tok != "builtin" and not os.path.isabs(tok):
        tok = str(path.parent / tok)
    return ModelSpec(weights, cfg, slots, str(path), defaults, tok)


def _from_job(job: Path, weights: Path) -> ModelSpec:
    """A trainer job folder: ``config.json`` with model.net / model.net_overrides / data.*."""
    cfg_path = job / "config.json"
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
        model, data = d["model"], d.get("data", {})
        overrides = dict(model.get("net_overrides") or {})
        names = overrides.pop("camera_names", None) or data.get("view_keys")
        cfg = preset(model["net"], **overrides, **({"camera_names": tuple(names)} if names else {}))
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not a trainer job config (model.net, model.net_overrides): {exc}") from exc
    if cfg.camera_names is None:
        raise ValueError(f"{cfg_path}: neither model.net_overrides.camera_names nor data.view_keys names the views")
    defaults = {}
    if data.get("num_frames"):
        defaults["num_video_frames"] = int(data["num_frames"])
    if data.get("video_size"):
        defaults["height"], defaults["width"] = (int(v) for v in data["video_size"])
    fps = _dataset_fps(data.get("dataset_dir"), (data.get("view_keys") or [None])[0])
    if fps:
        defaults["fps"] = fps
    tok = model.get("tokenizer_dir", "builtin") or "builtin"
    lora = None
    lo = model.get("lora") or {}
    if lo.get("enabled"):  # the checkpoint holds adapters only: the base is the file the job started from
        base = (d.get("checkpoint") or {}).get("load_path")
        if not base or str(base).lower() == "none":
            raise ValueError(f"{cfg_path}: a LoRA job trained on a random base (checkpoint.load_path none): there is "
                             f"no base to add its adapters {weights} to")
        if not Path(base).is_file() and (job / base).is_file():
            base = job / base
        if not Path(base).is_file():
            raise FileNotFoundError(f"{cfg_path}: the LoRA job's base checkpoint.load_path={base} is not there "
                                    f"(working directory {os.getcwd()}); run from the folder the job was trained in, "
                                    f"or merge it with python -m mvmodel.lora_merge --job {job} --base BASE --out DIR")
        lora = {"adapters": weights, "rank": int(lo.get("rank", 8)), "alpha": lo.get("alpha"),
                "targets": list(lo.get("targets") or ["to_q", "to_v"])}
        weights = Path(base)
    return ModelSpec(weights, cfg, _slots(cfg.camera_names, None, str(cfg_path)), str(cfg_path), defaults, tok, lora)


def _dataset_fps(dataset_dir: str | None, view: str | None) -> float | None:
    """fps of the job's training clips, when they are still there: the RoPE time scale at inference must be the
    one the net was trained with (spec §11.4), and the trainer config does not record it."""
    if not dataset_dir or not view:
        return None
    try:
        from ..data.decoders import probe

        first = min((Path(dataset_dir) / "videos" / view).glob("*.mp4"))
        return float(probe(first).fps) or None
    except (ValueError, OSError, ImportError):  # no clip left, unreadable, PyAV missing: the CLI default applies
        return None


def latest_ema(checkpoints: Path) -> Path:
    """The newest committed ``iter_{N:09d}_ema_model.pt`` of a trainer checkpoints folder.

    Our trainer commits a checkpoint set by writing ``iter_N_manifest.json`` last: an EMA file without one (a save
    killed before its set was complete) or whose size differs from its manifest is skipped with a warning naming
    it. Folders written without manifests (upstream, older versions) give their newest EMA file."""
    from ..trainer.checkpoint import manifest_name  # noqa: PLC0415 - the trainer's file naming

    found = sorted((int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _ITER_EMA.match(p.name)))
    if not found:
        raise FileNotFoundError(f"{checkpoints}: no iter_*_ema_model.pt checkpoint")
    if not any(checkpoints.glob("iter_*_manifest.json")):
        return found[-1][1]
    skipped = []
    for n, path in reversed(found):
        try:
            record = json.loads((checkpoints / manifest_name(n)).read_text())["files"][path.name]
        except (OSError, ValueError, KeyError, TypeError):
            skipped.append(f"{path.name} (no manifest lists it: its checkpoint set was never committed)")
            continue
        if record.get("size") != path.stat().st_size:
            skipped.append(f"{path.name} ({path.stat().st_size} bytes, its manifest says {record.get('size')})")
            continue
        if skipped:
            log.warning("using %s; skipped %s", path.name, "; ".join(skipped))
        return path
    raise FileNotFoundError(f"{checkpoints}: no committed EMA checkpoint: " + "; ".join(skipped))


def resolve_model(checkpoint_dir: str | os.PathLike, diffusion_transformer_dir: str) -> ModelSpec:
    """Locate the weights and describe the net for ``--checkpoint_dir`` / ``--diffusion_transformer_dir``."""
    root = Path(checkpoint_dir)
    target = Path(diffusion_transformer_dir)
    target = target if target.is_absolute() else root / target
    if not target.exists():
        have = sorted(p.name for p in root.iterdir()) if root.is_dir() else None
        where = f"--checkpoint_dir {root} does not exist" if have is None else f"{root} holds {have}"
        raise FileNotFoundError(f"model {target} not found ({where}); expected a folder with model.pt, e.g. "
                                f"{root / RELEASED_NAME}")
    if target.is_file():
        weights = target
        if (target.parent / CONFIG_NAME).is_file():
            return _from_mvworld_json(target.parent / CONFIG_NAME, weights)
        if target.parent.name == "checkpoints" and (target.parent.parent / "config.json").is_file():
            return _from_job(target.parent.parent, weights)
    elif (target / "model.pt").is_file():
        weights = target / "model.pt"
        if (target / CONFIG_NAME).is_file():
            return _from_mvworld_json(target / CONFIG_NAME, weights)
    elif (target / "checkpoints").is_dir() and (target / "config.json").is_file():
        return _from_job(target, latest_ema(target / "checkpoints"))
    elif target.name == "checkpoints" and (target.parent / "config.json").is_file():
        return _from_job(target.parent, latest_ema(target))
    else:
        raise FileNotFoundError(f"{target}: no model.pt (nor a trainer job's config.json + checkpoints/); expected "
                                f"{target / 'model.pt'} (+ {CONFIG_NAME} for post-trained nets)")
    sd = read_state_dict(weights)  # memory-mapped: only shapes are looked at
    cfg = infer_released_config(sd, str(weights))
    return ModelSpec(weights, cfg, _slots(cfg.camera_names, None, str(weights)), f"{weights} (shapes)", {}, None)


def write_model_dir(out_dir: str | os.PathLike, weights: str | os.PathLike, net_config: DiTConfig, *,
                    prompt_slots: list[str] | None = None, tokenizer_dir: str | None = None, link: bool = True,
                    **defaults: Any) -> Path:
    """Make ``out_dir`` loadable by the CLI: ``model.pt`` (hard link when possible, else a copy) + mvworld.json.

    ``defaults``: fps, num_video_frames, height, width (inference defaults for this net).
    """
    bad = set(defaults) - set(INFERENCE_DEFAULTS)
    if bad:
        raise ValueError(f"unknown inference defaults {sorted(bad)}; expected some of {sorted(INFERENCE_DEFAULTS)}")
    if net_config.camera_names is None and prompt_slots is None:
        raise ValueError("the net config has no camera_names: pass prompt_slots")
    _slots(net_config.camera_names, prompt_slots, "write_model_dir")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / "model.pt"
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        if not link:
            raise OSError
        os.link(weights, dst)
    except OSError:
        shutil.copyfile(weights, dst)
    meta = {"format": FORMAT, "net": net_config_to_json(net_config), "camera_names":
            list(net_config.camera_names) if net_config.camera_names else None, "prompt_slots": prompt_slots,
            "tokenizer_dir": tokenizer_dir, **defaults}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> None:
    """``python -m mvmodel.inference.model_dir --job JOB --out checkpoints/NAME [--iteration N] [--fps 10]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mvmodel.inference.model_dir",
                                 description="Turn a trainer job's EMA checkpoint into an inference model folder.")
    ap.add_argument("--job", required=True, help="trainer job folder (config.json + checkpoints/)")
    ap.add_argument("--out", required=True, help="e.g. checkpoints/Cosmos-Predict1-7B-Text2World-Sample-AV-"
                                                 "Multiview_post-trained")
    ap.add_argument("--iteration", type=int, default=None, help="default: the newest EMA checkpoint")
    ap.add_argument("--fps", type=float, default=None, help="inference fps default (training data's fps, e.g. 10)")
    a = ap.parse_args(argv)
    if a.fps is not None and not (math.isfinite(a.fps) and a.fps > 0):
        ap.error(f"--fps {a.fps}: expected a finite number > 0")
    if a.iteration is not None and a.iteration < 0:
        ap.error(f"--iteration {a.iteration}: expected an iteration number >= 0")
    job = Path(a.job)
    ck = job / "checkpoints"
    try:  # user errors: one line, not a traceback
        if not ck.is_dir():
            raise FileNotFoundError(f"--job {job}: no checkpoints/ folder (expected a trainer job folder)")
        weights = ck / f"iter_{a.iteration:09d}_ema_model.pt" if a.iteration is not None else latest_ema(ck)
        if not weights.is_file():
            raise FileNotFoundError(f"--iteration {a.iteration}: {weights} does not exist")
        spec = _from_job(job, weights)
        if spec.lora is not None:
            raise ValueError(f"--job {job} is a LoRA job (its checkpoints hold adapters only): write a full model "
                             f"with python -m mvmodel.lora_merge --job {job} --out {a.out}")
    except (ValueError, FileNotFoundError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    defaults = dict(spec.defaults)
    if a.fps is not None:  # --fps overrides the fps probed from the job's training clips
        defaults["fps"] = a.fps
    tok = spec.tokenizer_dir if spec.tokenizer_dir == "builtin" else (
        os.path.abspath(spec.tokenizer_dir) if spec.tokenizer_dir else None)
    out = write_model_dir(a.out, weights, spec.net_config, tokenizer_dir=tok, **defaults)
    print(f"{out}: model.pt <- {weights}; {CONFIG_NAME} ({spec.n_views} views, slots {list(spec.slots)})")


if __name__ == "__main__":
    main()
