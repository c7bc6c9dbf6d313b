"""Fine-tune AdaFuse adapters on a small synthetic multi-task dataset, on the CPU, in well under two minutes.

The backbone is a random, frozen TinyLlama; only the router and the LoRA experts learn. Three
tasks share the model, each marked by a task token: copy the sequence, reverse it, add one to
every token. A pre-gated router can send each task's tokens to different experts.

    python examples/finetune_tiny.py --steps 200
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from adafuse_compile import AdaFuseConfig, TinyLlama, TinyLlamaConfig, gate_channel, inject

MODEL = TinyLlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_seq_len=64)
ADAPTERS = AdaFuseConfig(num_experts=4, rank=8, alpha=16, top_k=2, target_modules="all-linear")
TASKS = 3  # task tokens 0..2; payload tokens 3..vocab-1
SEQ = 8


def make_batch(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences [task, x_1..x_SEQ, y_1..y_SEQ]; the loss is on the y part only."""
    task = torch.randint(0, TASKS, (batch,), generator=gen)
    x = torch.randint(TASKS, MODEL.vocab_size, (batch, SEQ), generator=gen)
    y = torch.where(task[:, None] == 0, x, torch.where(task[:, None] == 1, x.flip(1),
                    (x - TASKS + 1) % (MODEL.vocab_size - TASKS) + TASKS))
    seq = torch.cat([task[:, None], x, y], 1)
    labels = seq.clone()
    labels[:, : 1 + SEQ] = -100
    return seq, labels


def train(steps: int = 200, batch: int = 32, lr: float = 3e-3, aux_coef: float = 0.01, seed: int = 0,
          log_every: int = 20, log=print):
    torch.manual_seed(seed)
    model = TinyLlama(MODEL).init_weights(std=0.05, seed=seed)
    inject(model, ADAPTERS)
    model.train()
    channel = gate_channel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        seq, labels = make_batch(batch, gen)
        logits = model(seq[:, :-1])
        lm_loss = F.cross_entropy(logits.reshape(-1, MODEL.vocab_size), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss = lm_loss + aux_coef * channel.aux_loss  # load-balancing loss of this forward's router
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(lm_loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:4d}  lm loss {lm_loss.item():.3f}  aux {channel.aux_loss.item():.3f}")
    return model, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    t0 = time.perf_counter()
    _, losses = train(args.steps)
    print(f"loss {losses[0]:.3f} -> {min(losses[-10:]):.3f} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
