"""Helpers for scripts/gpu-check.sh: PyTorch references and timings, comparisons, a load generator.

Every subcommand prints JSON lines. Needs PyTorch, torchvision and safetensors; nothing else.
  gen DIR DEVICE            random vgg11_bn/GoogLeNet weights (BN statistics calibrated), inputs,
                            PyTorch's eval logits; with DEVICE=cuda also PyTorch's own throughput
  compare MODEL OUT REF TOL [DTYPE]   max |Δlogit| of cnnserve's output against PyTorch's: ok
                            when ≤ TOL (f32), or ≤ TOL × max |logit| for a reduced DTYPE
  load URL IMAGE SECONDS CONCURRENCY [PROCESSES]   POSTs IMAGE from threads (and processes)
  lone URL IMAGE N          median x-total-time / x-inference-time of N lone requests
  wait URL SECONDS          waits until URL answers 200
  job URL ZIP BASE NAME SECONDS EPOCHS   a fine-tuning job over HTTP, then a prediction by its model
  summary CHECKS.jsonl      one line: every check ok?, and served throughput against PyTorch's
"""
import json, os, sys, time, threading, statistics, urllib.request, urllib.parse, http.client, uuid


def out(**kw):
    print(json.dumps(kw), flush=True)


def gen(d, device):
    import torch, torchvision
    from safetensors.torch import save_file
    torch.manual_seed(0)
    os.makedirs(d, exist_ok=True)
    models = {"vgg11_bn": torchvision.models.vgg11_bn(weights=None),
              "googlenet": torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)}
    xs = {"a": torch.randn(4, 3, 224, 224), "b": torch.randn(2, 3, 240, 320)}
    save_file({k: v.contiguous() for k, v in xs.items()}, f"{d}/in.safetensors")
    for name, m in models.items():
        m.train()  # a few batches so that the BN statistics are not the identity
        with torch.no_grad():
            for _ in range(2):
                m(torch.randn(8, 3, 224, 224))
        m.eval()
        if name == "googlenet":
            m.transform_input = True
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{d}/{name}.safetensors")
        with torch.no_grad():
            save_file({k: m(v).contiguous() for k, v in xs.items()}, f"{d}/{name}.ref.safetensors")
        if device != "cuda":
            continue
        mg = m.cuda()
        for tf32 in (False, True):
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for bs in (1, 32, 64):
                x = torch.randn(bs, 3, 224, 224, device="cuda")
                with torch.no_grad():
                    for _ in range(3):
                        mg(x)
                    torch.cuda.synchronize(); t = time.perf_counter(); n = 0
                    while time.perf_counter() - t < 1.5:
                        mg(x); n += 1
                    torch.cuda.synchronize(); el = time.perf_counter() - t
                out(check="pytorch_throughput", model=name, tf32=tf32, batch=bs,
                    ms_per_batch=round(el / n * 1e3, 3), images_per_s=round(n * bs / el, 1))
        m.cpu()


def compare(model, o, r, tol, dtype="f32"):
    """f32: max |Δlogit| ≤ tol and the same top class. Other dtypes: max |Δlogit| ≤ tol × the
    largest |logit| (the top class is reported, not required: random logits can lie closer together
    than a 16-bit float resolves)."""
    from safetensors.numpy import load_file
    o, r = load_file(o), load_file(r)
    for k in sorted(r):
        diff = float(abs(o[k] - r[k]).max()) if o[k].shape == r[k].shape else float("inf")
        same = bool((o[k].argmax(1) == r[k].argmax(1)).all()) if o[k].shape == r[k].shape else False
        bound = tol if dtype == "f32" else tol * float(abs(r[k]).max())
        ok = diff <= bound and (same or dtype != "f32")
        out(check="parity", model=model, dtype=dtype, input=k, shape=list(r[k].shape),
            max_abs_diff=diff, bound=bound, argmax_equal=same, ok=ok)


def _load_proc(url, body, seconds, conc, q):
    u = urllib.parse.urlparse(url)
    lat, errs, stop = [], {}, time.time() + seconds
    lock = threading.Lock()

    def worker():
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        while time.time() < stop:
            t = time.perf_counter()
            try:
                c.request("POST", u.path + ("?" + u.query if u.query else ""), body,
                          {"content-type": "application/octet-stream"})
                resp = c.getresponse(); resp.read()
                with lock:
                    if resp.status == 200:
                        lat.append(time.perf_counter() - t)
                    else:
                        errs[str(resp.status)] = errs.get(str(resp.status), 0) + 1
            except Exception as e:  # noqa: BLE001 -- counted, the run goes on
                with lock:
                    errs[type(e).__name__] = errs.get(type(e).__name__, 0) + 1
                c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    ts = [threading.Thread(target=worker) for _ in range(conc)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    q.put((lat, errs))


def load(url, image, seconds, conc, procs=1):
    import multiprocessing as mp
    body = open(image, "rb").read()
    q = mp.Queue()
    t0 = time.time()
    ps = [mp.Process(target=_load_proc, args=(url, body, seconds, conc, q)) for _ in range(procs)]
    [p.start() for p in ps]
    lat, errs = [], {}
    for _ in ps:
        lat_p, errs_p = q.get()
        lat += lat_p
        for k, v in errs_p.items():
            errs[k] = errs.get(k, 0) + v
    [p.join() for p in ps]
    el = time.time() - t0
    lat.sort()
    pct = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3, 1) if lat else None
    out(check="load", url=url, clients=conc * procs, ok_requests=len(lat), errors=errs,
        req_per_s=round(len(lat) / el, 1), p50_ms=pct(0.5), p99_ms=pct(0.99), ok=bool(lat) and not errs)


