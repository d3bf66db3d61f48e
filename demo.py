"""A Gradio demo of a trained checkpoint: text → image and image → text (or text → video), in the browser and as an API.

    python demo.py                                    # runs/mnist/checkpoints/latest.pt (from `bash scripts/main.sh`)
    python demo.py --checkpoint runs/mnist/checkpoints/latest.pt --port 7860
    python demo.py --device cuda --weights model      # the online weights instead of the EMA

Then open http://127.0.0.1:7860. Two tabs:

  - Text → image: a digit in words or figures ("seven", "7") → the model writes the image
    after `s e v e n [meta] "7,7" [som]` (the prompt of `train_mnist.generation_prompt`),
    integrating the flow with `steps` ODE points and classifier-free guidance `cfg_scale`;
    the decoded interleaved sample (`print_modality_sample`) is shown under the images.
  - Image → text: any image (PNG, JPEG, …; at most 5 MB and 4096 × 4096 pixels) is turned
    into what the model was trained on (a 28 × 28 grey digit, white on black, the ink boxed
    to 20 × 20 and centred by its centre of mass as MNIST was, LeCun et al. 1998) and
    captioned greedily, as `train_mnist.caption_images` does.

The same two directions are API endpoints (`gradio_client`):

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    path = client.predict("seven", 3.0, 16, 0, api_name="/text_to_image")      # prompt, cfg_scale, steps, seed → a 28×28 PNG
    word = client.predict(handle_file(path), api_name="/image_to_text")         # an image file → "seven"

The page shows the tabs of the modalities the checkpoint's saved config holds: a
`train_video.py` checkpoint (one 3-D modality, `VideoEncoder` or `VideoPatchify`) gets a Text → video tab
instead ("three moving left" → an animated GIF, `examples.video.generate_clips`) and the
endpoint `/text_to_video` (prompt, cfg_scale, steps, seed → a GIF file); a `train_audio.py`
checkpoint (a 1-D latent, its log-mel codec in the checkpoint) gets Text → speech and
Speech → text tabs (`examples.audio.text_to_speech` / `speech_to_text`) and the endpoints
`/text_to_speech` (prompt, cfg_scale, steps, seed → a WAV file) and `/speech_to_text` (a sound
file → text; at most 10 s).

Requests are queued and run one at a time on the model (`concurrency_limit=1`, one
concurrency group for every model call), each generation with its own seed, so concurrent
users never see each other's noise. Bad input (an empty prompt, a file that is no image, an
oversized upload, a slider out of range) answers with a message (`gr.Error`), never a
stack trace. Nothing is fetched from the internet: analytics and the version check are off
(`GRADIO_ANALYTICS_ENABLED=False`) and the theme's fonts ship with gradio.

Needs the `demo` extra: pip install -e ".[demo]".
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no analytics, no version check

import argparse
import contextlib
import functools
import html
import io
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_CHECKPOINT = "runs/mnist/checkpoints/latest.pt"
CREATE_COMMAND = "bash scripts/main.sh"  # the README's main command: trains train_mnist.py and writes the default checkpoint

MAX_FILE_SIZE = "5mb"  # uploads over this are refused by gradio's upload route
MAX_UPLOAD_BYTES = 5 * 1024 * 1024  # and checked again here, for files that reach the function another way
MAX_IMAGE_SIDE = 4096  # pixels; larger images are refused before they are decoded
MAX_AUDIO_SECONDS = 10.0  # speech uploads; the audio model was trained on single words
DISPLAY_SCALE = 8  # the 28×28 digits are shown 224×224 (nearest neighbour) in the page

# (low, high, default) of every number a user can set; out of range → a message naming it
LIMITS = {
    "cfg_scale": (1.0, 10.0, 3.0),
    "steps": (2, 64, 16),
    "seed": (0, 2**31 - 1, 0),
    "num_images": (1, 8, 4),
    "frames": (2, 16, 8),  # video clips; a multiple of the checkpoint's frames per latent tube
}


class DemoInputError(ValueError):
    """Input a user can fix: shown to them as it is (a `gr.Error` in the page)."""


# ------------------------------------------------------------------ the model, without any UI


def parse_digit(prompt) -> int:
    """The one digit a prompt names, in figures or words: "7", "seven", "a Seven." → 7."""
    from transfusion_pytorch.examples.mnist import DIGIT_WORDS

    if not isinstance(prompt, str):
        raise DemoInputError(f"`prompt` must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise DemoInputError("`prompt` is empty: type a digit, in words or figures (seven, 7)")
    if len(prompt) > 100:
        raise DemoInputError(f"`prompt` must be at most 100 characters, got {len(prompt)}")
    words = re.findall(r"[a-z]+|\d+", prompt.lower())
    digits = {DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS} | {int(w) for w in words if len(w) == 1 and w.isdigit()}
    if len(digits) != 1:
        found = "none" if not digits else ", ".join(map(str, sorted(digits)))
        raise DemoInputError(f"`prompt` must name one digit, 0-9 or zero-nine (the MNIST model knows only these); got {prompt!r} (digits found: {found})")
    return digits.pop()


def check_number(name: str, value, integer: bool = False) -> float | int:
    """A slider / number field within `LIMITS[name]`, else a DemoInputError naming it."""
    low, high, _ = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise DemoInputError(f"`{name}` must be a number from {low} to {high}, got {value!r}")
    if integer and value != int(value):
        raise DemoInputError(f"`{name}` must be a whole number from {low} to {high}, got {value!r}")
    if not low <= value <= high:
        raise DemoInputError(f"`{name}` must be from {low} to {high}, got {value!r}")
    return int(value) if integer else float(value)


def read_image(path):
    """An uploaded file → a PIL image, refusing what is not one, too large a file or too many pixels."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        raise DemoInputError("`image` is missing: upload an image of a digit")
    path = Path(path)
    if not path.is_file():
        raise DemoInputError("`image` could not be read: the upload did not arrive")
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise DemoInputError(f"`image` is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        image = Image.open(path)
        width, height = image.size  # from the header: nothing is decoded yet
        if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
            raise DemoInputError(f"`image` is {width}×{height} pixels; the limit is {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE}")
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, DemoInputError):
            raise
        raise DemoInputError(f"`image` is not a readable image file (PNG, JPEG, GIF, BMP, WebP…): {type(error).__name__}") from None
    return image


