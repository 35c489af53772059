"""Context parallelism (CP) for the multi-view DiT: each sample's tokens are split over the ``cp`` ranks of a
group; only the joint self-attention talks across ranks (cosmos-multiview.md §5.5, §6.2).

Token split. Tokens run in (v, t, h, w) order, S = V * L with L = T'*H'*W' per view. Rank r of the group holds,
for every view v, the contiguous chunk ``[r*L/cp, (r+1)*L/cp)`` of that view's L tokens: a [B, V*L/cp, D] slice
made of V equal view segments. When T' is divisible by cp this is exactly upstream's split of each view's T into
cp contiguous pieces (§5.5); otherwise it cuts inside a frame, which is equally valid (only L % cp == 0 is needed).
Because every rank holds V whole-view segments, the per-view text cross-attention (queries of view v see view v's
text) and the MLP run locally and unchanged. The RoPE table stays the full [S, Dh] table: it is applied after the
exchange, on full sequences in canonical order, so view segments and connectivity masks stay correct.

Self-attention, heads divisible by cp (Ulysses): q, k, v [B, S/cp, H, Dh] are packed and sent with one
``all_to_all_single`` so that each rank gets [B, S, H/cp, Dh] (all tokens, a subset of heads), reordered to
canonical (v, t, h, w) order; the unchanged attention core (per-head norm, RoPE, SDPA / mvkernels, any view
connectivity) runs on it; a second all-to-all returns [B, S/cp, H, Dh]. Both exchanges are autograd Functions
whose backward is the inverse all-to-all.

Heads not divisible by cp: the local queries (all heads) attend to keys/values all-gathered from the group
(normed and rotated with their own RoPE rows before the gather; backward reduce-scatters dK/dV). This is the
all-gather form of ring attention (every rank ends up seeing every K/V block; here in one collective instead of
cp-1 ring steps): same FLOPs and result, K/V of the full sequence resident during one attention call. It uses
torch SDPA with a view mask whatever the attention backend.

Model level (``enable_context_parallel``): a forward pre-hook on every transformer block slices the tokens (the
first block gets the full embedding) and the per-block absolute embedding to this rank's part; a forward hook on
the final layer all-gathers its output back to [B, S, F] in canonical order, so unpatchify, the EDM loss and the
uncertainty head see the full sample on every rank of the group. That gather's backward is a reduce-scatter
(sum over the group's identical loss gradients = cp x this rank's slice): with FSDP averaging gradients over all
dp*cp ranks, every parameter then receives exactly the data-parallel mean of full-sample gradients.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..networks.attention import Attention, apply_rope, view_connectivity_matrix
from ..networks.blocks import GeneralDITTransformerBlock

# torch >= 2.12 renames the flat collectives (the old names warn); the GPU image's 2.11 has only the old ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllToAll(torch.autograd.Function):
    """x [cp, ...] -> [cp, ...]: chunk i goes to rank i, chunk i of the result came from rank i. Its own inverse,
    so backward sends the gradient the same way back."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _AllGather(torch.autograd.Function):
    """x [...] -> [cp, ...] (rank i's x at index i); backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        n = dist.get_world_size(group)
        out = x.new_empty((n * x.numel(),))
        _all_gather(out, x.contiguous().reshape(-1), group=group)
        return out.view(n, *x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((grad[0].numel(),))
        _reduce_scatter(out, grad.contiguous().reshape(-1), group=ctx.group)
        return out.view(grad.shape[1:]), None


def _check_split(S: int, n_views: int, cp: int) -> int:
    """Tokens per view per rank, or a ValueError naming what does not divide."""
    if S % n_views or (S // n_views) % cp:
        raise ValueError(f"context parallelism: the sequence of {S} tokens in {n_views} views must split into "
                         f"{n_views} equal view segments each divisible by context_parallel_size={cp} "
                         f"(tokens per view: {S / n_views:g})")
    return S // n_views // cp


def split_tokens(x: Tensor, n_views: int, cp: int, rank: int) -> Tensor:
    """[B, S, ...] (canonical (v, t, h, w) order) -> [B, S/cp, ...]: rank's chunk of every view's tokens."""
    Lv = _check_split(x.shape[1], n_views, cp)
    return x.unflatten(1, (n_views, cp, Lv))[:, :, rank].flatten(1, 2)


def gather_tokens(x: Tensor, n_views: int, group) -> Tensor:
    """Inverse of ``split_tokens`` over the group: [B, S/cp, ...] -> [B, S, ...] in canonical order."""
    g = _AllGather.apply(x, group)  # [cp, B, V*Lv, ...]
    Lv = x.shape[1] // n_views
    g = g.unflatten(2, (n_views, Lv)).movedim(0, 2)  # [B, V, cp, Lv, ...]
    return g.flatten(1, 3)


def seq_to_heads(x: Tensor, n_views: int, group) -> Tensor:
    """Ulysses exchange: [B, S/cp, ..., H, Dh] -> [B, S, ..., H/cp, Dh], tokens in canonical order; this rank
    keeps head group ``rank`` (heads [rank*H/cp, (rank+1)*H/cp))."""
    cp = dist.get_world_size(group)
    H = x.shape[-2]
    y = x.unflatten(-2, (cp, H // cp)).movedim(-3, 0)  # [cp(head group), B, S/cp, ..., H/cp, Dh]
    y = _AllToAll.apply(y, group)  # [cp(source rank), B, S/cp, ..., H/cp, Dh]
    Lv = x.shape[1] // n_views
    return y.unflatten(2, (n_views, Lv)).movedim(0, 2).flatten(1, 3)  # [B, V, cp, Lv, ...] -> [B, S, ...]


def heads_to_seq(x: Tensor, n_views: int, group) -> Tensor:
    """Inverse of ``seq_to_heads``: [B, S, H/cp, Dh] -> [B, S/cp, H, Dh]."""
    cp = dist.get_world_size(group)
    Lv = x.shape[1] // n_views // cp
    y = x.unflatten(1, (n_views, cp, Lv)).movedim(2, 0)  # [cp(token chunk), B, V, Lv, H/cp, Dh]
    y = _AllToAll.apply(y, group)  # [cp(head group), B, V, Lv, H/cp, Dh]
    return y.movedim(0, -3).flatten(-3, -2).flatten(1, 2)  # [B, V, Lv, cp, H/cp, Dh] -> [B, S/cp, H, Dh]


class ContextParallel:
    """The context-parallel group of one rank; set as ``Attention.cp`` on self-attention modules.

    ``attend`` picks Ulysses when the heads divide by the group size, the K/V all-gather otherwise.
    """

    def __init__(self, group) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.n_views: int | None = None  # set by the block hook, read by the final-layer hook
        # True: the collectives run eagerly between compiled pieces (dynamo graph-breaks at them).
        self.collectives_outside_compile = False

    def _c(self, fn):
        return _eager(fn) if self.collectives_outside_compile else fn

    def mode(self, heads: int) -> str:
        return "ulysses" if heads % self.size == 0 else "allgather_kv"

    def attend(self, attn: Attention, q: Tensor, k: Tensor, v: Tensor, rope_angles: Tensor | None, n_views: int,
               connectivity: Any) -> Tensor:
        """q, k, v [B, S/cp, H, Dh] (this rank's tokens, before norms/RoPE) -> attention output [B, S/cp, H, Dh].

        ``rope_angles`` is the full [S, Dh] table (S = cp * local tokens)."""
        B, S_loc, H, Dh = q.shape
        if rope_angles is not None and rope_angles.shape[0] != S_loc * self.size:
            raise ValueError(f"context parallelism: rope_angles has {rope_angles.shape[0]} rows; expected the full "
                             f"table of {S_loc * self.size} tokens ({S_loc} local x cp={self.size})")
        _check_split(S_loc * self.size, n_views, self.size)
        if self.mode(H) == "ulysses":
            qkv = self._c(seq_to_heads)(torch.stack([q, k, v], dim=2), n_views, self.group)  # [B, S, 3, H/cp, Dh]
            out = attn.core(*qkv.unbind(2), rope_angles, n_views, connectivity)
            return self._c(heads_to_seq)(out, n_views, self.group)
        return self._attend_allgather(attn, q, k, v, rope_angles, n_views, connectivity)

    def _attend_allgather(self, attn: Attention, q: Tensor, k: Tensor, v: Tensor, rope_angles: Tensor | None,
                          n_views: int, connectivity: Any) -> Tensor:
        S_loc = q.shape[1]
        q, k = attn.to_q[1](q), attn.to_k[1](k)
        if rope_angles is not None:
            local = split_tokens(rope_angles[None], n_views, self.size, self.rank)[0]
            q, k = apply_rope(q, local), apply_rope(k, local)
        kv = self._c(gather_tokens)(torch.stack([k, v], dim=2), n_views, self.group)  # [B, S, 2, H, Dh]
        k, v = kv.unbind(2)
        conn = view_connectivity_matrix(connectivity, n_views, q.device)
        mask = None
        if conn is not None and not bool(conn.all()):
            views = torch.arange(n_views, device=q.device)
            mask = conn[views.repeat_interleave(S_loc // n_views)][:, views.repeat_interleave(k.shape[1] // n_views)]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    # ---------------------------------------------------------------------------------------- model hooks
    def _split_block_inputs(self, module: nn.Module, args: tuple, kwargs: dict):
        ba = _BLOCK_SIG.bind(*args, **kwargs)
        ba.apply_defaults()
        a = ba.arguments
        angles, n_views = a["rope_angles"], int(a["n_views"])
        if angles is None:
            raise ValueError("context parallelism needs the RoPE table (rope_angles) to know the full sequence")
        S = angles.shape[0]
        self.n_views = n_views
        if a["x"].shape[1] == S:  # the first block receives the full embedding; later blocks the local slice
            a["x"] = split_tokens(a["x"], n_views, self.size, self.rank)
        elif a["x"].shape[1] * self.size != S:
            raise ValueError(f"context parallelism: block input has {a['x'].shape[1]} tokens, expected {S} (full) "
                             f"or {S // self.size} (local, cp={self.size})")
        extra = a["extra_pos_emb"]
        if extra is not None and extra.shape[1] == S:
            a["extra_pos_emb"] = split_tokens(extra, n_views, self.size, self.rank)
        return tuple(ba.args), dict(ba.kwargs)

    def _gather_output(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if self.n_views is None:
            raise RuntimeError("context parallelism: the final layer ran before any transformer block")
        return gather_tokens(output, self.n_views, self.group)


_EAGER: dict = {}


def _eager(fn):
    """``fn`` excluded from torch.compile (cached: one wrapper per function)."""
    if fn not in _EAGER:
        _EAGER[fn] = torch.compiler.disable(fn)
    return _EAGER[fn]


_BLOCK_SIG = inspect.Signature(list(inspect.signature(GeneralDITTransformerBlock.forward).parameters.values())[1:])


def enable_context_parallel(net: nn.Module, group) -> ContextParallel | None:
    """Install CP on a ``MultiviewDiT`` (in place; parameters and state-dict keys untouched). ``group``: the
    ranks sharing one sample. Returns the hook object, or None for a group of one (nothing to do)."""
    if dist.get_world_size(group) == 1:
        return None
    if getattr(net, "_context_parallel", None) is not None:
        raise RuntimeError("context parallelism is already enabled on this net")
    cp = ContextParallel(group)
    for m in net.modules():
        if isinstance(m, Attention) and m.is_selfattn:
            m.cp = cp
    handles = [tb.register_forward_pre_hook(cp._split_block_inputs, with_kwargs=True) for tb in net.blocks.values()]
    handles.append(net.final_layer.register_forward_hook(cp._gather_output))
    net._context_parallel = cp
    net._context_parallel_handles = handles
    return cp


def disable_context_parallel(net: nn.Module) -> None:
    """Undo ``enable_context_parallel``: the net runs single-rank again."""
    for h in getattr(net, "_context_parallel_handles", []):
        h.remove()
    for m in net.modules():
        if isinstance(m, Attention):
            m.cp = None
    net._context_parallel = None
    net._context_parallel_handles = []


def context_parallel_mesh(device_type: str, world_size: int, cp: int):
    """The 2-D (dp, cp) device mesh: ranks ``d*cp .. d*cp+cp-1`` share sample stream d (CP innermost, so a group
    stays inside one node's NVLink domain). FSDP shards parameters over all dp*cp ranks (a 1-D world mesh)."""
    if cp < 1 or world_size % cp:
        raise ValueError(f"parallel.context_parallel_size={cp} must be >= 1 and divide the world size {world_size}")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size // cp, cp), mesh_dim_names=("dp", "cp"))
