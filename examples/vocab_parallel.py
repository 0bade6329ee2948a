"""Vocab-parallel cross-entropy with gpuce, on CPU (gloo) or GPUs (NCCL), same code.

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Each rank holds a slice of the classifier's rows (an uneven split of V = 32003 classes),
computes its local logits, and calls gpuce: one all-gather of per-row stats in the forward,
no collective in the backward for the cross-entropy itself (the linear variant all-reduces
grad_hidden, overlapped with its grad_classifier work). Rank 0 checks the result against the
dense computation on the full classifier.
"""
import os

import torch
import torch.distributed as dist

import gpuce.torch as gt


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    n_rows, n_hidden, n_cls = 256, 128, 32003
    g = torch.Generator().manual_seed(0)  # the same dense data on every rank
    hidden = torch.randn(n_rows, n_hidden, generator=g)
    classifier = torch.randn(n_cls, n_hidden, generator=g) * 0.05
    target = torch.randint(0, n_cls, (n_rows,), generator=g)
    target[::17] = -100  # some ignored rows

    # this rank's classes: an uneven split, the first ranks take the remainder
    base, extra = divmod(n_cls, world)
    sizes = [base + (r < extra) for r in range(world)]
    vocab_start = sum(sizes[:rank])
    vocab_end = vocab_start + sizes[rank]
    opts = dict(label_smoothing=0.1, z_loss=1e-4)

    h = hidden.to(device, copy=True).requires_grad_(True)
    local_c = classifier[vocab_start:vocab_end].to(device, copy=True).requires_grad_(True)
    loss = gt.vocab_parallel_linear_cross_entropy(h, local_c, target.to(device),
                                                  vocab_start=vocab_start, **opts)
    loss.backward()

    # the same on precomputed local logits
    local_logits = (hidden.to(device) @ classifier[vocab_start:vocab_end].to(device).T).requires_grad_(True)
    loss2 = gt.vocab_parallel_cross_entropy(local_logits, target.to(device),
                                            vocab_start=vocab_start, **opts)
    loss2.backward()

    print(f"rank {rank}: classes [{vocab_start}, {vocab_end}), loss {loss.item():.7f} "
          f"(bits {loss.detach().cpu().view(torch.int32).item():#010x}), "
          f"from local logits {loss2.item():.7f}", flush=True)

    if rank == 0:  # the dense reference on the full classifier
        hd = hidden.detach().clone().requires_grad_(True)
        cd = classifier.detach().clone().requires_grad_(True)
        dense = gt.cross_entropy(hd @ cd.T, target, **opts)
        dense.backward()
        rel = lambda a, b: float((a.cpu() - b).abs().max() / b.abs().max())
        print(f"dense loss {dense.item():.7f}; |loss - dense| = {abs(loss.item() - dense.item()):.2e}; "
              f"grad_hidden rel err {rel(h.grad, hd.grad):.1e}; "
              f"grad_classifier slice rel err {rel(local_c.grad, cd.grad[vocab_start:vocab_end]):.1e}",
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
