# qwen3x: the two commands of README.md, and the GPU-machine command.
#
#   make run    set up .venv (torch, transformers, qwen3x built with its CUDA extension where nvcc is
#               found) and run the main job: the benchmark suite on a GPU, the parity demo without one
#   make test   the test suite on transformers 5.24.0, its transformers-facing files also on 5.18.0
#               (the last release before 5.24 renamed the models' cache argument, and the GPU
#               machine's 5.17's API) and on 4.57.6, and the GPU tests on the CPU emulator; GPU tests
#               skip without a GPU; two steps at a time (TEST_JOBS)
#   make gpu OUT=dir   on a GPU machine with torch installed (no network needed): build in place,
#               run the tests (GPU ones included), compute-sanitizer memcheck on the kernel tests,
#               and the benchmark suite (BENCH_ARGS=--quick for a smoke run); logs and result
#               rows into OUT, then a summary. Per-step time limits: GPU_TEST_S, MEMCHECK_S,
#               BENCH_S; GPU_TESTS picks test files (e.g. GPU_TESTS=tests/test_kernels_gpu.py);
#               GPU_SAMPLE=N runs N parametrizations of each GPU test (default 3; 0 = all of them);
#               wheels under .whl/ (carried, e.g. Liger-Kernel) are installed first; a smoke run
#               of each Hopper (wgmma) mainloop in its own process comes before the tests, and a
#               failing one is switched to mma.sync for the later steps (wgmma_smoke.log says so);
#               then tests/error_path_probe.py (do bad arguments raise or crash; error_probe.log);
#               after the tests, benchmarks.parity (the patched 30B-A3B model against the fp32 truth
#               over PARITY_SEEDS seeds, routing flips counted; parity.log); after the benchmarks,
#               kernel_times (KERNEL_TIMES_RUNS, per-kernel device times from torch's profiler;
#               kernel_times.txt), the model, ncu (first: what the next change needs most), then
#               flushab (FLUSH_AB_ARGS cases timed again after the old write-only L2 flush, rows in
#               OUT/dirty: what the harness's own write-back costs short calls); STEPS="tests bench"
#               runs only the steps named (default, in this order: probe tests parity memcheck
#               racecheck bench kernel_times model ncu flushab; on gVisor machines memcheck,
#               racecheck and ncu only say they cannot run there); model: the whole-model targets
#               (MODEL_ARGS, rows in OUT/model); ncu: Nsight Compute sections of NCU_RUNS' kernels (ncu.txt); suite (not in
#               the default STEPS): the whole suite, model included, rows in OUT/suite (make gpu-suite)

SHELL       := /bin/bash
PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.14.1
TF5         ?= transformers==5.24.0
TF457       ?= transformers==4.57.6
# (tests only: what a device_map or offloading puts on every layer of a model, tests/test_patch.py)
ACCELERATE  ?= accelerate==1.15.0
# transformers 5.18 beside the 5.24 install (same dependencies): the cache argument's old name
TF518       ?= transformers==5.18.0
TF518_DIR   ?= $(VENV)/tf518
# the files that meet transformers (patching, references, benchmarks, the patched model on the emulated
# kernels and on a GPU), run again on 5.18 and on 4.57; the others (kernel models, the emulator,
# packaging, the registry, SASS) do not import it
TF_TESTS    ?= tests/test_patch.py tests/test_benchmarks.py tests/test_emulator_ops.py tests/test_reference.py \
               tests/test_testing.py $(sort $(wildcard tests/test_*_gpu.py))
# transformers 4.57 with the hub / tokenizers releases it needs, beside the 5.x install
TF457_DIR   ?= $(VENV)/tf457
TF457_PKGS  ?= $(TF457) 'huggingface_hub>=0.34,<1.0' 'tokenizers>=0.22,<=0.23.0' requests urllib3 idna certifi charset-normalizer
PYTEST_ARGS ?= -q
OUT         ?= gpu-run
VPY          = $(VENV)/bin/python

.PHONY: run test setup build prebuilt prebuilt-ampere gpu-prep test-emulator test-tf5 test-rest test-tf518 test-tf457 test-emulated-gpu gpu gpu-check gpu-perf gpu-sanitize gpu-suite gpu-ampere demo info clean

run: setup
	$(VPY) -m benchmarks

