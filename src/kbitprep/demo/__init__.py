"""The application behind ``kbitprep demo`` and ``kbitprep inspect``: the model, the corpus,
the training run and the loss plot. Not part of kbitprep's core API (``import kbitprep`` does
not import it).

Modules, by concern:

- ``_model``: the default SmolLM2 model (its GGUF converted once to bf16 in the user cache) and
  loading a model with a ``--quantization`` choice;
- ``_data``: the corpus, its train / held-out split, tokenizing, training windows;
- ``_measure``: parameter bytes, peak memory, the held-out loss, the LoRA gradient check;
- ``_result`` and ``_run``: the settings, the measurements, the reporter protocol, the run;
- ``_plot``: the loss curve.

transformers, peft, the quantization libraries and matplotlib are imported inside the functions
that need them, so importing this package costs no more than ``import kbitprep``.
"""

from __future__ import annotations

from kbitprep.demo._data import corpus, held_out_blocks, tokenize, train_windows
from kbitprep.demo._errors import DemoSetupError, TrainingCheckError
from kbitprep.demo._measure import lora_gradient_check, mean_loss, param_bytes, peak_rss_bytes
from kbitprep.demo._model import (
    CONVERTED_NAME,
    DEFAULT_MODEL,
    QUANTIZATIONS,
    cache_dir,
    convert_gguf,
    default_model_dir,
    find_gguf,
    load_model,
    load_tokenizer,
    quantization_config,
)
from kbitprep.demo._plot import save_loss_plot
from kbitprep.demo._result import SUMMARY_KEYS, DemoOptions, DemoResult, LogReporter, Reporter
from kbitprep.demo._run import inspect_model, run_demo

__all__ = [
    "CONVERTED_NAME",
    "DEFAULT_MODEL",
    "QUANTIZATIONS",
    "SUMMARY_KEYS",
    "DemoOptions",
    "DemoResult",
    "DemoSetupError",
    "LogReporter",
    "Reporter",
    "TrainingCheckError",
    "cache_dir",
    "convert_gguf",
    "corpus",
    "default_model_dir",
    "find_gguf",
    "held_out_blocks",
    "inspect_model",
    "load_model",
    "load_tokenizer",
    "lora_gradient_check",
    "mean_loss",
    "param_bytes",
    "peak_rss_bytes",
    "quantization_config",
    "run_demo",
    "save_loss_plot",
    "tokenize",
    "train_windows",
]
