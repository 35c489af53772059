"""Training loader: distributed, seeded, resumable, prefetching.

* Sampling: one global permutation per epoch (``torch.randperm`` seeded with ``seed + epoch``), split across
  ranks round-robin like ``DistributedSampler`` (drop_last truncates to a multiple of the world size, else
  the permutation is padded by wrapping around).
* Resume: :meth:`MultiviewLoader.state_dict` stores the epoch and the number of samples consumed (yielded to
  the caller, not merely prefetched) counted globally; :meth:`load_state_dict` restarts at exactly the next
  sample, also under a different world size (each rank skips ``consumed // world_size`` of its share).
  An epoch that runs to its end advances ``epoch`` by itself, so ``for batch in loader`` per epoch works.
* PyAV: a ``torch.utils.data.DataLoader`` with worker processes (each decodes with one FFmpeg thread and one
  torch thread, so N workers use about N cores), pinned memory, ``prefetch_factor`` batches per worker.
* DALI: no worker processes (CUDA and forked workers do not mix); one background thread decodes the next
  ``prefetch`` batches with NVDEC and resizes them on a side CUDA stream, so batches arrive on the GPU.
"""
from __future__ import annotations

import logging
import os
import queue
import threading

import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from .dataset import MultiviewDataset

log = logging.getLogger("mvmodel.data")


class ResumableDistributedSampler(Sampler[int]):
    """Per-rank indices of a seeded global permutation; ``start`` skips this rank's first samples."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if num_samples < 1 or (drop_last and num_samples < world_size):
            raise ValueError(f"{num_samples} samples cannot feed world_size={world_size} (drop_last={drop_last})")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.start = 0, 0

    def indices(self, epoch: int) -> list[int]:
        n, w = self.num_samples, self.world_size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            order = order[: n - n % w]
        else:
            pad = (-n) % w
            order = order + (order * (pad // n + 1))[:pad]
        return order[self.rank::w]

    def __len__(self) -> int:
        return len(self.indices(0))

    def __iter__(self):
        return iter(self.indices(self.epoch)[self.start:])


def collate(samples: list[dict]) -> dict:
    """``default_collate`` (tensors stacked on their device), except per-view caption lists stay lists and the
    samples' skip records (on_error="skip") are joined into one list."""
    captions = [s.pop("captions") for s in samples] if "captions" in samples[0] else None
    skipped = [r for s in samples for r in s.pop("skipped")] if "skipped" in samples[0] else None
    out = default_collate(samples)
    if captions is not None:
        out["captions"] = captions
    if skipped is not None:
        out["skipped"] = skipped
    return out


def _worker_init(_):
    torch.set_num_threads(1)  # N decode workers should use ~N cores, not N x all cores


_END = object()


