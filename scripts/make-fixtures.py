#!/usr/bin/env python3
"""Regenerate what cnnserve's tests read from CNNSERVE_FIXTURES (and, with --data, a stand-in for
the cat/dog set the tests read from CNNSERVE_DATA), for contributors without our shared folder.

    python3 scripts/make-fixtures.py OUT_DIR [--data DATA_DIR] [--seed N]

Needs torch, torchvision, safetensors, pillow, numpy and scikit-image (CPU is enough; nothing is
downloaded at run time: the photos are the ones scikit-image ships inside its wheel). Writes:

  OUT_DIR/vgg11_bn/weights.safetensors.gz   torchvision.models.vgg11_bn's state_dict, gzipped
  OUT_DIR/vgg11_bn/weights.safetensors.sha256   sha256 of the unpacked file (the tests check it)
  OUT_DIR/vgg11_bn/reference.safetensors    inputs_{224,256}x{..} and PyTorch's eval logits
  OUT_DIR/googlenet/weights.safetensors     torchvision.models.googlenet(aux_logits=True,
                                            transform_input=True)'s state_dict
  OUT_DIR/googlenet/weights.pth             the same, torch's LEGACY (pre-1.6, non-zip) format
  OUT_DIR/googlenet/subset_zip.pth          12 of those tensors, torch's zip format
  OUT_DIR/googlenet/subset_zip.safetensors  the same 12 tensors
  OUT_DIR/googlenet/reference.safetensors   as for vgg11_bn
  OUT_DIR/preprocess/img0.jpg .. img4.jpg   photos (img2.jpg is a BMP, img3/img4 progressive)
  OUT_DIR/preprocess/expected.safetensors   torchvision's transforms of each photo
  OUT_DIR/preprocess/index.json             the photos and their sizes
  OUT_DIR/README.md                         how they were made
  DATA_DIR/catanddog/{train,test}/{Cat,Dog}/*.jpg   with --data: 266/263 train, 6/6 test images

The weights are random (not ImageNet-trained) with batch-norm statistics measured on random inputs
and then jittered, so that any mix-up of tensors changes the logits. Everything is seeded: the same
machine and versions give the same files, except googlenet/weights.pth, whose legacy format names
each storage by its memory address (its tensors are the same). On another CPU or torch version the
last bits of the measured statistics may differ, which is why the tests take vgg11_bn's digest from
weights.safetensors.sha256 rather than from a constant.
"""

import argparse
import gzip
import hashlib
import importlib.resources
import io
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageEnhance, ImageOps
from safetensors.torch import load_file, save_file

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

# Weights of these layers are sparse (this fraction non-zero): most of vgg11_bn's 531 MB, so the
# gzipped file is about ten times smaller. He-uniform over the non-zero fan-in keeps the scale.
VGG_SPARSE = {"classifier.0": 1 / 256, "classifier.3": 1 / 64}

# (file, source photo in scikit-image's data folder, crop box on it, size written, format)
PHOTOS = [
    ("img0.jpg", "coffee.png", (0, 0, 533, 400), (500, 375), "baseline"),
    ("img1.jpg", "chelsea.png", (100, 0, 350, 300), (288, 345), "baseline"),
    ("img2.jpg", "astronaut.png", (60, 0, 462, 512), (157, 200), "bmp"),
    ("img3.jpg", "rocket.jpg", (200, 0, 546, 427), (243, 300), "progressive"),
    ("img4.jpg", "chelsea.png", (25, 0, 425, 300), (400, 300), "progressive"),
]

