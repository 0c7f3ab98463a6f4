"""Inference weight formats (model/quant.py): bf16 and int8 against float32, kernel vs fallback,
what stays untouched (parameters, state_dict, training), and the --quantize command lines."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from cli_cases import assert_usage_errors, run_many

import evaluate_lm
import generate_lm
import serve_lm
from common import cli
from model import native, quant
from model.checkpoint import load_model
from model.lm import LanguageModel, Linear

REPO = Path(__file__).resolve().parents[2]

# Widths are multiples of 16 so that the int8 kernel is used where the machine has it.
SMALL = dict(vocab_size=256, d_model=64, num_heads=4, num_layers=2, d_ff=128, max_seq_len=128,
             dropout=0.0)


@contextlib.contextmanager
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def random_model(one_thread) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(**SMALL).eval()


@pytest.fixture(scope="module")
def trained_model(one_thread) -> LanguageModel:
    """SMALL trained for 80 steps (a few seconds) on a noisy sequence: each token follows from
    the one before by a fixed random permutation when the token two back is even, by another
    when it is odd, or with probability 0.3 is a random token."""
    g = torch.Generator().manual_seed(0)
    perms = torch.stack([torch.randperm(256, generator=g) for _ in range(2)])  # (2, 256)
    seqs = torch.zeros(512, 65, dtype=torch.long)
    seqs[:, :2] = torch.randint(0, 256, (512, 2), generator=g)
    for t in range(2, 65):
        rule = perms[seqs[:, t - 2] % 2, seqs[:, t - 1]]
        noise = torch.randint(0, 256, (512,), generator=g)
        seqs[:, t] = torch.where(torch.rand(512, generator=g) < 0.3, noise, rule)
    torch.manual_seed(0)
    model = LanguageModel(**SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(80):
        batch = seqs[(step * 32) % 512:(step * 32) % 512 + 32]
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 3.5, loss.item()  # learnt the rule (uniform guessing: ln 256 = 5.5)
    return model.eval()


@pytest.fixture
def restore(random_model, trained_model):
    yield
    random_model.quantize("none")
    trained_model.quantize("none")


# Tolerances (relative error of all logits, norm-wise). bf16 keeps 8 significant bits: each
# weight and input is off by at most 2**-9 (0.2%) and the errors of a sum partly cancel; we
# measure ~0.35% here, so 1% leaves a 3x margin. int8 per-channel: a weight is off by at most
# scale / 2 = max|w_row| / 254, about 0.6% of a Gaussian row's spread on average (max ~ 3 std);
# with the bf16 inputs we measure ~0.8%, so 3% leaves the same margin. int4 (Q4_0's blocks of
# 32, 16 levels): a weight is off by up to d / 2 = max|w_block| / 16; we measure ~10%, so 30%.
# A real bug (wrong scale, a transposed weight, a dropped bias) gives errors of order 100%.
@pytest.mark.parametrize("fmt, tol", [("bf16", 0.01), ("int8", 0.03), ("int4", 0.3)])
def test_logits_close_to_float32(random_model, restore, fmt, tol):
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = random_model(idx)
        random_model.quantize(fmt)
        assert random_model.quantization == fmt
        out = random_model(idx)
    assert out.dtype == torch.float32  # the samplers see float32 logits
    err = rel_err(out, ref)
    assert 0 < err < tol, err  # > 0: the format is really used


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_trained_greedy_continuation_agrees(trained_model, restore, fmt):
    """Greedy choices agree with float32 at (almost) every position, compared on the float32
    greedy continuation (teacher-forced, so one early flip does not derail the rest). Measured:
    100% for all three formats, with logits off by 0.4% (bf16) and 0.7% (int8) while no position's
    top two logits are within 0.1 of each other: a trained model's choice is far ahead of the
    runner-up, so only near-ties can flip. 95% allows a few such flips among the 96 positions
    (another build's kernels round differently); a broken format agrees about 1 time in 256."""
    prompt = torch.tensor([[1, 2, 13, 49, 212, 141, 219, 167]])
    seq = trained_model.generate(prompt, max_new_tokens=96, temperature=0)
    with torch.no_grad():
        ref = trained_model(seq[:, :-1])[0, 7:].argmax(-1)  # predictions of the new tokens
        assert torch.equal(ref, seq[0, 8:])  # float32 cached decoding = full forward
        trained_model.quantize(fmt)
        got = trained_model(seq[:, :-1])[0, 7:].argmax(-1)
    agree = (got == ref).float().mean().item()
    assert agree >= 0.95, agree


def test_int8_kernels_agree_with_the_int8_grid(random_model, restore, monkeypatch):
    """Each int8 kernel this CPU has against the exact product on the int8 grid: the fallback
    and `_weight_int8pack_mm` round bf16 inputs and outputs (2**-8 relative each), fbgemm's
    W8A8 also quantizes each input row to 7 bits (~1% here); W8A8 rows are quantized alone."""
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(2))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    iw = quant.Int8Weight(w)
    exact = torch.nn.functional.linear(x, iw.q.float() * iw.scale.float()[:, None])
    monkeypatch.setattr(quant, "PACKED_KERNELS", False)
    assert iw.kernel(3) == "fallback"
    slow = iw.linear(x)
    assert rel_err(slow, exact) < 2**-7
    monkeypatch.setattr(quant, "PACKED_KERNELS", True)
    if native.library() is not None:  # one row: our weight-only product, inputs as they are
        assert iw.kernel(1) == "native"
        assert rel_err(iw.linear(x[1:2]), exact[1:2]) < 1e-5
    if quant.w8a8_works():
        assert iw.kernel(64) == "w8a8"
        assert iw.kernel(1) == ("native" if native.library() is not None else "w8a8")
        fast = iw.linear(x)
        assert 0 < rel_err(fast, exact) < 3e-2
        assert rel_err(iw.linear(x[1:2]), exact[1:2]) < 3e-2  # one row: fbgemm's own range
        assert torch.equal(iw.linear(x[1:3]), fast[1:3])  # a row's result ignores the others
        assert torch.equal(iw.linear(x * torch.tensor([[1.0], [1e3], [1.0]]))[0], fast[0])
    if quant._X86_64 and quant._kernel_works("cpu"):
        monkeypatch.setattr(quant, "w8a8_works", lambda: False)
        monkeypatch.setattr(quant.native, "usable", lambda w: False)  # int8pack at one row too
        iw = quant.Int8Weight(w)
        assert iw.kernel(3) == "int8pack" and iw.kernel(quant.INT8_KERNEL_MAX_ROWS + 1) == \
            "fallback"
        assert quant.Int8Weight(torch.randn(8, 40)).kernel(1) == "fallback"  # width % 16 != 0
        # The kernel rounds its float32 sum to bf16 once, the fallback twice (before and after
        # scaling): they may differ by a bf16 unit in the last place, 2**-8 relative at most.
        assert torch.allclose(iw.linear(x), slow, rtol=2**-7, atol=1e-6)
        # The same through the whole model, decoding token by token (rows <= the limit).
        random_model.quantize("int8")
        prompt = torch.tensor([[5, 6, 7]])
        a = random_model.generate(prompt, max_new_tokens=20, temperature=0)
        monkeypatch.setattr(quant, "PACKED_KERNELS", False)
        b = random_model.generate(prompt, max_new_tokens=20, temperature=0)
        assert torch.equal(a, b)


