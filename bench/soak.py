"""Mixed load against a running cnnserve, for bench/soak.sh. Standard library only.

  soak.py URL PID SECONDS DATASET_ZIP PHOTO...

Threads for SECONDS: four clients predicting with both models; one sending bad input (random bytes,
a truncated photo, an oversized header, wrong methods, bad parameters) that must get 4xx; one
reloading the models every 20 s; one running fine-tuning jobs back to back (a new name each).
Then: every succeeded job's model answers, /health is 200. Prints one JSON line; exits 1 on any
5xx, connection error, lost model or RSS growth past 10% (end against the first minute).
"""
import http.client, json, os, random, struct, sys, threading, time, urllib.parse, uuid

url, pid, seconds, dataset = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
photos = [open(p, "rb").read() for p in sys.argv[5:]]
u = urllib.parse.urlparse(url)
stop_at = time.time() + seconds
lock = threading.Lock()
counts, problems, jobs, rss = {}, [], [], {}


def count(kind, status):
    with lock:
        key = f"{kind}:{status}" if status == 429 else f"{kind}:{status // 100}xx" if isinstance(status, int) else f"{kind}:{status}"
        counts[key] = counts.get(key, 0) + 1
        if not isinstance(status, int) or status >= 500:
            problems.append(f"{kind}: {status}")


def request(method, path, body=None, headers=None, timeout=120):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        c.request(method, path, body, headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def rss_kb():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


def predictor(i):
    rng = random.Random(i)
    while time.time() < stop_at:
        model = rng.choice(["googlenet", "vgg11_bn"])
        try:
            status, _ = request("POST", f"/predict?model={model}&top_k=3", rng.choice(photos))
            count("predict", status)  # a 429 is the server coping, not a problem
        except Exception as e:  # noqa: BLE001 -- counted as a problem
            count("predict", type(e).__name__)


def bad_inputs():
    rng = random.Random(99)
    bmp = bytearray(b"BM" + bytes(52)); struct.pack_into("<IiiHH", bmp, 14, 40, 100000, 100000, 1, 24)
    cases = [
        ("POST", "/predict", lambda: os.urandom(rng.randrange(1, 4000))),
        ("POST", "/predict", lambda: rng.choice(photos)[: rng.randrange(10, 2000)]),
        ("POST", "/predict", lambda: bytes(bmp)),
        ("GET", "/predict", lambda: None),
        ("POST", "/predict?top_k=lots", lambda: photos[0]),
        ("GET", "/jobs/zzz/examples/abc", lambda: None),
        ("POST", "/predict?model=nope", lambda: photos[0]),
        ("POST", "/finetune", lambda: b"not a form"),
    ]
    while time.time() < stop_at:
        method, path, body = rng.choice(cases)
        try:
            status, text = request(method, path, body())
            ok = 400 <= status < 500 and text.startswith(b"{")
            count("bad_input", status if ok else f"{status} {text[:80]!r}")
        except Exception as e:  # noqa: BLE001
            count("bad_input", type(e).__name__)
        time.sleep(0.2)


def reloader():
    while time.time() < stop_at:
        time.sleep(20)
        try:
            status, _ = request("POST", "/models/reload")
            count("reload", status)
        except Exception as e:  # noqa: BLE001
            count("reload", type(e).__name__)


def trainer():
    zip_bytes = open(dataset, "rb").read()
    while time.time() < stop_at - 60:
        name = f"soak-{uuid.uuid4().hex[:6]}"
        boundary = uuid.uuid4().hex
        fields = {"base_model": "googlenet", "name": name, "epochs": "2", "augment": "true"}
        body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                        for k, v in fields.items())
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="dataset"; filename="d.zip"\r\n\r\n'.encode()
                 + zip_bytes + f"\r\n--{boundary}--\r\n".encode())
        try:
            status, text = request("POST", "/finetune", body,
                                   {"content-type": f"multipart/form-data; boundary={boundary}"})
            count("finetune", status)
            if status != 202:
                time.sleep(5)
                continue
            job_id = json.loads(text)["job_id"]
            while True:
                status, text = request("GET", f"/jobs/{job_id}")
                job = json.loads(text)
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(1)
            with lock:
                jobs.append(job)
            time.sleep(10)
        except Exception as e:  # noqa: BLE001
            count("finetune", type(e).__name__)


threads = [threading.Thread(target=predictor, args=(i,)) for i in range(4)]
threads += [threading.Thread(target=f) for f in (bad_inputs, reloader, trainer)]
[t.start() for t in threads]
time.sleep(min(60, seconds / 2))
rss["first_minute"] = rss_kb()
[t.join() for t in threads]
time.sleep(5)
rss["end"] = rss_kb()
lost = []
for job in jobs:
    if job["status"] == "succeeded":
        status, _ = request("GET", f"/models/{job['name']}")
        if status != 200:
            lost.append(job["name"])
    elif job["status"] != "succeeded":
        problems.append(f"job {job['job_id']} {job['status']}: {job.get('error')}")
health, _ = request("GET", "/health")
growth = rss["end"] / rss["first_minute"] - 1
ok = not problems and not lost and health == 200 and growth <= 0.10
print(json.dumps({"soak_s": seconds, "ok": ok, "counts": counts,
                  "jobs": {s: sum(j["status"] == s for j in jobs) for s in ("succeeded", "failed", "cancelled")},
                  "lost_models": lost, "health": health, "rss_mb": {k: round(v / 1024, 1) for k, v in rss.items()},
                  "rss_growth": round(growth, 4), "problems": problems[:20]}), flush=True)
sys.exit(0 if ok else 1)
