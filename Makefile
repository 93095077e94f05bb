# make demo: build the virtualenv from nothing, run the demo study on CPU, write a report.
# make test: build the virtualenv from nothing, run the test suite (CPU only).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU machine installs torch first, so that the package pulls no torch of its own: the CPU build where pip's
# configuration finds it (a local wheel folder here and in CI), else TORCH_INDEX=https://download.pytorch.org/whl/cpu.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
DEMO_DB ?= sqlite:///demo-out/slab.db

.PHONY: setup demo test bench bench-cpu bench-kernels bench-train bench-length bench-pack bench-multi clean

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifneq ($(HAS_GPU),1)
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# The whole pipeline on CPU: price the plan, train its 30 runs on a local Ray, write the report.
demo: setup
	mkdir -p demo-out
	$(BIN)/slab plan plans/demo.csv
	$(BIN)/slab --db $(DEMO_DB) launch plans/demo.csv --cpu --ckpt-dir demo-out/ckpt
	$(BIN)/slab --db $(DEMO_DB) report --plan demo --out demo-out/report
	@echo "report: demo-out/report/index.html"

# Two pytest-xdist workers, each taking whole files (module fixtures train once): most tests wait on processes
# (Ray, workers, retries) more than they compute, so two run in about 70% of one's time on two cores. The files go
# out in tests/conftest.py's order, the slow ones first, not xdist's default order by test count, which started the
# longest files (few tests each) last and left one worker idle at the end.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# CPU benchmarks always; the GPU ones (kernels, training speed, throughput vs length, packing) where a GPU is
# present; on a host of several GPUs also the smoke plan on all of them against one, and data-parallel scaling.
# Each part is a target of its own, run in this order. On a fresh H100 (856847d, docs/bench/h100_2026-12-06b/times.txt):
# bench-kernels 523 s, bench-train 253 s, bench-length 452 s, bench-pack 442 s; bench-cpu under a minute.
BENCH_GPU := bench-kernels bench-train bench-length bench-pack $(if $(filter-out 0 1,$(GPUS)),bench-multi)
bench: bench-cpu $(if $(HAS_GPU),$(BENCH_GPU))

bench-cpu: setup
	$(BIN)/slab bench plan
	$(BIN)/slab bench analysis

ifeq ($(HAS_GPU),1)
bench-kernels: setup
	$(BIN)/slab bench kernels --out docs/bench
	$(BIN)/slab bench fused --csv docs/bench/fused.csv

bench-train: setup
	$(BIN)/slab bench train --arch softmax --arch lightning --params 135M --seq-len 2048 --compile --out docs/bench/train_135m_compile.csv
	$(BIN)/slab bench train --arch softmax --arch lightning --params 135M --seq-len 2048 --compile --fused --out docs/bench/train_135m_fused.csv
# The README's training-speed command (its table's rows): 128k tokens a step in one pass, under CUDA graphs.
	$(BIN)/slab bench train --arch softmax --arch lightning --params 135M --seq-len 2048 --compile-mode reduce-overhead --tokens-per-step 131072 --microbatch 64 --steps 30 --out docs/bench/train_135m_cudagraphs_b64.csv
# Its default runs the MLP and lightning's q, k, v SiLU in quack's GEMM epilogues where the fa4 extra is installed (the
# CSV's epilogues column says); the same with them unfused, to show what they gain.
	$(BIN)/slab bench train --arch softmax --arch lightning --params 135M --seq-len 2048 --compile-mode reduce-overhead --tokens-per-step 131072 --microbatch 64 --steps 30 --kernels loss --out docs/bench/train_135m_cudagraphs_b64_loss.csv

bench-length: setup
	$(BIN)/slab bench train --arch softmax --arch lightning --arch hybrid --params 135M --seq-len 2048 --seq-len 8192 --seq-len 32768 --steps 12 --out docs/bench/train_throughput_vs_seqlen.csv
# The same lengths without the host's launch time (CUDA graphs, 128k tokens a step): eager steps of 32k tokens
# leave the GPU waiting on the host at 8k and 32k, where lightning's kernels launch more (docs/bench/kernels.md).
	$(BIN)/slab bench train --arch softmax --arch lightning --arch hybrid --params 135M --seq-len 2048 --seq-len 8192 --seq-len 32768 --compile-mode reduce-overhead --tokens-per-step 131072 --steps 12 --out docs/bench/train_throughput_vs_seqlen_cudagraphs.csv

bench-pack: setup
	$(BIN)/slab bench pack plans/pack-grid.csv --csv docs/bench/pack.csv

bench-multi: setup
ifneq ($(filter-out 0 1,$(GPUS)),)
	$(BIN)/slab bench spread plans/smoke-h100.csv --gpus $(GPUS) --gpus 1 --csv docs/bench/multi_gpu_spread.csv
	$(BIN)/slab bench dp plans/dp-350m.csv --gpus 1 --gpus 2 $(if $(filter-out 2 3,$(GPUS)),--gpus 4) --steps 60 --csv docs/bench/multi_gpu_dp.csv
else
	@echo "make bench-multi: needs a host of several GPUs (nvidia-smi lists $(GPUS))" >&2; exit 2
endif
else
bench-kernels bench-train bench-length bench-pack bench-multi:
	@echo "make $@: needs an NVIDIA GPU (nvidia-smi found none); make bench-cpu runs the CPU benchmarks" >&2; exit 2
endif

clean:
	rm -rf $(VENV) demo-out .slab
