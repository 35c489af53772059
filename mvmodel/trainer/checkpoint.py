"""Checkpoints in upstream's layout (cosmos-multiview.md §8.5), committed atomically as sets, with pruning and
verified resume.

``<job>/checkpoints/``::

    iter_{N:09d}_reg_model.pt   flat state dict of {net, logvar}: ``net.*``, ``logvar.*`` (dtype: reg_model_dtype)
    iter_{N:09d}_ema_model.pt   the same keys, fp32 power-EMA weights
    iter_{N:09d}_optim.pt       {"optimizer": full AdamW state keyed by parameter name, "scheduler": {...},
                                 "master_weights": fp32 weights when the reg file is not fp32}
    iter_{N:09d}.pt             {"iteration": N, "data": loader position, "rng": per-rank RNG states,
                                 "skipped_steps": ..., "world_size": ...}
    iter_{N:09d}_manifest.json  the set's commit record: every file's name, size and sha256 (ours, not upstream's)
    latest_checkpoint.txt       "iter_{N:09d}.pt\n"

A checkpoint is a set. Each file is written to a temporary name in the same folder while its sha256 is computed
on the bytes as they go out (no second read), flushed, fsynced and ``os.replace``d; once every file of the set
is on disk the manifest is written the same way (the commit point), then ``latest_checkpoint.txt`` moves, then
old sets are pruned. A failed write stops that sequence: the pointer stays, nothing is pruned, the set's files
are removed and the error (naming the file and the cause: "disk full", ...) is raised to the training loop.
Files without a manifest are not a checkpoint (an interrupted save); they are overwritten when the run reaches
their iteration.

Pruning (``keep_last`` k > 0) only looks at sets this run resumed from or wrote (its lineage), never at sets
newer than its newest one; of those it keeps the newest k resumable sets whole and removes only the optimizer
and trainer state (``_optim.pt``, ``iter_N.pt``) of older ones (the manifest says what was pruned). Model files
stay, as upstream keeps every checkpoint, unless ``prune_models`` (then older sets go entirely).

Only rank 0 writes; all ranks take part in gathering sharded tensors. With ``async_save`` the gathered (owned,
CPU) dicts are written by one background thread while training continues; its error is kept and raised by
:meth:`Checkpointer.check` (the trainer calls it every step).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ema import local_tensor

_ITER = re.compile(r"^iter_(\d{9})(_reg_model|_ema_model|_optim)?\.pt$")
_MANIFEST = re.compile(r"^iter_(\d{9})_manifest\.json$")
LATEST = "latest_checkpoint.txt"
KINDS = ("reg_model", "ema_model", "optim", "")  # write order; iter_N.pt (trainer state) last
MODEL_KINDS = ("reg_model", "ema_model")
MANIFEST_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no intact checkpoint could be read; the message names the file."""


def iter_name(n: int, kind: str = "") -> str:
    """``iter_000000200_reg_model.pt`` for kind "reg_model"; ``iter_000000200.pt`` for kind ""."""
    return f"iter_{n:09d}{'_' + kind if kind else ''}.pt"


def manifest_name(n: int) -> str:
    return f"iter_{n:09d}_manifest.json"


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB ({int(n)} bytes)"


def describe_write_error(path: Path, exc: OSError, written: int, expected: int | None) -> str:
    """One line naming the file and the cause, with the numbers a user needs to act on a full disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        what = "disk full" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        need = (f"needs ~{_gb(max(expected - written, 0))} more" if expected and expected > written
                else "needs more space")
        have = f"{_gb(free)} free on {path.parent}" if free is not None else f"free space of {path.parent} unknown"
        return f"{path}: {what}: {_gb(written)} written, {need}; {have} ({exc.strerror})"
    if exc.errno == errno.EFBIG:
        return (f"{path}: file too large: {_gb(written)} written, the file-size limit of this process or file "
                f"system (ulimit -f) stops it ({exc.strerror})")
    return f"{path}: {exc.strerror or exc} (errno {exc.errno})" if exc.errno else f"{path}: {exc}"


class _HashingFile:
    """A binary file that counts and sha256-hashes the bytes written through it (so no second read is needed)
    and remembers the first OSError, which torch.save may wrap in an opaque RuntimeError."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.sha.update(data)  # hashlib releases the GIL on large buffers: training goes on meanwhile
        self.size += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the directory entry is data too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync directories
    finally:
        os.close(fd)


