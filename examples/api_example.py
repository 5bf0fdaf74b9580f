# A complete DNR run through the Python API: a small CNN on the Fashion-MNIST subset that ships
# with dnr, sparsified to 5% density (20x), trained with the hybrid clean + PGD loss.
import torch
from torch.utils.data import DataLoader

import dnr
from dnr.models import small_cnn

torch.manual_seed(0)
train = DataLoader(dnr.data.fashion_mnist("train", subset=3000), batch_size=128, shuffle=True)
test = DataLoader(dnr.data.fashion_mnist("test"), batch_size=500)

model = dnr.sparsify(small_cnn(num_classes=10), density=0.05, mode="irregular")
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
epochs = 3
# starts dense, prunes to the budget by a quarter of training, then rewires every few steps (prune,
# redistribute, regrow); it re-applies the masks after every optimizer step
rewiring = dnr.DNR(model, optimizer, total_steps=epochs * len(train))

for epoch in range(epochs):
    model.train()
    for x, y in train:
        x_adv = dnr.attacks.pgd(model, x, y, eps=0.1, alpha=0.025, steps=5)  # input gradients only
        loss = dnr.hybrid_loss(model(x), model(x_adv), y, beta=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # DNR masks, and rewires when a rewiring is due
    rewiring.end_epoch(last=epoch == epochs - 1)  # (the paper's schedule rewires here instead)
    # the first quarter prunes the dense start down to the budget ("event": "sparsify"), then DNR rewires
    moved = sum(r["pruned"] for r in rewiring.history if r["epoch"] == epoch and "event" not in r)
    print(f"epoch {epoch + 1}: {rewiring.active_weights()} active weights (budget {rewiring.budget}), "
          f"moved {moved} in this epoch's rewirings")

acc = dnr.attacks.evaluate(model, test, eps=0.1, alpha=0.0125, steps=20)
report = dnr.density_report(model, input_size=(1, 28, 28))
print(f"clean {acc['clean']:.3f}  FGSM {acc['fgsm']:.3f}  PGD-20 {acc['pgd']:.3f}  "
      f"compression {report.compression:.1f}x")
