"""PyTorch reference of kvtool's attention semantics (docs/architecture.md §3 and §5).

This module is the one place where "which key may a query see" is written down in PyTorch. RLKV gate training,
beacon training and the llama.cpp parity tests all call it, so a disagreement between training and the runtime can
only come from the runtime.

Rules, for a query at position p and a key at position k (positions are per-row sequence positions, llama ``pos``;
with left padding they start at 0 on each row's first real token, so sinks are that row's first tokens):

* full head (window 0): sees k iff k <= p;
* compressed head (window W, sink S): sees k iff k <= p and (k < S or p - k < W);
* beacon layout ``prompt . chunk_1 . b_1 . chunk_2 . b_2 ...``: a token of chunk i sees the prompt, b_1..b_{i-1} and
  the earlier tokens of chunk i (and itself); b_i sees the same plus all of chunk i. Combined with the per-head rule
  by AND.

Layers of the API:

* pure tensor functions: :func:`visibility_mask`, :func:`beacon_visibility`, :func:`mixed_attention`;
* transformers glue: :func:`register_kvtool_attention` (attention *and* mask function), :func:`load_with_kvtool`,
  :func:`set_gates`, :func:`clamp_gates_`, :func:`use_segments`, :func:`unload_kvtool`;
* the parity oracle :func:`reference_logits`.

Written against transformers 5.x (``AttentionInterface`` / ``AttentionMaskInterface`` in ``masking_utils``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ATTN_NAME",
    "BeaconSegments",
    "KVToolState",
    "beacon_layout",
    "beacon_visibility",
    "clamp_gates_",
    "freeze_all_but_gates",
    "find_kvtool",
    "get_kvtool",
    "insert_beacons",
    "load_with_kvtool",
    "mixed_attention",
    "reference_logits",
    "register_kvtool_attention",
    "set_gates",
    "unload_kvtool",
    "use_segments",
    "use_slot_positions",
    "visibility_mask",
]

ATTN_NAME = "kvtool_mixed"
_POS_ATTR = "_kvtool_positions"  # (q_pos, k_pos) stashed on the 4D mask by our mask function
_STATE_ATTR = "_kvtool"  # unregistered back-reference from each attention module to the model's KVToolState

WindowsLike = Union[int, Sequence[Sequence[int]], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# Pure semantics
# --------------------------------------------------------------------------------------------------------------------
def visibility_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: Union[int, torch.Tensor],
    sink: int,
    k_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean "query may see key" mask of docs/architecture.md §3.

    ``q_pos`` is ``[..., Tq]`` and ``k_pos`` ``[..., Tk]`` (same leading dims, or none). ``window`` is an int (one rule,
    result ``[..., Tq, Tk]``) or a per-KV-head int tensor ``[H]`` (result ``[..., H, Tq, Tk]``); 0 means a full head.
    ``k_valid`` (``[..., Tk]`` bool) removes padding keys. Causality comes from positions, not slot order, because the
    runtime decides by ``pos`` too.
    """
    q_pos = torch.as_tensor(q_pos)
    k_pos = torch.as_tensor(k_pos, device=q_pos.device)
    qp = q_pos.unsqueeze(-1).long()  # [..., Tq, 1]
    kp = k_pos.unsqueeze(-2).long()  # [..., 1, Tk]
    per_head = isinstance(window, torch.Tensor) and window.dim() > 0
    if per_head:
        qp = qp.unsqueeze(-3)  # [..., 1, Tq, 1]
        kp = kp.unsqueeze(-3)
        w = window.to(device=q_pos.device, dtype=torch.long).view(-1, 1, 1)  # [H, 1, 1]
    else:
        w = torch.as_tensor(int(window), device=q_pos.device, dtype=torch.long)
    dist = qp - kp
    vis = (dist >= 0) & ((w == 0) | (dist < w) | (kp < int(sink)))
    if k_valid is not None:
        kv = torch.as_tensor(k_valid, device=q_pos.device).bool().unsqueeze(-2)  # [..., 1, Tk]
        if per_head:
            kv = kv.unsqueeze(-3)
        vis = vis & kv
    return vis


