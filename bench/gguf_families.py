"""GGUF exports of Llama, Qwen2 and Qwen3-shaped models in llama.cpp, next to ours: same tokens?

Run: python bench/gguf_families.py [--out bench/results/gguf_families_cpu_2core.txt]
     (needs llama-cpp-python; about a minute on 2 cores)

For each family a tiny model with random weights is built with transformers' own class and a
byte-level BPE tokenizer trained here on Tiny Shakespeare (a different pre-tokenizer per family:
Llama 3's, Qwen2's, SmolLM's), converted with `convert.py --from_hf` and exported with
`convert.py --to_gguf` as f32, f16 and q8_0 (the same models as tests/model/test_gguf_families.py,
which imports the builders from here). llama.cpp (llama-cpp-python, one thread, its KV cache in
f32) then loads each file, and the run prints per family and type:

- the architecture llama.cpp loaded the file as (`general.architecture`);
- whether llama.cpp tokenizes a probe text (digits, contractions, runs of spaces and newlines,
  accents, an emoji) into our tokenizer's ids;
- how many of our 50 greedy tokens after that text its own greedy continuation reproduces before
  the first difference;
- the largest difference of its logits from ours along the prompt and our 50 tokens, and our
  largest logit (the scale);
- the smallest margin between our two best logits over those 50 steps (a difference smaller
  than half of it cannot change a greedy choice).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.record import machine  # noqa: E402

# Text llama.cpp must split as the tokenizer does: digits, contractions, runs of spaces and
# newlines, punctuation, accents and an emoji.
PROBE = ("ROMEO: I'll pay 1234 ducats, 56.7 more!  We've\n\n  said it: 'TIS   done?\t"
         "caf\u00e9 \U0001F680 -- 2026")
GREEDY = 50
# family -> (transformers config class, model class, config options, pre-tokenizer, its
# llama.cpp name)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(num_key_value_heads=2, head_dim=32, attention_bias=True,
                   tie_word_embeddings=True),
              "llama3", "llama-bpe"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_key_value_heads=2, tie_word_embeddings=True), "qwen2", "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(num_key_value_heads=1, head_dim=24, tie_word_embeddings=False), "smollm",
              "smollm"),
}
VOCAB = 384  # the model's rows; the qwen2 tokenizer has fewer (a padded embedding)
# Noise added to the random init (std of the weight matrices', the embeddings'): logits of a few
# tens with clear greedy choices that do not repeat one token (a tied head repeats the input
# token when the embeddings dominate), and small enough weights that q8_0's rounding moves the
# logits by well under one (larger ones make these 2-layer models chaotic: a logit moves by 5).
INIT = {"llama": (0.15, 0.3), "qwen2": (0.15, 0.3), "qwen3": (0.1, 1.0)}
OUTTYPES = ("f32", "f16", "q8_0")


def pre_tokenizer(kind: str) -> Any:
    """A `tokenizers` pre-tokenizer: "smollm" (single digits, then GPT-2's byte-level split),
    "llama3" or "qwen2" (their regex, then byte-level)."""
    from tokenizers import Regex, pre_tokenizers

    from model import gguf_vocab

    if kind == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    regex = gguf_vocab.LLAMA3_REGEX if kind == "llama3" else gguf_vocab.QWEN2_REGEX
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def train_tokenizer(family: str, folder: Path) -> Any:
    """A byte-level BPE tokenizer for `family`, trained on Tiny Shakespeare, saved in `folder`
    (a `transformers.PreTrainedTokenizerFast`): Llama's adds BOS to every text, Qwen2's has
    an NFC normalizer and fewer tokens than the model's vocabulary."""
    import transformers
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    kind = FAMILIES[family][3]
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    tok.pre_tokenizer = pre_tokenizer(kind)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if family == "llama" else \
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    size = VOCAB - 16 if family == "qwen2" else VOCAB
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (REPO / "data" / "tinyshakespeare.txt").read_text("utf-8")[:60_000]
    tok.train_from_iterator([text, PROBE], trainer)
    if family == "llama":  # Llama 3 puts BOS before every text
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
        bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    else:
        bos, eos = (None, "<|endoftext|>") if family == "qwen2" else ("<|endoftext|>",) * 2
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos,
                                                eos_token=eos)
    fast.save_pretrained(str(folder))
    return fast


