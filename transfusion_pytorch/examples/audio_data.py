"""Spoken words for `train_audio.py`: eSpeak NG synthesis, the held-out-voice split, LibriSpeech, captions.

`synthesize` speaks a word with eSpeak NG through the `espeakng-loader` wheel (its bundled
`libespeak-ng` and voice data, called by `ctypes`; no system package), resampled to 16 kHz mono
and trimmed of leading / trailing silence. `load_spoken_words` speaks the ten digits and 30
short words in many voices (accent + voice variant), speeds and pitches, caches the clips in one
`.npz`, and holds out whole voices for evaluation. `read_librispeech` reads LibriSpeech-layout
folders (`speaker/chapter/*.flac` + `speaker-chapter.trans.txt`) through `soundfile`.
Captions are one text id per character of a-z, space and apostrophe (28 ids).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SAMPLE_RATE = 16_000

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SHORT_WORDS = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "house", "water",
    "happy", "big", "small", "hot", "cold", "fast", "slow", "open", "bird", "fish",
)  # fmt: skip
WORDS = DIGIT_WORDS + SHORT_WORDS

# a voice is an eSpeak NG accent + a voice variant (formants, breathiness): the held-out
# voices share no (accent, variant) pair with the training voices
TRAIN_VOICES = (
    "en-us+m1", "en-us+m2", "en-us+m3", "en-us+f1", "en-us+f2",
    "en+m4", "en+m6", "en+f3", "en+f5", "en-gb-scotland+m7", "en-029+m8", "en-gb-x-rp+f4",
)  # fmt: skip
EVAL_VOICES = ("en-us+m5", "en+f2", "en-gb-scotland+f1")
RATES = (140, 175, 210)  # words per minute
PITCHES = (35, 50, 65)  # eSpeak's 0-100 pitch scale

CAPTION_ALPHABET = "abcdefghijklmnopqrstuvwxyz '"
NUM_TEXT_TOKENS = len(CAPTION_ALPHABET)

# ------------------------------------------------------------------ captions


def encode_caption(text: str) -> Tensor:
    """`"seven"` → one id per character `(5,)`, a LongTensor (a-z, space, apostrophe)."""
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}")
    if not text or any(char not in CAPTION_ALPHABET for char in text):
        raise ValueError(f"`text` must be non-empty and use only a-z, space and apostrophe, got {text!r}")
    return torch.tensor([CAPTION_ALPHABET.index(char) for char in text], dtype=torch.long)


def decode_caption(ids) -> str:
    """Text ids → the text they spell, up to the first id that is not a character ([eos], a special id)."""
    chars = []
    for i in torch.as_tensor(ids).reshape(-1).tolist():
        if not 0 <= i < NUM_TEXT_TOKENS:
            break
        chars.append(CAPTION_ALPHABET[i])
    return "".join(chars)


def normalize_transcript(text: str) -> str:
    """A LibriSpeech transcript → the caption alphabet: lower case, other characters dropped, spaces collapsed."""
    kept = "".join(char for char in text.lower() if char in CAPTION_ALPHABET)
    return " ".join(kept.split())


def word_accuracy(reference: str, written: str) -> float:
    """1 - word error rate (Levenshtein distance over words / reference words), floored at 0;
    for one-word captions, exact match."""
    ref, hyp = reference.split(), written.split()
    if not ref:
        raise ValueError("`reference` must hold at least one word")
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return max(0.0, 1.0 - previous[-1] / len(ref))


# ------------------------------------------------------------------ eSpeak NG synthesis

_ESPEAK: dict = {}


def _espeak():
    """The bundled libespeak-ng, initialised once for synchronous synthesis into a Python callback."""
    if "lib" in _ESPEAK:
        return _ESPEAK
    try:
        import espeakng_loader
    except ImportError as error:
        raise ImportError("spoken-word synthesis needs the espeakng-loader wheel: pip install espeakng-loader") from error
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Initialize.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
    rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # 2: AUDIO_OUTPUT_SYNCHRONOUS
    if rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({rate})")
    chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def collect(wav, num_samples, events):
        if num_samples > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    callback = callback_type(collect)  # kept alive in _ESPEAK: the library holds a raw pointer to it
    lib.espeak_SetSynthCallback(callback)
    lib.espeak_SetVoiceByName.argtypes = (ctypes.c_char_p,)
    lib.espeak_Synth.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p)
    _ESPEAK.update(lib=lib, rate=rate, chunks=chunks, callback=callback)
    return _ESPEAK


def trim_silence(wave: np.ndarray, threshold: float = 0.02, margin: int = 480) -> np.ndarray:
    """Cut leading and trailing samples quieter than `threshold` × the peak, keeping `margin` samples (30 ms) each side."""
    loud = np.flatnonzero(np.abs(wave) > threshold * max(float(np.abs(wave).max()), 1e-9))
    if len(loud) == 0:
        return wave
    return wave[max(0, loud[0] - margin) : loud[-1] + margin + 1]


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
    """Speak `text` with eSpeak NG: float32 samples at 16 kHz mono, peak 0.9, silence trimmed.

    `voice`: an eSpeak NG voice name, optionally with a variant (`"en-us+f2"`); `rate` in words
    per minute (80-450); `pitch` 0-100."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"`text` must be a non-empty string, got {text!r}")
    if not 80 <= rate <= 450:
        raise ValueError(f"`rate` must be 80-450 words per minute, got {rate}")
    if not 0 <= pitch <= 100:
        raise ValueError(f"`pitch` must be 0-100, got {pitch}")
    espeak = _espeak()
    lib = espeak["lib"]
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"`voice` {voice!r} is not an eSpeak NG voice")
    lib.espeak_SetParameter(1, int(rate), 0)  # espeakRATE
    lib.espeak_SetParameter(3, int(pitch), 0)  # espeakPITCH
    espeak["chunks"].clear()
    data = text.encode() + b"\0"
    if lib.espeak_Synth(data, len(data), 0, 0, 0, 0, None, None) != 0:
        raise RuntimeError(f"eSpeak NG could not speak {text!r}")
    lib.espeak_Synchronize()
    if not espeak["chunks"]:
        raise RuntimeError(f"eSpeak NG produced no audio for {text!r}")
    wave = np.concatenate(espeak["chunks"]).astype(np.float32) / 32768.0
    wave = resample(wave, espeak["rate"])
    wave = trim_silence(wave)
    return (0.9 * wave / max(float(np.abs(wave).max()), 1e-9)).astype(np.float32)


