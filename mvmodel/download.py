"""Download the checkpoints the 7B multi-view pipeline needs (upstream's download script, our module name).

    python -m mvmodel.download --model_sizes 7B --model_types Text2World-Sample-AV-Multiview --checkpoint_dir checkpoints
    python -m mvmodel.download --model_sizes 7B --model_types Video2World-Sample-AV-Multiview --checkpoint_dir checkpoints

Fetches from the Hugging Face Hub, into the folder layout the inference CLI and the trainer read:

    checkpoints/Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview/model.pt   the diffusion transformer (DiT)
    checkpoints/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview/model.pt  the Video2World DiT (when asked for)
    checkpoints/Cosmos-Tokenize1-CV8x8x8-720p/{encoder,decoder}.jit, mean_std.pt   the video tokenizer
    checkpoints/google-t5/t5-11b/                                           the T5-XXL text encoder
    checkpoints/meta-llama/Llama-Guard-3-8B/                                the prompt guardrail (gated, ~16 GB)
    checkpoints/nvidia/Cosmos-Guardrail1/                                   blocklists, video filter, face blur

Only the files the pipeline reads are fetched (no prompt upsampler, TensorFlow/Flax weights, unused
autoencoder.jit or Llama Guard's ``original/`` consolidated copy). The guardrail models are fetched as upstream's
script does, since generation runs them by default; ``--skip_guardrail`` leaves them out (then generate with
``--disable_guardrail``). Interrupted downloads resume where they stopped when the command is run again
(``huggingface_hub`` keeps partial files under ``<folder>/.cache/huggingface``). ``--dry_run`` lists the files and
sizes without downloading. ``--from_dir PATH`` imports an existing copy (same layout, e.g. another machine's
``checkpoints/``) without network: files are checked, the DiT's tensor names and shapes are compared with our
model, and the files are hard-linked (copied across file systems) into ``--checkpoint_dir``.

The NVIDIA repositories are gated: accept the licence on each model page while logged in to huggingface.co, then
``hf auth login`` (or set ``HF_TOKEN``).
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

DIT_REPOS = {("7B", "Text2World-Sample-AV-Multiview"): "nvidia/Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview",
             ("7B", "Video2World-Sample-AV-Multiview"): "nvidia/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview"}
# The net each DiT repository's model.pt must fit (names and shapes checked after download / on --from_dir).
DIT_PRESETS = {"nvidia/Cosmos-Predict1-7B-Text2World-Sample-AV-Multiview": "cosmos_7b_multiview_6view",
               "nvidia/Cosmos-Predict1-7B-Video2World-Sample-AV-Multiview": "cosmos_7b_video2world_multiview_6view"}
DEFAULT_MODEL_TYPES = ["Text2World-Sample-AV-Multiview"]
TOKENIZER_REPO = "nvidia/Cosmos-Tokenize1-CV8x8x8-720p"
T5_REPO = "google-t5/t5-11b"
LLAMA_GUARD_REPO = "meta-llama/Llama-Guard-3-8B"
GUARDRAIL1_REPO = "nvidia/Cosmos-Guardrail1"
GUARDRAIL_REPOS = (LLAMA_GUARD_REPO, GUARDRAIL1_REPO)
MODEL_SIZES = sorted({s for s, _ in DIT_REPOS})
MODEL_TYPES = sorted({t for _, t in DIT_REPOS})

# What each component must hold once on disk (checked after a download and on --from_dir).
DIT_FILES = ("model.pt",)
TOKENIZER_FILES = ("encoder.jit", "decoder.jit", "mean_std.pt")
T5_FILES = ("config.json",)  # + weights and a tokenizer, checked by _t5_problems
T5_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
T5_TOKENIZERS = ("tokenizer.json", "spiece.model")
LLAMA_GUARD_FILES = ("config.json", "tokenizer_config.json")
GUARDRAIL1_FILES = ("video_content_safety_filter/safety_filter.pt", "face_blur_filter/Resnet50_Final.pth")


@dataclass
class Component:
    """One repository and the files of it we take."""

    what: str
    repo_id: str
    folder: str  # relative to --checkpoint_dir: the repository's name, as upstream's script lays it out
    patterns: tuple[str, ...]
    files: list[tuple[str, int | None]] = field(default_factory=list)  # (name, size in bytes) once listed

    @property
    def size(self) -> int:
        return sum(s or 0 for _, s in self.files)


def components(model_sizes: Iterable[str], model_types: Iterable[str], guardrail: bool = True) -> list[Component]:
    out = []
    for size in model_sizes:
        for typ in model_types:
            repo = DIT_REPOS.get((size, typ))
            if repo is None:
                raise ValueError(f"--model_sizes {size} --model_types {typ}: no such model; available: "
                                 + ", ".join(f"{s} {t}" for s, t in DIT_REPOS))
            out.append(Component("diffusion transformer", repo, repo.split("/")[1],
                                 ("model.pt", "config.json", "README.md")))
    out.append(Component("video tokenizer", TOKENIZER_REPO, TOKENIZER_REPO.split("/")[1],
                         ("encoder.jit", "decoder.jit", "mean_std.pt", "image_mean_std.pt", "README.md")))
    # T5-11B ships PyTorch, TensorFlow and Flax weights: take one PyTorch format (safetensors when present).
    out.append(Component("T5-XXL text encoder", T5_REPO, T5_REPO, ("config.json", "generation_config.json",
                         "tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json",
                         "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                         "pytorch_model.bin.index.json")))
    if guardrail:  # folders as upstream's script lays them out: <checkpoint_dir>/<org>/<repo>
        out.append(Component("guardrail: Llama Guard 3", LLAMA_GUARD_REPO, LLAMA_GUARD_REPO, (
            "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "model*.safetensors", "model.safetensors.index.json", "LICENSE", "README.md")))
        # The whole of the three folders: the SigLIP model inside is an HF cache layout (blobs + snapshots) that
        # the video filter reads as it is.
        out.append(Component("guardrail: blocklist, video filter, face blur", GUARDRAIL1_REPO, GUARDRAIL1_REPO,
                             ("blocklist/*", "video_content_safety_filter/*", "face_blur_filter/*", "README.md")))
    return out


def select_files(comp: Component, listing: list[tuple[str, int | None]]) -> list[tuple[str, int | None]]:
    """The files of ``listing`` (name, size) that match the component's patterns; one PyTorch weight format."""
    chosen = [(n, s) for n, s in listing if any(fnmatch.fnmatch(n, p) for p in comp.patterns)]
    if any(n.endswith(".safetensors") for n, _ in chosen):
        chosen = [(n, s) for n, s in chosen if not n.startswith("pytorch_model")]
    return chosen


