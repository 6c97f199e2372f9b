"""PEER's retrieved experts (and PKM's values) for each token in one pass, forward and
backward, without building the ``(N, H, k, D)`` gather.

For token n with J = H·k retrieved experts ``idx[n, j]``, gates ``g[n, j]``:

    PEER:  pre_j = u_{idx_j} · x_n,   y_n = Σ_j g_j σ(pre_j) v_{idx_j}        (σ: GELU or ReLU)
    PKM:   y_n = Σ_j g_j v_{idx_j}                                              (values only)

The eager layer gathers the ``u`` rows into an ``(N, H, k, D)`` tensor (8.6 GB in float32
at the issue's size, and its backward sorts and accumulates as many rows). Here one
program per token reads its J rows of ``u`` once (the J dot products stay in registers),
then its J rows of ``v`` once, and writes ``y_n``; it also writes ``pre`` (``(N, J)``,
float32) for the backward. Backward, in two passes:

    per token n:    dw_j   = dy_n · v_{idx_j}              (reads the v rows)
                    dg_j   = dw_j σ(pre_j)                 dpre_j = dw_j g_j σ'(pre_j)
                    dx_n   = Σ_j dpre_j u_{idx_j}          (reads the u rows)
    per pool row i: du_i   = Σ_{(n,j): idx_nj = i} dpre_nj x_n
                    dv_i   = Σ_{(n,j): idx_nj = i} g_nj σ(pre_nj) dy_n

The second pass walks the (token, slot) pairs sorted by row (a stable sort, so each
row's sum has a fixed order), cut into parts of at most 512 pairs (a frequent token's
rows hold thousands of pairs): a part is summed in order by one program, a row of several
parts is the sum of its parts in order. Every row gradient is written once, rows never
retrieved get exactly zero without a separate fill, and the result is deterministic (no
atomic adds). x and dy are read once per pair, in their own dtype (the layers pass bf16 under
autocast: the bytes of this pass are mostly these reads); the tables' gradients are
written once, in the tables' dtype, from float32 sums.

Under bf16 autocast the per-token passes can read the retrieved rows from bf16 copies
(``table_copies``): a training batch reads each of its rows many times (s120m-peer: 4.2M
(token, slot) pairs over a few thousand rows), so halving the bytes of every read pays
for writing the copies, made of the rows this batch retrieved only (the others are never
read, and are left unwritten). The eager layer casts the ``u`` rows to bf16 too; the
``v`` rows it reads in float32, so with copies the output differs from it by the bf16
rounding of ``v`` (relative 2⁻⁹ per entry, below the rounding of the bf16 output); the
gradients carry it through ``dw = dy · v`` (the row pass itself reads x and dy, not the
tables).

Kernel → launcher → ``torch.library.custom_op`` (fake implementation) → autograd; the
eager layer (``finemoe.layers.peer``) is the reference; tests run these kernels on the
CPU under ``TRITON_INTERPRET=1``.

Shapes: N tokens, D model width, J = H·k retrieved experts per token (padded to JP, a
power of two), P experts in the pool.
"""

from __future__ import annotations

import torch
from torch import Tensor

from finemoe.kernels.grouping import group_by_index
from finemoe.kernels.op import fake, kernel_op, launch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["ACTIVATIONS", "peer_experts", "peer_experts_available", "table_copies_pay"]

ACTIVATIONS = ("gelu", "relu", "none")  # "none": PKM (w = g)
_BLOCK_D = 64  # columns per step of the per-token passes (a (JP, 64) float32 tile)
# The per-row gradient pass: rows of more than 512 pairs cut into parts of 512, 256 columns per
# program at 2 warps, 4 pairs per step (H100, benchmarks/experiments/peer_row_pass.py on the
# retrievals of a real s120m-peer batch and on uniform ones; benchmarks/NOTES.md); shorter rows
# one program each, 1,024 columns at 4 warps. Loading 16 pairs' rows as one (16, 256) tile
# measured 10x slower.
_ROW_BLOCK_D, _ROW_WARPS, _ROW_UNROLL, _ROW_PART = 256, 2, 4, 512
_SHORT_BLOCK_D, _SHORT_WARPS = 1024, 4
_NUM_WARPS = 4  # of the per-token passes
_COPY_ROWS = 8  # rows per program of the copy of the retrieved rows (most programs only read flags)
_COPY_READS = 8  # table copies pay when a batch reads each row this many times on average