def atomic_write(path: Path, write, expected_size: int | None = None) -> dict[str, Any]:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync, rename it over ``path``. Returns
    ``{"size", "sha256"}`` of what was written. Any failure raises :class:`CheckpointError` naming ``path`` and
    the cause; the temporary file is always removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    hf = None
    try:
        with open(tmp, "wb") as f:
            hf = _HashingFile(f)
            write(hf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return {"size": hf.size, "sha256": hf.sha.hexdigest()}
    except Exception as exc:
        os_err = (hf.error if hf is not None else None) or (exc if isinstance(exc, OSError) else None)
        written = hf.size if hf is not None else 0
        if os_err is not None:
            raise CheckpointError(describe_write_error(path, os_err, written, expected_size)) from exc
        raise CheckpointError(f"{path}: writing failed: {type(exc).__name__}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _nbytes(obj: Any) -> int:
    """Tensor bytes in a (nested) checkpoint dict: the expected file size, for the "needs X more" message."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def atomic_save(obj: Any, path: Path) -> dict[str, Any]:
    return atomic_write(path, lambda f: torch.save(obj, f), expected_size=_nbytes(obj))


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
def trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(name, parameter) of what the optimizer trains, in ``named_parameters()`` order: every parameter in full
    training, the adapters in a LoRA run (the frozen base is neither optimized nor in the EMA)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def model_state(model: nn.Module, dtype: torch.dtype | None = None, keep: bool = True,
                trainable_only: bool = False) -> dict[str, Tensor]:
    """Consolidated ``net.*`` / ``logvar.*`` state dict (persistent buffers included) on CPU; empty where not
    ``keep``. ``trainable_only``: the trained parameters only (a LoRA run's adapters)."""
    out = {}
    names = {n for n, _ in trainable(model)} if trainable_only else None
    for name, t in model.state_dict().items():
        if names is not None and name not in names:
            continue
        full = _full(t, keep, save_dtype(dtype, name, t))
        if keep:
            out[name] = full
    return out


def ema_state(model: nn.Module, shadow: list[Tensor], keep: bool = True,
              trainable_only: bool = False) -> dict[str, Tensor]:
    """Consolidated fp32 EMA weights under the model's keys (buffers and frozen parameters are the model's own;
    ``trainable_only``: the EMA weights alone)."""
    params = dict(trainable(model))
    if len(params) != len(shadow):
        raise ValueError(f"EMA holds {len(shadow)} tensors for {len(params)} parameters")
    by_name = dict(zip(params, shadow))
    out = {}
    for name, t in model.state_dict().items():
        if trainable_only and name not in by_name:
            continue
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
def load_model_state(model: nn.Module, sd: dict[str, Tensor], trainable_only: bool = False) -> None:
    """Copy a consolidated state dict into (possibly sharded) parameters and buffers; strict on keys/shapes
    (``trainable_only``: of the trained parameters, e.g. a LoRA run's adapters)."""
    own = model.state_dict()
    if trainable_only:
        names = {n for n, _ in trainable(model)}
        own = {k: v for k, v in own.items() if k in names}
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
    for name, p in trainable(model):
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
    names = [n for n, _ in trainable(model)]
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
    params = trainable(model)
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
    """Writes, prunes, verifies and finds checkpoint sets in ``directory`` (rank 0 writes; everyone reads)."""

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, rank: int = 0,
                 async_save: bool = False, prune_models: bool = False, log=print) -> None:
        self.dir = Path(directory)
        self.keep_last, self.rank, self.prune_models, self.log = keep_last, rank, prune_models, log
        # One writer thread: files are written in submission order, manifest and pointer last.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mvmodel-ckpt") if async_save and rank == 0 else None
        self._pending: list = []
        self._records: dict[int, dict[str, dict]] = {}  # name -> {size, sha256} of the sets being written
        self._error: CheckpointError | None = None
        self._reported = False
        # Iterations of this run's sets (resumed from, older than that, or written here): the only prunable ones.
        self.lineage: set[int] = set()
        if rank == 0 and self.dir.is_dir():
            for stale in self.dir.glob(".*.tmp*"):  # left by a writer that was killed mid-file
                stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    def pointer(self) -> int | None:
        """Iteration named by ``latest_checkpoint.txt`` (None when there is none)."""
        path = self.dir / LATEST
        if not path.is_file():
            return None
        name = path.read_text().strip()
        m = _ITER.match(name)
        if not m or m.group(2):
            raise CheckpointError(f"{path}: expected a line like iter_000000200.pt, found {name!r}")
        return int(m.group(1))

    def latest(self) -> int | None:
        """Iteration named by ``latest_checkpoint.txt``, or None (no checkpoint); an error when files are missing."""
        n = self.pointer()
        if n is None:
            return None
        missing = [iter_name(n, k) for k in KINDS if not (self.dir / iter_name(n, k)).is_file()]
        if missing:
            raise CheckpointError(f"{self.dir / LATEST} names iteration {n} but {missing} are missing in {self.dir}")
        return n

    def manifests(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _MANIFEST.match(p.name)))

    def read_manifest(self, n: int) -> dict[str, Any]:
        path = self.dir / manifest_name(n)
        man = json.loads(path.read_text())
        if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
            raise ValueError("no 'files' table")
        return man

    def held(self) -> list[int]:
        """Iterations this folder holds checkpoints of: committed sets, the pointer's, and complete sets written
        without a manifest (older versions, upstream). Stray files of an interrupted save do not count."""
        if not self.dir.is_dir():
            return []
        kinds: dict[int, set[str]] = {}
        for p in self.dir.iterdir():
            if m := _ITER.match(p.name):
                kinds.setdefault(int(m.group(1)), set()).add((m.group(2) or "_")[1:])
        legacy = {n for n, k in kinds.items() if len(k) == len(KINDS)}
        ptr = self.pointer() if (self.dir / LATEST).is_file() else None
        return sorted(set(self.manifests()) | legacy | ({ptr} if ptr is not None else set()))

    def verify(self, n: int, checksums: bool = True) -> str | None:
        """None when set ``n`` is complete and matches its manifest (sizes, and sha256 when ``checksums``);
        else what is wrong, naming the file."""
        mpath = self.dir / manifest_name(n)
        try:
            man = self.read_manifest(n)
        except (OSError, ValueError) as exc:
            return f"{mpath}: unreadable manifest ({exc})"
        if man.get("pruned"):
            return f"iteration {n}: {', '.join(man['pruned'])} were pruned (model files only)"
        for kind in KINDS:
            name = iter_name(n, kind)
            rec, path = man["files"].get(name), self.dir / name
            if not isinstance(rec, dict) or "size" not in rec or "sha256" not in rec:
                return f"{mpath}: has no size/sha256 entry for {name}"
            if not path.is_file():
                return f"{path}: missing"
            size = path.stat().st_size
            if size != rec["size"]:
                return f"{path}: {size} bytes, its manifest says {rec['size']} (truncated or overwritten)"
            if checksums and sha256_file(path) != rec["sha256"]:
                return f"{path}: sha256 differs from its manifest (damaged bytes)"
        return None

    def find_resumable(self) -> tuple[int | None, list[str]]:
        """(iteration to resume from, warnings). Starts at ``latest_checkpoint.txt``'s set (a user may move it
        back by hand) and falls back to the newest intact older set. (None, []) when the folder holds no
        checkpoint; :class:`CheckpointError` when it holds some but none is intact."""
        ptr, mans, notes = self.pointer(), self.manifests(), []
        if ptr is not None and ptr not in mans:
            if not self.verify_legacy(ptr):
                notes.append(f"{self.dir / LATEST} names iteration {ptr}, which has no complete set with a manifest")
            else:
                return ptr, [f"{self.dir / LATEST} names iteration {ptr}, written without a manifest (by an older "
                             f"version): its files are not verified"]
        if ptr is None and mans:
            notes.append(f"{self.dir / LATEST} is missing; looking for the newest intact set")
        newer = [n for n in mans if ptr is not None and n > ptr]
        if newer:
            notes.append(f"sets newer than {LATEST} ({newer}) are not resumed (and are overwritten when the run "
                         f"reaches them)")
        skipped = []
        for n in sorted((n for n in mans if ptr is None or n <= ptr), reverse=True):
            problem = self.verify(n)
            if problem is None:
                if skipped:
                    notes.append(f"skipped {len(skipped)} checkpoint(s) that cannot be resumed: " + "; ".join(skipped))
                self.lineage = {m for m in mans if m <= n}
                return n, notes
            skipped.append(problem)
        if ptr is None and not mans:
            return None, notes
        raise CheckpointError(f"{self.dir}: no intact checkpoint to resume from: " + "; ".join(notes + skipped)
                              + ". Start over with checkpoint.overwrite=true (moves these files aside) or use a new "
                              "job.name")

    def verify_legacy(self, n: int) -> bool:
        return all((self.dir / iter_name(n, k)).is_file() for k in KINDS) and not (self.dir / manifest_name(n)).exists()

    def move_aside(self, dest: Path) -> list[str]:
        """Move every checkpoint file (sets, manifests, pointer) into ``dest``; returns the names moved."""
        moved = []
        if not self.dir.is_dir():
            return moved
        for p in sorted(self.dir.iterdir()):
            if p.name == LATEST or _ITER.match(p.name) or _MANIFEST.match(p.name):
                dest.mkdir(parents=True, exist_ok=True)
                os.replace(p, dest / p.name)
                moved.append(p.name)
        return moved

    # ------------------------------------------------------------------ writing
    def write(self, n: int, kind: str, obj: Any) -> None:
        """Write one file of iteration ``n`` (rank 0 only). Files are written one at a time so that only one
        consolidated dict is in host memory at once (synchronous saving)."""
        if self.rank != 0:
            return
        self._submit(n, self._write_file, n, kind, obj)

    def commit(self, n: int, trainer: dict) -> Path:
        """Write ``iter_N.pt``, then the manifest, then point ``latest_checkpoint.txt`` at it; prune."""
        if self.rank == 0:
            self.write(n, "", trainer)
            self._submit(n, self._commit, n)
        return self.dir / iter_name(n)

    def _write_file(self, n: int, kind: str, obj: Any) -> None:
        if n not in self._records:  # first file of the set: an older set of this number is no longer committed
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / manifest_name(n)).unlink(missing_ok=True)
            self._records[n] = {}
        self._records[n][iter_name(n, kind)] = atomic_save(obj, self.dir / iter_name(n, kind))

    def _commit(self, n: int) -> None:
        files = self._records.pop(n, {})
        missing = [iter_name(n, k) for k in KINDS if iter_name(n, k) not in files]
        if missing:
            raise CheckpointError(f"{self.dir}: the set of iteration {n} lacks {missing}")
        man = {"format": MANIFEST_FORMAT, "iteration": n, "checksum": "sha256",
               "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        _write_json(self.dir / manifest_name(n), man)
        atomic_write(self.dir / LATEST, lambda f: f.write(f"{iter_name(n)}\n".encode()))
        self.lineage.add(n)
        try:
            self.prune(n)
        except (OSError, ValueError, CheckpointError) as exc:  # the set is committed: a failed prune loses nothing
            self.log(f"[mvmodel.train] warning: pruning old checkpoints in {self.dir} failed: {exc}")

    def _submit(self, n: int, fn, *args) -> None:
        if self._pool is None:
            self._run(n, fn, *args)
        else:
            self._pending.append(self._pool.submit(self._run, n, fn, *args))

    def _run(self, n: int, fn, *args) -> None:
        """Run one step of saving set ``n``; after a failure nothing more is written (no manifest, no pointer
        move, no pruning), the set's files are removed and the error is kept for :meth:`check`."""
        if self._error is not None:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the training loop
            err = CheckpointError(f"checkpoint of iteration {n} not saved ({self.dir / LATEST} still names the "
                                  f"previous one): {exc}")
            err.__cause__ = exc
            self._abort(n)  # before the error is visible: the loop may stop as soon as it sees it
            self._error = err

    def _abort(self, n: int) -> None:
        self._records.pop(n, None)
        for name in [manifest_name(n)] + [iter_name(n, k) for k in KINDS]:
            try:
                (self.dir / name).unlink(missing_ok=True)
            except OSError:
                pass

    def failed(self) -> bool:
        """A write failed (rank 0). Cheap: the trainer asks every step."""
        return self._error is not None

    def check(self) -> None:
        """Raise the writer's error once (the run must stop at that save)."""
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def drain(self) -> None:
        """Block until every submitted write is done (or skipped after a failure); raises nothing."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()  # _run keeps every error to itself

    def wait(self) -> None:
        """Block until every submitted write is done; raise a writer's error."""
        self.drain()
        self.check()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    # ------------------------------------------------------------------ pruning
    def prune(self, newest: int) -> None:
        """Keep the newest ``keep_last`` resumable sets of this run (up to ``newest``) whole; of older ones
        remove the optimizer and trainer state (or the whole set with ``prune_models``). Sets outside this run's
        lineage (newer than the one resumed) are never touched."""
        if self.keep_last <= 0:
            return
        mine = [n for n in sorted(self.lineage) if n <= newest and (self.dir / manifest_name(n)).is_file()]
        mans = {n: self.read_manifest(n) for n in mine}
        resumable = [n for n in mine if not mans[n].get("pruned")]
        keep = set(resumable[-self.keep_last:])
        for n in mine:
            if n in keep or n >= newest:
                continue
            if self.prune_models:
                (self.dir / manifest_name(n)).unlink()  # un-commit first, then delete
                for kind in KINDS:
                    (self.dir / iter_name(n, kind)).unlink(missing_ok=True)
                self.lineage.discard(n)
                continue
            drop = [iter_name(n, k) for k in KINDS if k not in MODEL_KINDS]
            man = mans[n]
            if not man.get("pruned"):  # record first: a crash in between leaves stray files, not a lying manifest
                man["files"] = {k: v for k, v in man["files"].items() if k not in drop}
                man["pruned"] = drop
                _write_json(self.dir / manifest_name(n), man)
            for name in drop:
                (self.dir / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ loading
    def load(self, n: int, kind: str) -> Any:
        path = self.dir / iter_name(n, kind)
        try:
            # iter_N.pt holds numpy / python RNG states (our own file); the weight files load weights-only.
            return torch.load(path, map_location="cpu", weights_only=kind != "", mmap=kind != "")
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"cannot read checkpoint file {path}: {exc}") from exc


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