def hub_listing(repo_id: str, token: str | None = None) -> list[tuple[str, int | None]]:
    """(file name, size) of every file of the repository's main revision."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, files_metadata=True, token=token)
    return [(s.rfilename, s.size) for s in info.siblings or []]


def plan(comps: list[Component], listing: Callable[[str], list[tuple[str, int | None]]] | None = None) -> list[Component]:
    """Fill each component's file list from ``listing(repo_id)`` (default: the Hub; tests inject a list)."""
    listing = listing or hub_listing
    for c in comps:
        c.files = select_files(c, listing(c.repo_id))
        missing = [f for f in _required(c) if f not in {n for n, _ in c.files}]
        if missing:
            raise ValueError(f"{c.repo_id}: the repository has no {', '.join(missing)} (expected for the {c.what})")
    return comps


def _required(c: Component) -> tuple[str, ...]:
    if c.repo_id == LLAMA_GUARD_REPO:
        return LLAMA_GUARD_FILES
    if c.repo_id == GUARDRAIL1_REPO:
        return GUARDRAIL1_FILES
    return DIT_FILES if c.repo_id in DIT_REPOS.values() else TOKENIZER_FILES if c.repo_id == TOKENIZER_REPO else T5_FILES


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def describe(comps: list[Component], checkpoint_dir: Path) -> str:
    lines = []
    for c in comps:
        lines.append(f"{c.what}: {c.repo_id} -> {checkpoint_dir / c.folder}  ({human(c.size)})")
        lines += [f"    {n:40s} {human(s or 0):>10s}" for n, s in c.files]
    lines.append(f"total {human(sum(c.size for c in comps))}")
    return "\n".join(lines)


