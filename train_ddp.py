"""The MNIST text ↔ image task of `train_mnist.py` on N processes, with DistributedDataParallel
or, with `--fsdp`, FSDP2 (weights, gradients, optimizer state and EMA sharded over the processes).

    torchrun --standalone --nproc_per_node=2 train_ddp.py                 # one machine, 2 processes
    torchrun --standalone --nproc_per_node=2 train_ddp.py --steps 3 --batch-size 2 --out runs/ddp
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=HOST --master_port=29500 \\
        train_ddp.py --device cuda                                           # on HOST; --node_rank=1 on the other
    python train_ddp.py --micro-batch-size 32                            # the same run on one process
    torchrun --standalone --nproc_per_node=2 train_ddp.py --fsdp          # sharded; checkpoints/latest.dcp/

The model, data, flags and evaluation are `train_mnist.py`'s. What differs is how a step's batch
is made, so that the run depends on the global batch and not on how many processes share it:

  - `--batch-size` is the GLOBAL batch. It is cut into shards of `--micro-batch-size` samples
    (default: batch / processes, one shard per process); process r runs shards r*k … r*k+k-1
    (k = batch / (processes × micro-batch), gradient accumulation with DDP's `no_sync` for all
    but the last). The loss of a step is the mean of its shards' losses.
  - every shard draws its digits, orders, flow times, noise and conditioning dropout from a
    generator seeded by (seed, step, shard) — not from a per-process stream.

So `torchrun --nproc_per_node=2 train_ddp.py --batch-size 64` and `python train_ddp.py
--batch-size 64 --micro-batch-size 32` compute the same steps (to float rounding in the
all-reduce), and a checkpoint resumes on another number of processes and continues identically
(keep `--micro-batch-size`). Every process keeps an identical EMA; rank 0 logs, writes the
(atomic) checkpoints and evaluates. See "Multi-process training" in the README.

With `--fsdp` every process holds 1/N of the weights, Adam moments and EMA (`fsdp.py`) and
writes its part of the sharded checkpoint `checkpoints/latest.dcp/` (torch.distributed.checkpoint;
it resumes on any number of processes, with or without --fsdp). When training stops, rank 0
gathers it into the single file `checkpoints/consolidated.pt` (what `Transfusion.from_checkpoint`
loads, and what the evaluation samples from).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from train_mnist import build_model, build_parser, caption_image_pairs, generate_digits, run_evaluation
from transfusion_pytorch import Transfusion
from transfusion_pytorch.distributed import run_distributed, seed_everything
from transfusion_pytorch.examples.mnist import DIGIT_WORDS, load_digits, shift_images, to_unit_pixels
from transfusion_pytorch.examples.recipes import flow_times, warmup_cosine
from transfusion_pytorch.fsdp import consolidate_checkpoint
from transfusion_pytorch.training import RunLogger, breakdown_metrics, load_checkpoint, make_optimizer, script_precision


def shard_seed(seed: int, step: int, shard: int) -> int:
    """The seed of one shard of one step: every random draw of the shard comes from it."""
    return int(np.random.SeedSequence([seed, step, shard]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def shard_loss(ddp_model, split, args, step: int, shard: int, micro_batch: int, precision):
    """Draw shard `shard` of step `step` (digits, orders, times; the model's noise and dropout
    follow from the same seed) and return its `(loss, breakdown)`."""
    torch.manual_seed(shard_seed(args.seed, step, shard))
    index = torch.randint(0, len(split.train_labels), (micro_batch,)).to(split.train_images.device)
    image_first = torch.rand(micro_batch) < args.caption_fraction
    images = shift_images(split.train_images[index], args.caption_shift, where=image_first)  # as train_mnist.py: captioning samples only
    batch = caption_image_pairs(images, split.train_labels[index], image_first)
    times = flow_times(image_first, args.caption_min_time).to(split.train_images.device)
    with precision.autocast():
        return ddp_model(batch, times=times, return_breakdown=True)


def shards_per_process(args, world_size: int) -> int:
    """Micro-batches each process accumulates per step (k in the module docstring)."""
    micro = args.micro_batch_size or args.batch_size // world_size
    if micro < 1 or args.batch_size % (micro * world_size):
        raise ValueError(
            f"`--batch-size` ({args.batch_size}) must be a multiple of `--micro-batch-size` ({args.micro_batch_size or 'batch / processes'}) "
            f"× the {world_size} processes"
        )
    return args.batch_size // (micro * world_size)


def resume_path(resume: str, latest: Path) -> Path:
    """`--resume`: a path, or `latest` — this run's kind of checkpoint (`latest.dcp` with --fsdp,
    `latest.pt` without), or the other kind when only that one is there."""
    if resume != "latest":
        return Path(resume)
    other = latest.with_name("latest.pt" if latest.name == "latest.dcp" else "latest.dcp")
    return other if not latest.exists() and other.exists() else latest


def evaluate_checkpoint(path, split, args, out, precision, device, logger=None):
    """Rank 0 alone: the model and EMA of a single-file checkpoint, evaluated as train_mnist does."""
    model = Transfusion.from_checkpoint(path).to(device)
    ema = model.create_ema(beta=args.ema_beta)
    state = load_checkpoint(path, model, ema=ema, restore_rng=False)
    return run_evaluation(model, ema, split, args, out, state["step"], precision, logger)


def main(args):
    # without torchrun (plain `python train_ddp.py`) there is nothing to join: one process
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    return run_distributed(train, args, enabled=under_torchrun, timeout_s=args.timeout)


def train(args, ctx):
    device = ctx.device
    if args.fsdp_param_dtype == "bf16":  # blocks computed in bf16 take bf16 activations: autocast, whatever the CPU
        if args.use_amp is False or args.amp_dtype != "bf16":
            raise ValueError("`--fsdp-param-dtype bf16` computes the blocks under bf16 autocast: drop `--no-use-amp` / `--amp-dtype fp16`")
        args.use_amp = True
    threads = args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)
    accumulate = shards_per_process(args, ctx.world_size)
    micro_batch = args.batch_size // (ctx.world_size * accumulate)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sharded = args.fsdp and ctx.enabled  # FSDP2 needs the process group; one process runs unsharded
    latest = out / "checkpoints" / ("latest.dcp" if sharded else "latest.pt")
    precision = script_precision(args.use_amp, args.amp_dtype, device, log=ctx.print)
    split = load_digits(args.data_dir, num_eval=args.num_eval, seed=args.seed).to(device)

    if args.eval_only:  # one process evaluates; the others have nothing to do
        if not ctx.is_main:
            return None
        path = Path(args.eval_only)
        if path.is_dir():  # a sharded checkpoint: gather it into one file first
            path = consolidate_checkpoint(path, out / "checkpoints" / "consolidated.pt")
        return evaluate_checkpoint(path, split, args, out, precision, device)

    seed_everything(args.seed)  # the same initial weights on every rank (and whatever ran before in this process)
    model = build_model(args)  # with --fsdp in host memory, until `shard` moves each rank's part to the device
    model = model if sharded else model.to(device)
    num_params = sum(p.numel() for p in model.parameters())
    # a run-time switch rather than a constructor argument: a checkpoint resumes with or without it
    model.transformer.use_checkpoint = args.activation_checkpointing
    model.transformer.compile_training = args.compile and not sharded  # FSDP's per-block hooks stay eager
    if args.compile and sharded:
        ctx.print("--compile: training stays eager with --fsdp")
    ema = model.create_ema(beta=args.ema_beta, update_after_step=args.warmup, update_every=1)  # one per rank, kept identical
    if sharded:  # the EMA is cut like the model: each rank keeps the EMA of its shards
        model = ctx.shard(model, ema=ema, param_dtype=torch.bfloat16 if args.fsdp_param_dtype == "bf16" else None)
    optimizer = make_optimizer(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)  # after sharding: the shards
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup, args.steps))
    ctx.skip_unused(model, optimizer)  # FSDP: a parameter no rank used keeps grad=None, as in one process

    start_step = 0
    if args.resume:  # every rank reads the same checkpoint; it may have been written by another number of processes
        path = resume_path(args.resume, latest)
        state = ctx.load_checkpoint(path, model, optimizer, scheduler, ema)
        start_step = state["step"]
        ctx.print(f"resumed from {path} at step {start_step} (written by {state['extra'].get('world_size', '?')} processes)")

    ddp_model = model if sharded else ctx.wrap(model, find_unused_parameters=args.find_unused_parameters)
    ctx.print(
        f"{num_params / 1e6:.2f}M parameters; {ctx.world_size} processes on {device} ({threads} threads each)"
        + (f", FSDP2: each holds 1/{ctx.world_size} of them" if sharded else "")
        + f"; global batch {args.batch_size} = {ctx.world_size} processes × {accumulate} micro-batches × {micro_batch}"
    )
    logger = RunLogger(out if ctx.is_main else None, use_wandb=args.wandb and ctx.is_main, project="transfusion-mnist-ddp", config=vars(args))

    def checkpoint(step):
        ctx.check_in_sync(model, ema)  # DDP keeps them bitwise equal (FSDP: the replicated buffers); a difference is a bug worth stopping for
        extra = {"args": json.dumps(vars(args)), "world_size": ctx.world_size, "fsdp": sharded}
        ctx.save_checkpoint(latest, model, optimizer, scheduler, ema, step=step, extra=extra)

    model.train()
    end = min(args.steps, args.stop_at or args.steps)
    if args.stop_at is not None and args.stop_at <= start_step:
        raise ValueError(f"`--stop-at` must be after the step training starts from ({start_step}), got {args.stop_at}")
    progress = tqdm(range(start_step, end), initial=start_step, total=args.steps, desc="train", dynamic_ncols=True, disable=not ctx.is_main)
    step_times = []
    for step in progress:
        started = time.perf_counter()
        shards = range(ctx.rank * accumulate, (ctx.rank + 1) * accumulate)
        totals = []
        for k, shard in enumerate(shards):
            last = k == accumulate - 1
            with ctx.no_sync(ddp_model, sync=last):  # forward and backward: no all-reduce until the last micro-batch
                loss, breakdown = shard_loss(ddp_model, split, args, step, shard, micro_batch, precision)
                loss = loss / accumulate
                if not last:
                    precision.backward(loss)
            totals.append(breakdown_metrics(breakdown))
        grad_norm = precision.step(loss, optimizer, model.named_parameters(), max_grad_norm=args.max_grad_norm, breakdown=breakdown, step=step)
        scheduler.step()
        ema.update()
        done = step + 1
        step_times.append(time.perf_counter() - started)

        if done % args.log_every == 0 or done == end:  # every rank: the mean over all shards is an all-reduce
            local = {key: float(np.mean([t[key] for t in totals])) for key in totals[0]}
            metrics = ctx.mean_metrics(local) | {"grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0], "step_seconds": step_times[-1]}
            logger.log(metrics, step=done)
            progress.set_postfix(loss=f"{metrics['loss/total']:.3f}")

        if args.wandb and ctx.is_main and not sharded and args.sample_every and done % args.sample_every == 0:  # the others go on to the next all-reduce
            with torch.random.fork_rng(), precision.autocast():
                images = generate_digits(ema, model, list(range(10)), args.modality_steps, args.cfg_scale)
            logger.log_images("samples", list(to_unit_pixels(images[:, 0])), step=done, captions=list(DIGIT_WORDS))

        if args.checkpoint_every and done % args.checkpoint_every == 0 and done != end:
            checkpoint(done)

    progress.close()
    checkpoint(end)
    timed = step_times[1:] or step_times  # the first step pays for warm-up
    if timed:
        ctx.print(f"trained to step {end}: {np.mean(timed):.3f} s per step (mean of {len(timed)}, first excluded), {ctx.world_size} processes")
    ctx.print(f"checkpoint: {latest}")
    if not ctx.is_main:  # done: main() leaves the process group while rank 0 evaluates (no collectives there)
        return None
    if sharded:  # rank 0 gathers the shards into one file (no collective) and evaluates that
        consolidated = consolidate_checkpoint(latest, out / "checkpoints" / "consolidated.pt")
        print(f"consolidated: {consolidated}", flush=True)
    if end < args.steps:  # --stop-at: a chunk of a longer run
        logger.finish()
        return {"step": end, "seconds_per_step": float(np.mean(timed)) if timed else None}
    if args.skip_eval:
        logger.finish()
        return {"step": args.steps, "seconds_per_step": float(np.mean(timed)) if timed else None}
    if sharded:
        report = evaluate_checkpoint(consolidated, split, args, out, precision, device, logger)
    else:
        report = run_evaluation(model, ema, split, args, out, args.steps, precision, logger)
    logger.finish()
    return report


def build_ddp_parser():
    parser = build_parser()  # every flag of train_mnist.py
    parser.description = __doc__
    parser.set_defaults(out="runs/ddp", threads=None, ddp=True)
    parser.add_argument("--micro-batch-size", type=int, default=None, help="samples per forward; default: --batch-size / processes")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a process waits for the others before it exits with an error")
    parser.add_argument(
        "--find-unused-parameters",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="DDP's search for parameters a step leaves unused (the CFG null token); off only if every step uses every parameter",
    )
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP: weights, gradients, Adam moments and EMA sharded over the processes")
    parser.add_argument(
        "--fsdp-param-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="with --fsdp: gather and compute the blocks in bf16 (half the traffic); turns bf16 autocast on",
    )
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward: less memory, more compute")
    parser.add_argument(
        "--stop-at", type=int, default=None, help="stop (checkpointed) after this step; --steps still sets the lr schedule. For jobs with a time limit"
    )
    parser.add_argument("--skip-eval", action="store_true", help="train and checkpoint only")
    return parser


if __name__ == "__main__":
    main(build_ddp_parser().parse_args())
