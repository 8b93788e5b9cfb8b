#!/usr/bin/env python3
"""Triton's own Python clients (tritonclient[http,grpc]) against a running cnnserve.

Run by scripts/test-triton.sh, which starts the server on the fixture GoogLeNet with an API key.
Checks, over HTTP and over gRPC:
  - health, readiness, server and model metadata (the probes without the key, the rest with it;
    without it: 401 / UNAUTHENTICATED);
  - FP32 `input` = the fixtures' `inputs_224x224` and `inputs_256x256` gives their PyTorch logits
    within 1e-3 (absolute), and `probabilities` = their softmax; over HTTP as JSON and as binary
    data (inputs and outputs each way), over gRPC in raw_input_contents (the client's way) and in
    typed contents.fp32_contents (through the protocol's stub);
  - BYTES `image` (a JPEG; raw bytes as binary data or over gRPC, base64 in HTTP's JSON) gives
    exactly `/predict?top_k=0`'s probabilities;
  - malformed requests are refused with a sentence (400 / INVALID_ARGUMENT), an unknown model is
    404 / NOT_FOUND, Triton-only RPCs are UNIMPLEMENTED.
Exits 1 on any mismatch, listing every one.

  test_triton.py --http HOST:PORT --grpc HOST:PORT --fixtures DIR [--api-key-file FILE]
"""

import argparse
import base64
import json
import sys
import time
import urllib.request

import grpc
import numpy as np
import safetensors.numpy
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

TOLERANCE = 1e-3
MODEL = "googlenet"
failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def close(name, got, want, tolerance=TOLERANCE):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if got.shape != want.shape:
        check(False, f"{name}: shape {got.shape}, expected {want.shape}")
        return
    diff = float(np.max(np.abs(got - want)))
    check(diff <= tolerance, f"{name}: max |diff| {diff:.2e} (tolerance {tolerance:g})")


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def refused(name, call, needle, status=None):
    """`call` must raise Triton's exception whose message holds `needle` (and status, if given)."""
    try:
        call()
    except InferenceServerException as e:
        message, got = e.message() or "", str(e.status())
        ok = needle in message and (status is None or status in got)
        check(ok, f"{name}: refused ({got}: {message})")
        return
    check(False, f"{name}: accepted, expected a refusal saying {needle!r}")


def predict_probabilities(http, headers, jpeg):
    request = urllib.request.Request(
        f"http://{http}/predict?model={MODEL}&top_k=0",
        data=jpeg,
        headers={"content-type": "image/jpeg", **headers},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    probabilities = np.full(len(answer["predictions"]), np.nan, np.float32)
    for p in answer["predictions"]:
        probabilities[p["index"]] = p["probability"]
    return probabilities[None, :]


def wait_ready(client, what):
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if client.is_server_ready():
                return
        except InferenceServerException:
            pass
        time.sleep(0.2)
    check(False, f"{what}: the server was not ready within 180 s")
    sys.exit(1)


def check_metadata(proto, client, headers, classes):
    check(client.is_server_live(), f"{proto}: live without the key")
    check(client.is_server_ready(), f"{proto}: ready without the key")
    check(client.is_model_ready(MODEL, headers=dict(headers)), f"{proto}: model ready")
    server = client.get_server_metadata(headers=dict(headers))
    model = client.get_model_metadata(MODEL, headers=dict(headers))
    if proto == "grpc":
        server = {"name": server.name}
        model = {
            "platform": model.platform,
            "versions": list(model.versions),
            "inputs": [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in model.inputs
            ],
            "outputs": [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                for t in model.outputs
            ],
        }
    check(server["name"] == "cnnserve", f"{proto}: server metadata names cnnserve")
    want = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, -1, -1]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
        ],
    }
    got = {k: [{**t, "shape": [int(d) for d in t["shape"]]} for t in model[k]] for k in want}
    check(got == want, f"{proto}: model metadata tensors {got}")
    check(model["platform"] == "cnnserve_candle", f"{proto}: platform {model['platform']}")
    check(model["versions"] == ["1"], f"{proto}: versions {model['versions']}")


