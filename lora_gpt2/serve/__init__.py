"""`lora-gpt2 serve`: an OpenAI-compatible completions server over one base model and many
adapters, batched together (bank.py, batching.py). Needs the `serve` extra (FastAPI, uvicorn).

engine.py runs the decoder in its own thread; request.py checks a request's JSON; text.py
turns tokens into text with stop strings; app.py is the HTTP layer.
"""
