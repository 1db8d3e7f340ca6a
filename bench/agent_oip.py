"""bench-agent rows for the Open Inference Protocol: v2 JSON, v2 binary (HTTP) and gRPC (TCP
and the Unix socket), all with the real Triton client, next to a bare onnxruntime session and
the /v1 JSON row in the same run; on the digits CNN and on a 1x3x320x320 image model.

Targets: gRPC and v2-binary overhead <= 0.5 ms at p50 on the digits CNN, v2 JSON no slower
than /v1 JSON (both sent by the same stdlib client), binary overhead <= 2 ms for the 320x320
image. The agent serves from a child process (as on a device: the app is another process);
the Triton client rows include that client's own cost, the "stdlib client" and "bare
channel" rows show the agent's with a minimal client, and the "gRPC floor" row is Python
gRPC's own cost: the same kind of server with a handler that only returns a ready-made
answer of the model's output size (no handler can go below it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bench.agent_model import loaded

IMAGE_SHAPE = (1, 3, 320, 320)


def image_model(path: Path) -> Path:
    """A small conv layer on a 1x3x320x320 image (output 1x8x160x160, 800 KB): what matters
    here is moving the tensors, not the model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1])],
        "image", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(IMAGE_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 160, 160])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _serve_image(path: Path, threads: int):
    """The image model served as "image" (the agent's way: manifest, variant, runtime)."""
    import dataclasses

    from edgeship.agent.manifest import TensorSpec
    from edgeship.agent.serving import LoadedModel, ModelServer
    from edgeship.agent.store import InstalledModel

    digits = loaded(path, "onnxruntime", threads, "x").get("digits")
    manifest = dataclasses.replace(
        digits.installed.manifest, model="image",
        inputs=(TensorSpec("x", "float32", IMAGE_SHAPE),),
        outputs=(TensorSpec("y", "float32", (1, 8, 160, 160)),))
    server = ModelServer()
    server.swap(LoadedModel(InstalledModel("image", 1, digits.installed.variant, manifest,
                                           path.parent), digits.runtime))
    return server


def contenders(name: str, in_name: str, x: np.ndarray, out_name: str,
               urls: dict[str, str], json_rows: bool = True) -> dict[str, object]:
    """label -> a call doing one inference through each protocol client (the /v1 JSON
    row through edgeship's own client, for the comparison)."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from edgeship.agent.client import AgentClient

    http = httpclient.InferenceServerClient(urls["http"])
    calls: dict[str, object] = {}
    if json_rows:
        v1 = AgentClient("http://" + urls["http"])
        calls["/v1 JSON"] = lambda: v1.predict_json(name, x)
    for binary in ((False, True) if json_rows else (True,)):
        inp = httpclient.InferInput(in_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput(out_name, binary_data=binary)
        calls[f"v2 {'binary' if binary else 'JSON'}"] = \
            (lambda i=inp, o=out: http.infer(name, [i], outputs=[o]).as_numpy(out_name))
    for label, url in (("gRPC TCP", urls["grpc"]), ("gRPC unix", urls["grpc-unix"])):
        client = grpcclient.InferenceServerClient(url)
        inp = grpcclient.InferInput(in_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        calls[label] = (lambda c=client, i=inp: c.infer(name, [i]).as_numpy(out_name))
    return calls


SERVER_SNIPPET = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from bench.agent_oip import serve_both
servers, urls = serve_both(Path({digits!r}), {in_name!r}, Path({image!r}), {threads},
                           Path({tmp!r}))
print(json.dumps(urls), flush=True)
sys.stdin.read()
for s in servers:
    s.stop()
"""


def serve_both(digits: Path, in_name: str, image: Path, threads: int, tmp: Path):
    """The agent's HTTP and gRPC servers for the digits CNN and the image model (run in a
    child process: the app and the agent are separate processes on a device)."""
    from edgeship.agent.api import InferenceHTTPServer
    from edgeship.agent.api_limits import ApiLimits
    from edgeship.agent.grpc_api import GrpcInferenceServer
    from edgeship.fleet.broker import free_port

    models = loaded(digits, "onnxruntime", threads, in_name)
    models.swap(_serve_image(image, threads).get("image"))
    limits = ApiLimits(max_request_bytes=16 << 20)
    http = InferenceHTTPServer("127.0.0.1", 0, models, limits=limits)
    grpc_server = GrpcInferenceServer(models, limits, socket_path=tmp / "grpc.sock",
                                      port=free_port())
    http.start()
    grpc_server.start()
    floor = FloorServer(free_port())
    urls = {"http": http.url.removeprefix("http://"), "grpc": f"127.0.0.1:{grpc_server.port}",
            "grpc-unix": f"unix://{tmp / 'grpc.sock'}", "grpc-floor": floor.url}
    return (http, grpc_server, floor), urls


