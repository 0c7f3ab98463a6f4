"""model/native.py: our batch-1 products in C, built for this CPU; each path where it cannot be."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import native, quant
from model.lm import LanguageModel, LMConfig

needs_library = pytest.mark.skipif(native.library() is None, reason=native.status())


@pytest.fixture
def rebuild(monkeypatch, tmp_path):
    """`native.library()` rebuilt from scratch into a temporary cache for the test, and the
    process's own library back afterwards."""
    monkeypatch.setenv("SMALL_LM_NATIVE_DIR", str(tmp_path / "native"))
    native.library.cache_clear()
    yield tmp_path / "native"
    native.library.cache_clear()


def _effective(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The weight a kernel stands for, in float64."""
    return w.double() if scale is None else w.double() * scale.double()[:, None]


@needs_library
@pytest.mark.parametrize("k", [1, 7, 16, 17, 31, 33, 100, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_each_kernel_matches_a_float64_product(k, dtype):
    """Widths around the vector lanes (16 with AVX-512, 8 with AVX2: tails of every length),
    with and without a bias, on one and two threads; float32 sums, so within float32's rounding
    of a k-term dot product."""
    g = torch.Generator().manual_seed(k)
    n = 45
    w = torch.randn(n, k, generator=g)
    scale = None
    if dtype == torch.int8:
        w, scale = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), \
            torch.rand(n, generator=g) / 50
    else:
        w = w.to(dtype)
    x = torch.randn(1, 1, k, generator=g)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for bias in (None, torch.randn(n, generator=g)):
                y = native.linear_row(x, w, bias, scale)
                assert y.shape == (1, 1, n) and y.dtype == torch.float32
                wf = _effective(w, scale)
                ref = F.linear(x.double(), wf, None if bias is None else bias.double())
                # float32 sums of k terms: at most ~k units of rounding of the sum of |terms|
                bound = 2 * k * 2**-24 * (x.double().abs() @ wf.abs().t()).max() + 1e-6
                assert (y.double() - ref).abs().max() <= bound
    finally:
        torch.set_num_threads(threads)


@needs_library
def test_bf16_inputs_are_taken_exactly():
    w = torch.randn(20, 64)
    xb = torch.randn(1, 64).bfloat16()
    assert torch.allclose(native.linear_row(xb, w), F.linear(xb.float(), w), rtol=1e-5,
                          atol=1e-5)


@needs_library
def test_shapes_that_do_not_fit_are_refused():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="one row of 32 inputs"):
        native.linear_row(torch.randn(2, 32), w)  # two rows
    with pytest.raises(ValueError, match="one row of 32 inputs"):
        native.linear_row(torch.randn(1, 31), w)
    with pytest.raises(ValueError, match="8 biases"):
        native.linear_row(torch.randn(1, 32), w, torch.randn(7))
    with pytest.raises(ValueError, match="scale per row"):
        native.linear_row(torch.randn(1, 32), torch.zeros(8, 32, dtype=torch.int8))
    assert not native.usable(torch.randn(32, 8).t())  # not contiguous
    assert not native.usable(torch.randn(8, 32).half())


def _greedy(model: LanguageModel, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the last step's logits of cached decoding at batch 1."""
    out = model.generate(prompt, max_new_tokens=24, temperature=0)
    with torch.no_grad(), model:
        model.forward_cached(out[:, :-1], 0)
        logits = model.forward_cached(out[:, -1:], out.size(1) - 1)
    return out, logits


@needs_library
@pytest.mark.parametrize("arch", ["gpt2", "modern-gqa"])
@pytest.mark.parametrize("fmt", ["none", "bf16", "int8", "bf16-model"])
def test_decoding_with_and_without_the_native_products(arch, fmt, monkeypatch):
    """The same greedy tokens with our products as with PyTorch's kernels; float32 logits
    within float32 rounding (bf16 and int8: the others round the inputs, ours do not;
    bf16-model: a model whose parameters are bf16, decoded as they are)."""
    extra = {} if arch == "gpt2" else dict(positions="rope", norm="rmsnorm", mlp="swiglu",
                                             num_kv_heads=1, qk_norm=True, tie_embeddings=False,
                                             attn_bias=False, attn_out_bias=False,
                                             mlp_bias=False)
    torch.manual_seed(0)
    model = LanguageModel.from_config(LMConfig(vocab_size=300, d_model=64, num_heads=4,
                                               num_layers=2, d_ff=128, max_seq_len=64,
                                               dropout=0.0, **extra)).eval()
    if fmt == "bf16-model":
        model, fmt = model.to(torch.bfloat16), "none"
    model.quantize(fmt)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    ours, logits = _greedy(model, prompt)
    monkeypatch.setattr(native, "usable", lambda w: False)
    model.quantize("none")
    model.quantize(fmt)  # copies made again, without ours
    theirs, ref = _greedy(model, prompt)
    exact = fmt == "none" and logits.dtype == torch.float32
    tol = 1e-4 if exact else 0.05
    assert torch.allclose(logits.float(), ref.float(), atol=tol, rtol=tol)
    if exact:
        assert torch.equal(ours, theirs)


def test_turned_off_it_says_so_and_decoding_runs(rebuild, monkeypatch):
    monkeypatch.setattr(native, "ENABLED", False)
    assert native.library() is None and native.status() == \
        "not in use: turned off (SMALL_LM_NATIVE=0)"
    assert not native.usable(torch.randn(4, 4))
    assert quant.FloatWeight(torch.randn(4, 4)).row_w is None
    model = LanguageModel(vocab_size=50, d_model=32, num_heads=2, num_layers=1, max_seq_len=16)
    assert model.eval().generate(torch.tensor([[1, 2]]), max_new_tokens=4).shape == (1, 6)
    assert not rebuild.exists()  # nothing built


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built on Linux only")
def test_a_compiler_that_fails_is_one_line_and_pytorch_kernels_run(rebuild, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exits 1, builds nothing
    assert native.library() is None
    assert native.status().startswith("not in use: build failed with false: ")
    assert "\n" not in native.status()
    assert list(rebuild.glob("*.so")) == []  # no partial file left behind


@needs_library
def test_built_once_per_source_and_cpu_then_loaded(rebuild, monkeypatch, tmp_path):
    """The first use builds into the cache; another process loads that file as it is; a
    changed source gets a file of its own."""
    assert native.library() is not None
    (lib,) = rebuild.glob("native-*.so")
    stamp = lib.stat().st_mtime_ns
    code = "from model import native; print(native.status())"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root, env={**os.environ, "SMALL_LM_NATIVE_DIR": str(rebuild)})
    assert done.stdout.strip() == "in use", done.stderr
    assert lib.stat().st_mtime_ns == stamp and list(rebuild.glob("*.so")) == [lib]
    changed = tmp_path / "native.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    native.library.cache_clear()
    assert native.library() is not None
    assert len(list(rebuild.glob("native-*.so"))) == 2


@needs_library
def test_the_avx2_build_and_the_plain_build(rebuild, monkeypatch):
    """The other CPU kind's path, built here: AVX2 + FMA code (8 lanes) agrees with F.linear
    (the library's own check) and is used; plain C (no vector code: slower than PyTorch's
    kernels) is refused with a reason."""
    flags = open("/proc/cpuinfo").read()
    if " avx2 " not in flags or " fma " not in flags:
        pytest.skip("this CPU cannot run AVX2 code")
    def target(march: str) -> tuple[str, ...]:
        return tuple(march if f == "-march=native" else f for f in native.FLAGS)

    avx2, plain = target("-march=x86-64-v3"), target("-march=x86-64")
    monkeypatch.setattr(native, "FLAGS", avx2)
    lib = native.library()
    assert lib is not None and lib.native_lanes() == 8
    native.library.cache_clear()
    monkeypatch.setattr(native, "FLAGS", plain)
    assert native.library() is None
    assert "neither AVX-512 nor AVX2" in native.status()
