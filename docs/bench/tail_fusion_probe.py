"""How inductor would fuse the backward (or forward) of a small lightning LM for an H100, worked out on a machine
without a GPU: the graph (AOT autograd's partition, quack's epilogues stood in for by
tests/kernels/test_gemm_epilogue.py's fakes) goes through inductor's lowering and scheduler on fake CUDA tensors,
with torch.cuda's device queries answered as an H100's, and stops before any kernel is generated. Prints each
scheduled group and, per RMSNorm backward, whether it became one mixed-order reduction (the row sum, the input's
gradient and the weight's column sum in one kernel) or was split (docs/bench/kernels.md, thirty-third session:
flattening the tail op's inputs split it).

    PYTHONPATH=$PWD python docs/bench/tail_fusion_probe.py tail    # or: plain (the "gemm" blocks without the tail,
                                                                   # the adds apart), resgemm (the residual adds in the
                                                                   # GEMMs, training's default)
    PYTHONPATH=$PWD python docs/bench/tail_fusion_probe.py resgemm fw   # the forward's groups and bytes instead

A study, not a product path: it patches torch.cuda's functions for the life of its process. Groups a real GPU would
make differently (the gated norm, the walks: here their plain PyTorch references) are not the question it answers.
"""

import sys
import types

import torch

H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, max_threads_per_multi_processor=2048,
    warp_size=32, regs_per_multiprocessor=65536, shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472, total_memory=80 * 2**30, L2_cache_size=50 * 2**20, gcnArchName="",
    max_threads_per_block=1024, clock_rate=1980000)


def compiled_graph(variant: str, d: int = 768, layers: int = 3, batch: int = 4, t: int = 2048, phase: str = "bw"):
    """The compiled training step's backward graph (or forward, phase "fw") and its inputs (CPU tensors), for the LM
    of ``variant``."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    from tail_partition_probe import stood_in_lm  # beside this script

    model = stood_in_lm(variant, d, layers, heads=6, vocab=128)
    idx = torch.randint(0, 128, (batch, t))
    graphs = []

    def backend(gm, inputs):
        def keep(kind):
            return lambda g, ins: (graphs.append((kind, g, ins)), g.forward)[1]

        return aot_module_simplified(gm, inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"),
                                     partition_fn=min_cut_rematerialization_partition,
                                     decompositions=select_decomp_table())

    torch._dynamo.reset()
    with torch.autocast("cpu", torch.bfloat16):
        _, loss = torch.compile(model, backend=backend, fullgraph=True)(idx, idx)
    loss.backward()
    return next((g, ins) for kind, g, ins in graphs if kind == phase)


def _pretend_h100() -> None:
    cuda = torch.cuda
    for name, fn in {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                     "get_device_properties": lambda *a, **k: H100, "_get_device_properties": lambda *a, **k: H100,
                     "get_device_capability": lambda *a, **k: (9, 0), "_lazy_init": lambda: None,
                     "is_initialized": lambda: True, "set_rng_state": lambda *a, **k: None,
                     "get_rng_state": lambda *a, **k: torch.zeros(16, dtype=torch.uint8),
                     "_exchange_device": lambda idx: 0, "_maybe_exchange_device": lambda idx: 0,
                     "set_device": lambda *a: None}.items():
        setattr(cuda, name, fn)


def schedule(variant: str, phase: str = "bw") -> list[tuple]:
    """Inductor's scheduled groups of the backward (or forward) on a pretended H100: (kind, node type, names, origin
    ops, bytes the group reads and writes by inductor's estimate)."""
    import torch._inductor.fx_passes.post_grad as post_grad
    from torch._inductor import scheduler
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode

    g, inputs = compiled_graph(variant, phase=phase)
    cuda = torch.device("cuda", 0)
    for node in list(g.graph.nodes):
        if node.kwargs.get("device") is not None and torch.device(node.kwargs["device"]).type == "cpu":
            node.kwargs = {**node.kwargs, "device": cuda}
        if "index_put" in str(node.target):  # the embedding's gradient: a decomposition fake CUDA cannot run
            node.replace_all_uses_with(node.args[0])
            g.graph.erase_node(node)
    g.recompile()
    _pretend_h100()
    scheduler.has_triton = lambda: True
    post_grad.reinplace_inplaceable_ops = lambda *a, **k: None  # trips on the naive walks' scatters under fake CUDA
    groups = []

    def record(self):
        for node in self.nodes:
            kind = "reduction" if node.is_reduction() else "extern" if node.is_extern() else "pointwise"
            origins = sorted({str(o.target).split(".")[-2] if "." in str(o.target) else str(o.target)
                              for n in node.get_nodes() for o in (getattr(n.node, "origins", None) or [])})
            groups.append((kind, type(node).__name__, [n.get_name() for n in node.get_nodes()], origins,
                           node.get_read_write_buffers_sizes()))
        raise _Scheduled

    scheduler.Scheduler.codegen = record
    with FakeTensorMode() as fake:
        fakes = [fake.from_tensor(t).to(cuda) if isinstance(t, torch.Tensor) else t for t in inputs]
        try:
            compile_fx_inner(g, fakes, is_backward=phase == "bw")
        except Exception as exc:  # noqa: BLE001 - inductor wraps what record raised
            if not isinstance(exc, _Scheduled) and "_Scheduled" not in repr(exc):
                raise
    return groups


class _Scheduled(Exception):
    """Raised once the scheduler has fused, before code generation."""


def main(variant: str, phase: str = "bw") -> None:
    """Print the groups, the bytes inductor's own kernels move (GEMMs and custom ops, extern, not counted) and, in the
    backward, per norm backward (an rsqrt power among its origins) whether it is one kernel or split."""
    groups = schedule(variant, phase)
    for group in groups:
        if group[0] != "extern":
            print(group)
    moved = sum(size for kind, *_, size in groups if kind != "extern")
    print(f"BYTES {phase} {variant}: {moved / 2**20:.0f} MiB in {sum(g[0] != 'extern' for g in groups)} kernels")
    if phase == "bw":
        whole = sum(1 for kind, typ, names, origins, _ in groups
                    if typ == "FusedMixOrderReductions" and "pow" in origins and len(names) == 3)
        split = sum(1 for kind, typ, names, origins, _ in groups if kind == "pointwise" and "pow" in origins
                    and "sigmoid" not in origins)
        print(f"NORM BACKWARDS {variant}: {whole} as one mixed-order reduction, {split} with the input's gradient "
              "apart")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not 1 <= len(args) <= 2 or args[0] not in ("tail", "plain", "resgemm") or args[1:] not in ([], ["fw"], ["bw"]):
        sys.exit("usage: PYTHONPATH=$PWD python docs/bench/tail_fusion_probe.py tail|plain|resgemm [fw|bw]")
    main(*args)
