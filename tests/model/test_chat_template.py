"""model/chat.py on tokenizers built here: the template applied by transformers (sandboxed),
the end-of-turn token found from the template, one-line errors for broken or refusing
templates, and the conversation trimmed to the context with the system message kept."""

from __future__ import annotations

import pytest
from chat_model import BROKEN, CHATML, EOS, IM_END, make_tokenizer

from model.chat import ChatTemplateError, Conversation, chat_format
from model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("chat-tok") / "tok")


def _with(tok, template: str):
    copy = tok.__class__.from_pretrained(tok.name_or_path)
    copy.chat_template = template
    return copy


def test_a_base_tokenizer_has_no_chat():
    assert chat_format(load_tokenizer("gpt2")) is None


def test_prompt_is_transformers_and_the_end_of_turn_comes_from_the_template(tok):
    chat = chat_format(tok)
    im_end, eos = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOS)
    assert chat.end_tokens == (im_end, eos) and chat.end_names() == f"{IM_END}, {EOS}"
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert chat.prompt_ids(messages) == tok.encode(text, add_special_tokens=False)
    # a template that ends a turn with the end-of-text token: that is the only end
    eos_only = _with(tok, "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    assert chat_format(eos_only).end_tokens == (eos,)


@pytest.mark.parametrize("template, words", [
    (BROKEN, ["chat template is broken", "TemplateSyntaxError", "template line 1"]),
    # the sandbox: a template cannot reach Python's internals
    ("{{ ''.__class__.__mro__ }}", ["chat template is broken", "SecurityError"]),
    ("{{ raise_exception('no chats here') }}", ["chat template is broken", "no chats here"]),
])
def test_a_broken_template_is_one_line(tok, template, words):
    with pytest.raises(ChatTemplateError) as err:
        chat_format(_with(tok, template))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_template_that_refuses_messages_says_why(tok):
    refuses_system = ("{% if messages[0]['role'] == 'system' %}"
                      "{{ raise_exception('System role not supported') }}{% endif %}" + CHATML)
    chat = chat_format(_with(tok, refuses_system))  # the probe has no system message: fine
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        chat.prompt_ids([{"role": "system", "content": "x"}, {"role": "user", "content": "Hi"}])


def test_the_oldest_turns_go_and_the_system_message_stays(tok):
    chat = chat_format(tok)
    conv = Conversation("Be kind.")
    for i in range(3):
        conv.add("user", f"question {i}")
        conv.add("assistant", f"answer {i}")
    conv.add("user", "last question")
    whole = len(chat.prompt_ids(conv.messages()))
    without_first = len(chat.prompt_ids(conv.messages()[:1] + conv.messages()[3:]))
    ids, dropped = conv.prompt_ids(chat, room=whole, context=whole)
    assert dropped == 0 and len(ids) == whole  # fits: nothing goes
    ids, dropped = conv.prompt_ids(chat, room=without_first, context=whole)
    assert dropped == 2 and len(ids) == without_first
    assert conv.system == "Be kind." and conv.turns[0]["content"] == "question 1"
    ids, dropped = conv.prompt_ids(chat, room=1, context=whole)  # all but the last go
    assert dropped == 4 and [t["content"] for t in conv.turns] == ["last question"]
    assert ids == chat.prompt_ids(conv.messages())
    with pytest.raises(ValueError, match="over the model's context of 5"):
        conv.prompt_ids(chat, room=1, context=5)
    assert conv.turns == []  # the message that could not fit is not kept
    conv.add("user", "again")
    conv.reset()
    assert conv.turns == [] and conv.messages() == [{"role": "system", "content": "Be kind."}]


def test_a_hugging_face_folder_and_its_converted_checkpoint_keep_the_template(tok, tmp_path):
    """An instruct model as downloaded (config, weights, tokenizer files with the template):
    loaded as it is, and converted to our checkpoint (the tokenizer's files stored in it)."""
    import torch
    import transformers

    from model.loading import load_for_inference
    from model.tokenizer import load_checkpoint_tokenizer, tokenizer_record

    folder = tmp_path / "tiny-llama-instruct"
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    expected = chat_format(tok).end_tokens
    loaded = load_for_inference(folder, device="cpu")
    assert chat_format(loaded.tokenizer).end_tokens == expected
    stored = tokenizer_record(str(folder))
    assert chat_format(load_checkpoint_tokenizer(stored)).end_tokens == expected
