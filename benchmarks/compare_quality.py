"""Quality side by side with transfusion-pytorch 0.12.0 at the same training wall time.

`quality_worker.py` — one file written only against 0.12.0's public API — trains the MNIST
task (text → image and image → text, `train_mnist.py`'s data and sizes, fp32) for
`--seconds` of wall time and samples, once with this repository's package and once with
PyPI's 0.12.0 in its own venv (`compare_upstream.py` builds it), one after the other in
fresh subprocesses with the same thread count. Both get the same digits, batches drawn with
the same seed, optimiser and schedule; what differs is the package: how many steps it fits
in the budget and what each step learns (its default flow-time draw, its architecture).

Judged here, on the same held-out digits, by `bench_lib.DigitJudge` (the digit classifier
of `examples/judges.py`, trained on the training split):
  - prompt accuracy: `--per-digit` images per digit prompt (no guidance: 0.12 has none),
    read by the classifier as the prompted digit;
  - digit FID: the classifier's penultimate features, generated vs held-out real digits;
  - captioning accuracy: greedy captions of `--captions` held-out digits, word for word.

    .venv/bin/python benchmarks/compare_quality.py                 # 2 × (10 min training + sampling), one thread each
    .venv/bin/python benchmarks/compare_quality.py --quick         # smoke run, ≤ 2 min

Writes `--json` (benchmarks/compare_quality.json) and a PNG next to it: sample grids of both
sides and the training loss against wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_lib as L
import numpy as np
import torch
from compare_upstream import ensure_upstream_venv

from transfusion_pytorch.examples.mnist import DIGIT_WORDS, load_digits

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "quality_worker.py"
SIDES = ("ours", "0.12.0")


def run_side(python: str, env: dict, cwd: str, data: Path, out: Path, worker_args: list[str]) -> dict:
    start = time.time()
    proc = subprocess.run([python, str(WORKER), "--data", str(data), "--out", str(out), *worker_args], env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"quality_worker.py failed with {python}:\n{proc.stderr[-3000:]}")
    result = np.load(out)
    meta = json.loads(str(result["meta"]))
    return dict(meta, images=torch.from_numpy(result["images"]), losses=result["losses"].tolist(), wall_seconds=time.time() - start)


def judge(side: dict, split, judge: L.DigitJudge, per_digit: int) -> dict:
    labels = torch.arange(10).repeat_interleave(per_digit)
    words = side["words"]
    truth = [DIGIT_WORDS[int(label)] for label in split.eval_labels[: len(words)]]
    return {
        **judge.score(side["images"], labels),
        "captioning_accuracy": round(float(np.mean([w == t for w, t in zip(words, truth)])), 4),
        "caption_mistakes": [{"true": t, "written": w} for w, t in zip(words, truth) if w != t][:10],
        "steps": side["steps"],
        "train_seconds": round(side["train_seconds"], 1),
        "steps_per_s": round(side["steps"] / side["train_seconds"], 3),
        "sample_seconds": round(side["sample_seconds"], 1),
        "final_loss": round(float(np.mean(side["losses"][-50:])), 4),
        "parameters": side["parameters"],
    }


def plot(sides: dict, results: dict, path: Path, per_digit: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transfusion_pytorch.examples.mnist import to_unit_pixels

    fig, axes = plt.subplots(1, len(sides) + 1, figsize=(4.7 * (len(sides) + 1), 4.6))
    for ax, name in zip(axes[:-1], sides):
        columns = min(per_digit, 10)
        images = sides[name]["images"].reshape(10, per_digit, 28, 28)[:, :columns]
        grid = to_unit_pixels(images.clamp(-1, 1)).permute(0, 2, 1, 3).reshape(10 * 28, columns * 28)
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
        r = results[name]
        ax.set_title(
            f"{name}: {r['steps']} steps\nprompt acc {r['prompt_accuracy']:.0%}, digit FID {r['digit_fid']:.0f}, captions {r['captioning_accuracy']:.0%}",
            fontsize=9,
        )
        ax.axis("off")
    ax = axes[-1]
    for name in sides:
        losses = np.asarray(sides[name]["losses"])
        seconds = np.linspace(0, sides[name]["train_seconds"], len(losses))
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(seconds[: len(smooth)], smooth, label=name)
    ax.set_xlabel("training wall time, s")
    ax.set_ylabel("training loss (each package's own)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle("The same 0.12-API script, the same wall-time budget: ours vs transfusion-pytorch 0.12.0")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def main(args) -> dict:
    if args.seconds <= 0:
        raise ValueError(f"`--seconds` must be > 0, got {args.seconds}")
    for flag, value in (("--per-digit", args.per_digit), ("--captions", args.captions)):
        if value < 1:
            raise ValueError(f"`{flag}` must be at least 1, got {value}")
    if args.quick:
        args.seconds, args.per_digit, args.captions = min(args.seconds, 8.0), 2, 10
        args.worker = ["--dim", "64", "--depth", "1", "--heads", "2", "--batch-size", "8", "--modality-steps", "4", *args.worker]
    split = load_digits(num_eval=500, seed=args.seed)
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": str(args.threads)}
    if not args.sides or not set(args.sides) <= set(SIDES):
        raise ValueError(f"`--sides` must name some of {SIDES}, got {args.sides}")
    pythons = {"ours": (args.ours_python, base_env | {"PYTHONPATH": str(REPO)})}
    if "0.12.0" in args.sides:  # built on first use (pip: torch 2.13.0, then transfusion-pytorch 0.12.0)
        pythons["0.12.0"] = (str(ensure_upstream_venv(args.upstream_venv)), base_env)
    worker_args = ["--seconds", str(args.seconds), "--per-digit", str(args.per_digit), "--captions", str(args.captions)]
    worker_args += ["--seed", str(args.seed), "--threads", str(args.threads), *args.worker]

    sides = {}
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "digits.npz"
        np.savez(data, train_images=split.train_images.numpy(), train_labels=split.train_labels.numpy(), eval_images=split.eval_images.numpy())
        for name in args.sides:
            python, env = pythons[name]
            print(f"--- {name}: training {args.seconds:.0f} s, then sampling", flush=True)
            # 0.12 runs from a scratch folder so it cannot import this repository
            sides[name] = run_side(python, env, str(REPO) if name == "ours" else scratch, data, Path(scratch) / f"{name}.npz", worker_args)

    judge_ = L.DigitJudge(split.train_images, split.train_labels, real=split.eval_images, epochs=1 if args.quick else 4, seed=args.seed)
    results = {name: judge(sides[name], split, judge_, args.per_digit) for name in args.sides}
    for name, r in results.items():
        print(
            f"{name:>7}: {r['steps']} steps ({r['steps_per_s']}/s) | prompt accuracy {r['prompt_accuracy']:.1%} | "
            f"digit FID {r['digit_fid']:.1f} | captioning {r['captioning_accuracy']:.1%}"
        )
    # the floor: training digits (a random draw: the split keeps the data set's order) against the held-out ones
    order = torch.randperm(len(split.train_images), generator=torch.Generator().manual_seed(args.seed))
    real_draw = split.train_images[order[: len(split.eval_images)]]
    report = {
        "command": " ".join(sys.argv),
        "machine": L.machine(),
        "seconds": args.seconds,
        "threads": args.threads,
        "worker_args": worker_args,
        "results": results,
        "real_floor_digit_fid": round(judge_.fid(real_draw), 3),
        "plot": plot(sides, results, args.json.with_suffix(".png"), args.per_digit),
    }
    L.write_json(args.json, report)
    print(f"wrote {args.json} and {report['plot']}")
    return report


def build_parser() -> argparse.ArgumentParser:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="training wall time per side")
    parser.add_argument("--per-digit", type=int, default=20, help="images generated per digit prompt")
    parser.add_argument("--captions", type=int, default=200, help="held-out digits to caption")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), help="which packages to run (0.12.0 needs its venv, built on first use)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny models, seconds of training: a smoke run")
    parser.add_argument("--upstream-venv", type=Path, default=Path("/tmp/transfusion-0.12-venv"))
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--json", type=Path, default=here / "compare_quality.json")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, default=[], help="everything after it goes to quality_worker.py (e.g. --dim 128)")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