# The stand-in data set: "Cat" from scikit-image's cat photo, "Dog" from its other photos (no dog
# ships in a PyPI package we know of: the class is only something else to tell apart).
CAT_SOURCES = ["chelsea.png"]
DOG_SOURCES = ["astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
# Names and counts as in the real set: 266 + 263 train, 6 + 6 test, five BMP files named .jpg.
TRAIN_NAMES = {
    "Cat": [str(i) for i in range(264)] + ["7642", "7647"],
    "Dog": [str(i) for i in range(262)] + ["1017"],
}
TEST_NAMES = {
    "Cat": ["8104", "8105", "8106", "cat.12426", "cat.12495", "cat.12496"],
    "Dog": ["dog.116", "dog.212", "dog.213", "dog.214", "dog.215", "dog.224"],
}
BMP_FILES = {"train/Cat/23.jpg", "train/Cat/7642.jpg", "train/Cat/7647.jpg", "train/Dog/50.jpg", "train/Dog/1017.jpg"}

written = []


def note(path):
    written.append(path)
    print(f"  {path}  ({os.path.getsize(path):,} bytes)", flush=True)


def replace(tmp, path):
    os.replace(tmp, path)
    note(path)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Weights and logits


@torch.no_grad()
def randomize(model, gen, sparse=None):
    """He-uniform conv/linear weights, small random biases, BN gamma in [0.5, 1.5]."""
    sparse = sparse or {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            w = torch.empty_like(m.weight).uniform_(-1.0, 1.0, generator=gen)
            density = sparse.get(name, 1.0)
            if density < 1.0:
                keep = torch.rand(w.shape, generator=gen) < density
                w.masked_fill_(~keep, 0.0)  # +0.0: multiplying by the mask would leave -0.0 too
                fan_in *= density
            m.weight.copy_(w * math.sqrt(6.0 / fan_in))
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)


@torch.no_grad()
def calibrate(model, gen, batches=4, batch=8, size=224):
    """Running statistics from 4 batches of 8 random inputs in train mode (cumulative average),
    then jittered so that the stored ones are not exactly any batch's."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    for _ in range(batches):
        model(torch.randn(batch, 3, size, size, generator=gen))
    for bn in bns:
        bn.momentum = 0.1
        std = bn.running_var.sqrt()
        bn.running_mean += 0.1 * std * torch.randn(std.shape, generator=gen)
        bn.running_var *= torch.empty_like(std).uniform_(0.8, 1.25, generator=gen)
        bn.num_batches_tracked.zero_()
    model.eval()


def state_dict(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@torch.no_grad()
def reference(model, gen, path):
    out = {}
    for s in (224, 256):
        x = torch.randn(2, 3, s, s, generator=gen)
        out[f"inputs_{s}x{s}"] = x.contiguous()
        out[f"logits_{s}x{s}"] = model(x).contiguous()
    save_file(out, path + ".tmp")
    replace(path + ".tmp", path)
    return out


def make_vgg11_bn(out_dir, seed):
    d = os.path.join(out_dir, "vgg11_bn")
    os.makedirs(d, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    model = torchvision.models.vgg11_bn(weights=None)
    randomize(model, gen, VGG_SPARSE)
    calibrate(model, gen)
    sd = state_dict(model)
    meta = {"source": f"torchvision {torchvision.__version__} vgg11_bn, randomized parameters and BN statistics"}
    raw = os.path.join(d, "weights.safetensors.tmp")
    save_file(sd, raw, metadata=meta)
    digest = sha256(raw)
    gz = os.path.join(d, "weights.safetensors.gz")
    with open(raw, "rb") as src, open(gz + ".tmp", "wb") as f:
        # mtime=0 and no file name in the header: the same bytes every time.
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as z:
            shutil.copyfileobj(src, z, 1 << 20)
    os.remove(raw)
    replace(gz + ".tmp", gz)
    with open(os.path.join(d, "weights.safetensors.sha256.tmp"), "w") as f:
        f.write(f"{digest}  weights.safetensors\n")
    replace(os.path.join(d, "weights.safetensors.sha256.tmp"), os.path.join(d, "weights.safetensors.sha256"))
    refs = reference(model, gen, os.path.join(d, "reference.safetensors"))
    return digest, refs


def make_googlenet(out_dir, seed):
    d = os.path.join(out_dir, "googlenet")
    os.makedirs(d, exist_ok=True)
    gen = torch.Generator().manual_seed(seed + 1)
    model = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=True)
    randomize(model, gen)
    calibrate(model, gen)
    meta = {"source": f"torchvision {torchvision.__version__} googlenet, randomized parameters and BN statistics"}
    st = os.path.join(d, "weights.safetensors")
    save_file(state_dict(model), st + ".tmp", metadata=meta)
    replace(st + ".tmp", st)

    # The .pth files hold the tensors as read back from the safetensors file (a plain dict, in
    # that file's order), so that both formats hold the very same bits.
    sd = load_file(st)
    pth = os.path.join(d, "weights.pth")
    torch.save(sd, pth + ".tmp", _use_new_zipfile_serialization=False)
    replace(pth + ".tmp", pth)
    with open(pth, "rb") as f:
        assert f.read(4) == b"\x80\x02\x8a\x0a", "weights.pth is not in torch's legacy format"

    subset = {k: v for k, v in sd.items() if k.startswith(("conv1.", "inception3a.branch1."))}
    assert len(subset) == 12, sorted(subset)
    # torch names the zip's top folder after the file: write it under its final name.
    tmp_dir = os.path.join(d, ".tmp-subset")
    os.makedirs(tmp_dir, exist_ok=True)
    torch.save(subset, os.path.join(tmp_dir, "subset_zip.pth"))
    replace(os.path.join(tmp_dir, "subset_zip.pth"), os.path.join(d, "subset_zip.pth"))
    os.rmdir(tmp_dir)
    sub_st = os.path.join(d, "subset_zip.safetensors")
    save_file(subset, sub_st + ".tmp")
    replace(sub_st + ".tmp", sub_st)

    refs = reference(model, gen, os.path.join(d, "reference.safetensors"))

    # Check what was written: both formats load to the same tensors and give the same logits.
    legacy = torch.load(pth, weights_only=True)
    assert legacy.keys() == sd.keys() and all(torch.equal(legacy[k], sd[k]) for k in sd)
    zipped = torch.load(os.path.join(d, "subset_zip.pth"), weights_only=True)
    assert all(torch.equal(zipped[k], subset[k]) for k in subset)
    check = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    check.load_state_dict(legacy)
    check.eval()
    with torch.no_grad():
        assert torch.equal(check(refs["inputs_224x224"]), refs["logits_224x224"])
    return refs


# ---------------------------------------------------------------------------------------------
# Photos


def photo(name):
    path = importlib.resources.files("skimage") / "data" / name
    with path.open("rb") as f:
        img = Image.open(io.BytesIO(f.read())).convert("RGB")
    # Pixels only: no comment, EXIF or colour profile of the source goes into the files written.
    return Image.fromarray(np.asarray(img))


def encode(img, kind, path, quality=90):
    tmp = path + ".tmp"
    if kind == "bmp":
        img.save(tmp, format="BMP")
    else:
        img.save(tmp, format="JPEG", quality=quality, progressive=kind == "progressive", optimize=False)
    replace(tmp, path)


def make_preprocess(out_dir):
    d = os.path.join(out_dir, "preprocess")
    os.makedirs(d, exist_ok=True)
    # The seed's eval transform, and torchvision's ImageNet eval transform (PIL bilinear,
    # antialiased, as torchvision does on PIL images).
    squash = T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize(MEAN, STD)])
    imagenet = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    expected, index = {}, []
    for i, (file, source, box, size, kind) in enumerate(PHOTOS):
        img = photo(source).crop(box).resize(size, Image.LANCZOS)
        path = os.path.join(d, file)
        encode(img, kind, path, quality=88)
        # What the tests compare with: the file as Pillow decodes it.
        with Image.open(path) as f:
            decoded = f.convert("RGB")
        assert decoded.size == size, (file, decoded.size)
        expected[f"img{i}_resize256x256"] = squash(decoded).contiguous()
        expected[f"img{i}_resize256_crop224"] = imagenet(decoded).contiguous()
        index.append({"file": file, "size": list(size)})
    path = os.path.join(d, "expected.safetensors")
    save_file(expected, path + ".tmp")
    replace(path + ".tmp", path)
    path = os.path.join(d, "index.json")
    with open(path + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
    replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# The stand-in cat/dog data set


def variation(src, rng):
    """A random crop (30-100% of the area, aspect 3:4 to 4:3), flip, small rotation, colour and
    size (sides 75 to 500, as in the real set) of one photo."""
    w, h = src.size
    for _ in range(20):
        area = w * h * rng.uniform(0.3, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if cw <= w and ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = src.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if rng.random() < 0.3:
        img = img.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, expand=False)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    long_side = rng.randint(100, 500)
    scale = long_side / max(cw, ch)
    size = (max(75, round(cw * scale)), max(75, round(ch * scale)))
    return img.resize(size, Image.LANCZOS)


def make_standin(data_dir, seed):
    root = os.path.join(data_dir, "catanddog")
    rng = random.Random(seed)
    sources = {"Cat": [photo(n) for n in CAT_SOURCES], "Dog": [photo(n) for n in DOG_SOURCES]}
    tmp_root = root + ".tmp"
    shutil.rmtree(tmp_root, ignore_errors=True)
    count = 0
    for split, names in (("train", TRAIN_NAMES), ("test", TEST_NAMES)):
        for cls in ("Cat", "Dog"):
            os.makedirs(os.path.join(tmp_root, split, cls))
            for n, name in enumerate(names[cls]):
                img = variation(sources[cls][n % len(sources[cls])], rng)
                rel = f"{split}/{cls}/{name}.jpg"
                path = os.path.join(tmp_root, rel)
                if rel in BMP_FILES:
                    img.save(path, format="BMP")
                elif n % 9 == 4:
                    img.save(path, format="JPEG", quality=rng.randint(75, 95), progressive=True)
                elif n % 61 == 7:
                    img.convert("L").save(path, format="JPEG", quality=85)
                else:
                    img.save(path, format="JPEG", quality=rng.randint(70, 95))
                count += 1
    os.rename(tmp_root, root)
    total = sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(root) for f in fs)
    written.append(root)
    print(f"  {root}/  ({count} images, {total:,} bytes; the five BMP files named .jpg: {', '.join(sorted(BMP_FILES))})")


# ---------------------------------------------------------------------------------------------


def readme(out_dir, seed, vgg_digest):
    text = f"""# Reference fixtures from PyTorch/torchvision (generated)

Made by cnnserve's `scripts/make-fixtures.py --seed {seed}` with torch {torch.__version__},
torchvision {torchvision.__version__} and Pillow {Image.__version__} on CPU, float32.
Same layout, names and formats as the fixtures on our machines (`../shared/fixtures`):
random weights (He-uniform, small random biases, BN gamma in [0.5, 1.5]; vgg11_bn's
`classifier.0.weight` and `classifier.3.weight` sparse), batch-norm statistics measured on 4 batches of
8 random 224x224 inputs in train mode and jittered, PyTorch's eval logits for seeded random inputs;
`googlenet/weights.pth` in torch's legacy serialization, `subset_zip.pth` in the zip one (12 tensors).
vgg11_bn's unpacked `weights.safetensors` has sha256 {vgg_digest}
(`vgg11_bn/weights.safetensors.sha256`). The photos under `preprocess/` are scikit-image's sample
photos (`skimage/data`), cropped, resized and re-encoded; `expected.safetensors` holds torchvision's
`Resize((256,256))` and `Resize(256)`+`CenterCrop(224)` transforms of them (then `ToTensor`,
`Normalize`), as Pillow decodes the files.
"""
    path = os.path.join(out_dir, "README.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="where to write vgg11_bn/, googlenet/ and preprocess/ (CNNSERVE_FIXTURES)")
    parser.add_argument("--data", metavar="DATA_DIR", help="also write a stand-in DATA_DIR/catanddog/ (CNNSERVE_DATA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    args = parser.parse_args()

    if args.data and os.path.exists(os.path.join(args.data, "catanddog")):
        sys.exit(f"{os.path.join(args.data, 'catanddog')} exists: remove it first (this script never overwrites a data set)")
    torch.manual_seed(args.seed)
    start = time.monotonic()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {Image.__version__}, "
          f"numpy {np.__version__}, {torch.get_num_threads()} threads", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)

    print("preprocess/: photos and torchvision's transforms", flush=True)
    make_preprocess(args.out_dir)
    if args.data:
        print("catanddog/: the stand-in data set", flush=True)
        make_standin(args.data, args.seed)
    t = time.monotonic()
    print("googlenet/: weights, legacy and zip .pth, logits", flush=True)
    make_googlenet(args.out_dir, args.seed)
    print(f"  ({time.monotonic() - t:.0f} s)", flush=True)
    t = time.monotonic()
    print("vgg11_bn/: weights (gzipped), logits", flush=True)
    digest, _ = make_vgg11_bn(args.out_dir, args.seed)
    print(f"  ({time.monotonic() - t:.0f} s)", flush=True)
    readme(args.out_dir, args.seed, digest)

    print(f"wrote {len(written)} files in {time.monotonic() - start:.0f} s. Run the tests with:")
    env = f"CNNSERVE_FIXTURES={os.path.abspath(args.out_dir)}"
    if args.data:
        env += f" CNNSERVE_DATA={os.path.abspath(args.data)}"
    print(f"  {env} cargo test --release")


if __name__ == "__main__":
    main()