def lone(url, image, n):
    body = open(image, "rb").read()
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    rows = []
    for _ in range(n):
        c.request("POST", u.path + "?" + u.query, body, {"content-type": "application/octet-stream"})
        resp = c.getresponse(); resp.read()
        rows.append([float(resp.getheader(h) or "nan") for h in ("x-total-time", "x-inference-time", "x-queue-time")])
    rows = rows[max(1, n // 6):]  # the first ones warm up
    med = [round(statistics.median(r[i] for r in rows), 3) for i in range(3)]
    out(check="lone_request", url=url, requests=len(rows), total_ms=med[0], inference_ms=med[1], queue_ms=med[2])


def wait(url, seconds):
    stop = time.time() + seconds
    while time.time() < stop:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001 -- not up yet
            pass
        time.sleep(0.5)
    sys.exit(f"{url} did not answer 200 within {seconds} s")


def job(base_url, zip_path, base, name, seconds, epochs):
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in (("base_model", base), ("name", name), ("augment", "true"), ("epochs", epochs)):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="dataset"; filename="d.zip"\r\n'
                 f'Content-Type: application/zip\r\n\r\n'.encode() + open(zip_path, "rb").read() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    t0 = time.time()
    req = urllib.request.Request(f"{base_url}/finetune", data=b"".join(parts), method="POST",
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        job_id = json.load(r)["job_id"]
    j = {}
    while time.time() - t0 < seconds:
        with urllib.request.urlopen(f"{base_url}/jobs/{job_id}", timeout=10) as r:
            j = json.load(r)
        if j.get("status") in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    answer = None
    if j.get("status") == "succeeded":
        image = next(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.dirname(zip_path) or ".")
                     for f in fs if f.lower().endswith((".jpg", ".jpeg", ".png")))
        req = urllib.request.Request(f"{base_url}/predict?model={name}", data=open(image, "rb").read(),
                                     method="POST", headers={"content-type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.load(r)
    result = j.get("result") or {}
    out(check="finetune_http", job=job_id, status=j.get("status"), error=j.get("error"),
        wall_s=round(time.time() - t0, 1), best_epoch=result.get("best_epoch"),
        test_acc=result.get("test_acc"), model_answers=bool(answer and answer.get("predictions")),
        ok=j.get("status") == "succeeded" and bool(answer and answer.get("predictions")))


def summary(path):
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    failed = [r for r in rows if r.get("ok") is False]
    torch_best = {}
    for r in rows:
        if r.get("check") == "pytorch_throughput" and not r["tf32"] and r["batch"] == int(os.environ.get("BATCH", "32")):
            torch_best[r["model"]] = r["images_per_s"]
    served = {}
    for r in rows:
        if r.get("check") == "load" and r.get("clients") == 96:
            model = urllib.parse.parse_qs(urllib.parse.urlparse(r["url"]).query).get("model", ["?"])[0]
            served[model] = r["req_per_s"]
    ratio = {m: round(served[m] / torch_best[m], 3) for m in served if torch_best.get(m)}
    out(check="summary", ok=not failed, failed=[r.get("check") for r in failed],
        served_req_per_s_96_clients=served, pytorch_f32_images_per_s=torch_best, served_vs_pytorch=ratio)


if __name__ == "__main__":
    c, a = sys.argv[1], sys.argv[2:]
    if c == "gen":
        gen(a[0], a[1])
    elif c == "compare":
        compare(a[0], a[1], a[2], float(a[3]), *a[4:5])
    elif c == "load":
        load(a[0], a[1], float(a[2]), int(a[3]), int(a[4]) if len(a) > 4 else 1)
    elif c == "lone":
        lone(a[0], a[1], int(a[2]))
    elif c == "wait":
        wait(a[0], float(a[1]))
    elif c == "job":
        job(a[0], a[1], a[2], a[3], float(a[4]), a[5])
    elif c == "summary":
        summary(a[0])
    else:
        sys.exit(__doc__)
