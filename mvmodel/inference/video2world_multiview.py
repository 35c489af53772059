"""Multi-view Video2World generation: continue every camera from its first frames (upstream's
``video2world_multiview.py`` CLI, Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview).

    python -m mvmodel.inference.video2world_multiview --checkpoint_dir checkpoints \
        --diffusion_transformer_dir Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview \
        --input_image_or_video_path input.mp4 --num_input_frames 9 --n_views 6 \
        --prompt "..." --prompt_left "..." --prompt_right "..." --prompt_back "..." \
        --prompt_back_left "..." --prompt_back_right "..." --video_save_name output

The Text2World CLI's machinery and flags (``mvmodel.inference.text2world_multiview``: model folders, T5, tokenizer,
``--num_gpus`` context parallelism under torchrun, ``--attention_backend``, ``--compile``, the same
``{name}.mp4`` / ``{name}_grid.mp4`` / ``{name}.txt`` outputs) plus the input:

* ``--input_image_or_video_path``: an mp4 with the views concatenated in time in prompt order (upstream's input
  and our own ``{name}.mp4``; the last ``--num_input_frames`` frames of each view are used), or a folder with one
  mp4 per camera (``<camera>.mp4``, or our dataset layout ``videos/<camera>/<clip>.mp4`` with ``--input_clip``;
  ``--input_start_frame`` picks the frames, default the last ones).
* ``--num_input_frames`` 1 or 9 (1 or 2 latent frames per view are given; the rest are generated).
* ``--batch_input_path``: JSONL as Text2World's, plus ``visual_input`` (the input path of that line).

Sampling (``mvmodel.diffusion.video2world``): the condition latents get sigma 0.001 noise, the guided output is
replaced there so x0 equals them, and the last step (sigma <= 0.001) denoises every frame; guidance differs only
in the text, as upstream.
"""
from __future__ import annotations

from .text2world_multiview import build_parser as _build_parser
from .text2world_multiview import main as _main
from .text2world_multiview import run as _run


def build_parser():
    return _build_parser(video2world=True)


def run(argv: list[str] | None = None):
    return _run(argv, video2world=True)


def main(argv: list[str] | None = None) -> None:
    _main(argv, video2world=True)


if __name__ == "__main__":
    main()
