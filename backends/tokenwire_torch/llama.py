"""An own forward pass for the Llama family, over a slotted KV cache, for batched decoding.

The transformers model runs one sequence per forward pass; serving wants many
sequences in one pass, each at its own position, joining and leaving at any
step. :class:`LlamaForward` takes the weights of a loaded transformers Llama
model (SmolLM2 is one) and keeps, per layer, one preallocated key and value
cache with a row (a *slot*) per sequence. One :meth:`LlamaForward.forward` call
runs any mix of slots, each with its own new tokens and position: a chunk of a
prompt (prefill) or one token of each running sequence (decode)::

    llama = LlamaForward(hf_model, slots=8, max_len=2048)
    logits = llama.forward([0], [prompt_ids], [0])           # prefill slot 0
    logits = llama.forward([0, 1], [[t0], [t1]], [n0, n1])   # decode two slots

The layer math is Llama's (RMSNorm, rotary positions, grouped-query attention,
SwiGLU) with the query, key and value projections fused into one matmul and the
gate and up projections into another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LlamaForward"]


INT4_GROUP = 32
"""Weights per scale and minimum in the int4 format: the GGUF Q4_1 block size, so the
file's own 4-bit weights come back exactly."""


class _Linear:
    """``x @ weight.T``, with the weight as it is (float) or packed as int4 groups."""

    __slots__ = ("error", "packed", "scales", "weight")

    def __init__(self, weight: torch.Tensor, int4: bool) -> None:
        self.weight: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.error = 0.0  # largest |dequantized - original|, relative to the largest weight
        if not int4:
            self.weight = weight.contiguous()
            return
        rows, width = weight.shape
        if width % INT4_GROUP:
            raise ValueError(f"int4 needs input widths in groups of {INT4_GROUP}, got {width}")
        groups = weight.float().reshape(rows, width // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        levels = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
        restored = levels * scale[..., None] + low[..., None]
        self.error = float((restored - groups).abs().max() / groups.abs().max().clamp(min=1e-12))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            levels.to(torch.int32).reshape(rows, width).contiguous(), 8
        )
        # The kernel computes (level - 8) * scale + zero: zero = minimum + 8 * scale.
        zero = low + 8 * scale
        self.scales = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        self.scales = self.scales.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight)
        assert self.packed is not None
        assert self.scales is not None
        flat = x.reshape(-1, x.shape[-1])
        out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, INT4_GROUP, self.scales
        )
        return out.reshape(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True, slots=True)
class _Layer:
    qkv: _Linear  # (q + 2 * kv heads) * head_dim x hidden
    out: _Linear  # hidden x heads * head_dim
    gate_up: _Linear  # 2 * intermediate x hidden
    down: _Linear  # hidden x intermediate
    attention_norm: torch.Tensor
    mlp_norm: torch.Tensor


