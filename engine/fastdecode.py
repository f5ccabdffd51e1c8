"""A lean decoder for Llama-family models on CPU: greedy replies identical to the model's
own, 2-2.5x as fast as ``model.generate`` here.

Why: batch-1 decoding of a small model in float32 is bound by memory bandwidth (every token
reads every weight once: 538 MB for SmolLM2-135M) plus Python/dispatch overhead
(transformers' forward issues ~1,000 small ops per token). Going beyond the bandwidth
bound while keeping the float32 model's greedy answers needs fewer full reads per token,
so this module decodes *speculatively*:

* a **draft** copy of the same model with 4-bit weights (group-wise, built in memory at
  load time, ~6x fewer bytes) proposes ``k`` tokens one at a time;
* the float32 **target** checks all ``k`` in one forward pass over ``k + 1`` positions
  (the weights are read once for all of them) and keeps the longest prefix that equals its
  own greedy choices, plus its own token at the first difference.

Every emitted token is therefore the float32 model's greedy token; the draft only decides
how many are checked per weight read. The KV cache is static and rolls back by moving a
length pointer.

Two ways to run the decode-time passes:

* **native** (engine/native.py builds engine/kernels/lean.c; x86-64 with AVX-512, or AVX2
  + FMA + F16C, and a C compiler): each pass is one call into C, no Python between operations, both cores on
  every product; the draft reads the target's KV cache (the target's exact keys and values
  for every accepted token) and only computes its own guesses' positions. Measured on
  SmolLM2-135M here: check of 5 positions ~26 ms, draft step ~3.5-5 ms.
* **PyTorch** (anywhere else): the same passes with PyTorch operations, the draft with
  PyTorch's int4 CPU kernel (bfloat16 activations) and a cache of its own; 1.2-2x
  ``generate`` (1.19x on an AVX2-only CPU, where bfloat16 is emulated).

A prompt of up to ``NATIVE_PROMPT`` tokens goes through the native pass too (its weight
tiles stay in cache while every position passes over them); a longer one through PyTorch.

Only greedy decoding (with or without a repetition penalty) is accelerated; sampling uses
the plain decoder. Only architectures whose forward this module reproduces are:
``llama`` and ``qwen2``-style decoders
(RMSNorm, rotary embeddings, grouped-query attention, gated SiLU MLP), optionally wrapped
in a PEFT LoRA adapter, whose update is added to the float32 weights here.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED = ("llama", "qwen2")
DRAFT_GROUP = 32
DRAFT_TOKENS = 4
# Prompts up to this many tokens go through the native pass. Measured on SmolLM2-135M here
# (2 cores): 27 tokens 70 ms native (AVX2 build) vs 125 ms PyTorch, 40 tokens 89 vs 125,
# 100 tokens 213 vs 204; longer prompts favour PyTorch's attention.
NATIVE_PROMPT = 96


def memory_factor() -> float:
    """The lean decoder's memory as a multiple of the model's float32 weights: a fused
    float32 copy plus the 4-bit draft with the native kernels; with the PyTorch path also
    a copy of each float32 weight packed for the check's batch width."""
    from engine import native

    try:
        native.load()
    except native.NativeUnavailable:
        return 2.2
    return 1.3


class Unsupported(ValueError):
    """The model cannot use the lean decoder (the caller falls back to the plain one)."""


@dataclass
class _Layer:
    ln1: object
    ln2: object
    qkv: object  # a _Linear (q, k and v fused)
    o: object
    gate_up: object  # gate and up fused
    down: object


class _Dense:
    """float32 ``x @ W.T + b``; with ``width`` set, W is also pre-packed by MKL for that
    many rows at a time (the verification pass), which reads it at close to memory speed
    where the plain small-batch GEMM does not."""

    def __init__(self, weight, bias=None, width: int | None = None):
        import torch

        self.weight = weight.contiguous()
        self.bias = bias
        self.width = width
        self.packed = None
        if width and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, width)

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        if self.packed is not None and x.shape[0] == self.width:
            out = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.width)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