def read_audio(path) -> tuple[np.ndarray, int]:
    """An uploaded sound file (WAV, FLAC, OGG) → `(mono float32 wave, sample rate)`, refusing what is
    not one, too large a file or more than MAX_AUDIO_SECONDS."""
    import soundfile

    if path is None:
        raise DemoInputError("`audio` is missing: upload or record a spoken word")
    path = Path(path)
    if not path.is_file():
        raise DemoInputError("`audio` could not be read: the upload did not arrive")
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise DemoInputError(f"`audio` is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        info = soundfile.info(str(path))
        if info.frames / max(info.samplerate, 1) > MAX_AUDIO_SECONDS:
            raise DemoInputError(f"`audio` lasts {info.frames / info.samplerate:.1f} s; the limit is {MAX_AUDIO_SECONDS:g} s")
        wave, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise DemoInputError(f"`audio` is not a readable sound file (WAV, FLAC, OGG): {type(error).__name__}") from None
    if wave.shape[0] == 0:
        raise DemoInputError("`audio` is empty")
    return wave.mean(axis=1), sample_rate


def to_digit_pixels(image) -> torch.Tensor:
    """Any PIL image → `(1, 28, 28)` model pixels in [-1, 1], as the MNIST model was trained on.

    MNIST digits are white on black, their ink scaled to fit 20 × 20 (keeping its aspect) and
    centred by its centre of mass in a 28 × 28 frame (LeCun et al. 1998). An upload is made
    grey (transparent parts filled with the colour opposite to its strokes), inverted when its
    background is light (a dark pen on paper), stretched so the background is 0 and the ink
    255, then framed the same way. A 28 × 28 image is taken as already framed.
    """
    from PIL import Image, ImageOps

    from transfusion_pytorch.examples.mnist import to_model_pixels

    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3] / 255.0
        grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        opaque = alpha > 0.5
        strokes_bright = opaque.any() and grey[opaque].mean() > 127
        fill = 0.0 if strokes_bright else 255.0
        grey = grey * alpha + fill * (1 - alpha)
    else:
        grey = np.asarray(image.convert("L"), dtype=np.float32)

    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    if background > 127:  # dark ink on a light ground
        grey, background = 255.0 - grey, 255.0 - background
    grey = np.clip(grey - background, 0, None)
    peak = float(grey.max())
    if peak > 0:
        grey = grey * (255.0 / peak)

    if grey.shape != (28, 28):
        grey = _frame_like_mnist(grey, Image)
    return to_model_pixels(np.round(grey).astype(np.uint8)[None])[0]


