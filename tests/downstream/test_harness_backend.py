"""Downstream evaluation through lm-evaluation-harness (downstream/, evaluate_lm.py --tasks).

The reference is the harness's own `hf` backend scoring the `convert.py --to_hf` export of the
same tiny random model: per-example log-likelihoods within 1e-4, the same greedy flags, the same
generations, identical metrics. Tasks are written here, in the harness's format (YAML + local
JSONL), so nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # the harness's hf backend needs it

import convert  # noqa: E402
import evaluate_lm  # noqa: E402
from downstream import scoring  # noqa: E402
from downstream.harness import SmallLM  # noqa: E402
from downstream.tasks import flat_metrics, load_tasks, run_tasks  # noqa: E402
from model.lm import LanguageModel  # noqa: E402

SEQ = 48
WORDS = ("the cat sat on a mat while dogs ran far away from home and birds sang in trees "
         "under grey skies").split()

pytestmark = pytest.mark.usefixtures("one_thread")


def _words(rnd: random.Random, lo: int, hi: int) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(lo, hi)))


def _yaml(folder: Path, name: str, data: str, body: str) -> None:
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / data}\ntest_split: test\n{body}", encoding="utf-8")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _hf_greedy(hf, tokenizer, text: str, new: int, stop: str) -> str:
    ids = torch.tensor([tokenizer.encode(text)])
    out = hf.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=50256)
    return tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True).split(stop)[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, its Hugging Face export, and three tasks: multiple choice (some contexts
    longer than the model's context), rolling log-likelihood (texts over several windows) and
    generation with exact match (half the targets are the reference's own greedy answers)."""
    from transformers import AutoModelForCausalLM

    from model.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("downstream")
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=50257, d_model=32, num_heads=2, num_layers=2, d_ff=64,
                          max_seq_len=SEQ, dropout=0.0)
    ckpt = root / "tiny.pt"
    torch.save({"model_config": model.config.to_dict(), "model_state_dict": model.state_dict(),
                "tokenizer": "gpt2"}, ckpt)
    convert.to_hf(ckpt, root / "hf")
    hf = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    tok = load_tokenizer()
    tasks = root / "tasks"
    tasks.mkdir()
    rnd = random.Random(0)
    _jsonl(tasks / "mc.jsonl", [
        {"question": _words(rnd, 3, 60 if i % 4 == 0 else 25),
         "choices": [_words(rnd, 1, 6) for _ in range(4)], "label": i % 4} for i in range(16)])
    _yaml(tasks, "t_mc", "mc.jsonl", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
          'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n'
          "  - metric: acc\n  - metric: acc_norm\n")
    _jsonl(tasks / "roll.jsonl", [{"text": _words(rnd, 5, 110)} for _ in range(6)])
    _yaml(tasks, "t_roll", "roll.jsonl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
          'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
          "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    with torch.no_grad():
        prompts = [_words(rnd, 3, 25) for _ in range(6)]
        answers = [_hf_greedy(hf, tok, p, 8, " on") if i % 2 == 0 else "zzz"
                   for i, p in enumerate(prompts)]
    _jsonl(tasks / "gen.jsonl", [{"q": p, "a": a} for p, a in zip(prompts, answers, strict=True)])
    _yaml(tasks, "t_gen", "gen.jsonl", 'output_type: generate_until\ndoc_to_text: "{{q}}"\n'
          'doc_to_target: "{{a}}"\ngeneration_kwargs:\n  until: [" on"]\n  max_gen_toks: 8\n'
          "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    names = ["t_mc", "t_roll", "t_gen"]
    loaded = load_tasks(names, include_path=tasks)
    ours = SmallLM(checkpoint=str(ckpt), batch_size=4)
    results = run_tasks(ours, loaded, log_samples=True)
    from lm_eval import simple_evaluate

    reference = simple_evaluate(model="hf", model_args=f"pretrained={root / 'hf'}", tasks=names,
                                task_manager=loaded.manager, log_samples=True, batch_size=4,
                                device="cpu")
    return {"root": root, "ckpt": ckpt, "tasks": tasks, "model": model, "ours": ours,
            "results": results, "reference": reference, "answers": answers}


def _local_tasks_only(monkeypatch) -> None:
    """Index the task folder alone: the harness's hundreds of built-in tasks take 15 s to index
    on a busy 2-core CPU, and no test here uses them."""
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))


def _responses(results: dict, task: str) -> list:
    return [[r[0] for r in s["resps"]] for s in results["samples"][task]]


def _metrics(results: dict, task: str) -> dict:
    return {k: v for k, v in results["results"][task].items() if "," in k}