@dataclass
class SpokenWords:
    """Clips and their captions: `train_*` from the training voices, `eval_*` from held-out voices.
    Waves are float32 arrays at 16 kHz; `*_texts` their captions; `*_labels` the index of the
    caption in `words` (-1 for captions outside it, e.g. LibriSpeech sentences)."""

    words: tuple[str, ...]
    train_waves: list
    train_texts: list
    train_labels: Tensor
    eval_waves: list
    eval_texts: list
    eval_labels: Tensor
    eval_voices: list


def _labels(texts, words) -> Tensor:
    return torch.tensor([words.index(t) if t in words else -1 for t in texts], dtype=torch.long)


def load_spoken_words(
    cache_dir: str | os.PathLike | None = None,
    words=WORDS,
    train_voices=TRAIN_VOICES,
    eval_voices=EVAL_VOICES,
    rates=RATES,
    pitches=PITCHES,
) -> SpokenWords:
    """Every word in every voice, rate and pitch, synthesised once and cached in `cache_dir`
    (default `~/.cache/transfusion_pytorch`) as one `.npz` named by a hash of the settings.
    The clips of `eval_voices` are held out (all rates and pitches of them)."""
    if set(train_voices) & set(eval_voices):
        raise ValueError(f"`eval_voices` must not share a voice with `train_voices`: {sorted(set(train_voices) & set(eval_voices))}")
    settings = json.dumps([list(words), list(train_voices), list(eval_voices), list(rates), list(pitches), SAMPLE_RATE, 1])
    cache_dir = Path(cache_dir if cache_dir is not None else Path.home() / ".cache" / "transfusion_pytorch")
    path = cache_dir / f"spoken_words_{hashlib.sha256(settings.encode()).hexdigest()[:12]}.npz"
    voices = list(train_voices) + list(eval_voices)
    grid = [(word, voice, rate, pitch) for voice in voices for word in words for rate in rates for pitch in pitches]
    if path.is_file():
        stored = np.load(path)
        waves = np.split(stored["samples"], np.cumsum(stored["lengths"])[:-1])
    else:
        waves = [synthesize(word, voice, rate, pitch) for word, voice, rate, pitch in grid]
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, samples=np.concatenate(waves), lengths=np.array([len(w) for w in waves]))
        partial.replace(path)  # atomic: a killed run leaves no half-written cache
    is_eval = [voice in eval_voices for _, voice, _, _ in grid]
    train = [i for i, e in enumerate(is_eval) if not e]
    held = [i for i, e in enumerate(is_eval) if e]
    words = tuple(words)
    train_texts, eval_texts = [grid[i][0] for i in train], [grid[i][0] for i in held]
    return SpokenWords(
        words,
        [waves[i] for i in train],
        train_texts,
        _labels(train_texts, words),
        [waves[i] for i in held],
        eval_texts,
        _labels(eval_texts, words),
        [grid[i][1] for i in held],
    )