# The six steps, TEST_JOBS at a time (each is one pytest process that keeps about one core busy:
# the emulator's runs and builds are single-threaded), torch on one thread each (two steps that
# each run two threads on two cores wait on each other's spinning threads); each step's output is
# printed when it ends, and every step runs even when another fails (-k). TEST_JOBS=1 runs them
# one after another with torch's default threads.
TEST_JOBS   ?= 2
TEST_STEPS   = test-emulator test-emulated-gpu test-rest test-tf5 test-tf457 test-tf518  # (the longest first)
test: setup
	$(if $(filter 1,$(TEST_JOBS)),,OMP_NUM_THREADS=1) $(MAKE) --no-print-directory -k -j$(TEST_JOBS) \
	    --output-sync=target $(TEST_STEPS)

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml setup.py CMakeLists.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q $(TORCH) numpy pytest safetensors pybind11 ninja cmake setuptools wheel $(TF5) $(ACCELERATE)
	$(VPY) -m pip install -q --no-deps nvidia-cutlass==4.2.0.0  # CUTLASS/CuTe headers only (tests/cutlass_check)
	$(VPY) -m pip install -q --no-deps --target $(TF457_DIR) $(TF457_PKGS)
	$(VPY) -m pip install -q --no-deps --target $(TF518_DIR) $(TF518)
	$(MAKE) build
	touch $@

build:
	MAX_JOBS=$${MAX_JOBS:-2} $(VPY) -m pip install --no-build-isolation --no-deps -e .
	$(VPY) -m qwen3x.info

# the kernels' own source on the CPU (tests/emulator; its ~30 runners' builds are most of its time)
test-emulator:
	$(VPY) -m pytest $(PYTEST_ARGS) tests/test_emulator.py

# transformers 5.24: the files that meet transformers, and (test-rest) every other file but the emulator's
test-tf5:
	$(VPY) -m pytest $(PYTEST_ARGS) $(TF_TESTS)

test-rest:
	$(VPY) -m pytest $(PYTEST_ARGS) tests --ignore=tests/test_emulator.py $(addprefix --ignore=,$(TF_TESTS))

test-tf518:
	PYTHONPATH=$(TF518_DIR) $(VPY) -m pytest $(PYTEST_ARGS) $(TF_TESTS)

test-tf457:
	PYTHONPATH=$(TF457_DIR) $(VPY) -m pytest $(PYTEST_ARGS) $(TF_TESTS)

# The GPU test files themselves on the CPU: the glue and kernels through tests/emulator
# (tests/emulator/gpu_tests.py), every parametrization with sizes up to 300 (~6 minutes on two
# cores); EMULATE_ARGS="--emulate-max-size 1100" for a wider sweep.
EMULATE_ARGS ?= --emulate-max-size 300
EMULATED_GPU_TESTS = tests/test_attention_gpu.py tests/test_kernels_gpu.py tests/test_moe_gpu.py tests/test_model_gpu.py \
                     tests/test_moe_experts_gpu.py
test-emulated-gpu:
	$(VPY) -m pytest $(PYTEST_ARGS) --emulate-gpu $(EMULATE_ARGS) $(EMULATED_GPU_TESTS)

demo info:
	$(VPY) -m qwen3x.$@

