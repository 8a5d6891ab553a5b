"""Drop simclr_ext's fused NT-Xent into an existing training loop (CPU or GPU).

    python python/examples/loss_in_your_loop.py
"""
import torch
from torch import nn

import simclr_ext
from simclr_ext.recipe.data import load_dataset

device = "cuda" if torch.cuda.is_available() else "cpu"
digits = load_dataset("digits")                       # uint8 (N, 1, 8, 8) images, no download
augment = simclr_ext.SimCLRAugment.preset("digits", size=16, mean=digits.mean, std=digits.std)  # fused, both views
encoder = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
head = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))
model = nn.Sequential(encoder, head).to(device)
criterion = simclr_ext.NTXentLoss(temperature=0.2)   # the only SimCLR-specific line of the loop
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
generator = torch.Generator().manual_seed(0)

for epoch in range(5):
    order = torch.randperm(len(digits.pretrain), generator=generator)
    for start in range(0, len(order) - 255, 256):
        v1, v2 = augment(digits.pretrain.images[order[start:start + 256]].to(device), generator=generator)
        z1, z2 = model(torch.cat([v1, v2])).chunk(2)
        loss = criterion(z1, z2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1}: NT-Xent {loss.item():.4f}")
