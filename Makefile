# Set-up, tests and the demo on a fresh machine (python3, g++; nvcc optional).
# The extension is built with CUDA kernels when a CUDA toolkit is found (SIMCLR_EXT_CUDA=auto|0|1).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export MAX_JOBS ?= 2
# Without a visible GPU torch cannot detect the architecture to compile for: A100 (8.0) and H100 (9.0).
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: setup deps build emu test test-tsan fuzz lint demo bench clean gpu-wheels

deps:
	$(PYTHON) -m pip install $(TORCH_SPEC) -r requirements-dev.txt

build: deps
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .
	$(PYTHON) -m simclr_ext info

setup: build

# The CUDA kernels emulated on the CPU (tests/cuda_emu/, build/cuda_emu/): the cuda-emu device of the tests.
emu: build
	$(PYTHON) tests/cuda_emu/build.py

test: setup emu
	$(PYTHON) -m pytest -q -m "not tsan"

# The emulated CUDA kernels under ThreadSanitizer, and the checks that a missing barrier or mask is caught.
test-tsan: setup
	$(PYTHON) -m pytest -q -m tsan

# The long property-based fuzzing session (fresh random examples, many more than `make test`'s CI profile).
fuzz: setup
	SIMCLR_EXT_FUZZ=long $(PYTHON) -m pytest -q tests/test_fuzz.py

# ruff (Python, configured in pyproject.toml) and clang-format (C++ / CUDA, .clang-format), both pinned in
# requirements-dev.txt; .ci/run runs it after the tests.
lint: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -c 'import clang_format; clang_format.clang_format()' --dry-run --Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cpp/*.h' 'tests/cpp/*.cpp' 'tests/cuda_emu/*.h' 'tests/cuda_emu/*.cpp')

# The main job: SimCLR pretraining on the embedded default (scikit-learn's digits) and its evaluation,
# linear probe, kNN and 5-labels-per-class probe next to a random-init encoder.
demo: setup
	$(PYTHON) -m simclr_ext pretrain --out runs/demo --overwrite

bench: setup
	$(PYTHON) benchmarks/bench_ntxent.py --device cpu
	$(PYTHON) benchmarks/bench_losses.py --device cpu
	$(PYTHON) benchmarks/bench_augment.py --device cpu --threads 1,2 --profile

# Wheels the GPU machine lacks (kornia + kornia_rs for Python 3.12), into the git-ignored .whl/ that a
# device call carries (README, "GPU check"); checked against the device's package list.
gpu-wheels:
	$(PYTHON) benchmarks/gpu_wheels.py

clean:
	rm -rf build *.egg-info simclr_ext/*.so .pytest_cache