# Each step has a time limit (seconds) so that one device call (10 minutes, build included) returns
# with its logs; the full benchmark suite needs a call of its own (python3 -m benchmarks --model --out DIR;
# if a limit cuts it short, the same command with --resume in the next call runs what it did not).
BUILD_S     ?= 240
GPU_TEST_S  ?= 210
# (compute-sanitizer's start-up with torch took most of a 45 s limit on 2026-11-26)
MEMCHECK_S  ?= 150
RACECHECK_S ?= 90
BENCH_S     ?= 150
# model: the whole-model targets (benchmarks/targets.py), patched against unpatched transformers, rows in
# OUT/model (MODEL_ARGS narrows them: the full set takes 3-4 minutes with Liger)
MODEL_S     ?= 240
MODEL_ARGS  ?= --targets --ops model_prefill,model_decode
FLUSHAB_S   ?= 60
# suite: `python -m benchmarks --model` (every op suite and the whole-model benchmark: issue 3's
# "whole suite in 10 minutes"); SUITE_ARGS=--resume in a second call goes on where a limit cut it
SUITE_S     ?= 560
SUITE_ARGS  ?=
KERNEL_TIMES_S ?= 60
# The L2-flush A/B (benchmarks/NOTES.md): the cases whose gap to the copy rate suggested it, with the
# flush every run used before 2026-11-26's change; compare with the same cases' default rows.
FLUSH_AB_ARGS ?= --l2-flush dirty --ops rms_norm,qk_norm_rope --shapes tokens=16384 --providers qwen3x
FLUSH_AB_MOE_ARGS ?= --l2-flush dirty --ops moe_layer --shapes model=Qwen3-30B-A3B,tokens=1 --providers qwen3x
KERNEL_TIMES_ARGS ?= --ops moe_layer --shapes tokens=1
# Each quoted entry one invocation of benchmarks.kernel_times (KERNEL_TIMES_S each), into one file.
KERNEL_TIMES_RUNS ?= "$(KERNEL_TIMES_ARGS)"
# ncu: Nsight Compute's counters for the kernels whose time the notes cannot explain from outside
# (benchmarks/NOTES.md): prefill attention at 350-420 of the tensor cores' ~990 TFLOP/s (the third
# run ruled out L2 traffic, shared-memory bandwidth and the proxy fence), batch-1 decode attention
# at 2-3x cuDNN's time (its split-KV merge), rms_norm at 88% of copy at hidden 4096 (Liger 96%),
# the MoE decode layer at 45% of its weight bandwidth, the MoE prefill expert GEMMs (wgmma, fence
# with copies in flight). Each entry: "<launches per call of the kernels matching the regex>
# <kernel name regex> <op> <shape filter>"; benchmarks.kernel_times --plain makes 5 warm-up calls
# and one profiled call after the L2 flush, and ncu skips the warm-up's launches.
NCU_S       ?= 150
# (Each name is matched anywhere in the function name, ncu's default --kernel-name-base: no namespace.)
NCU_RUNS    ?= "1 attention_fwd attention_prefill model=Qwen3-4B,seqlen=4096" \
               "1 attention_fwd attention_decode model=Qwen3-4B,batch=1,context=1024" \
               "1 rms_norm rms_norm tokens=16384,hidden=4096" "4 moe_ moe_layer model=Qwen3-30B-A3B,tokens=1" \
               "2 moe_expert_gemm moe_layer model=Qwen3-30B-A3B,tokens=16384" \
               "1 qk_norm_rope qk_norm_rope model=Qwen3-4B,tokens=16384"
NCU_SECTIONS ?= --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
                --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats
GPU_TESTS   ?= tests --ignore=tests/test_kernel_models.py --ignore=tests/test_wgmma_smoke.py \
               --ignore=tests/test_emulator.py --ignore=tests/test_emulator_ops.py  # CPU-only (CI runs them)
GPU_SAMPLE  ?= 3
PROBE_S     ?= 180
PARITY_S    ?= 120
PARITY_SEEDS ?= 3
# pytest-xdist (where installed, as on the device image) runs the tests in worker processes, so that
# a test that kills its process (2026-11-26: argument checks with a number in the message did)
# costs that test, not the rest of the step: the report names it ("worker crashed").
GPU_TEST_WORKERS ?= $(shell $(PYTHON) -c "import xdist" 2>/dev/null && echo "-n 4")
# memcheck: the first small parametrization of every GPU kernel test (compute-sanitizer is slow)
MEMCHECK_TESTS ?= tests/test_kernels_gpu.py tests/test_attention_gpu.py tests/test_moe_gpu.py \
                  tests/test_moe_experts_gpu.py
# (test_prefill_mainloops: its wgmma cases, the only ones that reach the Hopper kernels at these sizes)
MEMCHECK_K  ?= not 65536 and not 4097 and not 4096 and not 8192 and not 8193 and not 16384 and not 32768 \
               and not 131072 and not long and not 20000 and not (mainloops and mma_sync)
# compute-sanitizer instruments only qwen3x's kernels (every one is in namespace qwen3x, so its mangled
# name holds the word): torch's own kernels in the tests' setup and references run at full speed.
# The 2026-11-26 runs' memcheck never reached a verdict in 45 s with everything instrumented; on
# 2026-11-27 (H200) the probe came back empty (see SANITIZER_PROBE_S), memcheck ran 36 tests in its 60 s
# without a verdict, and racecheck's three tests passed in 36 s but its summary missed the 40 s limit.
# SANITIZER_FILTER=auto (default) probes it once per run, before the sanitizer steps, into
# OUT/sanitizer_filter.txt: empty (everything instrumented) where this compute-sanitizer refuses the
# option, or where it does not instrument qwen3x's kernels with it (tests/sanitizer_filter_probe.py:
# initcheck must see that script's uninitialized read; a filter matching nothing would make every
# verdict clean for free). Any other value is used as given (empty: no filter).
SANITIZER_FILTER ?= auto
SANITIZER_KNS    = --kernel-name kns=qwen3x
# The probe's own output and exit codes go to OUT/sanitizer_probe.log (9 from initcheck = the filter
# works; 124 = SANITIZER_PROBE_S ran out: compute-sanitizer's start-up with torch is slow, and the
# 2026-11-27 probe, then limited to 60 s, may have timed out rather than found the filter wanting).
SANITIZER_PROBE_S ?= 120
SANITIZER_PROBE  = compute-sanitizer $(SANITIZER_KNS) true >$(OUT)/sanitizer_probe.log 2>&1 && { timeout \
                   $(SANITIZER_PROBE_S) compute-sanitizer --tool initcheck $(SANITIZER_KNS) --error-exitcode 9 \
                   $(PYTHON) tests/sanitizer_filter_probe.py >>$(OUT)/sanitizer_probe.log 2>&1; rc=$$?; \
                   echo "initcheck probe exit $$rc" >>$(OUT)/sanitizer_probe.log; [ $$rc = 9 ]; } && echo "$(SANITIZER_KNS)"
