"""Distributed SimCLR: negatives gathered from every rank (gradients summed back across ranks).

On GPUs (one process per GPU, NCCL):
    torchrun --nproc_per_node 8 -m simclr_ext pretrain --dataset cifar10 --data-dir DIR --batch-size 4096 ...
This script does the same from Python; on a CPU it runs 2 processes with gloo:
    torchrun --nproc_per_node 2 python/examples/ddp_launch.py
The global batch (--batch-size) is split evenly across ranks; rank 0 writes checkpoints and the summary.
An example is rerun as is: it starts its run directory over (overwrite=True) instead of refusing it.
"""
import torch.distributed as dist

from simclr_ext import PretrainConfig, pretrain

if __name__ == "__main__":
    # pretrain() joins the process group torchrun describes (env://): NCCL on CUDA, gloo on the CPU.
    summary = pretrain(PretrainConfig(dataset="digits", epochs=5, batch_size=256, out="runs/ddp_example",
                                      eval=False, knn_every=0, overwrite=True))
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"final loss {summary['final_loss']:.4f}, {summary['wall_seconds']:.1f} s")
