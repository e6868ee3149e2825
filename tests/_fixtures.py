"""The one shared helper module of the test suite: tiny models, training steps, the regression
cases' model builders, and the real quantized tiny models of the backend tests.

Sections, in order: tiny models and one training step (the fixtures of ../shared/cases/README.md);
Trainer / SFTTrainer helpers; builders of each CPU quantization kind for the cases; builders of
real quantized tiny models for tests/backends.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from kbitprep.backends.base import model_param_bytes as param_bytes  # noqa: F401  (re-exported for the tests)

# -- from _models.py -----------------------------------------------------------

# transformers 5.24 _activation_checkpointing_enable calls enable_input_require_grads for a model
# whose main_input_name is "input_ids"; transformers 4.57's gradient_checkpointing_enable does not
ENABLE_ADDS_INPUT_GRAD_HOOK = int(transformers.__version__.split(".")[0]) >= 5

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=1000,
)
LORA_TARGETS = ["q_proj", "v_proj"]


def tiny_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, **overrides})


def tiny_llama(dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides: Any) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).to(dtype)  # type: ignore[arg-type]
    model.eval()
    return model  # type: ignore[no-any-return]


@functools.cache
def saved_tiny(root: str, dtype_name: str = "bfloat16", tie: bool = False) -> str:
    """Save the tiny model once per session under ``root``; returns the directory."""
    dtype = getattr(torch, dtype_name)
    path = Path(root) / f"tiny-{dtype_name}{'-tied' if tie else ''}"
    if not (path / "config.json").exists():
        tiny_llama(dtype, tie_word_embeddings=tie).save_pretrained(path)  # type: ignore[operator]
    return str(path)


def bnb4_config(**kw: Any) -> Any:
    from transformers import BitsAndBytesConfig

    args: dict[str, Any] = dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    args.update(kw)
    return BitsAndBytesConfig(**args)  # type: ignore[no-untyped-call]


def load(path: str, dtype: torch.dtype = torch.bfloat16, quantization_config: Any = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    # passing quantization_config=None explicitly would make transformers 5.24 reload a saved
    # pre-quantized checkpoint as plain nn.Linear with random weights, so pass it only when given
    extra: dict[str, Any] = {} if quantization_config is None else {"quantization_config": quantization_config}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **extra)


def add_lora(model: nn.Module, r: int = 8) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def standard_batch(batch: int = 2, seq: int = 32, vocab: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def standard_step(model: nn.Module, lr: float = 1e-3) -> tuple[float, dict[str, torch.Tensor | None]]:
    """Train mode, one forward/backward on the standard batch, one AdamW step.

    Returns the loss and each LoRA parameter's gradient (cloned before the step)."""
    model.train()
    ids = standard_batch()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else None)
        for n, p in model.named_parameters()
        if "lora_" in n
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.AdamW(trainable, lr=lr).step()
    return float(out.loss.detach()), grads


def grad_counts(grads: dict[str, torch.Tensor | None]) -> tuple[int, int, int]:
    """(LoRA tensors, with a grad, lora_B grads that are non-zero)."""
    with_grad = sum(1 for g in grads.values() if g is not None)
    nonzero_b = sum(1 for n, g in grads.items() if "lora_B" in n and g is not None and bool(g.abs().sum() > 0))
    return len(grads), with_grad, nonzero_b


def storage_digest(model: nn.Module, backend: Any) -> dict[str, str]:
    """sha256 of every quantized storage tensor (parameters and buffers), by name."""
    out: dict[str, str] = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        mod = modules.get(name.rpartition(".")[0], model)
        if backend.is_quantized_param(name, p, mod):
            out[name] = _digest(p)
    for name, b in model.named_buffers():
        if not b.is_floating_point() or "scales" in name or "W_q" in name:
            out[name] = _digest(b)
    return out


