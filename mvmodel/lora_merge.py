"""Merge a LoRA job's adapters into its base: a full ``model.pt`` that upstream's and our inference CLIs load.

usage: python -m mvmodel.lora_merge --job JOB --out DIR [--iteration N] [--base FILE] [--weights ema|reg] [--fps F]

Each adapted weight becomes ``W + scale * B @ A`` (computed in fp32, stored in W's dtype); every other tensor of the
base is copied as it is, under the base file's own keys (upstream's ``net.*`` / ``logvar.*`` layout), so the output
replaces the base wherever that was used. DIR also gets ``mvworld.json`` (the job's net, cameras and inference
defaults), so ``python -m mvmodel.inference.text2world_multiview --checkpoint_dir PARENT
--diffusion_transformer_dir NAME`` runs it. Without merging, that CLI also runs the job folder itself (base +
adapters, unmerged).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def adapter_file(ck: Path, iteration: int | None, which: str) -> Path:
    from .inference.model_dir import latest_ema

    if iteration is None:
        ema = latest_ema(ck)  # the newest committed set
        iteration = int(ema.name[5:14])
    path = ck / f"iter_{iteration:09d}_{which}_model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such adapter checkpoint (--iteration {iteration}, --weights {which})")
    return path


def merge(job: Path, out: Path, iteration: int | None = None, base: str | None = None, which: str = "ema",
          fps: float | None = None) -> Path:
    """Write ``out/model.pt`` + ``out/mvworld.json``; returns ``out``."""
    import torch  # noqa: F401, PLC0415 - heavy: only once the arguments are valid

    from .inference.model_dir import write_model_dir
    from .networks.checkpoint import read_state_dict
    from .networks.lora import merge_state_dict
    from .trainer.checkpoint import atomic_save

    ck = job / "checkpoints"
    if not (job / "config.json").is_file() or not ck.is_dir():
        raise FileNotFoundError(f"--job {job}: not a trainer job folder (config.json + checkpoints/)")
    cfg = json.loads((job / "config.json").read_text())
    lo = (cfg.get("model") or {}).get("lora") or {}
    if not lo.get("enabled"):
        raise ValueError(f"--job {job}: not a LoRA job (model.lora.enabled is false in its config.json); its "
                         f"checkpoints are full models already (python -m mvmodel.inference.model_dir)")
    adapters_path = adapter_file(ck, iteration, which)
    base = base or (cfg.get("checkpoint") or {}).get("load_path")
    if not base or str(base).lower() == "none" or not os.path.isfile(base):
        raise FileNotFoundError(f"base checkpoint {base!r} not found: pass --base FILE (the job's "
                                f"checkpoint.load_path, i.e. the weights its adapters were trained on)")
    alpha, rank = lo.get("alpha"), int(lo.get("rank", 8))
    scale = 1.0 if alpha is None else float(alpha) / rank
    base_sd = read_state_dict(base)
    adapters = read_state_dict(adapters_path)
    if not any(k.startswith("net.") for k in base_sd):  # a bare net's dict: adapter keys without the prefix too
        adapters = {k[len("net."):] if k.startswith("net.") else k: v for k, v in adapters.items()}
    merged = merge_state_dict(base_sd, adapters, scale)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.pt.merging"
    atomic_save(merged, tmp)
    # The job's net description (cameras, inference defaults) without its LoRA part: the merged file is full.
    spec = _job_spec_without_lora(job, tmp)
    tok = spec.tokenizer_dir if spec.tokenizer_dir in (None, "builtin") else os.path.abspath(spec.tokenizer_dir)
    extra = {"fps": fps} if fps else {}
    write_model_dir(out, tmp, spec.net_config, tokenizer_dir=tok, **spec.defaults, **extra)
    tmp.unlink(missing_ok=True)
    return out


def _job_spec_without_lora(job: Path, weights: Path):
    import tempfile  # noqa: PLC0415

    from .inference.model_dir import _from_job  # noqa: PLC0415

    cfg = json.loads((job / "config.json").read_text())
    cfg["model"]["lora"] = {**cfg["model"]["lora"], "enabled": False}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        return _from_job(Path(tmp), weights)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mvmodel.lora_merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", required=True, help="the LoRA trainer job folder (config.json + checkpoints/)")
    ap.add_argument("--out", required=True, help="output model folder (model.pt + mvworld.json)")
    ap.add_argument("--iteration", type=int, default=None, help="default: the newest committed checkpoint")
    ap.add_argument("--base", default=None, help="base weights (default: the job's checkpoint.load_path)")
    ap.add_argument("--weights", choices=["ema", "reg"], default="ema",
                    help="which adapters: the EMA ones (default, as inference uses) or the trained (reg) ones")
    ap.add_argument("--fps", type=float, default=None, help="inference fps default (the training data's fps)")
    a = ap.parse_args(argv)
    try:
        out = merge(Path(a.job), Path(a.out), a.iteration, a.base, a.weights, a.fps)
    except (ValueError, FileNotFoundError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    print(f"{out / 'model.pt'}: base + adapters of {a.job} merged; {out / 'mvworld.json'} describes the net",
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
