"""A tiny instruct model for the chat tests: a byte-level BPE tokenizer with a ChatML template
(`<|im_start|>`/`<|im_end|>`), trained here on a few KB, and a random-weight model whose
checkpoint carries that tokenizer. Everything is built offline in a temporary folder.

Test files import this module as `chat_model` (tests/conftest.py puts tests/ on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from train_helpers import write_text

from model.lm import LanguageModel
from model.tokenizer import tokenizer_record

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BROKEN = "{% for m in messages %}{{ m['content'] }"  # a Jinja syntax error
CONTEXT = 128
# The conversation whose greedy reply is made to end with <|im_end|> after a few tokens.
STOPPING = [{"role": "system", "content": "You are kind."},
            {"role": "user", "content": "the king and the queen"}]


def make_tokenizer(folder: Path, template: str | None = CHATML) -> Any:
    """A 400-token byte-level BPE with a ChatML template (None: no template), saved in
    `folder`. Its end-of-text token is `<|endoftext|>`, not the template's `<|im_end|>`, so the
    end of a turn is found from the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    text = write_text(folder.parent / f"{folder.name}-text.txt", 3000, seed=5).read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Only printable ASCII and newline (the text holds nothing else): every reply prints
    # cleanly in a terminal, with no control character or half of a UTF-8 one.
    plain = "\n" + "".join(map(chr, range(32, 127)))
    spelled = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(set(spelled.pre_tokenize_str(plain)[0][0]))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS, IM_START, IM_END],
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(text.splitlines(), trainer)
    extra = {} if template is None else {"chat_template": template}
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS,
                            additional_special_tokens=[IM_START, IM_END],
                            **extra).save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def _end_early(model: LanguageModel, tok: Any) -> None:
    """Point `<|im_end|>`'s row of the (untied) head at a token the greedy reply to STOPPING
    picks a few steps in, scaled up a little, so that reply ends with `<|im_end|>` after 2 or
    more tokens (checked here: the tests rely on it) while most others run on."""
    ids = tok.apply_chat_template(STOPPING, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    end = tok.convert_tokens_to_ids(IM_END)
    head = model.lm_head.weight
    with torch.no_grad():
        greedy = model.generate(torch.tensor(ids), max_new_tokens=10, temperature=0)
        new = greedy[0, len(ids):].tolist()
        for scale in (1.02, 1.05, 1.1, 1.2, 1.5):
            for target in new[2:]:
                head[end] = head[target] * scale
                out = model.generate(torch.tensor(ids), max_new_tokens=10, temperature=0)[0]
                reply = out[len(ids):].tolist()
                if end in reply and reply.index(end) >= 2:
                    return
    raise AssertionError("could not make the tiny chat model end its turn early")


def save_chat_checkpoint(path: Path, template: str | None = CHATML) -> Path:
    """A checkpoint in the trainer's format: a random tiny model (context CONTEXT, untied head)
    carrying the tokenizer of `make_tokenizer(template)`; with a template, the greedy reply to
    STOPPING ends with `<|im_end|>`."""
    folder = path.parent / f"{path.stem}-tokenizer"
    tok = make_tokenizer(folder, CHATML)
    torch.manual_seed(99)
    model = LanguageModel(vocab_size=len(tok), d_model=32, num_heads=2, num_layers=2, d_ff=64,
                          max_seq_len=CONTEXT, dropout=0.0, tie_embeddings=False).eval()
    model.end_token = tok.eos_token_id
    _end_early(model, tok)
    record = tokenizer_record(str(folder), tok)
    # The template goes in tokenizer_config.json, where every transformers version reads it.
    files = dict(record["tokenizer_files"])
    files.pop("chat_template.jinja", None)
    config = json.loads(files["tokenizer_config.json"])
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    files["tokenizer_config.json"] = json.dumps(config).encode("utf-8")
    torch.save({"model_config": model.config.to_dict(), "model_state_dict": model.state_dict(),
                "step": 10, **record, "tokenizer_files": files}, path)
    return path
