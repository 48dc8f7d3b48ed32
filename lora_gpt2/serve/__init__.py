"""`lora-gpt2 serve`: an OpenAI-compatible completions server over one base model and many
adapters, batched together by inference/ (the adapter bank and the one decoding loop). Needs
the `serve` extra (FastAPI, uvicorn).

request.py checks a request's JSON; engine.py runs the decoding loop and hands tokens to each
request's sink; app.py is the HTTP layer and the playground page (playground.html).
"""