# racecheck (shared-memory hazards): the attention kernel on a prefill pass and a split-KV decode
# (on H100 the prefill case runs the wgmma mainloop; mma_sync-2 keeps the sm_80 prefill loop checked;
# a batch-1 decode merges in a cluster by default there, so test_cluster_combine's 1k case, which
# runs the L2 merge and then the cluster one, keeps both merges checked)
RACECHECK_K ?= test_prefill and 128-16-8-1-True or test_decode and 1-1024-32-8-1-True \
               or test_prefill_mainloops and mma_sync-2 or test_cluster_combine and 1-32-8-1-1024-True
# Wheels carried to a machine without internet (e.g. Liger-Kernel, see the device notes): installed
# into WHEEL_SITE, which every step then finds on PYTHONPATH.
WHEELS      := $(wildcard .whl/*.whl)
WHEEL_SITE  ?= /tmp/qwen3x-wheels
ifneq ($(WHEELS),)
export PYTHONPATH := $(WHEEL_SITE)$(if $(PYTHONPATH),:$(PYTHONPATH))
endif

# The GPU machine's build, made here (no GPU needed): `make prebuilt` builds qwen3x._C for
# PREBUILT_ARCHS against PREBUILT_TORCH (the GPU machine's torch, installed on its own into
# PREBUILT_TORCH_DIR, a 530 MB download) into PREBUILT, which a device call carries; `make gpu`
# there uses it instead of building (about 2 of a lease's 15 minutes) when it was built from the
# tree's own sources against that machine's exact torch and loads there (cmake/prebuilt.py), and
# builds as before otherwise.
PREBUILT       ?= .prebuilt
PREBUILT_TORCH ?= torch==2.11.0
PREBUILT_ARCHS ?= 9.0a
PREBUILT_TORCH_DIR ?= build/prebuilt-torch
PREBUILT_S     ?= 60
prebuilt:
	[ -d $(PREBUILT_TORCH_DIR)/torch-$(word 2,$(subst ==, ,$(PREBUILT_TORCH))).dist-info ] \
	    || $(VPY) -m pip install -q --no-deps --upgrade --target $(PREBUILT_TORCH_DIR) $(PREBUILT_TORCH)
	rm -rf build/prebuilt-wheel $(PREBUILT)
	PYTHONPATH=$(PREBUILT_TORCH_DIR) QWEN3X_BUILD_CUDA=1 QWEN3X_CUDA_ARCHS="$(PREBUILT_ARCHS)" \
	    MAX_JOBS=$${MAX_JOBS:-2} $(VPY) -m pip wheel -q --no-build-isolation --no-deps -w build/prebuilt-wheel .
	QWEN3X_CUDA_ARCHS="$(PREBUILT_ARCHS)" $(VPY) cmake/prebuilt.py pack build/prebuilt-wheel/qwen3x-*.whl $(PREBUILT)

# make gpu-ampere's build (AMPERE_ARCHS, below) made here the same way, into PREBUILT_AMPERE.
PREBUILT_AMPERE ?= .prebuilt-ampere
prebuilt-ampere:
	$(MAKE) prebuilt PREBUILT=$(PREBUILT_AMPERE) PREBUILT_ARCHS="$(AMPERE_ARCHS)"

# Everything a GPU lease carries, made here before the first call: both prebuilt modules and the
# wheels the GPU machine lacks (Liger-Kernel, a peer in the benchmarks) under .whl/, which this
# checkout's git then ignores. The calls: carry [".whl", ".prebuilt", ".prebuilt-ampere"].
GPU_WHEELS ?= liger-kernel==0.8.5
gpu-prep: prebuilt prebuilt-ampere
	mkdir -p .git/info && (grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude)
	$(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

# The wgmma smoke step (tests/wgmma_smoke.py) leaves QWEN3X_*_MAINLOOP=mma_sync in mainloop.env for
# a Hopper mainloop that failed (and QWEN3X_PDL=0 if the decode chains answer differently with
# programmatic dependent launch, and QWEN3X_SMOKE_FAILED=<settings> for an A/B candidate such as
# QWEN3X_ATTENTION_OVERLAP=1 that failed or hung: its tests and providers skip), so that one broken
# kernel does not take every later test with it.
LOAD_MAINLOOP_ENV = set -a; [ -f $(OUT)/mainloop.env ] && . $(OUT)/mainloop.env; set +a;

# The steps after the build, the info line and the wgmma smoke run: all by default; a GPU lease
# too short for all of them names the ones it wants (e.g. STEPS="tests bench"). A step left out
# is a no-op (its log is absent from OUT, and the summary skips it).
STEPS       ?= probe tests parity memcheck racecheck bench kernel_times model ncu flushab
step = $(if $(filter $(1),$(STEPS)),,exit 0;)  # a recipe line runs in a shell of its own
# gVisor machines (kernel 4.4.0; the device notes' KINDS.md, 2026-11-04): compute-sanitizer refuses
# the device and ncu reads no counters, so their steps (and the sanitizer filter probe) only say
# so there: up to 6 of a lease's 15 minutes go to the steps that can run.
GVISOR := $(shell uname -r 2>/dev/null | grep -q '^4\.4\.0' && echo 1)
# (no comma in the message: it would end $(if)'s first branch)
profiler_step = $(call step,$(1)) $(if $(GVISOR),echo "$(1) skipped: gVisor (kernel $(shell uname -r)) \
    where compute-sanitizer and ncu do not run" | tee $(OUT)/$(1).log; exit 0;)

gpu:
	mkdir -p $(OUT)
	$(if $(WHEELS),$(PYTHON) -m pip install -q --no-index --no-deps --no-compile --target $(WHEEL_SITE) $(WHEELS))
	set -o pipefail; { if [ -d $(PREBUILT) ] && timeout $(PREBUILT_S) $(PYTHON) cmake/prebuilt.py use $(PREBUILT); then \
	    QWEN3X_BUILD_CUDA=0 timeout $(PREBUILT_S) $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e . \
	    && echo "qwen3x: the prebuilt module, no build"; else timeout $(BUILD_S) $(PYTHON) -m pip install \
	    --no-build-isolation --no-deps -e .; fi; } 2>&1 | tee $(OUT)/build.log
	$(PYTHON) -m qwen3x.info | tee $(OUT)/info.txt
	rm -f $(OUT)/mainloop.env; $(PYTHON) tests/wgmma_smoke.py $(OUT)/mainloop.env | tee $(OUT)/wgmma_smoke.log
	$(call step,probe) timeout $(PROBE_S) $(PYTHON) tests/error_path_probe.py 2>&1 | tee $(OUT)/error_probe.log
	$(call step,tests) $(LOAD_MAINLOOP_ENV) set -o pipefail; timeout $(GPU_TEST_S) $(PYTHON) -m pytest -q -rs \
	    $(GPU_TEST_WORKERS) --gpu-sample $(GPU_SAMPLE) $(GPU_TESTS) 2>&1 \
	    | tee $(OUT)/tests.log; echo "tests exit $$?" >> $(OUT)/tests.log
	$(call step,parity) $(LOAD_MAINLOOP_ENV) set -o pipefail; timeout $(PARITY_S) $(PYTHON) -m benchmarks.parity \
	    --seeds $(PARITY_SEEDS) 2>&1 | tee $(OUT)/parity.log; echo "parity exit $$?" >> $(OUT)/parity.log
	$(if $(GVISOR),,$(if $(filter memcheck racecheck,$(STEPS)),$(if $(filter auto,$(SANITIZER_FILTER)),{ $(SANITIZER_PROBE); }, \
	    echo "$(SANITIZER_FILTER)") > $(OUT)/sanitizer_filter.txt || true))
	$(call profiler_step,memcheck) $(LOAD_MAINLOOP_ENV) set -o pipefail; timeout $(MEMCHECK_S) compute-sanitizer --tool memcheck \
	    $$(cat $(OUT)/sanitizer_filter.txt) --error-exitcode 1 $(PYTHON) -m pytest -q -x -m gpu --gpu-sample 1 $(MEMCHECK_TESTS) -k "$(MEMCHECK_K)" 2>&1 \
	    | tail -n 30 | tee $(OUT)/memcheck.log; echo "memcheck exit $$? (filter: '$$(cat $(OUT)/sanitizer_filter.txt)')" >> $(OUT)/memcheck.log
	$(call profiler_step,racecheck) $(LOAD_MAINLOOP_ENV) set -o pipefail; timeout $(RACECHECK_S) compute-sanitizer --tool racecheck \
	    $$(cat $(OUT)/sanitizer_filter.txt) --error-exitcode 1 $(PYTHON) -m pytest -q -x -m gpu tests/test_attention_gpu.py -k "$(RACECHECK_K)" 2>&1 \
	    | tail -n 30 | tee $(OUT)/racecheck.log; echo "racecheck exit $$? (filter: '$$(cat $(OUT)/sanitizer_filter.txt)')" >> $(OUT)/racecheck.log
	$(call step,bench) $(LOAD_MAINLOOP_ENV) set -o pipefail; timeout $(BENCH_S) $(PYTHON) -m benchmarks --out $(OUT) \
	    $(BENCH_ARGS) 2>&1 | tee $(OUT)/bench.log; echo "benchmarks exit $$?" >> $(OUT)/bench.log
	$(call step,kernel_times) $(LOAD_MAINLOOP_ENV) for args in $(KERNEL_TIMES_RUNS); do \
	    timeout $(KERNEL_TIMES_S) $(PYTHON) -m benchmarks.kernel_times $$args 2>&1; \
	    echo "kernel_times $$args: exit $$?"; done > $(OUT)/kernel_times.txt
	$(call step,model) $(LOAD_MAINLOOP_ENV) set -o pipefail; timeout $(MODEL_S) $(PYTHON) -m benchmarks \
	    --out $(OUT)/model $(MODEL_ARGS) 2>&1 | tee $(OUT)/model.log; echo "model exit $$?" >> $(OUT)/model.log
	$(call profiler_step,ncu) $(LOAD_MAINLOOP_ENV) for run in $(NCU_RUNS); do set -- $$run; \
	    timeout $(NCU_S) ncu --clock-control none --kernel-name "regex:.*$$2.*" --launch-skip $$((5 * $$1)) \
	    --launch-count $$1 $(NCU_SECTIONS) $(PYTHON) -m benchmarks.kernel_times --plain --calls 1 --ops $$3 \
	    --shapes $$4 --providers qwen3x 2>&1; echo "ncu $$3 $$4 exit $$?"; done > $(OUT)/ncu.txt
	$(call step,suite) $(LOAD_MAINLOOP_ENV) set -o pipefail; timeout $(SUITE_S) $(PYTHON) -m benchmarks --model \
	    --out $(OUT)/suite $(SUITE_ARGS) 2>&1 | tee -a $(OUT)/suite.log; echo "suite exit $$?" >> $(OUT)/suite.log
	$(call step,flushab) $(LOAD_MAINLOOP_ENV) set -o pipefail; (timeout $(FLUSHAB_S) $(PYTHON) -m benchmarks \
	    --out $(OUT)/dirty $(FLUSH_AB_ARGS) && timeout $(FLUSHAB_S) $(PYTHON) -m benchmarks --out $(OUT)/dirty \
	    $(FLUSH_AB_MOE_ARGS)) 2>&1 | tail -n 60 > $(OUT)/flushab.log; echo "flushab exit $$?" >> $(OUT)/flushab.log
	@echo "== summary ($(OUT)) =="; tail -n 1 $(OUT)/build.log; cat $(OUT)/wgmma_smoke.log
	@for f in error_probe tests parity memcheck racecheck bench model suite flushab; do [ -f $(OUT)/$$f.log ] && grep -E \
	    "error path probe|passed|failed| exit |skipped: gVisor" $(OUT)/$$f.log | tail -n 3; done; \
	    [ -f $(OUT)/ncu.txt ] && grep "^ncu .* exit" $(OUT)/ncu.txt; \
	    [ -f $(OUT)/kernel_times.txt ] && tail -n 1 $(OUT)/kernel_times.txt; true

# A 15-minute device lease (the machine's start, 1-2 minutes, included) as up to three calls on one
# machine (the later ones find the first's build and only relink), in the order of what a lease cut
# short must keep: correctness, then the numbers, then the sanitizers. Measured on 2026-11-27
# (H200): the build, info and smoke runs took about 2.5 minutes of a call, the sampled tests 30 s,
# `--targets` 45 s; the sanitizer steps and their probe can take 6 minutes. Give each later call a
# timeout inside the device time left (the tool's status says it). `make prebuilt` here first, and
# carry .prebuilt, takes the build out of the lease (see PREBUILT above).
#   make gpu-check OUT=/tmp/r PYTHON=python3    a sample of the kernel tests
#   make gpu-perf OUT=/tmp/r2 PYTHON=python3    the targets' cases of the kernels changed since the last
#                                              run (rows), the MoE decode layer kernel by kernel, the
#                                              30B-A3B whole-model targets against unpatched
#                                              transformers, ncu, the flush A/B
#   make gpu-sanitize OUT=/tmp/r3 PYTHON=python3 compute-sanitizer memcheck and racecheck on a reduced
#                                              sweep (skipped on gVisor machines, which cannot run it)
# (test_model_gpu.py: the patched models on the GPU, autocast, the fallbacks, assisted generation:
# sessions 18-24's layer changes, which no GPU has run; the fourth run's gpu-check left it out)
GPU_CHECK_TESTS ?= tests/test_attention_gpu.py tests/test_moe_gpu.py tests/test_moe_experts_gpu.py \
                   tests/test_kernels_gpu.py tests/test_model_gpu.py
# (--no-precompile: few compiling providers there, and a 150 s step has no room for worker start-up;
# hf_eager: issue 4's "qk_norm_rope >= 4x the HF eager chain", which the fourth run could not judge,
# and the eager peers of the other ops, about 90 rows more)
# (kernel_times: the profiler works where ncu cannot read counters, as on gVisor machines: the MoE
# decode layer's kernels one by one, its 45% of the weight bandwidth at 1 token to be placed; with
# --timeline also one graph replay's kernels on a time line: the gaps between them, and the
# graph launch's share, which is the suite row minus the span; and batch-1 decode attention beside
# cuDNN's and flash's on the same time line, then again with only the code warm (--warm-code: the
# same call on other tensors between the flush and the replay; if ours falls far more than cuDNN's,
# the decode path's instruction fetch is the cost, benchmarks/NOTES.md "What batch-1 decode
# spends"), then with code and K/V both in L2)
GPU_PERF_KERNEL_TIMES_RUNS ?= "--ops moe_layer --shapes model=Qwen3-30B-A3B,tokens=1 --providers qwen3x --timeline" \
    "--ops attention_decode --shapes model=Qwen3-4B,batch=1,context=1024 --providers qwen3x,qwen3x_l2,sdpa_cudnn,sdpa_flash --timeline" \
    "--ops attention_decode --shapes model=Qwen3-4B,batch=1,context=1024 --providers qwen3x,sdpa_cudnn --timeline --warm-code" \
    "--ops attention_decode --shapes model=Qwen3-4B,batch=1,context=1024 --providers qwen3x,sdpa_cudnn --timeline --warm-l2"
GPU_PERF_ARGS   ?= --targets --ops attention_prefill,attention_decode,moe_gate,moe_layer,moe_route,rms_norm,qk_norm_rope \
                   --providers qwen3x,qwen3x_no_pdl,qwen3x_no_fence,qwen3x_cluster,qwen3x_l2,qwen3x_serial,sdpa_flash,sdpa_cudnn,hf_grouped_mm,hf_eager,liger,torch_linear \
                   --no-precompile
gpu-check:
	$(MAKE) gpu STEPS="tests" GPU_SAMPLE=1 GPU_TESTS="$(GPU_CHECK_TESTS)" GPU_TEST_S=160 BUILD_S=200
gpu-sanitize:
	$(MAKE) gpu STEPS="memcheck racecheck" MEMCHECK_S=150 RACECHECK_S=75 BUILD_S=120
gpu-perf:
	$(MAKE) gpu STEPS="bench kernel_times model ncu flushab" BENCH_ARGS="$(GPU_PERF_ARGS)" BENCH_S=150 \
	    KERNEL_TIMES_RUNS='$(GPU_PERF_KERNEL_TIMES_RUNS)' KERNEL_TIMES_S=40 \
	    MODEL_ARGS="--targets --ops model_prefill,model_decode --shapes model=Qwen3-30B-A3B --providers qwen3x,hf_eager" \
	    MODEL_S=90 FLUSHAB_S=25 NCU_S=30 BUILD_S=120

# The Ampere build on a Hopper GPU (make gpu-ampere OUT=/tmp/r4 PYTHON=python3): a copy of the tree
# built for "8.0+PTX" (sm_80 machine code and compute_80 PTX) into a directory of its own; the H100
# cannot run sm_80 machine code, so its driver compiles the PTX, and the kernels run the code an A100
# build runs (mma.sync mainloops, no programmatic dependent launch, no clusters: the host sees no
# sm_90a code and chooses as it would on an A100). No A100 has run qwen3x; this runs that code on a
# GPU at all. The tests find the copy first on PYTHONPATH (the step checks that they do: build
# archs without sm_90a), a sample of GPU_CHECK_TESTS, in AMPERE_TEST_S. Nothing of the sm_90a build
# in place is touched.
AMPERE_DIR    ?= /tmp/qwen3x-ampere
AMPERE_ARCHS  ?= 8.0+PTX
AMPERE_BUILD_S ?= 200
AMPERE_TEST_S ?= 200
AMPERE_CHECK_S ?= 150  # (its first calls are where the driver compiles each kernel family's PTX)
gpu-ampere:
	mkdir -p $(OUT)
	rm -rf $(AMPERE_DIR) && mkdir -p $(AMPERE_DIR)/src
	tar --exclude=./build --exclude=./.git --exclude=./.venv --exclude=./.whl --exclude=./$(PREBUILT) --exclude=./$(PREBUILT_AMPERE) --exclude='./python/qwen3x/_C*.so' --exclude=./python/qwen3x/_C_torch_version.txt \
	    -cf - . | tar -xf - -C $(AMPERE_DIR)/src
	set -o pipefail; cd $(AMPERE_DIR)/src && export QWEN3X_CUDA_ARCHS="$(AMPERE_ARCHS)" && { if [ -d $(CURDIR)/$(PREBUILT_AMPERE) ] \
	    && timeout $(PREBUILT_S) $(PYTHON) cmake/prebuilt.py use $(CURDIR)/$(PREBUILT_AMPERE); then QWEN3X_BUILD_CUDA=0 \
	    timeout $(PREBUILT_S) $(PYTHON) -m pip install -q --no-build-isolation --no-deps --no-compile --target $(AMPERE_DIR)/site . \
	    && cp python/qwen3x/_C.abi3.so python/qwen3x/_C_torch_version.txt $(AMPERE_DIR)/site/qwen3x/ \
	    && echo "qwen3x: the prebuilt module, no build"; else QWEN3X_BUILD_CUDA=1 timeout $(AMPERE_BUILD_S) $(PYTHON) -m pip \
	    install --no-build-isolation --no-deps --no-compile --target $(AMPERE_DIR)/site .; fi; } 2>&1 | tail -n 20 \
	    | tee $(OUT)/ampere_build.log
	set -o pipefail; cd $(AMPERE_DIR)/src && PYTHONPATH=$(AMPERE_DIR)/site:$(PYTHONPATH) timeout $(AMPERE_CHECK_S) \
	    $(PYTHON) tests/ampere_check.py \
	    $(AMPERE_DIR)/site 2>&1 | tee $(OUT)/ampere_info.txt
	set -o pipefail; cd $(AMPERE_DIR)/src && PYTHONPATH=$(AMPERE_DIR)/site:tests:$(PYTHONPATH) \
	    timeout $(AMPERE_TEST_S) $(PYTHON) -m pytest -q -rs -p no:cacheprovider $(GPU_TEST_WORKERS) --gpu-sample 1 \
	    $(GPU_CHECK_TESTS) 2>&1 | tee $(OUT)/ampere_tests.log; echo "ampere tests exit $$?" >> $(OUT)/ampere_tests.log
	@echo "== summary ($(OUT)) =="; tail -n 1 $(OUT)/ampere_info.txt; grep -E "passed|failed|exit" $(OUT)/ampere_tests.log | tail -n 3

# The whole suite in one call of its own (build, smoke runs, then `python -m benchmarks --model`,
# rows in OUT/suite, its `wall time:` line in suite.log): make gpu-suite OUT=/tmp/full PYTHON=python3;
# if SUITE_S cuts it short, the same again with SUITE_ARGS=--resume (the build is kept on a warm machine).
gpu-suite:
	$(MAKE) gpu STEPS="suite" BUILD_S=200

clean:
	rm -rf build $(PREBUILT) $(PREBUILT_AMPERE) python/qwen3x/_C*.so python/qwen3x/_C_torch_version.txt *.egg-info python/*.egg-info