def table_copies_pay(pairs: int, rows: int, x_dtype: torch.dtype, table_dtype: torch.dtype) -> bool:
    """Whether the per-token passes should read copies of the retrieved rows in the
    input's dtype: it is narrower than the tables' (bf16 under autocast, float32 tables),
    and the batch's ``pairs`` (token, slot) retrievals read each of the ``rows`` at least
    ``_COPY_READS`` times on average (a copy is one read and one write of a retrieved row;
    at issue 12's layer size, 2M pairs over 1M rows, it would not pay)."""
    narrower = torch.finfo(x_dtype).bits < torch.finfo(table_dtype).bits
    return narrower and pairs >= _COPY_READS * rows


def peer_experts_available() -> bool:
    """Triton is installed (on a CPU the kernels run only under ``TRITON_INTERPRET=1``)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _act(pre, ACT: tl.constexpr):
        if ACT == 0:  # exact GELU, x·Φ(x)
            return 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))
        else:
            return tl.maximum(pre, 0.0)

    @triton.jit
    def _act_grad(pre, ACT: tl.constexpr):
        if ACT == 0:  # Φ(x) + x·φ(x)
            cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
            return cdf + pre * 0.3989422804014327 * tl.exp(-0.5 * pre * pre)
        else:
            return (pre > 0.0).to(tl.float32)

    @triton.jit
    def _retrieved(idx_ptr, gate_ptr, n, J: tl.constexpr, JP: tl.constexpr):
        """Token n's J retrieved rows (padded to JP, masked) and their gates."""
        js = tl.arange(0, JP)
        jmask = js < J
        rows = tl.load(idx_ptr + n * J + js, mask=jmask, other=0).to(tl.int64)
        gates = tl.load(gate_ptr + n * J + js, mask=jmask, other=0.0).to(tl.float32)
        return js, jmask, rows, gates

    @triton.jit
    def _peer_forward_kernel(x_ptr, idx_ptr, gate_ptr, u_ptr, v_ptr, y_ptr, pre_ptr, D,
                             J: tl.constexpr, JP: tl.constexpr, HAS_U: tl.constexpr, ACT: tl.constexpr,
                             BLOCK_D: tl.constexpr, NUM_D: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        js, jmask, rows, w = _retrieved(idx_ptr, gate_ptr, n, J, JP)
        if HAS_U:
            pre = tl.zeros((JP,), dtype=tl.float32)
            for dc in tl.static_range(NUM_D):
                cols = dc * BLOCK_D + tl.arange(0, BLOCK_D)
                dmask = cols < D
                x = tl.load(x_ptr + n * D + cols, mask=dmask, other=0.0).to(tl.float32)
                u = tl.load(u_ptr + rows[:, None] * D + cols[None, :], mask=jmask[:, None] & dmask[None, :],
                            other=0.0).to(tl.float32)
                pre += tl.sum(u * x[None, :], axis=1)
            tl.store(pre_ptr + n * J + js, pre, mask=jmask)
            w = w * _act(pre, ACT)
        for dc in tl.static_range(NUM_D):
            cols = dc * BLOCK_D + tl.arange(0, BLOCK_D)
            dmask = cols < D
            v = tl.load(v_ptr + rows[:, None] * D + cols[None, :], mask=jmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            tl.store(y_ptr + n * D + cols, tl.sum(w[:, None] * v, axis=0).to(y_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _peer_backward_kernel(dy_ptr, idx_ptr, gate_ptr, pre_ptr, u_ptr, v_ptr, dx_ptr, dgate_ptr, dpre_ptr, D,
                              J: tl.constexpr, JP: tl.constexpr, HAS_U: tl.constexpr, ACT: tl.constexpr,
                              BLOCK_D: tl.constexpr, NUM_D: tl.constexpr):
        """Pass 1, one program per token: dgate, dpre and dx (no row gradients)."""
        n = tl.program_id(0).to(tl.int64)
        js, jmask, rows, g = _retrieved(idx_ptr, gate_ptr, n, J, JP)
        dw = tl.zeros((JP,), dtype=tl.float32)  # dw_j = dy · v_j
        for dc in tl.static_range(NUM_D):
            cols = dc * BLOCK_D + tl.arange(0, BLOCK_D)
            dmask = cols < D
            dy = tl.load(dy_ptr + n * D + cols, mask=dmask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + rows[:, None] * D + cols[None, :], mask=jmask[:, None] & dmask[None, :],
                        other=0.0).to(tl.float32)
            dw += tl.sum(v * dy[None, :], axis=1)
        if HAS_U:
            pre = tl.load(pre_ptr + n * J + js, mask=jmask, other=0.0)
            tl.store(dgate_ptr + n * J + js, dw * _act(pre, ACT), mask=jmask)
            dpre = dw * g * _act_grad(pre, ACT)
            tl.store(dpre_ptr + n * J + js, dpre, mask=jmask)
            for dc in tl.static_range(NUM_D):
                cols = dc * BLOCK_D + tl.arange(0, BLOCK_D)
                dmask = cols < D
                u = tl.load(u_ptr + rows[:, None] * D + cols[None, :], mask=jmask[:, None] & dmask[None, :],
                            other=0.0).to(tl.float32)
                tl.store(dx_ptr + n * D + cols, tl.sum(dpre[:, None] * u, axis=0).to(dx_ptr.dtype.element_ty),
                         mask=dmask)
        else:
            tl.store(dgate_ptr + n * J + js, dw, mask=jmask)

    @triton.jit
    def _add_pairs(o, end, du, dv, cols, order_ptr, x_ptr, dy_ptr, gate_ptr, pre_ptr, dpre_ptr, D,
                   J: tl.constexpr, HAS_U: tl.constexpr, ACT: tl.constexpr, STEP: tl.constexpr):
        """The gradient-row terms of pairs ``o … o + STEP`` (those before ``end``) added to
        ``du``, ``dv`` one by one, in order; their loads are independent of each other (in
        flight at once)."""
        for u in tl.static_range(STEP):
            ok = o + u < end
            # (the bound as a scalar: a vector mask, as the interpreter needs, that keeps the
            # loads vectorised as a column mask's)
            ok_d = cols < tl.where(ok, D, 0)
            pair = tl.load(order_ptr + o + u, mask=ok, other=0)  # n·J + j in the flattened (N, J)
            n = pair // J
            w = tl.where(ok, tl.load(gate_ptr + pair).to(tl.float32), 0.0)
            dy = tl.load(dy_ptr + n * D + cols, mask=ok_d, other=0.0).to(tl.float32)
            if HAS_U:
                w = w * _act(tl.load(pre_ptr + pair), ACT)
                x = tl.load(x_ptr + n * D + cols, mask=ok_d, other=0.0).to(tl.float32)
                du += tl.where(ok, tl.load(dpre_ptr + pair), 0.0) * x
            dv += w * dy
        return du, dv

    @triton.jit
    def _row_short_kernel(order_ptr, offsets_ptr, x_ptr, dy_ptr, gate_ptr, pre_ptr, dpre_ptr, du_ptr, dv_ptr, D,
                          J: tl.constexpr, HAS_U: tl.constexpr, ACT: tl.constexpr, BLOCK_D: tl.constexpr,
                          UNROLL: tl.constexpr, PART: tl.constexpr):
        """Pass 2a, one program per (pool row, column block) for the rows of at most PART
        pairs (nearly all): the gradient rows summed over the row's pairs in sorted order,
        UNROLL at a time while UNROLL are left, then one by one (a row of two pairs does
        not pay for UNROLL masked ones); a row no pair retrieved is written as zeros."""
        row = tl.program_id(0).to(tl.int64)
        o = tl.load(offsets_ptr + row)
        end = tl.load(offsets_ptr + row + 1)
        if end - o <= PART:
            cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
            du = tl.zeros((BLOCK_D,), dtype=tl.float32)
            dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
            while o + UNROLL <= end:  # while loops: runtime bounds (also under TRITON_INTERPRET=1)
                du, dv = _add_pairs(o, end, du, dv, cols, order_ptr, x_ptr, dy_ptr, gate_ptr, pre_ptr, dpre_ptr, D,
                                    J, HAS_U, ACT, UNROLL)
                o += UNROLL
            while o < end:
                du, dv = _add_pairs(o, end, du, dv, cols, order_ptr, x_ptr, dy_ptr, gate_ptr, pre_ptr, dpre_ptr, D,
                                    J, HAS_U, ACT, 1)
                o += 1
            dmask = cols < D
            tl.store(dv_ptr + row * D + cols, dv.to(dv_ptr.dtype.element_ty), mask=dmask)
            if HAS_U:
                tl.store(du_ptr + row * D + cols, du.to(du_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _row_part_kernel(part_row_ptr, part_ends_ptr, order_ptr, offsets_ptr, x_ptr, dy_ptr, gate_ptr, pre_ptr,
                         dpre_ptr, du_spill_ptr, dv_spill_ptr, D, P, J: tl.constexpr, HAS_U: tl.constexpr,
                         ACT: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, PART: tl.constexpr):
        """Pass 2b, one program per (part of a row of more than PART pairs, column block):
        a frequent token's rows hold thousands of pairs, and one program each would run
        alone long after the rest. The part's sum goes to the spill buffer at the part's
        own index (parts numbered row after row, in order) for pass 2c."""
        part = tl.program_id(0)
        row = tl.load(part_row_ptr + part).to(tl.int64)
        if row < P:  # programs past the last part have nothing to do
            cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
            start = tl.load(offsets_ptr + row)
            first_part = tl.load(part_ends_ptr + row) - tl.cdiv(tl.load(offsets_ptr + row + 1) - start, PART)
            o = start + (part - first_part) * PART
            end = tl.minimum(o + PART, tl.load(offsets_ptr + row + 1))
            du = tl.zeros((BLOCK_D,), dtype=tl.float32)
            dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
            while o < end:  # a while loop: runtime bounds (also under TRITON_INTERPRET=1)
                du, dv = _add_pairs(o, end, du, dv, cols, order_ptr, x_ptr, dy_ptr, gate_ptr, pre_ptr, dpre_ptr, D,
                                    J, HAS_U, ACT, UNROLL)
                o += UNROLL
            spill = part.to(tl.int64) * D + cols
            tl.store(dv_spill_ptr + spill, dv, mask=cols < D)
            if HAS_U:
                tl.store(du_spill_ptr + spill, du, mask=cols < D)

    @triton.jit
    def _row_finish_kernel(long_row_ptr, part_ends_ptr, offsets_ptr, du_ptr, dv_ptr, du_spill_ptr, dv_spill_ptr, D,
                           P, HAS_U: tl.constexpr, BLOCK_D: tl.constexpr, PART: tl.constexpr):
        """Pass 2c, one program per (row of more than PART pairs, column block): the sum of
        its spilled parts, in order."""
        row = tl.load(long_row_ptr + tl.program_id(0)).to(tl.int64)
        if row < P:
            cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
            dmask = cols < D
            last = tl.load(part_ends_ptr + row).to(tl.int64)
            spilled = last - tl.cdiv(tl.load(offsets_ptr + row + 1) - tl.load(offsets_ptr + row), PART)
            du = tl.zeros((BLOCK_D,), dtype=tl.float32)
            dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
            while spilled < last:  # runtime bounds: a while loop (also under TRITON_INTERPRET=1)
                dv += tl.load(dv_spill_ptr + spilled * D + cols, mask=dmask, other=0.0)
                if HAS_U:
                    du += tl.load(du_spill_ptr + spilled * D + cols, mask=dmask, other=0.0)
                spilled += 1
            tl.store(dv_ptr + row * D + cols, dv.to(dv_ptr.dtype.element_ty), mask=dmask)
            if HAS_U:
                tl.store(du_ptr + row * D + cols, du.to(du_ptr.dtype.element_ty), mask=dmask)

    @triton.jit
    def _retrieved_copy_kernel(flag_ptr, in_ptr, out_ptr, in_copy_ptr, out_copy_ptr, D, P, HAS_U: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr):
        """ROWS pool rows per program: the retrieved ones (flagged) copied in the copies'
        dtype; the others are left as they are (never read)."""
        for r in range(ROWS):
            row = tl.program_id(0).to(tl.int64) * ROWS + r
            if tl.load(flag_ptr + row, mask=row < P, other=0) != 0:
                for dc in tl.static_range(NUM_D):
                    cols = dc * BLOCK_D + tl.arange(0, BLOCK_D)
                    dmask = cols < D
                    v = tl.load(out_ptr + row * D + cols, mask=dmask, other=0.0)
                    tl.store(out_copy_ptr + row * D + cols, v.to(out_copy_ptr.dtype.element_ty), mask=dmask)
                    if HAS_U:
                        u = tl.load(in_ptr + row * D + cols, mask=dmask, other=0.0)
                        tl.store(in_copy_ptr + row * D + cols, u.to(in_copy_ptr.dtype.element_ty), mask=dmask)


@kernel_op("finemoe::retrieved_row_copies", mutates_args=())
def _retrieved_row_copies(idx_NJ: Tensor, expert_in: Tensor, expert_out: Tensor, dtype: torch.dtype,
                          has_u: bool) -> tuple[Tensor, Tensor]:
    P, D = expert_out.shape
    flags = torch.zeros(P, dtype=torch.int8, device=expert_out.device)
    flags.index_fill_(0, idx_NJ.reshape(-1), 1)
    out_copy = torch.empty(P, D, dtype=dtype, device=expert_out.device)  # only retrieved rows written
    in_copy = torch.empty(P if has_u else 0, D, dtype=dtype, device=expert_out.device)
    if P and D:
        block_d = min(1024, triton.next_power_of_2(D))
        launch(_retrieved_copy_kernel)[(triton.cdiv(P, _COPY_ROWS),)](
            flags, expert_in.contiguous(), expert_out.contiguous(), in_copy, out_copy, D, P, HAS_U=has_u,
            ROWS=_COPY_ROWS, BLOCK_D=block_d, NUM_D=triton.cdiv(D, block_d))
    return in_copy, out_copy


@fake(_retrieved_row_copies)
def _(idx_NJ, expert_in, expert_out, dtype, has_u):
    P, D = expert_out.shape
    return expert_out.new_empty(P if has_u else 0, D, dtype=dtype), expert_out.new_empty(P, D, dtype=dtype)


def _row_gradients(order: Tensor, offsets: Tensor, x_ND: Tensor, dy_ND: Tensor, gates_NJ: Tensor, pre_NJ: Tensor,
                   dpre_NJ: Tensor, d_in: Tensor, d_out: Tensor, has_u: bool, act: int) -> None:
    """Pass 2 (the table gradients ``d_in``, ``d_out``, every row written) from the pairs
    ``order`` sorted by row, row r's pairs at ``offsets[r] … offsets[r+1]``. Rows of at
    most ``_ROW_PART`` pairs, one program each; longer rows cut into parts of
    ``_ROW_PART``, summed apart, then over their parts in order. Each part's row and place
    in the spill buffer come from cumulative sums on the device (no host sync): the grids
    of the long rows' passes are sized by the most any retrieval could make."""
    (N, D), J, P = x_ND.shape, gates_NJ.shape[1], d_out.shape[0]
    part = _ROW_PART
    counts = offsets[1:] - offsets[:-1]
    long = counts > part
    part_ends = torch.cumsum(torch.where(long, (counts + part - 1) // part, 0), 0)
    most_parts = 2 * triton.cdiv(N * J, part)  # a row of c > PART pairs: ceil(c / PART) < 2c / PART parts
    most_long = triton.cdiv(N * J, part + 1)
    arange = torch.arange(most_parts, device=x_ND.device)
    part_row = torch.searchsorted(part_ends, arange, right=True)
    long_row = torch.searchsorted(torch.cumsum(long, 0), arange[:most_long], right=True)
    dv_spill = torch.empty(most_parts, D, dtype=torch.float32, device=x_ND.device)
    du_spill = torch.empty_like(dv_spill) if has_u else dv_spill  # (not read without u)
    common = {"J": J, "HAS_U": has_u, "ACT": act, "UNROLL": _ROW_UNROLL, "PART": part}
    short_block = min(_SHORT_BLOCK_D, triton.next_power_of_2(D))
    launch(_row_short_kernel)[(P, triton.cdiv(D, short_block))](
        order, offsets, x_ND, dy_ND, gates_NJ, pre_NJ, dpre_NJ, d_in, d_out, D, BLOCK_D=short_block,
        num_warps=_SHORT_WARPS, **common)
    block_d = min(_ROW_BLOCK_D, triton.next_power_of_2(D))
    column_blocks = triton.cdiv(D, block_d)
    launch(_row_part_kernel)[(most_parts, column_blocks)](
        part_row, part_ends, order, offsets, x_ND, dy_ND, gates_NJ, pre_NJ, dpre_NJ, du_spill, dv_spill, D, P,
        BLOCK_D=block_d, num_warps=_ROW_WARPS, **common)
    launch(_row_finish_kernel)[(most_long, column_blocks)](
        long_row, part_ends, offsets, d_in, d_out, du_spill, dv_spill, D, P, HAS_U=has_u, BLOCK_D=block_d, PART=part,
        num_warps=_ROW_WARPS)


def _sizes(D: int, J: int, activation: str) -> dict:
    block_d = min(_BLOCK_D, triton.next_power_of_2(D))
    return dict(J=J, JP=triton.next_power_of_2(J), HAS_U=activation != "none", ACT=0 if activation == "gelu" else 1,
                BLOCK_D=block_d, NUM_D=triton.cdiv(D, block_d), num_warps=_NUM_WARPS)


@kernel_op("finemoe::peer_experts", mutates_args=())
def _peer_experts(x_ND: Tensor, idx_NJ: Tensor, gates_NJ: Tensor, expert_in: Tensor, expert_out: Tensor,
                  in_read: Tensor, out_read: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """``in_read``, ``out_read``: the tables the per-token passes read (the tables
    themselves, or copies of their retrieved rows); the gradients are the tables'."""
    x_ND, idx_NJ, gates_NJ = x_ND.contiguous(), idx_NJ.contiguous(), gates_NJ.contiguous()
    (N, D), J = x_ND.shape, idx_NJ.shape[1]
    y_ND = x_ND.new_empty(N, D)
    pre_NJ = torch.empty(N, J if activation != "none" else 0, dtype=torch.float32, device=x_ND.device)  # every entry written
    if N:
        launch(_peer_forward_kernel)[(N,)](x_ND, idx_NJ, gates_NJ, in_read.contiguous(), out_read.contiguous(), y_ND,
                                   pre_NJ, D, **_sizes(D, J, activation))
    return y_ND, pre_NJ


@fake(_peer_experts)
def _(x_ND, idx_NJ, gates_NJ, expert_in, expert_out, in_read, out_read, activation):
    J = idx_NJ.shape[1] if activation != "none" else 0
    return x_ND.new_empty(x_ND.shape), x_ND.new_empty(x_ND.shape[0], J, dtype=torch.float32)


@kernel_op("finemoe::peer_experts_backward", mutates_args=())
def _peer_experts_backward(dy_ND: Tensor, x_ND: Tensor, idx_NJ: Tensor, gates_NJ: Tensor, pre_NJ: Tensor,
                           expert_in: Tensor, expert_out: Tensor, in_read: Tensor, out_read: Tensor, activation: str
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dy_ND, x_ND = dy_ND.contiguous(), x_ND.contiguous()
    idx_NJ, gates_NJ = idx_NJ.contiguous(), gates_NJ.contiguous()
    (N, D), J = x_ND.shape, idx_NJ.shape[1]
    P = expert_out.shape[0]
    has_u = activation != "none"
    sizes = _sizes(D, J, activation)
    dx_ND = torch.empty_like(x_ND)  # every entry written (PEER); unused (PKM)
    dgates_NJ = torch.empty(N, J, dtype=torch.float32, device=x_ND.device)
    dpre_NJ = torch.empty_like(pre_NJ)
    d_in = torch.empty(expert_in.shape if has_u else (0,), dtype=expert_in.dtype, device=x_ND.device)
    d_out = torch.empty_like(expert_out)  # every row written, zero where never retrieved
    if N:
        launch(_peer_backward_kernel)[(N,)](dy_ND, idx_NJ, gates_NJ, pre_NJ, in_read.contiguous(), out_read.contiguous(),
                                    dx_ND, dgates_NJ, dpre_NJ, D, **sizes)
    # the (token, slot) pairs grouped by the row they retrieved, each row's in a fixed order
    order, offsets = group_by_index(idx_NJ, P)
    _row_gradients(order, offsets, x_ND, dy_ND, gates_NJ, pre_NJ, dpre_NJ, d_in, d_out, has_u, sizes["ACT"])
    return dx_ND, dgates_NJ.to(gates_NJ.dtype), d_in, d_out


@fake(_peer_experts_backward)
def _(dy_ND, x_ND, idx_NJ, gates_NJ, pre_NJ, expert_in, expert_out, in_read, out_read, activation):
    d_in = torch.empty_like(expert_in) if activation != "none" else expert_in.new_empty(0)
    return torch.empty_like(x_ND), torch.empty_like(gates_NJ), d_in, torch.empty_like(expert_out)


def _setup_context(ctx, inputs, output) -> None:
    x_ND, idx_NJ, gates_NJ, expert_in, expert_out, in_read, out_read, activation = inputs
    ctx.save_for_backward(x_ND, idx_NJ, gates_NJ, output[1], expert_in, expert_out, in_read, out_read)
    ctx.activation = activation


def _backward(ctx, dy_ND: Tensor, _dpre):
    x_ND, idx_NJ, gates_NJ, pre_NJ, expert_in, expert_out, in_read, out_read = ctx.saved_tensors
    dx, dgates, d_in, d_out = _peer_experts_backward(dy_ND, x_ND, idx_NJ, gates_NJ, pre_NJ, expert_in, expert_out,
                                                     in_read, out_read, ctx.activation)
    has_u = ctx.activation != "none"
    return dx if has_u else None, None, dgates, d_in if has_u else None, d_out, None, None, None


_peer_experts.register_autograd(_backward, setup_context=_setup_context)


def peer_experts(x_ND: Tensor, idx_NJ: Tensor, gates_NJ: Tensor, expert_in: Tensor | None, expert_out: Tensor,
                 activation: str, table_copies: bool = False) -> Tensor:
    """``y_n = Σ_j g_j σ(u_{idx_j} · x_n) v_{idx_j}`` (PEER), or ``Σ_j g_j v_{idx_j}`` with
    ``activation="none"`` and no ``expert_in`` (PKM). ``(N, D)`` in the dtype of ``x``.
    ``table_copies``: the per-token passes read copies of the retrieved rows in ``x``'s
    dtype (see the module docstring and ``table_copies_pay``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; one of {', '.join(ACTIVATIONS)}")
    if (expert_in is None) != (activation == "none"):
        raise ValueError("expert_in is given exactly when there is an activation (PEER, not PKM)")
    expert_in = expert_out if expert_in is None else expert_in
    in_read, out_read = expert_in, expert_out
    if table_copies:
        has_u = activation != "none"
        in_read, out_read = _retrieved_row_copies(idx_NJ, expert_in.detach(), expert_out.detach(), x_ND.dtype, has_u)
        in_read = in_read if has_u else out_read
    y_ND, _ = _peer_experts(x_ND, idx_NJ, gates_NJ, expert_in, expert_out, in_read, out_read, activation)
    return y_ND