class _Int4:
    """bfloat16 ``x @ W.T`` with W in 4-bit groups of ``group`` columns (asymmetric, one
    scale and offset per group) through PyTorch's CPU int4 kernel."""

    def __init__(self, weight, bias=None, group: int = DRAFT_GROUP):
        import torch

        n, k = weight.shape
        if k % group:
            raise Unsupported(f"a {n} x {k} weight does not split into groups of {group} columns")
        self.rows = n
        if n % 16:  # the kernel packs rows in sixteens: pad with zero rows, cut them off after
            weight = torch.cat([weight, weight.new_zeros(16 - n % 16, k)])
            n = weight.shape[0]
        w = weight.float().reshape(n, k // group, group)
        low = w.amin(-1, keepdim=True)
        high = w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        q = torch.clamp(torch.round((w - low) / scale), 0, 15).to(torch.int32).reshape(n, k)
        # the kernel computes (q - 8) * scale + zero
        zero = low + 8 * scale
        self.scale_zero = torch.stack([scale.reshape(n, -1), zero.reshape(n, -1)], -1).transpose(0, 1).contiguous()
        self.scale_zero = self.scale_zero.to(torch.bfloat16)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.group = group
        self.bias = None if bias is None else bias.to(torch.bfloat16)

    def __call__(self, x):
        import torch

        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_zero)
        if out.shape[-1] != self.rows:
            out = out[..., : self.rows]
        return out if self.bias is None else out + self.bias


def _merged_weight(module):
    """float32 weight (and bias) of a Linear, a PEFT LoRA update included."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight.detach().float(), None if module.bias is None else module.bias.detach().float()
    weight = base.weight.detach().float().clone()
    if not getattr(module, "merged", False):
        for name in getattr(module, "active_adapters", []):
            if name not in getattr(module, "lora_A", {}):
                continue
            if getattr(module, "use_dora", {}).get(name):
                raise Unsupported("DoRA adapters are decoded by the plain decoder")
            weight += module.get_delta_weight(name).detach().float()
    return weight, None if base.bias is None else base.bias.detach().float()


class _Stack:
    """One copy of the decoder's weights (float32 dense or 4-bit) and its KV cache."""

    def __init__(self, layers, norm, head, rotary, cfg, max_len: int, dtype):
        self.layers = layers
        self.norm = norm
        self.head = head
        self.rotary = rotary
        self.eps = cfg["eps"]
        self.heads = cfg["heads"]
        self.kv_heads = cfg["kv_heads"]
        self.head_dim = cfg["head_dim"]
        self.dtype = dtype
        self.max_len = max_len
        self.k: list = []
        self.v: list = []
        self.length = 0

    def reserve(self, tokens: int) -> None:
        """Empty the cache and make room for ``tokens`` positions (grown, never shrunk)."""
        import torch

        if tokens > self.max_len:
            raise Unsupported(f"{tokens} positions exceed the model's context of {self.max_len}")
        self.length = 0
        if self.k and self.k[0].shape[2] >= tokens:
            return
        size = min(self.max_len, max(tokens, 256) * 2)
        shape = (1, self.kv_heads, size, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        # the model's own rotary module gives the angles, once for every position
        probe = torch.zeros(1, 1, self.head_dim, dtype=self.dtype)
        cos, sin = self.rotary(probe, torch.arange(size).unsqueeze(0))
        self.cos = cos[0].to(self.dtype).unsqueeze(1).contiguous()
        self.sin = sin[0].to(self.dtype).unsqueeze(1).contiguous()

    def _norm(self, x, weight):
        import torch.nn.functional as F

        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def forward(self, ids, last_only: bool = False):
        """Logits (float32) of ``ids`` appended at the cache's current length."""
        import torch
        import torch.nn.functional as F

        n = len(ids)
        start = self.length
        if start + n > self.k[0].shape[2]:
            raise Unsupported("the reply outgrew the lean decoder's cache")
        x = self.embed(torch.tensor(ids)).to(self.dtype)
        cos = self.cos.narrow(0, start, n)  # [n, 1, head_dim]
        sin = self.sin.narrow(0, start, n)
        half = self.head_dim // 2
        q_size = self.heads * self.head_dim
        kv_size = self.kv_heads * self.head_dim
        mask = None
        if n > 1:
            mask = torch.ones(n, start + n, dtype=torch.bool).tril(diagonal=start)
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.ln1)
            qkv = layer.qkv(h)
            # rotary embedding of q and k together: [n, heads + kv_heads, head_dim]
            qk = qkv[:, : q_size + kv_size].view(n, self.heads + self.kv_heads, self.head_dim)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            q = qk[:, : self.heads].transpose(0, 1).unsqueeze(0)
            cache_k, cache_v = self.k[i], self.v[i]  # [1, kv_heads, positions, head_dim]
            cache_k.narrow(2, start, n).copy_(qk[:, self.heads :].transpose(0, 1).unsqueeze(0))
            cache_v.narrow(2, start, n).copy_(
                qkv[:, q_size + kv_size :].view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            )
            att = F.scaled_dot_product_attention(
                q,
                cache_k.narrow(2, 0, start + n),
                cache_v.narrow(2, 0, start + n),
                attn_mask=mask,
                scale=self.head_dim**-0.5,
                enable_gqa=True,
            )
            x = x + layer.o(att.transpose(1, 2).reshape(n, q_size))
            h = self._norm(x, layer.ln2)
            gate_up = layer.gate_up(h)
            width = gate_up.shape[-1] // 2
            x = x + layer.down(F.silu(gate_up[:, :width]) * gate_up[:, width:])
        self.length = start + n
        if last_only:
            x = x[-1:]
        return self.head(self._norm(x, self.norm)).float()


