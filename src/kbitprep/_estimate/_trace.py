"""Live tensor bytes during one training step, on real tensors or on the meta device.

:class:`LiveBytes` is a ``TorchDispatchMode`` that sees every operator call, records each new
tensor storage (keyed by its ``StorageImpl`` address, ``untyped_storage()._cdata``, so views,
in-place results and meta storages, which have no data pointer, count once) with its size in
bytes, and forgets it when the storage is freed. ``now`` is the sum of the live storages it
knows of, ``peak`` the highest ``now`` reached, ``peak_at`` the phase of the step then.

On real tensors it measures. On meta tensors it predicts: the same Python code runs (transformers,
peft, bitsandbytes, torch.utils.checkpoint, the optimizer), every operator allocates a meta
storage of the size the real one would have, and three things the meta device cannot do are
supplied here:

* values that steer control flow. Small integer and boolean tensors (token ids, masks, positions,
  expert indices) get a *shadow*: the same computation run for real on the CPU, attached to the
  meta tensor; ``.item()``, ``nonzero`` and boolean indexing read it. The indices ``topk`` /
  ``sort`` / ``argmax`` pick from unknown floats (MoE routing) are drawn at random, i.e. tokens
  are spread evenly over the experts.
* the attention kernel. ``scaled_dot_product_attention`` on the meta device always takes the math
  path (it materialises the attention matrix); :class:`SdpaRouting` calls the kernel the target
  device would pick instead.
* device branches in bitsandbytes: LLM.int8 training dequantizes and runs ``F.linear`` on CPU/XPU
  (``MatMul8bitFp``) and quantizes activations on CUDA (``MatMul8bitLt``);
  :func:`bitsandbytes_device` routes ``bitsandbytes.matmul`` as on the target device.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["LiveBytes", "PhaseStat", "SdpaRouting", "bitsandbytes_caches", "bitsandbytes_device", "shadowed_meta"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten

# a shadow is kept only for tensors up to this many elements (a (4, 1, 2048, 2048) boolean mask is
# 16 Mi elements); larger integer tensors are left without values
SHADOW_LIMIT = 1 << 26
_SHADOW = "_kbitprep_shadow"

# ops that pick indices from floating values the meta device does not have: position of the
# index output, position of the ``dim`` argument
_INDEX_PICKERS = {
    aten.topk.default: 1,
    aten.sort.default: 1,
    aten.sort.stable: 1,
    aten.max.dim: 1,
    aten.min.dim: 1,
    aten.argmax.default: 0,
    aten.argmin.default: 0,
    aten.argsort.default: 0,
    aten.argsort.stable: 0,
}
_DIM_POSITION = {
    aten.topk.default: 2,
    aten.sort.default: 1,
    aten.sort.stable: 99,  # keyword-only
    aten.max.dim: 1,
    aten.min.dim: 1,
    aten.argmax.default: 1,
    aten.argmin.default: 1,
    aten.argsort.default: 1,
    aten.argsort.stable: 99,
}
# those whose indices along ``dim`` are distinct (a permutation, or its first k)
_PERMUTING = {aten.topk.default, aten.sort.default, aten.sort.stable, aten.argsort.default, aten.argsort.stable}


def shadow_of(t: torch.Tensor) -> torch.Tensor | None:
    """The CPU values a meta tensor stands for, or None when they are unknown."""
    found = getattr(t, _SHADOW, None)
    return found if isinstance(found, torch.Tensor) else None


def shadowed_meta(real: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``real``'s shape, dtype and strides whose values are ``real`` (CPU)."""
    meta = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device="meta")
    setattr(meta, _SHADOW, real.detach().cpu())
    return meta


@dataclass(slots=True)
class PhaseStat:
    """One phase of the traced step.

    Attributes:
        name: e.g. ``"forward of block 3 (model.layers.3)"``, ``"backward of the loss"``.
        start: Live bytes when the phase began.
        peak: The most live bytes during the phase.
    """

    name: str
    start: int
    peak: int


class LiveBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Track the bytes of live tensor storages; predict on meta tensors (module docstring).

    Args:
        meta: Supply values and kernels for meta tensors (prediction). On real tensors (a
            measurement) nothing is changed.
        transient: Called as ``transient(func, args, out)`` after each operator; returns bytes
            allocated and freed inside the operator (invisible at this level, e.g. the weight a
            bitsandbytes kernel dequantizes), counted towards the peak only.

    Attributes:
        now: Bytes of the storages alive now (seeded ones included).
        peak: The most ``now`` has been, plus transients.
        peak_at: Name of the phase ``peak`` was reached in.
        phases: Every phase in order, with its start and peak.
        live_at_peak: Live bytes at the peak by kind (the kinds given to :meth:`seed` and
            ``"forward"``, ``"backward"``, ``"optimizer step"`` for storages created during those
            parts of the step).
        notes: Assumptions taken for values the meta device did not have.
    """

    def __init__(self, *, meta: bool = False, transient: Callable[[Any, Any, Any], int] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.meta = meta
        self.transient = transient
        self.now = 0
        self.peak = 0
        self.peak_at = "start"
        self.kind = "forward"
        self.phases: list[PhaseStat] = [PhaseStat("start", 0, 0)]
        self.by_kind: dict[str, int] = {}
        self.live_at_peak: dict[str, int] = {}
        self.notes: list[str] = []
        self._alive: dict[int, tuple[int, str]] = {}
        self._finalizers: list[weakref.finalize[Any, Any]] = []
        self._generator = torch.Generator().manual_seed(0)
        #: when a list, each operator call is appended as ``(phase, op, bytes added, now)`` (debugging)
        self.log: list[tuple[str, str, int, int]] | None = None

    # -- bookkeeping ------------------------------------------------------------------------

    def seed(self, tensors: Iterable[torch.Tensor], kind: str) -> None:
        """Count storages that exist before the step (weights, optimizer states) as ``kind``."""
        for t in tensors:
            self._record(t, kind)
        self.reset_peak()

    def reset_peak(self) -> None:
        """Start the peak over from ``now``."""
        self.peak = self.now
        self.live_at_peak = dict(self.by_kind)
        stat = self.phases[-1]
        stat.start = stat.peak = self.now

    def set_phase(self, name: str, kind: str | None = None) -> None:
        """Enter phase ``name``; storages created from now on are counted as ``kind``."""
        if kind is not None:
            self.kind = kind
        if self.phases[-1].name != name:
            self.phases.append(PhaseStat(name, self.now, self.now))

    def _record(self, t: object, kind: str | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # a subclass without one storage
            return
        key = storage._cdata
        nbytes = storage.nbytes()
        old = self._alive.get(key)
        if old is None:
            k = kind or self.kind
            self._alive[key] = (nbytes, k)
            self.by_kind[k] = self.by_kind.get(k, 0) + nbytes
            self.now += nbytes
            self._finalizers.append(weakref.finalize(storage, self._forget, key))
        elif old[0] != nbytes:  # resized in place (out= kernels)
            self._alive[key] = (nbytes, old[1])
            self.by_kind[old[1]] += nbytes - old[0]
            self.now += nbytes - old[0]
        self._touch()

    def _touch(self, extra: int = 0) -> None:
        level = self.now + extra
        stat = self.phases[-1]
        stat.peak = max(stat.peak, level)
        if level > self.peak:
            self.peak = level
            self.peak_at = stat.name
            self.live_at_peak = dict(self.by_kind)
            if extra:
                self.live_at_peak[self.kind] = self.live_at_peak.get(self.kind, 0) + extra

    def _forget(self, key: int) -> None:
        found = self._alive.pop(key, None)
        if found is not None:
            self.now -= found[0]
            self.by_kind[found[1]] -= found[0]

    def close(self) -> None:
        """Stop listening for frees (after the step)."""
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()

    # -- dispatch ---------------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = self._run_meta(func, args, kwargs) if self.meta else func(*args, **kwargs)
        flat, _ = tree_flatten(out)
        before = self.now
        for leaf in flat:
            self._record(leaf)
        if self.log is not None:
            self.log.append((self.phases[-1].name, str(func), self.now - before, self.now))
        if self.transient is not None:
            extra = self.transient(func, args, out)
            if extra:
                self._touch(extra)
        return out

    def _run_meta(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        flat, spec = tree_flatten((args, kwargs))
        metas = [x for x in flat if isinstance(x, torch.Tensor) and x.device.type == "meta"]
        on_meta = bool(metas) or any(_is_meta_device(x) for x in flat)
        if not on_meta:
            return func(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            return self._item(args[0])
        known = all(shadow_of(x) is not None for x in metas)
        special = _BNB_META.get(str(func.name()))
        if special is not None and not known:
            return special(*args, **kwargs)
        try:
            out = func(*args, **kwargs)
            failed: BaseException | None = None
        except (RuntimeError, NotImplementedError) as exc:  # data-dependent output shape on meta
            # without its traceback: the frames would hold the inputs alive until a GC pass
            out, failed = None, exc.with_traceback(None)
        if known and (out is None or _small_enough(out)):
            real = self._shadow_call(func, flat, spec)
            if real is not None:
                if out is None:
                    out = _meta_like(real)
                _attach(out, real)
            elif failed is not None:
                raise failed
        elif failed is not None:
            shape_rule = _META_FALLBACKS.get(str(func.name()))
            out = shape_rule(*args, **kwargs) if shape_rule else self._stand_in_call(func, flat, spec, failed)
        if not known:
            _drop_written_shadows(func, args, kwargs)
        if func in _INDEX_PICKERS and not known:
            self._pick_indices(func, args, kwargs, out)
        return out

    def _shadow_call(self, func: Any, flat: list[Any], spec: Any) -> Any:
        def real(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.device.type == "meta":
                return shadow_of(x)
            return torch.device("cpu") if _is_meta_device(x) else x

        args, kwargs = tree_unflatten([real(x) for x in flat], spec)
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # the meta result stands; only the values are lost
            logger.debug("no CPU values for %s: %s", func, exc)
            return None

    def _stand_in_call(self, func: Any, flat: list[Any], spec: Any, failed: BaseException) -> Any:
        """An op whose output shape depends on values, with some inputs of unknown value: run it
        on the CPU with zeros (broadcast, no memory) for those, and take the output shapes."""

        def real(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.device.type == "meta":
                found = shadow_of(x)
                return found if found is not None else torch.zeros((), dtype=x.dtype).expand(x.shape)
            return torch.device("cpu") if _is_meta_device(x) else x

        args, kwargs = tree_unflatten([real(x) for x in flat], spec)
        try:
            result = func(*args, **kwargs)
        except Exception:
            raise failed from None
        self._note(f"{func} ran on inputs of unknown value; its output shape assumes zeros there")
        return _meta_like(result)

    def _item(self, t: torch.Tensor) -> Any:
        found = shadow_of(t)
        if found is not None:
            return found.item()
        default: Any = True if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        self._note(f"a value computed from weights was read (.item() on {t.dtype}); assumed {default!r}")
        return default

    def _pick_indices(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> None:
        """Draw the indices ``topk`` / ``sort`` / ``argmax`` pick from unknown floats at random:
        MoE routing spreads tokens evenly over the experts (real routers may be less balanced)."""
        index = out[_INDEX_PICKERS[func]] if isinstance(out, (tuple, list)) else out
        src = args[0]
        if not isinstance(index, torch.Tensor) or not isinstance(src, torch.Tensor) or index.numel() > SHADOW_LIMIT:
            return
        dim = kwargs.get("dim", args[_DIM_POSITION[func]] if len(args) > _DIM_POSITION[func] else -1)
        if dim is None or src.dim() == 0:  # argmax over everything
            shadow = torch.randint(0, max(src.numel(), 1), index.shape, generator=self._generator)
        else:
            dim = int(dim) % src.dim()
            n = src.shape[dim]
            if func in _PERMUTING and index.dim() == src.dim():
                shape = list(index.shape)
                shape[dim] = n
                order = torch.rand(shape, generator=self._generator).argsort(dim=dim)
                shadow = order.narrow(dim, 0, index.shape[dim]).contiguous()
            else:
                shadow = torch.randint(0, max(n, 1), index.shape, generator=self._generator)
        setattr(index, _SHADOW, shadow)
        self._note(
            "indices picked from values computed from weights (topk/sort/argmax, e.g. MoE routing) were drawn at "
            "random: tokens spread evenly over the experts"
        )

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def _small_enough(out: Any) -> bool:
    flat, _ = tree_flatten(out)
    return all(x.numel() <= SHADOW_LIMIT for x in flat if isinstance(x, torch.Tensor))


def _drop_written_shadows(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """An in-place op with inputs of unknown value makes the written tensors' values unknown."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable:
        return
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
        if isinstance(value, torch.Tensor) and hasattr(value, _SHADOW):
            delattr(value, _SHADOW)


