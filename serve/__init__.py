"""An OpenAI-compatible HTTP server for a trained model (`python serve_lm.py`).

- `serve/protocol.py`: the completions request, validated at the edge (the sampling settings by
  `model.sampling.Sampling`); the OpenAI error body.
- `serve/scheduler.py`: continuous batching: one thread steps a `model.engine.DecodeEngine`
  that requests join and leave between steps.
- `serve/completions.py`: tokens to the OpenAI response: text, stop strings, logprobs, usage.
- `serve/app.py`: the FastAPI routes (`/v1/completions`, `/v1/models`, `/health`, the
  playground at `/`), API keys, errors.
- `serve/limits.py`: the work one request may ask for (tokens, time) and the shutdown's grace.
- `serve/static/`: the playground page (no CDN, no build step).
"""
