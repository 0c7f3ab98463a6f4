"""lm-evaluation-harness's model interface for the repo's checkpoints: `SmallLM`, registered
with the harness as `small-lm`.

    from downstream.harness import SmallLM
    lm = SmallLM(checkpoint="lm_shakespeare", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

The harness is an optional dependency: this module imports it at load time, so import it only
after `require_lm_eval()` (which says in one line how to install it). The scoring itself is
`downstream.scoring`; this class tokenizes as the harness's `hf` backend does (the harness's own
`TemplateLM` does the context/continuation split), so the numbers compare with it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from downstream.scoring import (
    GenerationRequest,
    ScoringStats,
    generate,
    loglikelihoods,
    rolling_pairs,
)

MODEL_NAME = "small-lm"
INSTALL_HINT = 'pip install "lm-eval==0.4.13"'


class HarnessMissingError(ValueError):
    """lm-evaluation-harness is not installed; the message says how to install it."""


def require_lm_eval() -> None:
    """Raise `HarnessMissingError` (one line, with the pip command) if `lm_eval` is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise HarnessMissingError("downstream tasks need lm-evaluation-harness, which is not "
                                  f"installed: {INSTALL_HINT} (or pip install -e \".[eval]\")")


require_lm_eval()

from lm_eval.api.model import TemplateLM  # noqa: E402 - after the check above
from lm_eval.api.registry import model_registry, register_model  # noqa: E402
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs  # noqa: E402