def test_int8_quantization_is_symmetric_per_channel():
    w = torch.randn(5, 32) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 2.0])[:, None]
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (5,)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[[0, 1, 2, 4]] >= 126).all()  # full range
    assert (q[3] == 0).all()  # an all-zero row stays zero (no division by zero)
    back = q.float() * scale.float()[:, None]
    assert ((back - w).abs() <= scale.float()[:, None] / 2 + 1e-12).all()  # nearest grid point


def test_a_view_for_inference_only(random_model, restore):
    """Parameters, state_dict and training are untouched; the format's copies replace the float32
    decode copies and survive `with model:` blocks; a weight changed in place is re-quantized."""
    before = {k: v.clone() for k, v in random_model.state_dict().items()}
    idx = torch.randint(0, 256, (1, 12))
    ref = random_model(idx)  # gradients on: the float32 path
    random_model.quantize("int8")
    after = random_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype
               for k in before)
    assert torch.equal(random_model(idx), ref)  # with gradients (training): float32 as before
    linears = [m for m in random_model.modules() if isinstance(m, Linear)]
    with random_model:
        random_model.generate(idx, max_new_tokens=3)
        assert all(isinstance(m.decode_w, quant.Int8Weight) for m in linears)  # no fp32 copy
    assert all(isinstance(m.decode_w, quant.Int8Weight) for m in linears)  # kept after the block
    with torch.no_grad():
        out = random_model(idx)
        random_model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
        changed = random_model(idx)  # re-quantized on the fly ...
        random_model.quantize("int8")
        assert torch.equal(changed, random_model(idx))  # ... as a fresh quantize() does
        assert not torch.equal(changed, out)
        random_model.transformer.h[0].mlp.c_fc.weight.div_(3.0)
        assert torch.equal(random_model(idx), out)
    random_model.quantize("none")
    assert all(m.decode_w is None for m in linears)
    with torch.no_grad():
        assert torch.allclose(random_model(idx), ref, atol=1e-5)