def _frame_like_mnist(grey: np.ndarray, Image) -> np.ndarray:
    """The ink's bounding box scaled to fit 20 × 20, pasted in 28 × 28 with its centre of mass at the centre."""
    ink = grey > 0.25 * max(float(grey.max()), 1e-6)
    if not ink.any():  # a blank upload stays blank
        return np.zeros((28, 28), dtype=np.float32)
    rows, cols = np.nonzero(ink)
    box = grey[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = box.shape
    scale = 20.0 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(box.astype(np.float32)).resize(size, Image.LANCZOS), dtype=np.float32).clip(0, 255)
    total = float(small.sum())
    if total > 0:
        ys, xs = np.indices(small.shape)
        centre_y, centre_x = float((ys * small).sum() / total), float((xs * small).sum() / total)
    else:
        centre_y, centre_x = (small.shape[0] - 1) / 2, (small.shape[1] - 1) / 2
    top = int(np.clip(round(13.5 - centre_y), 0, 28 - small.shape[0]))
    left = int(np.clip(round(13.5 - centre_x), 0, 28 - small.shape[1]))
    frame = np.zeros((28, 28), dtype=np.float32)
    frame[top : top + small.shape[0], left : left + small.shape[1]] = small
    return frame


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model pixels `(n, 1, 28, 28)` → uint8 `(n, 28, 28)`."""
    from transfusion_pytorch.examples.mnist import to_unit_pixels

    return (to_unit_pixels(images[:, 0]) * 255).round().byte().cpu().numpy()


@dataclass
class Generation:
    images: np.ndarray  # uint8 (n, 28, 28)
    sample_text: str  # the decoded interleaved samples


@dataclass
class Caption:
    caption: str
    seen: np.ndarray  # uint8 (28, 28): the image as the model got it
    sample_text: str


@dataclass
class Clip:
    video: torch.Tensor  # (1, 1, f, 32, 32) model pixels
    sample_text: str


class CheckpointDemo:
    """A checkpoint loaded once (its EMA weights when it has them, else the online ones), and
    what every tab needs: one lock, the description, the sample printer.

    Every model call holds the lock and seeds its own generator state (`torch.random.fork_rng`),
    so calls from concurrent threads give exactly what they would give one at a time."""

    kind = ""  # "image" / "video" / "audio": which tabs the page shows
    text_symbols = ""  # text id → the character it writes, for ids below len(text_symbols)

    def __init__(self, model, checkpoint: Path, step: int, weights: str, device: torch.device, args: dict):
        self.model, self.checkpoint, self.step, self.weights, self.device = model, checkpoint, step, weights, device
        self.args = args  # the training script's arguments, as the checkpoint recorded them
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.guided = model.unconditional_prob > 0  # guidance needs conditioning dropout in training
        self.lock = threading.Lock()

    def describe(self) -> str:
        weights = "EMA" if self.weights == "ema" else "online"
        return f"`{self.checkpoint}` — step {self.step}, {self.num_parameters / 1e6:.2f}M parameters, {weights} weights, on {self.device}"

    def seeded(self, seed: int):
        """The lock, no gradients, and the global generators seeded with `seed` and restored after."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.lock)
        stack.enter_context(torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []))
        stack.enter_context(torch.no_grad())
        torch.manual_seed(seed)
        return stack

    def sample_text(self, sample: list) -> str:
        """`print_modality_sample`'s lines, each text item followed by its tokens spelled out."""
        from transfusion_pytorch.helpers import print_modality_sample

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print_modality_sample(sample)
        ids = self.model.ids
        names = {ids.sos: "[sos]", ids.eos: "[eos]", ids.meta: "[meta]", **dict.fromkeys(ids.som, "[som]"), **dict.fromkeys(ids.eom, "[eom]")}
        out = []
        for line, item in zip(printed.getvalue().splitlines(), sample):
            if torch.is_tensor(item) and not item.is_floating_point():
                tokens, chars = [], ""  # shape characters ("7,7") are written as one quoted string
                for i in item.tolist():
                    if i >= ids.char_offset:
                        chars += ids.decode_chars([i])
                        continue
                    if chars:
                        tokens.append(repr(chars))
                        chars = ""
                    symbol = self.text_symbols[i] if i < len(self.text_symbols) else names.get(i, f"<{i}>")
                    tokens.append("␣" if symbol == " " else symbol)
                tokens += [repr(chars)] if chars else []
                line = f"{line}   {' '.join(tokens)}"
            out.append(line)
        return "\n".join(out)