@dataclass
class BeaconSegments:
    """Per-token layout of a beacon sequence: ``chunk`` 0 = prompt, i >= 1 = chunk i and its beacon b_i.

    A plain description (not a fixed ``prompt + k*(c+1)`` formula) so trainers can use ragged prompts, a trailing
    partial chunk, or left padding (pad slots get any value: padding masks them anyway).
    """

    chunk: torch.Tensor  # [B, T] or [T] int
    is_beacon: torch.Tensor  # [B, T] or [T] bool

    def to(self, device) -> "BeaconSegments":
        return BeaconSegments(self.chunk.to(device), self.is_beacon.to(device))


def beacon_layout(prompt_len: int, total_len: int, interval: int) -> BeaconSegments:
    """Segments of ``prompt . (c tokens . beacon)* . partial chunk``, the order in which the runtime decodes them."""
    if interval < 1:
        raise ValueError("beacon interval must be >= 1")
    t = torch.arange(total_len)
    rel = t - prompt_len
    gen = rel >= 0
    chunk = torch.where(gen, rel.clamp(min=0) // (interval + 1) + 1, torch.zeros_like(t))
    is_beacon = gen & (rel.clamp(min=0) % (interval + 1) == interval)
    return BeaconSegments(chunk, is_beacon)


def insert_beacons(
    prompt_ids: Sequence[int], gen_ids: Sequence[int], interval: int, beacon_id: int
) -> tuple[torch.Tensor, BeaconSegments]:
    """Token ids with a beacon after every ``interval`` generated tokens, plus their segments (teacher rollout -> student)."""
    ids = list(prompt_ids)
    for i, tok in enumerate(gen_ids):
        ids.append(int(tok))
        if (i + 1) % interval == 0:
            ids.append(int(beacon_id))
    return torch.tensor(ids, dtype=torch.long), beacon_layout(len(prompt_ids), len(ids), interval)


def beacon_visibility(chunk: torch.Tensor, is_beacon: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean ``[..., T, T]`` visibility of docs/architecture.md §5 for one sequence attending to itself.

    ``chunk``/``is_beacon`` as in :class:`BeaconSegments`; ``pos`` defaults to ``0..T-1``. Causality is included
    (key position <= query position), so AND it with :func:`visibility_mask` for per-head compression.
    """
    chunk = torch.as_tensor(chunk).long()
    is_beacon = torch.as_tensor(is_beacon, device=chunk.device).bool()
    if pos is None:
        pos = torch.arange(chunk.shape[-1], device=chunk.device)
    pos = torch.as_tensor(pos, device=chunk.device).long()
    qc, kc = chunk.unsqueeze(-1), chunk.unsqueeze(-2)
    qp, kp = pos.unsqueeze(-1), pos.unsqueeze(-2)
    kb = is_beacon.unsqueeze(-2)
    see = (kc == 0) | (kb & (kc < qc)) | (~kb & (kc == qc)) | (kp == qp)
    return see & (kp <= qp)


def _as_batched_pos(pos: torch.Tensor, device) -> torch.Tensor:
    pos = torch.as_tensor(pos, device=device).long()
    return pos.unsqueeze(0) if pos.dim() == 1 else pos


def mixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: Union[int, torch.Tensor],
    sink: int,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    gates: Optional[torch.Tensor] = None,
    extra_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout: float = 0.0,
    backend: str = "reference",
    sinks: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Per-KV-head windowed attention, optionally RLKV-gated; returns float32 ``[B, n_head, T, d]``.

    q ``[B, n_head, T, d]``; k/v ``[B, n_head_kv, Tk, d]``; query head i uses KV head ``i // (n_head // n_head_kv)``.
    ``windows`` ``[n_head_kv]`` (or an int for all heads). Without ``gates`` each KV head uses its own window. With
    ``gates`` (``[n_head_kv]``, in [0, 1]): ``out = a * attn_full + (1 - a) * attn_stream``, attn_stream using
    ``(sink, windows[h])`` (RLKV gives every head the same W). ``extra_mask`` (bool, broadcastable to
    ``[B, n_head_kv, T, Tk]``) is ANDed in: padding, beacon layout, a model's own mask.

    ``backend="reference"`` does float32 math with -inf masking (the parity oracle); ``"sdpa"`` runs
    ``scaled_dot_product_attention`` in the input dtype with the same boolean masks, for GPU training.
    A query row that sees no key (only padding queries, since k = p is always visible otherwise) outputs 0: letting
    it softmax over -inf would put NaN into gradients that reach the gates through earlier layers.

    ``sinks`` ``[n_head]``: learned sink logits (gpt-oss), one extra softmax column per query head that takes
    probability mass and contributes no value; they belong to their head, so they move with it like its K/V.
    ``softcap``: Gemma-2's ``tanh(scores / c) * c`` before masking. Both need the reference backend.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if H % Hkv:
        raise ValueError(f"n_head {H} is not a multiple of n_head_kv {Hkv}")
    G = H // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    dev = q.device
    if not isinstance(windows, torch.Tensor) or windows.dim() == 0:
        windows = torch.full((Hkv,), int(windows), dtype=torch.long)
    windows = windows.to(device=dev, dtype=torch.long)
    if windows.numel() != Hkv:
        raise ValueError(f"windows has {windows.numel()} entries, expected n_head_kv={Hkv}")
    qp, kp = _as_batched_pos(q_pos, dev), _as_batched_pos(k_pos, dev)

    extra = None
    if extra_mask is not None:
        extra = extra_mask.to(dev).bool()
        while extra.dim() < 4:
            extra = extra.unsqueeze(0)

    def with_extra(vis: torch.Tensor) -> torch.Tensor:  # vis [b, Hkv|1, T, Tk]
        return vis if extra is None else vis & extra

    vis_stream = with_extra(visibility_mask(qp, kp, windows, sink))  # [b, Hkv, T, Tk]
    vis_full = None
    if gates is not None:
        vis_full = with_extra(visibility_mask(qp, kp, 0, sink).unsqueeze(1))  # [b, 1, T, Tk]

    if (sinks is not None or softcap) and backend != "reference":
        raise ValueError("learned sinks and attention softcapping need backend='reference'")

    if backend == "reference":
        qf = q.float().reshape(B, Hkv, G, T, D)
        kf, vf = k.float(), v.float()
        scores = torch.einsum("bhgtd,bhsd->bhgts", qf, kf) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        sink_col = None
        if sinks is not None:
            sink_col = sinks.to(device=dev, dtype=torch.float32).reshape(1, Hkv, G, 1, 1).expand(B, Hkv, G, T, 1)

        def attend(vis: torch.Tensor) -> torch.Tensor:
            vis = vis.unsqueeze(2)  # group dim
            seen = vis.any(-1, keepdim=True)
            logits = scores.masked_fill(~(vis | ~seen), float("-inf"))
            if sink_col is None:
                probs = torch.softmax(logits, dim=-1)
            else:
                probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]
            if dropout > 0.0:
                probs = F.dropout(probs, p=dropout, training=True)
            return torch.einsum("bhgts,bhsd->bhgtd", probs, vf) * seen

    elif backend == "sdpa":
        k_rep = k.repeat_interleave(G, dim=1)
        v_rep = v.repeat_interleave(G, dim=1)

        def attend(vis: torch.Tensor) -> torch.Tensor:
            vis = vis.repeat_interleave(G, dim=1) if vis.shape[1] > 1 else vis
            seen = vis.any(-1, keepdim=True)
            out = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=vis | ~seen, dropout_p=dropout, scale=scale)
            return (out.float() * seen).reshape(B, Hkv, G, T, D)

    else:
        raise ValueError(f"unknown backend {backend!r} (reference|sdpa)")

    if gates is None:
        out = attend(vis_stream)
    else:
        a = gates.to(device=dev, dtype=torch.float32).reshape(1, Hkv, 1, 1, 1)
        out = a * attend(vis_full) + (1.0 - a) * attend(vis_stream)
    return out.reshape(B, H, T, D)


# --------------------------------------------------------------------------------------------------------------------
# transformers integration
# --------------------------------------------------------------------------------------------------------------------
class KVToolState(nn.Module):
    """Per-model kvtool settings: windows ``[L, H_kv]``, sink, optional gates ``[L, H_kv]``, optional beacon segments.

    Registered as ``model.kvtool`` so that ``model.to()``, ``model.parameters()`` and DDP see the gates. Windows are a
    non-persistent buffer and segments a plain attribute: neither belongs in a checkpoint.
    """

    def __init__(self, windows: torch.Tensor, sink: int, backend: str = "reference"):
        super().__init__()
        self.register_buffer("windows", windows.long(), persistent=False)
        self.sink = int(sink)
        self.backend = backend
        self.gates: Optional[nn.Parameter] = None
        self.segments: Optional[BeaconSegments] = None
        self.slot_positions: Optional[torch.Tensor] = None  # [B, n_slots] for cached decoding with evicted slots

    @property
    def n_layer(self) -> int:
        return self.windows.shape[0]

    @property
    def n_head_kv(self) -> int:
        return self.windows.shape[1]

    def extra_repr(self) -> str:
        return f"n_layer={self.n_layer}, n_head_kv={self.n_head_kv}, sink={self.sink}, gated={self.gates is not None}"


def _mask_fn(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    device="cpu",
    use_vmap: bool = False,
    **kwargs,
):
    """Mask builder registered next to the attention: transformers skips mask creation entirely for attention names
    that have no mask function, which would silently drop padding. Returns the model's own boolean mask (causal,
    padding, packing, a Qwen2 sliding window, ...) always materialised, with per-row positions attached: our rule needs
    positions counted from each row's first real token, and only this function sees the 2D padding mask.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask = sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function or causal_mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        use_vmap=use_vmap,
        device=device,
    )
    q_off, kv_off = int(q_offset), int(kv_offset)
    n_slots = max(kv_off + kv_length, q_off + q_length)
    if attention_mask is None:
        valid = torch.ones(batch_size, n_slots, dtype=torch.bool, device=device)
    else:
        valid = attention_mask.to(device=device).bool()
        if valid.shape[-1] < n_slots:  # static caches: slots past the 2D mask are empty
            valid = F.pad(valid, (0, n_slots - valid.shape[-1]), value=False)
    pos = valid.long().cumsum(-1) - 1
    q_pos = pos[:, q_off : q_off + q_length]
    k_pos = pos[:, kv_off : kv_off + kv_length]
    setattr(mask, _POS_ATTR, (q_pos, k_pos))
    return mask