def test_multiple_choice_equals_the_hf_backend(setup):
    ours, ref = _responses(setup["results"], "t_mc"), _responses(setup["reference"], "t_mc")
    assert len(ours) == len(ref) == 16
    for a, b in zip(ours, ref, strict=True):
        assert [g for _, g in a] == [g for _, g in b]
        assert max(abs(x - y) for (x, _), (y, _) in zip(a, b, strict=True)) < 1e-4
    assert _metrics(setup["results"], "t_mc") == _metrics(setup["reference"], "t_mc")
    assert setup["ours"].stats.truncated > 0  # long questions were cut as the hf backend cuts


def test_rolling_loglikelihood_equals_the_hf_backend(setup):
    ours, ref = _responses(setup["results"], "t_roll"), _responses(setup["reference"], "t_roll")
    assert max(abs(a[0] - b[0]) for a, b in zip(ours, ref, strict=True)) < 1e-4
    for key, value in _metrics(setup["reference"], "t_roll").items():
        mine = _metrics(setup["results"], "t_roll")[key]
        assert mine == value if isinstance(value, str) else mine == pytest.approx(value, 1e-6)
    lengths = [len(setup["ours"].tok_encode(s["doc"]["text"]))
               for s in setup["results"]["samples"]["t_roll"]]
    assert max(lengths) > 2 * SEQ  # some text spans three windows or more


def test_generation_equals_the_hf_backend(setup):
    ours, ref = _responses(setup["results"], "t_gen"), _responses(setup["reference"], "t_gen")
    assert ours == ref
    assert [r[0] for r in ours[::2]] == setup["answers"][::2]
    assert _metrics(setup["results"], "t_gen")["exact_match,none"] == 0.5
    assert _metrics(setup["reference"], "t_gen")["exact_match,none"] == 0.5


def test_flat_metrics_names(setup):
    flat = flat_metrics(setup["results"])
    assert set(flat) >= {"t_mc/acc", "t_mc/acc_norm", "t_roll/word_perplexity",
                         "t_gen/exact_match"}
    assert not any("stderr" in k for k in flat)


def test_prefix_sharing_equals_each_ending_alone(setup):
    """Endings scored together with their context computed once give what each gives alone,
    and what one plain forward pass over context + ending gives."""
    model = setup["model"]
    rnd = random.Random(1)
    pairs = []
    for _ in range(5):
        context = [rnd.randrange(50257) for _ in range(rnd.randint(1, 30))]
        for _ in range(4):
            pairs.append((context, [rnd.randrange(50257) for _ in range(rnd.randint(1, 12))]))
    stats = scoring.ScoringStats()
    together = scoring.loglikelihoods(model, pairs, batch_size=3, stats=stats)
    assert stats.rows == 5  # one row per context
    alone = [scoring.loglikelihoods(model, [p], batch_size=1)[0] for p in pairs]
    with torch.no_grad():
        for (ctx, end), (lp, greedy), (lp1, greedy1) in zip(pairs, together, alone, strict=True):
            ids = torch.tensor([ctx + end])
            logprobs = torch.log_softmax(model(ids[:, :-1])[0].float(), dim=-1)
            targets = ids[0, len(ctx):]
            picked = logprobs[len(ctx) - 1:].gather(1, targets[:, None])
            assert lp == pytest.approx(float(picked.sum()), abs=1e-4)
            assert lp == pytest.approx(lp1, abs=1e-5) and greedy == greedy1
            assert greedy == bool((logprobs[len(ctx) - 1:].argmax(-1) == targets).all())


@pytest.mark.parametrize("stride", [SEQ, 20, 1])
def test_rolling_windows_are_the_harness_windows(stride):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(1, 131))
    expected = [tuple(map(list, make_disjoint_window(w))) for w in get_rolling_token_windows(
        tokens, prefix_token=0, max_seq_len=SEQ, context_len=SEQ - stride + 1)]
    got = scoring.rolling_pairs(tokens, 0, SEQ, stride)
    assert [tuple(p) for p in got] == expected
    assert sum((end for _, end in got), []) == tokens


def test_the_model_is_registered_with_the_harness(setup, capsys, monkeypatch):
    from lm_eval.api.registry import get_model

    from downstream import cli

    _local_tasks_only(monkeypatch)
    assert get_model("small-lm") is SmallLM
    assert cli.main(["--model", "small-lm", "--model_args", f"checkpoint={setup['ckpt']}",
                     "--tasks", "t_mc", "--include_path", str(setup["tasks"]),
                     "--limit", "4"]) == 0
    assert "|t_mc " in capsys.readouterr().out
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(evaluate_lm.__file__).parent / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["small-lm-eval"] == "downstream.cli:main"
    assert project["project"]["entry-points"]["lm_eval.models"]["small-lm"] == \
        "downstream.harness:SmallLM"