class MultiviewLoader:
    """Iterable of collated batches with ``state_dict()`` / ``load_state_dict()`` / ``set_epoch()``."""

    def __init__(self, dataset: MultiviewDataset, sampler: ResumableDistributedSampler, batch_size: int,
                 drop_last: bool, num_workers: int, prefetch_factor: int, pin_memory: bool,
                 persistent_workers: bool, use_dali: bool, device: torch.device | None):
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.persistent_workers, self.use_dali, self.device = persistent_workers, use_dali, device
        self.epoch, self.consumed = 0, 0  # consumed: samples of this rank yielded in the current epoch
        self._dl = None

    # ---------------------------------------------------------------- position
    def state_dict(self) -> dict:
        s = self.sampler
        return {"epoch": self.epoch, "samples_consumed": self.consumed * s.world_size, "seed": s.seed,
                "world_size": s.world_size, "num_samples": s.num_samples, "shuffle": s.shuffle}

    def load_state_dict(self, state: dict) -> None:
        s = self.sampler
        if state.get("num_samples", s.num_samples) != s.num_samples:
            raise ValueError(f"loader state is for {state['num_samples']} samples but the dataset has "
                             f"{s.num_samples}; the dataset changed since the checkpoint")
        if state.get("seed", s.seed) != s.seed or state.get("shuffle", s.shuffle) != s.shuffle:
            raise ValueError(f"loader state has seed={state.get('seed')} shuffle={state.get('shuffle')}, "
                             f"this loader seed={s.seed} shuffle={s.shuffle}: the order would differ")
        self.epoch = int(state["epoch"])
        self.consumed = min(int(state["samples_consumed"]) // s.world_size, len(s))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = int(epoch), 0

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    # ---------------------------------------------------------------- iteration
    def __iter__(self):
        self.sampler.epoch, self.sampler.start = self.epoch, self.consumed
        if self.consumed >= len(self.sampler) or (self.drop_last and len(self.sampler) - self.consumed < self.batch_size):
            batches = iter(())
        elif self.use_dali:
            batches = self._thread_batches(list(self.sampler))
        else:
            batches = iter(self._dataloader())
        before = self.dataset.skipped_samples
        for batch in batches:
            self.consumed += len(batch["clip_name"])
            for record in batch.pop("skipped", ()):
                if not record["counted"]:  # made in a worker process, whose own counts are lost
                    self.dataset.record_skip(record)
            yield batch
        if self.dataset.skipped_samples > before:
            log.warning("epoch %d: %d sample(s) replaced by others so far.\n%s", self.epoch,
                        self.dataset.skipped_samples, self.dataset.skip_summary())
        self.epoch, self.consumed = self.epoch + 1, 0

    def _dataloader(self) -> DataLoader:
        if self._dl is None or not self.persistent_workers:
            w = self.num_workers
            self._dl = DataLoader(
                self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=self.drop_last,
                num_workers=w, collate_fn=collate, pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor if w > 0 else None,
                persistent_workers=self.persistent_workers and w > 0, worker_init_fn=_worker_init if w else None,
            )
        return self._dl

    def _thread_batches(self, indices: list[int]):
        """DALI path: a daemon thread fills a bounded queue with GPU batches built on a side stream."""
        device = self.device or torch.device("cuda", torch.cuda.current_device())
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch_factor))
        stop = threading.Event()
        chunks = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks.pop()

        def work():
            try:
                torch.cuda.set_device(device)
                stream = torch.cuda.Stream(device)
                with torch.cuda.stream(stream):
                    for chunk in chunks:
                        if stop.is_set():
                            return
                        batch = collate([self.dataset[i] for i in chunk])
                        batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                                 for k, v in batch.items()}
                        stream.synchronize()  # blocks this thread only: the batch is complete when queued
                        q.put(batch)
                q.put(_END)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consuming thread
                q.put(e)

        t = threading.Thread(target=work, name="mvmodel-dali-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                cur = torch.cuda.current_stream(device)
                for v in item.values():
                    if isinstance(v, torch.Tensor) and v.is_cuda:
                        v.record_stream(cur)  # allocated on the side stream, used on the caller's stream
                yield item
        finally:
            stop.set()
            while t.is_alive():  # unblock a producer waiting on a full queue, then let it finish
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass


def build_dataloader(dataset: MultiviewDataset, batch_size: int = 1, *, rank: int | None = None,
                     world_size: int | None = None, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                     num_workers: int | None = None, prefetch_factor: int = 2, pin_memory: bool | None = None,
                     persistent_workers: bool = False, device: torch.device | str | None = None) -> MultiviewLoader:
    """Training loader over ``dataset`` for one data-parallel rank.

    ``rank``/``world_size`` default to torch.distributed's when initialised, else 0/1. ``num_workers``
    (PyAV only) defaults to min(8, CPU cores). With a DALI decoder the batches arrive on ``device``
    (default: the current CUDA device) and ``num_workers`` is ignored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = (torch.distributed.get_rank() if dist else 0) if rank is None else rank
    world_size = (torch.distributed.get_world_size() if dist else 1) if world_size is None else world_size
    sampler = ResumableDistributedSampler(len(dataset), rank, world_size, shuffle, seed, drop_last)
    use_dali = dataset.decoder.name == "dali"
    if num_workers is None:
        num_workers = 0 if use_dali else min(8, os.cpu_count() or 1)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available() and not use_dali
    return MultiviewLoader(dataset, sampler, batch_size, drop_last, num_workers, prefetch_factor, pin_memory,
                           persistent_workers, use_dali, torch.device(device) if device is not None else None)
