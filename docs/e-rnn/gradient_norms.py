"""The first 40 clean training steps of the GRU preset, dense and block-circulant (k = 8), at lr 0.05 and 0.5,
with and without clipping each step's gradients to global norm 1: the loss and the global gradient norm
(before clipping) every 5 steps. The check behind the recurrent models' default lr and gradient clipping
(README.md, "The learning rate and gradient clipping"):

    python docs/e-rnn/gradient_norms.py            # about a minute on one CPU core
"""

import torch
import torch.nn.functional as F

from dnr.harness import builders, resolve_config

torch.set_num_threads(1)
for method, extra in (("dense-at", {}), ("circulant", {"block_size": 8, "density": 1 / 8})):
    for lr, clip in ((0.05, 0.0), (0.5, 0.0), (0.5, 1.0)):
        cfg = resolve_config(overrides={"model": "gru", "method": method, "lr": lr, "max_grad_norm": clip, **extra})
        torch.manual_seed(0)
        model = builders.build_model_for(cfg)
        data = builders.build_dataset(cfg, "train", torch.Generator().manual_seed(0))
        batches = iter(torch.utils.data.DataLoader(data, batch_size=128, shuffle=True,
                                                   generator=torch.Generator().manual_seed(0)))
        opt = builders.make_optimizer(cfg, model, torch.device("cpu"))
        trace = []
        for step in range(40):
            x, y = next(batches)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
            opt.step()
            if step % 5 == 4:
                trace.append(f"{step + 1}: {loss.item():.2f} / {norm.item():.3g}")
        print(f"{method:9s} lr {lr:<4} clip {clip or 'none':<4} | loss / gradient norm at step " + "; ".join(trace))
