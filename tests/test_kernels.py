"""Triton kernels against the reference formula: on the CPU under TRITON_INTERPRET=1
(small sizes), outputs and every gradient. On a GPU, tests/test_gpu.py runs them compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from finemoe.kernels.swiglu import fused_swiglu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(gate, up, scale):
    hidden = F.silu(gate) * up
    if scale is not None:
        hidden = (hidden.view(*scale.shape, hidden.shape[-1] // scale.shape[-1]) * scale.unsqueeze(-1)).view(hidden.shape)
    return hidden


@pytest.mark.parametrize("rows,width,blocks", [(7, 40, None), (5, 2100, None), (6, 48, 4), (3, 2100, 3), (0, 48, 4)])
def test_fused_swiglu_equals_the_formula(rows, width, blocks):
    """Widths over one 1024-column tile, blocks of 12 and of 700 columns (two tiles each)."""
    torch.manual_seed(0)
    gate = torch.randn(rows, width, device=DEVICE, requires_grad=True)
    up = torch.randn(rows, width, device=DEVICE, requires_grad=True)
    scale = torch.rand(rows, blocks, device=DEVICE, requires_grad=True) if blocks else None
    probe = torch.randn(rows, width, device=DEVICE)
    out = fused_swiglu(gate, up, scale)
    grads = torch.autograd.grad((out * probe).sum(), [t for t in (gate, up, scale) if t is not None])
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (gate, up, scale)]
    ref = reference(*leaves)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [t for t in leaves if t is not None])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rows,width,blocks", [(7, 40, None), (3, 2100, 3), (0, 48, 4)])
def test_packed_swiglu_equals_the_formula(rows, width, blocks, interleaved):
    """Gate and up as the two halves of one tensor, or as its even and odd columns (the
    expert bank's interleaved layout), read in place; the gradient comes back in the same
    layout."""
    from finemoe.kernels.swiglu import fused_swiglu_packed

    torch.manual_seed(1)
    gate_up = torch.randn(rows, 2 * width, device=DEVICE, requires_grad=True)
    scale = torch.rand(rows, blocks, device=DEVICE, requires_grad=True) if blocks else None
    probe = torch.randn(rows, width, device=DEVICE)
    out = fused_swiglu_packed(gate_up, scale, interleaved=interleaved)
    leaves = [t for t in (gate_up, scale) if t is not None]
    grads = torch.autograd.grad((out * probe).sum(), leaves)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    halves = (ref_leaves[0][:, 0::2], ref_leaves[0][:, 1::2]) if interleaved else ref_leaves[0].chunk(2, dim=-1)
    ref = reference(*halves, ref_leaves[1] if blocks else None)
    ref_grads = torch.autograd.grad((ref * probe).sum(), ref_leaves)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_swiglu_passes_opcheck():
    gate, up = torch.randn(4, 48, device=DEVICE), torch.randn(4, 48, device=DEVICE)
    torch.library.opcheck(torch.ops.finemoe.swiglu.default, (gate, up, torch.rand(4, 3, device=DEVICE)))
    torch.library.opcheck(torch.ops.finemoe.swiglu.default, (gate.requires_grad_(True), up, None))
    gate_up = torch.randn(4, 96, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.finemoe.swiglu_packed.default, (gate_up, torch.rand(4, 3, device=DEVICE), False))
    torch.library.opcheck(torch.ops.finemoe.swiglu_packed.default, (gate_up, None, True))


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("rescale", [True, False])
def test_dsmoe_decode_kernels_equal_the_masked_path(tokens, rescale):
    """Only switched-on blocks read; the result equals computing every block and masking."""
    from finemoe.kernels.dsmoe_decode import dsmoe_decode
    from finemoe.layers import DSMoEConfig

    torch.manual_seed(tokens)
    layer = DSMoEConfig(intermediate_size=256, num_experts=4, rescale=rescale).build(64).to(DEVICE).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        h = torch.randn(tokens, 64, device=DEVICE)
        u = layer.norm(h)
        a, G, active = layer.gates(u)
        assert 0 < float(active.float().mean()) < 1 or tokens == 1
        ref = layer.masked_forward(u, a, G, active)
        out, gates = dsmoe_decode(u, layer.gate.weight, layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight,
                                  layer.mlp.down_proj.weight, threshold=layer.config.threshold, rescale=rescale)
    torch.testing.assert_close(gates, G, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def _finedeep_swiglu_gate_reference(gate, up, readout, softmax, normalize, scale):
    N, (K, f) = gate.shape[0], readout.shape
    hidden = F.silu(gate) * up
    z = torch.einsum("nkf,kf->nk", hidden.view(N, K, f), readout)
    if softmax:
        g = scale * torch.softmax(z, dim=-1)
    else:
        g = torch.sigmoid(z)
        if normalize:
            g = scale * g / g.sum(-1, keepdim=True)
    return (hidden.view(N, K, f) * g.unsqueeze(-1)).view(N, K * f), g


@pytest.mark.parametrize("softmax,normalize,scale", [(False, True, 1.0), (False, True, 3.0), (False, False, 1.0),
                                                     (True, True, 1.0), (True, True, 3.0)])
@pytest.mark.parametrize("N,K,f", [(5, 3, 20), (11, 4, 300), (0, 2, 16)])
def test_finedeep_swiglu_gate_kernel_equals_the_formula(softmax, normalize, scale, N, K, f):
    """Outputs, gates and the gradients of the gate and up projections and the read-out
    (through both the scaled units and the gates): K not a power of two, f not one,
    token counts that leave part of a backward program's rows empty, and no token."""
    from finemoe.kernels.finedeep_gate import _ROWS, finedeep_swiglu_gate

    assert N == 0 or N % _ROWS, "a partly filled backward program is part of the test"
    torch.manual_seed(K * f)
    gate = torch.randn(N, K * f, device=DEVICE, requires_grad=True)
    up = torch.randn(N, K * f, device=DEVICE, requires_grad=True)
    readout = (torch.randn(K, f, device=DEVICE) / f**0.5).requires_grad_(True)
    probe, probe_g = torch.randn(N, K * f, device=DEVICE), torch.randn(N, K, device=DEVICE)
    out, gates = finedeep_swiglu_gate(gate, up, readout, softmax=softmax, normalize=normalize, scale=scale)
    grads = torch.autograd.grad((out * probe).sum() + (gates * probe_g).sum(), [gate, up, readout])
    leaves = [t.detach().clone().requires_grad_(True) for t in (gate, up, readout)]
    ref, ref_gates = _finedeep_swiglu_gate_reference(*leaves, softmax, normalize, scale)
    ref_grads = torch.autograd.grad((ref * probe).sum() + (ref_gates * probe_g).sum(), leaves)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gates, ref_gates, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens,K,width", [(5, 2, 40), (3, 8, 1100), (1, 1, 16), (0, 4, 8)])
def test_sum_slots_equals_the_formula(tokens, K, width):
    """The kernel sums each token's K rows of a permuted buffer; its gradient is the
    gather. Against a loop over tokens written here; widths over one 1024-column tile."""
    from finemoe.kernels.slots import _sum_slots

    torch.manual_seed(K)
    S = tokens * K
    order = torch.randperm(S, device=DEVICE)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(S, device=DEVICE))
    y = torch.randn(S, width, device=DEVICE, requires_grad=True)
    probe = torch.randn(tokens, width, device=DEVICE)
    out = _sum_slots(y, position, order, K)
    (grad,) = torch.autograd.grad((out * probe).sum(), [y])
    want = torch.zeros(tokens, width, device=DEVICE)
    want_grad = torch.zeros(S, width, device=DEVICE)
    for row in range(S):
        n = int(order[row]) // K
        want[n] += y[row].detach()
        want_grad[row] = probe[n]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("tokens,K,width", [(5, 2, 40), (3, 8, 1100), (0, 4, 8)])
