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

# The suite on every CPython >= 3.8 that pyenv has (else the default
# python3) and on PyPy 3, each in its own venv (.venv-3.X, .venv-pypy), two
# at a time. One summary line per interpreter at the end; fails if any run
# failed.
define MATRIX
import concurrent.futures, glob, os, re, subprocess, sys, tempfile
import threading

def run(*command, timeout=600):
    return subprocess.run(command, capture_output=True, text=True,
                          timeout=timeout).stdout.strip()

def describe(python):
    return run(python, '-c', 'import platform as p; print('
               'p.python_implementation(), p.python_version())').split()

def venv_for(python, venv):
    # The stamp names the interpreter: a venv is reused only for the same
    # one, and only if newer than Makefile and setup.cfg.
    stamp = os.path.join(venv, '.stamp')
    newest = max(os.path.getmtime(f) for f in ('Makefile', 'setup.cfg'))
    if os.path.exists(stamp) and os.path.getmtime(stamp) >= newest:
        with open(stamp) as f:
            if f.read() == python:
                return
    subprocess.run(['rm', '-rf', venv], check=True)
    subprocess.run([python, '-m', 'venv', venv], check=True, timeout=600)
    subprocess.run([venv + '/bin/python', '-m', 'pip', 'install', '--quiet',
                    '--disable-pip-version-check', 'pytest'],
                   check=True, timeout=600)
    with open(stamp, 'w') as f:
        f.write(python)

pythons = {}
try:
    root = run('pyenv', 'root', timeout=60)
except OSError:
    root = ''
candidates = sorted(glob.glob(root + '/versions/3.*/bin/python3')) if root \
    else []
if not candidates:
    print('test-matrix: no pyenv CPython found; testing the default '
          '$(PYTHON) and pypy3 only')
    candidates = [run('sh', '-c', 'command -v $(PYTHON)')]
for python in candidates:
    implementation, version = describe(python)
    minor = tuple(int(n) for n in version.split('.')[:2])
    if implementation == 'CPython' and minor >= (3, 8):
        known = pythons.get(minor)  # The newest patch release of each.
        if not known or [int(n) for n in re.findall(r'\d+', version)] > [
                int(n) for n in re.findall(r'\d+', known[1])]:
            pythons[minor] = (python, version)
# CI has just run `make test` with this one: WSPBUS_MATRIX_SKIP=3.11.7.
done_by_make_test = 'CPython %s' % os.environ.get('WSPBUS_MATRIX_SKIP')
runs = [('CPython ' + version, python, '.venv-%d.%d' % minor)
        for minor, (python, version) in sorted(pythons.items())]
runs.append(('PyPy ' + describe('$(PYPY_VENV)/bin/python')[1] + ' ('
             + run('$(PYPY_VENV)/bin/python', '-c', 'import sys; '
                   'print("%d.%d.%d" % sys.pypy_version_info[:3])') + ')',
             None, '$(PYPY_VENV)'))
for name, python, venv in runs:
    if python and name != done_by_make_test:
        venv_for(python, venv)

def outcome(run):
    name, python, venv = run
    if name == done_by_make_test:
        return name, '.venv', 0, 'run by make test just before'
    # The run's output goes to a file, printed whole when the run ends.
    with tempfile.TemporaryFile('w+') as log:
        proc = subprocess.Popen([venv + '/bin/python', '-m', 'pytest', '-q',
                                 '-p', 'no:cacheprovider'],
                                stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            status = proc.wait(timeout=1800)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        output = log.read()
    with printing:
        print('== test-matrix: %s in %s\n%s' % (name, venv, output),
              end='', flush=True)
    lines = output.strip().splitlines()
    return name, venv, status, lines[-1] if lines else '(no output)'

# Two at a time: a run of the suite mostly waits on the processes it
# starts (a third of one core), and this halves the matrix's time.
printing = threading.Lock()
with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(outcome, runs))
print('== test-matrix summary')
for name, venv, status, summary in results:
    print('%-28s %-12s %s  %s' % (name, venv, 'PASS' if status == 0
                                   else 'FAIL', summary))
failed = [r for r in results if r[2] != 0]
print('test-matrix: %d of %d interpreters failed' % (len(failed),
                                                     len(results)))
sys.exit(1 if failed else 0)
endef
export MATRIX

.PHONY: test-matrix
test-matrix: $(PYPY_STAMP)
	@$(PYTHON) -c "$$MATRIX"

# Real systemd: builds (once, cached in /var/cache/wspbus_plugins) a Debian
# bookworm root with debootstrap, boots it with systemd-nspawn per scenario
# and drives the README's units with systemctl (pytest -m systemd). As
# root; installs debootstrap and systemd-nspawn when missing.
.PHONY: test-systemd
test-systemd: $(STAMP)
	@command -v debootstrap >/dev/null && \
	  command -v systemd-nspawn >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  debootstrap systemd-container; } || echo 'test-systemd: could not \
	  install debootstrap and systemd-container; the tests will skip.'
	$(VENV_PY) -m pytest -v -p no:cacheprovider -m systemd

