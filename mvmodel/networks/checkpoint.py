"""Load upstream Cosmos checkpoints (and ours, same keys) into ``MultiviewDiT``, with camera-set remapping.

Accepted inputs: a path to a ``torch.save`` file or a state dict; flat or ``{"model": ...}`` (``{"state_dict": ...}``
too); bf16 or fp32; keys with or without the ``net.`` prefix (§4.3). ``*._extra_state`` (Transformer Engine FP8
state) is skipped, as are wrapper prefixes ``_orig_mod.`` / ``_checkpoint_wrapped_module.`` / ``_fsdp_wrapped_module.``.

Camera-set remapping (the Waymo post-training case: the 6-view release -> a 5-view net with view_condition_dim 3).
Upstream drops the two mismatched tensors and re-initialises them (§4.4); we keep what was pretrained:

* ``x_embedder.proj.1.weight`` [D, C*p*p*r] with channel-major features ``c*(p*p*r) + j``: the columns of the
  latent channels (0..15) and of the padding-mask channel (16) are copied unchanged.
* View channels: each target view is matched to a checkpoint view by camera name (``view_name_map``, default
  ``DEFAULT_CAMERA_MAP``). What the pretrained net adds for checkpoint view s is ``u_s = W_view . e_s`` per patch
  position (with ``e_s = view_embeddings[s] + repeat_frame_embedding.bias``, i.e. frame_repeat = 0, when the
  target has no repeat-frame embedding). With equal view_condition_dim the rows and view columns are copied as
  they are. Otherwise the target's view columns and embedding rows are set to the best rank-Dv factorisation
  (SVD) of the matched ``u_s``: exact when Dv >= the number of matched views, a least-squares fit otherwise
  (the relative error is in the report). New: the rows of target cameras without a match (fresh N(0,1)) and,
  when Dv grows, the extra dimensions (fresh rows, zero columns, so they start with no effect).

Default camera names: the release's views are ``front, front_left, front_right, back, back_left, back_right``
(§9.2). Waymo's ``pinhole_front/front_left/front_right`` map to ``front/front_left/front_right`` and
``pinhole_side_left/side_right`` to ``back_left/back_right``, the slots upstream's own 5-view inference gives
them (prompt_back_left/right as views 3 and 4, flagged by frame_repeat like the release's rear-side cameras).
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .config import RELEASED_6VIEW_CAMERAS
from .dit import MultiviewDiT

DEFAULT_CAMERA_MAP = {
    "pinhole_front": "front",
    "pinhole_front_left": "front_left",
    "pinhole_front_right": "front_right",
    "pinhole_side_left": "back_left",
    "pinhole_side_right": "back_right",
}
_WRAPPER = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


@dataclass
class LoadReport:
    """What a load did. ``ok`` is False when anything the model needs was not loaded."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    remapped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def _skip_reasons(self) -> str:
        """The skipped keys grouped by why they are not loaded."""
        groups: dict[str, list[str]] = {}
        for key in self.skipped:
            why = ("Transformer Engine FP8 state, no weights" if key.endswith("_extra_state") else
                   "EDM uncertainty head logvar.*, used in training only" if key.startswith("logvar.") else
                   "repeat-frame embedding, folded into the view embedding" if "repeat_frame" in key else
                   "not part of this model")
            groups.setdefault(why, []).append(key)
        return "; ".join(f"{len(v)} {why}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for why, v in groups.items())

    def __str__(self) -> str:
        head = f"loaded {len(self.loaded)} tensors"
        if self.skipped:
            head += f", skipped {len(self.skipped)} checkpoint entries this model does not use ({self._skip_reasons()})"
        if self.remapped:
            head += (f", remapped {len(self.remapped)} to this model's cameras ({', '.join(self.remapped[:4])}"
                     f"{' ...' if len(self.remapped) > 4 else ''})")
        lines = [head]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                lines.append(f"{name} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        for key, want, got in self.mismatched[:8]:
            lines.append(f"shape mismatch {key}: model {list(want)} vs checkpoint {list(got)}")
        lines += self.notes
        return "\n".join(lines)


def read_state_dict(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A flat dict from a file or a mapping; unwraps ``{"model": ...}`` / ``{"state_dict": ...}``."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        sd = None
        for mmap in (True, False):  # old (non-zipfile) files cannot be memory-mapped
            try:
                with torch.serialization.safe_globals([io.BytesIO]):  # TE stores FP8 _extra_state as BytesIO
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except Exception as exc:  # noqa: BLE001
                if not mmap:
                    raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    else:
        sd = src
    if not isinstance(sd, Mapping):
        raise ValueError(f"checkpoint must be a dict of tensors, got {type(sd).__name__}")
    for wrapper in ("model", "state_dict"):
        if wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    return dict(sd)


def split_state_dict(sd: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str], list[str]]:
    """-> (net tensors without "net.", logvar tensors without "logvar.", skipped keys, other keys)."""
    net, logvar, skipped, other = {}, {}, [], []
    prefixed = any(k.startswith("net.") for k in sd)
    for key, val in sd.items():
        clean = _WRAPPER.sub(r"\1", key)
        if clean.endswith("_extra_state"):
            skipped.append(key)
        elif clean.startswith("logvar."):
            logvar[clean[len("logvar."):]] = val
        elif clean.startswith("net."):
            net[clean[len("net."):]] = val
        elif not prefixed and isinstance(val, Tensor):
            net[clean] = val
        else:
            other.append(key)
    return net, logvar, skipped, other


def _as_tensor(key: str, val: Any) -> Tensor:
    if not isinstance(val, Tensor):
        raise ValueError(f"checkpoint key {key!r} holds {type(val).__name__}, expected a tensor")
    return val


def _add_condition_mask_columns(net: MultiviewDiT, sd: dict[str, Tensor], report: LoadReport) -> None:
    """A Text2World checkpoint into a Video2World net: insert the condition-mask channel's ``p*p*r`` columns of
    ``x_embedder.proj.1.weight`` (right after the latent's, where upstream's net concatenates the mask) as zeros,
    so that the loaded net computes exactly what the Text2World net did until training moves them."""
    cfg = net.config
    kx, kv = "x_embedder.proj.1.weight", "view_embeddings.weight"
    if not cfg.video2world or kx not in sd:
        return
    k = cfg.patch_spatial**2 * cfg.patch_temporal
    dv = sd[kv].shape[1] if kv in sd else (cfg.view_condition_dim if cfg.concat_view_embedding else 0)
    without_mask = (cfg.in_channels + int(cfg.concat_padding_mask) + dv) * k
    W = _as_tensor(kx, sd[kx])
    if W.dim() != 2 or W.shape[1] != without_mask:
        return  # already has the mask channel (a Video2World checkpoint), or a shape the strict check reports
    at = cfg.in_channels * k
    sd[kx] = torch.cat([W[:, :at], W.new_zeros(W.shape[0], k), W[:, at:]], dim=1)
    report.remapped.append(kx)
    report.notes.append(f"Text2World checkpoint: the Video2World condition-mask input channel ({kx} columns "
                        f"{at}..{at + k - 1}) is zero-initialised")


def _remap_views(net: MultiviewDiT, sd: dict[str, Tensor], report: LoadReport, source_cameras: tuple[str, ...] | None,
                 target_cameras: tuple[str, ...] | None, view_name_map: Mapping[str, str] | None) -> None:
    """Rewrite ``x_embedder.proj.1.weight`` / ``view_embeddings.weight`` of ``sd`` for ``net``'s camera set."""
    cfg = net.config
    kx, kv = "x_embedder.proj.1.weight", "view_embeddings.weight"
    W_src, E_src = sd[kx].float(), sd[kv].float()
    own = net.state_dict()
    if own[kx].is_meta or own[kv].is_meta:  # a meta-built net: start the new parts from a fresh init
        W_dst = nn.init.xavier_uniform_(torch.empty(own[kx].shape))
        E_dst = torch.randn(own[kv].shape)
    else:
        W_dst, E_dst = own[kx].detach().float().cpu().clone(), own[kv].detach().float().cpu().clone()
    k = cfg.patch_spatial**2 * cfg.patch_temporal
    n_fixed = cfg.in_channels + int(cfg.video2world) + int(cfg.concat_padding_mask)  # mask columns added before
    Vs, Dvs = E_src.shape
    Vd, Dvd = E_dst.shape
    if W_src.shape[0] != W_dst.shape[0] or W_src.shape[1] != (n_fixed + Dvs) * k:
        raise ValueError(f"cannot remap cameras: checkpoint {kx} {list(W_src.shape)} does not fit "
                         f"{n_fixed} latent+padding channels and view dim {Dvs} (model has {list(W_dst.shape)})")
    W_dst[:, : n_fixed * k] = W_src[:, : n_fixed * k]
    if source_cameras is None:
        source_cameras = RELEASED_6VIEW_CAMERAS if Vs == 6 else None
    target_cameras = target_cameras or cfg.camera_names
    if source_cameras is None or target_cameras is None or len(source_cameras) != Vs or len(target_cameras) != Vd:
        raise ValueError(f"cannot remap cameras: need camera names for the checkpoint's {Vs} views and the model's "
                         f"{Vd} views (got {source_cameras} and {target_cameras}); pass source_cameras/target_cameras")
    name_map = {**DEFAULT_CAMERA_MAP, **(view_name_map or {})}
    pairs = []  # (target index, source index)
    for t, name in enumerate(target_cameras):
        src_name = name if name in source_cameras else name_map.get(name)
        if src_name in source_cameras:
            pairs.append((t, source_cameras.index(src_name)))
        else:
            report.notes.append(f"camera {name!r} has no match in the checkpoint; its view embedding stays new")
    e_src = E_src.clone()
    fold_bias = "repeat_frame_embedding.bias" in sd and not cfg.add_repeat_frame_embedding
    if fold_bias:
        e_src = e_src + sd["repeat_frame_embedding.bias"].float()[None]  # frame_repeat = 0
    Wv_src = W_src[:, n_fixed * k:].reshape(-1, Dvs, k)  # [D, Dvs, k]
    if Dvd == Dvs:
        W_dst[:, n_fixed * k:] = W_src[:, n_fixed * k:]
        for t, s in pairs:
            E_dst[t] = e_src[s]
        report.notes.append(f"view embedding rows copied by camera name: {[(target_cameras[t], source_cameras[s]) for t, s in pairs]}")
    elif pairs:
        # Per matched view, the pretrained additive contribution u_s [D*k]; factor it with rank Dvd.
        U_rows = torch.einsum("dck,sc->sdk", Wv_src, e_src[[s for _, s in pairs]]).reshape(len(pairs), -1).double()
        Uu, S, Vh = torch.linalg.svd(U_rows, full_matrices=False)
        r = min(Dvd, S.numel())
        scale = float(len(pairs)) ** 0.5  # keeps embedding entries O(1), like the N(0,1) init
        E_fit = torch.zeros(len(pairs), Dvd, dtype=torch.float64)
        E_fit[:, :r] = Uu[:, :r] * scale
        W_fit = torch.zeros(Dvd, U_rows.shape[1], dtype=torch.float64)
        W_fit[:r] = S[:r, None] * Vh[:r] / scale
        err = (torch.linalg.norm(U_rows - E_fit @ W_fit) / torch.linalg.norm(U_rows).clamp_min(1e-30)).item()
        for i, (t, _) in enumerate(pairs):
            E_dst[t] = E_fit[i].float()
        W_dst[:, n_fixed * k:] = W_fit.float().reshape(Dvd, -1, k).permute(1, 0, 2).reshape(W_dst.shape[0], Dvd * k)
        report.notes.append(f"view channels refit by SVD (view dim {Dvs} -> {Dvd}, {len(pairs)} matched cameras): "
                            f"relative error of the per-view contribution {err:.3g}")
    sd[kx], sd[kv] = W_dst, E_dst
    report.remapped += [kx, kv]
    if fold_bias:
        report.notes.append("repeat_frame_embedding.bias folded into the view embeddings (frame_repeat = 0)")


@torch.no_grad()
def load_cosmos_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                           strict: bool = True, *, remap_cameras: bool = True,
                           source_cameras: tuple[str, ...] | None = None, target_cameras: tuple[str, ...] | None = None,
                           view_name_map: Mapping[str, str] | None = None) -> LoadReport:
    """Load a Cosmos-format checkpoint into a ``MultiviewDiT`` or a module with ``.net`` (and ``.logvar``).

    strict: raise ValueError on any missing, unexpected or shape-mismatched key (after camera remapping).
    Non-strict loads what fits and reports the rest (upstream's ``non_strict_load_model``).
    Meta-device parameters are replaced by the loaded tensors (in the model's dtype).
    """
    if isinstance(model, MultiviewDiT):
        net, logvar = model, None
    elif isinstance(getattr(model, "net", None), MultiviewDiT):
        net, logvar = model.net, getattr(model, "logvar", None)
    else:
        raise ValueError(f"load_cosmos_checkpoint expects a MultiviewDiT or a module with .net, got {type(model).__name__}")
    report = LoadReport()
    net_sd, logvar_sd, report.skipped, other = split_state_dict(read_state_dict(path_or_state_dict))
    report.unexpected += other
    if logvar is None:
        report.skipped += [f"logvar.{k}" for k in logvar_sd]
    own = net.state_dict()
    kx, kv = "x_embedder.proj.1.weight", "view_embeddings.weight"
    _add_condition_mask_columns(net, net_sd, report)
    if remap_cameras and kx in net_sd and kv in net_sd and kv in own and (
            net_sd[kx].shape != own[kx].shape or net_sd[kv].shape != own[kv].shape or source_cameras or target_cameras):
        _remap_views(net, net_sd, report, source_cameras, target_cameras, view_name_map)
        if "repeat_frame_embedding.weight" not in own:
            for key in ("repeat_frame_embedding.weight", "repeat_frame_embedding.bias"):
                if net_sd.pop(key, None) is not None:
                    report.skipped.append(key)
    if "pos_embedder.seq" not in net_sd and "pos_embedder.seq" in own:
        report.notes.append("pos_embedder.seq not in the checkpoint; kept the model's arange buffer")
        own.pop("pos_embedder.seq")
    targets = [("", net, own, net_sd)]
    if logvar is not None:
        targets.append(("logvar.", logvar, logvar.state_dict(), logvar_sd))
    plans = []
    for prefix, module, own_sd, ck_sd in targets:
        to_load = {}
        for key, ref in own_sd.items():
            if key not in ck_sd:
                report.missing.append(prefix + key)
                continue
            val = _as_tensor(prefix + key, ck_sd[key])
            if tuple(val.shape) != tuple(ref.shape):
                report.mismatched.append((prefix + key, tuple(ref.shape), tuple(val.shape)))
                continue
            to_load[key] = val
        report.unexpected += [prefix + k for k in ck_sd if k not in own_sd]
        plans.append((prefix, module, own_sd, to_load))
    if strict and not report.ok:
        raise ValueError(f"checkpoint does not match the model (strict=True):\n{report}")
    for prefix, module, own_sd, to_load in plans:
        if not to_load:
            continue
        if any(t.is_meta for t in own_sd.values()):
            module.load_state_dict({k: v.to(own_sd[k].dtype) for k, v in to_load.items()}, strict=False, assign=True)
        else:
            for key, val in to_load.items():
                own_sd[key].copy_(val)
        report.loaded += [prefix + k for k in to_load]
    return report


def to_cosmos_state_dict(net: MultiviewDiT, logvar: nn.Module | None = None) -> dict[str, Tensor]:
    """The checkpoint layout of §4.3: ``net.*`` (+ ``logvar.*``), detached tensors."""
    out = {f"net.{k}": v.detach() for k, v in net.state_dict().items()}
    if logvar is not None:
        out.update({f"logvar.{k}": v.detach() for k, v in logvar.state_dict().items()})
    return out
