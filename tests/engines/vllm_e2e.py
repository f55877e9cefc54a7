"""A real vLLM end to end on CPU, through the exact command Tessera renders.

1. `tessera-operator plan -o yaml` renders examples/engines/smollm2-135m-vllm.yaml with its
   model URI pointed at a loopback HTTP server over the converted test model's directory (an
   address substitution: the example reads a PVC), so the leader pod gets the model-fetch init
   container. Its command runs first (`tessera-worker fetch`, the cache volume's path made a
   temporary directory) and must fetch the Hugging Face directory file by file. Then the
   leader's command, arguments and environment are taken as they are, substituting only
   addresses and paths (the host and port a free loopback port, the pod IP 127.0.0.1, /tmp and
   the cache volume temporary directories).
2. That command runs as a local process with vLLM's CPU build; the official OpenAI client asks
   the France question and must read "Paris".
3. Under load (concurrent streaming requests), `tessera-operator scrape` reads vLLM's real
   /metrics through the autoscaler's scrape code and must decide to scale up.

Usage: python vllm_e2e.py TESSERA_OPERATOR MODEL_DIR VENV_BIN TESSERA_WORKER   (scripts/engine-check.sh)
"""

import functools
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import yaml
from openai import OpenAI

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = "examples/engines/smollm2-135m-vllm.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leader_pod(operator: str, example: str) -> dict:
    out = subprocess.run([operator, "plan", "--nodes", "examples/cluster.yaml", "-f", example,
                          "-o", "yaml"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    pods = [o for o in yaml.safe_load_all(out) if o and o["kind"] == "Pod"]
    leaders = [p for p in pods if p["metadata"]["labels"]["tessera.dev/role"] == "leader"]
    assert len(leaders) == 1, [p["metadata"]["name"] for p in pods]
    return leaders[0]


def serve_directory(directory: str) -> int:
    """A loopback HTTP server over `directory` (404 for what it lacks); returns its port."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_model(pod: dict, worker: str, model_dir: str, cache: str) -> str:
    """Run the pod's model-fetch init container as rendered, its cache volume's mount path made
    `cache`; check every file arrived whole; return the fetched directory."""
    inits = pod["spec"].get("initContainers") or []
    assert [c["name"] for c in inits] == ["fetch-model"], inits
    ctr = inits[0]
    mount = [m["mountPath"] for m in ctr["volumeMounts"] if m["name"] == "model"]
    assert mount == ["/model-cache"], ctr["volumeMounts"]
    args = [a.replace("/model-cache", cache, 1) if a.startswith("/model-cache") else a
            for a in ctr["args"]]
    assert args[0] == "fetch", args
    out = subprocess.run([worker] + args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    dest = args[args.index("--dest") + 1]
    for name in os.listdir(model_dir):
        assert sha256(os.path.join(model_dir, name)) == sha256(os.path.join(dest, name)), name
    print(f"ok   model fetch (init container `{' '.join(ctr['args'][:2])} …`): {out.stdout.strip()}")
    return dest


def local_command(ctr: dict, model_dir: str, port: int, tmp: str, venv_bin: str):
    """The rendered command with addresses and paths substituted, and what was substituted."""
    args = list(ctr["args"])
    changed = []
    pod_model = args[1]
    assert pod_model == "/model-cache/model", pod_model
    args[1] = model_dir
    changed.append(f"model {pod_model} -> {model_dir}")
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        i = args.index(flag)
        changed.append(f"{flag} {args[i + 1]} -> {value}")
        args[i + 1] = value
    env = dict(os.environ)
    for e in ctr.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"].replace("/tmp", tmp)
        elif e["name"] == "VLLM_HOST_IP":
            env[e["name"]] = "127.0.0.1"
            changed.append("VLLM_HOST_IP (pod IP) -> 127.0.0.1")
    assert ctr["command"] == ["vllm"], ctr["command"]
    return [os.path.join(os.path.abspath(venv_bin), "vllm")] + args, env, changed


def wait_healthy(port: int, proc: subprocess.Popen, limit_s: float) -> float:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"vLLM was not healthy after {limit_s} s")


def main() -> int:
    operator, model_dir, venv_bin, worker = sys.argv[1:5]
    model_dir = os.path.abspath(model_dir)
    tmp = tempfile.mkdtemp(prefix="tessera-vllm-")
    example = yaml.safe_load(open(os.path.join(ROOT, EXAMPLE)))
    example["spec"]["model"]["uri"] = f"http://127.0.0.1:{serve_directory(model_dir)}/"
    over_http = os.path.join(tmp, "example-over-http.yaml")
    with open(over_http, "w") as f:
        yaml.safe_dump(example, f)
    pod = leader_pod(operator, over_http)
    fetched = fetch_model(pod, os.path.abspath(worker), model_dir, os.path.join(tmp, "model-cache"))
    ctr = pod["spec"]["containers"][0]
    port = free_port()
    cmd, env, changed = local_command(ctr, fetched, port, tmp, venv_bin)
    print("rendered:", " ".join(["vllm"] + ctr["args"]))
    print("substituted:", "; ".join(changed))
    log = open(os.path.join(tmp, "vllm.log"), "w")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        took = wait_healthy(port, proc, 600)
        print(f"ok   vLLM healthy after {took:.0f} s")
        served = yaml.safe_load(open(os.path.join(ROOT, EXAMPLE)))["spec"]["model"]["servedName"]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        models = [m.id for m in client.models.list().data]
        assert served in models, models
        r = client.chat.completions.create(
            model=served, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32, temperature=0)
        text = r.choices[0].message.content
        assert "Paris" in text, text
        print(f"ok   OpenAI client: {text!r}")

        # Load: streaming requests that keep generating, so requests wait and run while the
        # autoscaler's scrape code reads /metrics.
        stop = threading.Event()

        def load():
            try:
                while not stop.is_set():
                    s = client.completions.create(model=served, prompt="Tell me a long story:",
                                                  max_tokens=256, stream=True,
                                                  extra_body={"ignore_eos": True})
                    for _ in s:
                        if stop.is_set():
                            break
            except Exception:  # noqa: BLE001
                if not stop.is_set():
                    raise

        threads = [threading.Thread(target=load, daemon=True) for _ in range(20)]
        for t in threads:
            t.start()
        time.sleep(5)
        out = subprocess.run([operator, "scrape", "-f", EXAMPLE, "--leader", f"127.0.0.1:{port}",
                              "--replicas", "1", "--interval-seconds", "3"], cwd=ROOT,
                             capture_output=True, text=True)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        m, d = report["metrics"], report["decision"]
        print(f"ok   scrape of vLLM's /metrics: waiting {m['waiting']}, running {m['running']}, "
              f"KV cache {m['kvCacheUtilization']}, tokens/s {report['sample']['tokensPerSecond']}")
        print(f"ok   decision: {d['current']} -> {d['replicas']} replicas ({d['reason']}): {d['message']}")
        assert report["engine"] == "vllm"
        assert m["running"] and m["running"] > 0, m
        assert report["sample"]["tokensPerSecond"] and report["sample"]["tokensPerSecond"] > 0
        assert d["replicas"] > d["current"], d
        print("4 passed, 0 failed")
        return 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        if proc.returncode not in (0, -signal.SIGTERM, None):
            print(open(os.path.join(tmp, "vllm.log")).read()[-4000:], file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
