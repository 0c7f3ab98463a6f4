"""The tokenizer travels with the model: data prepared with a tokenizer other than GPT-2's
trains a model whose snapshots carry that tokenizer, so generation, serving, evaluation and
`load_model` use it with no `--tokenizer` flag, even after its folder is gone; converted
checkpoints keep a Hugging Face folder's tokenizer and `--to_hf` writes it back.

Everything is offline: the tokenizer is a small byte-level BPE trained here on a few KB of text
by `train_tokenizer.py`, so this is also that command's end-to-end test (prepare, train,
generate, serve, evaluate, GGUF in llama.cpp).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from serving import ServerProcess
from text_cases import hard_texts
from train_helpers import write_text

import convert
import evaluate_lm
import generate_lm
import prepare_data
import train_tokenizer
from corpus.shards import open_split, read_manifest
from model.checkpoint import load_model, read_checkpoint
from model.loading import load_for_inference
from model.tokenizer import (
    FILES_KEY,
    SHA256_KEY,
    load_checkpoint_tokenizer,
    tokenizer_record,
    tokenizer_source,
    write_checkpoint_tokenizer,
)
from training import train_lm

MODEL = ["--d_model", "32", "--num_heads", "2", "--num_layers", "2", "--d_ff", "64",
         "--max_seq_len", "32", "--batch_size", "4", "--eval_windows", "4", "--warmup_steps", "2",
         "--lr", "3e-3", "--dropout", "0", "--no_plot", "--max_steps", "4", "--log_interval", "1"]
END = "<|endoftext|>"


def make_tokenizer(folder: Path, text: str, vocab_size: int = 300) -> Path:
    """A byte-level BPE trained on `text` by `train_tokenizer.py`; its end token is id 0 (GPT-2's
    is 50256)."""
    source = folder.parent / f"{folder.name}-text.txt"
    source.write_text(text, encoding="utf-8")
    assert train_tokenizer.main([str(source), "--vocab_size", str(vocab_size), "--out",
                                 str(folder), "--no_progress"]) == 0
    return folder


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A tokenizer folder, shards prepared with it, a short run on them, and a GPT-2 shard folder;
    the tokenizer's folder is then moved away (the run must not need it)."""
    root = tmp_path_factory.mktemp("own")
    text = write_text(root / "text.txt", 4000, seed=3)
    folder = make_tokenizer(root / "my-tok", text.read_text())
    lines = text.read_text().splitlines()
    docs = root / "docs.txt"  # documents of 4 lines, separated by blank lines
    docs.write_text("\n\n".join("\n".join(lines[i:i + 4]) for i in range(0, len(lines), 4)))
    for name, tok in (("data", str(folder)), ("gpt2-data", "gpt2")):
        assert prepare_data.main([str(docs), "--out", str(root / name), "--tokenizer", tok,
                                  "--val_fraction", "0.1", "--docs", "blank_lines", "--no_progress",
                                  "--num_proc", "1"]) == 0
    assert train_lm.main(["--data", str(root / "data"), "--out_dir", str(root / "run"),
                          *MODEL]) == 0
    keep = root / "kept-tok"
    shutil.copytree(folder, keep)
    shutil.rmtree(folder)  # as on another machine: only the snapshot holds the tokenizer
    from transformers import AutoTokenizer

    return dict(root=root, run=root / "run", data=root / "data", gpt2_data=root / "gpt2-data",
                folder=folder, tok=AutoTokenizer.from_pretrained(str(keep)), text=text)


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_prepared_shards_pin_the_tokenizer(own):
    manifest = read_manifest(own["data"])
    record = manifest["tokenizer"]
    assert record["vocab_size"] == len(own["tok"]) == 300 and record["eot_id"] == 0
    ids = open_split(own["data"], "train", manifest)
    assert int(max(ids)) < 300
    snap = torch.load(own["run"] / "snapshots" / "latest.pt", weights_only=True)
    assert snap["model_config"]["vocab_size"] == 300
    assert set(snap[FILES_KEY]) >= {"tokenizer.json", "tokenizer_config.json"}
    assert snap[SHA256_KEY] == record["files_sha256"]  # the run carries the data's tokenizer


