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

__all__ = ["WEIGHT_FORMATS", "LlamaForward", "cpu_has_avx2", "cpu_has_bf16", "cpu_has_fbgemm"]


INT4_GROUP = 32
"""Weights per scale and minimum in the int4 format: the GGUF Q4_1 block size, so the
file's own 4-bit weights come back exactly."""


WEIGHT_FORMATS = ("float", "fp16", "int8", "int4")
"""How :class:`LlamaForward` holds its matmul weights: as they are (in the dtype);
in half precision for fbgemm's fp16 kernels (x86 CPUs, float32 activations and
sums: half the bytes of float32 and 2-4x its speed at every batch size on CPUs
without native bf16); or also quantized, int8 per output row or int4 in groups of
``INT4_GROUP``. Quantized kernels read a quarter to half the bytes but redo the
dequantizing for every row, so they win on the few rows of a small decode batch
and lose on big batches and prompts: those use a copy of the same (dequantized)
weights in the dtype, or in halves beside a float32 dtype where fbgemm runs. The
kernels take bf16 activations: with a float32 dtype (CPUs without native bf16,
whose bf16 matmuls are slow on many rows), only their inputs are cast."""


class _Linear:
    """``x @ weight.T``: dense (``weight`` in the model's dtype, or ``half``, fbgemm's
    packed half-precision copy), or through the quantized copy (int8 per row or int4
    per group) when asked and there is one."""

    __slots__ = ("error", "half", "kind", "packed", "scales", "weight")

    def __init__(
        self, weight: torch.Tensor, kind: str, dtype: torch.dtype, half: bool = False
    ) -> None:
        self.kind = kind
        self.packed: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.half: torch.Tensor | None = None
        self.error = 0.0  # largest |dequantized - original|, relative to the largest weight
        if kind == "float":
            self.weight = weight.to(dtype).contiguous()
            return
        original = weight.float()
        if kind == "fp16":
            half, restored = True, original.half().float()
        elif kind == "int8":
            scale = (original.abs().amax(-1) / 127).clamp(min=1e-12)
            levels = (original / scale[:, None]).round().clamp(-127, 127)
            restored = levels * scale[:, None]
            self.packed = levels.to(torch.int8).contiguous()
            self.scales = scale.to(torch.bfloat16)
        else:
            rows, width = weight.shape
            if width % INT4_GROUP:
                raise ValueError(f"int4 needs input widths in groups of {INT4_GROUP}, got {width}")
            groups = original.reshape(rows, width // INT4_GROUP, INT4_GROUP)
            low, high = groups.amin(-1), groups.amax(-1)
            scale = ((high - low) / 15).clamp(min=1e-12)
            levels = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
            restored = (levels * scale[..., None] + low[..., None]).reshape(rows, width)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                levels.to(torch.int32).reshape(rows, width).contiguous(), 8
            )
            # The kernel computes (level - 8) * scale + zero: zero = minimum + 8 * scale.
            zero = low + 8 * scale
            self.scales = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
            self.scales = self.scales.to(torch.bfloat16)
        self.error = float(
            (restored - original).abs().max() / original.abs().max().clamp(min=1e-12)
        )
        if half:  # the dense copy as fbgemm's packed halves; none in the dtype
            self.weight = torch.empty(0)
            self.half = torch.ops.quantized.linear_prepack_fp16(restored.contiguous(), None)
        else:
            self.weight = restored.to(dtype).contiguous()

    def __call__(self, x: torch.Tensor, quantized: bool) -> torch.Tensor:
        if not quantized or self.packed is None:
            if self.half is not None:
                dense: torch.Tensor = torch.ops.quantized.linear_dynamic_fp16(x, self.half)
                return dense
            return F.linear(x, self.weight)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # the kernels' activations
        if self.kind == "int8":
            out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(flat, self.packed, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.packed, INT4_GROUP, self.scales
            )
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def cpu_has_avx2() -> bool:
    """Whether torch's CPU kernels run AVX2 (or AVX-512) vector code here."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cpu_has_fbgemm() -> bool:
    """Whether torch here runs fbgemm's kernels (x86 builds, on a CPU with AVX2 or
    better), which the fp16 format needs."""
    return cpu_has_avx2() and "fbgemm" in torch.backends.quantized.supported_engines


def cpu_has_bf16() -> bool:
    """Whether torch's CPU kernels run bf16 natively here (AVX512-BF16 or AMX)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else False


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

    ``weights`` is one of :data:`WEIGHT_FORMATS` (quantized ones for decode steps
    of at most ``quantized_rows`` rows: by default 8, or 1 where the dense copy is
    fbgemm's halves, :attr:`dense`); ``compile`` compiles the decode step
    (call :meth:`warm_up` before serving); ``fixed_shapes`` (default: when
    compiling on CUDA, for CUDA graphs) pads decode batches to powers of two
    and attends over whole rows, so a step's shapes never change.
    ``attention_dtype`` is the dtype attention runs in (default: the dtype, but
    float32 for a bf16 cache on the CPU, several times faster there).
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
        quantized_rows: int | None = None,
        compile: bool = False,
        fixed_shapes: bool | None = None,
        attention_dtype: torch.dtype | None = None,
    ) -> None:
        config = hf_model.config
        if getattr(config, "model_type", "llama") != "llama":
            raise ValueError(f"not a Llama model: {config.model_type!r}")
        if slots < 1 or max_len < 1:
            raise ValueError("slots and max_len must be >= 1")
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
        quantized = weights in ("int8", "int4")
        if weights != "float":
            if torch.device(device).type != "cpu":
                raise ValueError(f"{weights} weights run on the CPU kernels; use float on CUDA")
            if dtype not in (torch.bfloat16, torch.float32):
                raise ValueError(f"{weights} weights run with bfloat16 or float32, not {dtype}")
        if weights == "fp16":
            if dtype != torch.float32:
                raise ValueError(f"fp16 weights run with float32 activations, not {dtype}")
            if compile:
                raise ValueError("fp16 weights run fbgemm's ops, which do not compile")
            if not cpu_has_fbgemm():
                raise ValueError("fp16 weights need fbgemm: an x86 CPU with AVX2")
        half = weights == "fp16" or (quantized and self.dense_halves(dtype, compile))
        self.dense = "fp16" if half else str(dtype).removeprefix("torch.")
        self.weights = weights
        # Decode steps of at most this many rows use the quantized weights: 8 where the
        # dense copy is in the dtype; beside halves, one (past one row they win).
        if quantized_rows is None:
            quantized_rows = 1 if half else 8
        self.quantized_rows = quantized_rows if quantized else 0
        self.hidden = int(config.hidden_size)
        self.heads, self.kv_heads, self.head_dim = _attention_shape(config)
        self._gqa = self.heads > self.kv_heads
        # Torch's CPU attention in bf16 takes 4-8x as long as in float32 for a decode
        # step (the keys and values read and converted included), more the longer the
        # context: by default, bf16 caches are attended in float32 on the CPU.
        if attention_dtype is None:
            on_cpu = torch.device(device).type == "cpu"
            attention_dtype = torch.float32 if on_cpu and dtype == torch.bfloat16 else dtype
        self.attention_dtype = attention_dtype
        self.eps = float(config.rms_norm_eps)
        self.slots = slots
        self.max_len = max_len
        self.dtype = dtype
        self.device = torch.device(device)
        tensors: dict[str, torch.Tensor] = {k: v.detach() for k, v in hf_model.state_dict().items()}

        def take(name: str) -> torch.Tensor:  # the residual stream's: float32
            return tensors[name].to(device=self.device, dtype=torch.float32).contiguous()

        def linear(*names: str) -> _Linear:  # full precision in, for quantizing
            wanted = torch.float32 if weights != "float" else dtype
            joined = torch.cat([tensors[n].to(device=self.device, dtype=wanted) for n in names])
            return _Linear(joined, weights, dtype, half)

        self.embed = take("model.embed_tokens.weight")
        head = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
        # The output projection reads 49k x 576 weights a step: int8 per row when the
        # layers are quantized (the file holds it as 8-bit blocks), never int4; in
        # halves alone where there are halves (faster than int8 there, at any rows).
        self.lm_head = _Linear(
            tensors[head].to(
                device=self.device, dtype=torch.float32 if weights != "float" else dtype
            ),
            "fp16" if half else "int8" if quantized else weights,
            dtype,
        )
        self.norm = take("model.norm.weight")
        self.layers: list[_Layer] = []
        for i in range(int(config.num_hidden_layers)):
            p = f"model.layers.{i}."
            self.layers.append(
                _Layer(
                    qkv=linear(*(p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v"))),
                    out=linear(p + "self_attn.o_proj.weight"),
                    gate_up=linear(*(p + f"mlp.{n}_proj.weight" for n in ("gate", "up"))),
                    down=linear(p + "mlp.down_proj.weight"),
                    attention_norm=take(p + "input_layernorm.weight"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                )
            )
        # Keys then values of every kv head, per layer and slot: one write a layer.
        # CUDA graphs replay fixed shapes: decode steps then pad their batch to a
        # power of two (rows of one extra scratch slot) and attend over whole rows.
        if fixed_shapes is None:
            fixed_shapes = self.scratch_slots(compile, self.device) > 0
        self._graphed = fixed_shapes
        scratch = 1 if self._graphed else 0
        shape = (len(self.layers), slots + scratch, 2 * self.kv_heads, max_len, self.head_dim)
        self.cache = torch.zeros(shape, dtype=dtype, device=self.device)
        theta = _rope_theta(config)
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        )
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        # Rotation as x * cos + roll(x, half) * sin, with the sign of the first half in sin.
        middle = self.head_dim // 2
        sin = angles.sin()
        sin[:, :middle] = -sin[:, :middle]
        self._cos = angles.cos().to(device=self.device, dtype=dtype)
        self._sin = sin.to(device=self.device, dtype=dtype)
        self._compiled: Any = None
        if compile:
            # Decode steps only (prompt chunks vary too much in shape to be worth it).
            # On the CPU sizes are symbolic: one graph serves every batch of 2 or more
            # rows and every span (a single row is a graph of its own).
            self._compiled = torch.compile(
                self._run,
                dynamic=not self._graphed,
                fullgraph=True,
                mode="reduce-overhead" if self._graphed else None,
            )

    def warm_up(self) -> None:
        """Run decode steps of the shapes serving will see (one row, two, and one past
        the quantized rows), so compiling and kernel set-up happen now, not for a user.
        Writes keys into the first slots, which a request overwrites anyway."""
        sizes = {1, min(2, self.slots)}
        if self.quantized_rows:
            sizes.add(min(self.quantized_rows + 1, self.slots))
        if self._graphed:  # one graph per power of two
            sizes = {_bucket(size, self.slots) for size in range(1, self.slots + 1)}
        for size in sorted(sizes):
            for span in sorted({min(2, self.max_len), min(17, self.max_len)}):  # 2+ keys
                self.forward(list(range(size)), [[0]] * size, [span - 1] * size)

    @staticmethod
    def dense_halves(dtype: torch.dtype, compile: bool) -> bool:
        """Whether quantized weights keep their dense copy as fbgemm's halves: with
        float32 activations where fbgemm runs (2-4x float32's speed, half the memory),
        unless compiling (fbgemm's ops do not compile)."""
        return dtype == torch.float32 and not compile and cpu_has_fbgemm()

    @staticmethod
    def scratch_slots(compile: bool, device: torch.device | str) -> int:
        """Cache rows beyond ``slots`` that padding needs: one when the decode step is
        compiled on CUDA (fixed shapes for CUDA graphs, unless told otherwise)."""
        return 1 if compile and torch.device(device).type == "cuda" else 0

    @staticmethod
    def cache_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
        """Bytes of keys and values one position of one slot takes, for ``config``."""
        _, kv_heads, head_dim = _attention_shape(config)
        return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * dtype.itemsize

    @property
    def quantize_error(self) -> float:
        """The largest relative change quantizing made to any layer weight (0.0: lossless,
        as for weights that were 4-bit in the file; 0.0 for float weights too)."""
        return max(
            (
                lin.error
                for layer in self.layers
                for lin in (layer.qkv, layer.out, layer.gate_up, layer.down)
            ),
            default=0.0,
        )

    @torch.inference_mode()
    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy the keys and values of ``source``'s first ``length`` positions into
        ``target`` (a shared prefix one slot computed and another reuses)."""
        self.cache[:, target, :, :length] = self.cache[:, source, :, :length]

    @property
    def cache_bytes(self) -> int:
        """Bytes the key and value cache holds."""
        return self.cache.numel() * self.cache.element_size()

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
        quantized = batch * width <= self.quantized_rows
        if width == 1 and self._graphed:
            return self._graphed_decode(slots, tokens, positions, quantized)
        dev = self.device
        if width == 1:
            ids = torch.tensor([t[0] for t in tokens], dtype=torch.long, device=dev)[:, None]
            pos = torch.tensor(positions, dtype=torch.long, device=dev)[:, None]  # B x 1
            ends = None
        else:
            padded = [list(t) + [0] * (width - len(t)) for t in tokens]
            ids = torch.tensor(padded, dtype=torch.long, device=dev)  # B x T
            start = torch.tensor(positions, dtype=torch.long, device=dev)
            pos = start[:, None] + torch.arange(width, device=dev)[None, :]  # B x T
            ends = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=dev)
        span = int(max(positions)) + width  # keys to attend over
        slot = torch.tensor(slots, dtype=torch.long, device=dev)
        first = slots[0]
        consecutive = list(slots) == list(range(first, first + batch))
        run = self._compiled if width == 1 and self._compiled is not None else self._run
        return run(ids, pos, slot, ends, span, first if consecutive else -1, quantized)

    def _graphed_decode(
        self,
        slots: Sequence[int],
        tokens: Sequence[Sequence[int]],
        positions: Sequence[int],
        quantized: bool,
    ) -> torch.Tensor:
        """A decode step in fixed shapes, as CUDA graphs need: the batch padded to a
        power of two with rows of the scratch slot, attention over the whole row."""
        batch = len(slots)
        size = _bucket(batch, self.slots)
        pad = size - batch
        dev = self.device
        ids = torch.tensor([t[0] for t in tokens] + [0] * pad, dtype=torch.long, device=dev)
        pos = torch.tensor([*positions] + [0] * pad, dtype=torch.long, device=dev)
        slot = torch.tensor([*slots] + [self.slots] * pad, dtype=torch.long, device=dev)
        run = self._compiled if self._compiled is not None else self._run
        logits: torch.Tensor = run(
            ids[:, None], pos[:, None], slot, None, self.max_len, -1, quantized
        )
        return logits[:batch].clone()  # the graph's output buffer is reused

    def _run(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        slot: torch.Tensor,
        ends: torch.Tensor | None,
        span: int,
        first: int,
        quantized: bool,
    ) -> torch.Tensor:
        """The layers over prepared tensors: ``ids`` and ``pos`` are B x T, ``slot`` B,
        ``ends`` each row's last token (None: T is 1), ``first`` the first slot when the
        slots are consecutive (else -1); ``quantized`` picks the quantized weights."""
        batch, width = ids.shape
        dev = self.device
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        # One rotation for query and key heads alike; value heads pass unrotated.
        turned = heads + kv_heads
        cos = self._cos[pos][:, :, None, :].expand(batch, width, turned, head_dim)
        sin = self._sin[pos][:, :, None, :].expand(batch, width, turned, head_dim)
        plain = torch.ones(batch, width, kv_heads, head_dim, dtype=self.dtype, device=dev)
        cos = torch.cat([cos, plain], dim=2)
        sin = torch.cat([sin, torch.zeros_like(plain)], dim=2)  # B x T x (H + 2 KV) x D
        # Causal within the chunk, and never past what this slot has written. One row
        # of one token sees every key up to its own (span ends there; not so for the
        # fixed shapes, which attend over whole rows): no mask, which halves the
        # attention's time on that row.
        mask: torch.Tensor | None = None
        if batch * width > 1 or self._graphed:
            visible = torch.arange(span, device=dev)[None, None, :] <= pos[:, :, None]
            mask = visible[:, None, :, :]  # B x 1 x T x S
        flat_slot = slot[:, None].expand(batch, width).reshape(-1)
        flat_pos = pos.reshape(-1)
        q_size = heads * head_dim
        half = head_dim // 2
        # The residual stream stays float32 (as do the norms); matmuls and attention
        # run in the dtype. With bf16, that keeps greedy text closer to float32's.
        x = self.embed[ids]  # B x T x H
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), layer.attention_norm, self.eps).to(self.dtype)
            qkv = layer.qkv(h, quantized).view(batch, width, heads + 2 * kv_heads, head_dim)
            qkv = torch.addcmul(qkv * cos, qkv.roll(half, -1), sin)
            cache = self.cache[index]
            cache[flat_slot, :, flat_pos] = qkv[:, :, heads:].reshape(-1, 2 * kv_heads, head_dim)
            if first >= 0:  # consecutive slots: a view, no copy
                held = cache[first : first + batch, :, :span]
            else:
                held = cache[:, :, :span].index_select(0, slot)  # B x 2 KV x S x D
            query = qkv[:, :, :heads].transpose(1, 2)
            if held.dtype != self.attention_dtype:
                query, held = query.to(self.attention_dtype), held.to(self.attention_dtype)
            attended = F.scaled_dot_product_attention(
                query, held[:, :kv_heads], held[:, kv_heads:], attn_mask=mask, enable_gqa=self._gqa
            ).to(self.dtype)  # B x H x T x D
            x = x + layer.out(attended.transpose(1, 2).reshape(batch, width, q_size), quantized)
            h = F.rms_norm(x, (self.hidden,), layer.mlp_norm, self.eps).to(self.dtype)
            gate, up = layer.gate_up(h, quantized).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up, quantized)
        last = x[:, 0] if ends is None else x[torch.arange(batch, device=dev), ends]
        last = F.rms_norm(last, (self.hidden,), self.norm, self.eps).to(self.dtype)
        return self.lm_head(last, quantized).float()


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


def _bucket(batch: int, most: int) -> int:
    """The power of two at or above ``batch``, but no more than ``most``."""
    return min(1 << (batch - 1).bit_length(), most)
