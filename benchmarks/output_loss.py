"""The output layer and loss of one training micro-batch, forward and backward, alternating: the plain
cross-entropy over full [tokens, vocab] logits, the plain cross-entropy on the supervised positions only (what the
trainer runs up to `CHUNK_SIZE` positions), and `linear_cross_entropy`'s chunked form on them (`--chunk_size`).

    python benchmarks/output_loss.py                                  # 768 wide, 6400 tokens, 2200 positions
    python benchmarks/output_loss.py --supervised 0.25 --dtype float32

Prints one line per variant with the median time and the float32 logits it materialises.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from minimind_v.objectives.output_loss import CHUNK_SIZE, linear_cross_entropy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2200, help="positions in the micro-batch (rows x width)")
    parser.add_argument("--supervised", type=float, default=0.6, help="fraction of them with a label")
    parser.add_argument("--hidden_size", type=int, default=768)
    parser.add_argument("--vocab_size", type=int, default=6400)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="CPU autocast dtype")
    parser.add_argument("--chunk_size", type=int, default=512,
                        help=f"rows per chunk of the chunked form (the trainer chunks above {CHUNK_SIZE} positions)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden_size, requires_grad=True)
    head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
    targets = torch.randint(0, args.vocab_size, (args.tokens,))
    targets[torch.rand(args.tokens) > args.supervised] = -100
    positions = targets != -100

    def plain():
        return F.cross_entropy(head(hidden).float(), targets, ignore_index=-100, reduction="sum")

    def supervised_plain():
        return F.cross_entropy(head(hidden[positions]).float(), targets[positions], reduction="sum")

    def supervised_chunked():
        return linear_cross_entropy(hidden[positions], head, targets[positions], chunk_size=args.chunk_size)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()
    variants = {"full logits": plain, "supervised": supervised_plain, "supervised, chunked": supervised_chunked}
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, loss_fn in variants.items():
            start = time.perf_counter()
            with autocast:
                loss = loss_fn()
            loss.backward()
            times[name].append(time.perf_counter() - start)
            hidden.grad = head.weight.grad = None
    logits_mb = {"full logits": args.tokens * args.vocab_size * 4 / 2**20,
                 "supervised": int(positions.sum()) * args.vocab_size * 4 / 2**20,
                 "supervised, chunked": min(int(positions.sum()), args.chunk_size) * args.vocab_size * 4 / 2**20}
    for name, measured in times.items():
        print(f"{name:20s} {statistics.median(measured) * 1000:7.1f} ms  float32 logits at once {logits_mb[name]:6.1f} "
              f"MB  ({args.tokens} positions, {int(positions.sum())} supervised, {args.dtype})")


if __name__ == "__main__":
    main()
