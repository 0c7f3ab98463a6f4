"""Token probabilities where users see them: generate_lm.py --show_probs/--json, the REPL's
/probs, /score and /set color (real processes), and the HTML/text probability view."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pexpect
import pytest
import torch
from test_generate_cli import PARSER_ERROR, SCRIPT, assert_usage_error, run_cli, run_many
from test_repl import PROMPT, _command, _env, _exit_status

from model.checkpoint import load_model
from model.probview import ProbabilityView, TokenProb
from model.scoring import score
from model.tokenizer import load_tokenizer

ROW = re.compile(r"^\s*(\d+)\s+(\".*?\")\s+(\S+%)\s+(\S+%)\s+(\d+)\s+(.*)$")  # a generation row


@pytest.fixture(scope="module")
def endless_model(endless_checkpoint):
    tok = load_tokenizer("gpt2")
    model, _ = load_model(endless_checkpoint, device="cpu", tokenizer=tok)
    return model, tok


def test_show_probs_table_on_stderr_and_json(endless_checkpoint, endless_model, tmp_path):
    common = ["--checkpoint", str(endless_checkpoint), "--prompt", "Once upon", "--seed", "3",
              "--max_new_tokens", "6", "--temperature", "0.9", "--top_k", "50"]
    plain, probs, js, whole = run_many(
        [common, [*common, "--show_probs", "3"], [*common, "--json"],
         [*common, "--show_probs", "3", "--no_stream"]], cwd=tmp_path)
    assert plain.returncode == probs.returncode == js.returncode == whole.returncode == 0
    assert probs.stdout == plain.stdout  # the table goes to stderr: piped text stays clean
    assert (whole.stdout, whole.stderr) == (probs.stdout, probs.stderr)  # streamed or not
    rows = [ROW.match(line) for line in probs.stderr.splitlines()]
    rows = [m for m in rows if m]
    assert [int(m[1]) for m in rows] == [1, 2, 3, 4, 5, 6], probs.stderr
    assert all(m[6].count("%") == 3 for m in rows)  # K = 3 alternatives

    record = json.loads(js.stdout)
    assert plain.stdout == "Once upon" + record["text"] + "\n"
    assert record["new_tokens"] == 6 and record["finish_reason"] == "length"
    assert record["seed"] == 3 and record["timing"]["seconds"] > 0
    tokens = record["tokens"]
    assert len(tokens) == 6 and all(len(t["top"]) == 5 for t in tokens)  # default K for JSON
    # The logged raw log-probabilities are the model's: re-scoring the sequence gives them.
    model, tok = endless_model
    ids = tok.encode("Once upon") + [t["id"] for t in tokens]
    s = score(model, ids, top_k=5)
    expected = s.logprobs[-6:].tolist()
    assert [t["logprob"] for t in tokens] == pytest.approx(expected, abs=1e-4)
    assert [t["rank"] for t in tokens] == s.ranks[-6:].tolist()
    for row, t in zip(rows, tokens, strict=True):  # the table shows the same numbers
        assert row[2] == json.dumps(t["text"], ensure_ascii=False)
        assert float(row[3].rstrip("%")) == pytest.approx(100 * 2.718281828 ** t["logprob"],
                                                          rel=0.06)
    # Top-k 50 at temperature 0.9: the sampling distribution puts more mass on each token.
    assert all(t["sampled_logprob"] > t["logprob"] for t in tokens)


@pytest.mark.parametrize("args, needles, prefix", [
    (["--show_probs", "-1"], ["--show_probs", ">= 0"], PARSER_ERROR),
    (["--show_probs", "many"], ["--show_probs", "integer"], PARSER_ERROR),
    (["--json", "--interactive"], ["--json"], "error: "),
])
def test_bad_probability_flags(args, needles, prefix, tiny_checkpoint):
    if "--interactive" not in args:
        args = [*args, "--prompt", "x"]
    assert_usage_error(run_cli("--checkpoint", str(tiny_checkpoint), *args), *needles,
                       prefix=prefix)


def _spawn(checkpoint, tmp_path, *args: str, no_color: bool = True) -> pexpect.spawn:
    env = _env(tmp_path)
    if not no_color:
        del env["NO_COLOR"]
    child = pexpect.spawn(sys.executable, [str(SCRIPT), "--checkpoint", str(checkpoint),
                                           "--interactive", *args],
                          env=env, cwd=str(tmp_path), timeout=60, encoding="utf-8",
                          codec_errors="replace", dimensions=(40, 200))
    child.expect_exact(PROMPT)
    return child


def test_repl_probs_score_and_color(endless_checkpoint, tmp_path):
    child = _spawn(endless_checkpoint, tmp_path, "--max_new_tokens", "4", "--seed", "1",
                   "--show_probs", "2")
    assert "no answer yet" in _command(child, "/probs")
    assert "/score TEXT" in _command(child, "/help")
    answer = _command(child, "Hello there")
    assert answer.startswith("Hello there")
    table = _command(child, "/probs")
    rows = [m for m in map(ROW.match, table.splitlines()) if m]
    assert [int(m[1]) for m in rows] == [1, 2, 3, 4] and all(m[6].count("%") == 2 for m in rows)

    scored = _command(child, "/score To be, or not to be")
    assert re.search(r"6 tokens scored: loss \d+\.\d+ nats, perplexity \d+", scored)
    assert re.search(r'\n1\s+"To"\s+-\s+-\n', scored) and '" be"' in scored
    assert "usage: /score TEXT" in _command(child, "/score   ")
    assert "at least 2 tokens" in _command(child, "/score To")
    assert "color stays off: NO_COLOR is set" in _command(child, "/set color on")
    assert "color must be on or off" in _command(child, "/set color purple")
    child.sendeof()
    assert _exit_status(child) == 0

    child = _spawn(endless_checkpoint, tmp_path, "--max_new_tokens", "4", "--seed", "1",
                   no_color=False)
    assert "color = on" in _command(child, "/set color on")
    assert re.search(r"\ncolor\s+on\n", _command(child, "/show"))
    coloured = _command(child, "Hello there")
    assert re.search(r"\x1b\[3[123]m", coloured)
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == answer  # same text, only coloured
    assert "color = off" in _command(child, "/set color off")
    assert "\x1b[3" not in _command(child, "Hello there").replace(answer, "")
    child.sendeof()
    assert _exit_status(child) == 0


def test_repl_color_is_refused_when_not_a_terminal(tiny_checkpoint, tmp_path):
    env = {k: v for k, v in _env(tmp_path).items() if k != "NO_COLOR"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(tiny_checkpoint),
                           "--interactive", "--max_new_tokens", "3"],
                          input=b"/set color on\nHi\n/probs\n", capture_output=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "color stays off: this is not a terminal" in proc.stderr.decode()
    assert "\x1b[" not in proc.stdout.decode() and "rank" in proc.stdout.decode()


class _Spans(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict] = []
        self.tags: set[str] = set()
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "span" and ("class", "lm-tok") in attrs:
            self._open = dict(attrs, text="")
            self.spans.append(self._open)

    def handle_endtag(self, tag):
        if tag == "span":
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data


def test_html_view_colours_tokens_and_lists_alternatives():
    tokens = [TokenProb(0, "<b>", None, None),
              TokenProb(1, " likely", -0.1, 1, [(1, " likely", -0.1), (2, " other", -2.5)]),
              TokenProb(2, " & rare", -12.0, 40, [(1, " likely", -0.3)])]
    view = ProbabilityView(tokens, title="a title")
    page = _Spans()
    page.feed(view._repr_html_())
    assert "script" not in page.tags
    assert [s["text"] for s in page.spans] == ["<b>", " likely", " & rare"]  # escaped, intact
    first, likely, rare = page.spans
    assert "no score" in first["title"] and "background" not in first["style"]
    assert '" other" 8.2%' in likely["title"] and "rank 1" in likely["title"]
    assert "rank 40" in rare["title"] and '" likely" 74.1%' in rare["title"]
    hue = [int(re.search(r"hsl\((\d+),", s["style"])[1]) for s in (likely, rare)]
    assert hue == [119, 0]  # green for 90%, red for 0.0006% (log scale)
    text = repr(view)
    assert text.splitlines()[0] == "a title"
    assert re.search(r'2\s+" likely"\s+90\.5%\s+1\s+" likely" 90\.5%, " other" 8\.2%', text)
    assert view.table(1).count("%") == 2 + 2 + 0  # k=1: one alternative per scored row


def test_views_from_score_and_generate(endless_model):
    model, tok = endless_model
    s = score(model, "To be, or not to be", top_k=3)
    view = s.view(tok)
    assert len(view.tokens) == 7 and view.tokens[0].logprob is None
    assert view.tokens[1].logprob == pytest.approx(float(s.logprobs[1]))
    assert f"perplexity {s.perplexity:.2f}" in repr(view)
    ids, lp = model.generate([[1, 2], [3, 4, 5]], max_length=6, seed=0, return_logprobs=True)
    v0, v1 = lp.view(tok, row=0), lp.view(tok, row=1)
    assert len(v0.tokens) == 4 and len(v1.tokens) == 3  # row 1's padding step is dropped
    assert [t.id for t in v1.tokens] == ids[1, 3:].tolist()
    assert torch.isfinite(torch.tensor([t.sampled_logprob for t in v0.tokens])).all()