class DigitDemo(CheckpointDemo):
    """A `train_mnist.py` checkpoint: text → image and image → text."""

    kind = "image"

    @property
    def text_symbols(self) -> str:
        from transfusion_pytorch.examples.mnist import ALPHABET

        return ALPHABET

    def text_to_image(self, prompt, cfg_scale=3.0, steps=16, seed=0, num_images=1) -> Generation:
        """`num_images` digits for the prompt; image k of seed s is the same whatever `num_images` is."""
        from train_mnist import IMAGE_SHAPE, generation_prompt

        digit = parse_digit(prompt)
        cfg_scale = check_number("cfg_scale", cfg_scale)
        steps = check_number("steps", steps, integer=True)
        seed = check_number("seed", seed, integer=True)
        num_images = check_number("num_images", num_images, integer=True)
        cfg_scale = cfg_scale if self.guided else 1.0
        samples = []
        with self.seeded(seed):
            for _ in range(num_images):
                prompt_ids = generation_prompt(self.model, digit)  # caption [meta] "7,7" [som]: the image starts at once
                samples.append(self.model.sample(prompt=prompt_ids, max_length=49, fixed_modality_shape=IMAGE_SHAPE, modality_steps=steps, cfg_scale=cfg_scale))
        images = torch.stack([next(item[1] for item in sample if isinstance(item, tuple)) for sample in samples])
        header = f"prompt {prompt!r} → digit {digit}; cfg_scale {cfg_scale:g}, {steps} ODE steps, seed {seed}"
        text = "\n\n".join(f"image {k + 1}:\n{self.sample_text(sample)}" for k, sample in enumerate(samples))
        return Generation(to_uint8(images), f"{header}\n\n{text}")

    def image_to_text(self, image) -> Caption:
        """A PIL image → the word the model writes after it (greedy), as `train_mnist.caption_images` decodes it."""
        from transfusion_pytorch.examples.mnist import decode_caption

        pixels = to_digit_pixels(image).to(self.device)
        with self.lock, torch.no_grad():
            sample = self.model.sample(prompt=(0, pixels), max_length=8, text_temperature=0.0)
        after = sample[-1] if torch.is_tensor(sample[-1]) else torch.empty(0, dtype=torch.long)
        caption = decode_caption(after[1:])  # after[0] is the image's [eom]
        return Caption(caption, to_uint8(pixels[None])[0], self.sample_text(sample))


class VideoDemo(CheckpointDemo):
    """A `train_video.py` checkpoint: text → a clip of a moving digit (`examples.video`)."""

    kind = "video"

    @property
    def text_symbols(self) -> str:
        from transfusion_pytorch.examples.video import ALPHABET, SPACE_ID

        return ALPHABET + " " * (SPACE_ID == len(ALPHABET))

    @property
    def speed_words(self) -> tuple[str, ...]:
        from transfusion_pytorch.examples.video import SPEED_WORDS

        return SPEED_WORDS if len(set(self.args.get("speeds", [2]))) > 1 else ()

    def check_prompt(self, prompt) -> str:
        """ "Three moving left" → "three moving left", or a DemoInputError that says what is understood."""
        from transfusion_pytorch.examples.video import DIRECTIONS, parse_caption

        if not isinstance(prompt, str) or not prompt.strip():
            raise DemoInputError('`prompt` is empty: type a digit and a direction, e.g. "three moving left"')
        caption = " ".join(prompt.lower().split())
        parsed = parse_caption(caption)
        words = caption.split()
        speed_ok = len(words) == 3 or (len(words) == 4 and parsed.speed_word in self.speed_words)
        if parsed.digit is None or parsed.direction is None or not speed_ok:
            speeds = f" [{' | '.join(self.speed_words)}]" if self.speed_words else ""
            raise DemoInputError(f"`prompt` must read '<digit> moving <direction>{speeds}' (digits zero-nine; {', '.join(DIRECTIONS)}); got {prompt!r}")
        return caption

    def text_to_video(self, prompt, cfg_scale=3.0, steps=16, seed=0, frames=None) -> Clip:
        """One clip for the prompt, `frames` long (default: the length the checkpoint was trained on)."""
        from transfusion_pytorch.examples.video import generate_clips, generation_prompt

        caption = self.check_prompt(prompt)
        cfg_scale = check_number("cfg_scale", cfg_scale)
        steps = check_number("steps", steps, integer=True)
        seed = check_number("seed", seed, integer=True)
        frames = self.args.get("frames", 8) if frames is None else check_number("frames", frames, integer=True)
        tube = self.model.modality_heads[0].encoder.frame_patch_size
        if frames % tube:
            raise DemoInputError(f"`frames` must be a multiple of {tube} (frames per latent tube), got {frames}")
        cfg_scale = cfg_scale if self.guided else 1.0
        with self.seeded(seed):
            video = generate_clips(self.model, [caption], frames=frames, modality_steps=steps, cfg_scale=cfg_scale)
        prompt_ids = generation_prompt(self.model, caption, frames).cpu()
        header = f"prompt {prompt!r}; {frames} frames, cfg_scale {cfg_scale:g}, {steps} ODE steps, seed {seed}"
        return Clip(video, f"{header}\n\nprompt + generated clip:\n{self.sample_text([prompt_ids, (0, video[0].cpu())])}")


