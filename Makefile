# wspbus_plugins: run `make test` on a fresh clone; it builds .venv itself.
PYTHON ?= python3
VENV = .venv
VENV_PY = $(VENV)/bin/python
STAMP = $(VENV)/.stamp
BENCH_VENV = .venv-bench
PY_FILES = wspbus_plugins.py test_wspbus_plugins.py bench_wspbus_plugins.py

$(STAMP): Makefile setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check pytest
	touch $(STAMP)

.PHONY: test
test: $(STAMP)
	$(VENV_PY) -m pytest -q

# PyPy 3 from Debian's packages, installed when missing (CI runs as root).
PYPY_VENV = .venv-pypy
PYPY_STAMP = $(PYPY_VENV)/.stamp

$(PYPY_STAMP): Makefile setup.cfg
	command -v pypy3 >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pypy3 pypy3-venv; }
	pypy3 -m venv $(PYPY_VENV)
	$(PYPY_VENV)/bin/python -m pip install --quiet \
	  --disable-pip-version-check pytest
	touch $(PYPY_STAMP)

.PHONY: test-pypy
test-pypy: $(PYPY_STAMP)
	$(PYPY_VENV)/bin/python -m pytest -q

.PHONY: stress
stress: $(STAMP)
	WSPBUS_STRESS=1 $(VENV_PY) -m pytest -q -m stress

.PHONY: demo
demo:
	$(PYTHON) -m wspbus_plugins --duration 12 --heartbeat 2

.PHONY: bench
bench:
	test -x $(BENCH_VENV)/bin/python || ( $(PYTHON) -m venv $(BENCH_VENV) \
	  && $(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check \
	     cherrypy==18.10.0 )
	$(BENCH_VENV)/bin/python bench_wspbus_plugins.py $(BENCH_ARGS)

.PHONY: lint
lint: $(STAMP)
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check ruff vermin
	$(VENV)/bin/ruff check $(PY_FILES)
	$(VENV)/bin/ruff format --check $(PY_FILES)
	$(VENV)/bin/vermin -t=3.8- --violations --no-tips wspbus_plugins.py

.PHONY: clean
clean:
	rm -rf $(VENV) $(BENCH_VENV) $(PYPY_VENV) .venv-compat .pytest_cache \
	  __pycache__ build *.egg-info
