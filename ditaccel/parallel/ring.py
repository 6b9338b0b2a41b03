"""Ring context parallelism: a rank's query rows against KV chunks that rotate round the ring, merged by LSE.

Under ``ContextParallelConfig(ring_degree=P)`` rank r holds chunk r of diffusers' parallel sequence:
its q, k, v rows for every head. No sparse backend in the field runs this (their kernels return no
LSE); ditaccel does, in three steps per attention call:

- **the plan** is the single process's plan of the whole call. A static method's depends on the
  shape alone; a dynamic method (topk, xattn, heads, a table with such rules) scores the whole
  sequence, so its q, k, v are all-gathered over the ring group for it
  (``RingCall.all_gather_model_order``, asked by the runtime's ``_compute_ring``): every rank then
  makes the plan one process makes, bit for bit;
- **the ring**: P rounds; in round i rank r holds the KV chunk of rank (r - i) mod P, passes it on
  to rank r + 1 while it computes (one asynchronous send/receive per round, P - 1 in all), and
  computes its query rows against that chunk's keys under the plan restricted to them
  (``ChunkSlots``, ``_sub_block_mask``): the plan's query blocks that hold its rows x the key blocks
  that hold the chunk's keys, with every other slot of those blocks masked. A chunk whose restriction
  keeps no block pair for the rank's rows is not computed at all. Restrictions are kept for as long
  as their plan lives (a static plan's: built once);
- **the merge**: the chunks' outputs are combined by their log-sum-exps (``kernels.merge``).

The same loop gives the dense side (``RingExecutor.dense``: every key of every chunk) and the kept
attention mass of renormalise (kept LSE against dense LSE). What it costs against a ring of whole
blocks: where a plan's block straddles two ranks' rows (tiles cut by the chunk boundary), both
ranks compute that block, each for its own rows.

A plan with one token order per head (``cluster``; ``heads`` with temporal heads) puts a rank's rows
in other blocks for every head: it runs head by head, one restricted plan per head. With Ulysses as
well (``ulysses_degree`` U), ``attend.ring_attend`` runs Ulysses' all-to-all first: a ring rank's
chunk is then its ulysses group's U pieces side by side, for H/U heads (``ring_call``).
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

from ..kernels import select_executor
from ..kernels.merge import merge_by_lse
from ..plan import _lists

_RING_CALLS: dict = {}  # (group, rank, degrees, rows, text span) -> RingCall


@dataclasses.dataclass(frozen=True)
class RingPeers:
    """Where this rank sits on the ring: its place, the degree, and the ring's process group."""

    rank: int
    degree: int
    group: object

    def pass_on(self, tensor: torch.Tensor):
        """Send ``tensor`` to the next rank and receive the previous rank's: returns a function that
        waits for the exchange and gives the received tensor (asynchronous: compute in between)."""
        import torch.distributed as dist

        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, group=self.group, group_peer=(self.rank + 1) % self.degree),
               dist.P2POp(dist.irecv, received, group=self.group, group_peer=(self.rank - 1) % self.degree)]
        works = dist.batch_isend_irecv(ops)

        def wait() -> torch.Tensor:
            for work in works:
                work.wait()
            return received

        return wait