class AudioDemo(CheckpointDemo):
    """A `train_audio.py` checkpoint: text → speech and speech → text (`examples.audio`), through
    the log-mel codec saved in the checkpoint's `extra`."""

    kind = "audio"

    def __init__(self, *args, codec):
        super().__init__(*args)
        self.codec = codec

    @property
    def text_symbols(self) -> str:
        from transfusion_pytorch.examples.audio import CAPTION_ALPHABET

        return CAPTION_ALPHABET

    def text_to_speech(self, prompt, cfg_scale=3.0, steps=16, seed=0) -> tuple[np.ndarray, int]:
        """A word or a few ("seven") → `(waveform, sample rate)`; the model writes the clip's length itself."""
        from transfusion_pytorch.examples import audio

        if not isinstance(prompt, str) or not prompt.strip():
            raise DemoInputError('`prompt` is empty: type a word to speak, e.g. "seven"')
        if len(prompt) > 100:
            raise DemoInputError(f"`prompt` must be at most 100 characters, got {len(prompt)}")
        text = " ".join(prompt.lower().split())
        if any(char not in audio.CAPTION_ALPHABET for char in text):
            raise DemoInputError(f"`prompt` may use only the letters a-z, spaces and apostrophes (the model's characters), got {prompt!r}")
        cfg_scale = check_number("cfg_scale", cfg_scale)
        steps = check_number("steps", steps, integer=True)
        seed = check_number("seed", seed, integer=True)
        with self.seeded(seed):  # text_to_speech seeds the CPU generator; this also forks and seeds CUDA's
            try:
                return audio.text_to_speech(self.model, self.codec, text, cfg_scale=cfg_scale, steps=steps, seed=seed)
            except RuntimeError as error:  # the model wrote no clip for this prompt and seed
                raise DemoInputError(f"{error}; try another seed") from None

    def speech_to_text(self, wave: np.ndarray, sample_rate: int) -> str:
        """A mono waveform → the model's greedy caption."""
        from transfusion_pytorch.examples import audio

        with self.lock:
            return audio.speech_to_text(self.model, self.codec, wave, sample_rate)


def load_demo(checkpoint: str | os.PathLike, device: str = "auto", weights: str = "ema") -> CheckpointDemo:
    """The demo for a checkpoint, chosen by the modalities its saved config holds."""
    import json

    from transfusion_pytorch import Transfusion
    from transfusion_pytorch.training import load_checkpoint, read_checkpoint, resolve_device

    if weights not in ("ema", "model"):
        raise ValueError(f"`weights` must be 'ema' or 'model', got {weights!r}")
    device, checkpoint = resolve_device(device), Path(checkpoint)
    model = Transfusion.from_checkpoint(checkpoint)
    payload = read_checkpoint(checkpoint)
    try:
        args = json.loads((payload["extra"] or {}).get("args", "{}"))
    except (TypeError, ValueError):
        args = {}
    extra = payload["extra"] or {}
    encoder = type(model.modality_heads[0].encoder).__name__ if model.num_modalities == 1 else None
    if encoder == "NoneType" and "codec" in extra:  # train_audio.py: a 1-D latent, its codec outside the model
        encoder = "LogMelCodec"
    kinds = {("Patchify", 26): DigitDemo, ("VideoEncoder", 27): VideoDemo, ("VideoPatchify", 27): VideoDemo, ("LogMelCodec", 28): AudioDemo}
    demo_class = kinds.get((encoder, model.config.get("num_text_tokens")))
    if demo_class is None:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} holds {model.num_modalities} modalities (encoder {encoder}) and "
            f"{model.config.get('num_text_tokens')} text tokens; demo.py serves checkpoints of train_mnist.py, train_video.py and train_audio.py"
        )
    options = {}
    if demo_class is AudioDemo:
        from transfusion_pytorch.examples.audio import LogMelCodec

        options["codec"] = LogMelCodec.from_state(extra["codec"])
    if weights == "ema" and payload["ema"] is not None:
        ema = model.create_ema()
        step = load_checkpoint(checkpoint, model, ema=ema, restore_rng=False)["step"]
        model = ema.ema_model
    else:
        weights, step = "model", payload["step"]
    return demo_class(model.to(device).eval(), checkpoint, step, weights, device, args, **options)


