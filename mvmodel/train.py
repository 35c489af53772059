"""Training entry point (upstream's command shape, our module names)::

    torchrun --nproc_per_node=8 -m mvmodel.train --config=mvmodel/configs/multiview.py -- \
        experiment=text2world_multiview_7b_example_waymo [section.key=value ...]

Multi-node: torchrun's rendezvous flags (--nnodes, --rdzv_backend, --rdzv_endpoint). ``--dryrun`` prints the
composed config and exits. Outputs go to ``${OUTPUT_ROOT:-checkpoints}/{project}/{group}/{name}/``.
"""
from __future__ import annotations

import contextlib
import json
import sys

from .configs import make_config, parse_cli


def main(argv: list[str] | None = None) -> dict | None:
    try:
        config_file, experiment, overrides, dryrun = parse_cli(sys.argv[1:] if argv is None else argv)
        cfg = make_config(config_file, experiment, overrides)
    except (ValueError, FileNotFoundError) as exc:
        if argv is not None:
            raise
        sys.exit(f"mvmodel.train: error: {exc}")
    if dryrun:
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        return None
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