def _digest(t: torch.Tensor) -> str:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = inner()
        return "|".join(_digest(getattr(t, n)) for n in names)
    data = t.detach().contiguous().view(torch.uint8) if t.dtype != torch.bool else t.detach().to(torch.uint8)
    return hashlib.sha256(data.cpu().numpy().tobytes()).hexdigest() + f":{t.dtype}:{tuple(t.shape)}"


def snapshot(model: nn.Module) -> dict[str, tuple[torch.dtype, bool, torch.Tensor]]:
    return {n: (p.dtype, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def hook_count(module: nn.Module) -> int:
    return len(module._forward_hooks)


def checkpointing_on(model: nn.Module) -> bool:
    """``is_activation_checkpointing`` on transformers 5; ``is_gradient_checkpointing`` on 4.57,
    where it is the only name and not deprecated."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def enable_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None = None) -> None:
    """Turn checkpointing on as a user would, with the name that exists without a deprecation
    warning (transformers 5 ``activation_checkpointing_enable``, 4.57 ``gradient_checkpointing_enable``)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


def transformers_major() -> int:
    """Major version of the installed transformers (read from metadata, nothing imported)."""
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


# -- from _training.py ---------------------------------------------------------

STEPS = 3


class Calls:
    """Wrap a callable and count the calls that go through it."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)

    @property
    def count(self) -> int:
        return len(self.calls)


def count_real_enables(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Count the times checkpointing is really set up on any Llama model.

    ``PreTrainedModel._activation_checkpointing_enable`` (transformers 5.24) is where the
    checkpoint function is installed on every layer and ``enable_input_require_grads`` is called;
    every public enable path (``activation_checkpointing_enable``, the deprecated
    ``gradient_checkpointing_enable``, Trainer, TRL) ends there.
    """
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM._activation_checkpointing_enable
    counter = Calls(original)

    def counted(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return counter(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "_activation_checkpointing_enable", counted)
    return counter


def watch(monkeypatch: pytest.MonkeyPatch, model: nn.Module, name: str) -> Calls:
    """Count the calls a trainer makes to ``model.<name>`` (after kbitprep installed its guard)."""
    counter = Calls(getattr(model, name))
    monkeypatch.setattr(model, name, counter)
    return counter


def input_grad_hooks(model: nn.Module) -> int:
    """Forward hooks on the input embeddings (the only hooks there are input-grad hooks)."""
    return len(model.get_input_embeddings()._forward_hooks)


class UseCacheProbe:
    """Record, for each training forward of ``model``, ``config.use_cache``, the ``use_cache``
    argument and whether a KV cache came back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seen: list[tuple[bool | None, Any, bool]] = []
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if module.training:
            cache = getattr(output, "past_key_values", None)
            self.seen.append((module.config.use_cache, kwargs.get("use_cache"), cache is not None))

    def close(self) -> None:
        self.handle.remove()

    def assert_cache_off(self, steps: int = STEPS) -> None:
        assert len(self.seen) >= steps, self.seen
        for config_flag, argument, returned in self.seen:
            assert config_flag is False
            assert argument is not True
            assert returned is False


def lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_every_lora_changed(model: nn.Module, before: dict[str, torch.Tensor], layers: int = 2) -> None:
    assert len(before) == layers * 2 * len(LORA_TARGETS)  # layers x (A, B) x targets
    after = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    unchanged = [n for n, t in before.items() if torch.equal(t.to(after[n].dtype), after[n])]
    assert unchanged == []


def finite_losses(trainer: Any, steps: int = STEPS) -> list[float]:
    values = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert len(values) == steps, trainer.state.log_history
    assert all(math.isfinite(v) for v in values), values
    return values


class TokenDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """8 rows of 32 random token ids (the standard batch's generator), labels = inputs."""

    def __init__(self, rows: int = 8, seq: int = 32) -> None:
        self.ids = torch.cat([standard_batch(batch=2, seq=seq)] * (rows // 2))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def common_args(tmp_path: Path) -> dict[str, Any]:
    """TrainingArguments / SFTConfig keywords every test shares: 3 CPU steps, nothing saved."""
    return dict(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def training_args(tmp_path: Path, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(**{**common_args(tmp_path), "gradient_checkpointing": True, **overrides})


# -- from cases/_kinds.py ------------------------------------------------------

NORM_NAMES = (
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.norm.weight",
)
PLAIN_NAMES = ("model.embed_tokens.weight", *NORM_NAMES, "lm_head.weight")


def need(module: str, package: str | None = None) -> None:
    """Skip when ``module`` is not installed (the reason names the package)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{package or module} is not installed")


def need_strategy(name: str) -> None:
    """Skip when the kbitprep strategy module for ``name`` does not exist in this checkout."""
    if importlib.util.find_spec(f"kbitprep.backends.{name}") is None:
        pytest.skip(f"kbitprep.backends.{name} is not in this checkout yet")


def plain(root: str) -> Any:
    return load(saved_tiny(root))


def generic(root: str) -> Any:
    """A bf16 model flagged as quantized by a method kbitprep has no strategy for ("vptq"), with
    an int8 buffer standing in for that method's storage: a label with no storage behind it is
    an unquantized model (issue 12), so the storage is what makes this "generic"."""
    model = plain(root)
    model.is_quantized = True
    model.quantization_method = "vptq"
    model.model.layers[0].mlp.register_buffer("codes", torch.zeros(64, 8, dtype=torch.int8))
    return model


def bnb4(root: str, **kw: Any) -> Any:
    need("bitsandbytes")
    return load(saved_tiny(root), quantization_config=bnb4_config(**kw))


def bnb4_bf16_storage(root: str) -> Any:
    return bnb4(root, bnb_4bit_quant_storage=torch.bfloat16)


def bnb8(root: str) -> Any:
    need("bitsandbytes")
    from transformers import BitsAndBytesConfig

    return load(saved_tiny(root), quantization_config=BitsAndBytesConfig(load_in_8bit=True))  # type: ignore[no-untyped-call]


def torchao_hf(root: str, config: Any = None) -> Any:
    """(C07a) loaded through transformers with ``TorchAoConfig``; lm_head stays bf16."""
    need("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return load(saved_tiny(root), quantization_config=TorchAoConfig(config or Int8WeightOnlyConfig()))


def torchao_direct(root: str, config: Any = None) -> Any:
    """(C07b) ``quantize_`` applied directly: no transformers attributes; lm_head quantized too."""
    need("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = plain(root)
    quantize_(model, config or Int8WeightOnlyConfig())
    return model


def intx_config() -> Any:
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))  # type: ignore[attr-defined]


def torchao_direct_intx(root: str) -> Any:
    """(C07c) ``quantize_`` with intx int4 weight-only."""
    need("torchao")
    return torchao_direct(root, intx_config())


def hqq_direct(root: str) -> Any:
    """Decoder linears swapped for ``HQQLinear`` (backend PYTORCH), no transformers attributes."""
    need("hqq")
    need_strategy("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    model = plain(root)
    cfg = BaseQuantizeConfig(nbits=4, group_size=64)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    q = HQQLinear(child, cfg, compute_dtype=torch.bfloat16, device="cpu")
                    setattr(parent, child_name, q)
    return model


# every backend whose real layers run on CPU; gptq / aqlm / eetq are covered by their own cases
CPU_KINDS: dict[str, Callable[[str], Any]] = {
    "none": plain,
    "generic": generic,
    "bnb4": bnb4,
    "bnb4_bf16_storage": bnb4_bf16_storage,
    "bnb8": bnb8,
    "torchao_hf": torchao_hf,
    "torchao_direct": torchao_direct,
    "torchao_direct_intx": torchao_direct_intx,
    "hqq": hqq_direct,
}
EXPECTED_BACKEND = {
    "none": "none",
    "generic": "generic",
    "bnb4": "bitsandbytes",
    "bnb4_bf16_storage": "bitsandbytes",
    "bnb8": "bitsandbytes",
    "torchao_hf": "torchao",
    "torchao_direct": "torchao",
    "torchao_direct_intx": "torchao",
    "hqq": "hqq",
}
QUANTIZED_KINDS = [k for k in CPU_KINDS if k not in ("none",)]


def quantized_tensors(model: Any) -> dict[str, torch.Tensor]:
    """Quantized storage by the test's own ground truth (layer and tensor classes), not by any
    kbitprep strategy: bitsandbytes Params4bit / Int8Params, torchao subclasses, HQQ ``W_q``, and
    integer buffers."""
    classes: list[type] = []
    try:
        import bitsandbytes as bnb

        classes += [bnb.nn.Params4bit, bnb.nn.Int8Params]  # type: ignore[attr-defined]
    except ImportError:
        pass
    try:
        from torchao.utils import TorchAOBaseTensor

        classes.append(TorchAOBaseTensor)
    except ImportError:
        pass
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if isinstance(p, tuple(classes)) or name.endswith("W_q") or not p.is_floating_point():
            out[name] = p
    for name, b in model.named_buffers():
        if not b.is_floating_point():
            out[name] = b
    return out


def storage_record(t: torch.Tensor) -> tuple[Any, ...]:
    """(class, dtype, shape, bytes, requires_grad, content) of one quantized tensor."""
    from kbitprep.backends.base import tensor_nbytes

    return (type(t).__name__, t.dtype, tuple(t.shape), tensor_nbytes(t), t.requires_grad, _digest(t))


def floating_params(model: Any) -> dict[str, nn.Parameter]:
    """Plain floating parameters (not quantized storage by the test's ground truth)."""
    q = quantized_tensors(model)
    return {n: p for n, p in model.named_parameters() if n not in q}


def model_state(model: Any) -> dict[str, Any]:
    """Everything prepare may touch: parameter class/dtype/shape/device/requires_grad/bytes, hooks
    (forward, pre-forward) per module, checkpointing flags, use_cache and train mode."""

    params = {
        n: (
            type(p).__name__,
            p.dtype,
            tuple(p.shape),
            p.device.type,
            p.requires_grad,
            p.data_ptr() if p.device.type != "meta" else 0,
            _digest(p) if p.device.type != "meta" else "",
        )
        for n, p in model.named_parameters(remove_duplicate=False)
    }
    hooks = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks), getattr(m, "gradient_checkpointing", None), m.training)
        for n, m in model.named_modules()
    }
    config = getattr(model, "config", None)
    return {
        "params": params,
        "hooks": hooks,
        "use_cache": getattr(config, "use_cache", None),
        "require_grads_hooks": len(getattr(model, "_require_grads_hooks", []) or []),
    }


def forward_hook_total(model: Any) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def plan_dtype(p: Any, model: Any, name: str) -> torch.dtype:
    """The dtype the plan gives parameter ``name``: its cast target, else its current dtype."""
    for c in p.casts:
        if c.name == name or name in c.tied:
            return getattr(torch, c.to_dtype.removeprefix("torch."))  # type: ignore[no-any-return]
    return dict(model.named_parameters(remove_duplicate=False))[name].dtype  # type: ignore[no-any-return]


def plan_compute_dtype(p: Any, model: Any, module: str) -> torch.dtype:
    """The dtype module ``module`` computes in after the plan: its ``precision`` row's when the
    plan lists it (a weight stored narrower is brought up at use), else its weight's plan dtype."""
    for row in p.precision:
        if row.name == module:
            return getattr(torch, row.computes.removeprefix("torch."))  # type: ignore[no-any-return]
    return plan_dtype(p, model, f"{module}.weight")


# -- from backends/_fixtures.py ------------------------------------------------

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
N_LINEARS = 14
N_PLAIN = 7  # embed_tokens, 5 RMSNorm weights, lm_head


def from_pretrained(path: str, dtype: torch.dtype, **kw: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` on CPU.

    No ``quantization_config=None`` is passed: in transformers 5.24 an explicit None makes a
    pre-quantized GPTQ checkpoint load as plain ``nn.Linear`` with random weights.
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kw)


def storage_by_base_name(model: nn.Module, backend: Any) -> dict[str, str]:
    """:func:`_models.storage_digest` keyed by the name in the unwrapped model, so digests taken
    before and after attaching LoRA (``base_model.model.`` prefix, ``.base_layer``) compare."""

    out = {}
    for name, digest in storage_digest(model, backend).items():
        out[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = digest
    return out


@contextlib.contextmanager
def kernel_inputs(layers: Sequence[nn.Module]) -> Iterator[list[torch.dtype]]:
    """Record the dtype of the first argument each layer's own ``forward`` receives.

    The layer class's ``forward`` is wrapped, not a forward pre-hook registered: a module
    ``prepare`` gave a compute-dtype rule casts its inputs inside its (sub)class's forward, after
    the pre-hooks run, so only the class's own forward sees what the kernel computes with.
    """
    seen: list[torch.dtype] = []
    classes = {getattr(type(m), "_kbitprep_original_class", type(m)) for m in layers}
    saved = {cls: cls.__dict__.get("forward") for cls in classes}

    def wrap(forward: Any) -> Any:
        def recorded(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if any(self is m for m in layers):
                seen.append(x.dtype)
            return forward(self, x, *args, **kwargs)

        return recorded

    for cls in classes:
        cls.forward = wrap(cls.forward)  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        for cls, forward in saved.items():
            if forward is None:
                del cls.forward
            else:
                cls.forward = forward  # type: ignore[method-assign]


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in DECODER_LINEARS]


# -- GPTQ ------------------------------------------------------------------------------------


def word_tokenizer() -> Any:
    """A word-level tokenizer built locally with ``tokenizers``: "w<i>" -> id i (1..999), unk 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(1, TINY["vocab_size"])}
    vocab["<unk>"] = 0
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


def calibration_texts(n: int = 16, length: int = 32) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [
        " ".join(f"w{int(i)}" for i in torch.randint(4, TINY["vocab_size"], (length,), generator=g)) for _ in range(n)
    ]


def quantize_gptq(src: str, dst: str, device_map: str = "cpu") -> str:
    """Quantize the fp16 tiny model at ``src`` with gptqmodel (4 bits, group 32) and save to ``dst``."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    if (Path(dst) / "config.json").exists():
        return dst
    cfg = GPTQConfig(
        bits=4, group_size=32, desc_act=False, sym=True, dataset=calibration_texts(), tokenizer=word_tokenizer()
    )
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float16, device_map=device_map, quantization_config=cfg
    )
    model.save_pretrained(dst)
    return dst


# -- AWQ -------------------------------------------------------------------------------------


def quantize_awq(src: str, dst: str) -> str:
    """Quantize the fp16 tiny model at ``src`` to 4-bit AWQ (asymmetric, group 32) with
    auto-round 0.16.1's round-to-nearest (``iters=0``, ``disable_opt_rtn=True``: no calibration
    set is downloaded) and export it in the ``auto_awq`` format; returns the checkpoint folder."""
    import logging

    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM

    found = sorted(Path(dst).glob("**/config.json"))
    if found:
        return str(found[0].parent)
    logging.getLogger("auto_round").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    rounder = AutoRound(model, word_tokenizer(), bits=4, group_size=32, sym=False, iters=0, disable_opt_rtn=True)
    rounder.quantize_and_save(dst, format="auto_awq")
    # auto-round 0.16.1 writes into a sub-folder named after the model and the scheme
    return str(sorted(Path(dst).glob("**/config.json"))[0].parent)


# -- BitNet ----------------------------------------------------------------------------------


def write_bitnet_checkpoint(dst: str, *, linear_class: str, quantization_mode: str = "offline") -> str:
    """A pre-quantized BitNet checkpoint of the tiny Llama (bf16): each decoder linear's weight
    rounded to ternary {-1, 0, 1} after scaling by 1 / mean|w| and packed four values per uint8
    byte along the output rows (transformers 5.24 ``pack_weights`` layout: shape (out/4, in)),
    with ``weight_scale`` (bf16, shape (1,)) in the convention each layer class reads it in
    (transformers 5.24): ``BitLinear`` divides its output by it (1 / mean|w|), ``AutoBitLinear``
    multiplies by it (mean|w|), so both give y ~ x·w; float embedding, norms and lm_head.
    ``quantization_mode="online"`` (quantization-aware training) keeps every weight in bf16."""
    from safetensors.torch import save_file
    from transformers.integrations.bitnet import pack_weights

    path = Path(dst)
    if (path / "config.json").exists():
        return dst
    path.mkdir(parents=True, exist_ok=True)
    base = tiny_llama(torch.bfloat16)
    tensors = {n: p.contiguous() for n, p in base.state_dict().items()}
    for name, linear in decoder_linears(base) if quantization_mode == "offline" else ():
        w = linear.weight.detach().float()
        scale = 1.0 / w.abs().mean().clamp(min=1e-5)
        ternary = (w * scale).round().clamp(-1, 1)
        tensors[f"{name}.weight"] = pack_weights(ternary.clone())
        stored = scale if linear_class == "bitlinear" else 1.0 / scale
        tensors[f"{name}.weight_scale"] = stored.reshape(1).to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = tiny_config().to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "bitnet",
        "linear_class": linear_class,
        "quantization_mode": quantization_mode,
    }
    (path / "config.json").write_text(json.dumps(config, default=str))
    return dst


# -- AQLM ------------------------------------------------------------------------------------


def write_aqlm_checkpoint(
    dst: str, *, num_codebooks: int, nbits: int, not_to_quantize: list[str], seed: int = 0
) -> str:
    """Synthesize an AQLM checkpoint (C17): random codes and N(0, 0.05) codebooks, unit scales,
    in groups of 8 inputs, for the 14 decoder linears; float embedding, norms and lm_head."""
    from safetensors.torch import save_file

    path = Path(dst)
    if (path / "config.json").exists():
        return dst
    path.mkdir(parents=True, exist_ok=True)
    base = tiny_llama(torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    code_dtype = torch.int16 if nbits == 16 else torch.int8
    tensors: dict[str, torch.Tensor] = {}
    for name, param in base.state_dict().items():
        module = name.rpartition(".")[0]
        if module.rpartition(".")[2] in DECODER_LINEARS:
            continue
        tensors[name] = param.contiguous()
    for name, linear in decoder_linears(base):
        out_f, in_f = linear.weight.shape
        high = 2**nbits
        codes = torch.randint(0, high, (out_f, in_f // 8, num_codebooks), generator=g)
        codes = (codes - 2 ** (nbits - 1)).to(code_dtype)  # stored signed, as aqlm does
        tensors[f"{name}.codes"] = codes
        tensors[f"{name}.codebooks"] = torch.randn(num_codebooks, high, 1, 8, generator=g) * 0.05
        tensors[f"{name}.scales"] = torch.ones(out_f, 1, 1, 1)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = tiny_config().to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["quantization_config"] = {
        "quant_method": "aqlm",
        "in_group_size": 8,
        "out_group_size": 1,
        "num_codebooks": num_codebooks,
        "nbits_per_codebook": nbits,
        "linear_weights_not_to_quantize": list(not_to_quantize),
    }
    (path / "config.json").write_text(json.dumps(config, default=str))
    return dst


# -- HQQ -------------------------------------------------------------------------------------


def hqq_tiny(compute_dtype: torch.dtype = torch.bfloat16, model_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The C08/C15 model: tiny Llama in ``model_dtype`` with its 14 decoder linears replaced by
    ``HQQLinear`` (4 bits, group 64, PYTORCH backend, optimizer step off for speed); no
    transformers quantization attribute is set."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    model = tiny_llama(model_dtype)
    qcfg = BaseQuantizeConfig(nbits=4, group_size=64)
    qcfg["weight_quant_params"]["optimize"] = False
    for name, linear in decoder_linears(model):
        layer = HQQLinear(linear, qcfg, compute_dtype=compute_dtype, device="cpu")
        model.set_submodule(name, layer)
    return model


# -- EETQ ------------------------------------------------------------------------------------


class FakeEetqKernels:
    """Pure-torch stand-in for the hub kernel ``kernels-community/quantization-eetq``.

    ``quant_weights(w (in, out), int8, False)`` returns per-column int8 codes and fp16 scales;
    ``w8_a16_gemm(x, w, s)`` computes ``x @ (w * s)`` in ``x``'s dtype.
    """

    @staticmethod
    def quant_weights(weight: torch.Tensor, dtype: torch.dtype, _flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.float()
        scales = w.abs().amax(dim=0).clamp(min=1e-8) / 127.0
        q = torch.round(w / scales).clamp(-127, 127).to(torch.int8)
        return q, scales.to(torch.float16)

    @staticmethod
    def w8_a16_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x @ (weight.to(x.dtype) * scales.to(x.dtype))


def eetq_tiny(dtype: torch.dtype = torch.float16, flag: str | None = "all") -> nn.Module:
    """Tiny Llama in ``dtype`` with its 14 decoder linears replaced by transformers'
    ``EetqLinear`` (int8 ``weight`` (in, out), fp16 ``weight_scales`` (out,) with
    requires_grad=True, as loading leaves it), quantized with :class:`FakeEetqKernels`.

    ``flag``: ``"all"`` sets the attributes a transformers EETQ load sets (``hf_quantizer``,
    ``config.quantization_config``, ``is_quantized``, ``quantization_method``); ``"attribute"``
    only ``quantization_method``; ``"config"`` only ``config.quantization_config``; ``None`` none.
    """
    from transformers.integrations.eetq import EetqLinear

    model = tiny_llama(dtype)
    for name, linear in decoder_linears(model):
        layer = EetqLinear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, s = FakeEetqKernels.quant_weights(linear.weight.detach().t().contiguous(), torch.int8, False)
        layer.weight.data = q
        layer.weight_scales.data = s
        model.set_submodule(name, layer)
    if flag in ("all", "attribute"):
        from transformers.utils.quantization_config import QuantizationMethod

        model.quantization_method = QuantizationMethod.EETQ
    if flag in ("all", "config"):
        from transformers import EetqConfig

        model.config.quantization_config = EetqConfig()
    if flag == "all":
        from transformers import EetqConfig
        from transformers.quantizers.quantizer_eetq import EetqHfQuantizer

        model.is_quantized = True
        model.hf_quantizer = EetqHfQuantizer(EetqConfig())
    return model


# -- shared assertions -----------------------------------------------------------------------

UPCASTS: list[Any] = ["auto", "all", lambda name, param, module: True]
UPCAST_IDS = ["auto", "all", "callable"]


def storage_state(model: nn.Module, backend: Any) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, bool, str]]:
    """(dtype, shape, bytes, requires_grad, sha256) of every quantized storage parameter, by name
    in the unwrapped model."""
    from kbitprep.backends.base import tensor_nbytes

    modules = dict(model.named_modules())
    out = {}
    for name, p in model.named_parameters():
        owner = modules.get(name.rpartition(".")[0], model)
        if backend.is_quantized_param(name, p, owner):
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            out[key] = (p.dtype, tuple(p.shape), tensor_nbytes(p), p.requires_grad, _digest(p))
    return out


def prepare_quietly(model: nn.Module, upcast: Any, **kw: Any) -> Any:
    """prepare(); ``upcast="all"`` on these backends must warn that their kernels want their own
    compute dtype (the orchestrator's KbitPrepWarning). Any other warning fails the test."""
    import pytest

    from kbitprep import KbitPrepWarning, prepare

    if upcast != "all":
        return prepare(model, upcast=upcast, **kw)
    with pytest.warns(KbitPrepWarning, match="expect their own compute"):
        return prepare(model, upcast=upcast, **kw)
