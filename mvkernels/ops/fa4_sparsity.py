"""View-sparse connectivity for FlashAttention-4: 128 x 128 block-sparsity tensors and the CuTe mask rule.

FA4 skips empty blocks, runs full blocks unmasked and applies ``mask_mod`` only inside partial blocks (those that
straddle a view boundary). The tensors follow its ``BlockSparseTensorsTorch`` layout: per query block the count
and the indices of partial ("mask") and full key blocks (forward), and per key block the same over query blocks
(backward). They depend only on (Sq, Sk, n_views, connectivity), so they are built once and cached.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK = 128  # FA4's SM90 tile for head dim 128; the sparse block must be a multiple of its tiles


def block_classes(n_views: int, conn: tuple[bool, ...], Sq: int, Sk: int, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """(partial, full): bool ``[nq, nk]`` block maps for views of Sq / n_views query and Sk / n_views key tokens.

    A block is full when every (query view, key view) pair it spans is connected, partial when some are."""
    c = torch.tensor(conn, dtype=torch.float64).view(n_views, n_views)

    def occupancy(S: int) -> Tensor:  # [n_blocks, n_views]: block i holds tokens of view v
        view_of = torch.arange(S) // (S // n_views)
        nb = -(-S // block)
        occ = torch.zeros(nb, n_views, dtype=torch.float64)
        occ[torch.arange(S) // block, view_of] = 1.0
        return occ

    oq, ok = occupancy(Sq), occupancy(Sk)
    connected = oq @ c @ ok.T
    pairs = oq.sum(1, keepdim=True) * ok.sum(1)[None, :]
    full = connected == pairs
    return (connected > 0) & ~full, full


def _ordered(m: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: count of true entries and their column indices first (int32, [1, 1, rows] / [1, 1, rows, cols])."""
    cnt = m.sum(1, dtype=torch.int32)
    idx = torch.argsort((~m).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return cnt[None, None].contiguous(), idx[None, None].contiguous()


@functools.lru_cache(maxsize=16)
def sparse_plan(n_views: int, conn: tuple[bool, ...], Sq: int, Sk: int, device: str):
    """(forward tensors, backward tensors, mask_mod, aux_tensors) for FA4, cached per pattern and device."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: PLC0415 - optional dependency

    partial, full = block_classes(n_views, conn, Sq, Sk)
    tensors = []
    for p, f in ((partial, full), (partial.T, full.T)):
        (pc, pi), (fc, fi) = _ordered(p), _ordered(f)
        tensors.append(BlockSparseTensorsTorch(
            mask_block_cnt=pc.to(device), mask_block_idx=pi.to(device), full_block_cnt=fc.to(device),
            full_block_idx=fi.to(device), block_size=(BLOCK, BLOCK)))
    view_conn = torch.tensor(conn, dtype=torch.int32, device=device).view(n_views, n_views)
    return tensors[0], tensors[1], _mask_mod(Sq // n_views, Sk // n_views), [view_conn]


def _mask_mod(q_len: int, k_len: int):
    """CuTe mask: query token m (view m // q_len) sees key token n (view n // k_len) when conn[qv, kv]."""
    import cutlass  # noqa: PLC0415
    import cutlass.cute as cute  # noqa: PLC0415
    from flash_attn.cute import utils as fa_utils  # noqa: PLC0415

    @cute.jit
    def view_mask(batch, head, m_idx, n_idx, seqlen_info, aux_tensors):
        view_conn = aux_tensors[0]
        qv = m_idx // fa_utils.scalar_to_ssa(q_len, cutlass.Int32)
        kv = n_idx // fa_utils.scalar_to_ssa(k_len, cutlass.Int32)
        seen = fa_utils.scalar_to_ssa(view_conn[qv[0], kv[0]], cutlass.Int32)
        return seen != fa_utils.scalar_to_ssa(0, cutlass.Int32)

    return view_mask
