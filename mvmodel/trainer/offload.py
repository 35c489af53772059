"""AdamW with fp32 master weights, Adam moments and the power EMA in host memory; bf16 weights on the GPU.

This is what lets the 7B train on one 80 GB GPU: the GPU holds the bf16 weights (14.5 GB), their bf16
gradients (14.5 GB) and the activations; the 16 bytes/parameter of optimizer state (+4 for the fp32 EMA) live
in host memory (7.23e9 x 16 B = 116 GB; the EMA adds 29 GB).

Parameters are grouped in buckets in forward order (the embedders / final layer / uncertainty head first, then
one bucket per transformer block). Each bucket keeps flat fp32 ``master``, ``exp_avg``, ``exp_avg_sq`` (and
``ema``) tensors. ``step()`` returns at once; a worker thread then, bucket by bucket:

1. copies the bucket's bf16 gradients to a pinned staging buffer (side CUDA stream; the next bucket's copy is
   issued before this bucket's update, so transfers overlap CPU work);
2. runs ``torch._fused_adamw_`` on the flat fp32 tensors (the clipping factor enters as ``grad_scale``),
   then the EMA ``lerp_``;
3. rounds the new master weights to bf16 in a pinned buffer and uploads them into the GPU parameters on an
   upload stream, recording a CUDA event.

The next forward runs while this happens: a forward pre-hook on each block waits for its bucket's event, so
the CPU update of step k overlaps the forward of step k+1 (block 0 is updated first, as it is needed first).
On a CPU device the same thread and hooks run without streams (tests exercise the overlap logic there and compare
the update with ``torch.optim.AdamW``).

A :class:`~mvmodel.trainer.memory_plan.MemoryPlan` may keep some buckets' state on the GPU instead (chosen at start
from the free GPU and host memory, see ``memory_plan.py``). Such a bucket is updated by ``step()`` itself, on the
GPU's current stream, with the same fused AdamW on the same flat fp32 tensors, and its weights are written in
place (no transfers); if its EMA stays on the host, the worker thread downloads the new fp32 master and lerps.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .ema import power_ema_beta, power_ema_gamma
from .memory_plan import MemoryPlan, host_plan


class _Bucket:
    def __init__(self, names: list[str], params: list[Tensor], with_ema: bool, state_device: torch.device,
                 ema_device: torch.device) -> None:
        """fp32 master/exp_avg/exp_avg_sq (and step) on ``state_device``, the EMA on ``ema_device``."""
        self.names, self.params = names, params
        self.numels = [p.numel() for p in params]
        n = sum(self.numels)
        self.master = torch.empty(n, dtype=torch.float32, device=state_device)
        off = 0
        for p, k in zip(params, self.numels):  # parameter by parameter: no full-size temporary
            self.master[off:off + k].copy_(p.detach().reshape(-1))
            off += k
        self.exp_avg = torch.zeros(n, device=state_device)
        self.exp_avg_sq = torch.zeros(n, device=state_device)
        self.ema = self.master.to(ema_device, copy=True) if with_ema else None
        self.step = torch.zeros((), dtype=torch.float32, device=state_device)

    def views(self, flat: Tensor) -> list[Tensor]:
        return [v.view_as(p) for v, p in zip(flat.split(self.numels), self.params)]


class OffloadedAdamW:
    """AdamW over ``named_params`` (a list of (name, parameter)); see the module docstring."""

    def __init__(self, named_params: list[tuple[str, Tensor]], *, lr: float, betas=(0.9, 0.99), eps: float = 1e-10,
                 weight_decay: float = 0.1, ema_rate: float | None = 0.1, threads: int = 0,
                 bucket_of: dict[str, int] | None = None,
                 plan: MemoryPlan | Callable[[list[int]], MemoryPlan] | None = None) -> None:
        """``plan``: where each bucket's state lives (or a function of the buckets' sizes returning it); default
        all in host memory."""
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.gamma = power_ema_gamma(ema_rate) if ema_rate else None
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = named_params[0][1].device
        self.cuda = self.device.type == "cuda"
        groups = group_params(named_params, bucket_of)
        with_ema = self.gamma is not None
        numels = [sum(p.numel() for _, p in g) for g in groups]
        if callable(plan):
            plan = plan(numels)
        self.plan = plan if plan is not None else host_plan(numels, self.device, with_ema)
        if self.plan.numels != numels:
            raise ValueError(f"memory plan is for buckets of {self.plan.numels} elements, the model has {numels}")
        if self.plan.device.type != self.device.type:
            raise ValueError(f"memory plan places state on {self.plan.device}, the parameters are on {self.device}")
        cpu = torch.device("cpu")
        self.buckets = [_Bucket([n for n, _ in g], [p for _, p in g], with_ema,
                                self.plan.device if self.plan.updates_on_device(i) else cpu,
                                self.plan.device if self.plan.ema_on_device(i) else cpu)
                        for i, g in enumerate(groups)]
        self.on_device = [self.plan.updates_on_device(i) for i in range(len(self.buckets))]
        # The worker thread's items, in bucket order: host updates, and host EMAs of GPU-updated buckets.
        self._work = [("update" if not dev else "ema", i) for i, dev in enumerate(self.on_device)
                      if not dev or (with_ema and not self.plan.ema_on_device(i))]
        self.bucket_index = {n: i for i, b in enumerate(self.buckets) for n in b.names}
        self.param_groups = [{"lr": lr, "betas": self.betas, "eps": eps, "weight_decay": weight_decay}]
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ready = [threading.Event() for _ in self.buckets]
        for e in self._ready:
            e.set()
        if self.cuda:
            self.d2h_stream, self.h2d_stream = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
            self._stages: dict[tuple[str, int, torch.dtype], Tensor] = {}  # pinned, 2 slots per dtype
            self._up_events: list[torch.cuda.Event | None] = [None] * len(self.buckets)
            self._up_slot_events: list[torch.cuda.Event | None] = [None, None]
        self._grads: list[list[Tensor | None]] | None = None

    # ------------------------------------------------------------------------------------------ hooks
    def install_prefetch_hooks(self, model: nn.Module) -> None:
        """Make each forward wait for its weights: the root for bucket 0, block i for bucket i + 1."""
        model.register_forward_pre_hook(lambda mod, args: self.wait_bucket(0))
        for i, block in enumerate(model.net.blocks.values()):
            block.register_forward_pre_hook(lambda mod, args, i=i: self.wait_bucket(min(i + 1, len(self.buckets) - 1)))

    def wait_bucket(self, i: int) -> None:
        self._ready[i].wait()
        self._raise()
        if self.cuda and self._up_events[i] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._up_events[i])

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("offloaded optimizer step failed") from err

    # ------------------------------------------------------------------------------------------ the step
    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        grads = [p.grad for b in self.buckets for p in b.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)  # fp32 accumulation of bf16 gradients
        return torch.linalg.vector_norm(torch.stack(norms))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            for p in b.params:
                p.grad = None

    @torch.no_grad()
    def step(self, *, lr: float, grad_scale: float = 1.0, iteration: int = 0) -> None:
        """Start the update with gradients multiplied by ``grad_scale`` (the clipping factor); returns at once."""
        self.synchronize()
        self.lr = lr
        self.param_groups[0]["lr"] = lr
        self._grads = [[p.grad for p in b.params] for b in self.buckets]  # kept alive until copied
        beta = power_ema_beta(iteration, self.gamma) if self.gamma is not None else None
        for i, dev in enumerate(self.on_device):
            if dev:  # enqueued on the current stream: ready for the next forward in stream order
                self._update_on_device(i, grad_scale, beta)
        for i, dev in enumerate(self.on_device):
            if not dev:
                self._ready[i].clear()
        done = None
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))  # grads written, device buckets updated
        self._thread = threading.Thread(target=self._run, args=(grad_scale, beta, done), daemon=True,
                                        name="mvmodel-offload-adamw")
        self._thread.start()

    def _adamw(self, b: _Bucket, grad: Tensor, scale: float) -> None:
        """The update of one bucket, wherever its state lives (same kernel family, same flat fp32 tensors)."""
        b.step += 1
        torch._fused_adamw_([b.master], [grad], [b.exp_avg], [b.exp_avg_sq], [], [b.step], lr=self.lr,
                            beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay,
                            eps=self.eps, amsgrad=False, maximize=False,
                            grad_scale=torch.tensor(1.0 / scale, device=b.master.device), found_inf=None)

    @staticmethod
    def _ema(ema: Tensor, master: Tensor, beta: float) -> None:
        if beta == 0.0:
            ema.copy_(master)
        else:
            ema.lerp_(master, 1.0 - beta)

    def _update_on_device(self, i: int, scale: float, beta: float | None) -> None:
        """A GPU-resident bucket: fp32 gradient -> fused AdamW -> weights written in place -> EMA if resident."""
        b = self.buckets[i]
        grad = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for g, p in zip(self._grads[i], b.params)])
        self._grads[i] = None
        self._adamw(b, grad, scale)
        del grad
        for p, v in zip(b.params, b.views(b.master)):
            p.data.copy_(v)  # rounded to the parameter's dtype, as the host path's staging copy
        if b.ema is not None and self.plan.ema_on_device(i):
            self._ema(b.ema, b.master, beta)

    def _run(self, scale: float, beta: float | None, done) -> None:
        try:
            work = self._work
            if self.cuda and work:
                torch.cuda.set_device(self.device)
                self.d2h_stream.wait_event(done)
                self.h2d_stream.wait_event(done)
                pending = self._issue_d2h(0)
            for j, (kind, i) in enumerate(work):
                b = self.buckets[i]
                if self.cuda:
                    ev, stage = pending
                    if j + 1 < len(work):
                        pending = self._issue_d2h(j + 1)
                    ev.synchronize()
                if kind == "ema":  # a GPU-updated bucket whose EMA is in host memory
                    self._ema(b.ema, stage if self.cuda else b.master, beta)
                    continue
                if self.cuda:
                    grad = self._grad_buffer(stage.numel())
                    grad.copy_(stage)  # bf16 -> fp32 into a reused buffer (fresh GB-sized allocations page-fault)
                else:
                    grad = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                      for g, p in zip(self._grads[i], b.params)])
                self._grads[i] = None  # frees the GPU gradients of this bucket
                self._adamw(b, grad, scale)
                self._upload(i)
                self._ready[i].set()
                if b.ema is not None:  # after the upload: the forward needs the weights, not the EMA
                    self._ema(b.ema, b.master, beta)
        except BaseException as e:  # noqa: BLE001 - surfaced on the training thread
            self._error = e
        finally:
            for e in self._ready:
                e.set()

    def _grad_buffer(self, n: int) -> Tensor:
        buf = getattr(self, "_grad_f32", None)
        if buf is None or buf.numel() < n:
            buf = self._grad_f32 = torch.empty(max(n, max(b.master.numel() for b in self.buckets)))
        return buf[:n]

    def _stage(self, kind: str, i: int, slot: int | None = None) -> Tensor:
        """Pinned staging buffer for bucket i: bf16 when all its weights are bf16 (the 7B's blocks), else fp32
        (always fp32 for the master weights downloaded for a host EMA)."""
        b = self.buckets[i]
        bf16 = kind != "ema" and all(p.dtype == torch.bfloat16 for p in b.params)
        dtype = torch.bfloat16 if bf16 else torch.float32
        key = (kind, i % 2 if slot is None else slot, dtype)
        n = b.master.numel()
        buf = self._stages.get(key)
        if buf is None or buf.numel() < n:
            buf = self._stages[key] = torch.empty(n, dtype=dtype, pin_memory=True)
        return buf[:n]

    def _issue_d2h(self, j: int):
        """Start the download for work item j: the bucket's gradients, or its new fp32 master (host EMA)."""
        kind, i = self._work[j]
        b = self.buckets[i]
        if kind == "ema":
            stage = self._stage("ema", i, slot=j % 2)
            with torch.cuda.stream(self.d2h_stream):
                stage.copy_(b.master, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.d2h_stream)
            return ev, stage
        stage = self._stage("grad", i, slot=j % 2)
        with torch.cuda.stream(self.d2h_stream):
            off = 0
            for g, p, k in zip(self._grads[i], b.params, b.numels):
                if g is None:
                    stage[off:off + k].zero_()
                else:
                    stage[off:off + k].copy_(g.reshape(-1).to(stage.dtype), non_blocking=True)
                off += k
            ev = torch.cuda.Event()
            ev.record(self.d2h_stream)
        return ev, stage

    def _upload(self, i: int) -> None:
        """New master weights -> the parameters (rounded to their dtype)."""
        b = self.buckets[i]
        if not self.cuda:
            for p, v in zip(b.params, b.views(b.master)):
                p.data.copy_(v)
            return
        prev = self._up_slot_events[i % 2]
        if prev is not None:
            prev.synchronize()  # the staging slot's previous upload is done
        stage = self._stage("up", i)
        stage.copy_(b.master)
        with torch.cuda.stream(self.h2d_stream):
            off = 0
            for p, k in zip(b.params, b.numels):
                p.data.view(-1).copy_(stage[off:off + k], non_blocking=True)  # bf16 (or fp32 logvar) on GPU
                off += k
            ev = torch.cuda.Event()
            ev.record(self.h2d_stream)
        self._up_events[i] = self._up_slot_events[i % 2] = ev

    def synchronize(self) -> None:
        """Wait for the running update (checkpoints, end of training)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.cuda:
            for ev in self._up_events:
                if ev is not None:
                    ev.synchronize()
        self._raise()

    def close(self) -> None:
        self.synchronize()

    # ------------------------------------------------------------------------------------------ state
    def _named(self, attr: str) -> dict[str, Tensor]:
        out = {}
        for b in self.buckets:
            flat = getattr(b, attr)
            for n, v in zip(b.names, b.views(flat)):
                out[n] = v
        return out

    # The dicts below hold VIEWS of the live flat buffers (no copies: the 7B's states fill most of host memory);
    # call synchronize() first and save them before the next step.
    def master_state(self, model: nn.Module) -> dict[str, Tensor]:
        """fp32 master weights plus the model's buffers, under the model's state-dict keys."""
        master = self._named("master")
        return {k: (master[k] if k in master else v.detach().cpu().clone()) for k, v in model.state_dict().items()}

    def ema_state(self, model: nn.Module) -> dict[str, Tensor]:
        ema = self._named("ema")
        return {k: (ema[k] if k in ema else v.detach().cpu().clone()) for k, v in model.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        m, v = self._named("exp_avg"), self._named("exp_avg_sq")
        steps = {n: b.step.detach().cpu().clone() for b in self.buckets for n in b.names}
        return {"state": {n: {"step": steps[n], "exp_avg": m[n], "exp_avg_sq": v[n]} for n in m},
                "param_groups": [{**self.param_groups[0], "params": list(m)}]}

    @torch.no_grad()
    def load_state(self, optim: dict[str, Any], master: dict[str, Tensor], ema: dict[str, Tensor] | None) -> None:
        """Restore from checkpoint dicts (``optim`` as written by the trainer) and upload the weights."""
        self.synchronize()
        state = optim["optimizer"]["state"]
        for b in self.buckets:
            missing = [n for n in b.names if n not in master or n not in state]
            if missing:
                raise ValueError(f"checkpoint lacks master weights or optimizer state for {missing[:8]}")
            for n, mv, av, sv, ev in zip(b.names, b.views(b.master), b.views(b.exp_avg), b.views(b.exp_avg_sq),
                                         b.views(b.ema) if b.ema is not None else [None] * len(b.names)):
                mv.copy_(master[n])
                av.copy_(state[n]["exp_avg"])
                sv.copy_(state[n]["exp_avg_sq"])
                if ev is not None:
                    ev.copy_((ema or master)[n])
            b.step.fill_(float(state[b.names[0]]["step"]))
            for p, v in zip(b.params, b.views(b.master)):
                p.data.copy_(v.to(p.device))


def group_params(named_params: list[tuple[str, Tensor]],
                 bucket_of: dict[str, int] | None = None) -> list[list[tuple[str, Tensor]]]:
    """The buckets, in forward order: [(name, parameter), ...] per bucket."""
    groups: dict[int, list[tuple[str, Tensor]]] = {}
    for name, p in named_params:
        groups.setdefault((bucket_of or {}).get(name, _default_bucket(name)), []).append((name, p))
    return [g for _, g in sorted(groups.items())]


def _default_bucket(name: str) -> int:
    """0 for everything outside the transformer blocks, i + 1 for ``net.blocks.block{i}.*``."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "net" and parts[1] == "blocks" and parts[2].startswith("block"):
        return int(parts[2][5:]) + 1
    return 0
