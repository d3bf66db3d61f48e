"""Spoken words for the text ↔ speech example (`train_audio.py`), and what the demo needs.

- data and captions: `audio_data.py` (eSpeak NG words with held-out voices, LibriSpeech);
- the codec (`LogMelCodec`: log-mel frames ↔ waveform by Griffin-Lim) and the judge
  (`WordClassifier`): `audio_codec.py`;
- here: training pairs, batched text → speech and speech → text with a model, and the demo's
  entry points `load_audio_model`, `text_to_speech`, `speech_to_text`.

Everything of the other two modules is importable from here as well.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from .audio_codec import LogMelCodec, WordClassifier, classify_words, griffin_lim, mel_filterbank, train_word_classifier
from .audio_data import (
    CAPTION_ALPHABET,
    DIGIT_WORDS,
    EVAL_VOICES,
    NUM_TEXT_TOKENS,
    PITCHES,
    RATES,
    SAMPLE_RATE,
    SHORT_WORDS,
    TRAIN_VOICES,
    WORDS,
    SpokenWords,
    decode_caption,
    encode_caption,
    librispeech_split,
    load_spoken_words,
    normalize_transcript,
    read_librispeech,
    resample,
    synthesize,
    trim_silence,
    word_accuracy,
    write_wav,
)

__all__ = [
    "CAPTION_ALPHABET", "DIGIT_WORDS", "EVAL_VOICES", "NUM_TEXT_TOKENS", "PITCHES", "RATES", "SAMPLE_RATE", "SHORT_WORDS",
    "TRAIN_VOICES", "WORDS", "LogMelCodec", "SpokenWords", "WordClassifier", "caption_latents", "classify_words",
    "decode_caption", "encode_caption", "generate_latents", "griffin_lim", "librispeech_split", "load_audio_model",
    "load_spoken_words", "mel_filterbank", "normalize_transcript", "pairs", "read_librispeech", "resample",
    "speech_to_text", "synthesize", "text_to_speech", "train_word_classifier", "trim_silence", "word_accuracy", "write_wav",
]  # fmt: skip

# ------------------------------------------------------------------ model helpers (train_audio.py and the demo)


def pairs(latents: list[Tensor], texts: list[str], latent_first) -> list[list]:
    """Interleaved samples: `[latent, caption]` (speech → text) where `latent_first`, else `[caption, latent]`."""
    return [
        [latent, encode_caption(text).to(latent.device)] if first else [encode_caption(text).to(latent.device), latent]
        for latent, text, first in zip(latents, texts, latent_first)
    ]


@torch.no_grad()
def generate_latents(
    sampler, texts: list[str], modality_steps: int = 16, cfg_scale: float = 1.0, max_tokens: int = 96, forced: list | None = None
) -> list[Tensor]:
    """Text → speech latents, one per text, batched. The model writes the length itself
    (`[meta] "n" [som]` after the caption, greedy), then integrates the flow for `n` tokens.
    A text after which the model writes no clip (an untrained model, a garbled length) is
    spoken again with the clip forced open at the model's default length; `forced` (a list, if
    given) receives the indices of those texts. `sampler`: the model or its EMA."""
    device = next(sampler.parameters()).device
    prompts = [encode_caption(t).to(device) for t in texts]
    options = dict(text_temperature=0.0, modality_steps=modality_steps, cfg_scale=cfg_scale)
    samples = sampler.sample_many(prompts, max_length=max_tokens + 8, **options)
    latents = [next((item[1] for item in sample if isinstance(item, tuple)), None) for sample in samples]
    missing = [i for i, latent in enumerate(latents) if latent is None]
    if missing:
        again = sampler.sample_many([prompts[i] for i in missing], max_length=max_tokens + 1, force_modality_at_start=0, **options)
        for i, sample in zip(missing, again):
            latents[i] = next((item[1] for item in sample if isinstance(item, tuple)), None)
        if forced is not None:
            forced.extend(missing)
    return latents


@torch.no_grad()
def caption_latents(sampler, latents: list[Tensor], max_length: int = 16) -> list[str]:
    """Speech → text: greedy captions of latents, the characters written after the clip up to [eos]."""
    samples = sampler.sample_many([(0, latent) for latent in latents], max_length=max_length, text_temperature=0.0)
    captions = []
    for sample in samples:
        after = sample[-1] if torch.is_tensor(sample[-1]) else torch.empty(0, dtype=torch.long)
        captions.append(decode_caption(after[1:]))  # after[0] is the clip's [eom]
    return captions


def load_audio_model(path: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = True):
    """A `train_audio.py` checkpoint → `(model, codec)`: the Transfusion (with the EMA weights
    when `ema` and the checkpoint has them) in eval mode on `device`, and its `LogMelCodec`."""
    from ..training import load_checkpoint, read_checkpoint
    from ..transfusion import Transfusion

    payload = read_checkpoint(path)
    if "codec" not in (payload.get("extra") or {}):
        raise ValueError(f"checkpoint `path` {str(path)!r} has no audio codec: was it written by train_audio.py?")
    codec = LogMelCodec.from_state(payload["extra"]["codec"])
    model = Transfusion.from_checkpoint(path)
    if ema and payload.get("ema") is not None:
        holder = model.create_ema()
        load_checkpoint(path, model, ema=holder, restore_rng=False)
        model.load_state_dict(holder.ema_model.state_dict())
    return model.to(device).eval(), codec


def text_to_speech(model, codec: LogMelCodec, text: str, cfg_scale: float = 3.0, steps: int = 16, seed: int = 0) -> tuple[np.ndarray, int]:
    """A prompt (e.g. `"seven"`) → `(waveform float32, sample_rate)`; write it with `write_wav`."""
    encode_caption(text)  # validates the prompt
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        latent = generate_latents(model, [text], modality_steps=steps, cfg_scale=cfg_scale if model.unconditional_prob > 0 else 1.0)[0]
    if latent is None:
        raise RuntimeError(f"the model wrote no audio for {text!r}")
    return codec.decode(latent, seed=seed).numpy(), codec.sample_rate


def speech_to_text(model, codec: LogMelCodec, wave, sample_rate: int = SAMPLE_RATE) -> str:
    """A mono waveform (any rate; resampled to the codec's) → the model's greedy caption."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    wave = resample(wave, sample_rate, codec.sample_rate)
    wave = trim_silence(wave)
    wave = 0.9 * wave / max(float(np.abs(wave).max()), 1e-9)
    device = next(model.parameters()).device
    return caption_latents(model, [codec.encode(wave).to(device)])[0]
