"""DDP smoke run under torchrun: the collective backend works and slidemil trains inside its process group.

Run from the repository root: ``torchrun --nproc_per_node N bench/ddp_smoke.py --features DIR --out DIR
--json FILE [--device cuda|cpu]`` on a features folder with ``metadata.csv`` (e.g.
``tests.trainer_fixtures.make_feature_cohort``). Each rank joins the process group with the backend
slidemil's trainer uses there (nccl on CUDA, gloo on the CPU), even with one rank (the trainer itself
starts no group for a single process), then:

1. an all-reduce of each rank's number, checked against the sum;
2. a gated attention-MIL head wrapped in ``DistributedDataParallel`` trained for a few steps on random
   bags (gradients all-reduced), its parameters then checked equal on every rank;
3. ``slidemil``'s own features-mode training (``run_training``) for two epochs inside that group.

Rank 0 writes a JSON with the backend, world size, the checks and the steps/s of step 2.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()

    from slidemil.config import load_config
    from slidemil.models.mil import HeadConfig, create_head
    from slidemil.trainer.config import TrainConfig
    from slidemil.trainer.run import run_training

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = args.device.startswith("cuda")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=300), device_id=device if cuda else None)
    result: dict[str, object] = {"backend": dist.get_backend(), "world_size": world, "device": str(device)}

    value = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(value)
    result["all_reduce_ok"] = float(value.item()) == world * (world + 1) / 2

    torch.manual_seed(0)
    head = create_head(HeadConfig(mil_type="gated", in_dim=256, n_classes=2)).to(device)
    model = DistributedDataParallel(head, device_ids=[device] if cuda else None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator(device="cpu").manual_seed(rank)
    start = time.perf_counter()
    for step in range(args.steps):
        bag = torch.randn(1, 512, 256, generator=gen).to(device)
        label = torch.tensor([step % 2], device=device)
        loss = torch.nn.functional.cross_entropy(model(bag).logits, label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize(device)
    result["ddp_steps_per_s"] = round(args.steps / (time.perf_counter() - start), 1)
    total = torch.stack([q.detach().double().sum() for q in head.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(total) for _ in range(world)]
    dist.all_gather(gathered, total)
    result["parameters_equal_on_ranks"] = all(torch.equal(g, gathered[0]) for g in gathered)

    cfg = load_config(TrainConfig, None, {
        "data.metadata": str(args.features / "metadata.csv"), "data.features": str(args.features),
        "log.tensorboard": False, "log.progress": False, "optim.epochs": 2, "device": args.device})
    start = time.perf_counter()
    (trained,) = run_training(cfg, args.out)
    result["slidemil_train_seconds"] = round(time.perf_counter() - start, 2)
    result["slidemil_train_test_auc"] = trained.test_metrics.get("auc")
    result["ok"] = bool(result["all_reduce_ok"] and result["parameters_equal_on_ranks"])
    dist.barrier()
    if rank == 0:
        args.json.write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