def test_weighted_slot_sum_equals_the_formula(tokens, K, width):
    """The kernel with a weight per slot (QuACK's expert path applies the routing weights
    there): ``out[n] = Σ_k w[n, k] · y[position[n·K + k]]``, against a loop written here,
    and the same reference formula the CPU takes."""
    from finemoe.kernels.slots import _launch_sum, weighted_sum_slots

    torch.manual_seed(K)
    S = tokens * K
    order = torch.randperm(S, device=DEVICE)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(S, device=DEVICE))
    y = torch.randn(S, width, device=DEVICE)
    weight = torch.rand(S, device=DEVICE)
    want = torch.zeros(tokens, width, device=DEVICE)
    for slot in range(S):
        want[slot // K] += weight[slot] * y[position[slot]]
    torch.testing.assert_close(_launch_sum(y, position, tokens, K, skip_negative=False, weight=weight), want,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weighted_sum_slots(y.double(), position, K, weight), want.double(), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(_launch_sum(y, position, tokens, K, skip_negative=False),
                               weighted_sum_slots(y.double(), position, K).float(), atol=1e-5, rtol=1e-5)


def test_slot_sum_skips_unlisted_rows():
    """With ``skip_negative`` (DSMoE's blocks that a token left off: position -1, the
    prefill's ``sum_listed_rows``) those slots add nothing, weighted or not; the kernel
    and the CPU formula against a loop."""
    from finemoe.kernels.slots import _launch_sum, sum_listed_rows

    torch.manual_seed(0)
    tokens, K, width = 7, 3, 50
    y = torch.randn(tokens * K, width, device=DEVICE)
    position = torch.randperm(tokens * K, device=DEVICE)
    position[torch.rand(tokens * K, device=DEVICE) < 0.4] = -1
    weight = torch.rand(tokens * K, device=DEVICE)
    want = torch.zeros(tokens, width, device=DEVICE)
    for slot in range(tokens * K):
        if position[slot] >= 0:
            want[slot // K] += weight[slot] * y[position[slot]]
    torch.testing.assert_close(_launch_sum(y, position, tokens, K, skip_negative=True, weight=weight), want,
                               atol=1e-5, rtol=1e-5)
    unweighted = torch.zeros(tokens, width, device=DEVICE)
    for slot in range(tokens * K):
        if position[slot] >= 0:
            unweighted[slot // K] += y[position[slot]]
    torch.testing.assert_close(_launch_sum(y, position, tokens, K, skip_negative=True), unweighted,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sum_listed_rows(y, position.view(tokens, K)), unweighted, atol=1e-5, rtol=1e-5)


def test_sum_slots_passes_opcheck():
    order = torch.randperm(12, device=DEVICE)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(12, device=DEVICE))
    y = torch.randn(12, 24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.finemoe.sum_slots.default, (y, position, order, 3))


def _peer_reference(x, idx, gates, expert_in, expert_out, activation):
    """The formula, one token and one retrieved expert at a time."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            w = gates[n, j]
            if activation != "none":
                pre = expert_in[idx[n, j]] @ x[n]
                w = w * (F.gelu(pre) if activation == "gelu" else F.relu(pre))
            out[n] = out[n] + w * expert_out[idx[n, j]]
    return out


@pytest.mark.parametrize("copies", [False, True])
@pytest.mark.parametrize("row_part", [512, 5])
@pytest.mark.parametrize("activation", ["gelu", "relu", "none"])
@pytest.mark.parametrize("tokens,retrieved,width", [(5, 6, 40), (3, 4, 130), (0, 4, 8), (37, 3, 300)])
def test_peer_experts_kernel_equals_the_formula(activation, tokens, retrieved, width, row_part, copies, monkeypatch):
    """Outputs and the gradients of x, the gates and both tables; an expert retrieved
    twice by one token and by several tokens (summed in the per-row pass; with 37 tokens
    one expert by all of them, over several steps of 4 pairs, the last partly filled,
    and rows of 300 over two column blocks of 256); with ``row_part`` 5 the rows of more
    than 5 pairs are summed in parts (the last partly filled) and then over their parts;
    experts never retrieved get exactly zero gradient. With ``copies`` the per-token
    passes read copies of the retrieved rows (in x's dtype, float32 here: the same
    numbers; a retrieved row left out of the copy would be read uninitialised)."""
    from finemoe.kernels import peer_experts as kernels
    from finemoe.kernels.peer_experts import peer_experts

    monkeypatch.setattr(kernels, "_ROW_PART", row_part)

    torch.manual_seed(len(activation) + tokens)
    pool = 50
    idx = torch.randint(0, pool - 10, (tokens, retrieved), device=DEVICE)  # the last 10 never retrieved
    if tokens:
        idx[0, 1] = idx[0, 0]
    if tokens > 32:
        idx[:, 2] = 7
    x = torch.randn(tokens, width, device=DEVICE, requires_grad=True)
    gates = torch.rand(tokens, retrieved, device=DEVICE, requires_grad=True)
    expert_in = (torch.randn(pool, width, device=DEVICE) * 0.3).requires_grad_(activation != "none")
    expert_out = torch.randn(pool, width, device=DEVICE, requires_grad=True)
    leaves = [x, gates, expert_in, expert_out] if activation != "none" else [gates, expert_out]
    probe = torch.randn(tokens, width, device=DEVICE)
    out = peer_experts(x, idx, gates, expert_in if activation != "none" else None, expert_out, activation,
                       table_copies=copies)
    grads = torch.autograd.grad((out * probe).sum(), leaves)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    args = dict(zip(["x", "gates", "expert_in", "expert_out"] if activation != "none" else ["gates", "expert_out"],
                    ref_leaves))
    ref = _peer_reference(args.get("x", x.detach()), idx, args["gates"], args.get("expert_in"), args["expert_out"],
                          activation)
    ref_grads = torch.autograd.grad((ref * probe).sum(), ref_leaves) if tokens else [torch.zeros_like(t) for t in leaves]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(grads[-1][pool - 10:], torch.zeros(10, width, device=DEVICE))


def test_peer_experts_passes_opcheck():
    idx = torch.randint(0, 20, (3, 4), device=DEVICE)
    tables = (torch.randn(20, 16, device=DEVICE), torch.randn(20, 16, device=DEVICE, requires_grad=True))
    args = (torch.randn(3, 16, device=DEVICE, requires_grad=True), idx, torch.rand(3, 4, device=DEVICE), *tables,
            *(t.detach() for t in tables))
    torch.library.opcheck(torch.ops.finemoe.peer_experts.default, (*args, "gelu"))
    torch.library.opcheck(torch.ops.finemoe.peer_experts.default, (*args, "none"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("has_u", [True, False])
def test_retrieved_row_copies_hold_every_retrieved_row(dtype, has_u):
    """The copies the per-token passes read: every retrieved row of both tables (one of
    width over two column blocks) in the copies' dtype (bf16: within its rounding); the
    value table alone without ``u`` (PKM)."""
    from finemoe.kernels.peer_experts import _retrieved_row_copies

    torch.manual_seed(5)
    expert_in, expert_out = torch.randn(19, 1100, device=DEVICE), torch.randn(19, 1100, device=DEVICE)
    idx = torch.tensor([[3, 3, 18], [0, 7, 3]], device=DEVICE)
    in_copy, out_copy = _retrieved_row_copies(idx, expert_in, expert_out, dtype, has_u)
    assert out_copy.dtype == dtype and out_copy.shape == expert_out.shape
    assert in_copy.shape == (expert_in.shape if has_u else (0, 1100))
    rows = [0, 3, 7, 18]
    tolerance = {"atol": 0, "rtol": 0} if dtype == torch.float32 else {"atol": 0, "rtol": 8e-3}
    torch.testing.assert_close(out_copy[rows].float(), expert_out[rows], **tolerance)
    if has_u:
        torch.testing.assert_close(in_copy[rows].float(), expert_in[rows], **tolerance)


def test_table_copies_pay_for_narrower_inputs_that_read_each_row_often():
    from finemoe.kernels.peer_experts import table_copies_pay

    s120m_peer = 32 * 1024 * 8 * 16, 512**2  # (token, slot) pairs of a batch, rows
    issue_size = 16384 * 8 * 16, 1024**2
    assert table_copies_pay(*s120m_peer, torch.bfloat16, torch.float32)
    assert not table_copies_pay(*issue_size, torch.bfloat16, torch.float32)
    assert not table_copies_pay(*s120m_peer, torch.float32, torch.float32)  # no autocast: nothing narrower


@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_product_key_layers_with_the_fused_experts_equal_the_eager_layer(kind):
    """The whole layer with both kernels (retrieval and experts), float32: output and the
    gradient of every parameter (query, BatchNorm, sub-keys, tables) and of the input."""
    from finemoe.layers import PEERConfig, PKMConfig

    config_type = PEERConfig if kind == "peer" else PKMConfig
    torch.manual_seed(3)
    shape = dict(num_experts=64, num_heads=2, top_k=3, key_dim=8)
    eager = config_type(**shape, retrieval_impl="eager", experts_impl="eager").build(24).to(DEVICE)
    fused = config_type(**shape, retrieval_impl="triton", experts_impl="triton").build(24).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    h = torch.randn(2, 5, 24, device=DEVICE)
    probe = torch.randn(2, 5, 24, device=DEVICE)
    grads = []
    for layer in (eager, fused):
        x = h.clone().requires_grad_(True)
        out = layer(x).update
        params = [p for p in layer.parameters()]
        grads.append((out, torch.autograd.grad((out * probe).sum(), [x, *params])))
    (out_e, grads_e), (out_f, grads_f) = grads
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(["input", *dict(eager.named_parameters())], grads_f, grads_e):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def _brute_force_top_k(q_MQ, keys_1, keys_2, k):
    """Every one of the S² keys scored, float64: the exact answer."""
    S, half = keys_1.shape
    scores = (q_MQ[:, :half].double() @ keys_1.double().t())[:, :, None] + \
             (q_MQ[:, half:].double() @ keys_2.double().t())[:, None, :]
    return scores.reshape(len(q_MQ), S * S).topk(k, dim=-1)


@pytest.mark.parametrize("rows,width,sub_keys,k", [(37, 16, 20, 4), (16, 64, 32, 8), (5, 8, 7, 7), (0, 8, 4, 2)])
def test_fused_product_key_retrieval_equals_brute_force_and_the_eager_path(rows, width, sub_keys, k):
    """The fused kernel's k experts are the exact best of all S² keys, best first (padded
    sub-key tables, k not a power of two, an empty batch); its gradients of the queries
    and both sub-key tables equal the eager path's."""
    from finemoe.kernels.product_keys import fused_product_key_topk
    from finemoe.layers.routing import product_key_topk

    torch.manual_seed(rows + sub_keys)
    q = torch.randn(rows, 2, width, device=DEVICE, requires_grad=True)
    keys_1 = torch.randn(sub_keys, width // 2, device=DEVICE, requires_grad=True)
    keys_2 = torch.randn(sub_keys, width // 2, device=DEVICE, requires_grad=True)
    scores, idx = fused_product_key_topk(q, keys_1, keys_2, k)
    want_scores, want_idx = _brute_force_top_k(q.detach().reshape(-1, width), keys_1.detach(), keys_2.detach(), k)
    assert torch.equal(idx.reshape(-1, k), want_idx)
    torch.testing.assert_close(scores.reshape(-1, k).double(), want_scores, atol=1e-5, rtol=1e-5)
    ref_scores, ref_idx = product_key_topk(q, keys_1, keys_2, k)
    assert torch.equal(idx, ref_idx)
    probe = torch.randn(scores.shape, device=DEVICE)
    got = torch.autograd.grad((scores * probe).sum(), [q, keys_1, keys_2], allow_unused=True)
    want = torch.autograd.grad((ref_scores * probe).sum(), [q, keys_1, keys_2], allow_unused=True)
    for name, g, w in zip(["q", "keys_1", "keys_2"], got, want):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(w), w if w is not None else torch.zeros_like(g),
                                   atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def _ranked_pairs_top_k(q_MQ, keys_1, keys_2, k):
    """The kernel's order spelled out: each half's k best sub-keys (score descending,
    lower sub-key first among ties), then the k best of their k² pairs by sum, the
    lower (rank in half 1, rank in half 2) first among ties. Integer inputs: exact."""
    S, half = keys_1.shape
    experts = []
    for s1, s2 in zip((q_MQ[:, :half] @ keys_1.t()).tolist(), (q_MQ[:, half:] @ keys_2.t()).tolist()):
        top1 = sorted(range(S), key=lambda a: (-s1[a], a))[:k]
        top2 = sorted(range(S), key=lambda b: (-s2[b], b))[:k]
        pairs = sorted(((i, j) for i in range(len(top1)) for j in range(len(top2))),
                       key=lambda ij: (-(s1[top1[ij[0]]] + s2[top2[ij[1]]]), ij))[:k]
        experts.append([top1[i] * S + top2[j] for i, j in pairs])
    return torch.tensor(experts)


@pytest.mark.parametrize("sub_keys,k", [(40, 16), (64, 32), (6, 5), (300, 16), (1024, 32)])
def test_fused_product_key_retrieval_is_exact_among_ties(sub_keys, k):
    """Small integer queries and keys: many of the S² sums tie. The kernel returns brute
    force's k best scores rank by rank, k distinct experts per row, each with the score
    it reports, chosen among ties exactly as the order spelled out in Python."""
    from finemoe.kernels.product_keys import fused_product_key_topk

    torch.manual_seed(sub_keys + k)
    width = 4
    q = torch.randint(-2, 3, (11, 1, width), device=DEVICE).float()
    keys_1 = torch.randint(-2, 3, (sub_keys, width // 2), device=DEVICE).float()
    keys_2 = torch.randint(-2, 3, (sub_keys, width // 2), device=DEVICE).float()
    scores, idx = fused_product_key_topk(q, keys_1, keys_2, k)
    scores, idx = scores.reshape(-1, k), idx.reshape(-1, k)
    want_scores, _ = _brute_force_top_k(q.reshape(-1, width), keys_1, keys_2, k)
    assert torch.equal(scores.double(), want_scores)
    a, b = idx // sub_keys, idx % sub_keys
    true_scores = (q.reshape(-1, 1, width)[..., :width // 2] * keys_1[a]).sum(-1) + \
                  (q.reshape(-1, 1, width)[..., width // 2:] * keys_2[b]).sum(-1)
    assert torch.equal(true_scores, scores)
    assert all(len(set(row.tolist())) == k for row in idx)
    assert torch.equal(idx.cpu(), _ranked_pairs_top_k(q.reshape(-1, width).cpu(), keys_1.cpu(), keys_2.cpu(), k))


def test_fused_product_key_retrieval_passes_opcheck():
    args = (torch.randn(20, 16, device=DEVICE, requires_grad=True), torch.randn(9, 8, device=DEVICE, requires_grad=True),
            torch.randn(9, 8, device=DEVICE, requires_grad=True), 4)
    torch.library.opcheck(torch.ops.finemoe.product_key_topk.default, args)


# Triton's interpreter multiplies bfloat16 tiles in tl.dot as if they were integers: float16 on the CPU
HALF_DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("counts", [[5, 0, 17, 3], [0, 0, 0, 0], [40, 0, 0, 1]])
def test_gathered_swiglu_equals_the_gather_and_the_formula(counts, dtype):
    """Groups of awkward sizes (empty ones, one over two row tiles), rows past the groups'
    end; weights as strided views, the way DSMoE passes the blocks of a dense FFN. Against
    a loop over rows written here, in float32 on the same half-precision inputs."""
    from finemoe.kernels import gathered_swiglu as kernel

    torch.manual_seed(len(counts))
    N, D, E, Fe = 23, 2 * kernel._BLOCK_K, len(counts), kernel._BLOCK_N  # the tiles' multiples
    S = sum(counts) + 7
    x = torch.randn(N, D, device=DEVICE).to(dtype)
    dense_gate, dense_up = (torch.randn(E * Fe, D, device=DEVICE) / D**0.5 for _ in range(2))
    w_gate, w_up = (w.to(dtype).view(E, Fe, D).transpose(1, 2) for w in (dense_gate, dense_up))  # (E, D, Fe) views
    token = torch.randint(0, N, (S,), device=DEVICE)
    scale = torch.rand(S, device=DEVICE)
    out = kernel.gathered_swiglu(x, token, scale, torch.tensor(counts, device=DEVICE), w_gate, w_up)
    assert out.shape == (S, Fe) and out.dtype == dtype
    row = 0
    for e, count in enumerate(counts):
        for p in range(row, row + count):
            xr = x[token[p]].float()
            want = F.silu(xr @ w_gate[e].float()) * (xr @ w_up[e].float()) * scale[p]
            torch.testing.assert_close(out[p].float(), want, atol=2e-2, rtol=2e-2)
        row += count


def test_sum_listed_rows_skips_unlisted_slots():
    from finemoe.kernels.slots import sum_listed_rows

    torch.manual_seed(0)
    y = torch.randn(9, 40, device=DEVICE)
    position = torch.tensor([[0, -1, 4], [-1, -1, -1], [8, 2, -1]], device=DEVICE)
    want = torch.stack([y[0] + y[4], torch.zeros(40, device=DEVICE), y[8] + y[2]])
    torch.testing.assert_close(sum_listed_rows(y, position), want)


def test_dsmoe_sparse_inference_through_the_gathered_kernel_equals_the_masked_path():
    """The layer's sparse path in half precision (the kernel, then the down product and the
    per-token sum) against the float64 masked path: every block computed, then weighted."""
    from finemoe.layers import DSMoEConfig

    torch.manual_seed(0)
    layer = DSMoEConfig(intermediate_size=64, num_experts=4).build(32).to(DEVICE).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    u = torch.randn(45, 32, device=DEVICE)
    reference = layer.double()
    a, G, active = reference.gates(u.double())
    assert 0.2 < float(active.float().mean()) < 0.8
    want = reference.masked_forward(u.double(), a, G, active)
    half = reference.to(HALF_DTYPES[-1])
    with torch.no_grad():
        got = half.sparse_forward(u.to(HALF_DTYPES[-1]), G, active)
    assert torch.linalg.norm(got.double() - want) / torch.linalg.norm(want) < 1e-2


@pytest.mark.parametrize("tokens,blocks,rescale", [(37, 6, True), (700, 8, False), (5, 3, True), (0, 4, True), (300, 1, True)])
def test_dsmoe_block_pairs_kernel_lays_out_the_pairs_as_the_layer_does(tokens, blocks, rescale):
    """Over several 128-token tiles, tokens with no block on, odd block counts: the same rows,
    tokens, scales, positions and counts as the layer's PyTorch layout."""
    from finemoe.kernels.dsmoe_prefill import block_pairs
    from finemoe.layers.dsmoe import _active_pairs_first

    torch.manual_seed(tokens)
    a = torch.rand(tokens, blocks, device=DEVICE)
    a[:3] *= 0.4  # some tokens with every block off
    G = a * (a > 0.5)
    active = G > 0
    count = active.sum(-1, keepdim=True).float()
    weights = G * torch.where(count > 0, blocks / count.clamp_min(1), 0.0) if rescale else G
    token, scale, position, counts, ends = block_pairs(G, rescale)
    want_token, want_scale, want_position, want_counts = _active_pairs_first(active, weights)
    total = int(want_counts.sum())
    assert counts.tolist() == want_counts.tolist() and ends.tolist() == want_counts.cumsum(0).tolist()
    assert torch.equal(position.long(), want_position)
    assert torch.equal(token[:total].long(), want_token[:total])
    torch.testing.assert_close(scale[:total], want_scale[:total])


@pytest.mark.parametrize("tokens,width,blocks", [(19, 48, 8), (3, 64, 3), (0, 16, 4), (7, 200, 5)])
def test_dsmoe_norm_and_gates_kernel_equals_the_layer(tokens, width, blocks):
    """RMSNorm, the cast and the thresholded gates in one pass, against the layer's norm
    and gates; widths that are not a power of two, odd block counts."""
    from finemoe.kernels.dsmoe_prefill import norm_and_gates
    from finemoe.layers import DSMoEConfig

    torch.manual_seed(tokens)
    layer = DSMoEConfig(intermediate_size=blocks * 4, num_experts=blocks, threshold=0.4).build(width).to(DEVICE)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.gate.weight.normal_(std=0.3)
        h = torch.randn(tokens, width, device=DEVICE) * 3
        x, G = norm_and_gates(h, layer.norm.weight, layer.gate.weight, layer.config.norm_eps, 0.4, torch.float16)
        u = layer.norm(h)
        _, want_G, _ = layer.gates(u)
    assert x.dtype == torch.float16 and G.dtype == torch.float32
    torch.testing.assert_close(x, u.half())
    torch.testing.assert_close(G, want_G)


@pytest.mark.parametrize("dtype,width", [(torch.float32, 40), (torch.float32, 1100), (torch.bfloat16, 24)])
def test_row_squares_kernel_equals_the_reference(dtype, width):
    """Each row's sum of squares and whether it has a non-zero entry, in one pass: a row
    of one entry too small to square (1e-30) is still touched."""
    from finemoe.kernels.row_sparse_adamw import _row_squares, row_squares_reference

    torch.manual_seed(4)
    grad = torch.randn(11, width, device=DEVICE).to(dtype)
    grad[[0, 4, 8]] = 0.0
    grad[5, 1:] = 0.0
    grad[9] = 0.0
    grad[9, width - 1] = 1e-30
    squares, touched = _row_squares(grad)
    want_squares, want_touched = row_squares_reference(grad)
    assert squares.dtype == torch.float32 and touched.dtype == torch.bool
    torch.testing.assert_close(squares, want_squares, rtol=1e-5, atol=0)
    assert torch.equal(touched, want_touched)
    assert touched.tolist() == [i not in (0, 4, 8) for i in range(11)]


@pytest.mark.parametrize("flagged", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype,width", [(torch.float32, 40), (torch.float32, 1100), (torch.bfloat16, 24)])
def test_row_sparse_adamw_kernel_equals_the_reference(dtype, width, scaled, flagged):
    """Rows with a zero gradient untouched; the others AdamW's update (in float32, stored
    in the tables' dtype); widths over one 512-column step; with a clipping factor, the
    update of the scaled gradient; with the touched rows given as flags (``row_squares``'),
    the same update without the kernel's own test of the gradient."""
    from finemoe.kernels.row_sparse_adamw import _row_sparse_adamw, row_sparse_adamw_reference, touched_rows

    torch.manual_seed(3)
    tables = [torch.randn(9, width, device=DEVICE).to(dtype) for _ in range(3)]
    tables[2] = tables[2].abs()  # the second moment
    grad = torch.randn(9, width, device=DEVICE).to(dtype)
    grad[[0, 4, 8]] = 0.0
    grad[5, 1:] = 0.0  # one non-zero entry is enough to touch a row
    args = dict(lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
    got, want = [t.clone() for t in tables], [t.clone() for t in tables]
    scale = torch.tensor([0.3], device=DEVICE) if scaled else None
    flags = touched_rows(grad) if flagged else None
    read = grad.clone()
    if flagged:  # with the flags, an untouched row's gradient is not read: garbage there changes nothing
        read[[0, 4, 8]] = 1.0
    _row_sparse_adamw(got[0], read, got[1], got[2], **args, grad_scale=scale, touched=flags)
    row_sparse_adamw_reference(want[0], grad * 0.3 if scaled else grad, want[1], want[2], **args)
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-5, rtol=8e-3)  # bf16: 1 ulp
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)
    for a, b in zip(got, tables):
        assert torch.equal(a[[0, 4, 8]], b[[0, 4, 8]])
        assert not torch.equal(a[5], b[5])


@pytest.mark.parametrize("rows,columns,k", [(37, 8, 2), (5, 64, 8), (3, 256, 9), (7, 5, 5), (40, 3, 1), (0, 8, 2)])
def test_row_topk_kernel_equals_torch_topk(rows, columns, k):
    """The router's top-k in registers: the indices of torch.topk (distinct values),
    best first; ties go to the lower column."""
    from finemoe.kernels.topk import _row_topk_indices

    torch.manual_seed(columns)
    probs = torch.softmax(torch.randn(rows, columns, device=DEVICE), dim=-1)
    got = _row_topk_indices(probs, k)
    assert got.dtype == torch.int64 and got.shape == (rows, k)
    assert torch.equal(got, probs.topk(k, dim=-1).indices)
    tied = torch.full((4, columns), 0.5, device=DEVICE)
    tied[1, -1] = 0.9  # one larger entry, then the ties in column order
    got = _row_topk_indices(tied, k).cpu()
    assert got[0].tolist() == list(range(k))
    assert got[1].tolist() == [columns - 1] + list(range(k - 1))


def test_row_topk_passes_opcheck():
    probs = torch.softmax(torch.randn(9, 8, device=DEVICE), dim=-1)
    torch.library.opcheck(torch.ops.finemoe.row_topk_indices.default, (probs, 2))


@pytest.mark.parametrize("rows,width,outputs", [(70, 40, 8), (130, 259, 3), (1, 128, 16), (65, 300, 1), (0, 64, 8),
                                                (600, 200, 5)])
def test_skinny_linear_equals_the_float64_product(rows, width, outputs):
    """The routers' float32 ``u Wᵀ``: row blocks with a ragged last one, widths that are and
    are not a whole number of column tiles, several groups of rows (backward), 1 to 16
    outputs (padded to a power of two inside), no rows; output and both gradients against
    the same product in float64."""
    from finemoe.kernels.skinny_linear import skinny_linear

    torch.manual_seed(3)
    x = torch.randn(rows, width, device=DEVICE, requires_grad=True)
    w = torch.randn(outputs, width, device=DEVICE, requires_grad=True)
    probe = torch.randn(rows, outputs, device=DEVICE)
    out = skinny_linear(x, w)
    gx, gw = torch.autograd.grad((out * probe).sum(), (x, w))
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = x64 @ w64.T
    rx, rw = torch.autograd.grad((ref * probe.double()).sum(), (x64, w64))
    assert out.dtype == torch.float32 and out.shape == (rows, outputs)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gx.double(), rx, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gw.double(), rw, atol=1e-4, rtol=1e-5)


def test_skinny_linear_passes_opcheck():
    x = torch.randn(70, 40, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.finemoe.skinny_linear.default, (x, torch.randn(8, 40, device=DEVICE)))
