"""serve_lm.py serving a Hugging Face Qwen3 folder as it is (RoPE, RMSNorm, SwiGLU, grouped-query
attention, QK-norm, a head size other than d_model / heads, an untied head): greedy text and
echoed log-probabilities equal the model's own in-process."""

from __future__ import annotations

import shutil

import httpx
import pytest
import torch
import transformers
from serving import ServerProcess

from model.lm import LanguageModel
from model.scoring import score
from model.tokenizer import BUNDLED_GPT2_DIR, load_tokenizer


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    config = transformers.Qwen3Config(
        vocab_size=50257, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
        tie_word_embeddings=False, eos_token_id=50256, bos_token_id=50256)
    torch.manual_seed(12)
    transformers.Qwen3ForCausalLM(config).save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(BUNDLED_GPT2_DIR / name, folder / name)
    return folder


def test_server_serves_a_qwen3_folder(qwen3_folder):
    model = LanguageModel.from_hf(qwen3_folder).eval()
    tok = load_tokenizer("gpt2")
    prompt = "The river"
    ids = tok.encode(prompt)
    with torch.no_grad():
        greedy = model.generate(torch.tensor(ids), max_new_tokens=8, temperature=0)[0].tolist()
    expected = tok.decode(greedy[len(ids):])
    srv = ServerProcess("--checkpoint", str(qwen3_folder), "--max_batch", "2")
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            name = http.get("/v1/models").json()["data"][0]["id"]
            body = {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0}
            reply = http.post("/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
            out = reply.json()
            assert out["choices"][0]["text"] == expected
            echo = http.post("/v1/completions", json={
                "model": name, "prompt": greedy, "max_tokens": 0, "echo": True,
                "logprobs": 0}).json()
    finally:
        status = srv.stop()
    assert status == 0 and "Traceback" not in srv.log_text()
    served = echo["choices"][0]["logprobs"]["token_logprobs"][1:]
    ours = score(model, torch.tensor(greedy)).logprobs[1:].tolist()
    assert len(served) == len(ours) == len(greedy) - 1
    assert max(abs(a - b) for a, b in zip(served, ours, strict=True)) < 1e-4