def test_generate_with_no_tokenizer_flag(own, capsys):
    prompt = "The king hath"
    code = generate_lm.main(["--checkpoint", str(own["run"]), "--prompt", prompt,
                             "--max_new_tokens", "12", "--seed", "0", "--json", "--device",
                             "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    rec = json.loads(out.strip().splitlines()[-1])
    tok = own["tok"]
    assert rec["prompt_tokens"] == len(tok.encode(prompt))
    ids = [t["id"] for t in rec["tokens"]]
    assert all(0 <= i < 300 for i in ids)
    assert rec["text"] == tok.decode([i for i in ids if i != tok.eos_token_id])
    if rec["finish_reason"] == "stop":  # ended by this tokenizer's end token (id 0)
        assert ids[-1] == 0


def test_load_model_in_a_notebook_finds_the_tokenizer(own):
    model, ckpt = load_model(own["run"], device="cpu")
    assert model.tokenizer is not None and len(model.tokenizer) == 300
    assert model.end_token == own["tok"].eos_token_id == 0
    assert model.tokenizer.encode("the king") == own["tok"].encode("the king")
    out = model.generate("the king", max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= len(own["tok"].encode("the king")) + 5
    loaded = load_for_inference(own["run"], device="cpu")
    assert loaded.tokenizer_name.endswith("(stored in the checkpoint)")
    assert str(own["folder"]) in loaded.tokenizer_name


def test_evaluate_with_no_tokenizer_flag(own, capsys):
    code = evaluate_lm.main(["--checkpoint", str(own["run"]), "--data", str(own["data"]),
                             "--json", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    assert report["num_tokens"] == len(open_split(own["data"], "val"))
    text = own["root"] / "eval.txt"
    write_text(text, 200, seed=9)
    code = evaluate_lm.main(["--checkpoint", str(own["run"]), "--file", str(text), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["num_tokens"] == len(own["tok"].encode(text.read_text()))
    # The GPT-2 shards are refused: their ids are another tokenizer's.
    code = evaluate_lm.main(["--checkpoint", str(own["run"]), "--data", str(own["gpt2_data"])])
    assert "was prepared with tokenizer 'gpt2'" in _one_line_error(capsys, code)


def test_serve_with_no_tokenizer_flag(own):
    model, _ = load_model(own["run"], device="cpu")
    tok = own["tok"]
    prompt = "The queen"
    ids = torch.tensor([tok.encode(prompt)])
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    server = ServerProcess("--checkpoint", str(own["run"]), "--device", "cpu")
    try:
        name = httpx.get(server.url + "/v1/models", timeout=60).json()["data"][0]["id"]
        resp = httpx.post(server.url + "/v1/completions", timeout=60,
                          json={"model": name, "prompt": prompt, "max_tokens": 6,
                                "temperature": 0})
    finally:
        server.stop()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["usage"]["prompt_tokens"] == ids.shape[1]
    expected = greedy[:greedy.index(0)] if 0 in greedy else greedy
    assert body["choices"][0]["text"] == tok.decode(expected)
    assert body["choices"][0]["finish_reason"] == ("stop" if 0 in greedy else "length")


def test_shards_of_another_tokenizer_are_refused(own, capsys):
    run = own["root"] / "refused"
    # --tokenizer given: the GPT-2 shards do not match it.
    kept = str(own["root"] / "kept-tok")
    code = train_lm.main(["--data", str(own["gpt2_data"]), "--tokenizer", kept, "--out_dir",
                          str(run), *MODEL])
    assert "was prepared with tokenizer 'gpt2'" in _one_line_error(capsys, code)
    # --init_from a model with its own tokenizer: GPT-2's shards are refused too.
    code = train_lm.main(["--init_from", str(own["run"] / "snapshots" / "latest.pt"), "--data",
                          str(own["gpt2_data"]), "--out_dir", str(run), "--max_steps", "1"])
    assert "was prepared with tokenizer 'gpt2'" in _one_line_error(capsys, code)
    assert not run.exists()
    # ... and its own shards are accepted, its snapshot carrying the same tokenizer.
    code = train_lm.main(["--init_from", str(own["run"] / "snapshots" / "latest.pt"), "--data",
                          str(own["data"]), "--out_dir", str(run), "--max_steps", "1",
                          "--batch_size", "4", "--eval_windows", "4", "--no_plot"])
    assert code == 0, capsys.readouterr().err
    snap = torch.load(run / "snapshots" / "latest.pt", weights_only=True)
    first = torch.load(own["run"] / "snapshots" / "latest.pt", weights_only=True)
    assert snap[SHA256_KEY] == first[SHA256_KEY] and snap[FILES_KEY] == first[FILES_KEY]


def _exit_code(main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def _with_tokenizer(own, path: Path, **changes) -> Path:
    ckpt = torch.load(own["run"] / "snapshots" / "latest.pt", weights_only=True)
    ckpt = {k: ckpt[k] for k in ("model_config", "model_state_dict", "tokenizer", FILES_KEY,
                                 SHA256_KEY)}
    ckpt.update(changes)
    torch.save(ckpt, path)
    return path


def test_bad_tokenizers_are_one_line_errors_and_write_nothing(own, capsys, tmp_path):
    snap = torch.load(own["run"] / "snapshots" / "latest.pt", weights_only=True)
    files = dict(snap[FILES_KEY])
    missing = _with_tokenizer(own, tmp_path / "missing.pt", **{
        FILES_KEY: {k: v for k, v in files.items() if k != "tokenizer.json"}})
    damaged = _with_tokenizer(own, tmp_path / "damaged.pt", **{SHA256_KEY: "0" * 64})
    small = _smaller_vocab(snap, vocab_size=100)
    too_big = _with_tokenizer(own, tmp_path / "too-big.pt", **small)
    gone = _with_tokenizer(own, tmp_path / "gone.pt", tokenizer=str(tmp_path / "no-such"),
                           **{FILES_KEY: None, SHA256_KEY: None})
    cases = [(missing, "tokenizer files are incomplete (tokenizer.json is missing"),
             (damaged, "does not match its recorded hash"),
             (too_big, "has vocab_size 100 but tokenizer"),
             (gone, "could not load tokenizer")]
    for path, expect in cases:
        code = _exit_code(generate_lm.main, ["--checkpoint", str(path), "--prompt", "the"])
        assert expect in _one_line_error(capsys, code), path
        code = evaluate_lm.main(["--checkpoint", str(path), "--file", str(own["text"])])
        assert expect in _one_line_error(capsys, code), path
        out = tmp_path / f"hf-{path.stem}"
        code = convert.main(["--to_hf", str(out), "--checkpoint", str(path)])
        assert expect in _one_line_error(capsys, code), path
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()
                                           if p.name.startswith(".")) == []


def _smaller_vocab(snap: dict, vocab_size: int) -> dict:
    """A model_config and state dict like the run's, with a smaller vocabulary."""
    from model.lm import LanguageModel

    cfg = {**snap["model_config"], "vocab_size": vocab_size}
    return {"model_config": cfg, "model_state_dict": LanguageModel.from_config(cfg).state_dict()}


def test_old_checkpoints_load_as_before(own, tmp_path):
    kept = own["root"] / "kept-tok"
    named = _with_tokenizer(own, tmp_path / "named.pt", tokenizer=str(kept),
                            **{FILES_KEY: None, SHA256_KEY: None})
    ckpt = torch.load(named, weights_only=True)
    del ckpt[FILES_KEY], ckpt[SHA256_KEY]
    torch.save(ckpt, named)
    loaded = load_for_inference(named, device="cpu")
    assert loaded.tokenizer_name == str(kept) and len(loaded.tokenizer) == 300
    model, _ = load_model(named, device="cpu")  # a named tokenizer is not attached, as before
    assert model.tokenizer is None and model.end_token is None
    assert tokenizer_source(read_checkpoint(named)) == str(kept)
    assert tokenizer_record("gpt2") == {"tokenizer": "gpt2"}


def test_tokenizer_source_and_files_of_a_moved_checkpoint(own, tmp_path):
    ckpt = read_checkpoint(own["run"])
    src = tokenizer_source(ckpt)  # the recorded folder is gone: a folder of the stored files
    assert src != str(own["folder"]) and Path(src).is_dir()
    assert tokenizer_source(ckpt) == src  # reused
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(src).encode("the crown") == own["tok"].encode("the crown")
    out = write_checkpoint_tokenizer(ckpt, tmp_path / "files")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == ckpt[FILES_KEY]
    assert load_checkpoint_tokenizer(ckpt) is load_checkpoint_tokenizer(ckpt)  # loaded once


def _tiny_llama_folder(folder: Path, tok_folder: Path, vocab_size: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tok_folder)).save_pretrained(str(folder))
    return folder


def test_convert_keeps_a_hugging_face_folders_tokenizer(own, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kept = own["root"] / "kept-tok"
    hf_dir = _tiny_llama_folder(tmp_path / "tiny-llama", kept, vocab_size=320)  # padded vocab
    out = tmp_path / "llama.pt"
    assert convert.main(["--from_hf", str(hf_dir), "--out", str(out)]) == 0
    moved = tmp_path / "moved"
    hf_dir.rename(moved)  # the checkpoint alone holds the tokenizer now
    model, ckpt = load_model(out, device="cpu")
    assert ckpt["tokenizer"] == str(hf_dir) and model.end_token == 0
    assert model.tokenizer.encode("the sword") == own["tok"].encode("the sword")
    code = generate_lm.main(["--checkpoint", str(out), "--prompt", "the", "--max_new_tokens",
                             "3", "--seed", "0", "--json"])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and rec["prompt_tokens"] == len(own["tok"].encode("the"))
    back = tmp_path / "back"
    assert convert.main(["--to_hf", str(back), "--checkpoint", str(out)]) == 0
    assert (back / "tokenizer.json").read_bytes() == (moved / "tokenizer.json").read_bytes()
    again = AutoTokenizer.from_pretrained(str(back))
    assert again.encode("the king's crown") == own["tok"].encode("the king's crown")
    hf = AutoModelForCausalLM.from_pretrained(str(back))
    assert hf.config.eos_token_id == 0 and hf.generation_config.eos_token_id == 0
    # A tokenizer with more tokens than the model's vocabulary is refused, nothing written.
    small = _tiny_llama_folder(tmp_path / "small-vocab", kept, vocab_size=200)
    capsys.readouterr()
    code = convert.main(["--from_hf", str(small), "--out", str(tmp_path / "small.pt")])
    assert "has 300 tokens but the model's vocabulary has 200" in _one_line_error(capsys, code)
    assert not (tmp_path / "small.pt").exists()


def test_a_literal_end_token_in_a_document_is_text(own):
    """Only the separator that preparation inserts is the end id (as with tiktoken's GPT-2)."""
    from corpus.encoders import load_encoder

    enc = load_encoder(str(own["root"] / "kept-tok"))
    ids = enc.encode(f"the king{END}the queen").tolist()
    assert enc.eot_id == 0 and 0 not in ids
    assert enc.decode(ids) == f"the king{END}the queen"
    many = enc.encode_many(["the", f"a{END}b", "crown"])
    assert [m.tolist() for m in many] == [enc.encode(t).tolist()
                                           for t in ("the", f"a{END}b", "crown")]


def test_safetensors_export_keeps_the_tokenizer(own, tmp_path):
    out = tmp_path / "model.safetensors"
    assert convert.main(["--to_safetensors", str(out), "--checkpoint", str(own["run"])]) == 0
    model, ckpt = load_model(out, device="cpu")
    snap = torch.load(own["run"] / "snapshots" / "latest.pt", weights_only=True)
    assert ckpt[FILES_KEY] == snap[FILES_KEY] and ckpt[SHA256_KEY] == snap[SHA256_KEY]
    assert model.end_token == 0 and model.tokenizer.encode("the") == own["tok"].encode("the")


def test_gguf_export_tokenizes_as_we_do_in_llama_cpp(own, tmp_path):
    """`train_tokenizer.py`'s pre-tokenizer is GPT-2's, which llama.cpp knows: the export names
    it, and llama.cpp splits any text (every plane, controls, whitespace runs) into our ids."""
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "own.gguf"
    assert convert.main(["--to_gguf", str(out), "--checkpoint", str(own["run"])]) == 0
    reader = gguf.GGUFReader(str(out))
    assert reader.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == 0
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (CI installs it: .ci/run)")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=32, n_threads=1, verbose=False,
                          vocab_only=True)
    tok = own["tok"]
    try:
        for text in [t for t in hard_texts() if t] + [own["text"].read_text()[:3000]]:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
                tok.encode(text), text[:60]
    finally:
        llm.close()
