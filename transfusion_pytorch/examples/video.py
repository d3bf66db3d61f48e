"""Moving MNIST digits for the text ↔ video example (`train_video.py`): clips, captions, judges, GIFs.

A clip is one real MNIST digit (from `mnist.load_digits`, the loader of `train_mnist.py`),
cut to the 20×20 box MNIST centres its digits in, moving inside a 32×32 frame in one of four
directions at a whole number of pixels per frame, bouncing off the walls: `(1, f, 32, 32)`
in [-1, 1], background -1. The start is drawn so that the digit travels in its direction
for at least `MIN_RUN` frame steps before a wall turns it, so the direction is visible in
every clip. With more than one speed, the caption also names the speed.

Captions are words through the MNIST example's tokenizer, one id per letter, plus one id
for the space between words: "three moving left" (17 ids), "three moving left quickly".

Judges (they score clips, generated or real; `train_video.py` also reports them on real
held-out clips, where they should be right every time):

  - digit: every frame is cropped to a 20×20 window at its intensity centroid, padded back to
    28×28 and read by `judges.DigitClassifier` (trained on the training digits passed
    through the same cut-and-pad); the clip's digit is the majority over frames.
  - direction: the intensity-centroid track of the clip is fitted by least squares with
    every trajectory the data could hold (4 directions × speeds × start positions, with the
    bounces; a free offset absorbs where the centroid sits inside the digit), and the best
    fit names the direction. A clip whose centroid moves less than a real digit's would
    (the "static" fit is better than every moving one) gets no direction: wrong.

For the demo: `load_sampler(checkpoint)`, `generate_clips(sampler, captions, frames)`,
`save_gif(videos, path)` turn a prompt into a GIF (see `prompt_to_gif`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .._typing import Float, Int
from .judges import DigitClassifier, classify, train_classifier
from .mnist import ALPHABET, DIGIT_WORDS, to_unit_pixels
from .mnist import decode_caption as decode_word
from .mnist import encode_caption as encode_word

FRAME_SIZE = 32
DIGIT_SIZE = 20  # MNIST fits its digits in a 20×20 box centred in 28×28; clips show that box
DIGIT_MARGIN = (28 - DIGIT_SIZE) // 2
LIMIT = FRAME_SIZE - DIGIT_SIZE  # the digit's top-left corner stays in [0, LIMIT] on both axes
MIN_RUN = 3  # frame steps a digit moves in its direction before it may bounce
DIRECTIONS = ("left", "right", "up", "down")
UNIT_VELOCITY = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
SPEED_WORDS = ("slowly", "quickly")  # with two speeds: the slower, the faster

SPACE_ID = len(ALPHABET)  # 26: between words; the letters are MNIST's ids 0-25
NUM_TEXT_TOKENS = len(ALPHABET) + 1


# ------------------------------------------------------------------ captions


def caption_text(label: int, direction: int, speed: int | None = None, speeds: tuple[int, ...] = (2,)) -> str:
    """`(3, 0)` → "three moving left"; with two `speeds`, the speed as a word: "three moving left quickly"."""
    words = [DIGIT_WORDS[label], "moving", DIRECTIONS[direction]]
    if len(speeds) > 1:
        if speed not in speeds:
            raise ValueError(f"`speed` must be one of {speeds}, got {speed!r}")
        words.append(SPEED_WORDS[sorted(speeds).index(speed)])
    return " ".join(words)


def encode_caption(text: str) -> Int["n"]:
    """ "three moving left" → letter ids (MNIST's tokenizer) with `SPACE_ID` between the words."""
    if not isinstance(text, str) or not text.split():
        raise ValueError(f"`text` must be a non-empty string of words, got {text!r}")
    ids: list[int] = []
    for word in text.split():
        ids += ([SPACE_ID] if ids else []) + encode_word(word).tolist()
    return torch.tensor(ids, dtype=torch.long)


def decode_caption(ids) -> str:
    """Text ids → the words they spell, up to the first id that is neither a letter nor a space."""
    words, word = [], []
    for i in torch.as_tensor(ids).reshape(-1).tolist():
        if i == SPACE_ID:
            words.append(decode_word(word))
            word = []
        elif 0 <= i < SPACE_ID:
            word.append(i)
        else:
            break
    words.append(decode_word(word))
    return " ".join(w for w in words if w)


@dataclass
class ParsedCaption:
    digit: int | None
    direction: int | None
    speed_word: str | None


def parse_caption(text: str) -> ParsedCaption:
    """The digit and direction a caption states (None where it states none or something else)."""
    words = text.split()
    digit = DIGIT_WORDS.index(words[0]) if words and words[0] in DIGIT_WORDS else None
    direction = DIRECTIONS.index(words[2]) if len(words) > 2 and words[1] == "moving" and words[2] in DIRECTIONS else None
    speed_word = words[3] if len(words) > 3 and words[3] in SPEED_WORDS else None
    return ParsedCaption(digit, direction, speed_word)


# ------------------------------------------------------------------ clips


def digit_boxes(images: Float["n 1 28 28"]) -> Float["n 1 20 20"]:
    """28×28 digits → their central 20×20 box (MNIST's digits are scaled into 20×20 and
    centred by mass, so the box holds ~97 % of the ink), still in [-1, 1]. A whole digit at this
    size covers ~40 % of a 32×32 frame: the shape stays legible in 4×4 patches, for the model
    as for the judge (an earlier 14×14 version, 2×2 average pooled, did not learn in budget)."""
    m = DIGIT_MARGIN
    return images.float()[..., m : m + DIGIT_SIZE, m : m + DIGIT_SIZE]


def bounce(start: Tensor, velocity: Tensor, frames: int) -> Tensor:
    """Positions in [0, LIMIT] of a corner moving at `velocity` px/frame from `start`, reflected
    at both walls: `(..., frames)` integer tensor (a triangle wave of period 2·LIMIT)."""
    free = start[..., None] + velocity[..., None] * torch.arange(frames, device=start.device)
    period = 2 * LIMIT
    folded = free.remainder(period)
    return torch.where(folded > LIMIT, period - folded, folded)


@dataclass
class Motions:
    """One motion per clip: `direction (n,)` index into DIRECTIONS, `speed (n,)` px/frame,
    `start (n, 2)` the digit's top-left corner (y, x) in the first frame."""

    direction: Tensor
    speed: Tensor
    start: Tensor

    def velocity(self) -> Tensor:
        """`(n, 2)` signed (dy, dx) px/frame."""
        units = torch.tensor([UNIT_VELOCITY[d] for d in DIRECTIONS])
        return units[self.direction] * self.speed[:, None]


def start_range(direction: int, speed: int) -> tuple[int, int]:
    """Starts on the moving axis (inclusive) from which the digit runs `MIN_RUN` steps before a wall."""
    dy, dx = UNIT_VELOCITY[DIRECTIONS[direction]]
    sign = dy + dx
    run = speed * MIN_RUN
    if run > LIMIT:
        raise ValueError(f"`speed` {speed} is too fast: {MIN_RUN} frame steps would cross the whole {LIMIT}-pixel track")
    return (run, LIMIT) if sign < 0 else (0, LIMIT - run)


def draw_motions(count: int, speeds: tuple[int, ...], generator: torch.Generator) -> Motions:
    """`count` motions: a uniform direction and speed, a start that leaves `MIN_RUN` steps before a bounce."""
    direction = torch.randint(0, len(DIRECTIONS), (count,), generator=generator)
    speed = torch.tensor(speeds)[torch.randint(0, len(speeds), (count,), generator=generator)]
    uniform = torch.rand(count, 2, generator=generator)
    start = torch.empty(count, 2, dtype=torch.long)
    for i, (d, s) in enumerate(zip(direction.tolist(), speed.tolist())):
        low, high = start_range(d, s)
        moving_axis = 1 if DIRECTIONS[d] in ("left", "right") else 0
        start[i, moving_axis] = low + int(uniform[i, moving_axis] * (high - low + 1))
        start[i, 1 - moving_axis] = int(uniform[i, 1 - moving_axis] * (LIMIT + 1))
    return Motions(direction, speed, start)


def render_clips(digits: Float["n 1 20 20"], motions: Motions, frames: int | list[int]) -> list[Tensor]:
    """Each digit pasted along its motion into 32×32 frames: a list of `(1, f, 32, 32)` clips in
    [-1, 1] (one frame count for all, or one per clip)."""
    counts = [frames] * len(digits) if isinstance(frames, int) else list(frames)
    if len(counts) != len(digits):
        raise ValueError(f"`frames` must be one count or one per digit ({len(digits)}), got {len(counts)}")
    velocity, device = motions.velocity(), digits.device
    pixel = torch.arange(FRAME_SIZE, device=device)
    clips: list[Tensor] = [digits.new_empty(0)] * len(digits)
    for f in sorted(set(counts)):  # the clips of one frame count at once
        group = torch.tensor([i for i, count in enumerate(counts) if count == f], dtype=torch.long)
        corner = [bounce(motions.start[group, axis], velocity[group, axis], f).to(device) for axis in (0, 1)]  # (g, f) each: y, x
        rows, cols = (pixel - c[..., None] for c in corner)  # (g, f, 32): the digit's row / column under each pixel
        inside = ((rows >= 0) & (rows < DIGIT_SIZE))[..., :, None] & ((cols >= 0) & (cols < DIGIT_SIZE))[..., None, :]
        boxes = digits[group.to(device), 0]  # (g, 20, 20)
        pixels = boxes[
            torch.arange(len(group), device=device)[:, None, None, None],
            rows.clamp(0, DIGIT_SIZE - 1)[..., :, None],
            cols.clamp(0, DIGIT_SIZE - 1)[..., None, :],
        ]  # (g, f, 32, 32)
        rendered = torch.where(inside, pixels, -1.0)  # the background is -1, as the digit's own margin
        for j, i in enumerate(group.tolist()):
            clips[i] = rendered[j, None]
    return clips


def warp_digits(
    boxes: Float["n 1 20 20"], generator: torch.Generator, degrees: float = 15.0, zoom: tuple[float, float] = (0.85, 1.05), shear: float = 0.2
) -> Float["n 1 20 20"]:
    """Each box through its own random affine map about its centre — a rotation of up to
    `degrees`, a zoom in `zoom`, a shear of up to `shear` — with bilinear sampling and the
    background (-1) coming in at the edges: the distortions of Simard et al. 2003 ("Best
    practices for CNNs applied to visual document analysis") that make a few thousand MNIST
    digits stand for many more. The parameters come from `generator` (on the CPU)."""
    if not degrees >= 0 or not shear >= 0:
        raise ValueError(f"`degrees` and `shear` must be >= 0, got {degrees} and {shear}")
    if len(zoom) != 2 or not 0 < zoom[0] <= zoom[1]:
        raise ValueError(f"`zoom` must be (low, high) with 0 < low <= high, got {zoom}")
    n = len(boxes)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    scale = zoom[0] + (zoom[1] - zoom[0]) * torch.rand(n, generator=generator)
    slant = (torch.rand(n, generator=generator) * 2 - 1) * shear
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), 1)  # (n, 2, 2)
    shearing = torch.eye(2).repeat(n, 1, 1)
    shearing[:, 0, 1] = slant
    linear = rotation @ shearing / scale[:, None, None]  # output → input coordinates (affine_grid's convention)
    theta = torch.cat((linear, torch.zeros(n, 2, 1)), dim=2).to(boxes)  # no translation: the motion places the box
    grid = F.affine_grid(theta, list(boxes.shape), align_corners=False)
    ink = F.grid_sample(boxes + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # 0 outside the box
    return ink - 1.0


# every random stream of the data, by seed and epoch: training motions at offset 0 (epoch e), the held-out motions
# at 99,991 and the warps at 7,919,000 — apart from each other for any run shorter than ~18,000 epochs
MOTIONS_STREAM, EVAL_STREAM, WARP_STREAM = 0, 99_991, 7_919_000


def data_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one stream (`MOTIONS_STREAM`, `EVAL_STREAM`, `WARP_STREAM`) of `seed` in `epoch`."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch + stream)


class MovingDigits:
    """Training clips: item `i` is digit `i` of `images` with `frames[i]` frames (fixed, so a
    `BucketBatchSampler` can group the items by length) and a motion drawn afresh each epoch
    from `(seed, epoch)`; `clips(..., warp=mask)` also distorts the digits of the masked clips
    (`warp_digits`, from the same `(seed, epoch)` on a stream of its own, so the motions do not
    change with it). Everything is drawn on the CPU: the same clips on every device."""

    def __init__(self, images: Float["n 1 28 28"], labels: Int["n"], frames: list[int], speeds: tuple[int, ...] = (2,), seed: int = 0):
        if len(frames) != len(labels) or len(images) != len(labels):
            raise ValueError(f"`images`, `labels` and `frames` must have one entry per digit, got {len(images)}, {len(labels)}, {len(frames)}")
        self.digits, self.labels, self.frames = digit_boxes(images).cpu(), labels.cpu(), list(frames)
        self.speeds, self.seed = tuple(speeds), seed
        self._epoch: tuple[int, Motions] | None = None
        self._warped: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def motions(self, epoch: int) -> Motions:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = data_generator(self.seed, epoch, MOTIONS_STREAM)
            self._epoch = (epoch, draw_motions(len(self), self.speeds, generator))
        return self._epoch[1]

    def warped(self, epoch: int) -> Float["n 1 20 20"]:
        """Every digit distorted as it is in `epoch` (`warp_digits`)."""
        if self._warped is None or self._warped[0] != epoch:
            generator = data_generator(self.seed, epoch, WARP_STREAM)
            self._warped = (epoch, warp_digits(self.digits, generator))
        return self._warped[1]

    def clips(self, indices: list[int], epoch: int, warp: Tensor | None = None) -> tuple[list[Tensor], list[str]]:
        """The clips `(1, f, 32, 32)` of `indices` in `epoch`, and their captions; the digits of
        the clips where the boolean `warp` (one per index) is true are distorted."""
        all_motions = self.motions(epoch)
        index = torch.tensor(indices, dtype=torch.long)
        motions = Motions(all_motions.direction[index], all_motions.speed[index], all_motions.start[index])
        digits = self.digits[index]
        if warp is not None:
            if not isinstance(warp, Tensor) or warp.dtype != torch.bool or warp.shape != (len(indices),):
                raise TypeError(f"`warp` must be a boolean tensor with one entry per index ({len(indices)}), got {warp!r}")
            digits = torch.where(warp[:, None, None, None], self.warped(epoch)[index], digits)
        clips = render_clips(digits, motions, [self.frames[i] for i in indices])
        captions = [
            caption_text(label, direction, speed, self.speeds)
            for label, direction, speed in zip(self.labels[index].tolist(), motions.direction.tolist(), motions.speed.tolist())
        ]
        return clips, captions


@dataclass
class EvalClips:
    """Held-out clips: `videos (n, 1, f, 32, 32)`, `labels (n,)`, their motions and captions."""

    videos: Tensor
    labels: Tensor
    motions: Motions
    captions: list[str]


def eval_clips(images: Float["n 1 28 28"], labels: Int["n"], frames: int, speeds: tuple[int, ...] = (2,), seed: int = 0) -> EvalClips:
    """One clip of `frames` frames per held-out digit, with motions drawn from `seed` (on the CPU)."""
    generator = data_generator(seed, 0, EVAL_STREAM)  # apart from every training epoch's
    motions = draw_motions(len(labels), speeds, generator)
    videos = torch.stack(render_clips(digit_boxes(images).cpu(), motions, frames))
    captions = [caption_text(lab, d, s, speeds) for lab, d, s in zip(labels.tolist(), motions.direction.tolist(), motions.speed.tolist())]
    return EvalClips(videos, labels.cpu(), motions, captions)


def frame_counts(count: int, min_frames: int, max_frames: int, step: int, generator: torch.Generator) -> list[int]:
    """A frame count per clip, uniform over `min_frames, min_frames + step, …, max_frames`."""
    choices = list(range(min_frames, max_frames + 1, step))
    return [choices[i] for i in torch.randint(0, len(choices), (count,), generator=generator).tolist()]


# ------------------------------------------------------------------ judges


def intensity(videos: Tensor) -> Tensor:
    """Model pixels → ink weights for centroids: [0, 1] intensity minus a floor of 0.25, so faint
    noise on the background moves no centroid."""
    return (to_unit_pixels(videos) - 0.25).clamp(min=0.0)


def centroid_tracks(videos: Float["n 1 f h w"]) -> Float["n f 2"]:
    """The intensity centroid `(y, x)` of every frame (a blank frame: the frame's centre)."""
    weights = intensity(videos)[:, 0]  # (n, f, h, w)
    mass = weights.sum(dim=(-2, -1))
    grid = torch.arange(videos.shape[-1], dtype=weights.dtype, device=weights.device)
    y = (weights.sum(-1) * grid[: videos.shape[-2]]).sum(-1) / mass.clamp(min=1e-6)
    x = (weights.sum(-2) * grid).sum(-1) / mass.clamp(min=1e-6)
    centre = (videos.shape[-1] - 1) / 2
    track = torch.stack((y, x), dim=-1)
    return torch.where(mass[..., None] > 1e-6, track, torch.full_like(track, centre))


def crop_digits(videos: Float["n 1 f 32 32"]) -> Float["m 1 28 28"]:
    """Every frame's 20×20 window at its centroid, padded to 28×28: `(n·f, 1, 28, 28)`, in clip order."""
    n, _, f, _, _ = videos.shape
    corners = (centroid_tracks(videos) - (DIGIT_SIZE - 1) / 2).round().long().clamp(0, LIMIT).reshape(-1, 2).tolist()
    frames = videos.float().clamp(-1, 1).transpose(1, 2).reshape(n * f, 1, FRAME_SIZE, FRAME_SIZE)
    crops = torch.stack([frame[:, y : y + DIGIT_SIZE, x : x + DIGIT_SIZE] for frame, (y, x) in zip(frames, corners)])
    return pad_digits(crops)


def pad_digits(digits: Float["m 1 20 20"]) -> Float["m 1 28 28"]:
    """20×20 digit boxes → 28×28 MNIST images (background margins), the classifier's input."""
    return F.pad(digits, (DIGIT_MARGIN,) * 4, value=-1.0)


def train_frame_classifier(images: Float["n 1 28 28"], labels: Int["n"], epochs: int = 4, seed: int = 0) -> DigitClassifier:
    """`judges.DigitClassifier` trained on digits as a clip shows them: cut to the 20×20 box and padded back."""
    return train_classifier(pad_digits(digit_boxes(images)), labels, epochs=epochs, seed=seed)


def judge_digits(classifier: DigitClassifier, videos: Float["n 1 f 32 32"]) -> Int["n"]:
    """The digit of each clip: the classifier's reading of every frame, majority over frames
    (a tie goes to the smaller digit)."""
    n, f = videos.shape[0], videos.shape[2]
    per_frame = classify(classifier, crop_digits(videos)).reshape(n, f).cpu()
    votes = F.one_hot(per_frame, 10).sum(dim=1)  # (n, 10)
    return votes.argmax(dim=1)


def candidate_tracks(frames: int, speeds: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Every trajectory the data can hold: corner tracks `(k, frames, 2)` and each one's direction `(k,)`."""
    tracks, directions = [], []
    for direction, name in enumerate(DIRECTIONS):
        dy, dx = UNIT_VELOCITY[name]
        moving_axis = 0 if dy else 1
        for speed in speeds:
            low, high = start_range(direction, speed)
            starts = torch.arange(low, high + 1)
            moving = bounce(starts, torch.full_like(starts, (dy + dx) * speed), frames)  # (s, frames)
            track = torch.zeros(len(starts), frames, 2)
            track[..., moving_axis] = moving.float()  # the still axis: a constant, absorbed by the fit's offset
            tracks.append(track)
            directions += [direction] * len(starts)
    return torch.cat(tracks), torch.tensor(directions)


def judge_directions(videos: Float["n 1 f h w"], speeds: tuple[int, ...] = (2,)) -> list[int | None]:
    """The direction of each clip (index into DIRECTIONS), from its intensity-centroid track: the
    least-squares fit among `candidate_tracks` (each with a free offset per axis); None when
    standing still fits better than every moving candidate."""
    observed = centroid_tracks(videos).cpu().float()  # (n, f, 2)
    tracks, directions = candidate_tracks(videos.shape[2], speeds)  # (k, f, 2)
    residual = observed[:, None] - tracks[None]  # (n, k, f, 2)
    errors = (residual - residual.mean(dim=2, keepdim=True)).square().sum(dim=(2, 3))  # offset fitted out
    still = (observed - observed.mean(dim=1, keepdim=True)).square().sum(dim=(1, 2))
    best_error, best = errors.min(dim=1)
    return [int(directions[b]) if e < s else None for e, s, b in zip(best_error.tolist(), still.tolist(), best.tolist())]


# ------------------------------------------------------------------ sampling with a trained model


def clip_shape(frames: int, frame_patch_size: int = 2, patch_size: int = 4) -> tuple[int, int, int]:
    """Latent token grid of a clip: `(frames / pf, 32 / p, 32 / p)`, e.g. 8 frames → (4, 8, 8)."""
    if frames <= 0 or frames % frame_patch_size:
        raise ValueError(f"`frames` must be a positive multiple of the frame patch size {frame_patch_size}, got {frames}")
    return (frames // frame_patch_size, FRAME_SIZE // patch_size, FRAME_SIZE // patch_size)


def model_clip_shape(model, frames: int) -> tuple[int, int, int]:
    """`clip_shape` for the model's own `VideoPatchify` encoder."""
    encoder = model.modality_heads[0].encoder
    return clip_shape(frames, encoder.frame_patch_size, encoder.patch_size)


def generation_prompt(model, caption: str, frames: int) -> Tensor:
    """`caption [meta] "4,8,8" [som]`: text that opens the clip, so sampling starts with it, at
    the requested number of frames."""
    before, _ = model.ids.modality_wrapper(0, model_clip_shape(model, frames))
    return torch.cat((encode_caption(caption), torch.tensor(before))).to(model.device)


def _network(sampler):
    """The Transfusion that samples: the model itself, or an EMA's copy."""
    return getattr(sampler, "ema_model", sampler)


def generate_clips(sampler, captions: list[str], frames: int = 8, modality_steps: int = 16, cfg_scale: float = 3.0, batch_size: int = 16) -> Tensor:
    """One clip per caption → `(n, 1, frames, 32, 32)` model pixels. `sampler`: a `Transfusion` or
    its EMA. Prompts are sampled `batch_size` at a time (`sample_many`)."""
    model = _network(sampler)
    cfg_scale = cfg_scale if model.unconditional_prob > 0 else 1.0  # no guidance without conditioning dropout
    shape = model_clip_shape(model, frames)
    clips = []
    for start in range(0, len(captions), batch_size):
        prompts = [generation_prompt(model, caption, frames) for caption in captions[start : start + batch_size]]
        samples = model.sample_many(prompts, max_length=math.prod(shape), fixed_modality_shape=shape, modality_steps=modality_steps, cfg_scale=cfg_scale)
        clips += [next(item[1] for item in sample if isinstance(item, tuple)) for sample in samples]
    return torch.stack(clips)


def caption_clips(sampler, videos: Float["n 1 f 32 32"], batch_size: int = 32, max_words_length: int = 32) -> list[str]:
    """Greedy captions of clips: the words written after each clip, up to [eos]."""
    model = _network(sampler)
    words = []
    for start in range(0, len(videos), batch_size):
        prompts = [(0, video.to(model.device)) for video in videos[start : start + batch_size]]
        samples = model.sample_many(prompts, max_length=max_words_length, text_temperature=0.0)
        for sample in samples:
            after = sample[-1] if torch.is_tensor(sample[-1]) else torch.empty(0, dtype=torch.long)
            words.append(decode_caption(after[1:]))  # after[0] is the clip's [eom]
    return words


def load_sampler(checkpoint: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"):
    """A `train_video.py` checkpoint → the `Transfusion` to sample with (its EMA weights by
    default), in eval mode on `device`."""
    from ..training import load_checkpoint
    from ..transfusion import Transfusion

    model = Transfusion.from_checkpoint(checkpoint).to(device)
    if not use_ema:
        return model.eval()
    ema = model.create_ema()
    load_checkpoint(checkpoint, model, ema=ema, restore_rng=False)
    return ema.ema_model.eval()


def save_gif(videos: Float["r c 1 f 32 32"], path: str | Path, scale: int = 2, frame_ms: int = 150) -> Path:
    """A grid of clips `(rows, columns, 1, f, 32, 32)` (or one clip per row, `(rows, 1, f, 32, 32)`)
    → an animated GIF, 2-pixel grey gaps, looping."""
    from PIL import Image

    if videos.ndim == 5:
        videos = videos[:, None]
    rows, columns, _, frames = videos.shape[:4]
    gap, side = 2, FRAME_SIZE
    pixels = (to_unit_pixels(videos[:, :, 0]) * 255).round().byte().cpu()  # (r, c, f, 32, 32)
    canvas = torch.full((frames, rows * (side + gap) + gap, columns * (side + gap) + gap), 128, dtype=torch.uint8)
    for r in range(rows):
        for c in range(columns):
            y, x = gap + r * (side + gap), gap + c * (side + gap)
            canvas[:, y : y + side, x : x + side] = pixels[r, c]
    pictures = [Image.fromarray(frame.numpy()).resize((canvas.shape[2] * scale, canvas.shape[1] * scale), Image.NEAREST) for frame in canvas]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)
    return path


def prompt_to_gif(
    checkpoint: str | Path, prompt: str, path: str | Path, frames: int = 8, cfg_scale: float = 3.0, modality_steps: int = 16, seed: int = 0
) -> Path:
    """The demo's text → video in one call: "three moving left" → a GIF of one generated clip."""
    sampler = load_sampler(checkpoint)
    torch.manual_seed(seed)
    videos = generate_clips(sampler, [prompt], frames=frames, modality_steps=modality_steps, cfg_scale=cfg_scale)
    return save_gif(videos, path, scale=4)