@dataclasses.dataclass(frozen=True)
class ChunkSlots:
    """One chunk's tokens (a rank's rows or keys) inside a plan's slots.

    ``blocks``: the plan's blocks holding any of the chunk's tokens, ascending ([n] long); the
    chunk's sub-sequence is those blocks side by side, ``at``: where each token of the chunk (in the
    chunk's own order) lands in it ([s] long); ``slots``: the global slot of each position of the
    sub-sequence ([n * block_size] long, clamped into the plan)."""

    blocks: torch.Tensor
    at: torch.Tensor
    slots: torch.Tensor

    @classmethod
    def of(cls, slot_of_token: torch.Tensor, block_size: int, num_slots: int) -> "ChunkSlots":
        blocks = torch.unique(slot_of_token // block_size)  # sorted
        index_of_block = torch.full((int(blocks.max()) + 1,), -1, dtype=torch.long, device=blocks.device)
        index_of_block[blocks] = torch.arange(blocks.numel(), device=blocks.device)
        at = index_of_block[slot_of_token // block_size] * block_size + slot_of_token % block_size
        slots = (blocks[:, None] * block_size + torch.arange(block_size, device=blocks.device)).flatten()
        return cls(blocks=blocks, at=at, slots=slots.clamp(max=num_slots - 1))


class RingCall:
    """One attention call under ring context parallelism: this rank's q, k, v rows and where every
    chunk's tokens sit in the model's order (``chunk_positions``: [P, s] long, chunk c = rank c's)."""

    def __init__(self, peers: RingPeers, chunk_positions: torch.Tensor):
        self.peers = peers
        self.chunk_positions = chunk_positions
        self.seq_len = chunk_positions.numel()
        # Kept across calls (``ring_call`` hands out one RingCall per shape) for as long as their plan /
        # layout lives: a static plan is the same object at every call (its method caches it), so its
        # restrictions are built once; a dynamic plan's go with it when the call drops it.
        self._slots: dict = {}  # id(layout) -> (weakref to it, {(chunk, head): ChunkSlots})
        self._masks: dict = {}  # id(plan) -> (weakref to it, {(chunk, head): (BlockMask or None, rows, keys)})

    def restricted(self, plan, chunk: int, device, head: int | None):
        """The plan restricted to this rank's rows x chunk ``chunk``'s keys (``_sub_block_mask``), cached:
        (BlockMask, or None where it keeps nothing; the rows' ChunkSlots; the keys')."""
        per = _kept_for(self._masks, plan)
        hit = per.get((chunk, head))
        if hit is None:
            rows = self.chunk_slots(plan.layout, self.peers.rank, device, head)
            keys = self.chunk_slots(plan.layout, chunk, device, head)
            hit = per[(chunk, head)] = (_sub_block_mask(plan, rows, keys, head), rows, keys)
        return hit

    def all_gather_model_order(self, x: torch.Tensor) -> torch.Tensor:
        """[B, s, ...] rows of every rank -> [B, S, ...] in the model's order (a collective)."""
        return gather_in_model_order(x, 1, self.peers.group, self.chunk_positions)

    def chunk_slots(self, layout, chunk: int, device, head: int | None = None) -> ChunkSlots:
        """Where chunk ``chunk``'s tokens sit in ``layout``'s slots (``head``: that head's, for a layout
        with one token order per head)."""
        per = _kept_for(self._slots, layout)
        hit = per.get((chunk, head))
        if hit is None:
            inverse = layout.device_index("inverse", device)  # model token -> slot ([H, S] per head)
            if head is not None:
                inverse = inverse[head]
            hit = per[(chunk, head)] = ChunkSlots.of(inverse[self.chunk_positions[chunk].to(device)],
                                                     layout.block_size, layout.num_slots)
        return hit


def gather_in_model_order(x: torch.Tensor, dim: int, group, positions: torch.Tensor) -> torch.Tensor:
    """Every rank of ``group``'s piece of ``x`` along ``dim`` (rank i's: the tokens at model positions
    ``positions[i]``), all-gathered and put at those positions: the whole sequence in the model's
    order (a collective). Bool tensors travel as uint8 (gloo gathers no bool)."""
    import torch.distributed as dist

    wire = x.contiguous()
    wire = wire.to(torch.uint8) if x.dtype == torch.bool else wire
    pieces = [torch.empty_like(wire) for _ in range(positions.shape[0])]
    dist.all_gather(pieces, wire, group=group)
    shape = list(x.shape)
    shape[dim] = positions.numel()
    whole = wire.new_empty(shape)
    for piece, at in zip(pieces, positions.to(x.device)):
        whole.index_copy_(dim, at, piece)
    return whole.to(x.dtype)


def _kept_for(store: dict, owner) -> dict:
    """``store``'s dict for ``owner`` (a plan or a layout), made empty on first use and dropped when
    ``owner`` is collected: a weak reference, so the cache never keeps a plan alive."""
    entry = store.get(id(owner))
    if entry is None or entry[0]() is not owner:
        entry = store[id(owner)] = (weakref.ref(owner), {})
        weakref.finalize(owner, store.pop, id(owner), None)
    return entry[1]


def _sub_block_mask(plan, rows: ChunkSlots, keys: ChunkSlots, head: int | None = None):
    """The plan restricted to ``rows``' query blocks x ``keys``' key blocks (``head``: of that head
    alone, as head 0 of the result), on sub-sequences of one length (the larger block count; the
    other side's extra blocks are empty); None when it keeps no block pair."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = plan.layout.block_size
    n = max(rows.blocks.numel(), keys.blocks.numel())

    def restrict(blocks):
        while blocks.dim() < 4:
            blocks = blocks.unsqueeze(0)
        if head is not None and blocks.shape[1] > 1:
            blocks = blocks[:, head:head + 1]
        sub = blocks.index_select(-2, rows.blocks).index_select(-1, keys.blocks)
        pad = (0, n - sub.shape[-1], 0, n - sub.shape[-2])
        return torch.nn.functional.pad(sub, pad) if any(pad) else sub

    any_blocks, full_blocks = restrict(plan.any_blocks), restrict(plan.full_blocks)
    if not bool(any_blocks.any()):
        return None
    base = plan.block_mask.mask_mod
    q_slots = torch.nn.functional.pad(rows.slots, (0, n * bs - rows.slots.numel()), value=int(rows.slots[-1]))
    k_slots = torch.nn.functional.pad(keys.slots, (0, n * bs - keys.slots.numel()), value=int(keys.slots[-1]))

    def mask_mod(b, h, q_idx, kv_idx):  # a sub-sequence position -> the plan's own slot, its own rule
        return base(b, h if head is None else h + head, q_slots[q_idx.clamp(0, n * bs - 1)],
                    k_slots[kv_idx.clamp(0, n * bs - 1)])

    kv_num, kv_idx = _lists(any_blocks & ~full_blocks)
    full_num, full_idx = _lists(full_blocks)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(n * bs, n * bs), compute_q_blocks=False)


class RingExecutor:
    """Runs plans (and dense attention) for this rank's rows round the ring; the runtime's
    ``PlanExecutor`` for one call, with its ``run`` / ``kept_mass`` and a ``dense``.

    q, k, v: [B, s, H, D], this rank's rows in chunk order; ``key_valid``: [B, Hm, S] bool over the
    whole sequence in the model's order (None: every key); ``row_live``: [B, Hm, s] (None: all)."""

    def __init__(self, ring: RingCall, q, k, v, key_valid, scale, backend: str, on_run=None, row_live=None):
        self.ring, self.q, self.k, self.v = ring, q, k, v
        if key_valid is not None and key_valid.dim() == 2:
            key_valid = key_valid[:, None, :]
        self.key_valid = key_valid
        self.row_live = row_live
        self.scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        self.backend, self.on_run = backend, on_run

    # --- the ring ------------------------------------------------------------------------------
    def _empty(self, heads: int):
        """(out, lse) of rows that see no key: zeros and -inf, [B, heads, s, Dv] / [B, heads, s]."""
        B, s = self.q.shape[:2]
        return (self.q.new_zeros(B, heads, s, self.v.shape[-1]),
                torch.full((B, heads, s), float("-inf"), dtype=torch.float32, device=self.q.device))

    def _round_robin(self, *computes):
        """Per ``compute(chunk, k, v)`` -> (out [B, H, s, D], lse [B, H, s]) or None (skipped): its
        chunks' results merged by LSE, over one pass of the chunks round the ring."""
        peers = self.ring.peers
        kv = torch.stack((self.k, self.v)).contiguous() if self.k.shape == self.v.shape else None
        k, v = self.k, self.v
        results = [[] for _ in computes]
        for i in range(peers.degree):
            chunk = (peers.rank - i) % peers.degree
            if kv is None:  # k and v of other head dims: two exchanges
                wait_k, wait_v = (peers.pass_on(x.contiguous()) for x in (k, v)) if i + 1 < peers.degree \
                    else (None, None)
            else:
                wait_kv = peers.pass_on(kv) if i + 1 < peers.degree else None
            for compute, merged in zip(computes, results):
                result = compute(chunk, k, v)
                if result is not None:
                    merged.append(result)
            if i + 1 < peers.degree:
                if kv is None:
                    k, v = wait_k(), wait_v()
                else:
                    kv = wait_kv()
                    k, v = kv[0], kv[1]
        # no chunk kept anything for these rows: what a row that sees no key gets
        return [merge_by_lse(*zip(*merged)) if merged else self._empty(self.q.shape[2]) for merged in results]

    def _chunk_key_valid(self, chunk: int):
        if self.key_valid is None:
            return None
        return self.key_valid.index_select(-1, self.ring.chunk_positions[chunk].to(self.key_valid.device))

    def _dense_chunk(self, chunk, k, v):
        # The same explicit softmax the executors run when they return the LSE (kernels/reference.py):
        # a dense-method plan round the ring then gives exactly this dense side, as it does in one process.
        valid = self._chunk_key_valid(chunk)
        wide = torch.float64 if self.q.dtype == torch.float64 else torch.float32
        q, k, v = (x.transpose(1, 2).to(wide) for x in (self.q, k, v))  # [B, H, s, D]
        logits = (q @ k.transpose(-1, -2)) * self.scale
        if valid is not None:
            logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
        lse = torch.logsumexp(logits, -1)
        weights = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        return (weights @ v).to(self.q.dtype), lse

    def _plan_chunk(self, plan, chunk, k, v):
        """This rank's rows against chunk ``chunk``'s keys under ``plan``; None if it keeps no block pair.
        A plan with one token order per head (cluster, heads with temporal heads) runs head by head."""
        if not plan.layout.per_head:
            return self._heads_chunk(plan, chunk, k, v, None)
        parts = [self._heads_chunk(plan, chunk, k, v, h) for h in range(self.q.shape[2])]
        if all(p is None for p in parts):
            return None
        parts = [self._empty(1) if p is None else p for p in parts]
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    def _heads_chunk(self, plan, chunk, k, v, head):
        """``_plan_chunk`` for every head (``head`` None: one token order for all) or for head ``head``."""
        device = self.q.device
        block_mask, rows, keys = self.ring.restricted(plan, chunk, device, head)
        if block_mask is None:  # the plan keeps no block pair of these rows x this chunk's keys
            return None
        q = self.q if head is None else self.q[:, :, head:head + 1]
        if head is not None:
            k, v = k[:, :, head:head + 1], v[:, :, head:head + 1]
        n = block_mask.seq_lengths[0]
        B, _, H, _ = q.shape

        def sub(x, at):  # [B, s, H, D] -> [B, H, n, D], the tokens at their sub-sequence positions
            out = x.new_zeros(B, H, n, x.shape[-1])
            out[:, :, at] = x.transpose(1, 2)
            return out

        qs, ks, vs = sub(q, rows.at), sub(k, keys.at), sub(v, keys.at)
        chunk_valid = self._chunk_key_valid(chunk)
        if chunk_valid is not None and head is not None and chunk_valid.shape[1] > 1:
            chunk_valid = chunk_valid[:, head:head + 1]
        valid = torch.zeros(B, 1 if chunk_valid is None else chunk_valid.shape[1], n, dtype=torch.bool,
                            device=device)
        valid[:, :, keys.at] = True if chunk_valid is None else chunk_valid
        name, execute = select_executor(self.backend, qs, ks, vs, block_mask)
        out, lse = execute(qs, ks, vs, block_mask, self.scale, key_valid=valid, return_lse=True)
        if self.on_run is not None:
            self.on_run(name)
        return out[:, :, rows.at], lse[:, :, rows.at]

    # --- what the runtime calls ----------------------------------------------------------------
    def _rows(self, out: torch.Tensor) -> torch.Tensor:
        out = out.transpose(1, 2)  # [B, s, H, D]
        if self.row_live is not None:  # rows whose every key is masked: zeros, as one process gives them
            out = torch.where(self.row_live.transpose(1, 2)[..., None], out, 0.0)
        return out.to(self.q.dtype)

    def dense(self) -> torch.Tensor:
        return self._rows(self._round_robin(self._dense_chunk)[0][0])

    def run(self, plan) -> torch.Tensor:
        return self._rows(self._round_robin(lambda c, k, v: self._plan_chunk(plan, c, k, v))[0][0])

    def kept_mass(self, plan) -> torch.Tensor:
        """[B, s, H, 1]: the fraction of each row's softmax mass on the keys ``plan`` keeps (the kept
        and the dense LSE from one pass of the chunks)."""
        (_, lse_kept), (_, lse_dense) = self._round_robin(lambda c, k, v: self._plan_chunk(plan, c, k, v),
                                                          self._dense_chunk)
        rho = torch.where(torch.isfinite(lse_dense), torch.exp(lse_kept.double() - lse_dense.double()), 0.0)
        return rho.transpose(1, 2)[..., None].to(self.q.dtype)


def ring_call(cp, local_len: int, text_len: int, text_position: str) -> RingCall:
    """The ``RingCall`` of an attention call of ``local_len`` rows per ring rank under ``cp`` (one per
    shape, kept). diffusers splits each stream over every rank of its (ring, ulysses) mesh,
    ring-major: ring rank r's chunk is the pieces of ranks r * U .. r * U + U - 1 side by side
    (U = ulysses_degree, 1 without Ulysses)."""
    from .order import parallel_positions

    degree, pieces = cp.ring_degree, cp.ring_degree * (cp.ulysses_degree or 1)
    group = cp._ring_mesh.get_group()
    key = (id(group), cp._ring_local_rank, degree, pieces, local_len, text_len, text_position)
    hit = _RING_CALLS.get(key)
    if hit is None or hit[0] is not group:
        if len(_RING_CALLS) >= 64:  # a few shapes per pipeline; bound what a long-lived process keeps
            _RING_CALLS.clear()
        seq_len = local_len * degree
        positions = parallel_positions(seq_len, text_len, text_position, pieces)
        if positions is None:
            positions = torch.arange(seq_len)
        hit = _RING_CALLS[key] = (group, RingCall(RingPeers(cp._ring_local_rank, degree, group),
                                                  positions.view(degree, -1)))
    return hit[1]


__all__ = ["ChunkSlots", "RingCall", "RingExecutor", "RingPeers", "gather_in_model_order", "ring_call"]
