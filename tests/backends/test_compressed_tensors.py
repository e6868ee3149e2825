"""The compressed_tensors strategy on real compressed-tensors 0.20.1 layers built on this CPU.

The tiny Llama's 14 decoder linears get a preset scheme (group size 32 instead of the presets'
128: the tiny model's linears are 64 wide) through compressed-tensors' own
``apply_quantization_config``; scales come from a min-max pass over each weight with the
library's ``calculate_qparams`` / ``generate_gparam`` (what llm-compressor's default observer
computes), and ``ModelCompressor.compress_model`` packs them, leaving the model exactly as
transformers 5.24 loads a compressed checkpoint: ``weight_packed`` (or a float8 ``weight``),
scales, ``quantization_status`` "compressed", and the library's first-forward decompression
hook. One test saves such a model and loads it back through transformers.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import kbitprep
from _lora import add_lora, grad_counts, standard_step
from _measure import digest, param_bytes, storage_by_base_name
from _models import N_LINEARS, decoder_linears, load, standard_batch, tiny_llama, transformers_major
from _plan_warnings import has_warning, warning_of
from kbitprep.testing import BackendConformanceTests

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import ModelCompressor, compress_module, decompress_module  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

from kbitprep.backends.compressed_tensors import CompressedTensorsBackend  # noqa: E402

GROUP = 32
DENSE_NUMEL = 2 * (4 * 64 * 64 + 3 * 128 * 64)  # q/k/v/o 64x64, gate/up 128x64, down 64x128; 2 layers
PLAIN = 7  # embed_tokens, 5 RMSNorm weights, lm_head
Q_PROJ = "model.layers.0.self_attn.q_proj"


# -- building the models -----------------------------------------------------------------------


def _scheme(name: str) -> QuantizationScheme:
    """A compressed-tensors 0.20.1 preset on every Linear (group 32), or ``FP8_WEIGHT``: float8
    weights with per-channel scales and no activation quantization (``naive-quantized``)."""
    if name == "FP8_WEIGHT":
        args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
        return QuantizationScheme(targets=["Linear"], weights=args)
    scheme = preset_name_to_scheme(name, ["Linear"])
    if scheme.weights is not None and scheme.weights.group_size == 128:
        scheme.weights.group_size = GROUP
    return scheme


def _calibrate(model: nn.Module) -> None:
    """Min-max weight scales (and NVFP4 global scales) for every quantized module; static input
    scales set to 1. Leaves each module ``frozen``, ready to compress."""
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        args, w = scheme.weights, module.weight.detach()
        gscale = None
        if args.strategy == QuantizationStrategy.TENSOR_GROUP:
            gscale = generate_gparam(w.amin(), w.amax())
            module.weight_global_scale.data.copy_(gscale)
        if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
            groups = w.unflatten(-1, (-1, args.group_size))
            lo, hi = groups.amin(-1), groups.amax(-1)
        elif args.strategy == QuantizationStrategy.CHANNEL:
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        else:
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        scale, zero_point = calculate_qparams(lo, hi, args, global_scale=gscale)
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype)
        for leaf in ("input_scale", "input_global_scale"):
            if hasattr(module, leaf):
                getattr(module, leaf).data.fill_(1.0)
        module.quantization_status = QuantizationStatus.FROZEN


def ct_llama(scheme: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The tiny Llama in ``dtype`` quantized by compressed-tensors with ``scheme`` and compressed."""
    model = tiny_llama(dtype)
    config = QuantizationConfig(config_groups={"group_0": _scheme(scheme)}, ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    _calibrate(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm's progress bar
        ModelCompressor.from_pretrained_model(model).compress_model(model)
    return model


def _state(model: nn.Module) -> list[tuple[str, str, bool]]:
    """(key, sha256 with dtype and shape, requires_grad) of every parameter and buffer, in order."""
    return [(k, digest(v), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()]


def _hooks(model: nn.Module) -> list[tuple[int, Any]]:
    return list(model._forward_pre_hooks.items())


def _statuses(model: nn.Module) -> set[str]:
    return {str(m.quantization_status.value) for _n, m in decoder_linears(model)}


def _prepare(model: nn.Module, **kw: Any) -> tuple[Any, list[str]]:
    """prepare() with its KbitPrepWarnings recorded (the decompression warning is one)."""
    with pytest.warns(kbitprep.KbitPrepWarning) as seen:
        report = kbitprep.prepare(model, **kw)
    return report, [str(w.message) for w in seen]


# -- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "fmt"), [("W4A16", "pack-quantized"), ("NVFP4A16", "nvfp4-pack-quantized"), ("FP8_WEIGHT", "naive")]
)
def test_detected_by_its_layers_with_format_and_status(scheme: str, fmt: str) -> None:
    detection = kbitprep.detect_backend(ct_llama(scheme))
    assert detection.backend == "compressed_tensors"
    assert detection.reason.startswith(f"found {N_LINEARS} compressed-tensors modules ({fmt}")
    assert detection.reason.endswith(", compressed)")
    assert detection.others == ()  # fp8 leaves layers with a quantization_scheme alone


@pytest.fixture(scope="module")
def w4_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The W4A16 tiny Llama saved as llm-compressor saves it: save_pretrained of the compressed
    model, then ModelCompressor.update_config writes quantization_config into config.json."""
    path = tmp_path_factory.mktemp("ct") / "w4a16"
    model = ct_llama("W4A16")
    model.save_pretrained(path)
    ModelCompressor.from_pretrained_model(model).update_config(str(path))
    return str(path)


def test_transformers_load_is_detected_decompressed_as_dequantize_would_and_trains(w4_checkpoint: str) -> None:
    from transformers import CompressedTensorsConfig

    model = load(w4_checkpoint)
    detection = kbitprep.detect_backend(model)
    assert detection.backend == "compressed_tensors"
    assert "CompressedTensorsHfQuantizer (quant_method 'compressed-tensors')" in detection.reason
    q_proj = model.get_submodule(Q_PROJ)
    assert q_proj.weight_packed.dtype == torch.int32
    # transformers 5.24 loads the scales with requires_grad=True (4.57 does not); prepare freezes them either way
    assert q_proj.weight_scale.requires_grad == (transformers_major() >= 5)
    with pytest.warns(UserWarning):  # transformers: the checkpoint's quantization_config is kept
        dense = load(w4_checkpoint, quantization_config=CompressedTensorsConfig(dequantize=True))
    # transformers 5.24 decompresses on load (no quantizer, config or scheme is left); 4.57 keeps the
    # checkpoint compressed (weight_packed stays), so the true verdict there is still compressed_tensors
    dequantized = transformers_major() >= 5
    assert kbitprep.detect_backend(dense).backend == ("none" if dequantized else "compressed_tensors")

    packed = storage_by_base_name(model, CompressedTensorsBackend())
    report, _ = _prepare(model)
    for name, linear in decoder_linears(dense) if dequantized else ():  # transformers' own, bit for bit
        assert torch.equal(model.get_submodule(name).weight, linear.weight), name
    loss, grads = standard_step(add_lora(model, r=4))
    print(f"transformers-loaded W4A16: loss {loss:.4f}, grad counts {grad_counts(grads)}")
    assert grad_counts(grads) == (8, 8, 4)
    report.undo()
    assert storage_by_base_name(model, CompressedTensorsBackend()) == packed


# -- storage and the plan ----------------------------------------------------------------------

STORAGE = {
    "W4A16": ({"weight_packed", "weight_scale", "weight_shape"}, {torch.int32, torch.bfloat16, torch.int64}),
    "W8A16": ({"weight_packed", "weight_scale", "weight_shape"}, {torch.int32, torch.bfloat16, torch.int64}),
    "NVFP4A16": (
        {"weight_packed", "weight_scale", "weight_global_scale"},
        {torch.uint8, torch.float8_e4m3fn, torch.float32},
    ),
    "FP8_WEIGHT": ({"weight", "weight_scale"}, {torch.float8_e4m3fn, torch.bfloat16}),
}


def _storage(model: nn.Module) -> dict[str, torch.Tensor]:
    backend, modules = CompressedTensorsBackend(), dict(model.named_modules())
    return {
        n: p for n, p in model.named_parameters() if backend.is_quantized_param(n, p, modules[n.rpartition(".")[0]])
    }


@pytest.mark.parametrize("scheme", sorted(STORAGE))
def test_storage_is_never_cast_nor_trainable_even_with_upcast_all(scheme: str) -> None:
    model = ct_llama(scheme)
    leaves, dtypes = STORAGE[scheme]
    storage = _storage(model)
    assert {n.rpartition(".")[2] for n in storage} == leaves
    assert len(storage) == N_LINEARS * len(leaves)
    assert {p.dtype for p in storage.values()} == dtypes

    p = kbitprep.plan(model, upcast="all")
    assert len(p.casts) == PLAIN and not {c.name for c in p.casts} & set(storage)
    report, _ = _prepare(model, upcast="all")
    after = _storage(model)  # the dense weights of the decompressed layers are storage too
    assert {n for n, t in after.items() if n.endswith(".weight")} == {f"{n}.weight" for n, _m in decoder_linears(model)}
    assert not any(t.requires_grad for t in after.values())
    fp32 = {n for n, t in storage.items() if t.dtype == torch.float32}  # NVFP4's global scales
    assert {n for n, t in after.items() if t.dtype == torch.float32} == fp32  # nothing cast up
    assert {t.dtype for n, t in after.items() if n.endswith(".weight")} == {torch.bfloat16}

    second = kbitprep.plan(model, upcast="all")  # nothing left to cast or decompress
    assert second.casts == () and not has_warning(second, "backend", "decompress"), second.warnings
    digests = {n: digest(t) for n, t in after.items()}
    _loss, grads = standard_step(add_lora(model, r=4))
    assert grad_counts(grads) == (8, 8, 4)
    trained = _storage(model)
    assert {
        n.removeprefix("base_model.model.").replace(".base_layer.", "."): digest(t) for n, t in trained.items()
    } == digests
    assert all(t.grad is None and not t.requires_grad for t in trained.values())
    report.undo()


def _bytes(scheme: str, dtype: torch.dtype) -> tuple[int, int, int]:
    """(dense weights, bf16 scale copies, compressed tensors replaced), worked out by hand."""
    bf16_out = scheme == "NVFP4A16"  # compressed-tensors 0.20.1 unpacks FP4 to bfloat16
    dense = DENSE_NUMEL * (2 if bf16_out else torch.empty((), dtype=dtype).element_size())
    if scheme == "NVFP4A16":  # uint8 packs two FP4 values; a float8 scale per 16 weights, copied to bf16
        return dense, DENSE_NUMEL // 16 * 2, DENSE_NUMEL // 2 + DENSE_NUMEL // 16
    bits = {"W4A16": 4, "W8A16": 8}[scheme]  # int32 words of 32 / bits codes
    return dense, 0, DENSE_NUMEL * bits // 8


@pytest.mark.parametrize(
    ("scheme", "dtype"),
    [("W4A16", torch.bfloat16), ("W8A16", torch.bfloat16), ("NVFP4A16", torch.bfloat16), ("W4A16", torch.float32)]
    + [("NVFP4A16", torch.float32)],
)
def test_plan_states_the_decompression_bytes_and_prepare_spends_them(scheme: str, dtype: torch.dtype) -> None:
    dense, scales, kept = _bytes(scheme, dtype)
    model = ct_llama(scheme, dtype)
    p = kbitprep.plan(model)
    # planned as numbers: the fix-up's net bytes are part of bytes_delta
    assert p.fixup_bytes == dense + scales - kept
    assert p.bytes_delta == p.fixup_bytes + sum(c.bytes_after - c.bytes_before for c in p.casts)
    warning = warning_of(p, "backend", "decompress")
    assert f"adding {dense + scales:,} bytes ({dense:,} bytes of dense weights" in warning
    assert f"keeps the {kept:,} bytes of compressed tensors" in warning
    assert (f"{scales:,} bytes of bfloat16 copies" in warning) == bool(scales)
    if dtype == torch.bfloat16:  # nothing is cast; NVFP4's fp32 weight_global_scale is storage, not a dtype
        assert not has_warning(p, "precision", "Model input"), p.warnings

    before_ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    before = param_bytes(model)
    _prepare(model)
    new = [t for t in model.parameters() if t.untyped_storage().data_ptr() not in before_ptrs]
    assert sum(t.numel() * t.element_size() for t in new) == dense + scales
    assert param_bytes(model) - before == dense + scales - kept  # the kept tensors left the model
    assert param_bytes(model) - before == p.bytes_delta  # prepare spends what the plan says


# -- training and undo ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "dtype", "upcast"),
    [
        ("W4A16", torch.bfloat16, "auto"),
        ("W8A16", torch.bfloat16, "auto"),
        ("NVFP4A16", torch.bfloat16, "auto"),
        ("FP8_WEIGHT", torch.bfloat16, "auto"),
        ("W4A16", torch.bfloat16, "all"),
    ],
)
def test_lora_trains_one_step_with_the_loss_of_the_library_own_decompression(
    scheme: str, dtype: torch.dtype, upcast: str
) -> None:
    twin = ct_llama(scheme, dtype)
    twin.train()
    ids = standard_batch()
    with torch.no_grad():  # compressed-tensors' own first-forward hook decompresses the twin
        reference = float(twin(input_ids=ids, labels=ids).loss)

    model = ct_llama(scheme, dtype)
    packed = storage_by_base_name(model, CompressedTensorsBackend())
    report, _ = _prepare(model, upcast=upcast)
    loss, grads = standard_step(add_lora(model, r=4))
    print(f"{scheme} {dtype} upcast={upcast}: loss {loss:.4f} (reference {reference:.4f}), {grad_counts(grads)}")
    assert grad_counts(grads) == (8, 8, 4)
    assert loss == pytest.approx(reference, abs=2e-3 if upcast == "all" else 1e-6)
    report.undo()
    assert storage_by_base_name(model, CompressedTensorsBackend()) == packed  # compressed form, bit for bit


def test_nvfp4_in_an_fp32_model_computes_in_bf16_with_casts_at_its_boundaries() -> None:
    """compressed-tensors 0.20.1 decompresses NVFP4 to bfloat16 whatever the model's dtype, so
    its own first-forward hook leaves an fp32 model that cannot run; prepare plans the casts."""
    twin = ct_llama("NVFP4A16", torch.float32)
    ids = standard_batch()
    with pytest.raises(RuntimeError, match="same dtype"):
        twin(input_ids=ids)

    model = ct_llama("NVFP4A16", torch.float32)
    p = kbitprep.plan(model)
    rows = {r.name: r for r in p.precision}
    assert p.compute_dtype == torch.float32
    assert {n for n, _m in decoder_linears(model)} <= set(rows)
    assert (rows[Q_PROJ].computes, rows[Q_PROJ].output_to) == (torch.bfloat16, torch.float32)
    report, _ = _prepare(model)
    reference = tiny_llama(torch.float32)  # the dequantized bf16 weights, exactly widened to fp32
    for name, linear in decoder_linears(reference):
        linear.weight.data = model.get_submodule(name).weight.float()
    reference.train()
    with torch.no_grad():
        expected = float(reference(input_ids=ids, labels=ids).loss)
    loss, grads = standard_step(add_lora(model, r=4))
    print(f"NVFP4A16 fp32: loss {loss:.4f} (fp32 reference {expected:.4f}), grad counts {grad_counts(grads)}")
    assert grad_counts(grads) == (8, 8, 4)
    assert loss == pytest.approx(expected, abs=2e-3)  # the 14 linears compute in bf16, the rest in fp32
    report.undo()


@pytest.mark.parametrize("scheme", ["W4A16", "W8A16", "NVFP4A16", "FP8_WEIGHT"])
def test_undo_restores_the_compressed_form_and_the_library_hook(scheme: str) -> None:
    model = ct_llama(scheme)
    state, hooks = _state(model), _hooks(model)
    handle = model.ct_decompress_hook
    report, _ = _prepare(model)
    assert _statuses(model) == {"decompressed"} and not hasattr(model, "ct_decompress_hook")
    assert _hooks(model) == [h for h in hooks if h[0] != handle.id]
    with torch.no_grad():
        prepared_logits = model(input_ids=standard_batch()).logits  # the library's hook must not fire
    report.undo()
    assert _state(model) == state  # same keys in the same order, same bytes, dtypes and requires_grad
    assert _hooks(model) == hooks and model.ct_decompress_hook is handle
    assert _statuses(model) == {"compressed"}
    model.eval()
    with torch.no_grad():  # the library decompresses on the first forward again, as before prepare
        assert torch.equal(model(input_ids=standard_batch()).logits, prepared_logits)
    assert _statuses(model) == {"decompressed"}


@pytest.mark.parametrize(("scheme", "changed"), [("W4A16", 0), ("W8A16", 8), ("NVFP4A16", 125)])
def test_recompressing_is_not_bit_exact_so_undo_keeps_the_compressed_tensors(scheme: str, changed: int) -> None:
    """Why undo keeps the originals: the library's decompress then compress of a bf16 layer
    changes some packed words (W8A16: q·s rounded to bf16, then divided by s again, can land on
    the next code; 8 of q_proj's 1,024 int32 words, 125 of its 2,048 NVFP4 bytes)."""
    layer = ct_llama(scheme).get_submodule(Q_PROJ)
    before = layer.weight_packed.detach().clone()
    decompress_module(layer)
    compress_module(layer)
    assert int((layer.weight_packed != before).sum()) == changed


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "described"),
    [
        ("FP8_DYNAMIC", "weights float8 channel, input_activations float8 token dynamic"),
        ("FP8", "weights float8 tensor, input_activations float8 tensor"),
        ("W8A8", "weights int8 channel, input_activations int8 token dynamic"),
        ("W4AFP8", "weights int4 group, input_activations float8 token dynamic"),
        ("NVFP4", "weights float4 tensor_group, input_activations float4 tensor_group"),
    ],
)
def test_activation_quantized_schemes_are_refused_before_anything_changes(scheme: str, described: str) -> None:
    model = ct_llama(scheme)
    state, hooks, statuses = _state(model), _hooks(model), _statuses(model)
    assert kbitprep.detect_backend(model).backend == "compressed_tensors"
    for call in (kbitprep.plan, kbitprep.prepare, kbitprep.prepare_model_for_kbit_training):
        with pytest.raises(kbitprep.NotTrainableError) as info:
            call(model)
        message = str(info.value)
        assert f"14 compressed-tensors module(s) (first: {Q_PROJ!r}, scheme: {described})" in message
        assert "no_grad" in message and "dequantize=True" in message
    verdict = kbitprep.get_backend("compressed_tensors").trainable(model)
    assert not verdict.ok and "quantize activations" in verdict.reason
    assert _state(model) == state and _hooks(model) == hooks and _statuses(model) == statuses


def test_the_refusal_is_true_lora_before_fp8_dynamic_layers_gets_no_gradient() -> None:
    """Without kbitprep: let the library decompress an FP8_DYNAMIC model and attach LoRA. Every
    decoder linear fake-quantizes its input under no_grad, so the loss does not depend on any
    LoRA tensor (q_proj and v_proj feed o_proj; the residual stream holds no trainable tensor)."""
    model = ct_llama("FP8_DYNAMIC")
    with torch.no_grad():
        model(input_ids=standard_batch())  # the library's hook decompresses every layer
    assert _statuses(model) == {"decompressed"}
    lora = add_lora(model, r=4)
    assert sum(1 for n, p in lora.named_parameters() if "lora_" in n and p.requires_grad) == 8
    lora.train()
    ids = standard_batch()
    loss = lora(input_ids=ids, labels=ids).loss
    assert loss.grad_fn is None and not loss.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()


def test_missing_library_is_reported_before_anything_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ct_llama("W4A16")
    state = _state(model)
    monkeypatch.setattr(CompressedTensorsBackend, "requires", ("compressed_tensors_not_installed",))
    with pytest.raises(kbitprep.BackendUnavailableError) as info:
        kbitprep.plan(model)
    assert "decompressing compressed-tensors layers" in str(info.value)
    assert info.value.install_hint == "pip install compressed-tensors"
    assert _state(model) == state


# -- the conformance kit ---------------------------------------------------------------------------


class TestDecompressedByTheLibraryFirstForward(BackendConformanceTests):
    """A W4A16 model after its first forward (a smoke test, ``generate``): compressed-tensors'
    hook has decompressed every layer. Its dense weights, scales and shapes are storage; nothing
    is left to decompress, so the whole kit applies."""

    backend_cls = CompressedTensorsBackend

    def make_model(self) -> nn.Module:
        model = ct_llama("W4A16")
        with torch.no_grad():
            model(input_ids=standard_batch())
        assert _statuses(model) == {"decompressed"} and not hasattr(model, "ct_decompress_hook")
        return model
