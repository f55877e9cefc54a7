"""Feed every vLLM and SGLang argument list that `tessera-operator plan -o yaml` renders for the
examples to the engine's own parser, and check that each reads back what Tessera meant: per pod,
and per replica (the pods of one replica agree on the sizes, their ranks cover the GPUs, and
exactly one serves HTTP where the engine says so).

Run through scripts/engine-check.sh (it installs the pinned engines first).
"""

import argparse
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
    return what


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
            "--tp-size", "--pp-size", "--ep-size", "--attn-dp-size", "--moe-a2a-backend"]
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


def main() -> int:
    binary = os.environ.get("TESSERA_OPERATOR", os.path.join(ROOT, "target", "debug", "tessera-operator"))
    out = subprocess.run([binary, "plan", "--nodes", "examples/cluster.yaml", "-f", "examples/engines",
                          "-o", "yaml"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    checked = {"vllm": 0, "sglang": 0}
    replicas: dict[tuple, list[tuple[dict, list[str]]]] = {}
    for obj in yaml.safe_load_all(out):
        if not obj or obj["kind"] != "Pod":
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
        labels = obj["metadata"]["labels"]
        key = (engine, obj["metadata"]["namespace"], labels["tessera.dev/deployment"],
               labels["tessera.dev/replica"], labels["tessera.dev/incarnation"])
        replicas.setdefault(key, []).append((obj, args))
        print(f"ok   {engine} {obj['metadata']['name']}: {what}")
    for (engine, ns, name, replica, _), pods in replicas.items():
        print(f"ok   {engine} {ns}/{name} replica {replica}: {check_replica(engine, pods)}")
    assert checked["vllm"] >= 3 and checked["sglang"] >= 2, checked
    moe = {key[0] for key, pods in replicas.items()
           if any("--ep-size" in a or "--enable-expert-parallel" in a for _, a in pods)}
    assert moe == {"vllm", "sglang"}, f"a mixture-of-experts replica of each engine: {moe}"
    print(f"{sum(checked.values())} pods and {len(replicas)} replicas passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