.PHONY: stress
stress: $(STAMP)
	WSPBUS_STRESS=1 $(VENV_PY) -m pytest -q

# Mutation tests (not in CI, 3 to 6 minutes): each named one-line bug in a
# copy of the module must fail the tests that target it.
.PHONY: mutation
mutation: $(STAMP)
	$(VENV_PY) bench_wspbus_plugins.py --mutants $(MUTANTS)

.PHONY: demo
demo:
	$(PYTHON) -m wspbus_plugins --duration 12 --heartbeat 2

.PHONY: bench
bench:
	test -x $(BENCH_VENV)/bin/python || ( $(PYTHON) -m venv $(BENCH_VENV) \
	  && $(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check \
	     cherrypy==18.10.0 )
	$(BENCH_VENV)/bin/python bench_wspbus_plugins.py $(BENCH_ARGS)

# CherryPy's own test suite, run as its authors run it (tox.ini: the
# testing, routes_dispatcher and memcached_session extras, pytest.ini from
# the sdist, WEBTEST_INTERACTIVE=false), twice: as released, then with
# cherrypy.process.wspbus and .plugins replaced by this module. Fails when a
# test that passes as released fails here, unless README.md names it as a
# deliberate difference. Two pins keep the as-released run clean here:
# pytest < 8 (pytest 9 cannot load pytest-services under the ini's
# filterwarnings = error, and pytest 8.4 reports the ResourceWarnings of
# CherryPy's tests in a form the ini's ignore lines no longer match, so
# several fail) and cheroot < 11 (cheroot 11 answers the overflow connection of
# test_conn's test_queue_full instead of resetting it).
COMPAT_VENV = .venv-compat
COMPAT_STAMP = $(COMPAT_VENV)/.stamp
COMPAT_PY = $(CURDIR)/$(COMPAT_VENV)/bin/python
COMPAT_PIP = $(COMPAT_VENV)/bin/pip install --quiet --disable-pip-version-check
COMPAT_SWAP_DIR = $(CURDIR)/$(COMPAT_VENV)/swap
COMPAT_RUN = cd $(COMPAT_VENV)/lib/python3*/site-packages && \
  WEBTEST_INTERACTIVE=false timeout 1200 $(COMPAT_PY) -c "$$COMPAT_RUNNER"

# The swap, in the pytest process and in every Python process the suite
# starts (test_states runs its servers in child processes, and CherryPy's
# helper passes PYTHONPATH on to them): a sitecustomize on PYTHONPATH.
define COMPAT_SWAP
import sys

sys.path.insert(0, '$(CURDIR)')
import wspbus_plugins

del sys.path[0]
sys.modules['cherrypy.process.wspbus'] = wspbus_plugins
sys.modules['cherrypy.process.plugins'] = wspbus_plugins
endef
export COMPAT_SWAP

# Runs pytest (args after the mode and output file), checks that the bus
# is CherryPy's (released) or ours (swapped), and records each test's
# outcome (passed, failed, error, skipped, xfailed, xpassed) in a JSON file.
define COMPAT_RUNNER
import json, sys

mode, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
import cherrypy
import pytest

bus = type(cherrypy.engine).__module__
assert (bus == 'wspbus_plugins') == (mode == 'swapped'), (mode, bus)

outcomes = {}


class Record:
    def pytest_runtest_logreport(self, report):
        if hasattr(report, 'wasxfail'):
            outcome = 'xfailed' if report.skipped else 'xpassed'
        elif report.failed:
            outcome = 'failed' if report.when == 'call' else 'error'
        else:
            outcome = report.outcome
        if outcomes.get(report.nodeid, 'passed') == 'passed':
            outcomes[report.nodeid] = outcome


status = pytest.main(args, plugins=[Record()])
with open(out, 'w') as f:
    json.dump(outcomes, f, indent=1, sort_keys=True)
sys.exit(status)
endef
export COMPAT_RUNNER

# Compares the two outcome files; README.md names the deliberate
# differences by test id.
define COMPAT_COMPARE
import collections, json, re, sys

def load(path):
    with open(path) as f:
        return json.load(f)

released, swapped = load(sys.argv[1]), load(sys.argv[2])
for name, run in ('as released', released), ('on wspbus_plugins', swapped):
    counts = collections.Counter(run.values())
    print('CherryPy 18.10.0 suite %s: %s' % (name, ', '.join(
        '%d %s' % (counts[k], k) for k in sorted(counts))))
with open('README.md') as f:
    documented = set(re.findall(r'`(cherrypy/test/[^`]+::[^`]+)`', f.read()))
lost = sorted(t for t, o in released.items()
              if o == 'passed' and swapped.get(t) != 'passed')
for test in lost:
    print('%s: %s %s' % (
        'documented difference' if test in documented else 'REGRESSION',
        test, swapped.get(test, 'missing')))
for test in sorted(t for t in released if t not in lost and
                   released[t] != swapped.get(t)):
    print('other difference (not counted): %s %s as released, %s here' % (
        test, released[test], swapped.get(test, 'missing')))
regressions = [t for t in lost if t not in documented]
print('%d tests pass as released and not on this bus: %d documented in '
      'README.md, %d not.' % (len(lost), len(lost) - len(regressions),
                              len(regressions)))
sys.exit(1 if regressions else 0)
endef
export COMPAT_COMPARE

$(COMPAT_STAMP): Makefile
	rm -rf $(COMPAT_VENV)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PIP) 'pytest<8' 'cheroot<11' \
	  'cherrypy[testing,routes_dispatcher,memcached_session]==18.10.0'
	$(COMPAT_VENV)/bin/pip download --quiet --disable-pip-version-check \
	  --no-binary :all: --no-deps --dest $(COMPAT_VENV)/sdist cherrypy==18.10.0
	tar -xzOf $(COMPAT_VENV)/sdist/cherrypy-18.10.0.tar.gz \
	  cherrypy-18.10.0/pytest.ini > $(COMPAT_VENV)/pytest.ini
	cp $(COMPAT_VENV)/pytest.ini $(COMPAT_VENV)/lib/python3*/site-packages/
	touch $(COMPAT_STAMP)