class FloorServer:
    """Python gRPC's own cost: a server like the agent's (sync, 4 worker threads) whose
    ModelInfer does nothing but answer a ready-made response of the model's output size
    (method ``/edgeship.bench.Floor/<model>``). Its row is the floor under any handler."""

    def __init__(self, port: int) -> None:
        from concurrent import futures

        import grpc

        from edgeship.agent import oip_pb2 as pb

        def answer(shape: tuple[int, ...]) -> bytes:
            out = np.zeros(shape, np.float32)
            return pb.ModelInferResponse(
                model_name="m", model_version="1", outputs=[
                    pb.ModelInferResponse.InferOutputTensor(name="y", datatype="FP32",
                                                            shape=shape)],
                raw_output_contents=[out.tobytes()]).SerializeToString()

        canned = {"digits": answer((1, 10)), "image": answer((1, 8, 160, 160))}
        self._server = grpc.server(futures.ThreadPoolExecutor(4),
                                   options=[("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "edgeship.bench.Floor", {name: grpc.unary_unary_rpc_method_handler(
                lambda request, context, a=a: a) for name, a in canned.items()})])
        self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()
        self.url = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self._server.stop(grace=1.0).wait(5)


def _spawn(model: Path, in_name: str, image: Path, threads: int, tmp: Path):
    import json
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parents[1])
    code = SERVER_SNIPPET.format(root=root, digits=str(model), in_name=in_name,
                                 image=str(image), threads=threads, tmp=str(tmp))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=root)
    line = proc.stdout.readline()
    try:
        return proc, json.loads(line)
    except ValueError:
        proc.kill()
        raise RuntimeError(f"protocol bench server did not start: {line!r}") from None


