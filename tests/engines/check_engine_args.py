"""Feed every vLLM and SGLang argument list that `tessera-operator plan -o yaml` renders for the
examples to the engine's own parser, and check that each reads back what Tessera meant.

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
    return f"tp={sa.tp_size} pp={sa.pp_size} nnodes={sa.nnodes} rank={sa.node_rank} kv={sa.kv_cache_dtype}"


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
    return f"tp={ea.tensor_parallel_size} pp={ea.pipeline_parallel_size} nnodes={ea.nnodes} rank={ea.node_rank} headless={ns.headless} kv={ea.kv_cache_dtype}"


def main() -> int:
    binary = os.environ.get("TESSERA_OPERATOR", os.path.join(ROOT, "target", "debug", "tessera-operator"))
    out = subprocess.run([binary, "plan", "--nodes", "examples/cluster.yaml", "-f", "examples/engines",
                          "-o", "yaml"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    checked = {"vllm": 0, "sglang": 0}
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
        print(f"ok   {engine} {obj['metadata']['name']}: {what}")
    assert checked["vllm"] >= 3 and checked["sglang"] >= 2, checked
    print(f"{sum(checked.values())} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