# ------------------------------------------------------------------ the page and its API


def enlarge(image: np.ndarray, scale: int = DISPLAY_SCALE) -> np.ndarray:
    """A 28×28 digit at `scale`× with square pixels, so the page shows what the model drew."""
    return np.kron(image, np.ones((scale, scale), dtype=image.dtype))


def user_error(fn):
    """DemoInputError (and any ValueError from checking the input) → a gr.Error the page shows."""
    import gradio as gr

    @functools.wraps(fn)  # the API takes its parameter names from fn's signature
    def wrapped(*args):
        try:
            return fn(*args)
        except ValueError as error:
            raise gr.Error(html.escape(str(error)), print_exception=False) from None  # the message is HTML: show the user's text as text

    return wrapped


MODEL_EVENTS = dict(concurrency_limit=1, concurrency_id="model")  # one model call at a time, across every tab and endpoint


def generation_controls(gr, demo: CheckpointDemo) -> list:
    """CFG scale, ODE steps and seed, in a row."""
    guidance_note = "classifier-free guidance" if demo.guided else "no effect: this model was trained without conditioning dropout"
    return [
        gr.Slider(*LIMITS["cfg_scale"][:2], value=LIMITS["cfg_scale"][2], step=0.5, label=f"CFG scale ({guidance_note})"),
        gr.Slider(*LIMITS["steps"][:2], value=LIMITS["steps"][2], step=1, label="ODE steps"),
        gr.Number(value=LIMITS["seed"][2], label=f"Seed (0 to {LIMITS['seed'][1]})"),  # no bounds here: check_number's message names it
    ]


def api_generation_inputs(gr) -> list:
    """The API's `prompt, cfg_scale, steps, seed` (hidden): plain numbers, checked by check_number,
    so a message names the parameter (a slider would answer with its own, nameless one)."""
    return [gr.Textbox(label="prompt", value=""), *(gr.Number(value=LIMITS[name][2], label=name) for name in ("cfg_scale", "steps", "seed"))]


def image_tabs(gr, demo: DigitDemo) -> None:
    """Text → image and image → text; the endpoints `/text_to_image` and `/image_to_text`."""

    class DigitUpload(gr.Image):
        """gr.Image whose upload is checked by `read_image` first, so a file that is no image (or too
        large an image) gets its message in the page rather than gradio's bare "Error"."""

        is_template = True  # gradio's way of varying a component: the page renders it as a gr.Image

        def preprocess(self, payload):
            if payload is not None and payload.path is not None:
                user_error(read_image)(payload.path)
            return super().preprocess(payload)

    @user_error
    def generate_for_page(prompt, cfg_scale, steps, seed, num_images):
        result = demo.text_to_image(prompt, cfg_scale, steps, seed, num_images)
        return [enlarge(image) for image in result.images], result.sample_text

    @user_error
    def text_to_image(prompt, cfg_scale, steps, seed):
        """One digit for `prompt` (a digit in words or figures) → a 28×28 grey PNG."""
        return demo.text_to_image(prompt, cfg_scale, steps, seed, 1).images[0]

    @user_error
    def caption_for_page(path):
        result = demo.image_to_text(read_image(path))
        caption = result.caption or "(the model wrote no letters)"
        return caption, enlarge(result.seen), result.sample_text

    @user_error
    def image_to_text(path):
        """An image file of a digit → the caption the model writes for it (a digit word)."""
        return demo.image_to_text(read_image(path)).caption

    with gr.Tab("Text → image"):
        prompt = gr.Textbox(label="Prompt: a digit in words or figures", placeholder="seven", value="seven", max_lines=1, elem_id="prompt")
        with gr.Row():
            controls = generation_controls(gr, demo)
            num_images = gr.Slider(*LIMITS["num_images"][:2], value=LIMITS["num_images"][2], step=1, label="Number of images")
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        gallery = gr.Gallery(label="Generated digits (28×28, shown 8× enlarged)", columns=4, format="png", elem_id="gallery")
        generated_text = gr.Textbox(label="Interleaved sample (print_modality_sample)", lines=8, elem_id="generated-sample")
    with gr.Tab("Image → text"):
        with gr.Row():
            upload = DigitUpload(
                type="filepath",
                sources=["upload", "clipboard"],
                label=f"A digit (any image, up to {MAX_FILE_SIZE.upper()}, {MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE} px)",
            )
            seen = gr.Image(label="What the model sees (28×28, 8× enlarged)", interactive=False, format="png")
        caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
        caption = gr.Textbox(label="Caption", elem_id="caption")
        caption_text = gr.Textbox(label="Interleaved sample (print_modality_sample)", lines=5)
    with gr.Row(visible=False):  # the API endpoints: one image file out, one file in
        api_inputs = api_generation_inputs(gr)
        api_image, api_file, api_caption = gr.Image(format="png", label="image"), gr.File(type="filepath", label="image"), gr.Textbox(label="caption")
        api_text_to_image, api_image_to_text = gr.Button("text_to_image"), gr.Button("image_to_text")

    page_inputs = [prompt, *controls, num_images]
    for trigger in (generate.click, prompt.submit):
        trigger(generate_for_page, page_inputs, [gallery, generated_text], api_visibility="private", **MODEL_EVENTS)
    caption_button.click(caption_for_page, [upload], [caption, seen, caption_text], api_visibility="private", **MODEL_EVENTS)
    api_text_to_image.click(text_to_image, api_inputs, [api_image], api_name="text_to_image", **MODEL_EVENTS)
    api_image_to_text.click(image_to_text, [api_file], [api_caption], api_name="image_to_text", **MODEL_EVENTS)


