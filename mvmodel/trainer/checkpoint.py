"""Checkpoints in upstream's layout (cosmos-multiview.md §8.5), written atomically, with keep-last-k and resume.

``<job>/checkpoints/``::

    iter_{N:09d}_reg_model.pt   flat state dict of {net, logvar}: ``net.*``, ``logvar.*`` (dtype: reg_model_dtype)
    iter_{N:09d}_ema_model.pt   the same keys, fp32 power-EMA weights
    iter_{N:09d}_optim.pt       {"optimizer": full AdamW state keyed by parameter name, "scheduler": {...},
                                 "master_weights": fp32 weights when the reg file is not fp32}
    iter_{N:09d}.pt             {"iteration": N, "data": loader position, "rng": per-rank RNG states,
                                 "skipped_steps": ..., "world_size": ...}
    latest_checkpoint.txt       "iter_{N:09d}.pt\n"

Every file is written to a temporary name in the same folder, flushed and fsynced, then ``os.replace``d, so a
kill never leaves a partial file under a final name; ``latest_checkpoint.txt`` is replaced last, so it only
ever names a complete checkpoint. Only rank 0 writes; all ranks take part in gathering sharded tensors. With
``async_save`` the gathered (owned, CPU) dicts are written by a background thread while training continues.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ema import local_tensor

_ITER = re.compile(r"^iter_(\d{9})(_reg_model|_ema_model|_optim)?\.pt$")
LATEST = "latest_checkpoint.txt"


def iter_name(n: int, kind: str = "") -> str:
    """``iter_000000200_reg_model.pt`` for kind "reg_model"; ``iter_000000200.pt`` for kind ""."""
    return f"iter_{n:09d}{'_' + kind if kind else ''}.pt"


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path`` and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def _full(t: Tensor, keep: bool, dtype: torch.dtype | None = None) -> Tensor | None:
    """The whole tensor as a fresh CPU tensor where ``keep`` (rank 0), else None. For DTensors this is a
    collective (every rank calls it); one tensor at a time, so no rank ever holds a whole model it does not
    write."""
    if _is_dtensor(t):
        t = t.full_tensor()
    if not keep:
        return None
    t = t.detach()
    return t.to("cpu", dtype or t.dtype, copy=True)


def save_dtype(model_dtype: torch.dtype | None, name: str, t: Tensor) -> torch.dtype | None:
    """Cast the net's floating weights to ``model_dtype``; buffers like pos_embedder.seq and logvar stay fp32."""
    if model_dtype is None or not t.is_floating_point() or not name.startswith("net.") or "pos_embedder" in name:
        return None
    return model_dtype


# ------------------------------------------------------------------------------------------ gather / scatter
def model_state(model: nn.Module, dtype: torch.dtype | None = None, keep: bool = True) -> dict[str, Tensor]:
    """Consolidated ``net.*`` / ``logvar.*`` state dict (persistent buffers included) on CPU; empty where not
    ``keep``."""
    out = {}
    for name, t in model.state_dict().items():
        full = _full(t, keep, save_dtype(dtype, name, t))
        if keep:
            out[name] = full
    return out


def ema_state(model: nn.Module, shadow: list[Tensor], keep: bool = True) -> dict[str, Tensor]:
    """Consolidated fp32 EMA weights under the model's keys (buffers are the model's own)."""
    params = dict(model.named_parameters())
    if len(params) != len(shadow):
        raise ValueError(f"EMA holds {len(shadow)} tensors for {len(params)} parameters")
    by_name = dict(zip(params, shadow))
    out = {}
    for name, t in model.state_dict().items():
        if name in by_name:
            s = by_name[name]
            if _is_dtensor(t):
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(s, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                       stride=t.stride())
            full = _full(s, keep, torch.float32)
        else:
            full = _full(t, keep)
        if keep:
            out[name] = full
    return out