def _is_meta_device(x: object) -> bool:
    return (isinstance(x, torch.device) and x.type == "meta") or (isinstance(x, str) and x == "meta")


def _meta_like(real: Any) -> Any:
    def one(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        return x

    return tree_map(one, real)


def _attach(out: Any, real: Any) -> None:
    outs, _ = tree_flatten(out)
    reals, _ = tree_flatten(real)
    if len(outs) != len(reals):
        return
    for o, r in zip(outs, reals, strict=True):
        if (
            isinstance(o, torch.Tensor)
            and isinstance(r, torch.Tensor)
            and o.device.type == "meta"
            and r.numel() <= SHADOW_LIMIT
            and tuple(o.shape) == tuple(r.shape)
        ):
            setattr(o, _SHADOW, r)


# -- bitsandbytes LLM.int8 ops whose outputs depend on values (outlier columns) -----------------


def _int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, ...]:
    rows = A.numel() // A.shape[-1]
    return (
        torch.empty(A.shape, dtype=torch.int8, device=A.device),
        torch.empty(rows, dtype=torch.float32, device=A.device),
        torch.empty(0, dtype=torch.int64, device=A.device),  # no outlier columns assumed
    )


def _int8_double_quant(A: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, ...]:
    rows, cols = A.numel() // A.shape[-1], A.shape[-1]
    dev = A.device
    return (
        torch.empty(A.shape, dtype=torch.int8, device=dev),
        torch.empty(A.shape, dtype=torch.int8, device=dev),
        torch.empty(rows, dtype=torch.float32, device=dev),
        torch.empty(cols, dtype=torch.float32, device=dev),
        torch.empty(0, dtype=torch.int64, device=dev),
    )