def test_seeded_sampling_is_reproducible_within_a_format(random_model, restore):
    random_model.quantize("int8")
    runs = [random_model.generate([1, 2, 3], max_new_tokens=15, top_p=0.9, seed=7)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_bad_formats_and_combinations_raise(random_model, restore):
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        random_model.quantize("int3")
    random_model.quantize("bf16")
    with pytest.raises(ValueError, match="compile=True"):
        random_model.generate([1, 2], max_new_tokens=2, compile=True)


def test_load_model_quantize(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, device="cpu", quantize="int8")
    assert model.quantization == "int8"
    assert isinstance(model.lm_head.decode_w, quant.Int8Weight)
    with pytest.raises(ValueError, match="unknown weight format"):
        load_model(tiny_checkpoint, device="cpu", quantize="int3")


def test_cli_choices_match_the_formats():
    assert cli.QUANTIZE == quant.FORMATS
    for script in (generate_lm, evaluate_lm, serve_lm):  # all three take the common flag
        choices = script.build_parser()._option_string_actions["--quantize"].choices
        assert tuple(choices) == quant.FORMATS, script


def test_generate_cli_formats(tiny_checkpoint, tmp_path):
    base = ["--checkpoint", str(tiny_checkpoint), "--prompt", "Hello", "--max_new_tokens", "5",
            "--seed", "3"]
    cases = {
        "none": [*base, "--quantize", "none"],
        "plain": base,
        "int8": [*base, "--quantize", "int8"],
        "bf16 dtype": [*base, "--dtype", "bfloat16"],
        "bad": [*base, "--quantize", "int3"],
        "combo": [*base, "--quantize", "int8", "--dtype", "bfloat16"],
    }
    res = run_many(REPO / "generate_lm.py", cases, tmp_path)
    for name in ("none", "plain", "int8", "bf16 dtype"):
        assert res[name][0] == 0, res[name][2]
    assert res["none"][1] == res["plain"][1]  # --quantize none changes nothing
    assert "cpu, float32)" in res["none"][2]
    assert "cpu, int8 weights)" in res["int8"][2]
    assert "cpu, bf16 weights)" in res["bf16 dtype"][2]  # says what --dtype bfloat16 does here
    for name, needle, prefix in (("bad", "invalid choice: 'int3'", "generate_lm.py: error: "),
                                 ("combo", "drop --dtype bfloat16", "error: ")):
        code, out, err = res[name]
        assert code == 2 and out == "", (name, err)
        lines = err.strip().splitlines()
        assert lines == [lines[-1]] and lines[-1].startswith(prefix) and needle in err, err


def test_generate_cli_refuses_quantize_on_a_gpu(tiny_checkpoint, monkeypatch, capsys):
    import model.loading

    with pytest.raises(model.loading.LoadError) as info:
        model.loading.weight_format(torch.device("cuda"), "float32", "int8")
    assert "--quantize int8 is for CPU decoding" in str(info.value)
    monkeypatch.setattr(model.loading, "pick_device", lambda name: torch.device("cuda"))
    with pytest.raises(SystemExit) as exc:
        generate_lm.main(["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--quantize",
                          "int8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantize int8 is for CPU decoding" in err


def test_evaluate_cli(tiny_checkpoint, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Some text to evaluate, long enough for a few windows. " * 10)
    base = ["--checkpoint", str(tiny_checkpoint), "--file", str(text), "--json"]
    cases = {f: [*base, "--quantize", f] for f in quant.FORMATS}
    cases["text"] = [*base[:-1], "--quantize", "int8"]
    res = run_many(REPO / "evaluate_lm.py", cases, tmp_path)
    assert "weights:       int8 (--quantize)" in res["text"][1]
    reports = {f: json.loads(res[f][1]) for f in quant.FORMATS}
    assert [reports[f]["quantize"] for f in quant.FORMATS] == list(quant.FORMATS)
    ppl = reports["none"]["perplexity"]
    assert reports["int8"]["perplexity"] != ppl
    for f in ("bf16", "int8"):
        assert abs(reports[f]["perplexity"] / ppl - 1) < 0.01, reports[f]
    assert reports["int4"]["perplexity"] != ppl
    assert abs(reports["int4"]["perplexity"] / ppl - 1) < 0.1, reports["int4"]
    assert_usage_errors(REPO / "evaluate_lm.py", {
        "bad": ([*base, "--quantize", "int3"], "--quantize"),
        "combo": ([*base, "--quantize", "bf16", "--dtype", "bfloat16"], "drop --dtype"),
    }, tmp_path)


def test_evaluate_cli_refuses_quantize_on_a_gpu(tiny_checkpoint, monkeypatch, capsys):
    import model.checkpoint

    monkeypatch.setattr(model.checkpoint, "pick_device", lambda name: torch.device("cuda"))
    code = evaluate_lm.main(["--checkpoint", str(tiny_checkpoint), "--quantize", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--quantize int8 is for the CPU, but the device is cuda" in err


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_deepcopy_keeps_the_format(random_model, restore, fmt):
    """copy.deepcopy works after generation (oneDNN-packed copies cannot be copied: the copy
    remakes its own) and the copy decodes as the original does."""
    random_model.quantize(fmt)
    with two_threads():  # float32 packs its copies with oneDNN only on several threads
        want = random_model.generate([1, 2, 3], max_new_tokens=8, temperature=0)
        clone = copy.deepcopy(random_model)
        assert clone.quantization == fmt
        assert torch.equal(clone.generate([1, 2, 3], max_new_tokens=8, temperature=0), want)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_one_row_products_follow_the_bias_and_match_several_rows(fmt):
    """A decode step's one-row products take the bias inside the kernel (packed with the
    weight): an in-place change to the bias is seen, and a row gives what it gives among
    others (up to the per-row input quantization of int8)."""
    torch.manual_seed(0)
    lin = Linear(64, 48).eval()
    lin.decode_format = fmt
    x = torch.randn(4, 1, 64)
    tol = 1e-2 if fmt == "bf16" else 3e-2
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
        one, many = lin(x[:1]), lin(x)
        assert one.shape == (1, 1, 48) and many.shape == (4, 1, 48)
        assert rel_err(one, ref[:1]) < tol and rel_err(many, ref) < tol
        lin.bias.add_(5.0)
        assert rel_err(lin(x[:1]), ref[:1] + 5.0) < tol
        assert rel_err(lin(x), ref + 5.0) < tol
        lin.bias.sub_(5.0)
        assert rel_err(lin(x[:1]), ref[:1]) < tol
        assert rel_err(lin(x[:1].bfloat16()).float(), ref[:1]) < tol  # other input dtypes


@pytest.mark.parametrize("shape", [(300, 64), (50, 70), (7, 32)])
def test_int4_is_q4_0s_grid_and_the_kernel_computes_it(shape, monkeypatch):
    """int4 holds llama.cpp's Q4_0 values: per 32 inputs, d = (value of largest magnitude) / -8
    and q in [0, 15] with w ~= (q - 8) * d, within d / 2 of w (within d where +8 d is clamped
    to the grid's 7 d; the extreme value on q = 0); the
    packed kernel's product equals the exact one on that grid for inputs rounded to bf16, the
    fallback's for float32 inputs; odd widths and row counts are
    padded and sliced back."""
    out, inp = shape
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(4))
    w[0, :] = 0.0  # an all-zero row: d = 0, q = 8
    q, d = quant.quantize_int4(w)
    assert q.shape == (out, -(-inp // 32) * 32) and d.shape == (out, q.size(1) // 32)
    assert d.dtype == torch.bfloat16 and int(q.min()) >= 0 and int(q.max()) <= 15
    back = quant.dequantize_int4(q, d)[:, :inp]
    blocks = torch.nn.functional.pad(w, (0, q.size(1) - inp)).view(out, -1, 32)
    err, step = (back - w).abs(), d.float().abs().repeat_interleave(32, dim=1)[:, :inp]
    top = q[:, :inp] == 15  # +8 d is past the grid's top (7 d): off by up to d (and by 8 d's
    assert torch.all(err[~top] <= step[~top] / 2 + 1e-6)  # share of the bf16 rounding of d)
    assert torch.all(err <= step * (1 + 8 * 2**-8) + 1e-6)
    extreme = blocks.abs().argmax(-1)  # the block's largest magnitude maps to q = 0 (-8 d)
    assert torch.all(q.view(out, -1, 32).gather(-1, extreme[..., None])[d != 0] == 0)
    assert torch.all(back[0] == 0)
    x = torch.randn(3, inp, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(out)
    exact = torch.nn.functional.linear(x, back, bias)
    iw = quant.Int4Weight(w)
    if quant.int4_kernel_works():  # on inputs rounded to bf16 (2**-9 relative each)
        assert iw.kernel == "int4pack"
        assert 0 < rel_err(iw.linear(x, bias), exact) < 1e-2
        assert rel_err(iw.linear(x.bfloat16(), bias).float(), exact) < 2e-2
    monkeypatch.setattr(quant, "PACKED_KERNELS", False)
    slow = quant.Int4Weight(w)
    assert slow.kernel == "fallback" and rel_err(slow.linear(x, bias), exact) < 1e-5
    assert slow.linear(x[:, None, :]).shape == (3, 1, out)