def _as_int(name: str, value: Any, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum or (isinstance(value, float) and value != number):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


class SmallLM(TemplateLM):
    """A repo checkpoint (or an in-memory `LanguageModel`) as a harness model.

    Args:
        checkpoint: a checkpoint file, run folder or .safetensors export (what `evaluate_lm.py`
            loads); or pass `model` and `tokenizer` instead.
        model: an already built `LanguageModel` (training's evaluation passes its own).
        tokenizer: the model's tokenizer (with `model`), or a tokenizer name for `checkpoint`.
        batch_size: packed rows per forward pass (loglikelihood) and rows decoded together
            (generation); "auto" means 8.
        device: "auto", "cpu", "cuda", ... (with `checkpoint`); the harness's own default,
            "cuda:0", means "auto" on a machine without CUDA.
        quantize: CPU weight format for a checkpoint: none, bf16 or int8.
        dtype: autocast dtype for the forward pass: float32 (none), bfloat16 or float16 (a
            name or a torch dtype).
        stride: tokens predicted per rolling window after the first (default: the context).
        max_gen_toks: the generation budget when a task sets none (the harness's 256).
        seed: seed of sampled generation (a task with temperature > 0); request i uses seed+i.
        max_length: score as if the model's context were this (default and maximum: its own),
            e.g. to compare with a backend that keeps tokens in reserve: the harness's
            `local-completions` with `max_length=N + 2` cuts prompts as this does with N.
        **kwargs: the harness's own extras (max_batch_size, ...), ignored.
    """

    def __init__(self, checkpoint: str | None = None, model: Any = None, tokenizer: Any = None,
                 batch_size: int | str = 8, device: str = "auto", quantize: str = "none",
                 dtype: Any = "float32", stride: int | None = None, max_gen_toks: int = 256,
                 seed: int = 0, max_length: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        import torch

        if (checkpoint is None) == (model is None):
            raise ValueError(f"{MODEL_NAME} needs checkpoint=PATH (or a model object)")
        if model is None:
            if device == "cuda:0" and not torch.cuda.is_available():  # the harness's default
                device = "auto"
            model, tokenizer = self._load(str(checkpoint), device, quantize, tokenizer)
        elif tokenizer is None:
            raise ValueError(f"{MODEL_NAME}: a model object needs its tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self._batch_size = 8 if str(batch_size).startswith("auto") else _as_int("batch_size",
                                                                               batch_size)
        if isinstance(dtype, str):
            dtype = None if dtype in ("float32", "none") else getattr(torch, dtype, dtype)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self._dtype = None if dtype == torch.float32 else dtype
        self._max_length = model.max_seq_len
        if max_length is not None:
            self._max_length = _as_int("max_length", max_length, minimum=2)
            if self._max_length > model.max_seq_len:
                raise ValueError(f"max_length {self._max_length} is larger than the model's "
                                 f"context {model.max_seq_len}")
        self._stride = None if stride is None else _as_int("stride", stride)
        if self._stride is not None and self._stride > self._max_length:
            raise ValueError(f"stride {self._stride} is larger than the context "
                             f"{self._max_length}")
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self._seed = _as_int("seed", seed, minimum=0)
        self.stats = ScoringStats()
        self.quiet = False  # True: no "Tokenizing inputs" progress bar (training's evaluations)

    @staticmethod
    def _load(checkpoint: str, device: str, quantize: str, tokenizer: str | None):
        from model.checkpoint import CheckpointError, DeviceError
        from model.loading import load_for_inference
        from model.tokenizer import TokenizerLoadError

        try:
            loaded = load_for_inference(checkpoint, device=device, weights=quantize,
                                        tokenizer=tokenizer)
        except (CheckpointError, DeviceError, TokenizerLoadError) as exc:
            raise ValueError(str(exc)) from None
        return loaded.model, loaded.tokenizer

    # -- what the harness asks of a model ----------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """The end-of-text token: the prefix of an empty context and of rolling windows."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What conditions an empty context and the first rolling window: BOS where the
        tokenizer has one, else EOT (as the harness's `hf` backend)."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        """The context in tokens (the model's, or `max_length`)."""
        return self._max_length

    @property
    def batch_size(self) -> int:
        """Rows per forward pass."""
        return self._batch_size

    @property
    def device(self) -> Any:
        """Where the model is."""
        return self.model.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of `string`, without special tokens (the `hf` backend's default for
        GPT-2-style tokenizers)."""
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        """The harness's tokenization (`TemplateLM`), then `_loglikelihood_tokens`."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = loglikelihoods(self.model, pairs, batch_size=self._batch_size,
                                 dtype=self._dtype, stats=self.stats, max_len=self.max_length)
        for (key, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods over the harness's rolling windows (`stride`: see the
        class arguments), all windows of all texts batched together."""
        pairs, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            windows = rolling_pairs(self.tok_encode(text), self.prefix_token_id, self.max_length,
                                    self._stride)
            pairs += windows
            owner += [i] * len(windows)
        results = loglikelihoods(self.model, pairs, batch_size=self._batch_size,
                                 dtype=self._dtype, stats=self.stats, max_len=self.max_length)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, results, strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continuations until a task's stop strings (`until`), the end-of-text token or
        `max_gen_toks`; prompts are cut on the left to leave room for the budget."""
        from model.sampling import Sampling

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        gen_requests = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self._max_gen_toks)
            stops = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - budget
            if room < 1:
                raise ValueError(f"a task asks for {budget} new tokens, but the model's context "
                                 f"is {self.max_length}; set max_gen_toks lower")
            prompt = self.tok_encode(context) or [self.eot_token_id]
            if len(prompt) > room:
                self.stats.gen_truncated += 1
                prompt = prompt[-room:]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") \
                else 0.0
            sampling = Sampling(temperature=temperature, top_k=kwargs.get("top_k"),
                                top_p=kwargs.get("top_p"),
                                seed=None if temperature == 0 else self._seed + i)
            gen_requests.append(GenerationRequest(prompt, stops, budget, sampling))
        texts = generate(self.model, self.tokenizer, gen_requests, batch_size=self._batch_size,
                         eot=self.eot_token_id, stats=self.stats)
        for req, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def get_model_info(self) -> dict:
        """What the harness records about the model in its results JSON."""
        return {"model_num_parameters": self.model.num_params(non_embedding=False),
                "model_context": self.max_length}


def register() -> None:
    """Register `SmallLM` with the harness as `small-lm` (idempotent)."""
    if model_registry.get(MODEL_NAME, default=None) is not SmallLM:
        register_model(MODEL_NAME)(SmallLM)


register()