@torch.no_grad()
def load_model_state(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """Copy a consolidated state dict into (possibly sharded) parameters and buffers; strict on keys/shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint keys do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, t in own.items():
        src = sd[name]
        if tuple(src.shape) != tuple(t.shape):
            raise ValueError(f"checkpoint {name}: shape {list(src.shape)}, model expects {list(t.shape)}")
        _copy_full_into(t, src)


def _copy_full_into(dst: Tensor, full: Tensor) -> None:
    """dst (a tensor or a sharded DTensor) <- its part of ``full``."""
    if _is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        part = distribute_tensor(full.to(local_tensor(dst).device, local_tensor(dst).dtype), dst.device_mesh,
                                 dst.placements)
        local_tensor(dst).copy_(local_tensor(part))
    else:
        dst.copy_(full.to(dst.device, dst.dtype))


def local_parts(model: nn.Module, sd: dict[str, Tensor]) -> list[Tensor]:
    """This rank's shard of every parameter from a consolidated dict, in ``named_parameters()`` order."""
    out = []
    for name, p in model.named_parameters():
        if name not in sd:
            raise ValueError(f"checkpoint lacks parameter {name}")
        if _is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            out.append(local_tensor(distribute_tensor(sd[name].to(local_tensor(p).device, torch.float32),
                                                      p.device_mesh, p.placements)))
        else:
            out.append(sd[name].float())
    return out


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """Consolidated AdamW state keyed by parameter name: {"state": {name: {...}}, "param_groups": [...]}."""
    names = [n for n, _ in model.named_parameters()]
    sd = optimizer.state_dict()
    state = {}
    for idx, st in sd["state"].items():
        full = {k: (_full(v, keep) if isinstance(v, Tensor) else v) for k, v in st.items()}
        if keep:
            state[names[idx]] = full
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


@torch.no_grad()
def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
    params = list(model.named_parameters())
    names = [n for n, _ in params]
    sd = optimizer.state_dict()
    missing = [n for n in names if n not in full["state"]]
    if missing:
        raise ValueError(f"optimizer checkpoint lacks state for {missing[:8]}")
    state = {}
    for i, (name, p) in enumerate(params):
        st = {}
        for k, v in full["state"][name].items():
            if isinstance(v, Tensor) and v.dim() > 0:
                ref = torch.empty_like(p, dtype=v.dtype)  # a DTensor shaped like p when p is sharded
                _copy_full_into(ref, v)
                st[k] = ref
            else:
                st[k] = v.clone() if isinstance(v, Tensor) else v
        state[i] = st
    groups = []
    for g_own, g_ck in zip(sd["param_groups"], full["param_groups"]):
        groups.append({**{k: v for k, v in g_ck.items() if k != "params"}, "params": g_own["params"]})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------------ files
class Checkpointer:
    """Writes and finds checkpoints in ``directory`` (rank 0 writes; everyone reads)."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, rank: int = 0,
                 async_save: bool = False) -> None:
        self.dir = Path(directory)
        self.keep_last, self.rank = keep_last, rank
        # One writer thread: files are written in submission order, latest_checkpoint.txt last.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mvmodel-ckpt") if async_save and rank == 0 else None
        self._pending: list = []
        if rank == 0 and self.dir.is_dir():
            for stale in self.dir.glob(".*.tmp*"):  # left by a writer that was killed mid-file
                stale.unlink(missing_ok=True)

    def latest(self) -> int | None:
        """Iteration named by ``latest_checkpoint.txt``, or None (no checkpoint, or it names missing files)."""
        path = self.dir / LATEST
        if not path.is_file():
            return None
        name = path.read_text().strip()
        m = _ITER.match(name)
        if not m or m.group(2):
            raise ValueError(f"{path}: expected a line like iter_000000200.pt, found {name!r}")
        n = int(m.group(1))
        missing = [k for k in ("", "reg_model", "ema_model", "optim") if not (self.dir / iter_name(n, k)).is_file()]
        if missing:
            raise ValueError(f"{path} names iteration {n} but {[iter_name(n, k) for k in missing]} are missing in {self.dir}")
        return n

    def write(self, n: int, kind: str, obj: Any) -> None:
        """Write one file of iteration ``n`` (rank 0 only). Files are written one at a time so that only one
        consolidated dict is in host memory at once."""
        if self.rank != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._submit(atomic_save, obj, self.dir / iter_name(n, kind))

    def commit(self, n: int, trainer: dict) -> Path:
        """Write ``iter_N.pt`` and then point ``latest_checkpoint.txt`` at it; prune old checkpoints."""
        if self.rank == 0:
            self.write(n, "", trainer)
            self._submit(atomic_write, self.dir / LATEST, lambda f: f.write(f"{iter_name(n)}\n".encode()))
            self._submit(self.prune)
        return self.dir / iter_name(n)

    def _submit(self, fn, *args) -> None:
        if self._pool is None:
            fn(*args)
        else:
            self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        """Block until every submitted write is on disk; re-raise a writer's error."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()

    def iterations(self) -> list[int]:
        its = set()
        for p in self.dir.glob("iter_*.pt"):
            m = _ITER.match(p.name)
            if m:
                its.add(int(m.group(1)))
        return sorted(its)

    def prune(self) -> None:
        if self.keep_last <= 0:
            return
        its = self.iterations()
        for n in its[: max(0, len(its) - self.keep_last)]:
            for kind in ("", "reg_model", "ema_model", "optim"):
                (self.dir / iter_name(n, kind)).unlink(missing_ok=True)

    def load(self, n: int, kind: str) -> Any:
        path = self.dir / iter_name(n, kind)
        try:
            # iter_N.pt holds numpy / python RNG states (our own file); the weight files load weights-only.
            return torch.load(path, map_location="cpu", weights_only=kind != "", mmap=kind != "")
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot read checkpoint file {path}: {exc}") from exc


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
