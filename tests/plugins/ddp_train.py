"""TrainLoop on a small conv net, run by tests/test_training_ddp.py in one process and under
``torchrun --nproc_per_node 2`` (gloo on CPU). Writes the per-iteration losses (rank 0) as JSON.

    python ddp_train.py OUT.json WORKDIR [BATCH]

Under torchrun each rank leaves with ``os._exit(0)`` once its work is done and the process group is
destroyed: twice in full test-suite runs (never in 52 standalone runs, 20 of them under full CPU
load) rank 1 aborted with "terminate called without an active exception", the message of a C++
thread object destroyed while still joinable, as happens in interpreter teardown; torchrun then
reports the run as failed."""
import json
import os
import sys

import torch
from torch import nn

from fdsbench.blocks.losses import dice_ce_loss
from fdsbench.blocks.training import TrainLoop, param_groups


def batches(epoch: int, n: int, batch: int):
    for b in range(n):  # the same global batches in every process
        g = torch.Generator().manual_seed(1000 * epoch + b)
        x = torch.rand(batch, 3, 16, 16, generator=g)
        y = (x[:, :1] + 0.3 * torch.rand(batch, 1, 16, 16, generator=g) > 0.9).float()
        yield {"x": x, "y": y, "ids": [f"e{epoch}b{b}i{i}" for i in range(batch)]}


def main(out: str, workdir: str, batch: int = 4) -> None:
    if torch.distributed.is_available() and "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("backbone", nn.Conv2d(3, 8, 3, padding=1))
    model.add_module("head", nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1)))
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    loop = TrainLoop(model, param_groups(model, [("head.1", 1.0)], default_mult=2.0), workdir, epochs=2,
                     iters_per_epoch=3, base_lr=1e-2, grad_clip=1.0, seed=5)

    def step_loss(b):
        return dice_ce_loss(torch.sigmoid(loop.module(b["x"])), b["y"], eta=10.0)

    history = loop.run(lambda epoch: batches(epoch, 3, batch), step_loss)
    if loop.rank == 0:
        with open(out, "w") as f:
            json.dump({"world": loop.world, "losses": [v for h in history for v in h["losses"]],
                       "state": {k: v.tolist() for k, v in model.state_dict().items()}}, f)
    if loop.world > 1:
        torch.distributed.barrier()  # no rank tears gloo down while another still exchanges with it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(v) for v in sys.argv[3:]))
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
