"""The complete example of docs/recipe.md, as written there, for bench/recipe.py.

Two changes only: the initial weights come from a local .pth (there is no download here) while the
transform stays ``ResNet18_Weights.DEFAULT.transforms()``, and the paths, epochs and workers are
arguments. It prints each epoch's metrics and ``best_val_acc=...`` at the end.

    python bench/recipe_torch.py DATA_ROOT WEIGHTS.pth EPOCHS WORKERS
"""

import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import datasets, models


def train_one_epoch(model, loader, loss_fn, optimizer, device):
    model.train()
    total_loss = 0.0
    total_correct = 0
    total_count = 0
    for images, labels in loader:
        images = images.to(device)
        labels = labels.to(device)
        logits = model(images)
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        preds = logits.argmax(dim=1)
        total_loss += loss.item() * labels.size(0)
        total_correct += (preds == labels).sum().item()
        total_count += labels.size(0)
    return {"loss": total_loss / total_count, "accuracy": total_correct / total_count}


@torch.no_grad()
def evaluate(model, loader, loss_fn, device):
    model.eval()
    total_loss = 0.0
    total_correct = 0
    total_count = 0
    for images, labels in loader:
        images = images.to(device)
        labels = labels.to(device)
        logits = model(images)
        loss = loss_fn(logits, labels)
        preds = logits.argmax(dim=1)
        total_loss += loss.item() * labels.size(0)
        total_correct += (preds == labels).sum().item()
        total_count += labels.size(0)
    return {"loss": total_loss / total_count, "accuracy": total_correct / total_count}


def main(root: str, weights_file: str, epochs: int, workers: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = models.ResNet18_Weights.DEFAULT
    transform = weights.transforms()
    train_set = datasets.ImageFolder(f"{root}/train", transform=transform)
    val_set = datasets.ImageFolder(f"{root}/val", transform=transform)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True, num_workers=workers, pin_memory=True)
    val_loader = DataLoader(val_set, batch_size=64, shuffle=False, num_workers=workers, pin_memory=True)
    num_classes = len(train_set.classes)
    model = models.resnet18()
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    for param in model.parameters():
        param.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    model = model.to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(filter(lambda p: p.requires_grad, model.parameters()), lr=1e-3, weight_decay=1e-4)
    best_acc = 0.0
    checkpoint = Path(weights_file).with_name("transfer_classifier.pt")
    for epoch in range(epochs):
        train_metrics = train_one_epoch(
            model=model, loader=train_loader, loss_fn=loss_fn, optimizer=optimizer, device=device
        )
        val_metrics = evaluate(model=model, loader=val_loader, loss_fn=loss_fn, device=device)
        print(
            f"epoch={epoch + 1} "
            f"train_loss={train_metrics['loss']:.4f} "
            f"train_acc={train_metrics['accuracy']:.4f} "
            f"val_loss={val_metrics['loss']:.4f} "
            f"val_acc={val_metrics['accuracy']:.4f}",
            flush=True,
        )
        if val_metrics["accuracy"] > best_acc:
            best_acc = val_metrics["accuracy"]
            torch.save(
                {
                    "model": model.state_dict(),
                    "classes": train_set.classes,
                    "class_to_idx": train_set.class_to_idx,
                    "weights": "ResNet18_Weights.DEFAULT",
                    "val_acc": best_acc,
                },
                checkpoint,
            )
    print(f"best_val_acc={best_acc:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