def _int8_mixed_scaled_mm(
    A: torch.Tensor, CA: Any, CB: torch.Tensor, SCA: Any, SCB: Any, outlier_cols: Any = None, bias: Any = None
) -> tuple[torch.Tensor, ...]:
    out = torch.empty((*A.shape[:-1], CB.shape[0]), dtype=A.dtype, device=A.device)
    return out, torch.empty((A.numel() // A.shape[-1], 0), dtype=A.dtype, device=A.device)


_BNB_META: dict[str, Callable[..., Any]] = {
    "bitsandbytes::int8_vectorwise_quant": _int8_vectorwise_quant,
    "bitsandbytes::int8_double_quant": _int8_double_quant,
    "bitsandbytes::int8_mixed_scaled_mm": _int8_mixed_scaled_mm,
}


def bitsandbytes_transient(func: Any, args: Sequence[Any], out: Any) -> int:
    """Bytes a bitsandbytes 4-bit matmul allocates and frees inside the op: the weight
    dequantized to the input's dtype (bitsandbytes 0.50 ``_gemm_4bit_default_impl``, also the
    CUDA fallback for more than 1536 rows) and, with double quantization, the fp32 absmax."""
    if str(func.name()) != "bitsandbytes::gemm_4bit":
        return 0
    A, shape = args[0], args[2]
    extra = int(shape[0]) * int(shape[1]) * int(A.element_size())
    absmax_8bit = args[7] if len(args) > 7 else None
    if isinstance(absmax_8bit, torch.Tensor):
        extra += absmax_8bit.numel() * 4
    return extra


def _grouped_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    offs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Output of ``aten::_grouped_mm`` (transformers 5 fused MoE experts), whose meta kernel
    accepts bf16 only while the CPU kernel also runs fp32."""
    if a.dim() == 2 and b.dim() == 3:
        shape: tuple[int, ...] = (a.shape[0], b.shape[-1])
    elif a.dim() == 3 and b.dim() == 3:
        shape = (a.shape[0], a.shape[1], b.shape[-1])
    elif a.dim() == 2 and b.dim() == 2:
        groups = offs.shape[0] if offs is not None else 1
        shape = (groups, a.shape[0], b.shape[-1])
    else:
        shape = (a.shape[-2], b.shape[-1])
    return torch.empty(shape, dtype=out_dtype or a.dtype, device=a.device)


# shape rules for ops whose meta kernel refuses what the target device's kernel runs
_META_FALLBACKS: dict[str, Callable[..., Any]] = {"aten::_grouped_mm": _grouped_mm}


# -- attention kernel routing -------------------------------------------------------------------

_MATH, _FLASH, _EFFICIENT = 0, 1, 2


class SdpaRouting:
    """Call the ``scaled_dot_product_attention`` kernel that ``device`` would choose, on meta
    tensors (on the meta device PyTorch always takes the math path, which materialises the
    attention matrix).

    A context manager that swaps ``torch.nn.functional.scaled_dot_product_attention`` (the name
    transformers' ``sdpa_attention_forward`` calls) for the duration; calls with real tensors go
    to PyTorch unchanged. It is an attribute swap rather than a ``TorchFunctionMode`` because
    the recompute of a checkpointed block runs on the autograd engine's thread, which function
    modes do not reach. Not thread-safe.

    CPU: the choice is PyTorch's own (``torch._fused_sdp_choice`` on small CPU tensors of the
    same dtypes, heads, head size, mask layout and flags); flash runs as
    ``_scaled_dot_product_flash_attention_for_cpu`` (GQA handled by the kernel, a boolean mask
    first converted to an additive one as the dispatcher does). CUDA (not measured here): flash
    for fp16/bf16 without a mask and head size up to 256, memory-efficient attention otherwise,
    math for a grouped-query call the fused kernels refuse.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self._original: Callable[..., torch.Tensor] | None = None

    def __enter__(self) -> SdpaRouting:
        functional = torch.nn.functional
        original = functional.scaled_dot_product_attention
        self._original = original

        @functools.wraps(original)
        def routed(*args: Any, **kwargs: Any) -> torch.Tensor:
            q = args[0] if args else kwargs.get("query")
            if isinstance(q, torch.Tensor) and q.device.type == "meta":
                out = self._route(*args, **kwargs)
                if out is not None:
                    return out
            return original(*args, **kwargs)

        functional.scaled_dot_product_attention = routed
        return self

    def __exit__(self, *exc: object) -> None:
        if self._original is not None:
            torch.nn.functional.scaled_dot_product_attention = self._original
            self._original = None

    def _route(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor | None:
        choice = (
            _cpu_choice(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            if self.device == "cpu"
            else _cuda_choice(query, key, attn_mask, enable_gqa)
        )
        if choice == _FLASH and self.device == "cpu":
            mask = _additive_mask(attn_mask, query.dtype)
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
                query, key, value, dropout_p, is_causal, attn_mask=mask, scale=scale
            )
            return out[0]  # type: ignore[no-any-return]
        if choice == _FLASH:
            out = torch.ops.aten._scaled_dot_product_flash_attention.default(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )
            return out[0]  # type: ignore[no-any-return]
        if choice == _EFFICIENT:
            mask = _additive_mask(attn_mask, query.dtype)
            needs_lse = query.requires_grad or key.requires_grad or value.requires_grad
            out = torch.ops.aten._scaled_dot_product_efficient_attention.default(
                query, key, value, mask, needs_lse, dropout_p, is_causal, scale=scale
            )
            return out[0]  # type: ignore[no-any-return]
        return None


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # as ATen's convert_boolean_attn_mask: zeros, -inf where the boolean mask is False
    if mask is None or mask.dtype != torch.bool:
        return mask
    out = torch.zeros_like(mask, dtype=dtype)
    return out.masked_fill_(mask.logical_not(), float("-inf"))


def _small(t: torch.Tensor, seq_dims: dict[int, int]) -> torch.Tensor:
    shape = list(t.shape)
    for d, n in seq_dims.items():
        if shape[d] != 1:
            shape[d] = n
    return torch.zeros(shape, dtype=t.dtype).requires_grad_(t.requires_grad and t.is_floating_point())


@functools.lru_cache(maxsize=256)
def _cpu_choice_cached(
    q: tuple[tuple[int, ...], torch.dtype, bool],
    k: tuple[tuple[int, ...], torch.dtype, bool],
    v: tuple[tuple[int, ...], torch.dtype, bool],
    mask: tuple[tuple[int, ...], torch.dtype] | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> int:
    def make(spec: tuple[tuple[int, ...], torch.dtype, bool]) -> torch.Tensor:
        return torch.zeros(spec[0], dtype=spec[1]).requires_grad_(spec[2])

    m = None if mask is None else torch.zeros(mask[0], dtype=mask[1])
    return int(
        torch._fused_sdp_choice(
            make(q), make(k), make(v), attn_mask=m, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    )  # fmt: skip


def _cpu_choice(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> int:
    lq, lk = min(q.shape[-2], 4), min(k.shape[-2], 4)

    def spec(t: torch.Tensor, n: int) -> tuple[tuple[int, ...], torch.dtype, bool]:
        shape = (*t.shape[:-2], n, t.shape[-1])
        return tuple(shape), t.dtype, bool(t.requires_grad)

    mspec = None
    if mask is not None:
        shape = list(mask.shape)
        if len(shape) >= 2:
            shape[-2] = lq if shape[-2] != 1 else 1
            shape[-1] = lk if shape[-1] != 1 else 1
        mspec = (tuple(shape), mask.dtype)
    return _cpu_choice_cached(spec(q, lq), spec(k, lk), spec(v, lk), mspec, dropout_p, is_causal, scale, enable_gqa)


def _cuda_choice(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, enable_gqa: bool) -> int:
    head_dim = q.shape[-1]
    gqa = q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]
    if q.dtype in (torch.float16, torch.bfloat16) and mask is None and head_dim <= 256 and head_dim % 8 == 0:
        return _FLASH
    if gqa and enable_gqa:
        return _MATH
    if head_dim % 8 == 0 or q.dtype == torch.float32:
        return _EFFICIENT
    return _MATH


@contextlib.contextmanager
def bitsandbytes_caches() -> Iterator[None]:
    """Keep bitsandbytes' module-level code cache as it was: bitsandbytes 0.50
    ``functional.quantize_blockwise`` caches the first "dynamic" code it builds in
    ``functional.name2qmap`` whatever its device, so quantizing on the meta device first would
    leave a meta code there and break every later real quantization in the process."""
    import sys

    functional: Any = sys.modules.get("bitsandbytes.functional")
    saved = dict(functional.name2qmap) if functional is not None else None
    try:
        yield
    finally:
        functional = sys.modules.get("bitsandbytes.functional")
        if functional is not None:
            functional.name2qmap.clear()
            functional.name2qmap.update(saved or {})


@contextlib.contextmanager
def bitsandbytes_device(device: str) -> Iterator[None]:
    """Route ``bitsandbytes.matmul`` (LLM.int8) as bitsandbytes 0.50 does on ``device`` while
    the inputs are on the meta device: ``MatMul8bitFp`` in training on CPU/XPU, else
    ``MatMul8bitLt``. Not thread-safe: it swaps the module attribute for the duration."""
    import importlib
    import sys

    bnb: Any = sys.modules.get("bitsandbytes")
    if bnb is None or not hasattr(bnb, "matmul"):
        yield
        return
    bnb_functions: Any = importlib.import_module("bitsandbytes.autograd._functions")
    original = bnb.matmul

    def matmul(
        A: torch.Tensor,
        B: torch.Tensor,
        out: torch.Tensor | None = None,
        state: Any = None,
        threshold: float = 0.0,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if A.device.type != "meta":
            return original(A, B, out=out, state=state, threshold=threshold, bias=bias)  # type: ignore[no-any-return]
        state = state or bnb_functions.MatmulLtState()
        if threshold > 0.0:
            state.threshold = threshold
        if state.is_training and device in ("cpu", "xpu"):
            return bnb_functions.MatMul8bitFp.apply(A, B, out, bias, state)  # type: ignore[no-any-return]
        return bnb_functions.MatMul8bitLt.apply(A, B, out, bias, state)  # type: ignore[no-any-return]

    bnb.matmul = matmul
    try:
        yield
    finally:
        bnb.matmul = original