def video_tab(gr, demo: VideoDemo) -> None:
    """Text → video, an animated GIF; the endpoint `/text_to_video`."""
    from transfusion_pytorch.examples.video import save_gif

    folder = Path(tempfile.mkdtemp(prefix="transfusion-demo-"))  # gradio copies each output into its own cache

    def gif(clip: Clip) -> str:
        handle, path = tempfile.mkstemp(suffix=".gif", dir=folder)
        os.close(handle)
        return str(save_gif(clip.video, path, scale=DISPLAY_SCALE))

    @user_error
    def generate_for_page(prompt, cfg_scale, steps, seed, frames):
        clip = demo.text_to_video(prompt, cfg_scale, steps, seed, frames)
        return gif(clip), clip.sample_text

    @user_error
    def text_to_video(prompt, cfg_scale, steps, seed):
        """One clip for `prompt` ("three moving left") → an animated GIF of the trained length."""
        return gif(demo.text_to_video(prompt, cfg_scale, steps, seed))

    trained_frames = demo.args.get("frames", 8)
    tube = demo.model.modality_heads[0].encoder.frame_patch_size
    speeds = f" [{' | '.join(demo.speed_words)}]" if demo.speed_words else ""
    with gr.Tab("Text → video"):
        prompt = gr.Textbox(label=f"Prompt: <digit> moving <left | right | up | down>{speeds}", value="three moving left", max_lines=1, elem_id="video-prompt")
        with gr.Row():
            controls = generation_controls(gr, demo)
            frames = gr.Slider(tube, LIMITS["frames"][1], value=trained_frames, step=tube, label=f"Frames (trained on {trained_frames})")
        generate = gr.Button("Generate", variant="primary", elem_id="generate-video")
        video = gr.Image(type="filepath", label="Generated clip (32×32 frames, 8× enlarged)", interactive=False, elem_id="video")
        generated_text = gr.Textbox(label="Interleaved sample (print_modality_sample)", lines=6)
    with gr.Row(visible=False):
        api_inputs = api_generation_inputs(gr)
        api_video, api_text_to_video = gr.File(label="video"), gr.Button("text_to_video")
    for trigger in (generate.click, prompt.submit):
        trigger(generate_for_page, [prompt, *controls, frames], [video, generated_text], api_visibility="private", **MODEL_EVENTS)
    api_text_to_video.click(text_to_video, api_inputs, [api_video], api_name="text_to_video", **MODEL_EVENTS)


