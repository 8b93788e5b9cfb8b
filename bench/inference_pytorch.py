"""The peers of `cnnserve bench`: PyTorch eager (NCHW and channels_last) and ONNX Runtime, timing the
same forward passes on the same weights, batch sizes and input size, with the same statistics.

    python bench/inference_pytorch.py --model vgg11_bn --weights vgg11_bn.safetensors [--batch 1,8]
        [--size 224] [--iters 20] [--warmup 3]

Prints one JSON line per (engine, batch): engine, model, batch, size, dtype, threads, iters,
ms_median, ms_min, ms_max, images_per_s. ONNX Runtime is skipped, with a line saying so, when it is not
installed; the ONNX file is exported from the loaded weights into a temporary folder."""
import argparse, copy, json, os, statistics, sys, tempfile, time, warnings

warnings.filterwarnings("ignore")
import torch, torchvision
from safetensors.torch import load_file

p = argparse.ArgumentParser()
p.add_argument("--model", required=True, choices=["vgg11_bn", "googlenet"])
p.add_argument("--weights", required=True)
p.add_argument("--batch", default="1,8")
p.add_argument("--size", type=int, default=224)
p.add_argument("--iters", type=int, default=20)
p.add_argument("--warmup", type=int, default=3)
a = p.parse_args()

if a.model == "vgg11_bn":
    m = torchvision.models.vgg11_bn(weights=None)
else:
    m = torchvision.models.googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=False)
m.load_state_dict(load_file(a.weights))
m.eval()


def timed(f):
    for _ in range(a.warmup):
        f()
    ts = []
    for _ in range(a.iters):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


def report(engine, batch, ts, threads):
    med = statistics.median(ts)
    print(json.dumps({"engine": engine, "model": a.model, "batch": batch, "size": a.size, "dtype": "f32",
                      "threads": threads, "iters": a.iters, "ms_median": round(med, 2),
                      "ms_min": round(min(ts), 2), "ms_max": round(max(ts), 2),
                      "images_per_s": round(batch * 1e3 / med, 2)}), flush=True)


try:
    import onnxruntime as ort
except ImportError:
    ort = None
    print(json.dumps({"engine": "onnxruntime", "model": a.model, "error": "onnxruntime is not installed"}), flush=True)

session = None
if ort is not None:
    path = os.path.join(tempfile.mkdtemp(), f"{a.model}.onnx")
    with torch.no_grad():
        torch.onnx.export(m, torch.randn(1, 3, a.size, a.size), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

mc = copy.deepcopy(m).to(memory_format=torch.channels_last)
threads = torch.get_num_threads()
for batch in [int(b) for b in a.batch.split(",")]:
    x = torch.randn(batch, 3, a.size, a.size)
    with torch.inference_mode():
        report("torch-eager", batch, timed(lambda: m(x)), threads)
        xc = x.to(memory_format=torch.channels_last)
        report("torch-channels_last", batch, timed(lambda: mc(xc)), threads)
    if session is not None:
        xn = x.numpy()
        report("onnxruntime", batch, timed(lambda: session.run(None, {"x": xn})), os.cpu_count())