def hf_model(family: str) -> Any:
    """A tiny random `...ForCausalLM` of `family` (2 layers, d_model 64, 4 heads, seeded)."""
    import torch
    import transformers

    config_cls, model_cls, extra, _, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **extra)
    torch.manual_seed(len(family))
    hf = getattr(transformers, model_cls)(config).eval()
    matrices, embeddings = INIT[family]
    with torch.no_grad():  # clear greedy choices, not a repeated token, not chaotic
        for name, p in hf.named_parameters():
            scale = embeddings if name.endswith(("embed_tokens.weight", "lm_head.weight")) \
                else matrices if p.dim() == 2 else 0.1
            p.add_(scale * torch.randn_like(p))
            if "norm" in name:
                p.abs_()
    return hf


# -- the run -------------------------------------------------------------------------------------


def _measure(llama_cpp: Any, path: Path, model: Any, tok: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    prompt = tok.encode(PROBE)
    ours_path = model.generate(prompt, max_new_tokens=GREEDY, temperature=0)[0].tolist()
    mine = ours_path[len(prompt):]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=True,
                          verbose=False, type_k=0, type_v=0)  # 0: GGML_TYPE_F32
    try:
        arch = llm.metadata.get("general.architecture")
        same_tokens = llm.tokenize(PROBE.encode(), add_bos=True, special=False) == prompt
        llm.eval(ours_path)
        theirs = torch.from_numpy(np.array(llm.scores[:len(ours_path)], dtype=np.float32))
        got = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == GREEDY:
                break
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ours_path]))[0]
    top2 = ours[len(prompt) - 1:-1].topk(2).values
    agree = next((i for i, (a, b) in enumerate(zip(got, mine, strict=True)) if a != b), GREEDY)
    return dict(arch=arch, tokens=same_tokens, agree=agree, diff=float((theirs - ours).abs().max()),
                scale=float(ours.abs().max()), margin=float((top2[:, 0] - top2[:, 1]).min()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("gguf_families.py: error: needs llama-cpp-python (see bench/vs_llama_cpp.py for "
              "how to build it)", file=sys.stderr)
        return 2
    import torch

    import convert
    from model.checkpoint import load_model

    torch.set_num_threads(1)
    lines = [f"# {time.strftime('%Y-%m-%d', time.gmtime())}, {machine()}, "
             f"torch {torch.__version__}"
             f", llama-cpp-python {llama_cpp.__version__} (1 thread, f32 KV cache)",
             " ".join(["# python bench/gguf_families.py",
                       *(argv if argv is not None else sys.argv[1:])]),
             f"family  type  llama.cpp arch  same tokens  greedy agrees (of {GREEDY})  "
             "max logit diff  |logit| max  min top-2 margin"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="gguf-families-") as tmp:
        root = Path(tmp)
        for family in FAMILIES:
            folder = root / family
            folder.mkdir()
            tok = train_tokenizer(family, folder)
            hf_model(family).save_pretrained(str(folder), safe_serialization=True)
            ckpt = convert.from_hf(folder, root / f"{family}.pt")
            model, _ = load_model(ckpt, device="cpu")
            model.end_token = None
            for outtype in OUTTYPES:
                path = convert.to_gguf(ckpt, root / f"{family}-{outtype}.gguf", outtype)
                r = _measure(llama_cpp, path, model, tok)
                lines.append(f"{family:6}  {outtype:4}  {r['arch']:14}  {str(r['tokens']):11}  "
                             f"{r['agree']:25d}  {r['diff']:14.2g}  {r['scale']:11.1f}  "
                             f"{r['margin']:16.3f}")
                print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
