"""T5 embedding preprocessing for an upstream-layout dataset.

    python -m mvmodel.data.t5_embeddings --dataset_path DIR [--prompt "A video of car driving on the road."]
                                         [--t5_dir checkpoints/google-t5/t5-11b] [--view_keys a,b,...]

For every ``videos/<view>/<clip>.mp4``: writes ``metas/<view>/<clip>.txt`` holding ``--prompt`` when it is
missing, then ``t5_xxl/<view>/<clip>.pickle`` with the caption's embedding; for every view,
``cache/prefix_t5_embeddings_<view>.pickle`` with its camera-prefix prompt. Existing pickles are kept unless
``--overwrite``. Encoding as upstream: tokenizer with ``max_length=512`` (truncation, padding to 512), the
encoder's ``last_hidden_state`` in fp32, rows past the valid length (EOS included) zeroed, cast to float16,
trimmed to the valid length, pickled as ``[array(L, 1024)]``. The names are the ones
:class:`mvmodel.data.MultiviewDataset` reads.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..device import resolve_device
from . import layout

log = logging.getLogger("mvmodel.data")
DEFAULT_T5_DIR = "checkpoints/google-t5/t5-11b"
DEFAULT_PROMPT = "A video of car driving on the road."


class T5TextEncoder:
    """``transformers`` T5 encoder + tokenizer loaded from a local folder (no downloads)."""

    def __init__(self, t5_dir: str | Path = DEFAULT_T5_DIR, device: str | None = None,
                 dtype: torch.dtype = torch.float32, max_length: int = layout.T5_MAX_LENGTH):
        t5_dir = Path(t5_dir)
        if not (t5_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{t5_dir}: no T5 checkpoint (config.json missing). Put google-t5/t5-11b there or pass --t5_dir; "
                f"for tests and demos build a tiny one with python -m mvmodel.data.tiny_t5 --out DIR")
        from transformers import T5EncoderModel  # noqa: PLC0415

        try:
            from transformers import T5TokenizerFast  # noqa: PLC0415

            self.tokenizer = T5TokenizerFast.from_pretrained(str(t5_dir), model_max_length=max_length,
                                                             local_files_only=True)
        except Exception:  # a folder with only a slow sentencepiece tokenizer
            from transformers import AutoTokenizer  # noqa: PLC0415

            self.tokenizer = AutoTokenizer.from_pretrained(str(t5_dir), model_max_length=max_length,
                                                           local_files_only=True)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = T5EncoderModel.from_pretrained(str(t5_dir), local_files_only=True)
        self.model = self.model.to(self.device, dtype).eval().requires_grad_(False)
        self.max_length = max_length

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Embeddings of ``texts``: one float16 ``[L_i, D]`` array each (L_i valid tokens, EOS included)."""
        enc = self.tokenizer(list(texts), truncation=True, padding="max_length", max_length=self.max_length,
                             return_tensors="pt", return_length=True)
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        lengths = mask.sum(dim=1).tolist()
        hidden = hidden * mask[..., None].to(hidden.dtype)  # zero the padding rows, as upstream
        out = hidden.to(torch.float16).cpu().numpy()
        return [out[i, :n] for i, n in enumerate(lengths)]


def encode_dataset(dataset_path: str | Path, encoder: T5TextEncoder, prompt: str = DEFAULT_PROMPT,
                   view_keys: Sequence[str] | None = None, overwrite: bool = False, batch_size: int = 16) -> dict:
    """Write metas (if missing), per-clip and per-view prefix pickles; returns counts of what was written."""
    root = Path(dataset_path)
    views = list(view_keys) if view_keys else layout.list_views(root)
    jobs: list[tuple[Path, str]] = []  # (pickle path, text)
    metas_written = clips = 0
    for view in views:
        for clip in layout.list_clips(root, view):
            clips += 1
            mp = layout.meta_path(root, view, clip)
            if not mp.exists():
                mp.parent.mkdir(parents=True, exist_ok=True)
                mp.write_text(prompt + "\n", encoding="utf-8")
                metas_written += 1
            out = layout.t5_path(root, view, clip)
            if overwrite or not out.exists():
                jobs.append((out, layout.read_caption(mp)))
        out = layout.prefix_path(root, view)
        if overwrite or not out.exists():
            jobs.append((out, layout.prefix_prompt(view)))
    unique = sorted({text for _, text in jobs})  # many clips share a caption: encode each text once
    emb: dict[str, np.ndarray] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i:i + batch_size]
        emb.update(zip(chunk, encoder.encode(chunk)))
    for path, text in jobs:
        layout.write_embedding(path, emb[text])
    return {"views": len(views), "clips": clips, "metas_written": metas_written, "pickles_written": len(jobs),
            "texts_encoded": len(unique)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mvmodel.data.t5_embeddings",
                                 description="Write T5 embeddings for an upstream-layout multi-view dataset.")
    ap.add_argument("--dataset_path", required=True)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="caption written to metas/ where one is missing")
    ap.add_argument("--t5_dir", default=DEFAULT_T5_DIR, help="local folder with the T5 encoder and tokenizer")
    ap.add_argument("--view_keys", default=None, help="comma-separated views (default: every videos/ folder)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    try:  # user errors (missing folders, bad layout, a device that is not there): one line, not a traceback
        if a.batch_size < 1:
            raise ValueError(f"--batch_size {a.batch_size}: expected a count >= 1")
        device = str(resolve_device(a.device))
        if not Path(a.dataset_path, "videos").is_dir():
            raise FileNotFoundError(f"--dataset_path {a.dataset_path}: no videos/ folder (expected upstream's "
                                    f"layout videos/<view>/<clip>.mp4)")
        encoder = T5TextEncoder(a.t5_dir, device, getattr(torch, a.dtype))
        views = [v for v in a.view_keys.split(",") if v] if a.view_keys else None
        n = encode_dataset(a.dataset_path, encoder, a.prompt, views, a.overwrite, a.batch_size)
    except (ValueError, FileNotFoundError) as exc:
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    # Captions already in metas/ (the usual case: the dataset ships them) are used as they are; only missing ones
    # get --prompt, so say both counts rather than "wrote 0 captions".
    kept = n["clips"] - n["metas_written"]
    print(f"{a.dataset_path}: {n['views']} views, {n['clips']} clip captions ({kept} from metas/, "
          f"{n['metas_written']} written with --prompt); wrote {n['pickles_written']} pickles "
          f"({n['texts_encoded']} distinct texts encoded)")


if __name__ == "__main__":
    main()
