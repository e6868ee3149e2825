"""The Trainer recipe as a script, for ``python -m torch.distributed.run --nproc_per_node 2``.

Usage: ``_trainer_launch.py MODEL_DIR OUT_DIR``. Each rank loads the tiny Llama with bnb 4-bit nf4,
prepares it with kbitprep, attaches LoRA and trains 3 steps with ``Trainer`` on CPU (accelerate
sees the launcher's environment and runs DDP over gloo), then writes ``OUT_DIR/rank<R>.json``
with what tests/test_trainer.py checks. Started by ``test_trainer_two_process_launch``.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch


def main(model_dir: str, out_dir: str) -> None:
    from transformers import LlamaForCausalLM, Trainer

    import kbitprep
    from _lora import add_lora, lora_params
    from _models import load
    from _quantized import bnb4_config
    from _training import TokenDataset, input_grad_hooks, training_args

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    real = []
    original = LlamaForCausalLM._activation_checkpointing_enable

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        real.append(1)
        return original(self, *args, **kwargs)

    LlamaForCausalLM._activation_checkpointing_enable = counted  # type: ignore[method-assign]

    model = load(model_dir, quantization_config=bnb4_config())
    report = kbitprep.prepare(model)
    peft_model = add_lora(model)
    before = lora_params(peft_model)
    args = training_args(Path(out_dir), ddp_backend="gloo")
    trainer = Trainer(model=peft_model, args=args, train_dataset=TokenDataset())
    trainer.train()

    after = lora_params(peft_model)
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    result = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "losses": losses,
        "finite": all(math.isfinite(v) for v in losses),
        "lora": len(before),
        "lora_changed": sum(not torch.equal(before[n], after[n]) for n in before),
        "lora_checksum": float(sum(t.double().sum() for t in after.values())),
        "real_enables": len(real),
        "input_grad_hooks": input_grad_hooks(model),
        "use_reentrant": report.use_reentrant,
        "use_cache": model.config.use_cache,
    }
    (Path(out_dir) / f"rank{result['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
