"""Feed every vLLM and SGLang argument list that `tessera-operator plan -o yaml` renders for the
examples to the engine's own parser, and check that each reads back what Tessera meant: per pod,
and per replica (the pods of one replica agree on the sizes, their ranks cover the GPUs, and
exactly one serves HTTP where the engine says so).

examples/engines is planned as one cluster; each file of examples/disaggregation on its own (each
takes most of the example cluster's H800s). Their prefill/decode pools' pods must read back their
role (SGLang --disaggregation-mode and transfer backend, vLLM's NIXL --kv-transfer-config), and
each router's arguments (sglang-router, vllm-router) go through the router's own parser when it is
installed: in this Python, or in the Python named by SGLANG_ROUTER_PYTHON / VLLM_ROUTER_PYTHON
(they are not part of .tools/engines); without it the router's arguments are checked by hand and
the output says the parser was skipped.

Run through scripts/engine-check.sh (it installs the pinned engines first).
"""

import argparse
import json
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # vLLM infers a device when building defaults


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def last(args: list[str], name: str) -> str | None:
    """The value of the last `name` (`--x v` or `--x=v`): argparse keeps the last one."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def gpus(pod: dict) -> int:
    return int(pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])


def check_sglang(pod: dict, args: list[str]) -> str:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    sa = ServerArgs.from_cli_args(parser.parse_args(args))
    assert sa.model_path == flag(args, "--model-path")
    assert sa.tp_size == int(flag(args, "--tp-size")) and sa.pp_size == int(flag(args, "--pp-size"))
    assert sa.port == int(flag(args, "--port")) and sa.host == "0.0.0.0"
    assert sa.enable_metrics is True
    assert sa.context_length == int(flag(args, "--context-length"))
    assert sa.max_running_requests == int(flag(args, "--max-running-requests"))
    assert sa.kv_cache_dtype == (flag(args, "--kv-cache-dtype") or "auto")
    if "--nnodes" in args:
        assert sa.nnodes == int(flag(args, "--nnodes")) and sa.node_rank == int(flag(args, "--node-rank"))
        assert sa.dist_init_addr == flag(args, "--dist-init-addr")
    # Mixture of experts: the expert-parallel group is the GPUs of a pipeline stage (EP = TP);
    # data-parallel attention splits the sequences over all of them (--attn-dp-size, SGLang
    # 0.5.23's spelling of the deprecated --dp-size N --enable-dp-attention).
    assert sa.ep_size == int(flag(args, "--ep-size") or 1)
    assert sa.ep_size in (1, sa.tp_size), (sa.ep_size, sa.tp_size)
    assert sa.attn_dp_size == int(flag(args, "--attn-dp-size") or 1)
    assert sa.attn_dp_size in (1, sa.ep_size) and sa.dp_size == 1, (sa.attn_dp_size, sa.dp_size)
    # The operator renders DeepEP for a group over several pods; engine.args may override it.
    assert sa.moe_a2a_backend == (last(args, "--moe-a2a-backend") or "none")
    what = f"tp={sa.tp_size} pp={sa.pp_size} nnodes={sa.nnodes} rank={sa.node_rank} kv={sa.kv_cache_dtype}"
    if sa.ep_size > 1:
        what += f" ep={sa.ep_size} attn_dp={sa.attn_dp_size} a2a={sa.moe_a2a_backend}"
    # Prefill/decode pools: the pod's role, the transfer backend (a default engine.args may
    # override), and the bootstrap port the router hands to the decode side.
    pool = pool_of(pod)
    assert sa.disaggregation_mode == (pool or "null"), (sa.disaggregation_mode, pool)
    if pool:
        assert sa.disaggregation_transfer_backend == last(args, "--disaggregation-transfer-backend")
        if pool == "prefill":
            assert sa.disaggregation_bootstrap_port == int(flag(args, "--disaggregation-bootstrap-port"))
        what += f" pd={pool} transfer={sa.disaggregation_transfer_backend}"
        if pool == "prefill":
            what += f" bootstrap={sa.disaggregation_bootstrap_port}"
    return what


def pool_of(pod: dict) -> str | None:
    return pod["metadata"]["labels"].get("tessera.dev/pool")


def check_vllm(pod: dict, args: list[str]) -> str:
    import vllm.entrypoints.cli.serve as serve
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    cmd = serve.ServeSubcommand()
    cmd.subparser_init(parser.add_subparsers(dest="subparser"))
    ns = parser.parse_args(args)
    cmd.validate(ns)
    ea = EngineArgs.from_cli_args(ns)
    assert ns.model_tag == args[1]
    assert ea.tensor_parallel_size == int(flag(args, "--tensor-parallel-size"))
    assert ea.pipeline_parallel_size == int(flag(args, "--pipeline-parallel-size"))
    assert ea.max_num_seqs == int(flag(args, "--max-num-seqs"))
    assert ea.max_model_len == int(flag(args, "--max-model-len"))
    assert ns.port == int(flag(args, "--port"))
    assert ea.kv_cache_dtype == (flag(args, "--kv-cache-dtype") or "auto")
    if "--nnodes" in args:
        assert ea.nnodes == int(flag(args, "--nnodes")) and ea.node_rank == int(flag(args, "--node-rank"))
        assert ea.master_addr == flag(args, "--master-addr") and ea.distributed_executor_backend == "mp"
        assert ns.headless == (ea.node_rank > 0)
    what = f"tp={ea.tensor_parallel_size} pp={ea.pipeline_parallel_size} nnodes={ea.nnodes} rank={ea.node_rank} headless={ns.headless} kv={ea.kv_cache_dtype}"
    # Mixture of experts: --enable-expert-parallel; with data-parallel attention vLLM's
    # data-parallel launch (single-GPU engines, internal load balancing on the first pod).
    assert ea.enable_expert_parallel == ("--enable-expert-parallel" in args)
    assert ea.data_parallel_size == int(flag(args, "--data-parallel-size") or 1)
    if ea.data_parallel_size > 1:
        assert ea.enable_expert_parallel and ea.tensor_parallel_size == 1, "DP attention is for MoE"
        assert ea.pipeline_parallel_size == 1 and "--nnodes" not in args
        assert ea.data_parallel_rank is None and not ea.data_parallel_external_lb
        assert not ea.data_parallel_hybrid_lb and ea.data_parallel_backend == "mp"
        if "--data-parallel-size-local" in args:
            assert ea.data_parallel_size_local == int(flag(args, "--data-parallel-size-local")) == gpus(pod)
            assert ea.data_parallel_address == flag(args, "--data-parallel-address")
            assert ea.data_parallel_rpc_port == int(flag(args, "--data-parallel-rpc-port"))
        else:
            assert ea.data_parallel_size == gpus(pod), "one pod holds every engine"
        # `vllm serve` reads --data-parallel-start-rank without --headless as hybrid load
        # balancing (an API server on every pod): only headless pods may carry it.
        assert (ea.data_parallel_start_rank is not None) == ns.headless
        check_vllm_parallel_config(ea, ns.headless)
        what += (f" ep dp={ea.data_parallel_size} local={ea.data_parallel_size_local}"
                 f" start={ea.data_parallel_start_rank or 0}")
    elif ea.enable_expert_parallel:
        what += f" ep={ea.tensor_parallel_size}"
    # Prefill/decode pools: vLLM's NIXL connector on both, every instance able to send and
    # receive KV caches (the router's requests decide who prefills).
    pool = pool_of(pod)
    kv = ea.kv_transfer_config
    if pool:
        from vllm.config.kv_transfer import KVTransferConfig

        assert isinstance(kv, KVTransferConfig), kv
        assert kv.kv_connector == "NixlConnector" and kv.kv_role == "kv_both", kv
        assert kv.is_kv_transfer_instance and kv.is_kv_producer and kv.is_kv_consumer
        what += f" pd={pool} connector={kv.kv_connector}/{kv.kv_role}"
    else:
        assert kv is None, kv
    return what


def check_vllm_parallel_config(ea, headless: bool) -> None:
    """Build vLLM's own ParallelConfig from the parsed arguments the way
    `EngineArgs.create_engine_config` does for a launch without --nnodes (which needs the
    model's config.json and so cannot run here): its checks of the data-parallel ranks run."""
    from vllm.config.parallel import ParallelConfig

    local = ea.data_parallel_size_local or ea.data_parallel_size
    rank = ea.data_parallel_start_rank or 0
    assert 0 <= rank and rank + local <= ea.data_parallel_size, (rank, local, ea.data_parallel_size)
    ParallelConfig(
        pipeline_parallel_size=ea.pipeline_parallel_size,
        tensor_parallel_size=ea.tensor_parallel_size,
        data_parallel_size=ea.data_parallel_size,
        data_parallel_rank=rank,
        data_parallel_size_local=local,
        data_parallel_master_ip=ea.data_parallel_address or "127.0.0.1",
        data_parallel_rpc_port=ea.data_parallel_rpc_port or 29550,
        data_parallel_backend=ea.data_parallel_backend,
        data_parallel_hybrid_lb=False,
        enable_expert_parallel=ea.enable_expert_parallel,
        is_moe_model=True,
    )


def check_replica(engine: str, pods: list[tuple[dict, list[str]]]) -> str:
    """The pods of one replica agree on the sizes, and their ranks cover its GPUs."""
    name = pods[0][0]["metadata"]["name"]
    total = sum(gpus(p) for p, _ in pods)
    leaders = [p for p, _ in pods if p["metadata"]["labels"]["tessera.dev/role"] == "leader"]
    assert len(leaders) == 1 and leaders[0] is pods[0][0], name
    same = ["--tensor-parallel-size", "--pipeline-parallel-size", "--data-parallel-size",
            "--tp-size", "--pp-size", "--ep-size", "--attn-dp-size", "--moe-a2a-backend",
            "--disaggregation-mode", "--disaggregation-transfer-backend", "--kv-transfer-config"]
    assert len({pool_of(p) for p, _ in pods}) == 1, (name, "one pool per replica")
    for f in same:
        assert len({last(a, f) for _, a in pods}) == 1, (name, f)
    args = pods[0][1]
    if engine == "sglang":
        tp, pp = int(flag(args, "--tp-size")), int(flag(args, "--pp-size"))
        assert tp * pp == total, (name, tp, pp, total)
        ranks = [int(flag(a, "--node-rank") or 0) for _, a in pods]
        assert ranks == list(range(len(pods))), (name, ranks)
        return f"{len(pods)} pods, {total} GPUs = tp {tp} x pp {pp}"
    dp = int(flag(args, "--data-parallel-size") or 1)
    if dp > 1:
        starts = [int(flag(a, "--data-parallel-start-rank") or 0) for _, a in pods]
        locals_ = [gpus(p) for p, _ in pods]
        assert starts == [sum(locals_[:i]) for i in range(len(pods))], (name, starts)
        assert sum(locals_) == dp == total, (name, locals_, dp, total)
        assert [("--headless" in a) for _, a in pods] == [i > 0 for i in range(len(pods))]
        return f"{len(pods)} pods, {total} GPUs = dp {dp}, start ranks {starts}"
    tp, pp = int(flag(args, "--tensor-parallel-size")), int(flag(args, "--pipeline-parallel-size"))
    assert tp * pp == total, (name, tp, pp, total)
    return f"{len(pods)} pods, {total} GPUs = tp {tp} x pp {pp}"


# Reads a router's arguments with the router's own parser (run by the Python that has the
# router package) and prints what it parsed as JSON; exit 3 when the package is missing.
ROUTER_PARSE = r"""
import json, sys
module = sys.argv[1]
try:
    launch = __import__(module + ".launch_router", fromlist=["parse_router_args"])
except ImportError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
ra = launch.parse_router_args(json.loads(sys.argv[2]))
ra._validate_router_args()
version = __import__(module + ".version", fromlist=["__version__"]).__version__
print(json.dumps({"version": version, "pd": getattr(ra, "pd_disaggregation", False),
                  "vllm_pd": getattr(ra, "vllm_pd_disaggregation", False),
                  "kv_connector": getattr(ra, "kv_connector", None),
                  "prefill": ra.prefill_urls, "decode": ra.decode_urls, "host": ra.host,
                  "port": ra.port, "prometheus_host": ra.prometheus_host,
                  "prometheus_port": ra.prometheus_port}))
"""

ROUTERS = {
    # command: (engine, router package module, PyPI package, env var naming its Python)
    ("python3", "-m", "sglang_router.launch_router"): ("sglang", "sglang_router", "sglang-router", "SGLANG_ROUTER_PYTHON"),
    ("vllm-router",): ("vllm", "vllm_router", "vllm-router", "VLLM_ROUTER_PYTHON"),
}

BOOTSTRAP_PORT = 8998  # SGLang prefill leaders' bootstrap server (build::SGLANG_BOOTSTRAP_PORT)


def check_router(router: dict, pods: list[dict]) -> str:
    """A router's arguments list every replica leader of its deployment's two pools (in replica
    order, SGLang prefills with their bootstrap port) and serve the deployment's port; read back
    by the router's own parser when it is installed."""
    name = router["metadata"]["labels"]["tessera.dev/router"]
    ns = router["metadata"]["namespace"]
    ctr = router["spec"]["template"]["spec"]["containers"][0]
    command, args = tuple(ctr["command"]), ctr["args"]
    engine, module, package, env = ROUTERS[command]
    port = next(p["containerPort"] for p in ctr["ports"] if p["name"] == "http")
    leaders = {"prefill": [], "decode": []}
    for pod in sorted(pods, key=lambda p: int(p["metadata"]["labels"]["tessera.dev/replica"])):
        labels = pod["metadata"]["labels"]
        if labels.get("tessera.dev/deployment") == name and labels["tessera.dev/role"] == "leader":
            leaders[labels["tessera.dev/pool"]].append(
                f"http://{pod['metadata']['name']}.{name}-workers.{ns}.svc:{port}")
    assert leaders["prefill"] and leaders["decode"], (name, leaders)
    want_prefill = [[u, BOOTSTRAP_PORT if engine == "sglang" else None] for u in leaders["prefill"]]
    python = os.environ.get(env, sys.executable)
    run = subprocess.run([python, "-c", ROUTER_PARSE, module, json.dumps(args)],
                         capture_output=True, text=True)
    if run.returncode == 3:
        # Not installed: read the arguments by hand.
        pairs = [args[i + 1:i + 3] for i, a in enumerate(args) if a == "--prefill"]
        prefill = [[p[0], int(p[1]) if engine == "sglang" else None] for p in pairs]
        decode = [args[i + 1] for i, a in enumerate(args) if a == "--decode"]
        assert prefill == want_prefill and decode == leaders["decode"], (name, args)
        assert flag(args, "--host") == "0.0.0.0" and int(flag(args, "--port")) == port
        return (f"{' '.join(command)}: {len(prefill)} prefill + {len(decode)} decode leaders "
                f"(checked by hand: the router's parser was skipped, {package} is not installed "
                f"in {python}; set {env})")
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    if engine == "sglang":
        assert got["pd"] and not got["vllm_pd"], got
    else:
        assert got["vllm_pd"] and got["kv_connector"] == "nixl", got
    assert got["prefill"] == want_prefill, (got["prefill"], want_prefill)
    assert got["decode"] == leaders["decode"], (got["decode"], leaders["decode"])
    assert got["host"] == "0.0.0.0" and got["port"] == port, got
    assert got["prometheus_host"] == "0.0.0.0" and got["prometheus_port"] == 29000, got
    return (f"{package} {got['version']} parsed: {len(got['prefill'])} prefill + "
            f"{len(got['decode'])} decode leaders, port {got['port']}")


def plans(binary: str) -> list[str]:
    """`plan -o yaml` of examples/engines (one cluster) and of each disaggregation example."""
    runs = [["-f", "examples/engines"]]
    pd_dir = os.path.join(ROOT, "examples", "disaggregation")
    runs += [["-f", os.path.join("examples", "disaggregation", f)]
             for f in sorted(os.listdir(pd_dir)) if f.endswith(".yaml")]
    return [subprocess.run([binary, "plan", "--nodes", "examples/cluster.yaml", *r, "-o", "yaml"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout for r in runs]


def main() -> int:
    binary = os.environ.get("TESSERA_OPERATOR", os.path.join(ROOT, "target", "debug", "tessera-operator"))
    objects = [obj for out in plans(binary) for obj in yaml.safe_load_all(out) if obj]
    checked = {"vllm": 0, "sglang": 0}
    pools = set()
    replicas: dict[tuple, list[tuple[dict, list[str]]]] = {}
    for obj in objects:
        if obj["kind"] != "Pod":
            continue
        ctr = obj["spec"]["containers"][0]
        command, args = ctr.get("command") or [], ctr["args"]
        if command == ["vllm"]:
            what, engine = check_vllm(obj, args), "vllm"
        elif command == ["python3", "-m", "sglang.launch_server"]:
            what, engine = check_sglang(obj, args), "sglang"
        else:
            continue
        checked[engine] += 1
        if pool_of(obj):
            pools.add((engine, pool_of(obj)))
        labels = obj["metadata"]["labels"]
        key = (engine, obj["metadata"]["namespace"], labels["tessera.dev/deployment"],
               labels["tessera.dev/replica"], labels["tessera.dev/incarnation"])
        replicas.setdefault(key, []).append((obj, args))
        print(f"ok   {engine} {obj['metadata']['name']}: {what}")
    for (engine, ns, name, replica, _), pods in replicas.items():
        print(f"ok   {engine} {ns}/{name} replica {replica}: {check_replica(engine, pods)}")
    routers = [o for o in objects if o["kind"] == "Deployment"
               and "tessera.dev/router" in o["metadata"]["labels"]]
    worker_pods = [o for o in objects if o["kind"] == "Pod"]
    for router in routers:
        print(f"ok   router {router['metadata']['namespace']}/{router['metadata']['name']}: "
              f"{check_router(router, worker_pods)}")
    assert pools == {(e, r) for e in ("vllm", "sglang") for r in ("prefill", "decode")}, pools
    assert {ROUTERS[tuple(r["spec"]["template"]["spec"]["containers"][0]["command"])][0]
            for r in routers} == {"vllm", "sglang"}, "a router of each engine"
    assert checked["vllm"] >= 3 and checked["sglang"] >= 2, checked
    moe = {key[0] for key, pods in replicas.items()
           if any("--ep-size" in a or "--enable-expert-parallel" in a for _, a in pods)}
    assert moe == {"vllm", "sglang"}, f"a mixture-of-experts replica of each engine: {moe}"
    print(f"{sum(checked.values())} pods, {len(replicas)} replicas and {len(routers)} routers passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