def _attention_fn(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers attention function: the model's mask ANDed with kvtool's rule for this layer's heads."""
    state: Optional[KVToolState] = module.__dict__.get(_STATE_ATTR)
    Tq, Tk = query.shape[-2], key.shape[-2]
    B = query.shape[0]
    positions = getattr(attention_mask, _POS_ATTR, None) if attention_mask is not None else None
    slot_pos = None if state is None else state.slot_positions
    if slot_pos is not None:  # a cache with holes: the caller knows each slot's sequence position
        if slot_pos.shape[-1] != Tk:
            raise ValueError(f"slot positions cover {slot_pos.shape[-1]} cache slots, the layer has {Tk}")
        k_pos = slot_pos.to(query.device).expand(B, Tk)
        q_pos = k_pos[:, Tk - Tq:]
    elif positions is not None:
        q_pos, k_pos = positions
        k_pos = k_pos[:, :Tk]
    else:  # a caller-built 4D mask or none: slot indices are the positions
        k_pos = torch.arange(Tk, device=query.device).expand(B, Tk)
        q_pos = torch.arange(Tk - Tq, Tk, device=query.device).expand(B, Tq)

    extra = None
    if attention_mask is not None:
        extra = attention_mask[..., :Tk]
        if extra.dtype != torch.bool:  # additive float mask: 0 = visible
            extra = extra > torch.finfo(extra.dtype).min / 2

    n_head_kv = key.shape[1]
    if state is None:
        windows, sink, gates, backend, segments = torch.zeros(n_head_kv, dtype=torch.long), 0, None, "reference", None
    else:
        layer = module.layer_idx
        windows, sink, backend, segments = state.windows[layer], state.sink, state.backend, state.segments
        gates = None if state.gates is None else state.gates[layer]
        if getattr(module, "sliding_window", None):
            # a sliding-window layer of a hybrid (Gemma-2/3, gpt-oss) keeps the model's own window, already in the
            # mask: kvtool budgets apply to the global layers only (docs/semantics.md, "Sliding-window models")
            windows, gates = torch.zeros_like(windows), None

    if segments is not None:
        if Tq != Tk or segments.chunk.shape[-1] != Tk:
            raise ValueError("beacon segments need a full-sequence forward without a KV cache (Tq == Tk == len(segments))")
        seg = segments.to(query.device)
        chunk = seg.chunk.expand(B, Tk) if seg.chunk.dim() == 1 else seg.chunk
        is_b = seg.is_beacon.expand(B, Tk) if seg.is_beacon.dim() == 1 else seg.is_beacon
        bvis = beacon_visibility(chunk, is_b, q_pos).unsqueeze(1)
        extra = bvis if extra is None else extra & bvis

    out = mixed_attention(
        query, key, value, windows, sink, q_pos, k_pos,
        gates=gates, extra_mask=extra, scale=scaling,
        dropout=dropout if module.training else 0.0, backend=backend,
        sinks=kwargs.get("s_aux"), softcap=kwargs.get("softcap"),
    )
    return out.transpose(1, 2).contiguous().to(query.dtype), None


def register_kvtool_attention(name: str = ATTN_NAME) -> str:
    """Register kvtool's attention and its mask function under ``name`` (idempotent); returns the name."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, _attention_fn)
    AttentionMaskInterface.register(name, _mask_fn)
    return name


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


def _model_dims(model: nn.Module) -> tuple[int, int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return int(cfg.num_hidden_layers), int(n_kv)


def _windows_tensor(windows: WindowsLike, n_layer: int, n_head_kv: int) -> torch.Tensor:
    if isinstance(windows, int):
        w = torch.full((n_layer, n_head_kv), windows, dtype=torch.long)
    else:
        w = torch.as_tensor(windows, dtype=torch.long).clone()
    if tuple(w.shape) != (n_layer, n_head_kv):
        raise ValueError(f"windows must be [n_layer={n_layer}][n_head_kv={n_head_kv}], got {tuple(w.shape)}")
    if (w < 0).any():
        raise ValueError("windows must be >= 0 (0 = full head)")
    return w


def get_kvtool(model: nn.Module) -> Optional[KVToolState]:
    """The model's :class:`KVToolState`, or None when kvtool is not loaded."""
    st = getattr(model, "kvtool", None)
    return st if isinstance(st, KVToolState) else None


def _attach(model: nn.Module, state: Optional[KVToolState]) -> None:
    if state is None:
        if get_kvtool(model) is not None:
            del model.kvtool
    else:
        model.kvtool = state
    for m in _attention_modules(model):
        if state is None:
            m.__dict__.pop(_STATE_ATTR, None)
        else:
            m.__dict__[_STATE_ATTR] = state  # bypass nn.Module registration: one owner (the model) is enough


def load_with_kvtool(
    model: nn.Module,
    windows: WindowsLike,
    sink: int,
    gates: Union[None, bool, torch.Tensor] = None,
    backend: str = "reference",
    name: str = ATTN_NAME,
) -> KVToolState:
    """Switch ``model`` to kvtool attention with per-layer, per-KV-head ``windows`` ([L][H_kv] or one int) and ``sink``.

    ``gates``: None for the plain mixed cache semantics; True for trainable gates initialised to 1 (RLKV); or a
    ``[L, H_kv]`` tensor. Works for any transformers model whose attention goes through ``AttentionInterface``
    (tested: Llama, Qwen2). Returns the state (also ``model.kvtool``).
    """
    register_kvtool_attention(name)
    n_layer, n_head_kv = _model_dims(model)
    if sink < 0:
        raise ValueError("sink must be >= 0")
    param = next(model.parameters(), None)
    state = KVToolState(_windows_tensor(windows, n_layer, n_head_kv), sink, backend)
    if param is not None:
        state.to(param.device)
    _attach(model, state)
    if gates is not None and gates is not False:
        set_gates(model, None if gates is True else gates)
    model.set_attn_implementation(name)
    return state


def unload_kvtool(model: nn.Module, attn_implementation: str = "sdpa") -> None:
    """Remove kvtool state (gates included) and go back to a stock attention implementation."""
    _attach(model, None)
    model.set_attn_implementation(attn_implementation)


def set_gates(model: nn.Module, gates: Optional[torch.Tensor] = None, requires_grad: bool = True) -> nn.Parameter:
    """Install RLKV gates ``[L, H_kv]`` (float32; all ones when ``gates`` is None) as a trainable parameter."""
    state = get_kvtool(model)
    if state is None:
        raise ValueError("load_with_kvtool(model, ...) first")
    if gates is None:
        g = torch.ones(state.n_layer, state.n_head_kv)
    else:
        g = torch.as_tensor(gates, dtype=torch.float32).detach().clone()
        if tuple(g.shape) != (state.n_layer, state.n_head_kv):
            raise ValueError(f"gates must be [{state.n_layer}, {state.n_head_kv}], got {tuple(g.shape)}")
    state.gates = nn.Parameter(g.to(state.windows.device, torch.float32), requires_grad=requires_grad)
    return state.gates


def clamp_gates_(model: nn.Module) -> None:
    """Project gates back into [0, 1]; call after every optimiser step (the RLKV recipe)."""
    state = get_kvtool(model)
    if state is not None and state.gates is not None:
        with torch.no_grad():
            state.gates.clamp_(0.0, 1.0)


def freeze_all_but_gates(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every model weight; return the gate parameter(s) for the optimiser."""
    state = get_kvtool(model)
    if state is None or state.gates is None:
        raise ValueError("no gates: load_with_kvtool(model, ..., gates=True) first")
    for p in model.parameters():
        p.requires_grad_(False)
    state.gates.requires_grad_(True)
    return [state.gates]


@contextlib.contextmanager
def _override(state: Optional[KVToolState], attr: str, value) -> Iterator[None]:
    """Set one per-model setting of ``state`` for the forwards inside the block, and restore it after."""
    if state is None:
        raise ValueError("load_with_kvtool(model, ...) first")
    old = getattr(state, attr)
    setattr(state, attr, value)
    try:
        yield
    finally:
        setattr(state, attr, old)


def use_segments(model: nn.Module, segments: Optional[BeaconSegments]) -> contextlib.AbstractContextManager:
    """Apply a beacon layout to the forwards inside the block (training and parity; not for cached decoding)."""
    return _override(get_kvtool(model), "segments", segments)


def use_slot_positions(model: nn.Module, positions: Optional[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Give the sequence position of every KV-cache slot (``[B, n_slots]``, the new tokens' slots last) to the
    forwards inside the block. Needed for cached decoding after slots were cut out of the cache (beacon eviction):
    positions derived from the 2D attention mask would count the survivors only, so the per-head windows would measure
    distance in slots instead of in positions, unlike the runtime (llama.cpp keeps each cell's ``pos``)."""
    return _override(find_kvtool(model), "slot_positions", positions)


def find_kvtool(model: nn.Module) -> Optional[KVToolState]:
    """The state on ``model`` or on its attention layers (a peft wrapper does not forward ``.kvtool``)."""
    st = get_kvtool(model)
    if st is None:
        st = next((m.__dict__[_STATE_ATTR] for m in _attention_modules(model) if _STATE_ATTR in m.__dict__), None)
    return st


def reference_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    windows: WindowsLike,
    sink: int,
    segments: Optional[BeaconSegments] = None,
) -> torch.Tensor:
    """Float32 logits ``[T, vocab]`` of one sequence at positions 0..T-1 under kvtool semantics: the parity oracle.

    Runs through the registered attention (reference backend, no gates) and leaves the model as it found it. Load the
    model in float32 for parity: the attention math is float32 but the rest of the model runs in its own dtype.
    """
    ids = torch.as_tensor(input_ids).long().reshape(1, -1)
    prev_state = get_kvtool(model)
    prev_impl = model.config._attn_implementation
    device = next(model.parameters()).device
    ids = ids.to(device)
    try:
        load_with_kvtool(model, windows, sink)
        with torch.no_grad(), use_segments(model, segments):
            out = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(ids.shape[1], device=device)[None],
                use_cache=False,
            )
        return out.logits[0].float()
    finally:
        _attach(model, prev_state)
        model.set_attn_implementation(prev_impl)