def model_config(model) -> dict:
    """The few numbers the lean forward needs, or Unsupported with the reason."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if kind not in SUPPORTED:
        raise Unsupported(f"model type {kind!r} is not one of {', '.join(SUPPORTED)}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {cfg.hidden_act!r} is not silu")
    rope = getattr(cfg, "rope_scaling", None) or {}
    if rope and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise Unsupported(f"rope scaling {rope!r} is not supported")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        raise Unsupported("sliding-window attention is not supported")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {
        "eps": cfg.rms_norm_eps,
        "heads": heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "hidden": cfg.hidden_size,
        "inter": cfg.intermediate_size,
        "max_len": getattr(cfg, "max_position_embeddings", 2048),
    }


def _inner(model):
    """The transformers model (decoder + lm_head) inside a possible PEFT wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


class _Native:
    """The target (float32) and draft (4-bit) models in engine/kernels/lean.c, both
    reading and writing the KV cache of the PyTorch target stack (which fills it for the
    prompt)."""

    @staticmethod
    def refusal(cfg: dict) -> str:
        """Why the kernels cannot run a model of this shape ("" when they can)."""
        sizes = (
            ("hidden size", cfg["hidden"]),
            ("MLP width", cfg["inter"]),
            ("attention width", cfg["heads"] * cfg["head_dim"]),
        )
        for name, size in sizes:
            if size % 32:
                return f"the native kernels need a {name} divisible by 32 (it is {size})"
        if cfg["head_dim"] % 16 or cfg["head_dim"] > 512:
            return f"the native kernels need a head size divisible by 16, at most 512 (it is {cfg['head_dim']})"
        return ""

    def __init__(self, lib, weights, norm, head, cfg: dict, rows: int):
        import torch

        hidden, inter = cfg["hidden"], cfg["inter"]
        heads, kv_heads, head_dim = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
        self.lib = lib
        self.keep: list = []  # every tensor whose memory the library reads

        def address(tensor) -> int:
            if tensor is None:
                return 0
            tensor = tensor.detach().float().contiguous()
            self.keep.append(tensor)
            return tensor.data_ptr()

        def int4(weight) -> int:
            n, k = weight.shape
            blocks = torch.empty(-(-n // 16) * (k // 32) * 320, dtype=torch.uint8)
            weight = weight.detach().float().contiguous()
            if lib.tl_pack_int4(weight.data_ptr(), n, k, blocks.data_ptr()) != 0:
                raise Unsupported(f"a {n} x {k} weight does not split into groups of 32 columns")
            self.keep.append(blocks)
            return blocks.data_ptr()

        tables: dict[str, list[int]] = {"target": [], "draft": []}
        for ln1, ln2, linears in weights:
            for name, table in tables.items():
                table += [address(ln1), address(ln2)]
                for weight, bias in linears:
                    table += (
                        [address(weight), 0, address(bias)] if name == "target" else [0, int4(weight), address(bias)]
                    )
        for name, table in tables.items():
            table.append(address(norm))
            table += (
                [address(head[0]), 0, address(head[1])] if name == "target" else [0, int4(head[0]), address(head[1])]
            )
        self.vocab = head[0].shape[0]
        dims = torch.tensor([len(weights), hidden, heads, kv_heads, head_dim, inter, self.vocab], dtype=torch.int64)
        self.models = {}
        for name, table in tables.items():
            addresses = torch.tensor(table, dtype=torch.int64)  # alive until the call returns
            handle = lib.tl_model(dims.data_ptr(), addresses.data_ptr(), cfg["eps"])
            if not handle:
                raise Unsupported("the native kernels could not allocate the model description")
            self.models[name] = handle
        self.scratch = torch.empty(lib.tl_scratch_floats(self.models["target"], rows), dtype=torch.float32)
        self.logits = torch.empty(rows, self.vocab, dtype=torch.float32)
        self.rows = rows
        self._caches = (None, None, None)

    def __del__(self):
        for handle in getattr(self, "models", {}).values():
            self.lib.tl_model_free(handle)

    def forward(self, which: str, stack: "_Stack", ids: list[int], start: int, last_only: bool = False):
        """Logits (a view of a reused buffer) of ``ids`` at positions ``start``... of ``stack``'s cache."""
        import torch

        n = len(ids)
        if start + n > stack.k[0].shape[2]:
            raise Unsupported("the reply outgrew the lean decoder's cache")
        if n > self.rows:  # a prompt: room for its positions, kept for the next one
            self.scratch = torch.empty(self.lib.tl_scratch_floats(self.models["target"], n), dtype=torch.float32)
            self.rows = n
        if not last_only and n > self.logits.shape[0]:
            self.logits = torch.empty(n, self.vocab, dtype=torch.float32)
        if self._caches[0] is not stack.k[0]:  # the stack grew its cache: new addresses
            self._caches = (
                stack.k[0],
                torch.tensor([t.data_ptr() for t in stack.k], dtype=torch.int64),
                torch.tensor([t.data_ptr() for t in stack.v], dtype=torch.int64),
            )
        x = stack.embed(torch.tensor(ids)).float().contiguous()  # a new tensor, overwritten by the pass
        _, k_table, v_table = self._caches
        status = self.lib.tl_forward(
            self.models[which],
            x.data_ptr(),
            n,
            start,
            k_table.data_ptr(),
            v_table.data_ptr(),
            stack.k[0].shape[2],
            stack.cos.data_ptr(),
            stack.sin.data_ptr(),
            self.logits.data_ptr(),
            int(last_only),
            self.scratch.data_ptr(),
        )
        if status == -2:
            raise MemoryError("out of memory in the native forward pass")
        if status != 0:
            raise Unsupported(f"the native forward pass refused {n} positions at {start}")
        return self.logits[: 1 if last_only else n]


class LeanModel:
    """Float32 target and 4-bit draft built from one loaded model (weights copied once;
    the original model is left as it is).

    With the native kernels (engine/native.py: x86-64 with AVX-512 or AVX2, and a C compiler) both
    decode-time passes run in engine/kernels/lean.c and the draft reads the target's KV
    cache, so it only computes its own guesses' positions; elsewhere both run in PyTorch
    here, the draft with its own cache. ``native`` forces one or the other (None: the
    native kernels where they load; an instruction set's name, "avx2" or "avx512": the
    kernels built for it)."""

    def __init__(
        self, model, *, draft_tokens: int = DRAFT_TOKENS, max_len: int | None = None, native: bool | str | None = None
    ):
        import torch

        inner = _inner(model)
        if next(inner.parameters()).device.type != "cpu" or next(inner.parameters()).dtype != torch.float32:
            raise Unsupported("the lean decoder runs float32 models on the CPU")
        cfg = model_config(inner)
        decoder = inner.model
        self.draft_tokens = draft_tokens
        width = draft_tokens + 1
        max_len = min(max_len or cfg["max_len"], cfg["max_len"])
        lib, self.native_note = None, ""
        if native is not False:
            from engine import native as native_kernels

            try:
                lib = native_kernels.load(isa=native if isinstance(native, str) else None)
                problem = _Native.refusal(cfg)
                if problem:
                    raise native_kernels.NativeUnavailable(problem)
            except native_kernels.NativeUnavailable as err:
                if native:
                    raise Unsupported(str(err)) from err
                lib, self.native_note = None, str(err)
        weights, dense, quant = [], [], []
        with torch.no_grad():
            for block in decoder.layers:
                att, mlp = block.self_attn, block.mlp
                parts = [_merged_weight(m) for m in (att.q_proj, att.k_proj, att.v_proj)]
                qkv_w = torch.cat([w for w, _ in parts])
                qkv_b = None if parts[0][1] is None else torch.cat([b for _, b in parts])
                o_w, o_b = _merged_weight(att.o_proj)
                g_w, _ = _merged_weight(mlp.gate_proj)
                u_w, _ = _merged_weight(mlp.up_proj)
                d_w, d_b = _merged_weight(mlp.down_proj)
                gu_w = torch.cat([g_w, u_w])
                ln1 = block.input_layernorm.weight.detach().float().contiguous()
                ln2 = block.post_attention_layernorm.weight.detach().float().contiguous()
                weights.append((ln1, ln2, [(qkv_w, qkv_b), (o_w, o_b), (gu_w, None), (d_w, d_b)]))
                # the native kernels read the plain weights; the PyTorch check also packs them
                packed = None if lib is not None else width
                dense.append(
                    _Layer(
                        ln1,
                        ln2,
                        _Dense(qkv_w, qkv_b, packed),
                        _Dense(o_w, o_b, packed),
                        _Dense(gu_w, None, packed),
                        _Dense(d_w, d_b, packed),
                    )
                )
                if lib is None:
                    quant.append(
                        _Layer(
                            ln1.to(torch.bfloat16),
                            ln2.to(torch.bfloat16),
                            _Int4(qkv_w, qkv_b),
                            _Int4(o_w, o_b),
                            _Int4(gu_w),
                            _Int4(d_w, d_b),
                        )
                    )
            head_w, head_b = _merged_weight(inner.get_output_embeddings())
            embed = inner.get_input_embeddings().weight.detach()
            norm = decoder.norm.weight.detach().float().contiguous()
            self.target = _Stack(
                dense,
                norm,
                _Dense(head_w, head_b, None if lib is not None else width),
                decoder.rotary_emb,
                cfg,
                max_len,
                torch.float32,
            )
            self.target.embed = lambda ids: torch.nn.functional.embedding(ids, embed)
            self.draft = None
            self.native = None
            if lib is not None:
                self.native = _Native(lib, weights, norm, (head_w.contiguous(), head_b), cfg, width)
            else:
                self.draft = _Stack(
                    quant,
                    norm.to(torch.bfloat16),
                    _Int4(head_w, head_b),
                    decoder.rotary_emb,
                    cfg,
                    max_len,
                    torch.bfloat16,
                )
                self.draft.embed = self.target.embed
        self.vocab_size = head_w.shape[0]

    def fits(self, tokens: int) -> bool:
        """Whether a prompt and reply of ``tokens`` in all stay within the model's context."""
        return tokens + self.draft_tokens + 1 <= self.target.max_len

    def greedy(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        stop_ids,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
    ):
        """Yield the float32 model's greedy reply, token by token (a generator).

        The choice at each position is engine.inference's greedy choice: the repetition
        penalty over every token seen so far (prompt and reply: positive logits divided,
        negative ones multiplied), stop tokens barred before ``min_new_tokens``, argmax."""
        import torch

        stop = set(stop_ids)
        barred = [t for t in stop if t < self.vocab_size]
        k = self.draft_tokens
        seen = torch.zeros(self.vocab_size, dtype=torch.bool)
        seen[torch.tensor([t for t in prompt_ids if 0 <= t < self.vocab_size], dtype=torch.long)] = True

        barred_ids = torch.tensor(barred, dtype=torch.long)

        def choose(row, step: int, extra: list[int]) -> int:
            """The choice at reply index ``step`` when ``extra`` tokens precede it unseen.

            The row is changed in place and restored (no copy of the vocabulary-sized row:
            allocating one per token costs more than the choice itself)."""
            changed = []
            if repetition_penalty != 1.0:
                mask = seen
                if extra:
                    mask = seen.clone()
                    mask[extra] = True
                ids = mask.nonzero().squeeze(1)
                picked = row[ids]
                changed.append((ids, picked))
                row[ids] = torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
            if step < min_new_tokens and len(barred_ids):
                changed.append((barred_ids, row[barred_ids]))
                row[barred_ids] = float("-inf")
            choice = int(torch.argmax(row))
            for ids, values in reversed(changed):
                row[ids] = values
            return choice

        with torch.inference_mode():
            need = len(prompt_ids) + max_new_tokens + k + 1
            self.target.reserve(need)
            logits = self.prefill(prompt_ids)
            if self.draft is not None:
                self.draft.reserve(need)
                self.draft.forward(prompt_ids, last_only=True)
            seq = list(prompt_ids) + [choose(logits, 0, [])]  # prompt + reply so far
            seen[seq[-1]] = True
            produced = 1
            yield seq[-1]
            while seq[-1] not in stop and produced < max_new_tokens:
                # the target's cache holds seq[:-1]; the draft proposes k tokens after
                # seq[-1], one at a time
                base = len(seq) - 1
                guesses: list[int] = []
                for j in range(k):
                    row = self.propose(seq, guesses)
                    guesses.append(choose(row, produced + j, guesses))
                # the target checks them in one pass: row j is its choice after seq + guesses[:j]
                rows = self.check([seq[-1]] + guesses, base)
                accepted: list[int] = []
                for j in range(k + 1):
                    accepted.append(choose(rows[j], produced + j, guesses[:j]))
                    if j == k or accepted[-1] != guesses[j] or accepted[-1] in stop:
                        break
                # the caches keep only positions whose tokens stand
                self.target.length = base + len(accepted)
                if self.draft is not None:
                    self.draft.length = min(self.draft.length, base + len(accepted))
                for mine in accepted:
                    seq.append(mine)
                    seen[mine] = True
                    produced += 1
                    yield mine
                    if mine in stop or produced >= max_new_tokens:
                        return

    def prefill(self, prompt_ids: list[int]):
        """The float32 target's logits after the prompt, its keys and values cached: in the
        native kernels up to NATIVE_PROMPT tokens, else in PyTorch (whose attention is
        the faster one for long prompts)."""
        if self.native is not None and len(prompt_ids) <= NATIVE_PROMPT:
            row = self.native.forward("target", self.target, prompt_ids, 0, last_only=True)[-1]
            self.target.length = len(prompt_ids)
            return row
        return self.target.forward(prompt_ids, last_only=True)[-1]

    def propose(self, seq: list[int], guesses: list[int]):
        """The draft's logits for the token after ``seq + guesses`` (the target's cache
        holds ``seq[:-1]``)."""
        if self.native is not None:
            # the draft reads the target's cache and writes its guesses' positions there;
            # the check overwrites them
            token = guesses[-1] if guesses else seq[-1]
            return self.native.forward("draft", self.target, [token], len(seq) - 1 + len(guesses), last_only=True)[-1]
        feed = (seq + guesses)[self.draft.length :]
        return self.draft.forward(feed, last_only=True)[-1]

    def check(self, tokens: list[int], start: int):
        """The float32 target's logits for ``tokens`` at positions ``start``..., one pass."""
        if self.native is not None and len(tokens) <= self.native.rows:
            rows = self.native.forward("target", self.target, tokens, start)
            self.target.length = start + len(tokens)
            return rows
        self.target.length = start
        return self.target.forward(tokens)
