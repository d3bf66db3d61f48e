"""The audio codec and the judge of `train_audio.py`.

`LogMelCodec`: the log-magnitude mel spectrogram (64 bands, 16 ms hop), normalised per band
with the training set's mean and std, two frames stacked per token: a clip of `s` seconds is a
1D latent of about `31 s` tokens of width 128, its length set by the clip. Its decoder inverts
the mel filterbank (non-negative least squares by multiplicative updates) and recovers a phase
by fast Griffin-Lim (Griffin & Lim 1984; Perraudin et al. 2013, "A fast Griffin-Lim
algorithm") with `torch.stft` / `torch.istft`. It has no parameters besides the normalisation,
so nothing has to be pretrained on a CPU.

`WordClassifier`, a small 1D CNN over log-mel frames, is trained on real training clips only;
`tts_intelligibility` is the share of generated clips (decoded to waveforms, then re-analysed)
it labels as the prompted word.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .audio_data import SAMPLE_RATE


def mel_filterbank(num_mels: int, n_fft: int, sample_rate: int, f_min: float = 40.0, f_max: float | None = None) -> Tensor:
    """Triangular filters on the HTK mel scale, `(num_mels, n_fft // 2 + 1)`, each peaking at 1."""
    f_max = f_max or sample_rate / 2

    def mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(f_min), mel(f_max), num_mels + 2))
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    filters = np.maximum(0.0, np.minimum((bins - low) / (centre - low), (high - bins) / (high - centre)))
    return torch.tensor(filters, dtype=torch.float32)


class LogMelCodec:
    """Waveform ↔ 1D latent `(tokens, num_mels * stack)`: normalised log-mel frames, `stack` per token.

    `fit(waves)` sets the per-band mean and std from training clips; `encode(wave)` and
    `decode(latent)` then map a clip of any length to a latent whose length follows the clip,
    and back (mel inversion by NNLS multiplicative updates, phase by fast Griffin-Lim).
    `state()` / `from_state()` carry it in a checkpoint's `extra`."""

    def __init__(self, num_mels: int = 64, n_fft: int = 1024, hop: int = 256, stack: int = 2, sample_rate: int = SAMPLE_RATE, floor: float = 1e-3):
        for name, value in (("num_mels", num_mels), ("n_fft", n_fft), ("hop", hop), ("stack", stack)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        self.num_mels, self.n_fft, self.hop, self.stack, self.sample_rate, self.floor = num_mels, n_fft, hop, stack, sample_rate, floor
        self.filters = mel_filterbank(num_mels, n_fft, sample_rate)
        self.window = torch.hann_window(n_fft)
        self.mean = torch.zeros(num_mels)
        self.std = torch.ones(num_mels)

    @property
    def dim_latent(self) -> int:
        return self.num_mels * self.stack

    @property
    def samples_per_token(self) -> int:
        return self.hop * self.stack

    def _wave(self, wave) -> Tensor:
        wave = torch.as_tensor(np.asarray(wave) if isinstance(wave, np.ndarray) else wave).float().cpu()
        if wave.ndim != 1:
            raise ValueError(f"`wave` must be 1D (mono samples), got shape {tuple(wave.shape)}")
        if len(wave) < self.hop:
            raise ValueError(f"`wave` must hold at least {self.hop} samples, got {len(wave)}")
        return wave

    def log_mel(self, wave) -> Tensor:
        """Normalised log-mel frames `(frames, num_mels)`; frames = ceil(samples / (hop·stack))·stack."""
        wave = self._wave(wave)
        total = math.ceil(len(wave) / self.samples_per_token) * self.samples_per_token
        wave = F.pad(wave, (0, total - len(wave)))
        spectrum = torch.stft(wave, self.n_fft, self.hop, window=self.window, center=True, pad_mode="constant", return_complex=True).abs()[
            :, : total // self.hop
        ]
        mels = torch.log(self.filters @ spectrum + self.floor).T
        return (mels - self.mean) / self.std

    def fit(self, waves) -> LogMelCodec:
        frames = torch.cat([(self.log_mel(w) * self.std + self.mean) for w in waves])
        self.mean, self.std = frames.mean(0), frames.std(0).clamp_min(1e-3)
        return self

    def encode(self, wave) -> Tensor:
        """A waveform → its latent `(ceil(samples / (hop·stack)), num_mels·stack)`."""
        frames = self.log_mel(wave)
        return frames.reshape(-1, self.stack * self.num_mels)

    def frames(self, latent: Tensor) -> Tensor:
        """A latent `(tokens, num_mels·stack)` → normalised log-mel frames `(tokens·stack, num_mels)`."""
        if latent.ndim != 2 or latent.shape[-1] != self.dim_latent:
            raise ValueError(f"`latent` must have shape (tokens, {self.dim_latent}), got {tuple(latent.shape)}")
        return latent.float().cpu().reshape(-1, self.num_mels)

    def decode(self, latent: Tensor, iterations: int = 48, seed: int = 0) -> Tensor:
        """A latent → a waveform `(tokens·hop·stack,)` at `sample_rate`."""
        mels = torch.exp(self.frames(latent).clamp(-6, 6) * self.std + self.mean).T - self.floor  # (num_mels, frames)
        mels = mels.clamp_min(0.0)
        # magnitudes: non-negative least squares for filters @ S = mels, by multiplicative updates
        gram = self.filters @ self.filters.T
        spectrum = (torch.linalg.pinv(self.filters) @ mels).clamp_min(1e-6)
        target = self.filters.T @ mels
        for _ in range(30):
            spectrum = spectrum * target / (self.filters.T @ (self.filters @ spectrum) + 1e-8)
        del gram
        return griffin_lim(spectrum, self.n_fft, self.hop, self.window, iterations, seed)

    def state(self) -> dict:
        return {
            "num_mels": self.num_mels,
            "n_fft": self.n_fft,
            "hop": self.hop,
            "stack": self.stack,
            "sample_rate": self.sample_rate,
            "floor": self.floor,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }

    @classmethod
    def from_state(cls, state: dict) -> LogMelCodec:
        codec = cls(**{k: state[k] for k in ("num_mels", "n_fft", "hop", "stack", "sample_rate", "floor")})
        codec.mean, codec.std = torch.tensor(state["mean"]), torch.tensor(state["std"])
        return codec


def griffin_lim(magnitude: Tensor, n_fft: int, hop: int, window: Tensor, iterations: int = 48, seed: int = 0, momentum: float = 0.99) -> Tensor:
    """A waveform whose STFT magnitude approaches `magnitude (n_fft // 2 + 1, frames)`: fast
    Griffin-Lim (Perraudin, Balazs & Søndergaard 2013), from random phases drawn with `seed`."""
    length = magnitude.shape[1] * hop
    generator = torch.Generator().manual_seed(seed)
    angles = torch.polar(torch.ones_like(magnitude), 2 * math.pi * torch.rand(magnitude.shape, generator=generator))
    previous = torch.zeros_like(angles)
    for _ in range(iterations):
        wave = torch.istft(magnitude * angles, n_fft, hop, window=window, center=True, length=length)
        rebuilt = torch.stft(wave, n_fft, hop, window=window, center=True, pad_mode="constant", return_complex=True)[:, : magnitude.shape[1]]
        accelerated = rebuilt - (momentum / (1 + momentum)) * previous
        angles = accelerated / accelerated.abs().clamp_min(1e-8)
        previous = rebuilt
    wave = torch.istft(magnitude * angles, n_fft, hop, window=window, center=True, length=length)
    return wave / wave.abs().max().clamp_min(1e-6) * 0.9


# ------------------------------------------------------------------ the judge


class WordClassifier(nn.Module):
    """A 1D CNN over normalised log-mel frames `(b, frames, num_mels)` → word logits; mean and
    max pooled over time, so any length is fine."""

    def __init__(self, num_mels: int, num_words: int, width: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(num_mels, width, 5, padding=2),
            nn.GELU(),
            nn.Conv1d(width, width, 5, padding=2, stride=2),
            nn.GELU(),
            nn.Conv1d(width, width, 3, padding=1),
            nn.GELU(),
            nn.Dropout(0.2),
        )
        self.head = nn.Linear(2 * width, num_words)

    def forward(self, frames: Tensor) -> Tensor:
        h = self.features(frames.transpose(1, 2))
        return self.head(torch.cat((h.mean(-1), h.amax(-1)), dim=-1))


def _pad_frames(frames: list[Tensor], fill: Tensor) -> Tensor:
    longest = max(len(f) for f in frames)
    return torch.stack([torch.cat((f, fill.expand(longest - len(f), -1))) for f in frames])


def train_word_classifier(
    codec: LogMelCodec, waves, labels: Tensor, num_words: int, epochs: int = 12, batch_size: int = 64, lr: float = 2e-3, seed: int = 0
) -> WordClassifier:
    """Train a `WordClassifier` on real clips (their codec log-mel frames), with random shifts and
    gains as augmentation; returned in eval mode, on the CPU."""
    keep = labels >= 0
    frames = [codec.log_mel(w) for w, k in zip(waves, keep.tolist()) if k]
    labels = labels[keep]
    silence = codec.log_mel(np.zeros(codec.samples_per_token, dtype=np.float32))[:1]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        classifier = WordClassifier(codec.num_mels, num_words)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * math.ceil(len(frames) / batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        classifier.train()
        for _ in range(epochs):
            order = torch.randperm(len(frames), generator=generator)
            for start in range(0, len(frames), batch_size):
                index = order[start : start + batch_size].tolist()
                shifts = torch.randint(0, 8, (len(index),), generator=generator).tolist()
                batch = _pad_frames([torch.cat((silence.expand(s, -1), frames[i])) for s, i in zip(shifts, index)], silence)
                loss = F.cross_entropy(classifier(batch), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return classifier.eval()


@torch.no_grad()
def classify_words(classifier: WordClassifier, codec: LogMelCodec, waves) -> Tensor:
    """The classifier's word index `(n,)` for each waveform (analysed by `codec.log_mel`)."""
    return torch.tensor([int(classifier(codec.log_mel(w)[None]).argmax(-1)) for w in waves], dtype=torch.long)
