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
	WSPBUS_STRESS=1 $(VENV_PY) -m pytest -q

.PHONY: demo
demo:
	$(PYTHON) -m wspbus_plugins --duration 12 --heartbeat 2

.PHONY: bench
bench:
	test -x $(BENCH_VENV)/bin/python || ( $(PYTHON) -m venv $(BENCH_VENV) \
	  && $(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check \
	     cherrypy==18.10.0 )
	$(BENCH_VENV)/bin/python bench_wspbus_plugins.py $(BENCH_ARGS)

# CherryPy's own test suite (shipped in its wheel), run twice: as released,
# then with cherrypy.process.wspbus and .plugins replaced by this module.
COMPAT_VENV = .venv-compat
COMPAT_STAMP = $(COMPAT_VENV)/.stamp
COMPAT_PY = $(CURDIR)/$(COMPAT_VENV)/bin/python
COMPAT_RUN = cd $(COMPAT_VENV)/lib/python3*/site-packages && timeout 1200
PYTEST_ARGS = -q -p no:cacheprovider cherrypy/test --junitxml
SWAP = import sys; sys.path.insert(0, '$(CURDIR)'); import wspbus_plugins \
  as w; sys.modules['cherrypy.process.wspbus'] = w; \
  sys.modules['cherrypy.process.plugins'] = w; import pytest; \
  sys.exit(pytest.main(sys.argv[1:]))
COMPARE = import sys, xml.etree.ElementTree as E; \
  o = lambda p: {c.get('classname') + '::' + c.get('name'): not [x for x \
  in c if x.tag in ('failure', 'error', 'skipped')] for c in \
  E.parse(p).iter('testcase')}; b, w = o(sys.argv[1]), o(sys.argv[2]); \
  lost = sorted(t for t in b if b[t] and not w.get(t)); \
  print('%d of %d tests pass on CherryPy; %d of them fail with \
  wspbus_plugins:' % (sum(b.values()), len(b), len(lost)), *lost, \
  sep='\n'); sys.exit(bool(lost))

$(COMPAT_STAMP):
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install --quiet --disable-pip-version-check \
	  cherrypy==18.10.0 'pytest<8' requests_toolbelt path.py objgraph
	touch $(COMPAT_STAMP)

.PHONY: compat
compat: $(COMPAT_STAMP)
	@echo '== CherryPy 18.10.0 test suite, as released'
	-$(COMPAT_RUN) $(COMPAT_PY) -m pytest \
	  $(PYTEST_ARGS) $(CURDIR)/$(COMPAT_VENV)/baseline.xml | tail -1
	@echo '== the same suite with wspbus_plugins as its bus and plugins'
	-$(COMPAT_RUN) $(COMPAT_PY) -c "$(SWAP)" \
	  $(PYTEST_ARGS) $(CURDIR)/$(COMPAT_VENV)/ours.xml | tail -1
	$(PYTHON) -c "$(COMPARE)" $(COMPAT_VENV)/baseline.xml \
	  $(COMPAT_VENV)/ours.xml

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