def test_evaluate_cli_writes_the_table_and_the_json(setup, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = evaluate_lm.main(["--checkpoint", str(setup["ckpt"]), "--tasks", "t_mc",
                             "--include_path", str(setup["tasks"]), "--limit", "8",
                             "--output_path", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert "acc_norm" in captured.out and "|t_mc " in captured.out
    assert "note: " in captured.err and "cut on the left" in captured.err
    saved = json.loads(out.read_text())
    assert saved["results"]["t_mc"]["sample_len"] == 8
    assert saved["small_lm"]["scoring"]["truncated"] > 0


@pytest.mark.parametrize("case, message", [
    ("unknown", "unknown task 'no_such_task'"),
    ("malformed", "broken.yaml is not a valid task file at line 3"),
    ("missing", "a data file is missing"),
    ("limit", "--limit must be"),
    ("no_tasks", "--limit go with --tasks"),
])
def test_bad_inputs_are_one_line_exit_2(setup, tmp_path, capsys, monkeypatch, case, message):
    _local_tasks_only(monkeypatch)
    argv = ["--checkpoint", str(setup["ckpt"])]
    if case == "unknown":
        argv += ["--tasks", "no_such_task", "--include_path", str(setup["tasks"])]
    elif case == "malformed":
        (tmp_path / "broken.yaml").write_text("task: broken\ndataset_path: json\n  bad: [x\n")
        argv += ["--tasks", "broken", "--include_path", str(tmp_path)]
    elif case == "missing":
        _yaml(tmp_path, "gone", "gone.jsonl", "output_type: loglikelihood\n")
        argv += ["--tasks", "gone", "--include_path", str(tmp_path)]
    elif case == "limit":
        argv += ["--tasks", "t_mc", "--limit", "1.5"]
    else:
        argv += ["--limit", "3"]
    assert evaluate_lm.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("evaluate_lm.py: error: ") and message in err


def test_missing_harness_names_the_pip_command(monkeypatch):
    import importlib.util

    from downstream import harness

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(harness.HarnessMissingError, match=r'pip install "lm-eval==0\.4\.13"'):
        harness.require_lm_eval()


@pytest.mark.parametrize("token_ids", [True, False])
def test_the_server_route_equals_in_process(setup, server, token_ids):
    """The harness's own `local-completions` backend against a real serve_lm.py gives what
    `small-lm` gives in-process, with token-id prompts and with text prompts. The harness keeps
    one token of `max_length` for the token it asks the server to generate and cuts prompts to
    `max_length - 1`, so `max_length=SEQ` there is `max_length=SEQ - 2` here."""
    from lm_eval import simple_evaluate

    from downstream.tasks import load_tasks

    tasks = load_tasks(["t_mc", "t_roll", "t_gen"], include_path=setup["tasks"])
    ours = run_tasks(SmallLM(checkpoint=str(setup["ckpt"]), max_length=SEQ - 2), tasks,
                     limit=6, log_samples=True)
    served = simple_evaluate(
        model="local-completions", tasks=list(tasks.items), task_manager=tasks.manager, limit=6,
        log_samples=True, model_args=(
            f"base_url={server.url}/v1/completions,model=tiny,tokenizer={setup['root'] / 'hf'},"
            f"tokenizer_backend=huggingface,tokenized_requests={token_ids},max_length={SEQ}"))
    for task in ("t_mc", "t_roll"):
        a, b = _responses(ours, task), _responses(served, task)
        flat_a = [x if isinstance(x, float) else x[0] for r in a for x in r]
        flat_b = [x if isinstance(x, float) else x[0] for r in b for x in r]
        assert flat_a == pytest.approx(flat_b, abs=1e-4)
    assert flat_metrics(ours) == pytest.approx(flat_metrics(served), rel=1e-6)
    assert _responses(ours, "t_gen") == _responses(served, "t_gen")
    assert _metrics(ours, "t_mc") == _metrics(served, "t_mc")


@pytest.fixture(scope="module")
def server(setup):
    pytest.importorskip("tenacity")  # the harness's API backends need it (lm-eval[api])
    from serving import ServerProcess

    proc = ServerProcess("--checkpoint", str(setup["ckpt"]), "--model_name", "tiny")
    yield proc
    proc.stop()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_logprobs_equal_log_softmax_and_argmax(dtype):
    """The sliced log-softmax of the scorer: each target's log-probability and whether it is
    the argmax, as `log_softmax` and `argmax` give them, the logits left as they were."""
    from downstream.scoring import target_logprobs

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(70, 501, generator=g)).to(dtype)
    targets = torch.randint(0, 501, (70,), generator=g)
    targets[::3] = logits[::3].argmax(dim=-1)  # some targets are the argmax
    before = logits.clone()
    chosen, is_top = target_logprobs(logits, targets, rows=16)
    ref = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    assert torch.equal(logits, before)
    assert torch.allclose(chosen, ref, atol=1e-5)
    assert torch.equal(is_top, logits.argmax(dim=-1) == targets)
    assert is_top.sum() >= 70 // 3
