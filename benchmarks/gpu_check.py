"""GPU check: what TL Studio gets out of the GPUs of this machine, in a few minutes.

    .venv/bin/python benchmarks/gpu_check.py [--seconds 8] [--model efficientnet_lite0] [--no-engine]

Rows (each measured in this run; random weights, synthetic 224 px batches, channels-last):

1. inference, fp32 and mixed precision (bf16 where supported, else fp16): images/s;
2. training steps (AdamW, cross-entropy), fp32 and mixed precision: images/s and peak GPU memory;
3. DDP training over every visible GPU (torchrun, nccl): images/s in all, and the scaling against one GPU;
4. the engine end to end: ``tl-core train`` on the Fashion-MNIST sample with ``--device cuda`` (and
   ``--nproc <GPUs>`` when there are several): wall time, validation accuracy, device and precision recorded.

Prints a table and prepends it to benchmarks/RESULTS.md. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import cpu_name, markdown_table, prepend  # noqa: E402


def _amp_dtype():
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _model(name: str):
    import timm
    import torch

    return timm.create_model(name, pretrained=False, num_classes=10).cuda().to(memory_format=torch.channels_last)


def bench_inference(name: str, batch: int, seconds: float, amp: bool) -> float:
    import torch

    model = _model(name).eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cuda", dtype=_amp_dtype()) if amp else torch.autocast("cuda", enabled=False)
    with torch.inference_mode(), ctx:
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += batch
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def bench_training(name: str, batch: int, seconds: float, amp: bool) -> tuple[float, float]:
    """(images/s, peak GiB) of training steps."""
    import torch

    torch.cuda.reset_peak_memory_stats()
    model = _model(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if amp and _amp_dtype() == torch.float16 else None
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast("cuda", dtype=_amp_dtype(), enabled=amp):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += batch
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), torch.cuda.max_memory_allocated() / 1024**3


def ddp_worker(name: str, batch: int, seconds: float, out: str) -> None:
    """One rank of the DDP row (run by torchrun): AMP training steps; rank 0 writes images/s for all ranks."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("nccl")
    rank, local = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    model = DDP(_model(name).train(), device_ids=[local])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device="cuda")
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast("cuda", dtype=_amp_dtype()):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    # the same number of steps on every rank (a time limit could differ by one step and hang the group)
    t0 = time.perf_counter()
    steps = 0
    while time.perf_counter() - t0 < 1.0:
        step()
        steps += 1
    torch.cuda.synchronize()
    per_s = steps / (time.perf_counter() - t0)
    n_steps = torch.tensor([max(5, int(per_s * seconds))], device="cuda")
    dist.all_reduce(n_steps, op=dist.ReduceOp.MIN)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(int(n_steps.item())):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    took = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({"images_per_s": int(n_steps.item()) * batch * dist.get_world_size() / took,
                                         "world": dist.get_world_size()}))
    dist.destroy_process_group()


def bench_ddp(name: str, batch: int, seconds: float, gpus: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                        __file__, "--ddp-worker", "--model", name, "--batch", str(batch), "--seconds", str(seconds),
                        "--out", str(out)], check=True, timeout=600)
        return json.loads(out.read_text())


def bench_engine(gpus: int) -> list[tuple]:
    rows = []
    data = ROOT / "sample_data" / "fashion_mnist"
    for nproc in sorted({1, gpus}):
        with tempfile.TemporaryDirectory() as home:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "tl_core.cli", "train", str(data), "--strategy", "full",
                                  "--epochs", "3", "--batch-size", "32", "--device", "cuda", "--nproc", str(nproc),
                                  "--json", "--quiet"], capture_output=True, text=True, timeout=900,
                                 env={**os.environ, "TL_HOME": home, "PYTHONPATH": str(ROOT)})
            wall = time.perf_counter() - t0
            if out.returncode:
                rows.append((f"4. tl-core train --device cuda --nproc {nproc}", "failed", out.stderr[-300:], "", ""))
                continue
            res = json.loads(out.stdout)
            meta = json.loads((Path(res["run_dir"]) / "meta.json").read_text())
            rt = meta.get("runtime", {})
            rows.append((f"4. tl-core train --device cuda --nproc {nproc}", f"{wall:.0f} s wall",
                         f"val acc {res['val_accuracy']:.3f}", f"{rt.get('device')} {rt.get('precision')}",
                         f"world {res['world_size']}"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per row")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--no-engine", action="store_true", help="skip row 4 (tl-core train end to end)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ddp_worker:
        ddp_worker(args.model, args.batch, args.seconds, args.out)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU is visible to PyTorch on this machine: nothing to measure (run this on a GPU machine).")
        return 0
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    rows = []
    inf32 = bench_inference(args.model, 2 * args.batch, args.seconds, False)
    infamp = bench_inference(args.model, 2 * args.batch, args.seconds, True)
    rows.append(("1. inference", f"fp32 {inf32:,.0f} img/s", f"{amp} {infamp:,.0f} img/s", f"x{infamp / inf32:.2f}", ""))
    tr32, mem32 = bench_training(args.model, args.batch, args.seconds, False)
    tramp, memamp = bench_training(args.model, args.batch, args.seconds, True)
    rows.append(("2. training steps", f"fp32 {tr32:,.0f} img/s", f"{amp} {tramp:,.0f} img/s", f"x{tramp / tr32:.2f}",
                 f"peak {mem32:.1f} / {memamp:.1f} GiB"))
    if gpus > 1:
        ddp = bench_ddp(args.model, args.batch, args.seconds, gpus)
        rows.append((f"3. DDP training, {gpus} GPUs ({amp})", f"{ddp['images_per_s']:,.0f} img/s", "",
                     f"x{ddp['images_per_s'] / tramp:.2f} of 1 GPU", f"{ddp['images_per_s'] / tramp / gpus:.0%} "
                                                                      "scaling efficiency"))
    else:
        rows.append(("3. DDP training", "one GPU visible: skipped", "", "", ""))
    if not args.no_engine:
        rows += bench_engine(gpus)
    table = markdown_table(("row", "figure", "with mixed precision", "ratio", "note"), rows)
    head = (f"## {dt.datetime.now():%Y-%m-%d %H:%M} — GPU check ({args.model}, batch {args.batch}, 224 px)\n\n"
            f"{gpus} x {name}; {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}.")
    print(head + "\n\n" + table)
    prepend(head, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
