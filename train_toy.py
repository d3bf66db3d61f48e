"""A tiny end-to-end run on generated data: train, watch the loss fall, sample.

Each sample is a one-token caption (0 = "plus", 1 = "minus") and a 4×4 latent of
width 8 filled with +1 or -1 (plus a little noise), in both orders, so the model
learns text → latent and latent → text. After training it is prompted with each
caption and the mean of the generated latent should have the caption's sign.

    python train_toy.py --steps 300
    python train_toy.py --device cuda --use-amp    # on a GPU, bf16 autocast
    torchrun --standalone --nproc_per_node=2 train_toy.py --ddp   # 2 processes, --batch-size is the global batch
"""

from __future__ import annotations

import argparse

import torch

from transfusion_pytorch import Transfusion, print_modality_sample
from transfusion_pytorch.distributed import run_distributed
from transfusion_pytorch.training import AMP_HELP, RunLogger, breakdown_metrics, device_argument, make_optimizer, resolve_device, script_precision


def make_batch(batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> list:
    """Drawn on the CPU from `generator` (the same data on every device), then moved to `device`."""
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    batch = []
    for label in labels.tolist():
        sign = 1.0 if label == 0 else -1.0
        latent = (sign + 0.1 * torch.randn(4, 4, 8, generator=generator)).to(device)
        caption = torch.tensor([label], device=device)
        image_first = bool(torch.randint(0, 2, (1,), generator=generator))
        batch.append([latent, caption] if image_first else [caption, latent])
    return batch


def main(args):
    resolve_device(args.device)  # first: a bad --device fails before anything runs
    # with --ddp (under torchrun) this joins the process group; without it, a 1-process stand-in
    return run_distributed(train, args)


def train(args, ctx):
    device = ctx.device
    torch.set_num_threads(args.threads)
    batch_size = ctx.local_batch_size(args.batch_size)  # --batch-size is the global batch
    generator = torch.Generator().manual_seed(args.seed + 1_000_003 * ctx.rank)  # each rank its own data

    model = Transfusion(
        num_text_tokens=2,
        dim_latent=8,
        modality_default_shape=(4, 4),
        add_pos_emb=True,
        transformer=dict(dim=64, depth=2, dim_head=16, heads=4),
    ).to(device)
    optimizer = make_optimizer(model.parameters(), lr=args.lr)
    precision = script_precision(args.use_amp, args.amp_dtype, device, log=ctx.print)
    ddp_model = ctx.wrap(model)  # DistributedDataParallel under --ddp, else the model itself
    logger = RunLogger(args.out if ctx.is_main else None, use_wandb=args.wandb and ctx.is_main, project="transfusion-toy", config=vars(args))

    for step in range(1, args.steps + 1):
        with precision.autocast():
            loss, breakdown = ddp_model(make_batch(batch_size, generator, device), return_breakdown=True)
        grad_norm = precision.step(loss, optimizer, model.named_parameters(), breakdown=breakdown, step=step)
        logger.log({**breakdown_metrics(breakdown), "grad_norm": float(grad_norm)}, step)
        if ctx.is_main and (step == 1 or step % args.log_every == 0):
            print(f"step {step:4d}  loss {loss.item():.4f}  text {breakdown.text.item():.4f}  flow {breakdown.flow[0].item():.4f}")

    if not ctx.is_main:  # rank 0 samples alone
        return None
    print("\nsamples (prompted with a caption, shape fixed to 4x4):")
    correct = 0
    for label, word in enumerate(("plus", "minus")):
        prompt = torch.tensor([label, model.meta_id], device=device)
        sample = model.sample(prompt=prompt, fixed_modality_shape=(4, 4), max_length=24, modality_steps=8, text_temperature=0.0)
        latents = [item[1] for item in sample if isinstance(item, tuple)]
        mean = latents[0].mean().item() if latents else float("nan")
        correct += (mean > 0) == (label == 0)
        print(f"prompt '{word}': generated latent mean {mean:+.3f}")
        print_modality_sample(sample)
    print(f"\n{correct}/2 prompts produced a latent of the right sign")
    logger.finish()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", type=device_argument, help="auto: cuda when there is one, else cpu")
    parser.add_argument("--use-amp", action=argparse.BooleanOptionalAction, default=None, help=AMP_HELP)
    parser.add_argument("--amp-dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases (honours WANDB_MODE)")
    parser.add_argument("--out", default="runs/toy", help="folder for metrics.jsonl")
    parser.add_argument("--ddp", action="store_true", help="one process of a torchrun run (DistributedDataParallel; --batch-size is the global batch)")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
