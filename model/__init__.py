"""The model and everything that runs it (torch; imports point one way, into lm.py).

config.py (`LMConfig`: shape and architecture fields, no torch), lm.py (`LanguageModel`, the
KV cache and the blocks), sampling.py (`Sampling`, validated once, and the samplers),
logprobs.py (per-token probabilities), engine.py (the batched KV-cache decode engine),
generation.py (the loop of `generate`/`stream`), scoring.py (log-likelihoods of given text),
windows.py (the sliding windows that score long text), textstream.py (tokens to printable
text, stop strings), probview.py (showing token probabilities), repl.py (the interactive
mode), checkpoint.py (reading and checking checkpoints), loading.py (the one
checkpoint-and-tokenizer loader of the scripts), tokenizer.py (the bundled GPT-2 tokenizer),
quant.py (CPU weight formats), hf_interop.py / hf_families.py (Hugging Face GPT-2, Llama,
Qwen2, Qwen3), gguf_export.py / gguf_vocab.py (llama.cpp's format, and the tokenizer
written into it).
"""
