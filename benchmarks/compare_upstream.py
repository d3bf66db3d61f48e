"""Compare this repo's transfusion_pytorch with PyPI's transfusion-pytorch==0.12.0 on CPU.

Runs benchmarks/bench_core.py (see its docstring for the metrics) alternately with our
package and with upstream 0.12.0, each run a fresh subprocess, for --rounds rounds, then
prints the median of each metric per side, the ratio ours/theirs and the target for it,
and writes the same table as JSON to --out.

  ours:   --ours-python (default: this interpreter) with PYTHONPATH=<repo root>
  theirs: --upstream-venv (default /tmp/transfusion-0.12-venv), created if missing with
          `pip install torch==2.13.0` then `pip install transfusion-pytorch==0.12.0`;
          run from a temp dir without the repo on PYTHONPATH, so it cannot import ours.

Run:  .venv/bin/python benchmarks/compare_upstream.py [--rounds 2] [--out benchmarks/compare_upstream.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench_core.py"
METRICS = ("train_step_s", "text128_s", "text128_b1_s", "text128_compiled_s", "text128_b1_compiled_s", "modality8_s", "peak_rss_mib")
TARGETS = {
    "train_step_s": 0.9,
    "text128_s": 0.1,
    "text128_b1_s": 0.1,
    "text128_compiled_s": 0.1,
    "text128_b1_compiled_s": 0.1,
    "peak_rss_mib": 0.8,
}  # max ratio ours/theirs
# 0.12 has no compiled decoding: our compiled rows are compared with its only (eager) path
THEIRS_METRIC = {"text128_compiled_s": "text128_s", "text128_b1_compiled_s": "text128_b1_s"}


def ensure_upstream_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating upstream venv at {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # first, so the CPU wheel is used
        subprocess.run(pip + ["transfusion-pytorch==0.12.0"], check=True)
    return python


def run_bench(python: Path | str, env: dict, cwd: str, bench_args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        proc = subprocess.run([str(python), str(BENCH), "--json", out, *bench_args], env=env, cwd=cwd, capture_output=True, text=True)
        print(proc.stdout, end="", flush=True)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no stderr"]
            print(proc.stderr, file=sys.stderr)
            return {m: f"error: exit {proc.returncode}: {tail[0]}" for m in METRICS}
        if proc.stderr.strip():
            print(proc.stderr, file=sys.stderr)  # tracebacks of calls bench_core recorded as errors
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def summarize(runs: list[dict]) -> dict:
    """Median over runs per metric; an error string if any run failed that metric."""
    summary = {}
    for m in METRICS:
        values = [r.get(m) for r in runs]
        errors = [v for v in values if not isinstance(v, (int, float))]
        summary[m] = str(errors[0]) if errors else statistics.median(values)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-venv", type=Path, default=Path("/tmp/transfusion-0.12-venv"))
    parser.add_argument("--ours-python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "compare_upstream.json")
    args, bench_args = parser.parse_known_args()  # anything else goes to bench_core.py (e.g. --steps 5)

    theirs_python = ensure_upstream_venv(args.upstream_venv)

    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ours_env = {**base_env, "PYTHONPATH": str(REPO)}
    runs = {"ours": [], "theirs": []}

    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            print(f"--- round {r + 1}/{args.rounds}: ours", flush=True)
            runs["ours"].append(run_bench(args.ours_python, ours_env, str(REPO), bench_args))
            print(f"--- round {r + 1}/{args.rounds}: theirs (0.12.0)", flush=True)
            runs["theirs"].append(run_bench(theirs_python, base_env, scratch, bench_args))

    ours, theirs = summarize(runs["ours"]), summarize(runs["theirs"])
    table = {}
    print(f"\n{'metric':<22} {'ours':>10} {'theirs':>10} {'ratio':>7}  target")
    for m in METRICS:
        o, t = ours[m], theirs[THEIRS_METRIC.get(m, m)]
        numeric = isinstance(o, float) and isinstance(t, float) and t > 0
        ratio = o / t if numeric else None
        target = TARGETS.get(m)
        verdict = None if target is None or ratio is None else ("PASS" if ratio <= target else "MISS")
        table[m] = dict(ours=o, theirs=t, ratio=ratio, target=target, verdict=verdict)

        def fmt(v):
            return f"{v:10.4f}" if isinstance(v, float) else f"{'error':>10}"

        target_text = "-" if target is None else f"<= {target}  {verdict or 'n/a'}"
        print(f"{m:<22} {fmt(o)} {fmt(t)} {ratio if ratio is None else format(ratio, '7.3f'):>7}  {target_text}")
        for side, v in (("ours", o), ("theirs", t)):
            if not isinstance(v, float):
                print(f"    {side}: {v}")

    versions = {side: {k: runs[side][0].get(k) for k in ("package_version", "torch_version")} for side in runs}
    result = dict(metrics=table, versions=versions, rounds=args.rounds, bench_args=bench_args, runs=runs)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
