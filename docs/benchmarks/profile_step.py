"""Where does a training step's time go? One GPU run: eager vs compiled, attention input dtype,
and the top CUDA kernels of one step (torch.profiler).

usage: python docs/benchmarks/profile_step.py [--cells=lengthgen,icll512,icll948] [--variants=eager,compile,compile-ro]
                                             [--no-profile] [methods ...]
"""

import sys
import time

import torch

from sparse_mosaics.bench import ICLL, LENGTHGEN, _model, train_step_fn


def timed(step, n=15):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        step()
        b.record()
        cpu = time.perf_counter() - t0
        torch.cuda.synchronize()
        times.append((a.elapsed_time(b), cpu * 1e3))
    times.sort()
    return times[len(times) // 2]


def run(cell, method, variant, profile=False):
    torch.manual_seed(0)
    cfg, batch, T, amp = {"lengthgen": (LENGTHGEN, 256, 130, True), "icll": (ICLL, 32, 948, False),
                          "icll948": (ICLL, 32, 948, False), "icll512": (ICLL, 32, 512, False)}[cell]
    if "compile" in variant:
        torch._dynamo.reset()  # a fresh cache per model (the recompile limit would be hit otherwise)
    model = _model(cfg, method)
    model.train()
    fwd = model
    t0 = time.perf_counter()
    if variant == "compile":
        fwd = torch.compile(model)
    elif variant == "compile-ro":  # CUDA graphs for the compiled regions
        fwd = torch.compile(model, mode="reduce-overhead")
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
    step = train_step_fn(model, fwd, opt, batch, T, amp)
    try:
        gpu_ms, cpu_ms = timed(step)
    except Exception as e:  # noqa: BLE001
        print(f"{cell} {method:14s} {variant:18s} ERROR {repr(e)[:300]}", flush=True)
        return
    print(f"{cell} {method:14s} {variant:18s} step {gpu_ms:7.2f} ms (cpu issue {cpu_ms:7.2f} ms) "
          f"setup {time.perf_counter() - t0:5.1f} s  peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
          flush=True)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70),
              flush=True)
    torch.cuda.reset_peak_memory_stats()


def main():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    args = sys.argv[1:]
    cells, variants, profile = ("lengthgen", "icll"), ("eager", "compile", "compile-ro"), True
    while args and args[0].startswith("--"):
        key, _, value = args.pop(0)[2:].partition("=")
        if key == "cells":
            cells = tuple(value.split(","))
        elif key == "variants":
            variants = tuple(value.split(","))
        elif key == "no-profile":
            profile = False
        else:
            raise SystemExit(f"unknown option --{key}")
    methods = args or ["softmax", "biweight"]
    for cell in cells:
        for i, method in enumerate(methods):
            for variant in variants:
                run(cell, method, variant, profile=profile and i == 0 and variant.startswith("compile"))


if __name__ == "__main__":
    main()