def http_checks(address, headers, refs, jpeg, expected_image):
    client = httpclient.InferenceServerClient(url=address)
    wait_ready(client, "http")
    check_metadata("http", client, headers, 1000)
    refused(
        "http: model metadata without the key",
        lambda: client.get_model_metadata(MODEL),
        "API key",
        "401",
    )
    for size in (224, 256):
        x, want = refs[f"inputs_{size}x{size}"], refs[f"logits_{size}x{size}"]
        for binary_in in (False, True):
            for binary_out in (False, True):
                name = (
                    f"http {size}x{size}: {'binary' if binary_in else 'JSON'} input, "
                    f"{'binary' if binary_out else 'JSON'} outputs"
                )
                tensor = httpclient.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=binary_in)
                outputs = [
                    httpclient.InferRequestedOutput("logits", binary_data=binary_out),
                    httpclient.InferRequestedOutput("probabilities", binary_data=binary_out),
                ]
                result = client.infer(MODEL, [tensor], outputs=outputs, headers=dict(headers))
                logits = result.as_numpy("logits")
                close(f"{name}: logits vs PyTorch", logits, want)
                close(f"{name}: probabilities", result.as_numpy("probabilities"), softmax(logits), 1e-6)
        # The client's default: binary input, no outputs named (binary_data_output), both back.
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(MODEL, [tensor], headers=dict(headers), request_id="r-1")
        close(f"http {size}x{size}: the client's defaults: logits vs PyTorch", result.as_numpy("logits"), want)
        check(result.get_response()["id"] == "r-1", "http: the request id comes back")

    for binary in (True, False):
        tensor = httpclient.InferInput("image", [1], "BYTES")
        element = jpeg if binary else base64.b64encode(jpeg)
        tensor.set_data_from_numpy(np.array([element], dtype=np.object_), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
        result = client.infer(MODEL, [tensor], outputs=outputs, headers=dict(headers))
        got = result.as_numpy("probabilities")
        form = "raw binary" if binary else "base64 JSON"
        close(f"http: image ({form}) vs /predict's probabilities", got, expected_image, 0.0)
        check(result.as_numpy("logits") is None, f"http: image ({form}): only the output asked for")

    x = refs["inputs_224x224"]
    bad = httpclient.InferInput("input", [2, 3, 224], "FP32")
    bad.set_data_from_numpy(x.reshape(2, 3, 224 * 224)[:, :, :224])
    refused("http: a 3-D input", lambda: client.infer(MODEL, [bad], headers=dict(headers)), "[N, 3, H, W]", "400")
    bad = httpclient.InferInput("input", [2, 3, 224, 224], "FP64")
    bad.set_data_from_numpy(x.astype(np.float64))
    refused("http: FP64", lambda: client.infer(MODEL, [bad], headers=dict(headers)), "FP32, not FP64", "400")
    good = httpclient.InferInput("input", [2, 3, 224, 224], "FP32")
    good.set_data_from_numpy(x)
    refused(
        "http: an unknown output",
        lambda: client.infer(
            MODEL, [good], outputs=[httpclient.InferRequestedOutput("scores")], headers=dict(headers)
        ),
        "no output `scores`",
        "400",
    )
    refused(
        "http: an unknown model",
        lambda: client.infer("nope", [good], headers=dict(headers)),
        "unknown model `nope`",
        "404",
    )
    refused("http: infer without the key", lambda: client.infer(MODEL, [good]), "API key", "401")
    client.close()


def grpc_checks(address, headers, refs, jpeg, expected_image):
    # gRPC metadata keys are lower case.
    headers = {k.lower(): v for k, v in headers.items()}
    client = grpcclient.InferenceServerClient(url=address)
    wait_ready(client, "grpc")
    check_metadata("grpc", client, headers, 1000)
    refused(
        "grpc: model metadata without the key",
        lambda: client.get_model_metadata(MODEL),
        "API key",
        "UNAUTHENTICATED",
    )
    for size in (224, 256):
        x, want = refs[f"inputs_{size}x{size}"], refs[f"logits_{size}x{size}"]
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer(MODEL, [tensor], headers=dict(headers))
        logits = result.as_numpy("logits")
        close(f"grpc {size}x{size}: raw input: logits vs PyTorch", logits, want)
        close(f"grpc {size}x{size}: probabilities", result.as_numpy("probabilities"), softmax(logits), 1e-6)

    # Typed contents (fp32_contents, bytes_contents) through the protocol's own stub.
    x, want = refs["inputs_224x224"], refs["logits_224x224"]
    channel = grpc.insecure_channel(address)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    metadata = tuple(headers.items())
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="logits")
    response = stub.ModelInfer(request, metadata=metadata)
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(
        list(response.outputs[0].shape)
    )
    close("grpc 224x224: typed fp32_contents: logits vs PyTorch", got, want)
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(jpeg)
    request.outputs.add(name="probabilities")
    response = stub.ModelInfer(request, metadata=metadata)
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(1, -1)
    close("grpc: image (typed bytes_contents) vs /predict's probabilities", got, expected_image, 0.0)
    channel.close()

    tensor = grpcclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
    outputs = [grpcclient.InferRequestedOutput("probabilities")]
    result = client.infer(MODEL, [tensor], outputs=outputs, headers=dict(headers))
    close("grpc: image (raw) vs /predict's probabilities", result.as_numpy("probabilities"), expected_image, 0.0)

    bad = grpcclient.InferInput("input", [2, 3, 224], "FP32")
    bad.set_data_from_numpy(x.reshape(2, 3, 224 * 224)[:, :, :224])
    refused(
        "grpc: a 3-D input",
        lambda: client.infer(MODEL, [bad], headers=dict(headers)),
        "[N, 3, H, W]",
        "INVALID_ARGUMENT",
    )
    bad = grpcclient.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    refused(
        "grpc: bytes that are no image",
        lambda: client.infer(MODEL, [bad], headers=dict(headers)),
        "image 0",
        "INVALID_ARGUMENT",
    )
    good = grpcclient.InferInput("input", list(x.shape), "FP32")
    good.set_data_from_numpy(x)
    refused(
        "grpc: an unknown model",
        lambda: client.infer("nope", [good], headers=dict(headers)),
        "unknown model `nope`",
        "NOT_FOUND",
    )
    refused("grpc: infer without the key", lambda: client.infer(MODEL, [good]), "API key", "UNAUTHENTICATED")
    refused(
        "grpc: Triton's repository index",
        lambda: client.get_model_repository_index(headers=dict(headers)),
        "RepositoryIndex is not served",
        "UNIMPLEMENTED",
    )
    client.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", required=True, help="HOST:PORT of the HTTP API")
    parser.add_argument("--grpc", required=True, help="HOST:PORT of the gRPC server")
    parser.add_argument("--fixtures", required=True, help="the PyTorch fixtures (CNNSERVE_FIXTURES)")
    parser.add_argument("--api-key-file", help="the server's API key, if it has one")
    args = parser.parse_args()

    refs = safetensors.numpy.load_file(f"{args.fixtures}/googlenet/reference.safetensors")
    with open(f"{args.fixtures}/preprocess/img0.jpg", "rb") as f:
        jpeg = f.read()
    # Every call gets its own copy: tritonclient's HTTP client writes Inference-Header-Content-Length
    # into the dict it is given, which would then go with the next request too.
    headers = {}
    if args.api_key_file:
        with open(args.api_key_file) as f:
            headers["Authorization"] = f"Bearer {f.read().strip()}"

    probe = httpclient.InferenceServerClient(url=args.http)
    wait_ready(probe, "http")
    probe.close()
    expected_image = predict_probabilities(args.http, headers, jpeg)
    check(
        expected_image.shape == (1, 1000) and not np.isnan(expected_image).any(),
        "/predict?top_k=0 gives every class",
    )
    http_checks(args.http, headers, refs, jpeg, expected_image)
    grpc_checks(args.grpc, headers, refs, jpeg, expected_image)

    if failures:
        print(f"\n{len(failures)} check(s) failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