def lean_binary(urls: dict[str, str], name: str, in_name: str, x: np.ndarray, out: str):
    """A v2 binary request with the standard library only (what an app can write): the
    agent's cost without the Triton client's."""
    import http.client
    import json

    head = json.dumps({"inputs": [{"name": in_name, "shape": list(x.shape),
                                   "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": out, "parameters": {"binary_data": True}}]}
                      ).encode()
    host, port = urls["http"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port))
    headers = {"Inference-Header-Content-Length": str(len(head))}

    def call():
        conn.request("POST", f"/v2/models/{name}/infer", body=head + x.tobytes(),
                     headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        n = int(resp.getheader("Inference-Header-Content-Length"))
        return np.frombuffer(data, np.float32, offset=n)
    return call


def lean_json(urls: dict[str, str], name: str, in_name: str, x: np.ndarray):
    """A v2 JSON request with the standard library, as edgeship's client sends /v1 JSON:
    the two APIs compared with the same client."""
    import http.client
    import json

    host, port = urls["http"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port))

    def call():
        body = json.dumps({"inputs": [{"name": in_name, "shape": list(x.shape),
                                       "datatype": "FP32", "data": x.tolist()}]}).encode()
        conn.request("POST", f"/v2/models/{name}/infer", body=body,
                     headers={"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())
    return call


def lean_grpc(url: str, name: str, in_name: str, x: np.ndarray,
              method: str = "/inference.GRPCInferenceService/ModelInfer"):
    """ModelInfer through a bare gRPC channel with the agent's generated messages."""
    import grpc

    from edgeship.agent import oip_pb2 as pb
    channel = grpc.insecure_channel(url)
    infer = channel.unary_unary(method,
                                request_serializer=pb.ModelInferRequest.SerializeToString,
                                response_deserializer=pb.ModelInferResponse.FromString)

    def call():
        req = pb.ModelInferRequest(model_name=name, inputs=[
            pb.ModelInferRequest.InferInputTensor(name=in_name, datatype="FP32",
                                                  shape=x.shape)],
            raw_input_contents=[x.tobytes()])
        resp = infer(req)
        return np.frombuffer(resp.raw_output_contents[0], np.float32)
    return call


def run_oip(model: Path, threads: int, n: int, x: np.ndarray, results: dict, bare_fn,
            interleaved, ms) -> list[tuple]:
    """The protocol rows: the agent's servers in a child process, each case's contenders
    (bare session, clients) alternated in one interleaved run."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-oip-"))
    in_name = _input_name(model)
    image = image_model(tmp / "image.onnx")
    proc, urls = _spawn(model, in_name, image, threads, tmp)
    rows = []
    try:
        for label, name, in_, arr, out, budget, count in (
                ("digits", "digits", in_name, x, "logits", 0.5, n),
                ("image 1x3x320x320", "image", "x", _image(), "y", 2.0, max(200, n // 10))):
            calls = {"bare": bare_fn(image if name == "image" else model, threads, arr),
                     **contenders(name, in_, arr, out, urls, json_rows=name == "digits"),
                     **({"v2 JSON, stdlib client": lean_json(urls, name, in_, arr)}
                        if name == "digits" else {}),
                     "v2 binary, stdlib client": lean_binary(urls, name, in_, arr, out),
                     "gRPC TCP, bare channel": lean_grpc(urls["grpc"], name, in_, arr),
                     "gRPC floor: do-nothing handler, bare channel": lean_grpc(
                         urls["grpc-floor"], name, in_, arr,
                         f"/edgeship.bench.Floor/{name}")}
            rows += _rows(label, interleaved(calls, count), budget, results, ms)
    finally:
        proc.stdin.close()
        proc.wait(20)
    return rows


def _rows(label: str, t: dict, budget: float, results: dict, ms) -> list[tuple]:
    bare = t.pop("bare")
    base = float(np.median(bare))
    rows = [(f"bare onnxruntime [{label}]", ms(bare), "", "", "")]
    v1 = t.get("/v1 JSON")
    for key, lat in t.items():
        over = float(np.median(lat) - base)
        results[f"oip overhead {label} {key} ms"] = over
        if key in ("/v1 JSON", "v2 JSON") or key.startswith("gRPC floor"):  # references
            target, ok = "(reference)", True
        elif key == "v2 JSON, stdlib client":  # the same client as the /v1 JSON row
            target, ok = "<= /v1 JSON", float(np.median(lat)) <= float(np.median(v1))
        else:
            target, ok = f"<= +{budget:g} ms", over <= budget
        rows.append((f"{key} [{label}]", ms(lat), f"+{over:.3f} ms", target,
                     "ok" if ok else "MISS"))
    return rows


def _input_name(model: Path) -> str:
    import onnxruntime as ort
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]) \
        .get_inputs()[0].name


def _image() -> np.ndarray:
    return np.random.default_rng(1).random(IMAGE_SHAPE, dtype=np.float32)


def run_json_memory(results: dict, body_mib: int = 16) -> list[tuple]:
    """Peak traced memory to turn a JSON body of short numbers ("0.5,0.5,…", rows of 64)
    into a float32 tensor: json.loads + NumPy (what the API did) vs agent.jsonarray (what
    it does)."""
    import json
    import tracemalloc

    from edgeship.agent.jsonarray import as_array, loads

    row = b"[" + b",".join([b"0.5"] * 64) + b"]"
    rows = (body_mib << 20) // (len(row) + 1)
    body = b'{"inputs": [' + b",".join([row] * rows) + b"]}"
    tensor_mb = rows * 64 * 4 / 2**20

    def peak(fn) -> float:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()

    old = peak(lambda: np.asarray(json.loads(body)["inputs"], np.float32))
    new = peak(lambda: as_array(loads(body)["inputs"], np.float32, "inputs"))
    results["json_body_peak_mb"] = {"json.loads": old, "jsonarray": new, "tensor": tensor_mb}
    label = f"[{body_mib} MiB JSON body, {tensor_mb:.0f} MB tensor]"
    return [(f"JSON parse peak, json.loads + NumPy {label}", f"{old:.0f} MB", "", "", ""),
            (f"JSON parse peak, agent {label}", f"{new:.0f} MB", f"x{new / tensor_mb:.1f} tensor",
             "in proportion to the tensor", "ok" if new <= 3 * tensor_mb else "MISS")]