def audio_tabs(gr, demo: AudioDemo) -> None:
    """Text → speech and speech → text; the endpoints `/text_to_speech` and `/speech_to_text`."""
    from transfusion_pytorch.examples.audio import write_wav

    folder = Path(tempfile.mkdtemp(prefix="transfusion-demo-"))

    class SpeechUpload(gr.Audio):
        """gr.Audio whose upload is checked by `read_audio` first (its message, not a bare "Error")."""

        is_template = True

        def preprocess(self, payload):
            if payload is not None and payload.path:
                user_error(read_audio)(payload.path)
            return super().preprocess(payload)

    def wav(wave: np.ndarray, sample_rate: int) -> str:
        handle, path = tempfile.mkstemp(suffix=".wav", dir=folder)
        os.close(handle)
        return str(write_wav(path, wave, sample_rate))

    @user_error
    def text_to_speech(prompt, cfg_scale, steps, seed):
        """A word ("seven") → a WAV file of the model speaking it."""
        return wav(*demo.text_to_speech(prompt, cfg_scale, steps, seed))

    @user_error
    def speech_to_text(path):
        """A sound file of a spoken word (WAV, FLAC, OGG) → the text the model writes for it."""
        return demo.speech_to_text(*read_audio(path))

    @user_error
    def caption_for_page(path):
        return speech_to_text(path) or "(the model wrote no letters)"

    with gr.Tab("Text → speech"):
        prompt = gr.Textbox(label="Prompt: a word to speak", value="seven", max_lines=1, elem_id="speech-prompt")
        with gr.Row():
            controls = generation_controls(gr, demo)
        speak = gr.Button("Speak", variant="primary", elem_id="speak")
        spoken = gr.Audio(type="filepath", label="Generated speech (16 kHz; phase by Griffin-Lim)", interactive=False, elem_id="spoken")
    with gr.Tab("Speech → text"):
        upload = SpeechUpload(
            type="filepath",
            format=None,
            sources=["upload", "microphone"],
            label=f"A spoken word (WAV / FLAC / OGG, up to {MAX_AUDIO_SECONDS:g} s and {MAX_FILE_SIZE.upper()})",
        )
        transcribe = gr.Button("Transcribe", variant="primary", elem_id="transcribe")
        caption = gr.Textbox(label="Text", elem_id="transcript")
    with gr.Row(visible=False):
        api_inputs = api_generation_inputs(gr)
        api_wav, api_file, api_caption = gr.File(label="audio"), gr.File(type="filepath", label="audio"), gr.Textbox(label="text")
        api_text_to_speech, api_speech_to_text = gr.Button("text_to_speech"), gr.Button("speech_to_text")

    @user_error
    def speak_for_page(prompt, cfg_scale, steps, seed):  # its own name: a private event would take the API's
        return wav(*demo.text_to_speech(prompt, cfg_scale, steps, seed))

    for trigger in (speak.click, prompt.submit):
        trigger(speak_for_page, [prompt, *controls], [spoken], api_visibility="private", **MODEL_EVENTS)
    transcribe.click(caption_for_page, [upload], [caption], api_visibility="private", **MODEL_EVENTS)
    api_text_to_speech.click(text_to_speech, api_inputs, [api_wav], api_name="text_to_speech", **MODEL_EVENTS)
    api_speech_to_text.click(speech_to_text, [api_file], [api_caption], api_name="speech_to_text", **MODEL_EVENTS)


def build_app(demo: CheckpointDemo):
    """The Gradio Blocks for `demo`: the tabs (and API endpoints) of its checkpoint's modalities."""
    import gradio as gr

    title = {"image": "text ↔ image", "video": "text → video", "audio": "text ↔ speech"}[demo.kind]
    with gr.Blocks(title="Transfusion demo", analytics_enabled=False) as app:
        gr.Markdown(f"# Transfusion: {title}\n{demo.describe()}")
        {"image": image_tabs, "video": video_tab, "audio": audio_tabs}[demo.kind](gr, demo)
    app.queue(default_concurrency_limit=1, max_size=256)
    return app


def main(args):
    from transfusion_pytorch.training import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as error:
        sys.exit(f"demo.py: {error}")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        sys.exit(f"demo.py: no checkpoint at {checkpoint}.\nCreate it with:  {CREATE_COMMAND}   (trains train_mnist.py, ~13 minutes on 2 CPU cores)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit('demo.py needs gradio: pip install -e ".[demo]"')
    torch.set_num_threads(args.threads)
    try:
        demo = load_demo(checkpoint, device=args.device, weights=args.weights)
    except ValueError as error:  # a damaged file, a checkpoint of another task
        sys.exit(f"demo.py: {error}")
    print(f"serving {demo.describe()}")
    app = build_app(demo)
    launch(app, args.host, args.port)
    return app


def launch(app, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True):
    """Serve `app`; `block=False` returns at once (the tests)."""
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=MAX_FILE_SIZE,
        share=False,
        inbrowser=False,
        show_error=False,  # only gr.Error messages reach the page; anything else is a plain "Error"
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return app


def build_parser() -> argparse.ArgumentParser:
    from transfusion_pytorch.training import device_argument

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", default=DEFAULT_CHECKPOINT, help=f"a train_mnist.py, train_video.py or train_audio.py checkpoint (default: {DEFAULT_CHECKPOINT})"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", type=device_argument, help="auto: cuda when there is one, else cpu")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="the EMA weights (when the checkpoint has them) or the online ones")
    parser.add_argument("--threads", type=int, default=2)
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
