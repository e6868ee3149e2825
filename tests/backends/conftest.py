"""Session fixtures for the backend tests: real quantized tiny models, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gptq_dir(model_root: str) -> str:
    """The tiny Llama quantized with gptqmodel 7.6.0 on CPU (4 bits, group 32), saved once (C05 a)."""
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (pip install gptqmodel==7.6.0)")
    pytest.importorskip("optimum", reason="optimum is not installed")
    from _models import saved_tiny
    from _quantized import quantize_gptq

    return quantize_gptq(saved_tiny(model_root, "float16"), str(Path(model_root) / "gptq-4bit-g32"))


@pytest.fixture(scope="session")
def awq_dir(model_root: str) -> str:
    """The tiny Llama quantized to 4-bit AWQ (group 32) by auto-round on CPU, saved once."""
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (pip install gptqmodel==7.6.0)")
    pytest.importorskip("auto_round", reason="auto-round is not installed (pip install auto-round==0.16.1)")
    from _models import saved_tiny
    from _quantized import quantize_awq

    return quantize_awq(saved_tiny(model_root, "float16"), str(Path(model_root) / "awq-4bit-g32"))


@pytest.fixture(scope="session")
def aqlm_dirs(model_root: str) -> dict[str, str]:
    """The four synthesized AQLM checkpoints of C17, by variant: a, b (1x16) and c (2x8)."""
    pytest.importorskip("aqlm", reason="aqlm is not installed (pip install 'aqlm[cpu]')")
    from _quantized import write_aqlm_checkpoint

    root = Path(model_root)
    return {
        "a": write_aqlm_checkpoint(str(root / "aqlm-1x16-a"), num_codebooks=1, nbits=16, not_to_quantize=["lm_head"]),
        "b": write_aqlm_checkpoint(
            str(root / "aqlm-1x16-b"),
            num_codebooks=1,
            nbits=16,
            not_to_quantize=["model.embed_tokens.weight", "lm_head.weight"],
        ),
        "c": write_aqlm_checkpoint(str(root / "aqlm-2x8"), num_codebooks=2, nbits=8, not_to_quantize=["lm_head"]),
    }