def read_librispeech(root: str | os.PathLike, max_seconds: float | None = None) -> list[dict]:
    """Utterances of a LibriSpeech-layout folder (`speaker/chapter/speaker-chapter-NNNN.flac`,
    transcripts in `speaker/chapter/speaker-chapter.trans.txt`), read with `soundfile`:
    dicts `{"id", "speaker", "text", "wave"}`, the wave float32 at 16 kHz mono (other rates are
    resampled, stereo is averaged), the text normalised to the caption alphabet. Utterances
    longer than `max_seconds` are skipped."""
    import soundfile

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"`root` {str(root)!r} is not a folder")
    transcripts = sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise ValueError(f"`root` {str(root)!r} holds no LibriSpeech `*.trans.txt` transcripts (speaker/chapter/*.trans.txt)")
    utterances = []
    for transcript in transcripts:
        for line in transcript.read_text().splitlines():
            if not line.strip():
                continue
            utterance_id, _, text = line.strip().partition(" ")
            audio = transcript.parent / f"{utterance_id}.flac"
            if not audio.is_file():
                raise ValueError(f"{str(transcript)!r} names {utterance_id}, but {str(audio)!r} does not exist")
            wave, rate = soundfile.read(audio, dtype="float32", always_2d=True)
            wave = wave.mean(axis=1)
            wave = resample(wave, rate)
            if max_seconds is not None and len(wave) > max_seconds * SAMPLE_RATE:
                continue
            text = normalize_transcript(text)
            if text:
                utterances.append({"id": utterance_id, "speaker": utterance_id.split("-")[0], "text": text, "wave": wave})
    return utterances


def librispeech_split(root, num_eval_speakers: int = 1, max_seconds: float | None = 8.0) -> SpokenWords:
    """A LibriSpeech folder as a `SpokenWords` split: the last `num_eval_speakers` speakers (sorted) held out."""
    utterances = read_librispeech(root, max_seconds)
    speakers = sorted({u["speaker"] for u in utterances})
    if len(speakers) <= num_eval_speakers:
        raise ValueError(f"`root` holds {len(speakers)} speakers; at least {num_eval_speakers + 1} are needed to hold {num_eval_speakers} out")
    held = set(speakers[-num_eval_speakers:])
    train = [u for u in utterances if u["speaker"] not in held]
    evals = [u for u in utterances if u["speaker"] in held]
    words = tuple(sorted({u["text"] for u in utterances}))
    return SpokenWords(
        words,
        [u["wave"] for u in train],
        [u["text"] for u in train],
        _labels([u["text"] for u in train], words),
        [u["wave"] for u in evals],
        [u["text"] for u in evals],
        _labels([u["text"] for u in evals], words),
        [u["speaker"] for u in evals],
    )


def write_wav(path: str | os.PathLike, wave, sample_rate: int = SAMPLE_RATE) -> Path:
    """A mono float waveform → a 16-bit PCM WAV file (clipped to [-1, 1])."""
    import soundfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.clip(np.asarray(torch.as_tensor(wave).float().cpu()), -1, 1), sample_rate, subtype="PCM_16")
    return path


def resample(wave: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """`wave` at `rate` Hz → float32 at `target` Hz (polyphase, scipy)."""
    if rate == target:
        return np.asarray(wave, dtype=np.float32)
    from scipy.signal import resample_poly

    gcd = math.gcd(target, rate)
    return resample_poly(wave, target // gcd, rate // gcd).astype(np.float32)
