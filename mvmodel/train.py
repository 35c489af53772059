"""Post-train a multi-view Text2World DiT (upstream's command shape, our module names).

usage: [torchrun --nproc_per_node=N] -m mvmodel.train --config=FILE [--dryrun] [--no_preflight] [--] \\
           experiment=NAME [section.key=value ...]

    torchrun --nproc_per_node=8 -m mvmodel.train --config=mvmodel/configs/multiview.py -- \\
        experiment=text2world_multiview_7b_example_waymo

options:
  -h, --help        show this help (with the experiments of --config when given) and exit
  --config=FILE     experiment module (a .py path or dotted module name) defining EXPERIMENTS
  --dryrun          print the composed config as JSON and exit
  --no_preflight    skip the checks of dataset, weights, tokenizer and memory made before the net is built
  experiment=NAME   one of the module's experiments
  section.key=value typed override, e.g. trainer.max_iter=100 optimizer.lr=1e-4 data.dataset_dir=datasets/x
                    (sections: job, data, model, optimizer, ema, checkpoint, parallel, trainer; LoRA:
                    model.lora.enabled=true model.lora.rank=8 ...; trainer.recipe=auto picks full/LoRA for the GPU)

Multi-node: torchrun's rendezvous flags (--nnodes, --rdzv_backend, --rdzv_endpoint). On a machine without a GPU
the processes use the CPU and gloo. Outputs go to ``${OUTPUT_ROOT:-checkpoints}/{project}/{group}/{name}/``
(config.json, metrics.jsonl, checkpoints/iter_*_{reg_model,ema_model,optim}.pt); the inference CLI reads that
job folder directly (``--checkpoint_dir`` = its parent, ``--diffusion_transformer_dir`` = the experiment name).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

from .configs import make_config, parse_cli
from .device import resolve_device
from .trainer.preflight import preflight

def _help(argv: list[str]) -> str:
    text = __doc__
    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_file is None and "--config" in argv[:-1]:
        config_file = argv[argv.index("--config") + 1]
    try:
        from .configs.base import load_experiments

        exps = load_experiments(config_file or "mvmodel/configs/multiview.py")
        text += f"\nexperiments of {config_file or 'mvmodel/configs/multiview.py'}:\n"
        for name, fn in exps.items():
            first = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            text += f"  {name:46s} {first}\n"
    except (ValueError, FileNotFoundError, ImportError) as exc:
        text += f"\n(cannot list experiments: {exc})\n"
    return text


def finished_note(cfg) -> str | None:
    """The one line to print when the job this command would resume already reached ``trainer.max_iter`` (a
    re-run of a finished command), else None. Decided from the checkpoint folder alone, before the dataset,
    net or processes are touched. Only a committed set counts (its manifest's sizes match; the full sha256 check
    stays with the resume, which falls back to an older set when this one is damaged: then there is work)."""
    from .trainer.checkpoint import Checkpointer, CheckpointError

    c, max_iter = cfg.checkpoint, cfg.trainer.max_iter
    if not c.resume or c.overwrite:  # a new run: the trainer refuses or moves the old files aside
        return None
    # A reader only (rank != 0): the writer's constructor deletes stray temporary files, which may belong to a run
    # still saving in this folder (the trainer's lock, not this check, refuses a second launch).
    cp = Checkpointer(cfg.job.path_local / "checkpoints", rank=1)
    try:
        n = cp.pointer()
    except CheckpointError:
        return None  # a broken pointer: the trainer's resume reports it
    if n is None or n < max_iter:
        return None
    intact = cp.verify(n, checksums=False) is None if n in cp.manifests() else cp.verify_legacy(n)
    if not intact:
        return None
    rel = "=" if n == max_iter else ">="
    return (f"nothing to do: job {cfg.job.name} already at iteration {n} {rel} trainer.max_iter={max_iter} "
            f"({cp.dir}); to train on: trainer.max_iter=M (M > {n}); to start over: checkpoint.overwrite=true or "
            f"another job.name")


def main(argv: list[str] | None = None) -> dict | None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(_help(args))
        if argv is not None:
            return None
        sys.exit(0)
    check = "--no_preflight" not in args
    args = [a for a in args if a != "--no_preflight"]
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        config_file, experiment, overrides, dryrun = parse_cli(args)
        cfg = make_config(config_file, experiment, overrides)
        if dryrun:
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
            return None
        # A wrong device is one line before anything is read or built (as every CLI's --device).
        resolve_device(cfg.trainer.device, "trainer.device")
        done = finished_note(cfg)
        if done:  # success, as a build tool re-run on a built target: scripts that re-run the command go on
            if is_main:
                print(f"mvmodel.train: {done}", flush=True)
            return None
        if check:
            from .trainer.checkpoint import Checkpointer

            resuming = cfg.checkpoint.resume and Checkpointer(cfg.job.path_local / "checkpoints").latest() is not None
            for line in preflight(cfg, resuming):
                if is_main:
                    print(f"[mvmodel.train] {line}", flush=True)
    except (ValueError, FileNotFoundError) as exc:
        if argv is not None:
            raise
        if is_main:
            print(f"mvmodel.train: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    from .trainer import Trainer  # heavy imports only once the command line is valid
    from .trainer.checkpoint import CheckpointError
    from .trainer.loop import TrainingError

    # Refusals and failures the user must act on: one line naming the file/setting, exit status 1.
    expected = (CheckpointError, TrainingError, ValueError, FileNotFoundError)
    try:
        trainer = Trainer(cfg)
    except expected as exc:
        if argv is not None:
            raise
        sys.exit(f"mvmodel.train: error: {exc}")
    try:
        summary = trainer.train()
    except (CheckpointError, TrainingError) as exc:
        try:
            trainer.close()
        except CheckpointError as late:  # a second write error while stopping: report it too
            exc = f"{exc}; also: {late}"
        if argv is not None:
            raise
        sys.exit(f"mvmodel.train: error: {exc}")
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to see
            trainer.close()
        raise
    trainer.close()
    return summary


if __name__ == "__main__":
    main()
