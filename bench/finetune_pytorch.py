#!/usr/bin/env python3
"""The course-note fine-tuning recipe in plain PyTorch, as a baseline to time cnnserve against.

A torchvision classifier (vgg11_bn or googlenet) is frozen, its last layer is replaced by a new
nn.Linear for the data set's classes, and only that layer is trained with Adam and cross-entropy.
The frozen part runs in eval mode (batch norms use their running statistics, dropout is off)
except the dropout directly before the new layer, which is active during training steps.
The head with the best validation loss is kept and scored on test/.

The last line printed is one JSON object (see README.md in this folder).
"""

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset, random_split
from torchvision import datasets, transforms

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / ".." / "shared" / "data" / "catanddog"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
VALID_RATIO = 0.1


def parse_bool(text):
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="ImageFolder root holding train/ and test/ (default: ../shared/data/catanddog "
                        "relative to the repo root)")
    p.add_argument("--arch", choices=["vgg11_bn", "googlenet"], default="vgg11_bn")
    p.add_argument("--augment", type=parse_bool, default=True,
                   help="true|false: RandomRotation(5) and RandomHorizontalFlip(0.5) on training images")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", type=Path, default=None,
                   help="safetensors state_dict with torchvision's key names (.safetensors.gz works too); "
                        "default: random initialisation")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: all cores available to this process)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N training images, taken class by class in turn so that "
                        "every class is present (for smoke tests)")
    return p.parse_args()


def pil_rgb(path):
    # Some .jpg files in the cat/dog set are really BMP: PIL opens by content.
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def build_model(arch, weights):
    if arch == "vgg11_bn":
        model = torchvision.models.vgg11_bn(weights=None)
    else:
        # As torchvision builds its pretrained GoogLeNet.
        model = torchvision.models.googlenet(
            weights=None, aux_logits=True, transform_input=True, init_weights=True)
    if weights is not None:
        from safetensors.torch import load as st_load, load_file as st_load_file
        if weights.suffix == ".gz":
            with gzip.open(weights, "rb") as f:
                state = st_load(f.read())
        else:
            state = st_load_file(str(weights))
        if arch == "googlenet":
            result = model.load_state_dict(state, strict=False)
            is_aux = lambda k: k.startswith(("aux1.", "aux2."))
            bad = [k for k in result.missing_keys if not is_aux(k)]
            bad += [k for k in result.unexpected_keys if not is_aux(k)]
            if bad:
                sys.exit(f"{weights}: keys that do not fit googlenet: {bad[:10]}")
        else:
            model.load_state_dict(state, strict=True)
    return model


def attach_head(model, arch, num_classes):
    """Freezes everything, puts a new last layer in; returns (head, dropout before it)."""
    for param in model.parameters():
        param.requires_grad = False
    if arch == "vgg11_bn":
        head = nn.Linear(model.classifier[6].in_features, num_classes)
        model.classifier[6] = head
        dropout = model.classifier[5]
    else:
        head = nn.Linear(model.fc.in_features, num_classes)
        model.fc = head
        dropout = model.dropout
    assert isinstance(dropout, nn.Dropout)
    return head, dropout


def limited_indices(targets, limit):
    """The first `limit` samples, one class after the other in turn (each class in file order)."""
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    picked, pos = [], 0
    while len(picked) < limit and any(pos < len(q) for q in queues):
        for q in queues:
            if pos < len(q) and len(picked) < limit:
                picked.append(q[pos])
        pos += 1
    return sorted(picked)