.PHONY: compat
compat: $(COMPAT_STAMP)
	@echo '== CherryPy 18.10.0 test suite, as released'
	-$(COMPAT_RUN) released $(CURDIR)/$(COMPAT_VENV)/released.json \
	  > $(CURDIR)/$(COMPAT_VENV)/released.log 2>&1 </dev/null
	@grep -E '^=+ .* in [0-9.]+s' $(COMPAT_VENV)/released.log | tail -1
	@echo '== the same suite with wspbus_plugins as its bus and plugins'
	mkdir -p $(COMPAT_SWAP_DIR)
	echo "$$COMPAT_SWAP" > $(COMPAT_SWAP_DIR)/sitecustomize.py
	-export PYTHONPATH=$(COMPAT_SWAP_DIR) && $(COMPAT_RUN) swapped \
	  $(CURDIR)/$(COMPAT_VENV)/swapped.json \
	  > $(CURDIR)/$(COMPAT_VENV)/swapped.log 2>&1 </dev/null
	@grep -E '^=+ .* in [0-9.]+s' $(COMPAT_VENV)/swapped.log | tail -1
	@$(PYTHON) -c "$$COMPAT_COMPARE" $(COMPAT_VENV)/released.json \
	  $(COMPAT_VENV)/swapped.json

.PHONY: lint
lint: $(STAMP)
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check ruff vermin
	$(VENV)/bin/ruff check $(PY_FILES)
	$(VENV)/bin/ruff format --check $(PY_FILES)
	$(VENV)/bin/vermin -t=3.8- --violations --no-tips wspbus_plugins.py
	$(MAKE) --no-print-directory typecheck

# The module and README's typed program (extracted to build/typecheck/:
# pyright skips hidden directories) under mypy --strict, mypy 1.14.1 for a
# Python 3.8 target (mypy 2 refuses versions below 3.10) and pyright
# strict; settings in pyproject.toml. Pinned, so that a new checker release
# cannot fail CI; pyright fetches its node package from npm on first use
# (node must be installed).
MYPY38_VENV = .venv-mypy38
define TYPED_EXAMPLE
import re
with open('README.md') as f:
    blocks = re.findall(r'^```python\n(# typed_service\.py.*?)^```',
                        f.read(), re.M | re.S)
assert len(blocks) == 1, 'README.md: no single typed_service.py block'
with open('build/typecheck/typed_service.py', 'w') as f:
    f.write(blocks[0])
endef
export TYPED_EXAMPLE

.PHONY: typecheck
typecheck: $(STAMP)
	$(VENV_PY) -m pip install --quiet --disable-pip-version-check \
	  mypy==2.4.1 pyright==1.1.414
	test -x $(MYPY38_VENV)/bin/mypy || { $(PYTHON) -m venv $(MYPY38_VENV) \
	  && $(MYPY38_VENV)/bin/pip install --quiet \
	     --disable-pip-version-check mypy==1.14.1; }
	mkdir -p build/typecheck && $(VENV_PY) -c "$$TYPED_EXAMPLE"
	$(VENV)/bin/mypy wspbus_plugins.py build/typecheck/typed_service.py
	$(MYPY38_VENV)/bin/mypy --python-version 3.8 \
	  --cache-dir .mypy_cache/mypy-1.14.1 \
	  wspbus_plugins.py build/typecheck/typed_service.py
	$(VENV)/bin/pyright wspbus_plugins.py build/typecheck/typed_service.py

.PHONY: clean
clean:
	rm -rf $(VENV) $(BENCH_VENV) $(PYPY_VENV) .venv-compat .venv-3.* \
	  $(MYPY38_VENV) .mypy_cache \
	  .pytest_cache __pycache__ build *.egg-info
