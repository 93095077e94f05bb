"""Which tensors torch.compile's partitioner saves for the backward of a small lightning LM on "gemm" kernels, with and
without the block's tail as one op (models.lm.Block.fused_tail), on the CPU: quack's epilogues are stood in for by the
fp32 fakes of tests/kernels/test_gemm_epilogue.py, and AOT autograd runs inductor's decompositions and min-cut
partitioner, as inductor does on a GPU, without compiling kernels. Prints the backward's saved inputs and whether it
recomputes an RMSNorm's rstd (docs/bench/kernels.md, thirty-first session).

    PYTHONPATH=$PWD python docs/bench/tail_partition_probe.py tail    # or: plain (the "gemm" blocks without it, the
                                                                     # adds apart), resgemm (the adds in the GEMMs)
"""

import sys

import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.decomposition import select_decomp_table

import kernels.gemm_epilogue as ge
import models.lm as lm
import models.mixers.lightning as lt
import tests.kernels.test_gemm_epilogue as stand_ins
from models.config import ModelConfig


def stood_in_lm(variant: str, d: int = 32, layers: int = 3, heads: int = 2, vocab: int = 64) -> lm.LM:
    """A lightning LM on "gemm" kernels whose quack epilogues are the tests' fp32 fakes, with the block's tail as one
    op when variant is "tail", its residual adds in the GEMMs when "resgemm" (also docs/bench/tail_fusion_probe.py's)."""
    quack = stand_ins.fake_quack_module({})
    ge._quack = lambda: quack
    ge._library = lambda: stand_ins._fake_library({})
    lm.epilogues_usable = lt.epilogues_usable = lambda x, *w: True
    lt.Lightning.backend = "torch"
    lm.Block.fused_tail = variant == "tail"
    lm.Block.residual_gemm = variant == "resgemm"
    return lm.LM(ModelConfig("lightning", d, layers, heads, vocab, ""), kernels="gemm")


def main(variant: str) -> None:
    """Partition the LM's training graph and print what its backward is handed."""
    model = stood_in_lm(variant)
    idx = torch.randint(0, 64, (2, 8))
    graphs = []

    def backend(gm, inputs):
        def keep(kind):
            return lambda g, _: (graphs.append((kind, g)), g.forward)[1]

        return aot_module_simplified(gm, inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"),
                                     partition_fn=min_cut_rematerialization_partition,
                                     decompositions=select_decomp_table())

    torch._dynamo.reset()
    _, loss = torch.compile(model, backend=backend, fullgraph=True)(idx, idx)
    loss.backward()
    for kind, g in graphs:
        if kind == "bw":
            targets = [str(n.target) for n in g.graph.nodes if n.op == "call_function"]
            print("backward: rsqrt recomputed", sum("rsqrt" in t for t in targets), "times")
            print("saved:", [n.name for n in g.graph.nodes if n.op == "placeholder"])


if __name__ == "__main__":
    if len(sys.argv) > 2 or sys.argv[1:] not in ([], ["tail"], ["plain"], ["resgemm"]):
        sys.exit("usage: PYTHONPATH=$PWD python docs/bench/tail_partition_probe.py [tail|plain|resgemm]")
    main(sys.argv[1] if len(sys.argv) > 1 else "tail")