def run_epoch_eval(model, loader, loss_fn):
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for xs, ys in loader:
            logits = model(xs)
            loss_sum += loss_fn(logits, ys).item() * len(ys)
            correct += (logits.argmax(1) == ys).sum().item()
            seen += len(ys)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def main():
    args = parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    t_model = time.perf_counter()
    model = build_model(args.arch, args.weights)
    load_model_s = time.perf_counter() - t_model

    # ---- timed from here: data loading, training, test evaluation ----
    t0 = time.perf_counter()
    resize = transforms.Resize((256, 256))
    tail = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    random_part = [transforms.RandomRotation(5), transforms.RandomHorizontalFlip(0.5)]
    train_tf = transforms.Compose([resize] + (random_part if args.augment else []) + tail)
    eval_tf = transforms.Compose([resize] + tail)

    train_root, test_root = args.data / "train", args.data / "test"
    train_aug = datasets.ImageFolder(train_root, transform=train_tf, loader=pil_rgb)
    train_plain = datasets.ImageFolder(train_root, transform=eval_tf, loader=pil_rgb)
    test_ds = datasets.ImageFolder(test_root, transform=eval_tf, loader=pil_rgb)
    classes = train_aug.classes
    if test_ds.classes != classes:
        sys.exit(f"test/ classes {test_ds.classes} differ from train/ classes {classes}")

    pool = list(range(len(train_aug)))
    if args.limit is not None:
        pool = limited_indices(train_aug.targets, args.limit)
    n_valid = min(max(1, round(len(pool) * VALID_RATIO)), len(pool) - 1)
    split_gen = torch.Generator().manual_seed(args.seed)
    train_part, valid_part = random_split(pool, [len(pool) - n_valid, n_valid], generator=split_gen)
    train_idx = [pool[i] for i in train_part.indices]
    valid_idx = [pool[i] for i in valid_part.indices]
    # Validation images get the eval transform: the random parts are for training only.
    train_set = Subset(train_aug, train_idx)
    valid_set = Subset(train_plain, valid_idx)

    shuffle_gen = torch.Generator().manual_seed(args.seed + 1)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                              num_workers=0, generator=shuffle_gen)
    valid_loader = DataLoader(valid_set, batch_size=args.batch_size, shuffle=False, num_workers=0)
    test_loader = DataLoader(test_ds, batch_size=args.batch_size, shuffle=False, num_workers=0)

    head, head_dropout = attach_head(model, args.arch, len(classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {threads} threads; "
          f"{args.arch}, augment={args.augment}; classes {classes}; "
          f"train {len(train_set)}, valid {len(valid_set)}, test {len(test_ds)} images; "
          f"model built in {load_model_s:.1f}s", flush=True)

    epoch_s, history = [], []
    best = None  # (valid_loss, epoch, head state_dict)
    for epoch in range(1, args.epochs + 1):
        te = time.perf_counter()
        # The frozen part in eval mode, only the dropout before the new layer active.
        model.eval()
        head_dropout.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for xs, ys in train_loader:
            optimizer.zero_grad()
            logits = model(xs)
            loss = loss_fn(logits, ys)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(ys)
            correct += (logits.argmax(1) == ys).sum().item()
            seen += len(ys)
        train_loss, train_acc = loss_sum / max(seen, 1), correct / max(seen, 1)
        valid_loss, valid_acc = run_epoch_eval(model, valid_loader, loss_fn)
        if best is None or valid_loss < best[0]:
            best = (valid_loss, epoch, {k: v.detach().clone() for k, v in head.state_dict().items()})
        epoch_s.append(round(time.perf_counter() - te, 3))
        history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                        "valid_loss": valid_loss, "valid_acc": valid_acc})
        print(f"epoch {epoch}/{args.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
              f"valid loss {valid_loss:.4f} acc {valid_acc:.4f} | {epoch_s[-1]:.1f}s", flush=True)

    head.load_state_dict(best[2])
    test_loss, test_acc = run_epoch_eval(model, test_loader, loss_fn)
    wall_s = time.perf_counter() - t0
    print(f"best epoch {best[1]} (valid loss {best[0]:.4f}); "
          f"test loss {test_loss:.4f} acc {test_acc:.4f}; wall {wall_s:.1f}s", flush=True)

    print(json.dumps({
        "framework": "pytorch",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "arch": args.arch,
        "augment": args.augment,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "threads": threads,
        "weights": str(args.weights) if args.weights else None,
        "train_images": len(train_set),
        "valid_images": len(valid_set),
        "test_images": len(test_ds),
        "load_model_s": round(load_model_s, 3),
        "wall_s": round(wall_s, 3),
        "epoch_s": epoch_s,
        "best_epoch": best[1],
        "history": history,
        "test_loss": test_loss,
        "test_acc": test_acc,
    }), flush=True)


if __name__ == "__main__":
    main()
