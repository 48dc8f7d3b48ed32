"""Decoding: the maths of choosing a token (sampling.py), the one decoding loop (decoding.py)
behind `generate` and the server's continuous batching, tokens to text (text.py), the
decode-time weight layout (layouts.py), many adapters in one batch (bank.py), and the session
that puts them together for text prompts (session.py)."""

from .bank import AdapterBank
from .decoding import Decoder, Sequence
from .layouts import DecodeLayout
from .sampling import SamplingConfig, next_token
from .session import GenerationSession, generate, generate_samples
from .text import TextDecoder, TextStream

__all__ = ["AdapterBank", "Decoder", "Sequence", "DecodeLayout", "SamplingConfig", "next_token",
           "GenerationSession", "generate", "generate_samples", "TextDecoder", "TextStream"]
