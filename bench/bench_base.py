#!/usr/bin/env python
"""Training and inference throughput (images/s) and peak memory of a base-model architecture.

For each input size (default 64, 128, 256 px) and device (CPU, plus CUDA when available) it
runs a few warm-up steps, then times training steps (forward + weighted BCE + backward + AdamW,
the same step as `base train`, AMP + channels_last on CUDA) and inference batches. Each CPU
size runs in its own process so its peak resident memory (ru_maxrss) is its own.

    python bench/bench_base.py [--arch resnet_tiny] [--context 0] [--sizes 64,128,256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time


def measure(arch: str, in_channels: int, size: int, batch_size: int, device: str, seconds: float, threads: int = 0,
            center_channels: tuple[int, int] | None = None) -> dict:
    import torch

    from base_models.archs import create_model
    from stackkit.metric import weighted_bce

    from base_models.train import cpu_threads_for

    torch.manual_seed(0)
    if device == "cpu":
        # the same intra-op thread count `base train` uses for this image size
        torch.set_num_threads(threads or cpu_threads_for(size, torch.get_num_threads()))
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = create_model(arch, in_channels, center_channels=center_channels).to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    x = torch.randint(0, 256, (batch_size, in_channels, size, size), dtype=torch.uint8)
    y = (torch.rand(batch_size, 6) < 0.2).float()
    weights = torch.tensor([1.0, 1, 1, 1, 1, 2], device=dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def inputs():
        batch = x.to(dev, non_blocking=True).float().div_(127.5).sub_(1.0)
        return batch.contiguous(memory_format=torch.channels_last) if cuda else batch

    def train_step():
        with amp:
            logits = model(inputs())
        loss = weighted_bce(logits.float(), y.to(dev), weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step():
        with torch.inference_mode(), amp:
            torch.sigmoid(model(inputs()).float())

    def rate(step) -> float:
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize(dev)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or count < 3:
            step()
            count += 1
        if cuda:
            torch.cuda.synchronize(dev)
        return count * batch_size / (time.perf_counter() - start)

    model.train()
    train_rate = rate(train_step)
    model.eval()
    infer_rate = rate(infer_step)
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
        what = "peak CUDA memory"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        what = "peak RSS"
    return {"device": device, "size": size, "train_img_s": train_rate, "infer_img_s": infer_rate, "peak_mib": peak, "memory": what,
            "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


def _child(args, queue):
    queue.put(measure(*args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet_tiny")
    parser.add_argument("--context", type=int, default=0, choices=[0, 1, 2])
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: the rule `base train` uses)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per measurement")
    options = parser.parse_args()

    import torch

    from base_models.data import center_channels, context_offsets

    in_channels = options.windows * len(context_offsets(options.context))
    center = center_channels(options.context, options.windows)  # the split first layer `base train` builds
    sizes = [int(s) for s in options.sizes.split(",")]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"arch {options.arch}, {in_channels} input channels, batch {options.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads available")
    print(f"{'device':>6} {'px':>5} {'threads':>7} {'train img/s':>12} {'infer img/s':>12} {'peak MiB':>9}  memory")
    context = multiprocessing.get_context("spawn")
    for device in devices:
        for size in sizes:
            args = (options.arch, in_channels, size, options.batch_size, device, options.seconds, options.threads, center)
            if device == "cpu":
                queue = context.Queue()
                process = context.Process(target=_child, args=(args, queue))
                process.start()
                result = queue.get()
                process.join()
            else:
                result = measure(*args)
            threads = result["threads"] if device == "cpu" else "-"
            print(f"{device:>6} {size:>5} {threads:>7} {result['train_img_s']:>12.1f} {result['infer_img_s']:>12.1f} "
                  f"{result['peak_mib']:>9.0f}  {result['memory']}", flush=True)
            if options.json:
                print(json.dumps(result))


if __name__ == "__main__":
    main()
