"""The fused SDPO head on its own: divergence and gradients from hidden states, without (N, V) logits.

python examples/head_demo.py [--tokens 512 --hidden 64 --vocab 32000 --topk 100]
"""

from __future__ import annotations

import argparse
import time

import torch

from sdpo_fast import sdpo_head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--topk", type=int, default=100)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "naive"])
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    h_s = torch.randn(args.tokens, args.hidden, device=device, requires_grad=True)
    w = (torch.randn(args.vocab, args.hidden, device=device) * 0.5).requires_grad_(True)
    h_t = h_s.detach() + 0.3 * torch.randn_like(h_s)
    w_t = w.detach() + 0.01 * torch.randn_like(w)
    y = torch.randint(0, args.vocab, (args.tokens,), device=device)

    results = {}
    for backend in (args.backend, "naive"):
        h_s.grad = w.grad = None
        start = time.perf_counter()
        out = sdpo_head(h_s, w, h_t, w_t, y, topk=args.topk, backend=backend)
        out.divergence.mean().backward()
        results[backend] = (out.divergence.mean().item(), h_s.grad.clone(), time.perf_counter() - start)

    (loss_a, grad_a, t_a), (loss_b, grad_b, t_b) = results[args.backend], results["naive"]
    print(f"tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} topk={args.topk} device={device}")
    print(f"{args.backend:>6}: JSD {loss_a:.6f}   fwd+bwd {t_a * 1e3:8.1f} ms")
    print(f"{'naive':>6}: JSD {loss_b:.6f}   fwd+bwd {t_b * 1e3:8.1f} ms")
    print(f"max |grad difference| = {(grad_a - grad_b).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