def hub_error_message(exc: Exception, repo_id: str) -> str | None:
    """One line for the Hub errors a user can fix (login, licence, network); None for anything else."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    url = f"https://huggingface.co/{repo_id}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    logged_in = _token() is not None
    if isinstance(exc, GatedRepoError) or status == 403:
        if not logged_in:
            return f"{repo_id} is gated and you are not logged in: accept its licence at {url}, then run " \
                   f"`hf auth login` (or set HF_TOKEN) and retry"
        return f"{repo_id} is gated and your account has not been granted access: accept the licence at {url} " \
               f"with the account of your token, then retry"
    if isinstance(exc, RepositoryNotFoundError) or status == 401:
        if not logged_in:
            return f"{repo_id}: not found or needs a login (HTTP {status or 401}): run `hf auth login` (or set " \
                   f"HF_TOKEN), accept the licence at {url}, and retry"
        return f"{repo_id}: not found, or your token may not read it (HTTP {status}): check {url}"
    network = type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3", "socket")
    if network or isinstance(exc, LocalEntryNotFoundError) or (isinstance(exc, OSError) and not isinstance(exc, HfHubHTTPError)):
        return f"{repo_id}: cannot reach huggingface.co ({type(exc).__name__}: {exc}); retry when online (the " \
               f"download resumes), or import a local copy with --from_dir PATH"
    if isinstance(exc, HfHubHTTPError):
        return f"{repo_id}: the Hub answered HTTP {status}: {str(exc).splitlines()[0]}"
    return None


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


# ------------------------------------------------------------------------------------------------ checks
def dit_problems(model_pt: Path, net_config=None) -> list[str]:
    """Differences between ``model_pt``'s DiT tensors and our model's (names and shapes); [] when it fits.

    ``net_config``: the ``DiTConfig`` the file must match (default: the released 6-view 7B net). The file is
    memory-mapped, so a 14 GB checkpoint is checked without reading its weights.
    """
    import torch

    from .networks import MultiviewDiT, preset
    from .networks.checkpoint import read_state_dict, split_state_dict

    cfg = net_config or preset("cosmos_7b_multiview_6view")
    with torch.device("meta"):
        own = MultiviewDiT(cfg).state_dict()
    try:
        net_sd, _, _, other = split_state_dict(read_state_dict(model_pt))
    except (ValueError, FileNotFoundError) as exc:
        return [str(exc)]
    problems = []
    missing = [k for k in own if k not in net_sd and k != "pos_embedder.seq"]
    unexpected = [k for k in net_sd if k not in own] + other
    wrong = [f"{k}: {list(net_sd[k].shape)} (ours {list(v.shape)})" for k, v in own.items()
             if k in net_sd and tuple(net_sd[k].shape) != tuple(v.shape)]
    for name, items in (("missing tensors", missing), ("tensors our model does not have", unexpected),
                        ("shape mismatches", wrong)):
        if items:
            problems.append(f"{model_pt}: {len(items)} {name}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
    return problems


def _dit_config(repo_id: str):
    from .networks import preset

    return preset(DIT_PRESETS[repo_id])


def _t5_problems(folder: Path) -> list[str]:
    out = []
    if not any((folder / f).is_file() for f in T5_WEIGHTS):
        out.append(f"{folder}: no T5 weights (expected one of {', '.join(T5_WEIGHTS)})")
    if not any((folder / f).is_file() for f in T5_TOKENIZERS):
        out.append(f"{folder}: no T5 tokenizer (expected {' or '.join(T5_TOKENIZERS)})")
    return out


def check_layout(checkpoint_dir: Path, comps: list[Component], net_config=None) -> list[str]:
    """Every problem of ``checkpoint_dir`` for these components: missing files, DiT keys/shapes."""
    problems = []
    for c in comps:
        folder = checkpoint_dir / c.folder
        missing = [f for f in _required(c) if not (folder / f).is_file()]
        if missing:
            problems.append(f"{folder}: missing {', '.join(missing)} (the {c.what}, {c.repo_id})")
            continue
        if c.repo_id == T5_REPO:
            problems += _t5_problems(folder)
        elif c.repo_id in GUARDRAIL_REPOS:
            from .guardrail import missing_files

            root = checkpoint_dir  # the guardrail checks take the folder holding both repositories
            prefix = str(folder)
            problems += [f"missing {m} (the {c.what}, {c.repo_id})" for m in missing_files(root)
                         if m.startswith(prefix)]
        elif c.repo_id in DIT_REPOS.values():
            problems += dit_problems(folder / "model.pt", net_config or _dit_config(c.repo_id))
    return problems


def import_local(src: Path, dst: Path, comps: list[Component], net_config=None) -> int:
    """Check ``src`` (upstream's layout), then hard-link (or copy) its component folders into ``dst``. -> files."""
    problems = check_layout(src, comps, net_config)
    if problems:
        raise ValueError(f"--from_dir {src}: " + "; ".join(problems))
    if src.resolve() == dst.resolve():
        return 0
    n = 0
    for c in comps:
        for path in sorted((src / c.folder).rglob("*")):
            if not path.is_file() or ".cache" in path.relative_to(src / c.folder).parts:
                continue
            target = dst / c.folder / path.relative_to(src / c.folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                if target.stat().st_size == path.stat().st_size:
                    continue  # already imported (a re-run)
                target.unlink()
            try:
                os.link(path, target)  # no second copy of 60 GB when both are on one file system
            except OSError:
                shutil.copy2(path, target)
            n += 1
    return n


def download(comps: list[Component], checkpoint_dir: Path) -> None:
    from huggingface_hub import snapshot_download

    for c in comps:
        print(f"[mvmodel.download] {c.what}: {c.repo_id} ({human(c.size)}) -> {checkpoint_dir / c.folder}", flush=True)
        try:
            snapshot_download(c.repo_id, local_dir=checkpoint_dir / c.folder, allow_patterns=[n for n, _ in c.files])
        except Exception as exc:  # noqa: BLE001
            msg = hub_error_message(exc, c.repo_id)
            if msg is None:
                raise
            if c.repo_id in GUARDRAIL_REPOS:
                msg += "; or pass --skip_guardrail to download without the guardrail models"
            raise ValueError(msg) from exc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mvmodel.download", description=__doc__.split("\n\n")[0],
                                 epilog="Gated NVIDIA repositories: accept each licence on huggingface.co and log in "
                                        "(`hf auth login` or HF_TOKEN) first.")
    ap.add_argument("--model_sizes", nargs="+", default=["7B"], choices=MODEL_SIZES, help="default: 7B")
    ap.add_argument("--model_types", nargs="+", default=DEFAULT_MODEL_TYPES, choices=MODEL_TYPES,
                    help=f"default: {' '.join(DEFAULT_MODEL_TYPES)} (the Video2World DiT only when asked for)")
    ap.add_argument("--checkpoint_dir", default="checkpoints", help="where the model folders go (default: checkpoints)")
    ap.add_argument("--dry_run", action="store_true", help="list the files and sizes that would be downloaded")
    ap.add_argument("--from_dir", default=None, metavar="PATH",
                    help="import an existing copy in the same layout (offline): check it, then link it in")
    ap.add_argument("--skip_guardrail", action="store_true",
                    help=f"leave out the guardrail models ({' and '.join(GUARDRAIL_REPOS)}); generation then needs "
                         f"--disable_guardrail")
    a = ap.parse_args(argv)
    dst = Path(a.checkpoint_dir)
    try:
        comps = components(a.model_sizes, a.model_types, guardrail=not a.skip_guardrail)
        if a.from_dir:
            src = Path(a.from_dir)
            if not src.is_dir():
                raise ValueError(f"--from_dir {src}: no such folder")
            n = import_local(src, dst, comps)
            print(f"[mvmodel.download] {src}: all files present, DiT tensor names and shapes match our model; "
                  f"{n} file(s) linked into {dst}")
            return 0
        try:
            plan(comps)
        except Exception as exc:  # noqa: BLE001
            repo = getattr(exc, "repo_id", None) or _failing_repo(comps)
            msg = hub_error_message(exc, repo)
            if msg is None:
                raise
            if repo in GUARDRAIL_REPOS:
                msg += "; or pass --skip_guardrail to download without the guardrail models"
            raise ValueError(msg) from exc
        print(describe(comps, dst), flush=True)
        if a.dry_run:
            print("[mvmodel.download] dry run: nothing downloaded")
            return 0
        download(comps, dst)
        problems = check_layout(dst, comps)
        if problems:
            raise ValueError("downloaded files do not check out: " + "; ".join(problems))
        print(f"[mvmodel.download] done: {dst} holds the DiT, the tokenizer, T5"
              f"{'' if a.skip_guardrail else ' and the guardrail models'} in the layout "
              f"python -m mvmodel.inference.text2world_multiview --checkpoint_dir {dst} reads")
        return 0
    except ValueError as exc:
        print(f"mvmodel.download: error: {exc}", file=sys.stderr)
        return 2


def _failing_repo(comps: list[Component]) -> str:
    """The first component not listed yet (plan() fills them in order)."""
    return next((c.repo_id for c in comps if not c.files), comps[0].repo_id)


if __name__ == "__main__":
    sys.exit(main())