class LlamaForward:
    """Batched Llama inference over ``slots`` cache rows of ``max_len`` positions each.

    ``hf_model`` is a loaded transformers ``LlamaForCausalLM`` (its weights are
    copied, in ``dtype``). A slot's cache is only ever read up to the positions
    written for it, so a slot is reused by simply starting it again at 0 (or at
    any position whose earlier keys it still holds: a shared prefix).
    """

    def __init__(
        self,
        hf_model: Any,
        *,
        slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        weights: str = "float",
    ) -> None:
        config = hf_model.config
        if getattr(config, "model_type", "llama") != "llama":
            raise ValueError(f"not a Llama model: {config.model_type!r}")
        if slots < 1 or max_len < 1:
            raise ValueError("slots and max_len must be >= 1")
        if weights not in ("float", "int4"):
            raise ValueError(f"weights must be 'float' or 'int4', got {weights!r}")
        int4 = weights == "int4"
        if int4:
            if torch.device(device).type != "cpu":
                raise ValueError("int4 weights run on the CPU kernels; use float on CUDA")
            dtype = torch.bfloat16  # the int4 kernels take bf16 activations
        self.weights = weights
        self.hidden = int(config.hidden_size)
        self.heads, self.kv_heads, self.head_dim = _attention_shape(config)
        self.eps = float(config.rms_norm_eps)
        self.slots = slots
        self.max_len = max_len
        self.dtype = dtype
        self.device = torch.device(device)
        tensors: dict[str, torch.Tensor] = {k: v.detach() for k, v in hf_model.state_dict().items()}

        def take(name: str) -> torch.Tensor:
            return tensors[name].to(device=self.device, dtype=dtype).contiguous()

        def weights_of(name: str) -> torch.Tensor:  # full precision, for quantizing
            source: torch.Tensor = tensors[name]
            wanted = torch.float32 if int4 else dtype
            converted: torch.Tensor = source.to(device=self.device, dtype=wanted)
            return converted

        self.embed = take("model.embed_tokens.weight")
        self.lm_head = take("lm_head.weight") if "lm_head.weight" in tensors else self.embed
        self.norm = take("model.norm.weight")
        self.layers: list[_Layer] = []
        for i in range(int(config.num_hidden_layers)):
            p = f"model.layers.{i}."
            self.layers.append(
                _Layer(
                    qkv=_Linear(
                        torch.cat(
                            [weights_of(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
                        ),
                        int4,
                    ),
                    out=_Linear(weights_of(p + "self_attn.o_proj.weight"), int4),
                    gate_up=_Linear(
                        torch.cat([weights_of(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]),
                        int4,
                    ),
                    down=_Linear(weights_of(p + "mlp.down_proj.weight"), int4),
                    attention_norm=take(p + "input_layernorm.weight"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                )
            )
        shape = (len(self.layers), slots, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=dtype, device=self.device)
        theta = _rope_theta(config)
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        )
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self._cos = angles.cos().to(device=self.device, dtype=dtype)
        self._sin = angles.sin().to(device=self.device, dtype=dtype)

    @staticmethod
    def cache_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
        """Bytes of keys and values one position of one slot takes, for ``config``."""
        _, kv_heads, head_dim = _attention_shape(config)
        return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * dtype.itemsize

    @property
    def int4_error(self) -> float:
        """The largest relative change int4 packing made to any weight (0.0: lossless, as
        for weights that were 4-bit in the file; 0.0 for float weights too)."""
        return max(
            (
                lin.error
                for layer in self.layers
                for lin in (layer.qkv, layer.out, layer.gate_up, layer.down)
            ),
            default=0.0,
        )

    @property
    def cache_bytes(self) -> int:
        """Bytes the key and value caches hold."""
        return 2 * self.keys.numel() * self.keys.element_size()

    @torch.inference_mode()
    def forward(
        self,
        slots: Sequence[int],
        tokens: Sequence[Sequence[int]],
        positions: Sequence[int],
    ) -> torch.Tensor:
        """Run ``tokens[i]`` for ``slots[i]`` starting at ``positions[i]``; their keys and
        values land in the cache. Returns the logits after each slot's last token,
        ``(len(slots), vocab)``, in float32.

        Rows may differ in length (prompt chunks of several requests in one pass):
        shorter ones are padded to the longest, and what the padding writes lies past
        the row's last position, where nothing reads before the row's next tokens
        overwrite it. Every row needs room for the longest in the cache.
        """
        batch = len(slots)
        lengths = [len(t) for t in tokens]
        width = max(lengths, default=0)
        if not (batch == len(positions) > 0) or min(lengths) < 1:
            raise ValueError("one start position per slot, and at least one token each")
        if max(positions) + width > self.max_len:
            raise ValueError(f"positions past the cache's {self.max_len}")
        dev = self.device
        padded = [list(t) + [0] * (width - len(t)) for t in tokens]
        ids = torch.tensor(padded, dtype=torch.long, device=dev)  # B x T
        start = torch.tensor(positions, dtype=torch.long, device=dev)
        slot = torch.tensor(slots, dtype=torch.long, device=dev)
        pos = start[:, None] + torch.arange(width, device=dev)[None, :]  # B x T
        span = int(max(positions)) + width  # keys to attend over
        cos, sin = self._cos[pos][:, :, None, :], self._sin[pos][:, :, None, :]  # B x T x 1 x D
        # Causal within the chunk, and never past what this slot has written.
        visible = torch.arange(span, device=dev)[None, None, :] <= pos[:, :, None]  # B x T x S
        mask = visible[:, None, :, :]  # B x 1 x T x S
        flat_slot = slot[:, None].expand(batch, width).reshape(-1)
        flat_pos = pos.reshape(-1)
        groups = self.heads // self.kv_heads
        first = slots[0]
        consecutive = list(slots) == list(range(first, first + batch))
        rows = slice(first, first + batch) if consecutive else None
        q_size = self.heads * self.head_dim
        kv_size = self.kv_heads * self.head_dim
        x = self.embed[ids]  # B x T x H
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attention_norm, self.eps)
            qkv = layer.qkv(h)
            q = qkv[..., :q_size]
            k = qkv[..., q_size : q_size + kv_size]
            v = qkv[..., q_size + kv_size :]
            q = _rotate(q.view(batch, width, self.heads, self.head_dim), cos, sin)
            k = _rotate(k.view(batch, width, self.kv_heads, self.head_dim), cos, sin)
            v = v.view(batch, width, self.kv_heads, self.head_dim)
            keys, values = self.keys[index], self.values[index]
            keys[flat_slot, :, flat_pos] = k.reshape(-1, self.kv_heads, self.head_dim)
            values[flat_slot, :, flat_pos] = v.reshape(-1, self.kv_heads, self.head_dim)
            if rows is not None:  # consecutive slots: a view, no copy
                k_all, v_all = keys[rows, :, :span], values[rows, :, :span]
            else:
                k_all, v_all = keys[slot, :, :span], values[slot, :, :span]  # B x KV x S x D
            attended = F.scaled_dot_product_attention(
                q.transpose(1, 2), k_all, v_all, attn_mask=mask, enable_gqa=groups > 1
            )  # B x H x T x D
            x = x + layer.out(attended.transpose(1, 2).reshape(batch, width, q_size))
            h = _rms_norm(x, layer.mlp_norm, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        ends = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=dev)
        last = _rms_norm(x[torch.arange(batch, device=dev), ends], self.norm, self.eps)
        return F.linear(last, self.lm_head).float()


def _attention_shape(config: Any) -> tuple[int, int, int]:
    """Query heads, key/value heads and head width of a Llama config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    return heads, kv_heads, head_dim


def _rope_theta(config: Any) -> float:
    """The rotary base: ``rope_parameters`` (transformers 5) or ``rope_theta`` (4.x); only
    the default rotary scheme is implemented."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    parameters = parameters if isinstance(parameters, dict) else {}
    kind = parameters.get("rope_type") or parameters.get("type") or "default"
    if kind != "default":
        raise ValueError(f"rotary scaling {kind!r} is not implemented by the own forward")
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return float(parameters["rope_theta"])
    try:
        return float(config.rope_theta)
    except AttributeError:
        return 10000.0


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
