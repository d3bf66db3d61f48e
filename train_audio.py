"""Text → speech and speech → text on spoken words, with one Transfusion model, on a CPU.

Each training sample is a caption — the word spelled one character per text token ("seven" →
s e v e n, 28 ids: a-z, space, apostrophe) — and its clip, in both orders (65 % speech
generation, 35 % captioning by default, `--caption-fraction`):

    [sos] s e v e n [meta] "13" [som] <13 audio tokens> [eom] [eos]     text → speech
    [sos] [meta] "13" [som] <13 audio tokens> [eom] s e v e n [eos]     speech → text

Audio: `LogMelCodec` (examples/audio.py) turns a 16 kHz clip into a 1D latent — its log-mel
spectrogram (64 bands, 16 ms hop), normalised per band, two frames per token (width 128) —
whose length follows the clip (0.2-0.7 s → 7-23 tokens). The model writes that length after
`[meta]` itself when it speaks. Batches group clips of similar length (`BucketBatchSampler`,
the multi-resolution path), so little of a batch is padding. The decoder inverts the mel
filterbank and recovers a phase with fast Griffin-Lim (`torch.stft` / `torch.istft`).
Why a fixed spectrogram rather than a learnt 1D conv autoencoder: it has nothing to pretrain
on a CPU, and it keeps the words intelligible — the word classifier below reads 93.8 % of
the real held-out clips and 92.5 % of the same clips after encode → Griffin-Lim decode.

Data: the ten digits and 30 short words spoken by eSpeak NG (the `espeakng-loader` wheel, no
system package) in 15 voices (accent + voice variant) × 3 speeds × 3 pitches, synthesised
once (about 10 s) and cached in `--cache-dir`; the 3 voices of `EVAL_VOICES` are held out
whole (1,080 clips), the model trains on the other 12 (4,320 clips). `--data-dir` reads a
LibriSpeech-layout folder instead (speaker/chapter/*.flac + *.trans.txt; the last speaker is
held out).

Evaluation (`<out>/eval.json`), for the online and the EMA weights:
  - `stt_word_accuracy`: every held-out clip captioned (greedy, up to [eos]), word for word
    against its text (1 - word error rate; for one-word clips, exact match);
  - `tts_intelligibility`: `--eval-samples` clips per word spoken from the prompt (the model
    writes the length, then the flow integrates the clip, with classifier-free guidance
    `--cfg-scale`), decoded to waveforms, and labelled by `WordClassifier` — a small 1D CNN
    trained on the real training clips only, never on model outputs — as the prompted word.
    Its own accuracy on the real held-out clips (`classifier_accuracy`) is reported beside it.
Outputs: `<out>/samples/<word>.wav` (one per word), `<out>/spectrogram.png` (generated vs
real, side by side), checkpoints under `<out>/checkpoints/`, metrics in `<out>/metrics.jsonl`.

    python train_audio.py                   # the default run (see README "Audio" for the time)
    python train_audio.py --device cuda
    python train_audio.py --resume latest   # continue <out>/checkpoints/latest.pt
    python train_audio.py --eval-only runs/audio/checkpoints/latest.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from transfusion_pytorch import BucketBatchSampler, Transfusion
from transfusion_pytorch.distributed import run_distributed
from transfusion_pytorch.examples.audio import (
    NUM_TEXT_TOKENS,
    WORDS,
    LogMelCodec,
    caption_latents,
    classify_words,
    generate_latents,
    librispeech_split,
    load_spoken_words,
    pairs,
    train_word_classifier,
    word_accuracy,
    write_wav,
)
from transfusion_pytorch.examples.recipes import flow_times, warmup_cosine
from transfusion_pytorch.training import (
    AMP_HELP,
    RunLogger,
    breakdown_metrics,
    device_argument,
    load_checkpoint,
    make_optimizer,
    read_checkpoint,
    resolve_device,
    script_precision,
)


def build_model(args, codec: LogMelCodec, default_length: int) -> Transfusion:
    model = Transfusion(
        num_text_tokens=NUM_TEXT_TOKENS,
        dim_latent=codec.dim_latent,
        modality_default_shape=(default_length,),
        add_pos_emb=True,  # a position embedding along the clip, on top of the shared rotary position
        unconditional_prob=args.unconditional_prob,
        transformer=dict(dim=args.dim, depth=args.depth, dim_head=args.dim // args.heads, heads=args.heads),
    )
    model.transformer.compile_training = args.compile  # a run-time switch that checkpoints do not carry
    return model


def load_data(args):
    if args.data_dir:
        return librispeech_split(args.data_dir, max_seconds=args.max_seconds)
    if not 1 <= args.num_words <= len(WORDS):
        raise ValueError(f"`--num-words` must be 1-{len(WORDS)}, got {args.num_words}")
    return load_spoken_words(args.cache_dir, words=WORDS[: args.num_words])


# ------------------------------------------------------------------ evaluation


def evaluate(sampler, model: Transfusion, codec, classifier, data, eval_latents, args) -> tuple[dict, list]:
    """STT word accuracy on the held-out clips; TTS intelligibility by the word classifier; the generated waves."""
    num_captions = min(args.eval_captions, len(eval_latents))
    written = []
    for start in range(0, num_captions, args.eval_batch):
        written += caption_latents(sampler, eval_latents[start : min(start + args.eval_batch, num_captions)], max_length=args.max_caption + 2)
    truth = data.eval_texts[:num_captions]
    scores = [word_accuracy(t, w) for t, w in zip(truth, written)]

    prompts = [word for word in data.words for _ in range(args.eval_samples)] if classifier is not None else sorted(set(truth))[: args.eval_samples]
    cfg_scale = args.cfg_scale if model.unconditional_prob > 0 else 1.0
    latents, forced = [], []
    for start in range(0, len(prompts), args.eval_batch):
        chunk = prompts[start : start + args.eval_batch]
        missing = []
        latents += generate_latents(sampler, chunk, args.modality_steps, cfg_scale, max_tokens=args.max_tokens, forced=missing)
        forced += [start + i for i in missing]
    waves = [codec.decode(latent) if latent is not None else None for latent in latents]
    results = {
        "stt_word_accuracy": float(np.mean(scores)),
        "stt_examples": [{"true": t, "written": w} for t, w in list(zip(truth, written))[:10]],
        "stt_mistakes": [{"true": t, "written": w} for t, w, s in zip(truth, written, scores) if s < 1][:20],
        "tts_no_audio": sum(w is None for w in waves),
        "tts_length_forced": len(forced),  # clips the model wrote no length for, spoken at the default length
        "tts_lengths": {
            p: int(lat.shape[0]) if lat is not None else 0 for p, lat in zip(prompts[:: max(1, args.eval_samples)], latents[:: max(1, args.eval_samples)])
        },
    }
    if classifier is not None:
        spoken = [w for w in waves if w is not None]
        heard = classify_words(classifier, codec, spoken).tolist() if spoken else []
        labels = iter(heard)
        correct = [w is not None and data.words[next(labels)] == p for p, w in zip(prompts, waves)]
        per_word = {word: float(np.mean(correct[i * args.eval_samples : (i + 1) * args.eval_samples])) for i, word in enumerate(data.words)}
        results |= {"tts_intelligibility": float(np.mean(correct)), "tts_intelligibility_per_word": per_word}
    else:
        results["tts_intelligibility"] = None  # no judge for an open vocabulary (LibriSpeech)
    return results, list(zip(prompts, waves))


def save_spectrograms(generated: list, data, codec, path: Path, count: int = 8) -> Path:
    """Log-mel spectrograms of generated clips (top) and real held-out clips of the same words (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen, seen = [], set()
    for prompt, wave in generated:
        if wave is not None and prompt not in seen and prompt in data.eval_texts:
            chosen.append((prompt, wave))
            seen.add(prompt)
        if len(chosen) == count:
            break
    fig, axes = plt.subplots(2, max(1, len(chosen)), figsize=(1.6 * max(1, len(chosen)), 3.6), squeeze=False)
    for column, (word, wave) in enumerate(chosen):
        real = data.eval_waves[data.eval_texts.index(word)]
        for row, (clip, label) in enumerate(((wave, f"{word}\ngenerated"), (real, "real"))):
            ax = axes[row, column]
            ax.imshow(codec.log_mel(clip).T.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-2.5, vmax=2.5)
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_evaluation(model, ema, codec, data, eval_latents, args, out: Path, step: int, precision, logger: RunLogger | None = None) -> dict:
    """Train the word classifier, evaluate the online and EMA weights, write eval.json, WAVs and spectrogram.png."""
    start = time.time()
    classifier, classifier_accuracy = None, None
    if (data.train_labels >= 0).all():
        classifier = train_word_classifier(codec, data.train_waves, data.train_labels, len(data.words), epochs=args.classifier_epochs, seed=args.seed)
        classifier_accuracy = float((classify_words(classifier, codec, data.eval_waves) == data.eval_labels).float().mean())
        print(f"word classifier: {classifier_accuracy:.1%} on the {len(data.eval_waves)} real held-out clips ({time.time() - start:.0f}s)")

    results, generated = {}, {}
    weights = {"model": model} | ({"ema": ema} if ema is not None else {})
    for name, sampler in weights.items():
        t = time.time()
        # sampled in fp32 (no autocast): the flow ODE and the greedy captions at full precision
        with torch.random.fork_rng():  # leaves the training RNG where it was
            torch.manual_seed(args.seed)  # the same noise for both sets of weights
            results[name], generated[name] = evaluate(sampler, model, codec, classifier, data, eval_latents, args)
        results[name]["eval_seconds"] = round(time.time() - t, 1)
        tts = results[name]["tts_intelligibility"]
        print(
            f"[{name}] stt_word_accuracy {results[name]['stt_word_accuracy']:.1%} | "
            f"tts_intelligibility {'n/a' if tts is None else f'{tts:.1%}'} ({results[name]['eval_seconds']:.0f}s)"
        )

    def score(name):
        return results[name]["stt_word_accuracy"] + (results[name]["tts_intelligibility"] or 0.0)

    best = max(results, key=score)
    report = {
        "step": step,
        "classifier_accuracy": classifier_accuracy,
        "best_weights": best,
        "stt_word_accuracy": results[best]["stt_word_accuracy"],
        "tts_intelligibility": results[best]["tts_intelligibility"],
        "eval_samples": args.eval_samples,
        "eval_captions": min(args.eval_captions, len(eval_latents)),
        "held_out_voices": sorted(set(data.eval_voices)),
        "modality_steps": args.modality_steps,
        "cfg_scale": args.cfg_scale if model.unconditional_prob > 0 else 1.0,
        "weights": results,
        "eval_seconds": round(time.time() - start, 1),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    written = set()
    for prompt, wave in generated[best]:
        if wave is not None and prompt not in written:
            write_wav(out / "samples" / f"{prompt.replace(' ', '_')[:60]}.wav", wave, codec.sample_rate)
            written.add(prompt)
    save_spectrograms(generated[best], data, codec, out / "spectrogram.png")
    print(f"wrote {out / 'eval.json'}, {len(written)} WAVs in {out / 'samples'} and {out / 'spectrogram.png'} ({best} weights)")
    if logger is not None:
        logger.log({f"eval/{name}/{key}": results[name][key] or 0.0 for name in results for key in ("stt_word_accuracy", "tts_intelligibility")}, step=step)
    return report


# ------------------------------------------------------------------ training


def main(args):
    resolve_device(args.device)  # first: a bad --device fails before anything runs
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

    t = time.time()
    data = load_data(args)
    ctx.print(f"data: {len(data.train_waves)} training clips, {len(data.eval_waves)} held out ({time.time() - t:.0f}s)")
    args.max_caption = max(len(text) for text in data.train_texts + data.eval_texts)

    if args.eval_only:
        if not ctx.is_main:
            return None
        extra = read_checkpoint(args.eval_only)["extra"]
        codec = LogMelCodec.from_state(extra["codec"])
        model = Transfusion.from_checkpoint(args.eval_only).to(device)
        ema = model.create_ema(beta=args.ema_beta)
        state = load_checkpoint(args.eval_only, model, ema=ema, restore_rng=False)
        train_latents = [codec.encode(w) for w in data.train_waves]
        args.max_tokens = int(max(len(x) for x in train_latents) * 1.5)
        eval_latents = [codec.encode(w).to(device) for w in data.eval_waves]
        return run_evaluation(model, ema, codec, data, eval_latents, args, out, state["step"], precision)

    if args.resume:
        path = latest if args.resume == "latest" else Path(args.resume)
        codec = LogMelCodec.from_state(read_checkpoint(path)["extra"]["codec"])  # the stats the weights were trained with
    else:
        codec = LogMelCodec(num_mels=args.num_mels, stack=args.stack).fit(data.train_waves)
    train_latents = [codec.encode(w).to(device) for w in data.train_waves]
    eval_latents = [codec.encode(w).to(device) for w in data.eval_waves]
    token_counts = [len(x) for x in train_latents]
    args.max_tokens = int(max(token_counts) * 1.5)

    model = build_model(args, codec, default_length=int(np.median(token_counts))).to(device)
    optimizer = make_optimizer(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup, args.steps))
    ema = model.create_ema(beta=args.ema_beta, update_after_step=args.warmup, update_every=1)

    start_step = 0
    if args.resume:
        start_step = load_checkpoint(path, model, optimizer, scheduler, ema)["step"]
        ctx.print(f"resumed from {path} at step {start_step}")
    ctx.seed_per_rank(args.seed + start_step)  # each rank its own orders and noise (rank 0 keeps the 1-process stream)
    ddp_model = ctx.wrap(model)  # DistributedDataParallel under --ddp (the loss goes through it), else the model itself

    # variable-length clips: batches of similar token length (the 1D multi-resolution path)
    lengths = model.token_lengths(pairs([x.cpu() for x in train_latents], data.train_texts, [False] * len(train_latents)))
    sampler = BucketBatchSampler(lengths, batch_size=batch_size, seed=args.seed, drop_last=True, num_replicas=ctx.world_size, rank=ctx.rank)
    batches_per_epoch = len(sampler)

    def batches_from(step):
        """The batches of steps `step, step + 1, …`: epoch `step // batches_per_epoch`, from its batch `step % batches_per_epoch`
        (the sampler is deterministic per epoch, so a resumed run sees the batches it would have seen)."""
        epoch, skip = divmod(step, batches_per_epoch)
        while True:
            sampler.set_epoch(epoch)
            yield from list(sampler)[skip:]
            epoch, skip = epoch + 1, 0

    num_params = sum(p.numel() for p in model.parameters())
    ctx.print(f"{num_params / 1e6:.2f}M parameters on {device}; latent {codec.dim_latent} wide, {min(token_counts)}-{max(token_counts)} tokens per clip")
    if ctx.enabled:
        ctx.print(f"{ctx.world_size} processes × {batch_size} samples = global batch {args.batch_size}")
    logger = RunLogger(out if ctx.is_main else None, use_wandb=args.wandb and ctx.is_main, project="transfusion-audio", config=vars(args))

    def checkpoint(step):  # rank 0 writes (atomically), the others wait for it
        ctx.save_checkpoint(latest, model, optimizer, scheduler, ema, step=step, extra={"args": json.dumps(vars(args)), "codec": codec.state()})

    model.train()
    train_start = time.time()
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="train", dynamic_ncols=True, disable=not ctx.is_main)
    last_log, steps_since_log = time.time(), 0
    breakdown = None
    stream = batches_from(start_step)
    for step in progress:
        index = next(stream)
        latent_first = torch.rand(len(index)) < args.caption_fraction
        batch = pairs([train_latents[i] for i in index], [data.train_texts[i] for i in index], latent_first.tolist())
        times = flow_times(latent_first, args.caption_min_time).to(device)

        with precision.autocast():
            loss, breakdown = ddp_model(batch, times=times, return_breakdown=True)
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

    report = run_evaluation(model, ema, codec, data, eval_latents, args, out, args.steps, precision, logger)
    report["train_seconds"] = round(train_seconds, 1)
    report["train_precision"] = precision.name  # bf16 autocast or fp32: the default follows the hardware
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    logger.finish()
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear lr warmup steps, then a cosine to 10%% of --lr")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--ema-beta", type=float, default=0.99)
    parser.add_argument("--caption-fraction", type=float, default=0.35, help="share of samples in the [speech, caption] order")
    parser.add_argument("--caption-min-time", type=float, default=0.5, help="least flow time (most noise) of a clip before a caption")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--num-mels", type=int, default=64, help="mel bands of the codec")
    parser.add_argument("--stack", type=int, default=2, help="spectrogram frames per audio token")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", type=device_argument, help="auto: cuda when there is one, else cpu")
    parser.add_argument("--use-amp", action=argparse.BooleanOptionalAction, default=None, help=AMP_HELP)
    parser.add_argument("--amp-dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile training steps (README: when it pays)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--resume", default=None, help="a checkpoint path, or 'latest' for <out>/checkpoints/latest.pt")
    parser.add_argument("--eval-only", default=None, metavar="CHECKPOINT", help="evaluate a checkpoint and exit")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (honours WANDB_MODE)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--out", default="runs/audio")
    parser.add_argument("--cache-dir", default=None, help="where the synthesised clips are cached (default ~/.cache/transfusion_pytorch)")
    parser.add_argument("--data-dir", default=None, help="a LibriSpeech-layout folder (speaker/chapter/*.flac + *.trans.txt) instead of eSpeak NG words")
    parser.add_argument("--num-words", type=int, default=len(WORDS), help="speak only the first N words (digits first; fewer for a quick run)")
    parser.add_argument("--max-seconds", type=float, default=8.0, help="with --data-dir: skip longer utterances")
    parser.add_argument("--eval-samples", type=int, default=3, help="clips generated per word for tts_intelligibility")
    parser.add_argument("--eval-captions", type=int, default=1080, help="held-out clips to caption")
    parser.add_argument("--eval-batch", type=int, default=128, help="prompts sampled together (Transfusion.sample_many)")
    parser.add_argument("--unconditional-prob", type=float, default=0.1, help="conditioning dropout per clip, for classifier-free guidance (0: none)")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale when speaking (1: none)")
    parser.add_argument("--modality-steps", type=int, default=16, help="ODE time points per generated clip (midpoint solver)")
    parser.add_argument("--classifier-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ddp", action="store_true", help="one process of a torchrun run (DistributedDataParallel; --batch-size is the global batch)")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
