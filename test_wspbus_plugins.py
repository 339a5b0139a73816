"""Tests for wspbus_plugins: the bus, every plugin, and the demo.

Unit tests run in-process; what depends on the operating system (signals,
fork, execv, setuid, inotify, PID-file locks, systemd's socket) runs in
real child processes, each bounded by TIMEOUT and killed in a finally.
Run one area with ``-k``, e.g. ``.venv/bin/python -m pytest -k PIDFile``.
"""

import ast
import asyncio
import atexit
import ctypes
import errno
import importlib.util
import json
import logging
import os
import pathlib
import pty
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import unittest.mock
import zipfile

import pytest

import wspbus_plugins as wp

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 30  # One generous bound for anything we wait for.
with open(wp.__file__) as _f:
    SOURCE = _f.read()
IS_ROOT = hasattr(os, 'geteuid') and os.geteuid() == 0

needs_fork = pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs fork')
needs_root = pytest.mark.skipif(not IS_ROOT, reason='needs root')
linux_only = pytest.mark.skipif(
    not sys.platform.startswith('linux'), reason='Linux only (inotify, /proc)'
)


def _dual_stack():
    """Tell whether a new socket bound to '::' takes IPv4 too (Linux's)."""
    try:
        with socket.socket(socket.AF_INET6) as sock:
            return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except (OSError, AttributeError):  # No IPv6 here.
        return False


needs_dual_stack = pytest.mark.skipif(
    not _dual_stack(), reason="needs IPv6, '::' taking IPv4 (bindv6only=0)"
)


def _can_unshare_net():
    """Tell whether a child may run in a network namespace of its own."""
    if not (IS_ROOT and shutil.which('unshare') and shutil.which('ip')):
        return False
    probe = subprocess.run(['unshare', '-n', 'true'], stderr=subprocess.PIPE)
    return probe.returncode == 0


needs_netns = pytest.mark.skipif(
    not _can_unshare_net(), reason='needs root, unshare and ip (a netns)'
)

# A run started as a background job of a script (`make test &`) inherits
# Ctrl+C ignored, and so would every child: the tests that send SIGINT
# need the interpreter's own handler, which a handler here passes on.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- Helpers ------------------------------------------------------------------


class HardExit(Exception):
    """Raised by the fake os._exit, so the test process survives."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


class Recorder:
    """Records listener calls and log lines."""

    def __init__(self):
        self.calls = []
        self.logs = []
        self.lock = threading.Lock()

    def listener(self, name, result=None):
        def record(*args, **kwargs):
            with self.lock:
                self.calls.append(
                    (name, args, kwargs) if args or kwargs else name
                )
            return result

        record.__name__ = name
        return record

    def log(self, msg, level):
        with self.lock:
            self.logs.append((msg, level))

    def messages(self, level=None):
        return [m for m, lv in self.logs if level is None or lv == level]


def wait_until(predicate, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError('timed out waiting for ' + what)
        time.sleep(0.01)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # A zombie is dead for our purposes.
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return True


def read_pid(path):
    with open(path) as f:
        return int(f.read())


@pytest.fixture
def fake_exit(monkeypatch):
    statuses = []

    def _exit(status):
        statuses.append(status)
        raise HardExit(status)

    monkeypatch.setattr(os, '_exit', _exit)
    return statuses


@pytest.fixture
def bus(fake_exit):
    """A fresh Bus whose log lines are recorded; exited afterwards."""
    fresh = wp.Bus()
    fresh.recorder = Recorder()
    fresh.subscribe('log', fresh.recorder.log)
    yield fresh
    if fresh.state in (wp.states.STARTED, wp.states.STOPPED):
        try:
            fresh.exit()
        except HardExit:
            pass
    atexit.unregister(fresh._clean_exit)


@pytest.fixture
def child(tmp_path):
    """spawn(code, *args): run `code` in a child Python; killed at the end.

    spawn.track(pid) adds a daemon's PID to kill as well.
    """
    procs, tracked = [], []

    def spawn(
        code,
        *args,
        python_args=(),
        env=None,
        cwd=None,
        script=None,
        stdin=subprocess.DEVNULL,
        executable=sys.executable,
    ):
        path = script or tmp_path / ('child%d.py' % len(procs))
        path.write_text(textwrap.dedent(code))
        environ = dict(os.environ, PYTHONPATH=HERE)
        environ.update(env or {})
        proc = subprocess.Popen(
            [executable, *python_args, str(path), *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(cwd or tmp_path),
            env=environ,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    spawn.track = tracked.append
    spawn.procs = procs
    try:
        yield spawn
    finally:
        for pid in tracked + [p.pid for p in procs if p.poll() is None]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for proc in procs:  # And what they forked without a new session.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        for proc in procs:
            try:
                proc.communicate(timeout=TIMEOUT)
            except (subprocess.TimeoutExpired, ValueError):
                pass


def finish(proc, timeout=TIMEOUT):
    """Wait for `proc`; return (status, stdout, stderr)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def lines_of(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


# -- Module -------------------------------------------------------------------


@pytest.mark.parametrize('name', wp.__all__)
def test_module_every_public_name_is_documented(name):
    obj = getattr(wp, name)
    if isinstance(obj, type) or callable(obj):
        assert (obj.__doc__ or '').strip(), name
        return
    # An instance (bus, states): its class and its assignment say what it is.
    assert (type(obj).__doc__ or '').strip(), name
    body = ast.parse(SOURCE).body
    for node, after in zip(body, body[1:]):
        targets = getattr(node, 'targets', [getattr(node, 'target', None)])
        if any(getattr(t, 'id', None) == name for t in targets):
            assert isinstance(getattr(after, 'value', None), ast.Constant)
            assert isinstance(after.value.value, str), name
            return
    raise AssertionError('no assignment of %s' % name)


def test_module_imports_only_the_standard_library():
    tree = ast.parse(SOURCE)
    stdlib = getattr(sys, 'stdlib_module_names', None)
    if stdlib is None:
        pytest.skip('sys.stdlib_module_names needs Python 3.10')
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split('.')[0]
            assert top in stdlib or top == '_systemrestart', name


def test_module_import_pulls_in_no_heavy_module():
    # Measured after our own light imports: on PyPy threading alone
    # brings in re and traceback.
    code = (
        'import atexit, errno, os, sys, threading, time, warnings; '
        'before = set(sys.modules); import wspbus_plugins; '
        'print(sorted(set(sys.modules) - before))'
    )
    out = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=TIMEOUT,
        check=True,
    )
    added = set(ast.literal_eval(out.stdout))
    heavy = {
        'ctypes',
        'subprocess',
        'logging',
        'argparse',
        'pwd',
        'grp',
        'socket',
        're',
        'traceback',
        'select',
        'struct',
        'typing',
        'signal',  # It imports enum: the module uses _signal instead.
        'enum',
    }
    assert not added & heavy


def test_module_import_never_loads_typing():
    # The annotations name typing only for checkers (TYPE_CHECKING), so a
    # bare interpreter (-S: no site, which may import it) stays without;
    # nor enum, unless threading brought it (PyPy's does, through re).
    code = (
        'import sys, threading; had_enum = "enum" in sys.modules; '
        'import wspbus_plugins; '
        'print(sorted({"typing", "enum"} & set(sys.modules) - '
        '({"enum"} if had_enum else set())))'
    )
    out = subprocess.run(
        [sys.executable, '-S', '-c', code],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=TIMEOUT,
        check=True,
    )
    assert out.stdout.split() == ['[]']


def test_mutation_targets_still_exist_in_the_module():
    # make mutation (not in CI) edits the module's text: each edit's lines
    # must still occur exactly once, or the mutant cannot be applied.
    spec = importlib.util.spec_from_file_location(
        'bench', os.path.join(HERE, 'bench_wspbus_plugins.py')
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mutants = bench.parse_mutants()
    assert len(mutants) >= 28
    for name, _, edits in mutants:
        for old, _ in edits:
            assert SOURCE.count(old) == 1, (name, old)


def test_module_version_and_all_follow_file_order():
    assert re.match(r'^\d+\.\d+\.\d+$', wp.__version__)
    positions = [
        re.search(r'^(class |def )?%s\b' % name, SOURCE, re.M).start()
        for name in wp.__all__
    ]
    assert positions == sorted(positions)


# -- States and ChannelFailures -----------------------------------------------


@pytest.mark.parametrize(
    'name', ['STOPPED', 'STARTING', 'STARTED', 'STOPPING', 'EXITING']
)
def test_states_repr(name):
    assert repr(getattr(wp.states, name)) == 'states.' + name
    assert wp.Bus.states is wp.states


def test_channelfailures_collects_and_joins():
    failures = wp.ChannelFailures()
    assert not failures
    errors = [ValueError('a'), KeyError('b')]
    for error in errors:
        try:
            raise error
        except Exception:
            failures.handle_exception()
    assert failures
    assert failures.get_instances() == errors
    failures.get_instances().clear()  # A copy.
    assert str(failures) == "ValueError('a')\nKeyError('b')"
    assert repr(failures) == str(failures)
    failures.handle_exception()  # Nothing is being handled: no None kept.
    assert failures.get_instances() == errors


# -- Bus ----------------------------------------------------------------------


def test_bus_builtin_channels_and_initial_state(bus):
    assert set(bus.listeners) == {
        'start',
        'stop',
        'exit',
        'graceful',
        'log',
        'main',
    }
    assert bus.state is wp.states.STOPPED
    assert bus.execv is False
    assert wp.bus.state is wp.states.STOPPED


def test_bus_priorities_and_subscription_order(bus):
    rec = Recorder()
    late = rec.listener('late')
    late.priority = 90
    bus.subscribe('x', late)
    for name in ('a', 'b', 'c'):
        bus.subscribe('x', rec.listener(name))
    bus.subscribe('x', rec.listener('first'), priority=10)
    bus.subscribe('x', rec.listener('d'))
    bus.publish('x')
    assert rec.calls == ['first', 'a', 'b', 'c', 'd', 'late']


@pytest.mark.parametrize('bad', ['hi', float('nan'), True])
def test_bus_priority_that_is_not_a_number_is_named(bus, bad):
    with pytest.raises(ValueError, match=re.escape(': %r (a number)' % bad)):
        bus.subscribe('x', print, priority=bad)
    assert 'x' not in bus.listeners or not bus.listeners['x']
    bus.publish('x')  # Still works.


@pytest.mark.parametrize('attribute', ['hi', None, float('nan'), 'mock'])
def test_bus_priority_attribute_that_is_not_a_number_is_ignored(
    bus, attribute
):
    # The attribute is the callback's, not an argument to the bus: a mock
    # has every attribute (CherryPy's test_wait_publishes_periodically).
    rec = Recorder()
    if attribute == 'mock':
        odd = unittest.mock.MagicMock(
            side_effect=lambda: rec.calls.append('odd')
        )
    else:
        odd = rec.listener('odd')
        odd.priority = attribute
    bus.subscribe('x', rec.listener('late'), priority=51)
    bus.subscribe('x', odd)
    bus.subscribe('x', rec.listener('early'), priority=49)
    bus.publish('x')
    assert rec.calls == ['early', 'odd', 'late']


def test_bus_explicit_priority_beats_attribute(bus):
    rec = Recorder()
    one, two = rec.listener('one'), rec.listener('two')
    one.priority = 1
    bus.subscribe('x', one, priority=99)
    bus.subscribe('x', two)
    bus.publish('x')
    assert rec.calls == ['two', 'one']
    assert bus._priorities[('x', one)] == 99


def test_bus_resubscribe_updates_priority_only(bus):
    rec = Recorder()
    one, two = rec.listener('one'), rec.listener('two')
    bus.subscribe('x', one)
    bus.subscribe('x', two)
    bus.subscribe('x', one, priority=60)
    bus.publish('x')
    assert rec.calls == ['two', 'one']
    assert len(bus.listeners['x']) == 2


def test_bus_decorator_subscribe_returns_the_function(bus):
    @bus.subscribe('x', priority=5)
    def listener():
        return 'done'

    assert listener() == 'done'
    assert bus.publish('x') == ['done']
    assert bus._priorities[('x', listener)] == 5


def test_bus_unsubscribe(bus):
    rec = Recorder()
    one = rec.listener('one')
    bus.subscribe('x', one)
    bus.unsubscribe('x', one)
    bus.unsubscribe('x', one)  # Twice: ignored.
    bus.unsubscribe('nowhere', one)  # Unknown channel: ignored.
    assert bus.publish('x') == []
    assert ('x', one) not in bus._priorities


def test_bus_publish_returns_results_and_passes_arguments(bus):
    bus.subscribe('x', lambda a, b=0: a + b)
    bus.subscribe('x', lambda a, b=0: a * b)
    assert bus.publish('x', 3, b=4) == [7, 12]
    assert bus.publish('no such channel', 1) == []


def test_bus_publish_runs_every_listener_and_raises_failures(bus):
    rec = Recorder()

    def broken():
        raise ValueError('boom')

    bus.subscribe('x', rec.listener('before'), priority=1)
    bus.subscribe('x', broken, priority=2)
    bus.subscribe('x', rec.listener('after'), priority=3)
    with pytest.raises(wp.ChannelFailures) as info:
        bus.publish('x')
    assert rec.calls == ['before', 'after']
    [error] = info.value.get_instances()
    assert isinstance(error, ValueError) and str(error) == 'boom'
    [(msg, level)] = [r for r in bus.recorder.logs if 'Error in' in r[0]]
    assert level == 40
    assert msg.startswith("Error in 'x' listener %r" % (broken,))
    assert 'Traceback' in msg and 'ValueError: boom' in msg


def test_bus_keyboardinterrupt_propagates_at_once(bus):
    rec = Recorder()

    def interrupt():
        raise KeyboardInterrupt

    bus.subscribe('x', interrupt, priority=1)
    bus.subscribe('x', rec.listener('later'), priority=2)
    with pytest.raises(KeyboardInterrupt):
        bus.publish('x')
    assert rec.calls == []


@pytest.mark.parametrize(
    'code, failed_before, expected',
    [
        (0, True, 1),
        (None, True, 1),
        (3, True, 3),
        (0, False, 0),
    ],
)
def test_bus_systemexit_code_forced_after_failure(
    bus, code, failed_before, expected
):
    def broken():
        raise ValueError

    def leave():
        raise SystemExit(code)

    if failed_before:
        bus.subscribe('x', broken, priority=1)
    bus.subscribe('x', leave, priority=2)
    with pytest.raises(SystemExit) as info:
        bus.publish('x')
    assert (info.value.code or 0) == expected


def test_bus_state_transitions_and_log_messages(bus):
    seen = []
    for channel in ('start', 'stop', 'exit'):
        bus.subscribe(channel, lambda c=channel: seen.append((c, bus.state)))
    bus.start()
    assert bus.state is wp.states.STARTED
    bus.stop()
    assert bus.state is wp.states.STOPPED
    bus.start()
    bus.exit()
    assert bus.state is wp.states.EXITING
    assert seen == [
        ('start', wp.states.STARTING),
        ('stop', wp.states.STOPPING),
        ('start', wp.states.STARTING),
        ('stop', wp.states.STOPPING),
        ('exit', wp.states.EXITING),
    ]
    assert bus.recorder.messages() == [
        'Bus STARTING',
        'Bus STARTED',
        'Bus STOPPING',
        'Bus STOPPED',
        'Bus STARTING',
        'Bus STARTED',
        'Bus STOPPING',
        'Bus STOPPED',
        'Bus EXITING',
        'Bus EXITED',
    ]


def test_bus_started_channel_only_after_every_start_listener(bus):
    rec = Recorder()
    bus.subscribe('start', rec.listener('start'), priority=1000)
    bus.subscribe('started', lambda: rec.calls.append(bus.state))
    bus.start()
    assert rec.calls == ['start', wp.states.STARTED]


def test_bus_start_failure_exits_and_ends_process_on_main_thread(
    bus, fake_exit
):
    rec = Recorder()

    def broken():
        raise ValueError('no socket')

    bus.subscribe('start', broken)
    bus.subscribe('started', rec.listener('started'))
    bus.subscribe('stop', rec.listener('stop'))
    bus.subscribe('exit', rec.listener('exit'))
    with pytest.raises(HardExit):
        bus.start()
    assert fake_exit == [70]
    assert rec.calls == ['stop', 'exit']
    assert bus.state is wp.states.EXITING
    assert (
        'Shutting down due to error in start listener:'
        in bus.recorder.messages(40)[1]
    )
    assert bus.recorder.messages(50) == [
        'Start failed (ValueError: no socket); exiting with status 70.'
    ]


def test_bus_start_failure_off_main_thread_keeps_host_alive(bus, fake_exit):
    def broken():
        raise ValueError('no socket')

    bus.subscribe('start', broken)
    errors = []

    def run():
        try:
            bus.start()
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(TIMEOUT)
    assert fake_exit == []
    [error] = errors
    assert isinstance(error, wp.ChannelFailures)
    assert bus.state is wp.states.EXITING
    [critical] = bus.recorder.messages(50)
    assert critical == (
        'The bus failed to start on thread %r (ValueError: '
        'no socket) and has exited; the host process goes '
        'on.' % thread.name
    )


def test_bus_exit_listener_failure_ends_process_with_70(bus, fake_exit):
    def broken():
        raise ValueError

    bus.subscribe('exit', broken)
    bus.start()
    with pytest.raises(HardExit):
        bus.exit()
    assert fake_exit == [70]
    assert any('status 70' in m for m in bus.recorder.messages(50))


def test_bus_exit_runs_once_from_listener_thread_and_signal(bus):
    rec = Recorder()
    bus.subscribe('stop', rec.listener('stop'))

    def exit_again():
        rec.calls.append('exit')
        bus.exit()  # From a listener.
        os.kill(os.getpid(), signal.SIGUSR2)  # From a signal handler.
        thread = threading.Thread(target=bus.exit)  # From another thread.
        thread.start()
        thread.join(TIMEOUT)

    previous = signal.signal(signal.SIGUSR2, lambda *a: bus.exit())
    try:
        bus.subscribe('exit', exit_again)
        bus.start()
        bus.exit()
        bus.exit()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert rec.calls == ['stop', 'exit']
    assert bus.recorder.messages().count('Bus EXITING') == 1


def test_bus_exit_from_many_threads_at_once_runs_listeners_once(bus):
    rec = Recorder()
    bus.subscribe('exit', rec.listener('exit'))
    bus.subscribe('stop', lambda: time.sleep(0.05))
    bus.start()
    threads = [threading.Thread(target=bus.exit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert rec.calls == ['exit']


def test_bus_restart_sets_execv_and_exits(bus):
    bus.start()
    bus.restart()
    assert bus.execv is True
    assert bus.state is wp.states.EXITING


def test_bus_restart_is_ignored_while_exiting(bus):
    bus.subscribe('exit', bus.restart)
    bus.start()
    bus.exit()
    assert bus.execv is False
    assert (
        'Restart ignored: the bus is already exiting.'
        in bus.recorder.messages()
    )


def test_bus_graceful_calls_during_graceful_merge_into_one_more(bus):
    running, runs = [], []

    def listener():
        assert not running, 'graceful listeners overlapped'
        running.append(1)
        runs.append(1)
        if len(runs) == 1:
            bus.graceful()
            bus.graceful()
        running.pop()

    bus.subscribe('graceful', listener)
    bus.start()
    bus.graceful()
    assert len(runs) == 2
    assert bus.recorder.messages().count('Bus graceful') == 2


def test_bus_wait_on_several_states_wakes_at_once(bus):
    ticks = []
    bus.subscribe('tick', lambda: ticks.append(1))
    timer = threading.Timer(0.1, bus.start)
    timer.start()
    # A 60 s interval: only the condition variable can wake it in time.
    bus.wait(
        [wp.states.STARTED, wp.states.EXITING], interval=60, channel='tick'
    )
    timer.join(TIMEOUT)
    assert bus.state in (wp.states.STARTED,)
    assert ticks == []


@pytest.mark.parametrize('on', ['main thread', 'another thread'])
def test_bus_wait_wakes_within_50ms_of_the_change(bus, on):
    # The old 0.1 s poll would take 50 ms on average: a median under 50 ms
    # over five tries needs a real wake-up, even on a busy machine.
    delays, changed_at = [], []

    def change():
        time.sleep(0.02)
        changed_at.append(time.monotonic())
        bus.state = wp.states.EXITING

    def wait():
        bus.wait(wp.states.EXITING, interval=60)
        delays.append(time.monotonic() - changed_at[-1])

    for _ in range(5):
        bus.state = wp.states.STOPPED
        changer = threading.Thread(target=change)
        changer.start()
        if on == 'main thread':
            wait()
        else:
            waiter = threading.Thread(target=wait)
            waiter.start()
            waiter.join(TIMEOUT)
        changer.join(TIMEOUT)
    assert sorted(delays)[2] < 0.05, delays


def test_bus_wait_publishes_channel_every_interval(bus):
    ticks = []
    bus.subscribe('tick', lambda: ticks.append(1))
    bus.subscribe('tick', lambda: len(ticks) >= 3 and bus.start())
    bus.wait(wp.states.STARTED, interval=0.01, channel='tick')
    assert len(ticks) >= 3


def test_bus_start_with_callback(bus):
    called = []
    thread = bus.start_with_callback(
        lambda *a, **k: called.append((bus.state, a, k)),
        args=(1, 2),
        kwargs={'k': 3},
    )
    thread.join(TIMEOUT)
    assert called == [(wp.states.STARTED, (1, 2), {'k': 3})]
    assert thread.name.startswith('Bus Callback ')


def test_bus_start_with_callback_skips_call_on_failed_start(bus):
    called = []

    def broken():
        raise ValueError

    bus.subscribe('start', broken)
    with pytest.raises(HardExit):
        bus.start_with_callback(called.append, args=(1,))
    for thread in threading.enumerate():
        if thread.name.startswith('Bus Callback'):
            thread.join(TIMEOUT)
    assert called == []


def test_bus_block_returns_after_exit_listeners_run_elsewhere(bus):
    order = []

    def slow_exit():
        time.sleep(0.4)
        order.append('exit listener done')

    bus.subscribe('exit', slow_exit)
    bus.start()
    # A daemon thread runs the exit: block() does not join it (#1942).
    exiter = threading.Timer(0.05, bus.exit)
    exiter.daemon = True
    exiter.start()
    bus.block(interval=0.01)
    order.append('block returned')
    assert order == ['exit listener done', 'block returned']


def test_bus_block_joins_non_daemon_threads(bus):
    order = []

    def worker():
        bus.wait(wp.states.EXITING)
        time.sleep(0.3)
        order.append('worker done')

    bus.start()
    threading.Thread(target=worker, name='worker').start()
    threading.Timer(0.05, bus.exit).start()
    bus.block(interval=0.01)
    order.append('block returned')
    assert order == ['worker done', 'block returned']
    assert 'Waiting for thread worker.' in bus.recorder.messages()


def test_bus_block_exits_on_keyboardinterrupt(bus):
    def interrupt():
        raise KeyboardInterrupt

    bus.subscribe('main', interrupt)
    bus.start()
    bus.block(interval=0.01)
    assert bus.state is wp.states.EXITING
    assert 'Keyboard Interrupt: shutting down bus' in bus.recorder.messages()


def test_bus_block_exits_and_reraises_systemexit(bus):
    def leave():
        raise SystemExit(4)

    bus.subscribe('main', leave)
    bus.start()
    with pytest.raises(SystemExit):
        bus.block(interval=0.01)
    assert bus.state is wp.states.EXITING
    assert 'SystemExit raised: shutting down bus' in bus.recorder.messages()


def test_bus_block_reexecutes_after_restart(bus, monkeypatch):
    calls = []
    monkeypatch.setattr(bus, '_do_execv', lambda: calls.append('execv'))
    bus.start()
    threading.Timer(0.05, bus.restart).start()
    bus.block(interval=0.01)
    assert calls == ['execv']


def test_bus_failing_log_listener_goes_to_stderr(bus, capsys):
    def broken(msg, level):
        raise RuntimeError('disk full')

    bus.subscribe('log', broken)
    bus.log('hello')
    err = capsys.readouterr().err
    assert 'a log listener failed' in err and 'hello' in err


def test_bus_log_traceback_appends_the_exception(bus):
    try:
        raise KeyError('lost')
    except KeyError:
        bus.log('oops', level=40, traceback=True)
    [msg] = bus.recorder.messages(40)
    assert msg.startswith('oops\nTraceback') and "KeyError: 'lost'" in msg


def test_bus_concurrent_publish_subscribe_unsubscribe(bus):
    steady_calls = []
    errors = []
    stop = threading.Event()
    bus.subscribe('x', lambda n: steady_calls.append(n))

    def publisher(base):
        n = base
        try:
            while not stop.is_set():
                bus.publish('x', n)
                n += 1
        except Exception as exc:
            errors.append(exc)
        published.append((base, n))

    def churner():
        try:
            while not stop.is_set():
                funcs = [lambda n: None for _ in range(5)]
                for func in funcs:
                    bus.subscribe('x', func, priority=random.random() * 100)
                for func in funcs:
                    bus.unsubscribe('x', func)
        except Exception as exc:
            errors.append(exc)

    published = []
    threads = [
        threading.Thread(target=publisher, args=(i * 10**9,)) for i in range(3)
    ]
    threads += [threading.Thread(target=churner) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join(TIMEOUT)
    assert errors == []
    expected = sum(end - base for base, end in published)
    assert len(steady_calls) == expected > 0


def test_bus_atexit_warning_and_exit_when_left_running(child):
    proc = child("""
        import wspbus_plugins as wp
        bus = wp.Bus()
        bus.subscribe('exit', lambda: print('exit ran', flush=True))
        bus.start()
    """)
    status, out, err = finish(proc)
    assert status == 0
    assert 'exit ran' in out
    assert (
        'RuntimeWarning: The main thread is exiting, but the Bus is in '
        'the states.STARTED state' in err
    )


def test_bus_block_in_child_exits_promptly_on_exit_from_thread(child):
    proc = child("""
        import threading, wspbus_plugins as wp
        bus = wp.Bus()
        bus.subscribe('exit', lambda: print('exit ran', flush=True))
        bus.start()
        threading.Timer(0.1, bus.exit).start()
        bus.block(interval=60)   # Only a prompt wake-up ends this in time.
        print('block returned', flush=True)
    """)
    status, out, err = finish(proc)
    assert (status, out) == (0, 'exit ran\nblock returned\n'), err


# -- Bus: re-execution --------------------------------------------------------

RESTART_CHILD = """
    import json, os, sys, threading
    import wspbus_plugins as wp
    log = os.environ['RESTART_LOG']
    leak = os.environ.get('LEAK_FD')
    leaked = bool(leak) and os.path.exists('/proc/self/fd/' + leak)
    with open(log, 'a') as f:
        f.write(json.dumps([os.getpid(), sys.argv[1:], sys.flags.dev_mode,
                            sys.flags.optimize, os.getcwd(), leaked]) + '\\n')
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: print(msg, file=sys.stderr))
    with open(log) as f:
        runs = len(f.readlines())
    if runs == 1:
        leak = os.open(os.devnull, os.O_RDONLY)
        os.set_inheritable(leak, True)
        os.environ['LEAK_FD'] = str(leak)
        os.chdir('/')  # restart() must go back to the start-up directory.
        bus.subscribe('started', bus.restart)
    else:
        bus.subscribe('started', bus.exit)
    bus.start()
    bus.block()
"""


@pytest.mark.parametrize('how', ['module', 'script'])
def test_bus_restart_reexecutes_same_command(child, tmp_path, how):
    log = tmp_path / 'restarts.log'
    package = tmp_path / 'pkg'
    package.mkdir()
    (package / '__init__.py').write_text('')
    (package / 'app.py').write_text(textwrap.dedent(RESTART_CHILD))
    target = ['-m', 'pkg.app'] if how == 'module' else ['pkg/app.py']
    proc = subprocess.Popen(
        [sys.executable, '-X', 'dev', '-O'] + target + ['a', 'b c'],
        cwd=str(tmp_path),
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=HERE, RESTART_LOG=str(log)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child.procs.append(proc)
    status, out, err = finish(proc)
    assert status == 0, err
    import json

    runs = [json.loads(line) for line in lines_of(log)]
    assert len(runs) == 2, err
    first, second = runs
    assert first[0] == second[0]  # Same PID: execv.
    assert second[1] == ['a', 'b c']  # Same arguments.
    assert second[2] is True and second[3] == 1  # Same -X dev and -O.
    assert second[4] == str(tmp_path)  # Start-up directory.
    assert second[5] is False  # Inherited fd closed.
    assert 'Re-spawning' in err


def test_bus_restart_of_dash_c_fails_clearly(tmp_path):
    code = textwrap.dedent("""
        import wspbus_plugins as wp
        bus = wp.Bus()
        bus.subscribe('started', bus.restart)
        bus.start()
        bus.block()
    """)
    proc = subprocess.run(
        [sys.executable, '-c', code],
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=HERE),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert "RuntimeError: Cannot reconstruct command from '-c'" in proc.stderr


@pytest.mark.parametrize(
    'orig_argv, expected',
    [
        (
            ['py', '-X', 'dev', '-m', 'pkg.app', 'a'],
            ['-X', 'dev', '-m', 'pkg.app', 'a'],
        ),
        (['py', '-OO', 'app.py', '-c'], ['-OO', 'app.py', '-c']),
        (['py', '-Wdefault', 'app.py'], ['-Wdefault', 'app.py']),
    ],
)
def test_bus_get_true_argv_from_orig_argv(monkeypatch, orig_argv, expected):
    monkeypatch.setattr(sys, 'orig_argv', orig_argv, raising=False)
    assert wp.Bus._get_true_argv() == [sys.executable] + expected


@pytest.mark.parametrize(
    'orig_argv',
    [['py', '-c', 'x'], ['py', '-Ec', 'x'], ['py'], ['py', '-'], ['py', '-i']],
)
def test_bus_get_true_argv_refuses_code_it_cannot_rerun(
    monkeypatch, orig_argv
):
    monkeypatch.setattr(sys, 'orig_argv', orig_argv, raising=False)
    with pytest.raises(RuntimeError, match='Cannot reconstruct command'):
        wp.Bus._get_true_argv()


def test_bus_get_true_argv_fallback_without_orig_argv(monkeypatch):
    monkeypatch.delattr(sys, 'orig_argv', raising=False)
    monkeypatch.setattr(sys, 'argv', ['/srv/app.py', 'x'])
    main = type(sys)('__main__')
    main.__spec__ = None
    monkeypatch.setitem(sys.modules, '__main__', main)
    argv = wp.Bus._get_true_argv()
    assert argv[0] == sys.executable and argv[-2:] == ['/srv/app.py', 'x']
    main.__spec__ = type('Spec', (), {'name': 'pkg.__main__'})()
    assert wp.Bus._get_true_argv()[-3:] == ['-m', 'pkg', 'x']
    main.__spec__ = None
    monkeypatch.setattr(sys, 'argv', ['-c'])
    with pytest.raises(RuntimeError, match="'-c'"):
        wp.Bus._get_true_argv()


def test_bus_extend_pythonpath(monkeypatch):
    monkeypatch.setattr(sys, 'path', [''] + sys.path[1:])
    env = {'PYTHONPATH': '/lib'}
    wp.Bus._extend_pythonpath(env)
    assert env['PYTHONPATH'] == '.' + os.pathsep + '/lib'
    wp.Bus._extend_pythonpath(env)
    assert env['PYTHONPATH'] == '.' + os.pathsep + '/lib'
    monkeypatch.setattr(sys, 'path', ['/app'] + sys.path[1:])
    env = {}
    wp.Bus._extend_pythonpath(env)
    assert env == {}


class Execv(Exception):
    pass


@pytest.fixture
def recorded_execv(monkeypatch):
    calls = []

    def execv(path, args):
        calls.append((path, args))
        raise Execv

    monkeypatch.setattr(os, 'execv', execv)
    monkeypatch.setattr(
        sys, 'orig_argv', ['py', 'app.py', 'a b'], raising=False
    )
    monkeypatch.setattr(wp.Bus, '_set_cloexec', lambda self: None)
    monkeypatch.setattr(os, 'chdir', lambda path: None)
    monkeypatch.setattr(os, 'environ', dict(os.environ))
    return calls


def test_bus_do_execv_reexecutes_the_interpreter(bus, recorded_execv):
    with pytest.raises(Execv):
        bus._do_execv()
    assert recorded_execv == [
        (sys.executable, [sys.executable, 'app.py', 'a b'])
    ]
    assert (
        'Re-spawning %s app.py a b' % sys.executable in bus.recorder.messages()
    )


def test_bus_do_execv_quotes_arguments_on_windows(
    bus, recorded_execv, monkeypatch
):
    monkeypatch.setattr(wp, '_WINDOWS', True)
    with pytest.raises(Execv):
        bus._do_execv()
    assert recorded_execv[0][1] == [
        '"%s"' % sys.executable,
        '"app.py"',
        '"a b"',
    ]


def test_bus_do_execv_raises_systemrestart_on_java(
    bus, recorded_execv, monkeypatch
):
    class SystemRestart(Exception):
        pass

    module = type(sys)('_systemrestart')
    module.SystemRestart = SystemRestart
    monkeypatch.setitem(sys.modules, '_systemrestart', module)
    monkeypatch.setattr(wp, '_JYTHON', True)
    with pytest.raises(SystemRestart):
        bus._do_execv()
    assert recorded_execv == []


def test_platform_pid_alive_on_windows_asks_openprocess(monkeypatch):
    opened, closed = [], []

    class Kernel32:
        def OpenProcess(self, access, inherit, pid):
            opened.append(pid)
            return 7 if pid == 42 else 0

        def CloseHandle(self, handle):
            closed.append(handle)

    monkeypatch.setattr(wp, '_WINDOWS', True)
    monkeypatch.setattr(
        ctypes,
        'windll',
        type('windll', (), {'kernel32': Kernel32()}),
        raising=False,
    )
    monkeypatch.setattr(os, 'kill', None)  # Would terminate on Windows.
    assert wp._pid_alive(42) is True
    assert wp._pid_alive(43) is False
    assert (opened, closed) == ([42, 43], [7])


def test_platform_pid_alive_on_posix():
    assert wp._pid_alive(os.getpid())
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    assert not wp._pid_alive(dead.pid)


def test_bus_set_cloexec_marks_descriptors_but_kept_ones(bus):
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        bus._keep_fds.add(fds[1])
        bus._set_cloexec()
        assert not os.get_inheritable(fds[0])
        assert os.get_inheritable(fds[1])
    finally:
        for fd in fds:
            os.close(fd)


# -- Bus: lifecycle in every interleaving -------------------------------------
# SPEC section 8.  Each test provokes one interleaving in a real process:
# a signal or another thread arriving during a step of start, stop, exit,
# graceful or restart, or during a fork or an execv.

LIFECYCLE = textwrap.dedent("""
    import os, sys, threading, time, wspbus_plugins as wp
    out = open(sys.argv[1], 'a', buffering=1)
    def note(*words):
        out.write(' '.join(map(str, words)) + '\\n')
    def runs():
        with open(sys.argv[1]) as f:
            return f.read().splitlines().count('run')
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: level >= 40 and
                  print(msg.splitlines()[0], file=sys.stderr, flush=True))
    bus.subscribe('started', lambda: note('started'))
    bus.subscribe('exit', lambda: note('exit'))
""")


def lifecycle_child(child, tmp_path, code, *args, **kwargs):
    """Run LIFECYCLE + `code`; return the process and its notes' file."""
    events = tmp_path / ('events%d' % len(child.procs))
    code = LIFECYCLE + textwrap.dedent(code)
    return child(code, str(events), *args, **kwargs), events


def wait_for_note(events, note, count=1):
    wait_until(
        lambda: lines_of(events).count(note) >= count,
        '%r noted %d time(s); notes: %r' % (note, count, lines_of(events)),
    )


@pytest.mark.parametrize('how', ['exit', 'restart'])
def test_lifecycle_exit_from_a_thread_during_start_wins(child, tmp_path, how):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        note('run')
        first_run = runs() == 1
        asked = threading.Event()
        def give_up():  # A worker that fails early, or the Autoreloader.
            getattr(bus, sys.argv[2])()
            asked.set()
        def first():
            if first_run:
                threading.Thread(target=give_up).start()
                asked.wait(5)
        def later():  # Later start listeners still run meanwhile.
            note('later', bus.state)
            time.sleep(0.2)
        bus.subscribe('start', first, priority=10)
        bus.subscribe('start', later, priority=20)
        bus.start()
        if not first_run:
            bus.exit()
        bus.block()
        note('block returned')
        """,
        how,
    )
    status, out, err = finish(proc, timeout=10)
    lines = [line for line in lines_of(events) if not line.startswith('later')]
    if how == 'exit':
        assert lines == ['run', 'exit', 'block returned'], err
    else:  # The same process, re-executed once.
        assert lines == [
            'run',
            'exit',
            'run',
            'started',
            'exit',
            'block returned',
        ], err
    assert (status, err) == (0, '')


@pytest.mark.parametrize('second', ['SIGHUP', 'SIGUSR1', 'SIGTERM'])
def test_lifecycle_signal_during_reexec_is_kept_for_the_new_image(
    child, tmp_path, second
):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        note('run')
        if runs() == 2:
            time.sleep(0.5)  # A slow import: no handlers installed yet.
        handler = wp.SignalHandler(bus)
        handler.handlers['SIGHUP'] = bus.restart
        handler.subscribe()
        bus.subscribe('graceful', lambda: note('graceful'))
        bus.start()
        bus.block()
        """,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGHUP)
    wait_for_note(events, 'run', 2)
    os.kill(proc.pid, getattr(signal, second))  # Lands in the slow import.
    # The new image acts on it once its bus has started (every plugin
    # subscribed): SIGHUP restarts it again, SIGTERM ends it, and SIGUSR1
    # reloads it.
    run = ['run', 'started', 'exit']
    expected = {
        'SIGHUP': run * 2 + ['run', 'started'],
        'SIGUSR1': run + ['run', 'started', 'graceful'],
        'SIGTERM': run * 2,
    }[second]
    wait_until(
        lambda: lines_of(events) == expected or proc.poll() is not None,
        'the new image to act on %s' % second,
    )
    if second != 'SIGTERM':
        proc.send_signal(signal.SIGTERM)
        expected.append('exit')
    status, out, err = finish(proc)
    assert (status, lines_of(events)) == (0, expected), err


@needs_fork
def test_lifecycle_fork_while_threads_use_the_bus_never_hangs_the_child(
    child,
):
    proc = child("""
        import os, threading, time, wspbus_plugins as wp
        bus = wp.Bus()
        done = threading.Event()
        def churn():
            def listener():
                pass
            while not done.is_set():
                bus.subscribe('x', listener)
                bus.publish('x')
                bus.unsubscribe('x', listener)
        for _ in range(4):
            threading.Thread(target=churn).start()
        hung = 0
        for _ in range(100):
            pid = os.fork()
            if pid == 0:  # A lock held at the fork would hang us here.
                bus.subscribe('y', print)
                bus.publish('x')
                bus.log('in the child')
                os._exit(0)
            deadline = time.monotonic() + 2
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.001)
            if hung:
                break
        done.set()
        print('hung', hung)
    """)
    status, out, err = finish(proc)
    assert (status, out) == (0, 'hung 0\n'), err


def test_lifecycle_sigterm_never_runs_listeners_inside_the_main_work(
    child, tmp_path
):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.SignalHandler(bus).subscribe()
        lock = threading.Lock()  # A plain lock, as most code uses.
        def tick():  # The main thread's own work, run from block().
            with lock:
                time.sleep(0.2)
        def release_resources():
            with lock:
                note('released')
        bus.subscribe('main', tick)
        bus.subscribe('stop', release_resources)
        bus.start()
        bus.block(interval=0.01)
        """,
    )
    wait_for_note(events, 'started')
    time.sleep(0.1)  # Well inside a tick, holding the lock.
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc, timeout=10)
    assert (status, lines_of(events)) == (0, ['started', 'released', 'exit'])


def test_lifecycle_signals_never_nest_inside_a_listener(child, tmp_path):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.SignalHandler(bus).subscribe()
        busy = []
        def slow_reload():
            note('reloading')
            busy.append(1)
            time.sleep(0.5)
            busy.pop()
            note('reloaded')
        def on_stop():
            note('stop inside a listener' if busy else 'stop')
        bus.subscribe('graceful', slow_reload)
        bus.subscribe('stop', on_stop)
        bus.start()
        bus.block()
        """,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGUSR1)
    wait_for_note(events, 'reloading')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, lines_of(events)) == (
        0,
        ['started', 'reloading', 'reloaded', 'stop', 'exit'],
    ), err


def test_lifecycle_idle_pool_threads_never_hang_the_exit(child, tmp_path):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        import asyncio, concurrent.futures
        wp.SignalHandler(bus).subscribe()
        pool = concurrent.futures.ThreadPoolExecutor(4)
        pool.submit(note, 'pool ran').result()
        loop = asyncio.new_event_loop()
        loop.run_until_complete(loop.run_in_executor(None, note, 'loop ran'))
        bus.start()
        bus.block()
        note('block returned')
        """,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc, timeout=10)
    assert status == 0, err
    assert lines_of(events)[-2:] == ['exit', 'block returned']


def test_lifecycle_no_graceful_listener_runs_once_exit_began(child, tmp_path):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.SignalHandler(bus).subscribe()
        wp.Monitor(bus, lambda: None, 0.05, name='ticker').subscribe()
        def first():
            note('graceful 1', bus.state)
            threading.Thread(target=bus.graceful).start()  # Merged re-run.
            time.sleep(0.1)
            threading.Thread(target=bus.exit).start()  # A worker gives up.
            time.sleep(0.3)
        def second():
            note('graceful 2', bus.state)
        bus.subscribe('graceful', first, priority=10)
        bus.subscribe('graceful', second, priority=20)
        bus.start()
        bus.block()
        time.sleep(0.2)
        note('threads', *sorted(t.name for t in threading.enumerate()))
        """,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGUSR1)
    status, out, err = finish(proc, timeout=10)
    assert status == 0, err
    assert lines_of(events) == [
        'started',
        'graceful 1 states.STARTED',
        'exit',
        'threads MainThread',
    ]


def test_lifecycle_graceful_during_start_waits_for_started(child, tmp_path):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.SignalHandler(bus).subscribe()
        def slow_start():
            note('starting')
            time.sleep(0.5)
        bus.subscribe('start', slow_start)
        bus.subscribe('graceful', lambda: note('graceful', bus.state))
        bus.start()
        bus.block()
        """,
    )
    wait_for_note(events, 'starting')
    os.kill(proc.pid, signal.SIGUSR1)
    wait_until(lambda: len(lines_of(events)) >= 3, 'the graceful run')
    proc.send_signal(signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, lines_of(events)) == (
        0,
        ['starting', 'started', 'graceful states.STARTED', 'exit'],
    ), err


def test_lifecycle_failing_stop_listener_skips_no_exit_listener(
    child, tmp_path
):
    pidfile = tmp_path / 'app.pid'
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.SignalHandler(bus).subscribe()
        wp.PIDFile(bus, sys.argv[2]).subscribe()
        def broken():
            raise OSError('disk gone')
        bus.subscribe('stop', broken)
        bus.start()
        bus.block()
        """,
        str(pidfile),
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, lines_of(events)) == (70, ['started', 'exit']), err
    assert not pidfile.exists()
    assert 'Exiting with status 70: the stop or exit listeners failed' in err


@pytest.mark.parametrize(
    'raised, status', [('SystemExit(4)', 4), ('KeyboardInterrupt', 0)]
)
def test_lifecycle_sys_exit_in_an_exit_listener_skips_no_other(
    child, tmp_path, raised, status
):
    pidfile = tmp_path / 'app.pid'
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.SignalHandler(bus).subscribe()
        wp.PIDFile(bus, sys.argv[2]).subscribe()
        def quits():
            raise %s
        bus.subscribe('exit', quits, priority=10)  # Before PIDFile's.
        bus.start()
        bus.block()
        """
        % raised,
        str(pidfile),
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGTERM)
    status_seen, out, err = finish(proc)
    assert (status_seen, lines_of(events)) == (status, ['started', 'exit'])
    assert not pidfile.exists(), err


def test_lifecycle_ctrl_c_in_a_reexecuted_image_never_cuts_its_exit(
    child, tmp_path
):
    # The new image's SIGINT handler is the hold of the carried signals
    # when start() begins: it was not deferred, then set back to Python's
    # default in the middle of the start, and a Ctrl+C raised
    # KeyboardInterrupt inside the stop listeners of the exit run there.
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        note('run')
        first = runs() == 1
        handler = wp.SignalHandler(bus)
        handler.handlers['SIGHUP'] = bus.restart
        handler.subscribe()
        def slow_start():
            if not first:
                note('starting')
                time.sleep(1)
        def slow_stop():
            note('stopping')
            time.sleep(1)
            note('stopped')
        bus.subscribe('start', slow_start)
        bus.subscribe('stop', slow_stop)
        bus.start()
        bus.block()
        """,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGHUP)
    wait_for_note(events, 'starting')
    os.kill(proc.pid, signal.SIGTERM)
    wait_for_note(events, 'stopping', count=2)
    os.kill(proc.pid, signal.SIGINT)
    status, out, err = finish(proc)
    assert 'KeyboardInterrupt' not in err
    assert status == 0, err
    assert lines_of(events)[-3:] == ['stopping', 'stopped', 'exit']


def test_lifecycle_second_ctrl_c_during_shutdown_skips_no_cleanup(
    child, tmp_path
):
    pidfile = tmp_path / 'app.pid'
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.PIDFile(bus, sys.argv[2]).subscribe()
        def slow_cleanup():
            note('cleaning')
            time.sleep(1)
            note('cleaned')
        bus.subscribe('exit', slow_cleanup, priority=10)
        bus.start()
        bus.block()
        note('block returned')
        """,
        str(pidfile),
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGINT)
    wait_for_note(events, 'cleaning')
    os.kill(proc.pid, signal.SIGINT)
    status, out, err = finish(proc)
    assert (status, lines_of(events)) == (
        0,
        ['started', 'cleaning', 'cleaned', 'exit', 'block returned'],
    ), err
    assert not pidfile.exists()


def test_lifecycle_sigterm_during_a_slow_start_is_a_clean_exit(
    child, tmp_path
):
    pidfile = tmp_path / 'app.pid'
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        import atexit
        atexit.register(note, 'atexit')
        wp.SignalHandler(bus).subscribe()
        wp.PIDFile(bus, sys.argv[2]).subscribe()
        def slow_start():
            note('starting')
            time.sleep(0.5)
        bus.subscribe('start', slow_start, priority=80)
        try:
            bus.start()
            bus.block()
        finally:
            note('finally')
        """,
        str(pidfile),
    )
    wait_for_note(events, 'starting')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    lines = [line for line in lines_of(events) if line != 'started']
    assert (status, lines) == (
        0,
        ['starting', 'exit', 'finally', 'atexit'],
    ), err
    assert 'Start failed' not in err
    assert not pidfile.exists()


def test_lifecycle_second_ctrl_c_interrupts_a_slow_start(child, tmp_path):
    pidfile = tmp_path / 'app.pid'
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.PIDFile(bus, sys.argv[2]).subscribe()
        def stuck_start():
            note('starting')
            time.sleep(60)
        bus.subscribe('start', stuck_start, priority=80)
        bus.start()
        bus.block()
        """,
        str(pidfile),
    )
    wait_for_note(events, 'starting')
    os.kill(proc.pid, signal.SIGINT)  # Recorded: start may still finish.
    time.sleep(0.2)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGINT)  # The user insists.
    status, out, err = finish(proc, timeout=10)
    assert (status, lines_of(events)) == (70, ['starting', 'exit']), err
    assert 'Start failed (KeyboardInterrupt); exiting with status 70.' in err
    assert not pidfile.exists()


def test_lifecycle_second_sigterm_stops_waiting_for_a_stuck_thread(
    child, tmp_path
):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        import atexit
        atexit.register(note, 'atexit')
        wp._STILL_WAITING_EVERY = 0.2
        bus.subscribe('log', lambda msg, level: 'waiting for thr' in
                      msg.lower() and note(msg))
        wp.SignalHandler(bus).subscribe()
        stuck = threading.Thread(target=time.sleep, args=(60,), name='stuck')
        bus.subscribe('start', stuck.start)
        bus.start()
        bus.block()
        """,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGTERM)
    wait_for_note(events, 'Still waiting for threads: stuck.')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc, timeout=10)
    assert status == 0, err
    assert lines_of(events)[:2] == ['started', 'exit']
    assert lines_of(events)[-2:] == [
        'Not waiting for threads stuck: exiting now.',
        'atexit',
    ]


@pytest.mark.parametrize('second', ['SIGTERM', 'SIGINT'])
@pytest.mark.parametrize('runner', ['block', 'run_async'])
def test_lifecycle_second_signal_stops_waiting_for_a_busy_executor(
    child, tmp_path, runner, second
):
    # The interpreter's exit waits for executor work after block()
    # returned, run_async() before it returns (as asyncio.run() does): a
    # second SIGTERM or Ctrl+C ends that wait too.
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        import asyncio, atexit, concurrent.futures
        atexit.register(note, 'atexit')
        wp.SignalHandler(bus).subscribe()
        def job():
            note('job running')
            time.sleep(60)  # A stuck DNS lookup, say.
        if sys.argv[2] == 'block':
            concurrent.futures.ThreadPoolExecutor(2).submit(job)
            bus.start()
            bus.block()
        else:
            async def main():
                asyncio.get_running_loop().run_in_executor(None, job)
                await asyncio.sleep(60)
            bus.run_async(main())
        note('returned')
        """,
        runner,
    )
    wait_for_note(events, 'job running')
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGTERM)
    wait_for_note(events, 'exit')
    time.sleep(0.2)  # In that wait by now (either way).
    os.kill(proc.pid, getattr(signal, second))
    status, out, err = finish(proc, timeout=10)
    assert (status, err) == (0, '')
    assert lines_of(events)[-2:] == ['returned', 'atexit']


def test_lifecycle_signal_during_a_restarts_exit_reaches_the_new_image(
    child, tmp_path
):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        note('run')
        handler = wp.SignalHandler(bus)
        handler.handlers['SIGHUP'] = bus.restart
        handler.subscribe()
        def slow_exit():
            note('exiting')
            time.sleep(0.5)
        if runs() == 1:
            bus.subscribe('exit', slow_exit)
        bus.start()
        bus.block()
        """,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGHUP)
    wait_for_note(events, 'exiting')
    os.kill(proc.pid, signal.SIGHUP)  # Recorded while the exit runs.
    wait_for_note(events, 'run', 3)
    wait_for_note(events, 'started', 2)
    proc.send_signal(signal.SIGTERM)
    status, out, err = finish(proc)
    assert status == 0, err
    assert lines_of(events).count('run') == 3


def test_lifecycle_signal_outside_any_transition_is_acted_on_at_once(
    child, tmp_path
):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.SignalHandler(bus).subscribe()
        bus.start()
        while bus.state is not wp.states.EXITING:  # No block(): own loop.
            time.sleep(0.01)
        note('loop ended')
        """,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc, timeout=10)
    assert (status, lines_of(events)) == (
        0,
        ['started', 'exit', 'loop ended'],
    ), err


def test_lifecycle_signals_inside_subscribe_and_publish_break_nothing(
    child, tmp_path
):
    # No block(), no transition: signals are acted on at once, but never
    # inside the bus's own locked bookkeeping (a half-done subscribe).
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.SignalHandler(bus).subscribe()
        graceful = []
        bus.subscribe('graceful', lambda: graceful.append(1))
        bus.start()
        note('looping')
        while bus.state is not wp.states.EXITING:
            for channel in ('graceful', 'stop', 'x'):
                listener = lambda: None
                bus.subscribe(channel, listener)
                bus.publish('x')
                bus.unsubscribe(channel, listener)
        note('graceful ran', bool(graceful))
        """,
    )
    wait_for_note(events, 'looping')
    for _ in range(300):
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, err) == (0, '')
    assert lines_of(events) == [
        'started',
        'looping',
        'exit',
        'graceful ran True',
    ]


def transition_in_thread(bus, name):
    """Start bus.<name>() in a thread, which is returned."""
    thread = threading.Thread(target=getattr(bus, name), daemon=True)
    thread.start()
    return thread


def test_bus_exit_asked_during_another_threads_transition_runs_after_it(
    bus,
):
    inside, release = threading.Event(), threading.Event()
    order = []

    def slow_graceful():
        inside.set()
        release.wait(TIMEOUT)
        order.append('graceful')

    bus.subscribe('graceful', slow_graceful)
    bus.subscribe('graceful', lambda: order.append('late graceful'), 60)
    bus.subscribe('exit', lambda: order.append('exit'))
    bus.start()
    runner = transition_in_thread(bus, 'graceful')
    inside.wait(TIMEOUT)
    bus.exit()  # Handed to the runner: returns at once.
    assert order == [] and bus.state is wp.states.STARTED
    release.set()
    runner.join(TIMEOUT)
    assert order == ['graceful', 'exit']  # No graceful listener after.
    assert bus.state is wp.states.EXITING


def test_bus_stop_from_another_thread_waits_for_the_running_transition(
    bus,
):
    inside, release = threading.Event(), threading.Event()
    states_seen = []

    def slow_start():
        inside.set()
        release.wait(TIMEOUT)

    bus.subscribe('start', slow_start)
    bus.subscribe('stop', lambda: states_seen.append(bus.state))
    starter = transition_in_thread(bus, 'start')
    inside.wait(TIMEOUT)
    stopper = transition_in_thread(bus, 'stop')
    stopper.join(0.2)
    assert stopper.is_alive() and states_seen == []
    release.set()
    starter.join(TIMEOUT)
    stopper.join(TIMEOUT)
    assert states_seen == [wp.states.STOPPING]
    assert bus.state is wp.states.STOPPED


def test_bus_graceful_asked_while_starting_runs_once_started(bus):
    calls = []
    bus.subscribe('graceful', lambda: calls.append(bus.state))
    bus.subscribe('start', bus.graceful)  # Asked during STARTING.
    bus.start()
    assert calls == [wp.states.STARTED]


def test_bus_start_listener_asking_exit_is_a_failed_start(bus, fake_exit):
    calls = []
    bus.subscribe('start', bus.exit, priority=10)
    bus.subscribe('start', lambda: calls.append('later start'), 20)
    bus.subscribe('exit', lambda: calls.append('exit'))
    with pytest.raises(HardExit):
        bus.start()
    assert calls == ['exit'] and fake_exit == [70]


def test_bus_restart_keeps_handled_signals_pending_across_execv(
    bus, recorded_execv, monkeypatch
):
    calls = []
    monkeypatch.setattr(wp, '_sigmask', lambda how, s: calls.append((how, s)))
    monkeypatch.setattr(wp._signal, 'pthread_kill', lambda *a: calls.append(a))
    environ = []

    def execv(path, args):
        environ.append(os.environ.get(wp._CARRIED_ENV))
        raise Execv

    monkeypatch.setattr(os, 'execv', execv)
    bus._handled_signals.update(
        {signal.SIGHUP: 'SIGHUP', signal.SIGTERM: 'SIGTERM'}
    )
    bus.execv = True  # As restart() leaves it.
    bus._signals.append('SIGHUP')  # Recorded, not yet acted on.
    with pytest.raises(Execv):
        bus._do_execv()
    # Numbers on every Python (not 'Signals.SIGHUP'), Ctrl+C too (Python's
    # handler is set), and the wakeup pipe the new image reads.
    assert re.fullmatch(r'1 2 15/\d+', environ[0]), environ
    carried = [signal.SIGHUP, signal.SIGINT, signal.SIGTERM]
    assert calls == [
        (signal.SIG_BLOCK, carried),
        (threading.main_thread().ident, signal.SIGHUP),
        (signal.SIG_UNBLOCK, carried),  # execv failed: unblocked again.
    ]
    assert wp._CARRIED_ENV not in os.environ
    assert signal.set_wakeup_fd(-1) == -1  # Restored.


def test_bus_restart_without_pthread_sigmask_carries_nothing(
    bus, recorded_execv, monkeypatch
):
    monkeypatch.setattr(wp, '_sigmask', None)  # Windows.
    bus._handled_signals[signal.SIGTERM] = 'SIGTERM'
    monkeypatch.setattr(
        os, 'execv', lambda *a: recorded_execv.append(dict(os.environ))
    )
    bus._do_execv()
    assert wp._CARRIED_ENV not in recorded_execv[0]


def main_thread_blocks(pid, signum):
    """Tell whether process `pid`'s main thread blocks signal `signum`."""
    try:
        with open('/proc/%d/task/%d/status' % (pid, pid)) as f:
            for line in f:
                if line.startswith('SigBlk:'):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def test_lifecycle_sigterm_during_set_up_means_no_start(child, tmp_path):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.SignalHandler(bus).subscribe()
        note('setting up')
        time.sleep(0.5)  # Reading configuration, say.
        bus.start()
        note('after start', bus.state)
        bus.block()
        note('block returned')
        """,
    )
    wait_for_note(events, 'setting up')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc, timeout=10)
    assert (status, err) == (0, '')
    assert lines_of(events) == [
        'setting up',
        'exit',
        'after start states.EXITING',
        'block returned',
    ]


def test_lifecycle_start_during_a_restart_does_not_cancel_it(child, tmp_path):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        note('run')
        if runs() == 1:
            def slow_exit():
                note('exiting')
                time.sleep(0.3)
            bus.subscribe('exit', slow_exit)
            def start_again():  # Another thread's start, meanwhile.
                while 'exiting\\n' not in open(sys.argv[1]).read():
                    time.sleep(0.01)
                bus.start()
            threading.Thread(target=start_again).start()
            threading.Timer(0.2, bus.restart).start()
        else:
            threading.Timer(0.2, bus.exit).start()
        bus.start()
        bus.block()
        note('block returned')
        """,
    )
    status, out, err = finish(proc, timeout=10)
    assert (status, err) == (0, '')
    assert lines_of(events)[-3:] == ['started', 'exit', 'block returned']
    assert lines_of(events).count('run') == 2  # It re-executed.


def restart_then_signal_in_the_window(child, tmp_path, code, sig, *args):
    """SIGHUP (restart), then `sig` while the old image blocks signals
    for the re-exec; return the process and its notes."""
    proc, events = lifecycle_child(child, tmp_path, code, *args)
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGHUP)
    # Not SIGHUP alone: the kernel blocks it while its handler runs, which
    # is before the restart.
    wait_until(
        lambda: (
            main_thread_blocks(proc.pid, signal.SIGHUP)
            and main_thread_blocks(proc.pid, sig)
        ),
        'the re-exec window',
    )
    os.kill(proc.pid, sig)
    return proc, events


@linux_only
def test_lifecycle_ctrl_c_during_reexec_stops_the_new_image(child, tmp_path):
    for attempt in range(3):
        proc, events = restart_then_signal_in_the_window(
            child,
            tmp_path,
            """
            note('run')
            handler = wp.SignalHandler(bus)
            handler.handlers['SIGHUP'] = bus.restart
            handler.subscribe()
            bus.start()
            bus.block()
            """,
            signal.SIGINT,
        )
        status, out, err = finish(proc, timeout=10)
        assert (status, err) == (0, ''), 'attempt %d' % attempt
        assert lines_of(events)[-2:] == ['started', 'exit']


def restart_on_sighup(code):
    """`code` after a SignalHandler whose SIGHUP restarts, noting 'run'.

    The second image is slow to get there: a signal sent in the re-exec
    window then always comes before its handlers are in place.
    """
    return textwrap.dedent("""
        note('run')
        if runs() == 2:
            time.sleep(0.5)
        handler = wp.SignalHandler(bus)
        handler.handlers['SIGHUP'] = bus.restart
        handler.subscribe()
    """) + textwrap.dedent(code)


# The main thread blocks the carried signals across the exec, so a
# process-directed one sent then goes to another thread.  If the scheduler
# stops that thread between taking the signal and recording it, the exec
# kills it there and the signal is gone: a few restarts per thousand
# under load (seen with the kernel's signal_deliver trace).  A kernel limit
# the module cannot close for threads it does not own (README,
# Reliability).
RARE_CARRIED_SIGNAL_RACE = pytest.mark.xfail(
    reason='a signal another thread takes as the exec begins can be lost '
    '(kernel limit, README: Reliability)',
    strict=False,
)


@linux_only
@pytest.mark.parametrize(
    'runner',
    ['block', 'run_async'],
)
def test_lifecycle_sigterm_carried_across_reexec_waits_for_the_plugins(
    child, tmp_path, runner
):
    # SignalHandler first, as in every recipe: the new image must not exit
    # before the program has subscribed PIDFile.
    pidfile = tmp_path / 'pid'
    proc, events = restart_then_signal_in_the_window(
        child,
        tmp_path,
        restart_on_sighup(
            """
        wp.PIDFile(bus, sys.argv[2]).subscribe()
        if sys.argv[3] == 'block':
            bus.start()
            bus.block()
        else:
            import asyncio
            async def main():
                note('main')
                await asyncio.sleep(60)
            bus.run_async(main())
        """
        ),
        signal.SIGTERM,
        str(pidfile),
        runner,
    )
    status, out, err = finish(proc)
    assert (status, err) == (0, '')
    lines = [line for line in lines_of(events) if line != 'main']
    assert lines == ['run', 'started', 'exit'] * 2
    assert not pidfile.exists()


@linux_only
def test_lifecycle_sigusr1_carried_across_reexec_runs_graceful_once_started(
    child, tmp_path
):
    proc, events = restart_then_signal_in_the_window(
        child,
        tmp_path,
        restart_on_sighup(
            """
        bus.subscribe('graceful', lambda: note('graceful'))
        bus.start()
        bus.block()
        """
        ),
        signal.SIGUSR1,
    )
    wait_for_note(events, 'graceful')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, err) == (0, '')
    assert lines_of(events) == [
        'run',
        'started',
        'exit',
        'run',
        'started',
        'graceful',
        'exit',
    ]


@linux_only
def test_lifecycle_sighup_carried_across_reexec_hands_the_socket_on(
    child, tmp_path
):
    # Two reloads in a row: the second restarts the new image, which must
    # pass on the listening socket it inherited (same port: never rebound).
    proc, events = restart_then_signal_in_the_window(
        child,
        tmp_path,
        restart_on_sighup(
            """
        sockets = wp.ListenSockets(bus)
        sockets.subscribe()
        server = sockets.listen('web', ('127.0.0.1', 0))
        note('port', server.getsockname()[1])
        if runs() == 3:
            bus.subscribe('started', bus.exit)
        bus.start()
        bus.block()
        """
        ),
        signal.SIGHUP,
    )
    status, out, err = finish(proc)
    assert (status, err) == (0, '')
    lines = lines_of(events)
    ports = [line for line in lines if line.startswith('port')]
    assert [line for line in lines if line not in ports] == [
        'run',
        'started',
        'exit',
    ] * 3
    assert len(ports) == 3 and len(set(ports)) == 1, ports


@linux_only
@pytest.mark.parametrize('how', ['wait', 'exit'])
def test_lifecycle_carried_sigterm_without_a_start(child, tmp_path, how):
    # A new image that never starts its bus: wait() acts on the signal;
    # an exit by hand takes it as asked for, not as a second SIGTERM that
    # would hurry block()'s wait for the threads.
    proc, events = restart_then_signal_in_the_window(
        child,
        tmp_path,
        restart_on_sighup(
            """
        if runs() == 1:
            bus.start()
            bus.block()
        elif sys.argv[2] == 'wait':
            bus.wait(wp.states.EXITING)
            note('waited')
        else:
            def work():
                time.sleep(0.5)
                note('thread done')
            threading.Thread(target=work).start()
            bus.exit()
            bus.block()
            note('block returned')
        """
        ),
        signal.SIGTERM,
        how,
    )
    status, out, err = finish(proc)
    assert (status, err) == (0, '')
    ending = ['waited'] if how == 'wait' else ['thread done', 'block returned']
    assert lines_of(events) == ['run', 'started', 'exit', 'run', 'exit'] + (
        ending
    )


@linux_only
@RARE_CARRIED_SIGNAL_RACE
def test_lifecycle_sigterm_during_reexec_kept_despite_other_threads(
    child, tmp_path
):
    # Idle pool workers and a daemon thread could take a process-directed
    # SIGTERM while the main thread blocks it for the re-exec.
    for attempt in range(scaled(10, 40)):
        proc, events = restart_then_signal_in_the_window(
            child,
            tmp_path,
            """
            import concurrent.futures
            pool = concurrent.futures.ThreadPoolExecutor(4)
            for future in [pool.submit(time.sleep, 0) for _ in range(4)]:
                future.result()
            threading.Thread(target=threading.Event().wait,
                             daemon=True).start()
            handler = wp.SignalHandler(bus)
            handler.handlers['SIGHUP'] = bus.restart
            handler.subscribe()
            bus.start()
            bus.block()
            """,
            signal.SIGTERM,
        )
        status, out, err = finish(proc, timeout=10)
        assert (status, err) == (0, ''), 'attempt %d' % attempt
        lines = lines_of(events)  # The new image may exit before starting.
        assert lines in (['started', 'exit'] * 2, ['started', 'exit', 'exit'])


@linux_only
def test_lifecycle_new_image_children_inherit_no_blocked_signal(
    child, tmp_path
):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        import subprocess
        note('run')
        # Spawned before the new image's SignalHandler exists.
        helper = subprocess.Popen(['sleep', '30'])
        with open('/proc/%d/status' % helper.pid) as f:
            blocked = [l.split()[1] for l in f if l.startswith('SigBlk')]
        note('helper blocks', blocked[0])
        helper.kill()
        helper.wait()
        handler = wp.SignalHandler(bus)
        handler.handlers['SIGHUP'] = bus.restart
        handler.subscribe()
        if runs() == 1:
            bus.subscribe('started', bus.restart)
        else:
            bus.subscribe('started', bus.exit)
        bus.start()
        bus.block()
        """,
    )
    status, out, err = finish(proc)
    assert (status, err) == (0, '')
    assert lines_of(events).count('helper blocks 0000000000000000') == 2


def test_lifecycle_new_image_acts_on_sigterm_during_its_set_up(
    child, tmp_path
):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        note('run')
        handler = wp.SignalHandler(bus)
        handler.handlers['SIGHUP'] = bus.restart
        handler.subscribe()
        if runs() == 2:
            note('setting up')
            time.sleep(2)  # Waiting for a database, say.
            note('set up')
        bus.start()
        bus.block()
        """,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGHUP)
    wait_for_note(events, 'setting up')
    os.kill(proc.pid, signal.SIGTERM)
    wait_for_note(events, 'exit', 2)  # At once, not after the set-up.
    assert 'set up' not in lines_of(events)
    status, out, err = finish(proc)
    assert (status, err) == (0, '')
    assert lines_of(events)[-3:] == ['setting up', 'exit', 'set up']


def test_lifecycle_main_thread_wait_still_raises_keyboardinterrupt(
    child, tmp_path
):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        bus.subscribe('start', lambda: time.sleep(60))
        threading.Thread(target=bus.start, daemon=True).start()
        note('waiting')
        try:
            bus.wait(wp.states.STARTED)
        except KeyboardInterrupt:
            note('interrupted')
        """,
    )
    wait_for_note(events, 'waiting')
    os.kill(proc.pid, signal.SIGINT)
    status, out, err = finish(proc, timeout=10)
    assert lines_of(events) == ['waiting', 'interrupted']


def test_lifecycle_restart_lets_running_executor_work_finish(child, tmp_path):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        import concurrent.futures
        note('run')
        pool = concurrent.futures.ThreadPoolExecutor(2)
        def job():
            note('job started')
            time.sleep(0.5)
            note('job finished')
        if runs() == 1:
            bus.subscribe('started', lambda: (pool.submit(job),
                                              time.sleep(0.1),
                                              bus.restart()))
        else:
            bus.subscribe('started', bus.exit)
        bus.start()
        bus.block()
        """,
    )
    status, out, err = finish(proc)
    assert (status, err) == (0, '')
    lines = lines_of(events)
    assert lines.index('job finished') < lines.index('run', 1)


@pytest.mark.parametrize('call', ['stop', 'start', 'graceful'])
def test_lifecycle_stop_listener_joining_a_worker_that_transitions(
    child, tmp_path, call
):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        wp.SignalHandler(bus).subscribe()
        stopping = threading.Event()
        def worker():  # Gives up when the service stops, and says so.
            stopping.wait()
            getattr(bus, sys.argv[2])()
        thread = threading.Thread(target=worker)
        def stop_worker():
            stopping.set()
            thread.join()
            note('worker joined')
        bus.subscribe('start', thread.start)
        bus.subscribe('stop', stop_worker)
        bus.start()
        bus.block()
        """,
        call,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc, timeout=10)
    assert (status, err) == (0, '')
    assert lines_of(events) == ['started', 'worker joined', 'exit']


def test_lifecycle_ctrl_c_after_block_returns_skips_no_cleanup(
    child, tmp_path
):
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        import atexit
        atexit.register(note, 'atexit')
        bus.start()
        try:
            bus.block()
        finally:
            note('cleaning up')
            time.sleep(1)
            note('cleaned up')
        """,
    )
    wait_for_note(events, 'started')
    os.kill(proc.pid, signal.SIGINT)
    wait_for_note(events, 'cleaning up')
    os.kill(proc.pid, signal.SIGINT)
    status, out, err = finish(proc)
    assert (status, err) == (0, '')
    assert lines_of(events) == [
        'started',
        'exit',
        'cleaning up',
        'cleaned up',
        'atexit',
    ]


@needs_fork
def test_lifecycle_fork_leaves_no_plugin_lock_held_in_the_child(child):
    proc = child("""
        import os, threading, time, wspbus_plugins as wp
        bus = wp.Bus()
        manager = wp.ThreadManager(bus)
        manager.subscribe()
        done = threading.Event()
        def request():
            while not done.is_set():
                bus.publish('acquire_thread')
                bus.publish('release_thread')
        for _ in range(4):
            threading.Thread(target=request).start()
        hung = 0
        for _ in range(50):
            pid = os.fork()
            if pid == 0:
                manager.stop()  # Takes ThreadManager's lock.
                os._exit(0)
            deadline = time.monotonic() + 2
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.001)
            if hung:
                break
        done.set()
        print('hung', hung)
    """)
    status, out, err = finish(proc)
    assert (status, out) == (0, 'hung 0\n'), err


def test_lifecycle_failed_reexec_leaves_no_pid_file(child, tmp_path):
    pidfile = tmp_path / 'app.pid'
    proc, events = lifecycle_child(
        child,
        tmp_path,
        """
        def execv(path, args):  # The interpreter was removed meanwhile.
            raise FileNotFoundError(2, 'No such file or directory', path)
        os.execv = execv
        wp.PIDFile(bus, sys.argv[2]).subscribe()
        bus.subscribe('started', bus.restart)
        bus.start()
        bus.block()
        """,
        str(pidfile),
    )
    status, out, err = finish(proc)
    assert status != 0
    assert 'No such file or directory' in err
    assert not pidfile.exists()


def test_bus_graceful_is_ignored_while_stopped(bus):
    calls = []
    bus.subscribe('graceful', lambda: calls.append(bus.state))
    bus.graceful()  # Before the first start.
    bus.start()
    bus.stop()
    bus.graceful()  # After a stop.
    assert calls == []
    assert (
        bus.recorder.messages().count(
            'Graceful ignored: the bus is not started.'
        )
        == 2
    )


def test_bus_graceful_asked_during_a_stop_never_runs_after_it(bus):
    calls = []
    bus.subscribe('graceful', lambda: calls.append(bus.state))
    bus.subscribe('stop', bus.graceful)  # Asked during the stop.
    bus.start()
    bus.stop()
    assert calls == []


def test_bus_start_with_callback_after_an_earlier_exit(bus):
    called = threading.Event()
    bus.start()
    bus.exit()
    thread = bus.start_with_callback(called.set)
    thread.join(TIMEOUT)
    assert called.is_set() and bus.state is wp.states.STARTED


@pytest.fixture
def cpu_load():
    """Keep both cores busy with two spinning processes (killed after)."""
    spinners = [
        subprocess.Popen([sys.executable, '-c', 'while True: pass'])
        for _ in range(2)
    ]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait(TIMEOUT)


@pytest.mark.stress
def test_lifecycle_sigterm_at_any_moment_of_start_under_load(
    child, tmp_path, cpu_load
):
    # The PID file appears in the middle of start(): a SIGTERM sent the
    # moment it does lands in a start listener (CPython 3.11-3.13 lost the
    # file or ended with status 70 here, issue 14 finding 15).
    for attempt in range(scaled(8, 40)):
        pidfile = tmp_path / ('%d.pid' % attempt)
        proc, events = lifecycle_child(
            child,
            tmp_path,
            """
            wp.SignalHandler(bus).subscribe()
            wp.PIDFile(bus, sys.argv[2]).subscribe()
            wp.Monitor(bus, lambda: None, 60).subscribe()
            bus.subscribe('start', lambda: time.sleep(0.01), priority=75)
            bus.start()
            bus.block()
            """,
            str(pidfile),
        )
        wait_until(pidfile.exists, 'the PID file', timeout=TIMEOUT)
        proc.send_signal(signal.SIGTERM)
        status, out, err = finish(proc)
        assert (status, err) == (0, ''), 'attempt %d' % attempt
        assert lines_of(events)[-1:] == ['exit']
        assert not pidfile.exists(), 'attempt %d' % attempt


# -- Bus: asyncio -------------------------------------------------------------

ASYNC_CHILD = textwrap.dedent("""
    import asyncio, os, sys, threading, time, wspbus_plugins as wp
    out = open(sys.argv[1], 'a', buffering=1)
    def note(*words):
        out.write(' '.join(map(str, words)) + '\\n')
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: level >= 40 and
                  print(msg.splitlines()[0], file=sys.stderr, flush=True))
    handler = wp.SignalHandler(bus)  # Subscribed by the code after this.
    bus.subscribe('stop', lambda: note('stop'))
    bus.subscribe('exit', lambda: note('exit'))
    cleanup = float(sys.argv[2]) if len(sys.argv) > 2 else 0

    async def main():
        note('main', os.getpid())
        try:
            await asyncio.sleep(3600)
        finally:
            note('cleaning')
            await asyncio.sleep(cleanup)
            note('cleaned')
""")


def async_child(child, tmp_path, code='', *args, **kwargs):
    """ASYNC_CHILD + `code` (which runs the bus); return proc, notes."""
    events = tmp_path / ('events%d' % len(child.procs))
    program = ASYNC_CHILD + textwrap.dedent(
        code or 'handler.subscribe()\nprint(bus.run_async(main()))\n'
    )
    return child(program, str(events), *args, **kwargs), events


def stop_and_time(proc, sig=signal.SIGTERM):
    started = time.monotonic()
    proc.send_signal(sig)
    status, out, err = finish(proc)
    return status, out, err, time.monotonic() - started


@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGINT'])
def test_run_async_signal_cancels_main_then_runs_the_exit(
    child, tmp_path, sig
):
    proc, events = async_child(child, tmp_path, '', '0.1')
    wait_for_note(events, 'main %d' % proc.pid)
    status, out, err, seconds = stop_and_time(proc, getattr(signal, sig))
    assert (status, out, err) == (0, 'None\n', '')
    assert lines_of(events)[1:] == ['cleaning', 'cleaned', 'stop', 'exit']
    assert seconds < 1


@pytest.mark.parametrize('where', ['thread', 'listener'])
def test_run_async_exit_from_a_thread_or_a_listener(child, tmp_path, where):
    proc, events = async_child(
        child,
        tmp_path,
        """
        def ask_exit():
            time.sleep(0.2)
            if sys.argv[3] == 'thread':
                bus.exit()
            else:  # A listener of a channel published on the loop.
                bus.subscribe('main', bus.exit)
        threading.Thread(target=ask_exit).start()
        handler.subscribe()
        print(bus.run_async(main()), flush=True)
        """,
        '0',
        where,
    )
    status, out, err = finish(proc, timeout=10)
    assert (status, out, err) == (0, 'None\n', '')
    assert lines_of(events)[1:] == ['cleaning', 'cleaned', 'stop', 'exit']


def test_run_async_exit_while_the_main_task_is_made_cancels_it(
    child, tmp_path
):
    # A task factory lets another thread's exit() land exactly while
    # run_async() makes the main task.
    proc, events = async_child(
        child,
        tmp_path,
        """
        async def served():
            try:
                await asyncio.sleep(5)
                note('never cancelled')
            except asyncio.CancelledError:
                note('cancelled')
                raise
        served = served()
        def factory(loop, coro, **kwargs):
            if coro is served:
                asker = threading.Thread(target=bus.exit)
                asker.start()
                asker.join(0.5)  # Or it waits for the bus.
            return asyncio.Task(coro, loop=loop, **kwargs)
        class Policy(asyncio.DefaultEventLoopPolicy):
            def new_event_loop(self):
                loop = super().new_event_loop()
                loop.set_task_factory(factory)
                return loop
        asyncio.set_event_loop_policy(Policy())
        handler.subscribe()
        print(bus.run_async(served), flush=True)
        """,
    )
    assert finish(proc, timeout=15) == (0, 'None\n', '')
    assert lines_of(events) == ['cancelled', 'stop', 'exit']


@pytest.mark.parametrize(
    'sig', ['SIGTERM', 'SIGINT', 'SIGINT SIGINT', 'SIGHUP SIGINT SIGINT']
)
def test_run_async_signal_just_after_start_is_recorded_not_nested(
    child, tmp_path, sig
):
    # The child signals itself while run_async() makes its event loop,
    # after start() has returned: the signal must be recorded and acted on
    # by the loop, not run the exit inside the interrupted code (SIGTERM)
    # nor raise KeyboardInterrupt out of run_async() (Ctrl+C, and a second
    # Ctrl+C: no transition runs for it to interrupt).
    proc, events = async_child(
        child,
        tmp_path,
        """
        import signal, traceback
        class Policy(asyncio.DefaultEventLoopPolicy):
            def new_event_loop(self):
                if 'SIGNALLED' not in os.environ:  # Not the restarted one.
                    os.environ['SIGNALLED'] = 'yes'
                    for name in sys.argv[3].split():
                        os.kill(os.getpid(), getattr(signal, name))
                return super().new_event_loop()
        def nested():
            names = [frame.name for frame in traceback.extract_stack()]
            if 'new_event_loop' in names:
                note('exit inside new_event_loop')
        bus.subscribe('exit', nested)
        asyncio.set_event_loop_policy(Policy())
        handler.handlers['SIGHUP'] = bus.restart  # Daemonized or not.
        handler.subscribe()
        print(bus.run_async(main()), flush=True)
        """,
        '0',
        sig,
    )
    assert finish(proc, timeout=15) == (0, 'None\n', '')
    # A SIGHUP restarts first; the new image acts on the Ctrl+C it carried.
    lives = 2 if 'SIGHUP' in sig else 1
    assert lines_of(events) == ['stop', 'exit'] * lives


def test_run_async_second_ctrl_c_in_the_bus_own_task_is_an_exit(
    child, tmp_path
):
    # Two Ctrl+C while run_async()'s own driver task runs (here just after
    # it made the main task): the second raised KeyboardInterrupt in that
    # task, which ended it: no stop or exit listener ran, and run_async()
    # raised it.  The program's code is not what was interrupted.
    proc, events = async_child(
        child,
        tmp_path,
        """
        import signal
        armed = [True]
        class Loop(asyncio.SelectorEventLoop):
            def create_future(self):
                if armed[0] and bus._main_task is not None:
                    armed[0] = False
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGINT)
                return super().create_future()
        class Policy(asyncio.DefaultEventLoopPolicy):
            def new_event_loop(self):
                return Loop()
        asyncio.set_event_loop_policy(Policy())
        handler.subscribe()
        print(bus.run_async(main()), flush=True)
        """,
    )
    assert finish(proc, timeout=15) == (0, 'None\n', '')
    assert lines_of(events)[1:] == ['cleaning', 'cleaned', 'stop', 'exit']


def test_run_async_second_ctrl_c_interrupts_a_wedged_main_task(
    child, tmp_path
):
    # The first Ctrl+C is recorded for the loop, which a main task stuck in
    # synchronous code never gives back; the second interrupts it, as
    # asyncio.run() lets a Ctrl+C do.
    proc, events = async_child(
        child,
        tmp_path,
        """
        async def wedged():
            note('wedged')
            time.sleep(60)
        handler.subscribe()
        print(bus.run_async(wedged()), flush=True)
        """,
    )
    wait_for_note(events, 'wedged')
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert finish(proc, timeout=15) == (0, 'None\n', '')
    assert lines_of(events) == ['wedged', 'stop', 'exit']


@pytest.mark.parametrize('taker', ['add_signal_handler', 'set_wakeup_fd'])
def test_run_async_signal_wakes_the_loop_when_the_program_takes_the_fd(
    child, tmp_path, taker
):
    # The program's own signal handling replaces the bus's wakeup fd; a
    # SIGTERM must still wake the loop at once, not at the next `main`
    # tick (20 s here).
    proc, events = async_child(
        child,
        tmp_path,
        """
        import signal
        async def taking():
            if sys.argv[3] == 'add_signal_handler':
                loop = asyncio.get_running_loop()
                loop.add_signal_handler(signal.SIGUSR2, note, 'SIGUSR2')
            else:
                unread = os.pipe()[1]
                os.set_blocking(unread, False)
                signal.set_wakeup_fd(unread)
            await main()
        handler.subscribe()
        print(bus.run_async(taking(), interval=20), flush=True)
        """,
        '0',
        taker,
    )
    wait_for_note(events, 'main %d' % proc.pid)
    status, out, err, seconds = stop_and_time(proc)
    assert (status, out, err) == (0, 'None\n', '')
    assert lines_of(events)[1:] == ['cleaning', 'cleaned', 'stop', 'exit']
    assert seconds < 5


def test_run_async_second_sigterm_cuts_the_cleanup_short(child, tmp_path):
    proc, events = async_child(child, tmp_path, '', '60')
    wait_for_note(events, 'main %d' % proc.pid)
    proc.send_signal(signal.SIGTERM)
    wait_for_note(events, 'cleaning')
    status, out, err, seconds = stop_and_time(proc)
    assert (status, err) == (0, '')
    assert lines_of(events)[1:] == ['cleaning', 'stop', 'exit']
    assert seconds < 1


def test_run_async_returns_the_main_result_and_exits_the_bus(child, tmp_path):
    proc, events = async_child(
        child,
        tmp_path,
        """
        async def answer():
            await asyncio.sleep(0.01)
            return 42
        handler.subscribe()
        print(bus.run_async(answer()), bus.state, flush=True)
        """,
    )
    status, out, err = finish(proc)
    assert (status, out, err) == (0, '42 states.EXITING\n', '')
    assert lines_of(events) == ['stop', 'exit']


def test_run_async_error_in_main_is_logged_status_1_no_pid_file(
    child, tmp_path
):
    pidfile = tmp_path / 'app.pid'
    proc, events = async_child(
        child,
        tmp_path,
        """
        wp.PIDFile(bus, sys.argv[3]).subscribe()
        async def broken():
            await asyncio.sleep(0.01)
            raise ValueError('bad data')
        handler.subscribe()
        bus.run_async(broken())
        """,
        '0',
        str(pidfile),
    )
    status, out, err = finish(proc)
    assert status == 1
    assert err == 'Error in the main task:\n'
    assert lines_of(events) == ['stop', 'exit']
    assert not pidfile.exists()


@pytest.mark.parametrize(
    'raised, status, out',
    [('SystemExit(3)', 3, ''), ('KeyboardInterrupt', 0, 'None\n')],
)
def test_run_async_sys_exit_or_ctrl_c_in_main_still_cleans_up(
    child, tmp_path, raised, status, out
):
    # asyncio lets these two out of run_until_complete() at once.
    pidfile = tmp_path / 'app.pid'
    proc, events = async_child(
        child,
        tmp_path,
        """
        wp.PIDFile(bus, sys.argv[3]).subscribe()
        async def leftover():
            try:
                await asyncio.sleep(3600)
            finally:
                note('leftover cancelled')
        async def quits():
            asyncio.ensure_future(leftover())
            await asyncio.sleep(0.01)
            raise %s
        handler.subscribe()
        print(bus.run_async(quits()), flush=True)
        """
        % raised,
        '0',
        str(pidfile),
    )
    assert finish(proc) == (status, out, '')
    assert lines_of(events) == ['stop', 'exit', 'leftover cancelled']
    assert not pidfile.exists()


async def sleeper():
    await asyncio.sleep(3600)


@pytest.mark.parametrize(
    'main', [sleeper, 42, None], ids=['func', '42', 'None']
)
def test_run_async_refuses_a_non_awaitable_before_starting(bus, main):
    # Before any start listener (Daemonizer's launcher would say "ready").
    bus.subscribe('start', bus.recorder.listener('start'))
    with pytest.raises(TypeError) as raised:
        bus.run_async(main)
    assert str(raised.value) == (
        'run_async() needs an awaitable, such as main(), not %r' % (main,)
    )
    assert bus.recorder.calls == [] and bus.state is wp.states.STOPPED


def test_run_async_closes_main_when_the_start_fails(bus):
    def fail():
        raise ValueError('no database')

    bus.subscribe('start', fail)
    coroutine = sleeper()
    with pytest.raises(HardExit):  # Status 70, as for start().
        bus.run_async(coroutine)
    assert coroutine.cr_frame is None  # Closed: no "never awaited".


def test_run_async_executor_work_never_holds_the_exit(child, tmp_path):
    proc, events = async_child(
        child,
        tmp_path,
        """
        import concurrent.futures
        async def work():
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, time.sleep, 0.01)
            pool = concurrent.futures.ThreadPoolExecutor(2)
            await loop.run_in_executor(pool, time.sleep, 0.01)
            await main()
        handler.subscribe()
        print(bus.run_async(work()), flush=True)
        """,
        '0',
    )
    wait_for_note(events, 'main %d' % proc.pid)
    status, out, err, seconds = stop_and_time(proc)
    assert (status, out, err) == (0, 'None\n', '')
    assert seconds < 1


def test_run_async_graceful_runs_on_the_loop_thread(child, tmp_path):
    proc, events = async_child(
        child,
        tmp_path,
        """
        def graceful():
            asyncio.get_running_loop()  # RuntimeError off the loop.
            note('graceful', threading.current_thread().name)
        bus.subscribe('graceful', graceful)
        handler.subscribe()
        print(bus.run_async(main()), flush=True)
        """,
        '0',
    )
    wait_for_note(events, 'main %d' % proc.pid)
    proc.send_signal(signal.SIGUSR1)
    wait_for_note(events, 'graceful MainThread')
    status, out, err = stop_and_time(proc)[:3]
    assert (status, err) == (0, '')


def test_run_async_restart_reexecutes_with_the_same_pid(child, tmp_path):
    proc, events = async_child(
        child,
        tmp_path,
        """
        handler.handlers['SIGHUP'] = bus.restart
        handler.subscribe()
        print(bus.run_async(main()), flush=True)
        """,
        '0',
    )
    wait_for_note(events, 'main %d' % proc.pid)
    proc.send_signal(signal.SIGHUP)
    wait_for_note(events, 'main %d' % proc.pid, 2)
    status, out, err = stop_and_time(proc)[:3]
    assert (status, err) == (0, '')
    assert lines_of(events).count('exit') == 2


def test_run_async_autoreload_restarts_on_a_file_change(child, tmp_path):
    watched = tmp_path / 'settings.ini'
    watched.write_text('a = 1\n')
    proc, events = async_child(
        child,
        tmp_path,
        """
        reloader = wp.Autoreloader(bus)
        reloader.files.add(sys.argv[3])
        reloader.subscribe()
        handler.subscribe()
        print(bus.run_async(main()), flush=True)
        """,
        '0',
        str(watched),
    )
    wait_for_note(events, 'main %d' % proc.pid)
    edit(watched)
    wait_for_note(events, 'main %d' % proc.pid, 2)
    status, out, err = stop_and_time(proc)[:3]
    assert (status, err) == (0, '')


@needs_fork
def test_run_async_hosts_every_plugin(child, tmp_path, notify_socket):
    # A daemon with a PID file, threads, logging, a watchdog and an asyncio
    # server on an inherited socket; SIGHUP restarts it in place.
    port = free_port()
    code = """
        import logging
        logging.basicConfig(filename=sys.argv[1] + '.log', level=logging.INFO)
        wp.LoggingBridge(bus).subscribe()
        handler.handlers['SIGHUP'] = bus.restart
        handler.subscribe()
        wp.Daemonizer(bus, stdout=sys.argv[1] + '.out',
                      stderr=sys.argv[1] + '.out').subscribe()
        wp.PIDFile(bus, sys.argv[1] + '.pid').subscribe()
        threads = wp.ThreadManager(bus)
        threads.subscribe()
        wp.Monitor(bus, lambda: bus.publish('acquire_thread'), 0.05,
                   name='worker').subscribe()
        wp.SystemdNotifier(bus).subscribe()
        sockets = wp.ListenSockets(bus)
        sockets.subscribe()
        listening = sockets.listen('web', ('127.0.0.1', int(sys.argv[3])))
        async def serve(reader, writer):
            writer.write(b'%d %d\\\\n' % (os.getpid(), len(threads.threads)))
            await writer.drain()
            writer.close()
        async def server():
            srv = await asyncio.start_server(serve, sock=listening)
            note('main', os.getpid())
            try:
                await asyncio.sleep(3600)
            finally:
                srv.close()
        bus.run_async(server())
    """
    proc, events = async_child(
        child,
        tmp_path,
        code,
        '0',
        str(port),
        env={
            'NOTIFY_SOCKET': notify_socket.address,
            'WATCHDOG_USEC': '100000',
        },
    )
    assert finish(proc)[0] == 0  # The launcher: the daemon is ready.
    pid = read_pid(str(events) + '.pid')
    child.track(pid)
    wait_for_note(events, 'main %d' % pid)
    reply = ask(('127.0.0.1', port))
    assert reply.split()[0] == str(pid)
    os.kill(pid, signal.SIGHUP)
    wait_for_note(events, 'main %d' % pid, 2)
    assert ask(('127.0.0.1', port)).split()[0] == str(pid)
    messages = datagrams(notify_socket, 8)
    assert 'WATCHDOG=1' in messages and 'RELOADING=1' in '\n'.join(messages)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), 'the daemon to exit')
    assert not os.path.exists(str(events) + '.pid')
    assert 'Bus EXITED' in (tmp_path / (events.name + '.log')).read_text()


def test_run_async_signal_storm_between_runs_never_kills(child, tmp_path):
    # Between two runs the handled signals must never meet SIG_DFL.
    proc, events = async_child(
        child,
        tmp_path,
        """
        async def quick():
            return 1
        handler.subscribe()
        note('storm me')
        for _ in range(300):
            bus.run_async(quick())
        print('survived', flush=True)
        """,
    )
    wait_for_note(events, 'storm me')
    while proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            break
        time.sleep(0.0005)
    assert finish(proc) == (0, 'survived\n', '')


RESTART_WITH_A_SLOW_STEP = """
    handler.handlers['SIGHUP'] = bus.restart
    handler.subscribe()
    def slow():
        note('slow')
        time.sleep(0.5)
    if 'main' not in open(sys.argv[1]).read() and sys.argv[3] != 'cleanup':
        bus.subscribe(sys.argv[3], slow)  # The first image's only.
    bus.subscribe('graceful', lambda: note('graceful'))
    print(bus.run_async(main()), flush=True)
"""


@pytest.mark.parametrize(
    'where, sig',
    [
        ('exit', 'SIGTERM'),
        ('exit', 'SIGINT'),
        ('exit', 'SIGHUP'),
        ('stop', 'SIGUSR1'),
        ('cleanup', 'SIGTERM'),
        ('cleanup', 'SIGUSR1'),
    ],
)
def test_run_async_signal_during_a_restart_reaches_the_new_image(
    child, tmp_path, where, sig
):
    # As under block(): the signal is kept across the re-exec, and a
    # SIGTERM during a restart is a first signal, not a hurry.
    cleanup = '0.5' if where == 'cleanup' else '0'
    proc, events = async_child(
        child, tmp_path, RESTART_WITH_A_SLOW_STEP, cleanup, where
    )
    wait_for_note(events, 'main %d' % proc.pid)
    proc.send_signal(signal.SIGHUP)
    wait_for_note(events, 'cleaning' if where == 'cleanup' else 'slow')
    proc.send_signal(getattr(signal, sig))
    if sig == 'SIGHUP':  # The new image restarts at once, maybe before main.
        wait_until(
            lambda: (
                lines_of(events).count('exit') == 2
                and lines_of(events)[-1] == 'main %d' % proc.pid
            ),
            'a third image; notes: %r' % lines_of(events),
        )
    elif sig == 'SIGUSR1':
        wait_for_note(events, 'graceful')
    if sig in ('SIGHUP', 'SIGUSR1'):
        proc.send_signal(signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, out, err) == (0, 'None\n', '')
    assert lines_of(events).count('exit') == (3 if sig == 'SIGHUP' else 2)


def test_run_async_second_sigterm_stops_waiting_for_a_stubborn_main(
    child, tmp_path
):
    proc, events = async_child(
        child,
        tmp_path,
        """
        async def stubborn():
            note('main', os.getpid())
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    note('swallowed')
        handler.subscribe()
        print(bus.run_async(stubborn()), flush=True)
        """,
    )
    wait_for_note(events, 'main %d' % proc.pid)
    proc.send_signal(signal.SIGTERM)
    wait_for_note(events, 'swallowed')
    status, out, err, seconds = stop_and_time(proc)
    assert (status, out, err) == (0, 'None\n', '')
    notes = lines_of(events)
    assert notes[notes.index('stop') :][:2] == ['stop', 'exit']
    assert seconds < 5


def test_run_async_leftover_task_ignoring_cancel_is_named_not_destroyed(
    child, tmp_path
):
    proc, events = async_child(
        child,
        tmp_path,
        """
        bus.subscribe('log', lambda msg, level: 'task' in msg and
                      note(msg.split(' <')[0]))
        async def stubborn():
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass
        async def leaves_one():
            asyncio.ensure_future(stubborn())
            await asyncio.sleep(0.01)
        handler.subscribe()
        print(bus.run_async(leaves_one()), flush=True)
        """,
    )
    wait_for_note(events, 'Waiting for task')
    status, out, err = stop_and_time(proc)[:3]
    assert (status, out, err) == (0, 'None\n', '')
    assert lines_of(events) == [
        'stop',
        'exit',
        'Waiting for task',
        'Not waiting for tasks',
    ]


@pytest.mark.parametrize(
    'channel, raised, status, out',
    [
        ('exit', 'KeyboardInterrupt', 0, 'None\n'),
        ('exit', 'SystemExit(4)', 4, ''),
        ('stop', 'SystemExit(4)', 4, ''),
    ],
)
def test_run_async_sys_exit_or_ctrl_c_in_a_listener_ends_as_block_does(
    child, tmp_path, channel, raised, status, out
):
    proc, events = async_child(
        child,
        tmp_path,
        """
        def quits():
            raise %s
        bus.subscribe(sys.argv[3], quits, priority=90)  # After the notes.
        async def leftover():
            try:
                await asyncio.sleep(3600)
            finally:
                note('leftover cancelled')
        async def serve():
            asyncio.ensure_future(leftover())
            await main()
        handler.subscribe()
        print(bus.run_async(serve()), flush=True)
        """
        % raised,
        '0',
        channel,
    )
    wait_for_note(events, 'main %d' % proc.pid)
    assert stop_and_time(proc)[:3] == (status, out, '')
    assert lines_of(events)[-3:] == ['stop', 'exit', 'leftover cancelled']


def test_run_async_executor_work_running_at_exit_finishes_quietly(
    child, tmp_path
):
    # Python 3.8 and 3.9 called back into the closed loop.
    proc, events = async_child(
        child,
        tmp_path,
        """
        async def busy():
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, time.sleep, 0.5)
            await main()
        handler.subscribe()
        print(bus.run_async(busy()), flush=True)
        """,
        '0',
    )
    wait_for_note(events, 'main %d' % proc.pid)
    assert stop_and_time(proc)[:3] == (0, 'None\n', '')


def test_run_async_inside_a_running_loop_is_refused_before_starting(bus):
    bus.subscribe('start', bus.recorder.listener('start'))
    coroutine = sleeper()

    async def nested():
        bus.run_async(coroutine)

    with pytest.raises(RuntimeError) as raised:
        asyncio.run(nested())
    assert str(raised.value) == (
        'run_async() cannot be called from a running event loop'
    )
    assert bus.recorder.calls == [] and bus.state is wp.states.STOPPED
    assert coroutine.cr_frame is None  # Closed: no "never awaited".


@pytest.mark.parametrize(
    'interval', ['x', None, 0, -1, float('nan'), float('inf'), True]
)
def test_run_async_and_block_refuse_a_bad_interval(bus, interval):
    bus.subscribe('start', bus.recorder.listener('start'))
    message = 'Invalid interval: %r (seconds, a finite number > 0)' % (
        interval,
    )
    coroutine = sleeper()
    with pytest.raises(ValueError) as raised:
        bus.run_async(coroutine, interval)
    assert str(raised.value) == message
    assert coroutine.cr_frame is None
    with pytest.raises(ValueError) as raised:
        bus.block(interval)
    assert str(raised.value) == message
    assert bus.recorder.calls == [] and bus.state is wp.states.STOPPED


def test_run_async_loop_stopped_by_the_program_still_cleans_up(
    child, tmp_path
):
    pidfile = tmp_path / 'app.pid'
    proc, events = async_child(
        child,
        tmp_path,
        """
        wp.PIDFile(bus, sys.argv[3]).subscribe()
        async def stops():
            asyncio.get_running_loop().stop()
            await main()
        handler.subscribe()
        bus.run_async(stops())
        """,
        '0',
        str(pidfile),
    )
    status, out, err = finish(proc)
    assert (status, err) == (1, 'Error in the event loop:\n')
    assert lines_of(events)[-2:] == ['stop', 'exit']
    assert not pidfile.exists()


def test_run_async_main_cancelled_unasked_is_an_error(child, tmp_path):
    proc, events = async_child(
        child,
        tmp_path,
        """
        async def cancelled():
            raise asyncio.CancelledError
        handler.subscribe()
        bus.run_async(cancelled())
        """,
    )
    assert finish(proc) == (1, '', 'Error in the main task:\n')
    assert lines_of(events) == ['stop', 'exit']


def test_run_async_failing_main_listener_is_logged_once_by_the_bus(
    child, tmp_path
):
    proc, events = async_child(
        child,
        tmp_path,
        """
        def fails():
            note('tick')
            raise ValueError('bad tick')
        bus.subscribe('main', fails)
        handler.subscribe()
        print(bus.run_async(main(), 0.01), flush=True)
        """,
    )
    wait_for_note(events, 'tick', 3)
    status, out, err = stop_and_time(proc)[:3]
    assert (status, out) == (0, 'None\n')
    lines = err.splitlines()
    assert lines and all(
        line.startswith("Error in 'main' listener <function fails")
        for line in lines
    ), err


# -- SimplePlugin -------------------------------------------------------------


def test_simpleplugin_subscribes_methods_named_like_channels(bus):
    calls = []

    class Plugin(wp.SimplePlugin):
        def start(self):
            calls.append('start')

        start.priority = 10

        def graceful(self):
            calls.append('graceful')

        def not_a_channel(self):
            calls.append('no')

    plugin = Plugin(bus)
    plugin.subscribe()
    assert bus._priorities[('start', plugin.start)] == 10
    bus.start()
    bus.graceful()
    plugin.unsubscribe()
    bus.graceful()
    assert calls == ['start', 'graceful']
    assert repr(plugin) == 'Plugin(<Bus states.STARTED>)'


# -- SignalHandler ------------------------------------------------------------


def test_signalhandler_default_handlers(bus):
    handler = wp.SignalHandler(bus)
    assert handler.handlers == {
        'SIGTERM': bus.exit,
        'SIGHUP': handler.handle_SIGHUP,
        'SIGUSR1': bus.graceful,
    }
    assert handler.signals[signal.SIGTERM] == 'SIGTERM'
    assert handler.signals[signal.SIGIO] == 'SIGIO'  # Not its alias SIGPOLL.


def test_signalhandler_java_platform_uses_sigusr2_and_sigint(bus, monkeypatch):
    monkeypatch.setattr(wp, '_JYTHON', True)
    handler = wp.SignalHandler(bus)
    assert set(handler.handlers) == {'SIGTERM', 'SIGHUP', 'SIGUSR2', 'SIGINT'}
    assert handler.handlers['SIGINT'] == handler._jython_SIGINT_handler
    assert 'Using SIGUSR2 instead' in bus.recorder.messages()[0]
    bus.start()
    handler._jython_SIGINT_handler()
    assert bus.state is wp.states.EXITING


@pytest.fixture
def signal_handler(bus):
    handler = wp.SignalHandler(bus)
    yield handler
    handler.unsubscribe()


@pytest.mark.parametrize('sig', ['SIGUSR2', signal.SIGUSR2])
def test_signalhandler_set_handler_by_name_and_number(signal_handler, sig):
    got = []
    signal_handler.set_handler(sig, lambda: got.append(1))
    os.kill(os.getpid(), signal.SIGUSR2)
    wait_until(lambda: got, 'the SIGUSR2 listener')
    assert 'Caught signal SIGUSR2.' in signal_handler.bus.recorder.messages()


def test_signalhandler_alias_name_reaches_its_listener(signal_handler):
    got = []
    signal_handler.set_handler('SIGPOLL', lambda: got.append(1))
    os.kill(os.getpid(), signal.SIGIO)
    wait_until(lambda: got, 'the SIGPOLL listener')


@pytest.mark.parametrize(
    'bad', ['SIGNOPE', 'SIG_DFL', 'signal', 12345, None, True]
)
def test_signalhandler_unknown_signal_is_a_valueerror(signal_handler, bad):
    with pytest.raises(
        ValueError, match=re.escape('No such signal: %r' % (bad,))
    ):
        signal_handler.set_handler(bad)


@pytest.mark.parametrize('bad', ['SIGKILL', signal.SIGSTOP])
def test_signalhandler_uncatchable_signal_is_a_valueerror(signal_handler, bad):
    with pytest.raises(ValueError, match='SIG(KILL|STOP) cannot be handled'):
        signal_handler.set_handler(bad)
    signal_handler.handlers = {'SIGKILL': print, 'SIGUSR2': print}
    signal_handler.subscribe()  # Logs the one, handles the other.
    assert signal.getsignal(signal.SIGUSR2) == signal_handler._handle_signal
    messages = signal_handler.bus.recorder.messages()
    assert 'Could not handle SIGKILL: SIGKILL cannot be handled' in messages


def test_signalhandler_unsubscribe_restores_previous_handlers(bus):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        handler = wp.SignalHandler(bus)
        handler.subscribe()
        handler.subscribe()  # Twice: the previous handler is still mine.
        assert signal.getsignal(signal.SIGUSR1) == handler._handle_signal
        handler.unsubscribe()
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_signalhandler_outside_main_thread_does_nothing(bus):
    handler = wp.SignalHandler(bus)
    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=handler.subscribe)
    thread.start()
    thread.join(TIMEOUT)
    assert signal.getsignal(signal.SIGTERM) == before
    assert any(
        'only be set on the main thread' in m
        for m in bus.recorder.messages(30)
    )


def test_signalhandler_skips_signals_the_platform_lacks(bus, monkeypatch):
    monkeypatch.delattr(wp._signal, 'SIGHUP')
    monkeypatch.delattr(wp._signal, 'SIGUSR1')
    handler = wp.SignalHandler(bus)
    try:
        handler.subscribe()
        assert set(handler._previous_handlers) == {signal.SIGTERM}
    finally:
        handler.unsubscribe()


SIGNAL_CHILD = """
    import os, sys, wspbus_plugins as wp
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: print(msg, file=sys.stderr,
                                                  flush=True))
    wp.SignalHandler(bus).subscribe()
    for channel in ('graceful', 'exit'):
        bus.subscribe(channel, lambda c=channel: print(c, flush=True))
    bus.subscribe('started', lambda: open(sys.argv[1], 'w').close())
    bus.subscribe('graceful', lambda: open(sys.argv[1] + '.graceful',
                                           'w').close())
    bus.start()
    bus.block()
"""


def start_signal_child(child, tmp_path, **kwargs):
    ready = tmp_path / 'ready'
    proc = child(SIGNAL_CHILD, str(ready), **kwargs)
    wait_until(ready.exists, 'the child to start')
    return proc


def test_signalhandler_sigterm_exits_the_process(child, tmp_path):
    proc = start_signal_child(child, tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, out) == (0, 'exit\n'), err
    assert 'Caught signal SIGTERM.' in err


def test_signalhandler_sigusr1_runs_graceful(child, tmp_path):
    proc = start_signal_child(child, tmp_path)
    os.kill(proc.pid, signal.SIGUSR1)
    wait_until((tmp_path / 'ready.graceful').exists, 'graceful to run')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, out) == (0, 'graceful\nexit\n'), err


def test_signalhandler_sighup_exits_when_not_daemonized(child, tmp_path):
    proc = start_signal_child(child, tmp_path)
    os.kill(proc.pid, signal.SIGHUP)
    status, out, err = finish(proc)
    assert (status, out) == (0, 'exit\n'), err
    assert 'SIGHUP caught but not daemonized. Exiting.' in err


@needs_fork
def test_signalhandler_sighup_exits_when_attached_to_a_terminal(
    child, tmp_path
):
    # Forked, as a daemon is, but its stdin is a terminal: SIGHUP means the
    # terminal closed, so it exits instead of restarting.
    log = tmp_path / 'log'
    controller, terminal = pty.openpty()
    try:
        proc = child(
            """
            import os, sys, wspbus_plugins as wp
            bus = wp.Bus()
            handler = wp.SignalHandler(bus)  # Remembers the first PID.
            if os.fork():
                os._exit(0)
            out = open(sys.argv[1], 'a', buffering=1)
            bus.subscribe('log', lambda msg, level: out.write(msg + '\\n'))
            handler.subscribe()
            bus.subscribe('started', lambda: out.write('PID %d\\n'
                                                       % os.getpid()))
            bus.start()
            bus.block()
            """,
            str(log),
            stdin=terminal,
        )
        proc.wait(TIMEOUT)  # Its fork keeps the pipes open.
        wait_until(lambda: 'Bus STARTED' in lines_of(log), 'the fork')
        [pid] = [int(x[4:]) for x in lines_of(log) if x.startswith('PID ')]
        child.track(pid)
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: not pid_alive(pid), 'the forked child to exit')
    finally:
        os.close(controller)
        os.close(terminal)
    assert 'SIGHUP caught but not daemonized. Exiting.' in lines_of(log)
    assert 'Bus EXITED' in lines_of(log)


DAEMON_CHILD = """
    import os, sys, time, wspbus_plugins as wp
    pidfile, starts = sys.argv[1], sys.argv[2]
    bus = wp.Bus()
    log = open(sys.argv[3], 'a', buffering=1)
    bus.subscribe('log', lambda msg, level: log.write(msg + '\\n'))
    wp.SignalHandler(bus).subscribe()
    wp.Daemonizer(bus, stdout=sys.argv[3], stderr=sys.argv[3]).subscribe()
    wp.PIDFile(bus, pidfile).subscribe()
    def record():
        with open(starts, 'a') as f:
            f.write('%d %d %d %03o\\n' % (os.getpid(), os.getsid(0),
                                          os.getpgid(0), os.umask(0)))
    bus.subscribe('started', record, priority=40)  # Before READY (50).
    bus.start()
    bus.block()
"""


def start_daemon(child, tmp_path, code=DAEMON_CHILD, **kwargs):
    paths = [tmp_path / name for name in ('app.pid', 'starts', 'daemon.log')]
    proc = child(code, *map(str, paths), **kwargs)
    status, out, err = finish(proc)
    try:  # With wait_ready=False the daemon may not have written it yet.
        child.track(read_pid(paths[0]))
    except (OSError, ValueError):
        pass
    return (status, out, err) + tuple(paths)


@needs_fork
def test_signalhandler_sighup_restarts_a_daemon_in_place(child, tmp_path):
    status, _, err, pidfile, starts, log = start_daemon(child, tmp_path)
    assert status == 0, err
    pid = read_pid(pidfile)
    for count in (2, 3):  # Twice: a re-executed daemon is still a daemon.
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda n=count: len(lines_of(starts)) == n, 'a restart')
    assert {line.split()[0] for line in lines_of(starts)} == {str(pid)}
    assert read_pid(pidfile) == pid
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), 'the daemon to exit')
    assert not pidfile.exists()
    assert 'SIGHUP caught while daemonized. Restarting.' in log.read_text()


# -- ConsoleCtrlHandler -------------------------------------------------------


class FakeKernel32:
    def __init__(self):
        self.handlers = []

    def SetConsoleCtrlHandler(self, callback, add):
        if add:
            self.handlers.append(callback)
        else:
            self.handlers.remove(callback)
        return 1


@pytest.fixture
def windows_console(monkeypatch):
    kernel32 = FakeKernel32()
    monkeypatch.setattr(wp, '_WINDOWS', True)
    monkeypatch.setattr(
        ctypes,
        'windll',
        type('windll', (), {'kernel32': kernel32}),
        raising=False,
    )
    return kernel32


@pytest.mark.parametrize('event', sorted(wp._CONSOLE_EVENTS))
def test_consolectrlhandler_exits_the_bus_on_each_event(
    bus, windows_console, event
):
    handler = wp.ConsoleCtrlHandler(bus)
    handler.subscribe()
    bus.start()
    [callback] = windows_console.handlers
    assert callback(event) == 1  # Through the real ctypes callback.
    assert bus.state is wp.states.EXITING
    assert windows_console.handlers == []  # Unregistered first.
    assert handler.is_set is False
    assert (
        'Console event %s: shutting down bus' % wp._CONSOLE_EVENTS[event]
        in bus.recorder.messages()
    )


def test_consolectrlhandler_ignores_unknown_events(bus, windows_console):
    handler = wp.ConsoleCtrlHandler(bus)
    handler.subscribe()
    bus.start()
    assert windows_console.handlers[0](3) == 0
    assert bus.state is wp.states.STARTED


def test_consolectrlhandler_is_a_logged_noop_elsewhere(bus):
    wp.ConsoleCtrlHandler(bus).subscribe()
    assert bus.listeners['start'] == set()
    assert 'ConsoleCtrlHandler does nothing' in bus.recorder.messages()[0]


# -- DropPrivileges -----------------------------------------------------------

DROP_CHILD = """
    import json, os, sys, wspbus_plugins as wp
    uid, gid, umask, groups = json.loads(sys.argv[1])
    os.setgroups(groups)  # Root's own supplementary groups, to lose.
    bus = wp.Bus()
    wp.DropPrivileges(bus, uid=uid, gid=gid, umask=umask).subscribe()
    bus.start()
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    print(json.dumps([os.getresuid(), os.getresgid(),
                      sorted(os.getgroups()), os.umask(0), regained]))
    bus.exit()
"""


@needs_root
@pytest.mark.parametrize('by', ['name', 'number'])
def test_dropprivileges_switches_user_group_and_umask(child, by):
    import grp
    import json
    import pwd

    nobody = pwd.getpwnam('nobody')
    group = next(g for g in ('nogroup', 'nobody') if _group_exists(g))
    gid = grp.getgrnam(group).gr_gid
    ids = ['nobody', group] if by == 'name' else [nobody.pw_uid, gid]
    status, out, err = finish(
        child(DROP_CHILD, json.dumps(ids + [0o027, [0, 1, 2]]))
    )
    assert status == 0, err
    assert json.loads(out) == [
        [nobody.pw_uid] * 3,
        [gid] * 3,
        [],  # setgroups([]): none of root's groups is left.
        0o027,
        False,
    ]


@needs_root
@pytest.mark.parametrize('by', ['name', 'number'])
def test_dropprivileges_uid_alone_takes_the_users_groups(child, by):
    import json
    import pwd

    nobody = pwd.getpwnam('nobody')
    uid = 'nobody' if by == 'name' else nobody.pw_uid
    status, out, err = finish(
        child(DROP_CHILD, json.dumps([uid, None, None, [0, 1, 2]]))
    )
    assert status == 0, err
    resuid, resgid, groups, _, regained = json.loads(out)
    assert resuid == [nobody.pw_uid] * 3 and not regained
    assert resgid == [nobody.pw_gid] * 3  # Not root's group 0.
    assert groups == sorted(set(os.getgrouplist('nobody', nobody.pw_gid)))
    assert 0 not in groups


def _group_exists(name):
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'uid': 'no-such-user-x'}, "No such user: 'no-such-user-x'"),
        ({'gid': 'no-such-group-x'}, "No such group: 'no-such-group-x'"),
        ({'uid': -1}, 'Invalid uid: -1'),
        ({'gid': 1.5}, 'Invalid gid: 1.5'),
        ({'umask': 0o1000}, 'Invalid umask: 512'),
        ({'umask': '022'}, "Invalid umask: '022'"),
    ],
)
def test_dropprivileges_bad_input_is_named_at_construction(
    bus, kwargs, message
):
    with pytest.raises(ValueError, match=re.escape(message)):
        wp.DropPrivileges(bus, **kwargs)


def test_dropprivileges_numeric_uid_without_user_needs_a_gid(bus):
    import pwd

    uid = 54321
    while True:  # A uid no user has.
        try:
            pwd.getpwuid(uid)
        except KeyError:
            break
        uid += 1
    with pytest.raises(
        ValueError,
        match=re.escape(
            'uid %r has no passwd entry, so its group is unknown: give a '
            'gid too.' % uid
        ),
    ):
        wp.DropPrivileges(bus, uid=uid)
    assert wp.DropPrivileges(bus, uid=uid, gid=uid).uid == uid


def test_dropprivileges_without_pwd_and_grp_ignores_ids(bus, monkeypatch):
    monkeypatch.setitem(sys.modules, 'pwd', None)
    monkeypatch.setitem(sys.modules, 'grp', None)
    plugin = wp.DropPrivileges(bus, uid='nobody', gid='nogroup')
    assert (plugin.uid, plugin.gid) == (None, None)
    assert bus.recorder.messages(30) == [
        'pwd module not available; ignoring uid.',
        'grp module not available; ignoring gid.',
    ]


def test_dropprivileges_start_once_and_logs(bus):
    plugin = wp.DropPrivileges(bus, umask=os.umask(0o022))
    os.umask(0o022)
    plugin.subscribe()
    bus.start()
    bus.stop()
    bus.start()
    assert plugin.finalized
    messages = bus.recorder.messages()
    assert 'uid/gid not set' in messages
    assert 'umask old: 022, new: 022' in messages
    assert 'umask already set to: 022' in messages
    assert bus._priorities[('start', plugin.start)] == 77


# -- Daemonizer ---------------------------------------------------------------


@needs_fork
def test_daemonizer_detaches_and_pidfile_names_the_daemon(child, tmp_path):
    status, out, err, pidfile, starts, log = start_daemon(child, tmp_path)
    assert status == 0, err
    # The launcher returned 0: the PID file is already there.
    assert pidfile.read_text() == '%d\n' % read_pid(pidfile)
    pid = read_pid(pidfile)
    launcher = child.procs[0].pid
    assert pid != launcher and pid_alive(pid)
    [line] = lines_of(starts)
    daemon, sid, pgid, umask = line.split()
    assert int(daemon) == pid
    assert int(sid) != pid  # Not a session leader ...
    # ... in a session of its own: not the launcher's (a session leader
    # itself: the child fixture starts a new session), nor ours.
    assert int(sid) not in (launcher, os.getsid(0))
    assert int(pgid) == int(sid)
    assert umask == '000'
    assert os.readlink('/proc/%d/fd/1' % pid) == str(log)
    assert os.readlink('/proc/%d/fd/0' % pid) == os.devnull
    assert oct(os.stat(pidfile).st_mode & 0o777) == '0o644'
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), 'the daemon to exit')
    assert not pidfile.exists()
    assert 'Daemonized to PID: %d' % pid in log.read_text()


FAILING_DAEMON = textwrap.dedent(DAEMON_CHILD).replace(
    'bus.start()',
    """
def broken():
    raise ValueError('cannot bind port 80')
bus.subscribe('start', broken, priority=90)
bus.start()""",
)


@needs_fork
def test_daemonizer_reports_a_failed_start_to_the_launcher(child, tmp_path):
    status, out, err, pidfile, starts, log = start_daemon(
        child, tmp_path, FAILING_DAEMON
    )
    assert status == 1
    assert 'failed to start' in err
    assert "Error in 'start' listener" in err
    assert 'ValueError: cannot bind port 80' in err
    assert err.count('Traceback') == 1  # One readable block.
    assert not pidfile.exists()
    pid = int(re.search(r'Daemon (\d+)', err).group(1))
    wait_until(lambda: not pid_alive(pid), 'the failed daemon to go')


def slow_daemon(seconds):
    """DAEMON_CHILD whose last start listener takes `seconds`."""
    return (
        textwrap.dedent(DAEMON_CHILD)
        .replace(
            'wp.Daemonizer(bus, stdout=sys.argv[3], stderr=sys.argv[3])',
            'wp.Daemonizer(bus, stdout=sys.argv[3], stderr=sys.argv[3], '
            'ready_timeout=0.5)',
        )
        .replace(
            'bus.start()',
            """
wp._KILL_AFTER = 2.0  # Not 5 s: a shorter test.
bus.subscribe('start', lambda: time.sleep(%r), priority=90)
bus.start()"""
            % seconds,
        )
    )


# Child code: restart() asked from another thread, as the Autoreloader asks
# (asked by the starting thread itself, it would fail the start).
RESTART_FROM_A_THREAD = """
import threading
def restart_from_a_thread():
    asker = threading.Thread(target=bus.restart)
    asker.start()
    asker.join()
"""


@needs_fork
@pytest.mark.parametrize('then', ['ready', 'restart again', 'fail'])
def test_daemonizer_launcher_waits_for_the_image_a_restart_executes(
    child, tmp_path, then
):
    # A restart() asked during the daemon's first start (an Autoreloader
    # seeing a save): the launcher's verdict is the new image's.  'restart
    # again' asks for a second one before the new image's Daemonizer
    # listener (priority 65) has run.
    code = textwrap.dedent(DAEMON_CHILD).replace(
        'bus.start()',
        RESTART_FROM_A_THREAD
        + """
life = int(os.environ.get('LIFE', '0')) + 1
os.environ['LIFE'] = str(life)
if life == 1:
    bus.subscribe('start', restart_from_a_thread, priority=80)
elif life == 2 and sys.argv[4] == 'restart again':
    bus.subscribe('start', restart_from_a_thread, priority=50)
elif sys.argv[4] == 'fail':
    def fail():
        raise ValueError('bad config after the reload')
    bus.subscribe('start', fail, priority=80)
bus.start()""",
    )
    paths = [tmp_path / name for name in ('app.pid', 'starts', 'daemon.log')]
    status, out, err = finish(child(code, *map(str, paths), then))
    pidfile, starts, log = paths
    pid = int(re.search(r'Daemonized to PID: (\d+)', log.read_text())[1])
    child.track(pid)
    if then == 'fail':
        assert status == 1
        assert 'ValueError: bad config after the reload' in err
        wait_until(lambda: not pid_alive(pid), 'the failed daemon to go')
        assert not pidfile.exists()
        return
    assert status == 0, err
    assert read_pid(pidfile) == pid
    assert lines_of(starts)[0].split()[0] == str(pid)
    lives = 3 if then == 'restart again' else 2
    assert log.read_text().count('Bus STARTING') == lives
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), 'the daemon to exit')
    assert not pidfile.exists()


@needs_fork
@pytest.mark.parametrize('sig', ['SIGHUP', 'SIGTERM'])
def test_daemonizer_signal_in_the_new_images_set_up_waits_for_its_plugins(
    child, tmp_path, sig
):
    # A restart() before READY; the new image's SignalHandler is in place,
    # its Daemonizer and PIDFile not yet (the program loads its settings
    # in between) when the signal comes.  A SIGHUP waits for them (else
    # the launcher hears of a failure, the PID file loses its lock); a
    # SIGTERM acts at once, and the PID file handed over goes all the same.
    code = (
        textwrap.dedent(DAEMON_CHILD)
        .replace(
            'wp.SignalHandler(bus).subscribe()',
            """wp.SignalHandler(bus).subscribe()
life = int(os.environ.get('LIFE', '0')) + 1
os.environ['LIFE'] = str(life)
if life == 2:
    with open(pidfile + '.set-up', 'w') as f:
        f.write('%d' % os.getpid())
    deadline = time.monotonic() + 10
    while not os.path.exists(pidfile + '.signalled'):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)  # The signal has come: the settings load on.
""",
        )
        .replace(
            'bus.start()',
            RESTART_FROM_A_THREAD
            + """
if life == 1:
    bus.subscribe('start', restart_from_a_thread, priority=80)
bus.start()""",
        )
    )
    paths = [tmp_path / name for name in ('app.pid', 'starts', 'daemon.log')]
    pidfile, starts, log = paths
    launcher = child(code, *map(str, paths))
    set_up = tmp_path / 'app.pid.set-up'
    wait_until(lambda: set_up.exists() and set_up.read_text(), 'set-up')
    pid = int(set_up.read_text())
    child.track(pid)
    os.kill(pid, getattr(signal, sig))
    (tmp_path / 'app.pid.signalled').touch()
    status, out, err = finish(launcher)
    if sig == 'SIGTERM':  # At once: the set-up may hang.
        assert status == 1
        assert 'exited before it was ready' in err
        wait_until(lambda: not pid_alive(pid), 'the daemon to exit')
        assert not pidfile.exists()
        return
    assert status == 0, err  # It became ready, then restarted.
    wait_until(lambda: len(lines_of(starts)) == 2, 'the SIGHUP restart')
    assert read_pid(pidfile) == pid
    assert log.read_text().count('kept across the restart') == 2
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), 'the daemon to exit')
    assert not pidfile.exists()


@needs_fork
@pytest.mark.parametrize('seconds', [1, 60], ids=['slow', 'stuck'])
def test_daemonizer_launcher_gives_up_after_ready_timeout(
    child, tmp_path, seconds
):
    started = time.monotonic()
    status, out, err, pidfile, starts, log = start_daemon(
        child, tmp_path, slow_daemon(seconds)
    )
    assert status == 1
    assert 'was not ready after 0.5 seconds' in err
    pid = int(re.search(r'Daemon (\d+)', err).group(1))
    child.track(pid)
    wait_until(lambda: not pid_alive(pid), 'the daemon to be stopped')
    assert time.monotonic() - started < 2.0 + 5
    if seconds < 2.0:  # SIGTERM, acted on once the start ended.
        assert not pidfile.exists()
        assert 'Caught signal SIGTERM.' in log.read_text()
    else:  # Stuck for good: SIGKILL'd, its PID file left stale.
        assert read_pid(pidfile) == pid


@needs_fork
def test_daemonizer_launcher_reads_messages_not_text(child, tmp_path):
    # The error text holds a line 'READY': still an error.
    code = FAILING_DAEMON.replace(
        "'cannot bind port 80'", "'bad key:\\nREADY\\nin app.ini'"
    )
    status, out, err, pidfile, starts, log = start_daemon(
        child, tmp_path, code
    )
    assert status == 1, err
    assert 'failed to start' in err
    assert 'ValueError: bad key:\nREADY\nin app.ini' in err
    assert not pidfile.exists()


def start_daemon_with_worker(child, tmp_path, then):
    """Start a daemon whose start listener forks a worker (which inherits
    the readiness pipe) and then runs `then`; return what start_daemon
    does.  ready_timeout is 60 s: longer than finish() waits."""
    code = (
        textwrap.dedent(DAEMON_CHILD)
        .replace(
            'stderr=sys.argv[3])',
            'stderr=sys.argv[3], ready_timeout=60)',
        )
        .replace(
            'bus.start()',
            """
def fork_worker():
    worker = os.fork()
    if worker == 0:
        time.sleep(60)
        os._exit(0)
    with open(sys.argv[2] + '.worker', 'w') as f:
        f.write('%d' % worker)
    """
            + then
            + """
bus.subscribe('start', fork_worker, priority=90)
bus.start()""",
        )
    )
    worker_file = tmp_path / 'starts.worker'
    try:
        return start_daemon(child, tmp_path, code)
    finally:
        if worker_file.exists():
            child.track(int(worker_file.read_text()))


@needs_fork
def test_daemonizer_launcher_reports_an_error_at_once_despite_workers(
    child, tmp_path
):
    status, out, err, pidfile, starts, log = start_daemon_with_worker(
        child, tmp_path, "raise ValueError('cannot bind port 80')"
    )
    assert status == 1, err  # At once: not after the 60 s ready_timeout.
    assert 'ValueError: cannot bind port 80' in err
    assert 'was not ready after' not in err


@needs_fork
@pytest.mark.parametrize('with_worker', [False, True])
def test_daemonizer_launcher_fails_when_the_daemon_dies_silently(
    child, tmp_path, with_worker
):
    # The daemon ends before it is ready without reporting anything.
    if with_worker:
        status, out, err, pidfile, starts, log = start_daemon_with_worker(
            child, tmp_path, 'os._exit(0)'
        )
    else:
        code = textwrap.dedent(DAEMON_CHILD).replace(
            'bus.start()',
            "bus.subscribe('start', lambda: os._exit(0), priority=90)\n"
            'bus.start()',
        )
        status, out, err, pidfile, starts, log = start_daemon(
            child, tmp_path, code
        )
    assert status == 1, err
    assert re.search(
        r'^Daemon \d+ failed to start:\nit exited before it was ready\.$',
        err,
        re.M,
    ), err


CLOSE_AND_EXEC = """
    import os, sys
    for fd in sys.argv[1].split(','):
        os.close(int(fd))
    os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


@needs_fork
@pytest.mark.parametrize('stdio', ['1', '2', '0,1,2', 'replaced'])
def test_daemonizer_works_with_stdio_closed_or_replaced(
    child, tmp_path, stdio
):
    # As `python app.py >&-` from an init script, or a program that set
    # sys.stdout to an object without a file descriptor.
    code = textwrap.dedent(DAEMON_CHILD).replace(
        'bus.start()',
        "bus.subscribe('started', lambda: print('printed', flush=True))\n"
        'bus.start()',
    )
    if stdio == 'replaced':
        code = 'import io, sys\nsys.stdout = io.StringIO()\n' + code
        code = code.replace(
            'bus = wp.Bus()', 'bus = wp.Bus()\nsys.stderr = None'
        )
    script = tmp_path / 'daemon.py'
    script.write_text(code)
    paths = [tmp_path / name for name in ('app.pid', 'starts', 'daemon.log')]
    if stdio == 'replaced':
        proc = child(code, *map(str, paths))
    else:  # Closed before the interpreter starts.
        proc = child(CLOSE_AND_EXEC, stdio, str(script), *map(str, paths))
    status, out, err = finish(proc)
    pidfile, starts, log = paths
    assert status == 0, err
    pid = read_pid(pidfile)
    child.track(pid)
    assert os.readlink('/proc/%d/fd/0' % pid) == os.devnull
    for fd in (1, 2):
        assert os.readlink('/proc/%d/fd/%d' % (pid, fd)) == str(log)
    if stdio != 'replaced':  # A closed sys.stdout now writes to the log.
        wait_until(lambda: 'printed' in log.read_text(), 'the print')
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), 'the daemon to exit')
    assert not pidfile.exists()


@needs_fork
def test_daemonizer_without_wait_ready_returns_at_once(child, tmp_path):
    code = FAILING_DAEMON.replace(
        'stderr=sys.argv[3])', 'stderr=sys.argv[3], wait_ready=False)'
    )
    status, out, err, pidfile, starts, log = start_daemon(
        child, tmp_path, code
    )
    assert status == 0  # CherryPy's fire-and-forget.
    wait_until(lambda: 'Bus EXITED' in log.read_text(), 'the daemon to fail')


def test_daemonizer_needs_fork(bus, monkeypatch):
    monkeypatch.setattr(wp, '_HAVE_FORK', False)
    with pytest.raises(RuntimeError, match='Daemonizer needs os.fork'):
        wp.Daemonizer(bus)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'ready_timeout': 0}, 'Invalid ready_timeout: 0'),
        ({'ready_timeout': 'soon'}, "Invalid ready_timeout: 'soon'"),
        ({'ready_timeout': float('nan')}, 'Invalid ready_timeout: nan'),
        ({'ready_timeout': float('inf')}, 'Invalid ready_timeout: inf'),
        ({'stdout': '/no/such/dir/out.log'}, "'/no/such/dir' does not exist"),
        ({'umask': 'x'}, "Invalid umask: 'x' (an int from 0 to 0o777)"),
        ({'umask': -1}, 'Invalid umask: -1 '),
        ({'umask': 0o1000}, 'Invalid umask: 512 '),
        ({'umask': 0.5}, 'Invalid umask: 0.5 '),
    ],
)
def test_daemonizer_bad_input_is_named(bus, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        wp.Daemonizer(bus, **kwargs)


def test_daemonizer_fork_failure_is_a_clear_exit(bus, monkeypatch):
    def fork():
        raise OSError(11, 'Resource temporarily unavailable')

    monkeypatch.setattr(os, 'fork', fork)
    plugin = wp.Daemonizer(bus, wait_ready=False)
    with pytest.raises(SystemExit) as info:
        plugin.start()
    assert 'fork #1 failed: (11) Resource temporarily unavailable' in str(
        info.value.code
    )


@needs_fork
def test_daemonizer_fork_failure_ends_with_70_and_no_pid_file(child, tmp_path):
    pidfile = tmp_path / 'app.pid'
    proc = child(
        """
        import os, sys, wspbus_plugins as wp
        def fork():
            raise OSError(11, 'Resource temporarily unavailable')
        os.fork = fork
        bus = wp.Bus()
        bus.subscribe('log', lambda msg, level: level >= 40 and
                      print(msg.splitlines()[0], file=sys.stderr))
        wp.Daemonizer(bus).subscribe()
        wp.PIDFile(bus, sys.argv[1]).subscribe()
        bus.start()
        bus.block()
        """,
        str(pidfile),
    )
    status, out, err = finish(proc)
    assert status == 70
    assert 'fork #1 failed: (11) Resource temporarily unavailable' in err
    assert 'Start failed (SystemExit: ' in err
    assert not pidfile.exists()


def test_daemonizer_does_not_daemonize_twice(bus, monkeypatch):
    monkeypatch.setenv(wp._DAEMON_ENV, str(os.getpid()))
    plugin = wp.Daemonizer(bus)
    plugin.start()  # Re-executed daemon: no fork.
    assert plugin.finalized
    assert bus.recorder.messages() == ['Already daemonized.']


# -- PIDFile ------------------------------------------------------------------


@pytest.fixture
def pidfile_path(tmp_path):
    return tmp_path / 'app.pid'


def test_pidfile_written_and_removed(bus, pidfile_path):
    plugin = wp.PIDFile(bus, str(pidfile_path))
    plugin.subscribe()
    bus.start()
    assert pidfile_path.read_text() == '%d\n' % os.getpid()
    assert oct(pidfile_path.stat().st_mode & 0o777) == '0o644'
    bus.exit()
    assert not pidfile_path.exists()
    assert (
        'PID %r written to %r.' % (os.getpid(), str(pidfile_path))
        in bus.recorder.messages()
    )
    assert (
        'PID file removed: %r.' % str(pidfile_path) in bus.recorder.messages()
    )
    assert repr(plugin) == 'PIDFile(%r)' % str(pidfile_path)


def test_pidfile_second_holder_fails_naming_file_and_pid(bus, pidfile_path):
    first = wp.PIDFile(bus, str(pidfile_path))
    first.start()
    other = wp.Bus()
    try:
        with pytest.raises(RuntimeError) as info:
            wp.PIDFile(other, str(pidfile_path)).start()
        assert str(info.value) == (
            'PID file %r is held by running process %d; another instance '
            'is running.' % (str(pidfile_path), os.getpid())
        )
        assert pidfile_path.read_text() == '%d\n' % os.getpid()
    finally:
        first.exit()


def test_pidfile_stale_file_is_replaced_with_warning(bus, pidfile_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    pidfile_path.write_text('%d\n' % dead.pid)
    plugin = wp.PIDFile(bus, str(pidfile_path))
    plugin.start()
    assert read_pid(pidfile_path) == os.getpid()
    assert bus.recorder.messages(30) == [
        'Replacing stale PID file %r left by PID %r.'
        % (str(pidfile_path), dead.pid)
    ]
    plugin.exit()


def test_pidfile_refuses_a_symlink(bus, tmp_path, pidfile_path):
    target = tmp_path / 'precious'
    target.write_text('keep me')
    pidfile_path.symlink_to(target)
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            'Refusing to use PID file %r: it is a symbolic link.'
            % str(pidfile_path)
        ),
    ):
        wp.PIDFile(bus, str(pidfile_path)).start()
    assert target.read_text() == 'keep me'


def test_pidfile_refuses_a_directory(bus, pidfile_path):
    plugin = wp.PIDFile(bus, str(pidfile_path))
    pidfile_path.mkdir()  # After the construction, which checks it too:
    with pytest.raises(RuntimeError, match='is a directory'):
        plugin.start()
    for path in (str(pidfile_path), '', '.'):
        with pytest.raises(ValueError, match='is a directory'):
            wp.PIDFile(bus, path)


def test_pidfile_rewritten_by_someone_else_is_left_at_exit(bus, pidfile_path):
    plugin = wp.PIDFile(bus, str(pidfile_path))
    plugin.start()
    pidfile_path.write_text('12345\n')
    plugin.exit()
    assert pidfile_path.read_text() == '12345\n'
    assert 'no longer holds PID' in bus.recorder.messages(30)[0]


def test_pidfile_exit_without_start_touches_nothing(bus, pidfile_path):
    pidfile_path.write_text('12345\n')
    wp.PIDFile(bus, str(pidfile_path)).exit()
    assert pidfile_path.read_text() == '12345\n'


@pytest.mark.parametrize(
    'where, message',
    [
        ('missing/app.pid', 'does not exist'),
    ],
)
def test_pidfile_bad_directory_fails_at_construction(
    bus, tmp_path, where, message
):
    with pytest.raises(ValueError, match=message) as info:
        wp.PIDFile(bus, str(tmp_path / where))
    assert str(tmp_path / 'missing') in str(info.value)


@needs_root
def test_pidfile_unwritable_directory_fails_at_construction(child):
    import tempfile

    base = tempfile.mkdtemp()
    try:
        os.chmod(base, 0o755)
        locked = os.path.join(base, 'locked')
        os.mkdir(locked, 0o555)
        code = """
            import os, sys, wspbus_plugins as wp
            os.setuid(65534)
            for path in sys.argv[1:]:
                try:
                    wp.PIDFile(wp.Bus(), path)
                except ValueError as exc:
                    print(exc)
        """
        hidden = os.path.join(base, 'hidden')
        os.mkdir(hidden, 0o700)
        status, out, err = finish(
            child(
                code,
                os.path.join(locked, 'app.pid'),
                os.path.join(hidden, 'sub', 'app.pid'),
            )
        )
        assert 'PID file directory %r is not writable' % locked in out, err
        assert (
            'PID file directory %r cannot be reached'
            % os.path.join(hidden, 'sub')
        ) in out, err
    finally:
        import shutil

        shutil.rmtree(base)


def test_pidfile_write_failure_leaves_nothing(bus, pidfile_path, monkeypatch):
    def full(fd, data):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'write', full)
    with pytest.raises(OSError, match='Could not write PID file') as info:
        wp.PIDFile(bus, str(pidfile_path)).start()
    assert info.value.errno == 28
    monkeypatch.undo()
    assert not pidfile_path.exists()


def test_pidfile_without_fcntl_uses_exclusive_creation(
    bus, pidfile_path, monkeypatch
):
    monkeypatch.setattr(wp, 'fcntl', None)
    alive = subprocess.Popen(
        [sys.executable, '-c', 'import time; time.sleep(60)']
    )
    try:
        pidfile_path.write_text('%d\n' % alive.pid)
        with pytest.raises(
            RuntimeError, match='held by running process %d' % alive.pid
        ):
            wp.PIDFile(bus, str(pidfile_path)).start()
        assert read_pid(pidfile_path) == alive.pid
    finally:
        alive.kill()
        alive.wait()
    pidfile_path.write_text('%d\n' % alive.pid)  # Now dead: stale.
    plugin = wp.PIDFile(bus, str(pidfile_path))
    plugin.start()
    assert read_pid(pidfile_path) == os.getpid()
    assert 'Replacing stale PID file' in bus.recorder.messages(30)[0]
    plugin.exit()
    assert not pidfile_path.exists()


def test_pidfile_without_fcntl_refuses_a_symlink_too(
    bus, tmp_path, pidfile_path, monkeypatch
):
    monkeypatch.setattr(wp, 'fcntl', None)
    target = tmp_path / 'precious'
    target.write_text('keep me')
    pidfile_path.symlink_to(target)
    with pytest.raises(RuntimeError, match='it is a symbolic link'):
        wp.PIDFile(bus, str(pidfile_path)).start()
    assert pidfile_path.is_symlink() and target.read_text() == 'keep me'


PIDFILE_RACE_CHILD = """
    import sys, wspbus_plugins as wp
    bus = wp.Bus()
    wp.SignalHandler(bus).subscribe()
    bus.subscribe('log', lambda msg, level: level >= 30 and
                  print(level, msg.splitlines()[-1], file=sys.stderr,
                        flush=True))
    wp.PIDFile(bus, sys.argv[1]).subscribe()
    bus.subscribe('started', lambda: print('running', flush=True))
    bus.start()
    bus.block()
"""


@needs_fork
def test_pidfile_two_instances_at_once_exactly_one_runs(child, tmp_path):
    path = tmp_path / 'race.pid'
    for attempt in range(10):
        pair = [child(PIDFILE_RACE_CHILD, str(path)) for _ in range(2)]
        wait_until(
            lambda pair=pair: any(p.poll() is not None for p in pair),
            'one instance of the pair to give up',
        )
        [loser] = [p for p in pair if p.poll() is not None]
        [winner] = [p for p in pair if p is not loser]
        status, out, err = finish(loser)
        assert status == 70, 'attempt %d: %s' % (attempt, err)
        assert 'is held by running process %d' % winner.pid in err
        wait_until(
            lambda w=winner: path.read_text() == '%d\n' % w.pid,
            'the winner to write its PID',
        )
        assert winner.poll() is None
        winner.send_signal(signal.SIGTERM)
        assert finish(winner)[0] == 0
        assert not path.exists()


@needs_fork
def test_pidfile_kill_9_leaves_a_file_the_next_start_replaces(child, tmp_path):
    path = tmp_path / 'app.pid'
    first = child(PIDFILE_RACE_CHILD, str(path))
    wait_until(lambda: path.exists() and path.read_text(), 'the PID file')
    first.kill()
    first.wait(TIMEOUT)
    assert read_pid(path) == first.pid
    second = child(PIDFILE_RACE_CHILD, str(path))
    wait_until(
        lambda: path.read_text() == '%d\n' % second.pid,
        'the PID file to be replaced',
    )
    second.send_signal(signal.SIGTERM)
    status, out, err = finish(second)
    assert status == 0, err
    assert err.splitlines() == [  # A warning, and no error.
        '30 Replacing stale PID file %r left by PID %d.'
        % (str(path), first.pid)
    ]
    assert not path.exists()


@needs_fork
def test_pidfile_kept_locked_across_restart(child, tmp_path):
    import fcntl

    path = tmp_path / 'app.pid'
    starts = tmp_path / 'starts'
    code = """
        import os, sys, wspbus_plugins as wp
        bus = wp.Bus()
        wp.PIDFile(bus, sys.argv[1]).subscribe()
        with open(sys.argv[2], 'a') as f:
            f.write('%d\\n' % os.getpid())
        with open(sys.argv[2]) as f:
            runs = len(f.readlines())
        bus.subscribe('started', bus.restart if runs == 1 else
                      (lambda: open(sys.argv[2] + '.ok', 'w').close()))
        bus.start()
        bus.block()
    """
    proc = child(code, str(path), str(starts))
    wait_until((tmp_path / 'starts.ok').exists, 'the restarted run')
    assert len(set(lines_of(starts))) == 1 and len(lines_of(starts)) == 2
    assert read_pid(path) == proc.pid
    with open(path) as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    proc.send_signal(signal.SIGTERM)
    # No SignalHandler in this child: SIGTERM's default ends it at once.
    proc.wait(TIMEOUT)
    with open(path) as f:  # The lock went with the process.
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize(
    'how', ['sys.exit', 'bus.exit', 'thread', 'restart again']
)
def test_pidfile_removed_when_the_restarted_start_ends_before_it(
    child, tmp_path, how
):
    # The new image's start ends before PIDFile's listener (priority 70)
    # took back the file restart() handed over: its exit must remove it,
    # or hand it on, locked, to the image another restart() executes.
    path = tmp_path / 'app.pid'
    code = """
        import os, sys, threading, wspbus_plugins as wp
        bus = wp.Bus()
        bus.subscribe('log', lambda msg, level: print(msg, file=sys.stderr))
        wp.PIDFile(bus, sys.argv[1]).subscribe()
        life = int(os.environ.get('LIFE', '0')) + 1
        os.environ['LIFE'] = str(life)

        def check_config():
            if life == 2:
                open(sys.argv[1] + '.second', 'w').close()
                if sys.argv[2] == 'sys.exit':
                    sys.exit('bad config')
                elif sys.argv[2] == 'bus.exit':
                    bus.exit()
                else:  # Another thread: as the Autoreloader does.
                    worker = threading.Thread(
                        target=bus.exit if sys.argv[2] == 'thread'
                        else bus.restart
                    )
                    worker.start()
                    worker.join()

        bus.subscribe('start', check_config, priority=50)
        bus.subscribe('started', bus.restart if life == 1 else bus.exit)
        bus.start()
        bus.block()
    """
    proc = child(code, str(path), how)
    status, out, err = finish(proc)
    assert (tmp_path / 'app.pid.second').exists(), err
    assert status == (70 if how in ('sys.exit', 'bus.exit') else 0), err
    assert not path.exists(), err
    if how == 'restart again':  # Taken back by the second's exit, third.
        assert err.count('kept across the restart') == 2, err


@pytest.mark.parametrize('how', ['start fails', 'exit listener fails'])
def test_pidfile_handed_over_and_unclaimed_goes_even_at_status_70(
    child, tmp_path, how
):
    # The new image has no PIDFile (yet), and ends with os._exit(70),
    # which skips atexit: the file restart() handed over goes all the same.
    path = tmp_path / 'app.pid'
    code = """
        import os, sys, wspbus_plugins as wp
        bus = wp.Bus()
        if not os.environ.get('RESTARTED'):
            os.environ['RESTARTED'] = '1'
            wp.PIDFile(bus, sys.argv[1]).subscribe()
            bus.subscribe('started', bus.restart)
        else:
            def fail():
                raise ValueError('bad config')
            bus.subscribe('start' if sys.argv[2] == 'start fails'
                          else 'exit', fail)
        bus.start()
        bus.exit()
        bus.block()
    """
    status, out, err = finish(child(code, str(path), how))
    assert status == 70, err
    assert not path.exists()


# -- ListenSockets ------------------------------------------------------------

LISTEN_CHILD = """
    import os, sys, threading, wspbus_plugins as wp
    out = open(sys.argv[1], 'a', buffering=1)
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: level >= 30 and
                  print(msg, file=sys.stderr, flush=True))
    handler = wp.SignalHandler(bus)
    handler.handlers['SIGHUP'] = bus.restart
    handler.subscribe()
    sockets = wp.ListenSockets(bus)
    sockets.subscribe()
    for name, address in eval(sys.argv[2]).items():
        sockets.listen(name, address)
    out.write('environ %s\\n' % sorted(k for k in os.environ
                                       if k.startswith('LISTEN_')))
    starts = int(os.environ.get('STARTS', '0')) + 1
    os.environ['STARTS'] = str(starts)

    class Server(wp.SimplePlugin):
        def __init__(self, bus, owner):
            super().__init__(bus)
            self.owner = owner  # The ListenSockets whose sockets it serves.

        def start(self):
            self.done = threading.Event()
            self.threads = [threading.Thread(target=self.serve, args=(s,))
                            for s in self.owner.sockets.values()]
            for thread in self.threads:
                thread.start()

        def serve(self, sock):
            while not self.done.is_set():
                if wp._readable([sock.fileno()], 0.05):
                    conn, _ = sock.accept()
                    with conn:
                        conn.sendall(b'%d %d\\n' % (os.getpid(), starts))

        def stop(self):  # Stop accepting; queued connections wait.
            self.done.set()
            for thread in self.threads:
                thread.join()

    Server(bus, sockets).subscribe()
    if len(sys.argv) > 3:
        exec(sys.argv[3])
    fds = []  # Counted before the server runs: no connection open yet.
    bus.subscribe('start', lambda: fds.append(len(os.listdir('/proc/self/fd'
                                                             ))), priority=10)
    bus.subscribe('started', lambda: out.write('started %d %s %d\\n' % (
        starts,
        sorted((n, s.getsockname()) for n, s in sockets.sockets.items()),
        fds[-1])))
    bus.start()
    bus.block()
"""


def port_is_free(port):
    with socket.socket() as probe:
        # Free for a listener that sets SO_REUSEADDR (ListenSockets and the
        # README's): TIME_WAIT left by an earlier run does not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(('127.0.0.1', port))
            return True
        except OSError:
            return False


def free_privileged_port():
    """A free port below 1024, at random: another run of the suite (make
    test-matrix runs two at once) may be picking one too."""
    return random.choice([p for p in range(990, 1024) if port_is_free(p)])


def free_port(family=socket.AF_INET, host='127.0.0.1'):
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def starts_of(events):
    return [
        line.split(' ', 2)
        for line in lines_of(events)
        if line.startswith('started ')
    ]


def line_from(conn):
    """Read a line from socket `conn`; close the file object at once
    (else the socket's descriptor waits for PyPy's collector)."""
    with conn.makefile('rb') as lines:
        return lines.readline()


def ask(address, family=socket.AF_INET, timeout=5):
    """Connect, read the reply line; return it, or the failure's name."""
    with socket.socket(family) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(address)
            reply = line_from(conn)
        except ConnectionRefusedError:
            return 'refused'
        except ConnectionResetError:
            return 'reset'
        except socket.timeout:
            return 'timeout'
        return reply.decode() or 'reset'


class LoadClient:
    """Threads connecting in a loop; count replies and failures."""

    def __init__(self, address, threads=4, family=socket.AF_INET):
        self.address, self.family = address, family
        self.done = threading.Event()
        self.results = []
        self.threads = [
            threading.Thread(target=self.run, daemon=True)
            for _ in range(threads)
        ]

    def run(self):
        while not self.done.is_set():
            self.results.append(ask(self.address, self.family))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        for thread in self.threads:
            thread.join(TIMEOUT)

    def failures(self):
        return [
            r for r in self.results if r in ('refused', 'reset', 'timeout')
        ]


def restart_and_wait(proc, events, count):
    os.kill(proc.pid, signal.SIGHUP)
    wait_until(lambda: len(starts_of(events)) >= count, 'start %d' % count)


def test_listensockets_restarts_under_load_refuse_and_reset_nothing(
    child, tmp_path
):
    port = free_port()
    events = tmp_path / 'events'
    proc = child(LISTEN_CHILD, str(events), repr({'web': ('127.0.0.1', port)}))
    wait_until(lambda: starts_of(events), 'the first start')
    restarts = scaled(100, 300)
    with LoadClient(('127.0.0.1', port)) as client:
        for count in range(2, restarts + 2):
            restart_and_wait(proc, events, count)
        wait_until(lambda: len(client.results) > restarts, 'replies')
    served = [r for r in client.results if r not in client.failures()]
    assert client.failures() == []
    assert {int(r.split()[0]) for r in served} == {proc.pid}
    assert max(int(r.split()[1]) for r in served) > restarts / 2
    descriptors = {line[2].rsplit(' ', 1)[1] for line in starts_of(events)}
    assert len(descriptors) == 1, descriptors  # The same count every start.
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[0] == 0
    assert ask(('127.0.0.1', port)) == 'refused'  # Closed at a real exit.


@pytest.mark.skipif(not socket.has_ipv6, reason='needs IPv6')
def test_listensockets_unix_and_ipv6_keep_their_names(child, tmp_path):
    path = str(tmp_path / 'app.sock')
    try:
        port = free_port(socket.AF_INET6, '::1')
    except OSError:
        pytest.skip('no IPv6 loopback here')
    events = tmp_path / 'events'
    addresses = {'local': path, 'v6': ('::1', port)}
    proc = child(LISTEN_CHILD, str(events), repr(addresses))
    wait_until(lambda: starts_of(events), 'the first start')
    for count in (2, 3):
        restart_and_wait(proc, events, count)
        assert ask(path, socket.AF_UNIX) == '%d %d\n' % (proc.pid, count)
        assert ask(('::1', port), socket.AF_INET6).endswith(' %d\n' % count)
    names = {line[2].rsplit(' ', 1)[0] for line in starts_of(events)}
    assert len(names) == 1 and 'local' in names.pop()  # Same name, address.
    proc.send_signal(signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, err) == (0, '')
    assert not os.path.exists(path)  # This process bound it: removed.


@pytest.mark.skipif(
    not shutil.which('systemd-socket-activate'),
    reason='needs systemd-socket-activate (Debian package systemd)',
)
def test_listensockets_adopts_systemd_socket_activation(tmp_path):
    port = free_port()
    events = tmp_path / 'events'
    script = tmp_path / 'child.py'
    script.write_text(textwrap.dedent(LISTEN_CHILD))
    proc = subprocess.Popen(
        [
            'systemd-socket-activate',
            '-l',
            '127.0.0.1:%d' % port,
            '--fdname=web',
            '-E',
            'PYTHONPATH=' + HERE,
            sys.executable,
            str(script),
            str(events),
            repr({'web': ('127.0.0.1', port)}),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: ask(('127.0.0.1', port), timeout=1) != 'refused',
            'systemd-socket-activate to listen',
        )
        wait_until(lambda: starts_of(events), 'the activated start')
        assert lines_of(events)[0] == 'environ []'  # LISTEN_* removed.
        restart_and_wait(proc, events, 2)
        assert ask(('127.0.0.1', port)) == '%d 2\n' % proc.pid
        proc.send_signal(signal.SIGTERM)
        status, out, err = finish(proc)
        assert status == 0, err
        assert 'Execing ' in err  # systemd-socket-activate's own lines only.
        assert 'Ignoring' not in err and 'Traceback' not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)


ACTIVATING_CHILD = """
    import fcntl, os, socket, sys
    # Plays systemd: holds listening sockets and passes them to the
    # service it starts at descriptors 3, 4, ... with LISTEN_* set.
    ports, names = sys.argv[1].split(','), sys.argv[2]
    held = []
    for port in ports:
        sock = socket.socket()
        sock.bind(('127.0.0.1', int(port)))
        sock.listen()
        held.append(sock)
    pid = os.fork()
    if pid == 0:
        moved = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100) for s in held]
        for fd in moved:  # (PyPy 3.9 lacks F_DUPFD_CLOEXEC.)
            os.set_inheritable(fd, False)
        for i, fd in enumerate(moved):
            os.dup2(fd, 3 + i)  # Inheritable, as systemd passes them.
        os.environ.update(LISTEN_PID=str(os.getpid()),
                          LISTEN_FDS=str(len(held)), LISTEN_FDNAMES=names)
        os.execv(sys.executable, [sys.executable] + sys.argv[3:])
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 99)
"""


def free_ports(count):
    ports = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


@needs_fork
def test_listensockets_systemd_default_names_keep_every_socket(
    child, tmp_path
):
    # A .socket unit with two ListenStream= and no FileDescriptorName=
    # names both descriptors after the unit.  The second used to replace
    # the first, whose descriptor was closed: systemd still held the port,
    # so the service could not listen on it.
    ports = free_ports(2)
    service, events = tmp_path / 'service.py', tmp_path / 'events'
    service.write_text(textwrap.dedent(LISTEN_CHILD))
    # The first image asks for one socket by the default name; the other
    # crosses the restart unasked, and the second image asks for it.
    later = "if starts > 1: sockets.listen('two', ('127.0.0.1', %d))"
    proc = child(
        ACTIVATING_CHILD,
        '%d,%d' % tuple(ports),
        'app.socket:app.socket',
        str(service),
        str(events),
        repr({'app.socket': ('127.0.0.1', ports[0])}),
        later % ports[1],
    )
    pid = int(proc.stdout.readline())
    child.track(pid)
    wait_until(
        lambda: starts_of(events) or proc.poll() is not None,
        'the activated start',
    )
    assert starts_of(events), finish(proc)
    assert ask(('127.0.0.1', ports[0])) == '%d 1\n' % pid
    with socket.create_connection(('127.0.0.1', ports[1]), TIMEOUT) as early:
        restart_and_wait_pid(pid, events, 2)  # early waits in the backlog.
        assert line_from(early) == b'%d 2\n' % pid
    for port in ports:
        assert ask(('127.0.0.1', port)) == '%d 2\n' % pid
    os.kill(pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, err) == (0, '')


def python_for_nobody():
    """An interpreter that user nobody can run this module with."""
    import pwd

    uid = pwd.getpwnam('nobody').pw_uid
    for python in ('/usr/bin/python3', sys.executable):
        try:
            subprocess.run(
                [python, '-c', 'import wspbus_plugins'],
                env=dict(os.environ, PYTHONPATH=HERE),
                cwd='/',
                preexec_fn=lambda: os.setuid(uid),
                check=True,
                capture_output=True,
                timeout=TIMEOUT,
            )
            return python
        except (OSError, subprocess.CalledProcessError):
            continue
    pytest.skip('no interpreter that user nobody can run this module with')


@needs_root
@needs_fork
def test_listensockets_low_port_daemon_keeps_it_after_dropping_root(child):
    import pwd
    import tempfile

    python = python_for_nobody()
    directory = pathlib.Path(tempfile.mkdtemp(prefix='wspbus-nobody-'))
    try:
        os.chmod(str(directory), 0o755)  # The re-executed nobody reads it.
        events = directory / 'events'
        events.touch()
        os.chmod(str(events), 0o666)
        port = free_privileged_port()
        group = next(g for g in ('nogroup', 'nobody') if _group_exists(g))
        setup = (
            "wp.Daemonizer(bus, stdout=sys.argv[1] + '.log', "
            "stderr=sys.argv[1] + '.log').subscribe()\n"
            "wp.PIDFile(bus, sys.argv[1] + '.pid').subscribe()\n"
            "wp.DropPrivileges(bus, uid='nobody', gid=%r).subscribe()\n"
            "bus.subscribe('started', lambda: out.write('uid %%d\\n' "
            '%% os.getuid()))' % group
        )
        proc = child(
            LISTEN_CHILD,
            str(events),
            repr({'web': ('127.0.0.1', port)}),
            setup,
            script=directory / 'child.py',
            executable=python,
            cwd=directory,
        )
        assert finish(proc)[0] == 0
        pid = read_pid(str(events) + '.pid')
        child.track(pid)
        restart_and_wait_pid(pid, events, 2)
        assert ask(('127.0.0.1', port)) == '%d 2\n' % pid
        nobody = pwd.getpwnam('nobody').pw_uid
        assert lines_of(events).count('uid %d' % nobody) == 2
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), 'the daemon to exit')
    finally:
        shutil.rmtree(str(directory))


def restart_and_wait_pid(pid, events, count):
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: len(starts_of(events)) >= count, 'start %d' % count)


@pytest.fixture
def inherit(monkeypatch):
    """inherit(*sockets): place them where systemd would pass them."""
    base = 900  # Far above what the test process uses.
    monkeypatch.setattr(wp, '_SD_LISTEN_FDS_START', base)
    placed = []

    def place(*objects, names=None, pid=None):
        for i, obj in enumerate(objects):
            fileno = obj if isinstance(obj, int) else obj.fileno()
            os.dup2(fileno, base + i)
            placed.append(base + i)
        monkeypatch.setenv(
            'LISTEN_PID', str(os.getpid() if pid is None else pid)
        )
        monkeypatch.setenv('LISTEN_FDS', str(len(objects)))
        if names is not None:
            monkeypatch.setenv('LISTEN_FDNAMES', names)
        return [base + i for i in range(len(objects))]

    yield place
    for fd in placed:
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def listen_sockets(bus, inherit, monkeypatch):
    """ListenSockets(bus) whose sockets are closed after the test.

    The test gets its own module-wide pool: an instance of an earlier test,
    on another bus and not yet collected (PyPy), keeps the pool open.
    """
    monkeypatch.setattr(wp, '_unclaimed', [])
    monkeypatch.setattr(wp, '_listen_sockets', wp.WeakSet())
    made = []

    def make():
        made.append(wp.ListenSockets(bus))
        return made[-1]

    yield make
    bus.execv = False
    for sockets in made:
        sockets.exit()


def restart_in_process(bus, sockets):
    """Do to `sockets` what restart() and its exec do: the next
    ListenSockets made is the new image's.  Return name -> descriptor
    handed over."""
    bus.execv = True
    sockets.exit()
    for sock in sockets.sockets.values():
        sock.close()  # As the exec closes them.
    sockets.sockets.clear()
    handed = dict(sockets._kept)
    sockets._kept.clear()  # Now the new image's.
    return handed


@pytest.fixture
def listener():
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    sock.listen()
    yield sock
    sock.close()


def test_listensockets_adopts_by_name_and_removes_the_variables(
    inherit, listener, listen_sockets
):
    inherit(listener, names='web')
    sockets = listen_sockets()
    assert not [k for k in os.environ if k.startswith('LISTEN_')]
    got = sockets.listen('web', ('127.0.0.1', 1))  # The name wins.
    assert got.getsockname() == listener.getsockname()
    assert not os.get_inheritable(got.fileno()) and got.gettimeout() is None
    assert sockets.sockets == {'web': got}


def test_listensockets_finds_an_unnamed_socket_by_its_address(
    inherit, listener, listen_sockets
):
    inherit(listener)
    got = listen_sockets().listen('web', listener.getsockname())
    assert got.getsockname() == listener.getsockname()


def test_listensockets_duplicate_names_are_told_apart_by_address(
    bus, inherit, listen_sockets
):
    first, second = socket.socket(), socket.socket()
    try:
        for sock in (first, second):
            sock.bind(('127.0.0.1', 0))
            sock.listen()
        addresses = [first.getsockname(), second.getsockname()]
        fds = inherit(first, second, names='app.socket:app.socket')
    finally:
        first.close()
        second.close()
    sockets = listen_sockets()
    for fd in fds:
        os.fstat(fd)  # Neither replaced by the other and closed.
    with pytest.raises(
        ValueError,
        match=re.escape(
            "2 inherited sockets are called 'app.socket' and none is bound "
            "to ('127.0.0.1', 1)"
        ),
    ):
        sockets.listen('app.socket', ('127.0.0.1', 1))
    got = sockets.listen('app.socket', addresses[1])
    assert got.getsockname() == addresses[1]
    assert sockets.listen('web', addresses[0]).getsockname() == addresses[0]
    assert bus.recorder.messages(30) == []


@pytest.mark.parametrize('fd', ['99999999999999999999', '-1', 'twice'])
def test_listensockets_restart_garbage_is_ignored(
    bus, listener, listen_sockets, monkeypatch, fd
):
    entries = 'web\t%s\t' % fd
    if fd == 'twice':  # Two sockets on one descriptor: one would close both.
        fd = str(os.dup(listener.fileno()))
        entries = 'web\t%s\t\nadmin\t%s\t' % (fd, fd)
    monkeypatch.setenv(wp._LISTEN_ENV, '%d\n%s' % (os.getpid(), entries))
    sockets = listen_sockets()
    [warning] = bus.recorder.messages(30)
    if entries.count('\n'):
        assert repr(sockets) == 'ListenSockets(web)'
        assert warning.startswith(
            'Ignoring inherited descriptor %s (admin)' % fd
        )
    else:
        assert repr(sockets) == 'ListenSockets()'
        assert warning.startswith(
            'Ignoring inherited descriptor %s (web)' % fd
        )


@pytest.mark.parametrize(
    'env, message',
    [
        ({'LISTEN_PID': '1'}, "LISTEN_PID='1' is not this process"),
        ({'LISTEN_FDS': 'two'}, "Ignoring LISTEN_FDS='two': not a number."),
        ({'LISTEN_FDS': '\u00b2'}, "Ignoring LISTEN_FDS='\u00b2': not a"),
    ],
)
def test_listensockets_ignores_variables_not_meant_for_it(
    bus, inherit, listener, listen_sockets, monkeypatch, env, message
):
    inherit(listener)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    listen_sockets()
    assert wp._unclaimed == []
    assert [m for m in bus.recorder.messages(30) if message in m]
    assert 'LISTEN_FDS' not in os.environ  # Children never see them.


HUGE_COUNT_CHILD = """
    import os, resource, sys, wspbus_plugins as wp
    # One entry per descriptor took GBs: fail fast instead of swapping.
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=sys.argv[1])
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: print(level, msg, flush=True))
    print(wp.ListenSockets(bus))
"""


@linux_only
@pytest.mark.parametrize('count', ['1000000000', '100000', '9' * 5000])
def test_listensockets_a_count_beyond_the_open_descriptors_is_one_warning(
    child, count
):
    status, out, err = finish(child(HUGE_COUNT_CHILD, count), timeout=20)
    assert (status, err) == (0, '')
    warning, made = out.splitlines()
    assert re.fullmatch(
        r'30 Ignoring LISTEN_FDS=%s: more than the \d+ descriptors this '
        r'process has open\.' % re.escape(repr(count)),
        warning,
    )
    assert made == 'ListenSockets()'


def test_listensockets_names_that_do_not_match_the_count_are_ignored(
    bus, inherit, listener, listen_sockets
):
    inherit(listener, names='web:admin')
    sockets = listen_sockets()
    assert '2 names for 1 descriptors' in bus.recorder.messages(30)[0]
    assert sockets.listen('admin', listener.getsockname()) is not None
    assert 'web' not in sockets.sockets


def test_listensockets_ignores_what_is_not_a_listening_socket(
    bus, inherit, listen_sockets
):
    read, write = os.pipe()
    idle = socket.socket()  # A socket, but not listening.
    try:
        fds = inherit(read, idle, names='pipe:idle')
        listen_sockets()
    finally:
        for fd in (read, write):
            os.close(fd)
        idle.close()
    assert wp._unclaimed == []
    warnings = bus.recorder.messages(30)
    assert 'Ignoring inherited descriptor %d (pipe)' % fds[0] in warnings[0]
    assert warnings[1] == (
        'Ignoring inherited descriptor %d (idle): not a listening socket.'
        % fds[1]
    )


def test_listensockets_family_mismatch_is_a_clear_error(
    inherit, listener, listen_sockets, tmp_path
):
    inherit(listener, names='web')
    with pytest.raises(
        ValueError,
        match="Socket 'web' is AF_INET/SOCK_STREAM, not the "
        'AF_UNIX/SOCK_STREAM asked for',
    ):
        listen_sockets().listen('web', str(tmp_path / 'web.sock'))


@pytest.mark.parametrize('address', [8080, ('::1',), None, ('h', 'port')])
def test_listensockets_bad_address_is_named(bus, address):
    with pytest.raises(ValueError, match=re.escape('%r' % (address,))):
        wp.ListenSockets(bus).listen('web', address)


@pytest.mark.parametrize('bad', ['a\tb', 'a\nb', 'a\0b'])
@pytest.mark.parametrize('what', ['name', 'path'])
def test_listensockets_tab_or_newline_is_refused_before_binding(
    bus, tmp_path, what, bad
):
    # restart() hands sockets over as tab- and newline-separated lines:
    # one such character made the new image ignore every socket.
    path, name = str(tmp_path / 'ok.sock'), 'web'
    if what == 'name':
        message = 'Invalid socket name %r' % bad
        name = bad
    else:
        path = str(tmp_path / bad)
        message = 'Invalid AF_UNIX path %r' % path
    sockets = wp.ListenSockets(bus)
    with pytest.raises(ValueError, match=re.escape(message)):
        sockets.listen(name, path)
    assert os.listdir(str(tmp_path)) == [] and sockets.sockets == {}


@pytest.mark.parametrize('what', ['name', 'path'])
def test_listensockets_what_the_environment_cannot_carry_is_refused(
    bus, tmp_path, what
):
    # A lone surrogate passed, then the handover could not be put in the
    # environment: the restart ended with status 70.
    bad = '\ud800'
    name, path = 'web', str(tmp_path / 'ok.sock')
    if what == 'name':
        name, message = bad, 'Invalid socket name %r' % bad
    else:
        path = str(tmp_path / bad)
        message = 'Invalid AF_UNIX path %r' % path
    sockets = wp.ListenSockets(bus)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        sockets.listen(name, path)
    assert 'cannot be encoded' in str(raised.value)
    assert os.listdir(str(tmp_path)) == [] and sockets.sockets == {}


def test_listensockets_address_in_use_names_it(bus, listener):
    address = listener.getsockname()
    with pytest.raises(
        OSError, match=re.escape('Cannot listen on %r' % (address,))
    ):
        wp.ListenSockets(bus).listen('web', address)


def test_listensockets_unix_path_stale_is_replaced_live_is_refused(
    bus, tmp_path
):
    path = str(tmp_path / 'app.sock')
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # The file stays; nobody listens.
    sockets = wp.ListenSockets(bus)
    sockets.listen('app', path)
    with pytest.raises(OSError, match='Cannot listen on'):
        wp.ListenSockets(wp.Bus()).listen('app', path)  # Ours is live.
    regular = tmp_path / 'file'
    regular.write_text('data')
    with pytest.raises(OSError, match='Cannot listen on'):
        sockets.listen('other', str(regular))
    assert regular.read_text() == 'data'
    sockets.exit()
    assert not os.path.exists(path)


@linux_only
def test_listensockets_abstract_unix_address_has_no_file_to_check(bus):
    name = '\0wspbus-test-%d' % os.getpid()
    sockets = wp.ListenSockets(bus)
    try:
        got = sockets.listen('abstract', name)
        assert got.getsockname() in (name, name.encode())
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(name)
    finally:
        sockets.exit()


FULL_BACKLOG_CHILD = """
    import sys, wspbus_plugins as wp
    try:
        wp.ListenSockets(wp.Bus()).listen('api', sys.argv[1])
    except OSError as exc:
        print(exc)
"""


def test_listensockets_unix_path_of_a_wedged_owner_is_in_use(child, tmp_path):
    # Its backlog full, the owner accepts nothing: a blocking probe
    # connect() waited for ever.  The path is in use, not stale.
    path = str(tmp_path / 'api.sock')
    owner = socket.socket(socket.AF_UNIX)
    filler = socket.socket(socket.AF_UNIX)
    try:
        owner.bind(path)
        owner.listen(0)
        filler.setblocking(False)
        try:
            filler.connect(path)
        except BlockingIOError:
            pass
        status, out, err = finish(child(FULL_BACKLOG_CHILD, path))
        assert (status, err) == (0, '')
        assert out.startswith(
            '[Errno %d] Cannot listen on %r' % (errno.EADDRINUSE, path)
        )
        assert os.path.exists(path)  # Left to its owner.
    finally:
        filler.close()
        owner.close()


def test_listensockets_restart_hands_sockets_to_the_new_image(
    bus, monkeypatch
):
    monkeypatch.setattr(os, 'environ', dict(os.environ))
    monkeypatch.setattr(wp, '_owed_cleanups', [])  # Else sockets outlives.
    sockets = wp.ListenSockets(bus)
    given = sockets.listen('web', ('127.0.0.1', 0))
    address = given.getsockname()
    given.close()  # As asyncio's server does when it closes.
    bus.execv = True
    sockets.exit()
    fd = sockets._kept['web']
    assert os.environ[wp._LISTEN_ENV] == '%d\nweb\t%d\t\t\t%r' % (
        os.getpid(),
        fd,
        ('127.0.0.1', 0),
    )
    assert os.get_inheritable(fd) and fd in bus._keep_fds
    again = wp.ListenSockets(bus)  # What the new image does.
    assert again.listen('web', address).getsockname() == address
    assert wp._LISTEN_ENV not in os.environ
    bus.execv = False
    again.exit()
    sockets._kept.clear()  # Handed to again, which closed it.
    monkeypatch.setenv(wp._LISTEN_ENV, '1\nweb\t%d\t' % fd)  # Not ours.
    wp.ListenSockets(bus)
    assert wp._unclaimed == []


def test_listensockets_one_name_two_addresses_is_a_clear_error(bus):
    sockets = wp.ListenSockets(bus)
    try:
        first = sockets.listen('web', ('127.0.0.1', 0))
        bound = first.getsockname()
        assert bus.recorder.messages() == [
            'Listening on %r (web).' % (bound,)  # The real address.
        ]
        assert sockets.listen('web', ('127.0.0.1', 0)) is first
        assert sockets.listen('web', bound) is first
        other = ('127.0.0.1', free_port())
        with pytest.raises(
            ValueError,
            match=re.escape(
                "Socket 'web' was asked for ('127.0.0.1', 0) and is bound "
                'to %r, not to %r: one name, one address.' % (bound, other)
            ),
        ):
            sockets.listen('web', other)
        assert sockets.sockets == {'web': first}
    finally:
        sockets.exit()


@pytest.mark.parametrize('kind', ['host', 'path'])
def test_listensockets_one_address_spelled_two_ways_is_one_address(
    bus, listen_sockets, monkeypatch, tmp_path, kind
):
    # ('localhost', P) after ('127.0.0.1', P), or './u.sock' after
    # 'u.sock', was refused in one image and, across a restart, closed and
    # bound anew: the connections in its backlog were reset.
    monkeypatch.chdir(str(tmp_path))
    port = free_port()
    spellings = {
        'host': [('127.0.0.1', port), ('localhost', port)],
        'path': ['u.sock', './u.sock', str(tmp_path / 'u.sock')],
    }[kind]
    sockets = listen_sockets()
    sockets.subscribe()
    first = sockets.listen('web', spellings[0])
    resolved = []
    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(
        socket,
        'getaddrinfo',
        lambda *args, **kwargs: (
            resolved.append(args) or real_getaddrinfo(*args, **kwargs)
        ),
    )
    assert sockets.listen('web', spellings[0]) is first
    assert resolved == []  # Spelled the same: nothing resolved.
    for other in spellings[1:]:
        assert sockets.listen('web', other) is first
    monkeypatch.setattr(wp, '_owed_cleanups', [])
    # Then the next image asks with another spelling.
    handed = restart_in_process(bus, sockets)['web']
    again = listen_sockets().listen('web', spellings[-1])
    assert again.fileno() == handed  # Not closed and bound anew.


@pytest.mark.skipif(not socket.has_ipv6, reason='needs IPv6')
def test_listensockets_an_inherited_socket_closed_meanwhile_is_no_overlap(
    bus, listen_sockets, monkeypatch
):
    # The program closed an unclaimed inherited IPv6 socket behind the
    # module's back; asking for a port an overlapping one holds raised
    # EBADF from its getsockopt(), and the overlapping one stayed.
    port = free_port()
    monkeypatch.setattr(wp, '_owed_cleanups', [])
    sockets = listen_sockets()
    sockets.listen('a', ('::1', port))
    sockets.listen('c', ('127.0.0.1', port))
    restart_in_process(bus, sockets)
    new = listen_sockets()
    (closed,) = [e.sock for e in wp._unclaimed if e.name == 'a']
    os.close(closed.detach())
    sock = new.listen('b', ('0.0.0.0', port))
    assert sock.getsockname() == ('0.0.0.0', port)
    assert [e.name for e in wp._unclaimed] == ['a']


@pytest.mark.skipif(not socket.has_ipv6, reason='needs IPv6')
@pytest.mark.parametrize(
    'first, then, taken',
    [
        (('::', None), ('', socket.AF_INET6), True),
        (('::', None), ('', None), False),  # AF_INET's any host: 0.0.0.0
        (('', None), ('', socket.AF_INET6), False),
    ],
)
def test_listensockets_any_host_is_that_of_the_family_asked_for(
    bus, listen_sockets, monkeypatch, first, then, taken
):
    # ('', P) after ('::', P) across a restart took the AF_INET6 socket as
    # the same address, then refused it: a ValueError about its family,
    # and the new image died.  Likewise ('', P) asked as AF_INET6 after
    # AF_INET's ('', P), the same repr() in the handover.
    port = free_port()
    monkeypatch.setattr(wp, '_owed_cleanups', [])
    sockets = listen_sockets()
    old = sockets.listen('web', (first[0], port), first[1]).getsockname()
    restart_in_process(bus, sockets)
    del bus.recorder.logs[:]
    asked = (then[0], port)
    new = listen_sockets().listen('web', asked, then[1])
    assert new.family == (then[1] or socket.AF_INET)
    bound = new.getsockname()
    assert bound[:2] == (('::' if then[1] else '0.0.0.0'), port)
    assert bus.recorder.messages() == (
        ['Listening on %r (web), inherited.' % (bound,)]
        if taken
        else [
            "Closing the inherited socket 'web' bound to %r: now asked for "
            '%r.' % (old, asked),
            'Listening on %r (web).' % (bound,),
        ]
    )


@pytest.mark.skipif(not socket.has_ipv6, reason='needs IPv6')
@pytest.mark.parametrize(
    'names, family, taken',
    [
        (None, None, '::'),  # systemd's default names: found by port.
        ('web', None, '::'),
        (None, socket.AF_INET, None),  # A ValueError: asked for AF_INET.
        ('web', socket.AF_INET, None),
        ('app.socket:app.socket', None, '0.0.0.0'),  # Given both.
    ],
)
def test_listensockets_the_unit_decides_the_family_of_any_host(
    inherit, listen_sockets, names, family, taken
):
    # ListenStream=P gives a '::' socket (IPv4 too, by default); the
    # program asks ('', P).  Found by port (systemd's default names), it
    # was not taken, ('', P) being 0.0.0.0: bind() found the port in use.
    # Taken by name, it was a ValueError.  An explicit family still is.
    given = [socket.socket(socket.AF_INET6)]
    if names == 'app.socket:app.socket':  # BindIPv6Only=ipv6-only
        given[0].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        given.append(socket.socket())
    port = free_port()
    for sock in given:
        sock.bind(('::' if sock.family == socket.AF_INET6 else '', port))
        sock.listen()
    inherit(*given, names=names)
    for sock in given:
        sock.close()  # inherit() placed a duplicate.
    address = ('', port)
    sockets = listen_sockets()
    if taken:
        sock = sockets.listen('web', address)
        assert sock.getsockname()[:2] == (taken, port)
        assert sockets.listen('web', address) is sock  # And asked again.
    else:
        with pytest.raises(
            ValueError,
            match=re.escape(
                "Socket 'web' is AF_INET6/SOCK_STREAM, not the "
                'AF_INET/SOCK_STREAM asked for %r.' % (address,)
            ),
        ):
            sockets.listen('web', address, family)


@pytest.mark.skipif(not socket.has_ipv6, reason='needs IPv6')
@pytest.mark.parametrize('host', ['', '::'])
def test_listensockets_the_socket_of_the_type_asked_for_is_taken(
    inherit, listen_sockets, host
):
    # ListenDatagram=P before ListenStream=P (a DNS or syslog service):
    # found by address (systemd's default names), the first of the two
    # was taken for both, a ValueError for one of them.
    port = free_port()
    given = [
        socket.socket(socket.AF_INET6, kind)
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM)
    ]
    for sock in given:
        sock.bind(('::', port))
    given[1].listen()
    inherit(*given)
    for sock in given:
        sock.close()  # inherit() placed a duplicate.
    sockets = listen_sockets()
    stream = sockets.listen('tcp', (host, port))
    datagram = sockets.listen('udp', (host, port), type=socket.SOCK_DGRAM)
    assert (stream.type, datagram.type) == (
        socket.SOCK_STREAM,
        socket.SOCK_DGRAM,
    )
    assert (
        stream.getsockname()[:2]
        == datagram.getsockname()[:2]
        == (
            '::',
            port,
        )
    )


@pytest.mark.skipif(not socket.has_ipv6, reason='needs IPv6')
@pytest.mark.parametrize('names', [None, 'app.socket'])
def test_listensockets_a_port_systemd_gave_elsewhere_names_it(
    inherit, listen_sockets, names
):
    # ListenStream=P gives '::'; the program asks 0.0.0.0:P.  The error
    # said only "Address already in use", the holder being this process.
    port = free_port()
    given = socket.socket(socket.AF_INET6)
    given.bind(('::', port))
    given.listen()
    (fd,) = inherit(given, names=names)
    bound = given.getsockname()
    given.close()  # inherit() placed a duplicate.
    with pytest.raises(OSError) as raised:
        listen_sockets().listen('web', ('0.0.0.0', port))
    assert raised.value.errno == errno.EADDRINUSE
    assert str(raised.value).endswith(
        "Cannot listen on ('0.0.0.0', %d): Address already in use; systemd"
        ' gave this process %r (%s) on that port: ask for that address, or'
        ' change the unit.' % (port, bound, names or 'fd%d' % fd)
    )


def test_listensockets_a_systemd_socket_is_logged_at_its_real_address(
    bus, inherit, listener, listen_sockets
):
    inherit(listener, names='web')
    listen_sockets().listen('web', ('127.0.0.1', 1))  # The unit decides.
    assert bus.recorder.messages() == [
        'Listening on %r (web), inherited.' % (listener.getsockname(),)
    ]


def test_listensockets_a_changed_address_is_bound_at_restart(child, tmp_path):
    # The configuration names another port, then SIGHUP: the new image
    # served the old port and logged the new one as inherited.
    old, new = free_ports(2)
    events = tmp_path / 'events'
    address = "{'web': ('127.0.0.1', %d if 'STARTS' in os.environ else %d)}"
    proc = child(LISTEN_CHILD, str(events), address % (new, old))
    wait_until(lambda: starts_of(events), 'the first start')
    with socket.create_connection(('127.0.0.1', old), TIMEOUT) as early:
        restart_and_wait(proc, events, 2)
        assert line_from(early) in (b'', b'%d 1\n' % proc.pid)  # Or reset.
    assert starts_of(events)[1][2].startswith(
        "[('web', ('127.0.0.1', %d))]" % new
    )
    assert ask(('127.0.0.1', new)) == '%d 2\n' % proc.pid
    assert ask(('127.0.0.1', old)) == 'refused'  # Closed, not left hanging.
    restart_and_wait(proc, events, 3)  # Asked the same: handed over.
    assert ask(('127.0.0.1', new)) == '%d 3\n' % proc.pid
    proc.send_signal(signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, err) == (0, '')


@pytest.mark.parametrize('change', ['move', 'swap'])
def test_listensockets_an_address_another_inherited_socket_holds(
    child, tmp_path, change
):
    # The first image has web on A and admin (or api) on B; the next one
    # asks web on B: admin dropped (move), or api moved to A (swap).  The
    # new socket's bind() found B held by the unclaimed one: EADDRINUSE,
    # and the restart died.  Now the socket bound there is taken over.
    a, b = free_ports(2)
    events = tmp_path / 'events'
    later = {'move': {'web': b}, 'swap': {'web': b, 'api': a}}[change]
    addresses = '%r if "STARTS" in os.environ else %r' % (
        {n: ('127.0.0.1', port) for n, port in later.items()},
        {
            'web': ('127.0.0.1', a),
            'admin' if change == 'move' else 'api': ('127.0.0.1', b),
        },
    )
    proc = child(LISTEN_CHILD, str(events), addresses)
    wait_until(lambda: starts_of(events), 'the first start')
    with LoadClient(('127.0.0.1', b)) as client:
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(
            lambda: len(starts_of(events)) > 1 or proc.poll() is not None,
            'the second start',
        )
        assert proc.poll() is None, finish(proc)
    assert client.failures() == []  # B was never closed nor bound anew.
    assert ask(('127.0.0.1', b)) == '%d 2\n' % proc.pid
    if change == 'swap':
        assert ask(('127.0.0.1', a)) == '%d 2\n' % proc.pid
    else:  # Closed once the bus started: refused, not left waiting.
        wait_until(lambda: ask(('127.0.0.1', a)) == 'refused', 'A closed')
    proc.send_signal(signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, err) == (0, '')


@pytest.mark.parametrize(
    'old, new',
    [
        ('127.0.0.1', '0.0.0.0'),
        ('0.0.0.0', '127.0.0.1'),
        pytest.param('::', '0.0.0.0', marks=needs_dual_stack),
        pytest.param('0.0.0.0', '::', marks=needs_dual_stack),
        # An IPv4-mapped IPv6 host is its IPv4 one.
        pytest.param('0.0.0.0', '::ffff:127.0.0.1', marks=needs_dual_stack),
        pytest.param('::ffff:127.0.0.1', '127.0.0.1', marks=needs_dual_stack),
    ],
)
def test_listensockets_a_dropped_socket_on_an_overlapping_host_is_closed(
    child, tmp_path, old, new
):
    # The first image has a on OLD:P; the next one drops a and asks b on
    # NEW:P, a host that overlaps OLD.  The new socket's bind() found P
    # held by the unclaimed a: EADDRINUSE, and the restart died.
    port = free_port()
    events = tmp_path / 'events'
    addresses = '%r if "STARTS" in os.environ else %r' % (
        {'b': (new, port)},
        {'a': (old, port)},
    )
    proc = child(LISTEN_CHILD, str(events), addresses)
    wait_until(lambda: starts_of(events), 'the first start')
    os.kill(proc.pid, signal.SIGHUP)
    wait_until(
        lambda: len(starts_of(events)) > 1 or proc.poll() is not None,
        'the second start',
    )
    assert proc.poll() is None, finish(proc)
    assert ask(('127.0.0.1', port)) == '%d 2\n' % proc.pid
    proc.send_signal(signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, err) == (0, overlap_warning('a', old, 'b', new, port))


def overlap_warning(dropped, old, name, new, port):
    """The warning for `dropped` on `old`, closed as `name` asks `new`."""
    bound = (old, port) + ((0, 0) if ':' in old else ())
    return (
        'Closing the inherited socket %r bound to %r: %r asked for %r, '
        'which overlaps it.\n' % (dropped, bound, name, (new, port))
    )


EARLIER_IMAGE_CHILD = """
    import os, socket, sys, wspbus_plugins as wp
    # Plays an earlier image: binds sockets (name, host, port, V6ONLY),
    # hands them over as restart() does, and execs the service.
    lines = ['%d' % os.getpid()]
    for name, host, port, v6only in eval(sys.argv[1]):
        sock = socket.socket(socket.AF_INET6 if ':' in host else
                             socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if v6only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        sock.bind((host, port))
        sock.listen()
        os.set_inheritable(sock.fileno(), True)
        fd = sock.detach()
        lines.append('%s\\t%d\\t\\t\\t%r' % (name, fd, (host, port)))
    os.environ[wp._LISTEN_ENV] = '\\n'.join(lines)
    open(sys.argv[2], 'w').close()  # Ready: a client may connect.
    sys.stdin.readline()
    os.execv(sys.executable, [sys.executable] + sys.argv[3:])
"""


@pytest.mark.skipif(not socket.has_ipv6, reason='needs IPv6')
def test_listensockets_an_ipv6_only_wildcard_does_not_overlap_ipv4(
    child, tmp_path
):
    # An earlier image had a on '::' with IPV6_V6ONLY and b on 0.0.0.0;
    # the next one drops b and asks c on 127.0.0.1 before a.  c's bind()
    # found the port held by b, and a, taken to hold IPv4 too, was closed
    # as well: the connections queued on it were reset.
    port = free_port()
    events, ready = tmp_path / 'events', tmp_path / 'ready'
    service = tmp_path / 'service.py'
    service.write_text(textwrap.dedent(LISTEN_CHILD))
    earlier = [('a', '::', port, 1), ('b', '0.0.0.0', port, None)]
    asked = {'c': ('127.0.0.1', port), 'a': ('::', port)}
    proc = child(
        EARLIER_IMAGE_CHILD,
        repr(earlier),
        str(ready),
        str(service),
        str(events),
        repr(asked),
        stdin=subprocess.PIPE,
    )
    wait_until(ready.exists, 'the earlier image')
    with socket.create_connection(('::1', port), TIMEOUT) as early:
        proc.stdin.write('exec\n')
        proc.stdin.flush()
        wait_until(
            lambda: starts_of(events) or proc.poll() is not None, 'the start'
        )
        assert proc.poll() is None, finish(proc)
        early.settimeout(TIMEOUT)
        assert line_from(early) == b'%d 1\n' % proc.pid  # Queued on a.
    proc.send_signal(signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, err) == (
        0,
        overlap_warning('b', '0.0.0.0', 'c', '127.0.0.1', port),
    )


@needs_netns
@pytest.mark.parametrize(
    'earlier, later, dropped',
    [
        # a on '::' is IPv6 only: b alone held 127.0.0.1.
        (
            {'a': '::', 'b': '0.0.0.0'},
            {'c': '127.0.0.1', 'a': '::'},
            '0.0.0.0',
        ),
        # A new '::' socket is IPv6 only: b alone held '::'.
        ({'a': '0.0.0.0', 'b': '::1'}, {'c': '::', 'a': '0.0.0.0'}, '::1'),
    ],
)
def test_listensockets_ipv6_only_by_default_overlaps_no_ipv4_host(
    child, tmp_path, earlier, later, dropped
):
    # In a network namespace with net.ipv6.bindv6only=1, a restart that
    # drops b and asks c before a closed a too: its IPv4 (or '::') host
    # was taken to overlap c's.
    port = free_port()
    events = tmp_path / 'events'
    addresses = '%r if "STARTS" in os.environ else %r' % tuple(
        {name: (host, port) for name, host in hosts.items()}
        for hosts in (later, earlier)
    )
    setup = 'ip link set lo up && echo 1 >/proc/sys/net/ipv6/bindv6only'
    proc = child(
        LISTEN_CHILD,
        str(events),
        addresses,
        executable='unshare',
        python_args=('-n', 'sh', '-c', setup + ' && exec "$@"', 'sh')
        + (sys.executable,),
    )
    wait_until(
        lambda: starts_of(events) or proc.poll() is not None, 'the first start'
    )
    os.kill(proc.pid, signal.SIGHUP)
    wait_until(
        lambda: len(starts_of(events)) > 1 or proc.poll() is not None,
        'the second start',
    )
    assert proc.poll() is None, finish(proc)
    proc.send_signal(signal.SIGTERM)
    status, out, err = finish(proc)
    assert (status, err) == (
        0,
        overlap_warning('b', dropped, 'c', later['c'], port),
    )


def hand_over(monkeypatch, **asked):
    """Set restart()'s handover: name -> asked field (None: its address).

    Return name -> (descriptor, address) of the listening sockets made.
    """
    made, lines = {}, ['%d' % os.getpid()]
    for name, field in asked.items():
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            sock.listen()
            made[name] = os.dup(sock.fileno()), sock.getsockname()
        field = repr(made[name][1]) if field is None else field
        lines.append('%s\t%d\t\t\t%s' % (name, made[name][0], field))
    monkeypatch.setenv(wp._LISTEN_ENV, '\n'.join(lines))
    return made


def handed_on():
    """The names in the handover restart() wrote."""
    lines = os.environ[wp._LISTEN_ENV].split('\n')[1:]
    return [line.split('\t')[0] for line in lines]


@pytest.mark.parametrize('started', [True, False])
def test_listensockets_a_socket_not_yet_asked_for_is_handed_on(
    bus, listen_sockets, monkeypatch, started
):
    # listen() may come after STARTED (run_async's main task, or
    # start_with_callback, sets up then listens): a restart meanwhile
    # closed the socket, and the next image refused connections.
    made = hand_over(monkeypatch, web=None, api=None, sd='')
    sockets = listen_sockets()
    sockets.subscribe()
    sockets.listen('web', made['web'][1])
    if started:
        bus.start()
    bus.execv = True
    sockets.exit()
    assert handed_on() == ['web', 'api', 'sd']
    os.fstat(made['api'][0])  # Still open.
    assert not any('Closing' in m for m in bus.recorder.messages())


def test_listensockets_an_older_handover_is_taken_by_name_once(
    bus, listen_sockets, monkeypatch
):
    # 'name<TAB>fd<TAB>path' left the address unknown, and was taken for
    # systemd's ('' asked): written so at every restart, it kept its
    # address for ever, whatever the configuration asked.
    monkeypatch.setattr(wp, '_owed_cleanups', [])
    made = hand_over(monkeypatch, web=None, old=None)
    lines = ['%s\t%d\t' % (name, made[name][0]) for name in ('web', 'old')]
    monkeypatch.setenv(wp._LISTEN_ENV, '\n'.join(['%d' % os.getpid()] + lines))
    sockets = listen_sockets()
    asked = ('127.0.0.1', made['web'][1][1])
    assert sockets.listen('web', asked).fileno() == made['web'][0]
    # A restart before the bus started: all handed on.
    handed = restart_in_process(bus, sockets)
    assert os.environ[wp._LISTEN_ENV].split('\n')[1:] == [
        'web\t%d\t\t\t%r' % (handed['web'], asked),  # Now known.
        lines[1],  # Still unknown: the older form again.
    ]
    moved = ('127.0.0.1', free_port())
    assert listen_sockets().listen('web', moved).getsockname() == moved
    assert ask(made['web'][1]) == 'refused'


def test_listensockets_two_instances_each_get_theirs_back(child, tmp_path):
    # A library's ListenSockets and the application's: each exit listener
    # wrote the handover alone, and the new image's first instance took it
    # all; the other's socket leaked and listen() found its port in use.
    web, admin = free_ports(2)
    events = tmp_path / 'events'
    library = (
        'library = wp.ListenSockets(bus)\n'
        'library.subscribe()\n'
        "library.listen('admin', ('127.0.0.1', %d))\n"
        'Server(bus, library).subscribe()' % admin
    )
    proc = child(
        LISTEN_CHILD, str(events), repr({'web': ('127.0.0.1', web)}), library
    )
    wait_until(lambda: starts_of(events), 'the first start')
    for count in (2, 3):
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(
            lambda n=count: (
                len(starts_of(events)) >= n or proc.poll() is not None
            ),
            'start %d' % count,
        )
        assert proc.poll() is None, finish(proc)
        for port in (web, admin):
            assert ask(('127.0.0.1', port)) == '%d %d\n' % (proc.pid, count)
    descriptors = {line[2].rsplit(' ', 1)[1] for line in starts_of(events)}
    assert len(descriptors) == 1, descriptors  # Nothing leaked.
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[:2] == (0, '')
    for port in (web, admin):
        assert ask(('127.0.0.1', port)) == 'refused'


def test_listensockets_a_real_exit_leaves_what_another_bus_may_claim(
    bus, listen_sockets, monkeypatch
):
    # A library's bus exits for real while the application's still runs:
    # the shared pool was closed, also the sockets the application's
    # ListenSockets would claim, so its listen() bound anew.
    made = hand_over(monkeypatch, api=None)
    library_bus = wp.Bus()
    library = wp.ListenSockets(library_bus)  # Made first: adopts them.
    library.subscribe()
    mine = listen_sockets()
    try:
        library_bus.exit()
    finally:
        atexit.unregister(library_bus._clean_exit)
    fd, address = made['api']
    assert mine.listen('api', address).fileno() == fd


def unix_listener(path):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.listen()
    return sock


def test_listensockets_exit_leaves_a_socket_file_that_is_not_ours(
    bus, tmp_path
):
    # The path cleared and bound again by another instance: its file.
    path = str(tmp_path / 'app.sock')
    sockets = wp.ListenSockets(bus)
    sockets.listen('web', path)
    os.remove(path)
    with unix_listener(path) as other:
        sockets.exit()
        assert os.path.exists(path)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            other.accept()[0].close()
    assert bus.recorder.messages(30) == []


def test_listensockets_relative_path_is_removed_where_it_was_bound(
    bus, tmp_path, monkeypatch
):
    ours, elsewhere = tmp_path / 'ours', tmp_path / 'elsewhere'
    ours.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(str(ours))
    sockets = wp.ListenSockets(bus)
    sockets.listen('web', 'app.sock')
    with unix_listener(str(elsewhere / 'app.sock')):
        monkeypatch.chdir(str(elsewhere))  # The service moved meanwhile.
        sockets.exit()
        assert (elsewhere / 'app.sock').exists()  # Another service's.
    assert not (ours / 'app.sock').exists()


def test_listensockets_socket_file_identity_crosses_a_restart(child, tmp_path):
    path = str(tmp_path / 'app.sock')
    events = tmp_path / 'events'
    proc = child(LISTEN_CHILD, str(events), repr({'local': path}))
    wait_until(lambda: starts_of(events), 'the first start')
    restart_and_wait(proc, events, 2)
    assert ask(path, socket.AF_UNIX) == '%d 2\n' % proc.pid
    os.remove(path)
    with unix_listener(path):
        proc.send_signal(signal.SIGTERM)
        assert finish(proc)[:2] == (0, '')
        assert os.path.exists(path)  # Not the file the child bound.


DROPPED_UNIX_CHILD = """
    import sys, wspbus_plugins as wp
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: level >= 30 and
                  print(msg, file=sys.stderr, flush=True))
    sockets = wp.ListenSockets(bus)
    sockets.subscribe()
    sockets.listen('web', sys.argv[1])
    wp.DropPrivileges(bus, uid='nobody', gid=sys.argv[2], umask=0o022
                      ).subscribe()
    bus.start()
    bus.exit()
"""


@needs_root
def test_listensockets_a_socket_file_it_cannot_remove_is_a_warning(child):
    # Bound as root in root's directory, then privileges dropped: the file
    # stayed at exit, and nothing said so.
    import tempfile

    directory = tempfile.mkdtemp(prefix='wspbus-root-')
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, 'app.sock')
        group = next(g for g in ('nogroup', 'nobody') if _group_exists(g))
        status, out, err = finish(child(DROPPED_UNIX_CHILD, path, group))
        assert (status, err) == (
            0,
            'Cannot remove the socket file %r: Permission denied.\n' % path,
        )
        assert os.path.exists(path)
    finally:
        shutil.rmtree(directory)


def test_listensockets_takes_the_handover_of_an_older_version(
    bus, monkeypatch, tmp_path
):
    # 'name<TAB>fd<TAB>path' only: the file's identity is taken at adoption.
    path = str(tmp_path / 'app.sock')
    fd = os.dup(unix_listener(path).detach())
    monkeypatch.setenv(
        wp._LISTEN_ENV, '%d\nweb\t%d\t%s' % (os.getpid(), fd, path)
    )
    sockets = wp.ListenSockets(bus)
    assert sockets.listen('web', path).fileno() == fd
    sockets.exit()
    assert not os.path.exists(path)


def test_listensockets_a_malformed_handover_line_is_skipped_alone(
    bus, listen_sockets, monkeypatch
):
    # A 6th field (a newer version's) made the new image ignore every
    # socket and leave them open: each listen() found its address in use.
    made = [socket.socket() for _ in range(3)]
    for sock in made:
        sock.bind(('127.0.0.1', 0))
        sock.listen()
    addresses = [sock.getsockname() for sock in made]
    web, admin, api = fds = [os.dup(sock.fileno()) for sock in made]
    for sock in made:
        sock.close()
    lines = [
        'web\t%d\t\t\t%r\tfrom a newer version' % (web, addresses[0]),
        'admin\t%d\t\tnot-an-identity\t%r' % (admin, addresses[1]),
        'no fields',
        'api\t%d\t\t\t%r' % (api, addresses[2]),
    ]
    monkeypatch.setenv(wp._LISTEN_ENV, '\n'.join(['%d' % os.getpid()] + lines))
    sockets = listen_sockets()
    with pytest.raises(OSError):
        os.fstat(admin)  # Closed, not leaked.
    assert bus.recorder.messages(30) == [
        'Ignoring the %s line %r: not what restart() writes%s.'
        % (wp._LISTEN_ENV, lines[i], closed)
        for i, closed in ((1, ' (descriptor %d closed)' % admin), (2, ''))
    ]
    for name, fd, address in zip(('web', 'api'), fds[::2], addresses[::2]):
        assert sockets.listen(name, address).fileno() == fd
        assert not os.get_inheritable(fd)


def test_listensockets_listen_again_after_the_server_closed_it(bus):
    # asyncio's server closes the socket it was given; a server started
    # again in the same image (stop() then start()) asks for it again.
    sockets = wp.ListenSockets(bus)
    try:
        first = sockets.listen('web', ('127.0.0.1', 0))
        address = first.getsockname()
        first.setblocking(False)  # As asyncio leaves it.
        first.close()
        again = sockets.listen('web', ('127.0.0.1', address[1]))
        assert again.fileno() != -1 and sockets.sockets == {'web': again}
        assert again.getsockname() == address
        assert again.gettimeout() is None
        assert not os.get_inheritable(again.fileno())
        with socket.create_connection(address, TIMEOUT):
            again.accept()[0].close()
        assert sockets.listen('web', address) is again  # Open: the same.
    finally:
        sockets.exit()


def test_listensockets_collected_closes_the_duplicates_it_kept(bus):
    # An instance dropped (a library's, never subscribed) left the
    # duplicate listen() keeps: the port stayed blocked, clients hung.
    import gc

    sockets = wp.ListenSockets(bus)
    given = sockets.listen('api', ('127.0.0.1', 0))
    address, kept = given.getsockname(), sockets._kept['api']
    given.close()  # Its server closed it (asyncio's does).
    del sockets
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(kept)
    assert ask(address) == 'refused'


PIDFILE_KIND_CHILD = """
    import sys, wspbus_plugins as wp
    if sys.argv[2] == 'exclusive':
        wp.fcntl = None  # As on Windows: exclusive creation.
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: level >= 40 and
                  print(msg.splitlines()[-1], file=sys.stderr, flush=True))
    wp.PIDFile(bus, sys.argv[1]).subscribe()
    bus.start()
    bus.exit()
"""


def make_node(path, kind):
    import stat

    if kind == 'FIFO':
        os.mkfifo(str(path))
    elif kind == 'character device':  # A copy of /dev/null.
        os.mknod(str(path), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(path))
    return os.lstat(str(path))


@pytest.mark.parametrize('claim', ['flock', 'exclusive'])
@pytest.mark.parametrize(
    'kind',
    [
        'FIFO',
        pytest.param('character device', marks=needs_root),
        'socket',
    ],
)
def test_pidfile_refuses_anything_but_a_regular_file(
    child, tmp_path, kind, claim
):
    path = tmp_path / 'app.pid'
    before = make_node(path, kind)
    status, out, err = finish(child(PIDFILE_KIND_CHILD, str(path), claim))
    assert status == 70, err
    assert (
        'Refusing to use PID file %r: it is a %s, not a regular file.'
        % (str(path), kind)
    ) in err
    after = os.lstat(str(path))  # Still there, untouched.
    assert (after.st_ino, after.st_mode, after.st_rdev) == (
        before.st_ino,
        before.st_mode,
        before.st_rdev,
    )


@pytest.mark.parametrize('close_first', [True, False])
def test_pidfile_closed_before_removed_where_the_platform_needs_it(
    bus, pidfile_path, monkeypatch, close_first
):
    # Windows refuses to delete an open file: close it first there.  On
    # Unix the file stays open, so its lock covers the removal.
    monkeypatch.setattr(wp, '_CLOSE_BEFORE_REMOVE', close_first)
    if close_first:
        monkeypatch.setattr(wp, 'fcntl', None)
    plugin = wp.PIDFile(bus, str(pidfile_path))
    plugin.start()
    fd = plugin._fd
    open_during_remove = []
    real_remove = os.remove

    def remove(path):
        try:
            os.fstat(fd)
        except OSError:
            open_during_remove.append(False)
        else:
            open_during_remove.append(True)
            if close_first:
                raise PermissionError(13, 'The file is in use', path)
        real_remove(path)

    monkeypatch.setattr(os, 'remove', remove)
    plugin.exit()
    assert not pidfile_path.exists()
    assert open_during_remove == [not close_first]
    assert bus.recorder.messages(30) == []


# -- PerpetualTimer and BackgroundTask ----------------------------------------


def test_perpetualtimer_repeats_until_cancelled(bus):
    calls = []
    timer = wp.PerpetualTimer(0.01, calls.append, args=(1,), bus=bus)
    timer.start()
    wait_until(lambda: len(calls) >= 3, 'three calls')
    timer.cancel()
    timer.join(TIMEOUT)
    assert not timer.is_alive()


def test_perpetualtimer_logs_the_first_error_and_stops(bus):
    calls = []

    def broken():
        calls.append(1)
        raise ValueError('tick failed')

    timer = wp.PerpetualTimer(0.01, broken, bus=bus)
    timer.start()
    timer.join(TIMEOUT)
    assert calls == [1]
    [msg] = bus.recorder.messages(40)
    assert msg.startswith(
        'Error in perpetual timer thread function %r.' % broken
    )
    assert 'ValueError: tick failed' in msg


def test_backgroundtask_repeats_and_cancel_ends_it_at_once(bus):
    calls = []
    task = wp.BackgroundTask(0.01, calls.append, args=[1], bus=bus)
    task.start()
    wait_until(lambda: len(calls) >= 3, 'three calls')
    slow = wp.BackgroundTask(60, calls.append, args=[2])
    slow.start()
    wait_until(lambda: slow.running, 'the task to run')
    started = time.monotonic()
    slow.cancel()
    slow.join(TIMEOUT)
    assert not slow.is_alive()
    assert time.monotonic() - started < 1  # Not the 60 s interval.
    task.cancel()
    task.join(TIMEOUT)
    assert 2 not in calls and task.daemon


def test_backgroundtask_cancel_before_start_never_calls(bus):
    calls = []
    task = wp.BackgroundTask(0, calls.append, args=[1])
    task.cancel()
    task.start()
    task.join(TIMEOUT)
    assert calls == [] and task.running is False


def test_backgroundtask_logs_the_first_error_and_stops(bus):
    calls = []

    def broken():
        calls.append(1)
        raise ValueError('task failed')

    task = wp.BackgroundTask(0.01, broken, bus=bus)
    task.start()
    task.join(TIMEOUT)
    assert calls == [1] and not task.running
    [msg] = bus.recorder.messages(40)
    assert msg.startswith(
        'Error in background task thread function %r.' % broken
    )


NOT_FINITE = [
    float('nan'),
    float('inf'),
    float('-inf'),
    threading.TIMEOUT_MAX * 2,
    1e22,
]


@pytest.mark.parametrize('interval', NOT_FINITE)
@pytest.mark.parametrize('task', [wp.BackgroundTask, wp.PerpetualTimer])
def test_backgroundtask_interval_must_be_finite(bus, task, interval):
    # NaN made the thread spin; inf and huge values killed it with an
    # OverflowError.  (Negatives and non-numbers: below.)
    with pytest.raises(
        ValueError, match=re.escape('Invalid interval: %r' % interval)
    ):
        task(interval, lambda: None)


@pytest.mark.parametrize('interval', [-1, -0.5, '1', None, True])
@pytest.mark.parametrize('task', [wp.BackgroundTask, wp.PerpetualTimer])
def test_backgroundtask_interval_must_be_a_number_from_zero(
    bus, task, interval
):
    # -1 made BackgroundTask call its function in a hot loop (CherryPy's
    # time.sleep(-1) raised); '1' failed only inside the thread.
    with pytest.raises(
        ValueError, match=re.escape('Invalid interval: %r' % (interval,))
    ):
        task(interval, lambda: None)
    task(0, lambda: None)  # As time.sleep(0): allowed.


# -- Monitor ------------------------------------------------------------------


def test_monitor_runs_while_started_and_restarts_on_graceful(bus):
    calls = []
    monitor = wp.Monitor(
        bus, lambda: calls.append(1), frequency=0.01, name='beat'
    )
    monitor.subscribe()
    assert bus._priorities[('start', monitor.start)] == 70
    bus.start()
    first = monitor.thread
    assert first.name == 'beat' and first.is_alive()
    wait_until(lambda: len(calls) >= 2, 'two beats')
    bus.graceful()
    assert monitor.thread is not first and monitor.thread.is_alive()
    first.join(TIMEOUT)
    assert not first.is_alive()
    bus.stop()
    assert monitor.thread is None
    messages = bus.recorder.messages()
    assert "Started monitor thread 'beat'." in messages
    assert "Stopped thread 'beat'." in messages
    assert repr(monitor) == "Monitor('beat', frequency=0.01)"


@pytest.mark.parametrize('frequency', [0, -1, -0.5])
def test_monitor_frequency_zero_or_less_disables(bus, frequency):
    monitor = wp.Monitor(bus, lambda: None, frequency=frequency)
    monitor.subscribe()
    bus.start()
    assert monitor.thread is None


@pytest.mark.parametrize('frequency', ['60', None, True, [1]] + NOT_FINITE)
@pytest.mark.parametrize('plugin', [wp.Monitor, wp.Autoreloader])
def test_monitor_non_numeric_or_infinite_frequency_is_named(
    bus, plugin, frequency
):
    args = (lambda: None,) if plugin is wp.Monitor else ()
    with pytest.raises(
        ValueError, match=re.escape('Invalid frequency: %r' % (frequency,))
    ):
        plugin(bus, *args, frequency=frequency)


def test_monitor_callback_must_be_callable(bus):
    with pytest.raises(TypeError, match="not 'nope'"):
        wp.Monitor(bus, 'nope')


class Overlaps:
    """A callback that notes whether two of its runs ever overlapped."""

    def __init__(self, seconds, then=None):
        self.seconds = seconds
        self.then = then
        self.active = 0
        self.most = 0
        self.runs = 0
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.active += 1
            self.runs += 1
            self.most = max(self.most, self.active)
        self.entered.set()
        if self.then is not None:
            self.then(self.runs)
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1


def test_monitor_stop_and_graceful_wait_for_the_running_callback(bus):
    callback = Overlaps(0.2)
    monitor = wp.Monitor(bus, callback, frequency=0.01)
    monitor.subscribe()
    bus.start()
    for _ in range(2):  # Each graceful lands while a callback runs.
        assert callback.entered.wait(TIMEOUT)
        callback.entered.clear()
        bus.graceful()
    assert callback.entered.wait(TIMEOUT)
    bus.stop()
    assert callback.active == 0  # None still running once stop returned.
    time.sleep(0.1)
    assert callback.active == 0  # And none started after.
    assert callback.most == 1  # Never two at once.


def test_monitor_graceful_from_its_own_thread_does_not_overlap(bus):
    def graceful_on_first_run(run):
        if run == 1:
            bus.graceful()

    callback = Overlaps(0.1, then=graceful_on_first_run)
    monitor = wp.Monitor(bus, callback, frequency=0.01)
    monitor.subscribe()
    bus.start()
    wait_until(lambda: callback.runs >= 3, 'runs after the graceful')
    bus.stop()
    assert callback.most == 1


def test_monitor_stop_from_its_own_thread_does_not_hang(bus):
    class NonDaemonMonitor(wp.Monitor):
        def _new_thread(self):
            thread = super()._new_thread()
            thread.daemon = False
            return thread

    stopped = threading.Event()

    def callback():
        monitor.stop()
        stopped.set()

    monitor = NonDaemonMonitor(bus, callback, frequency=0.01)
    monitor.start()
    thread = monitor.thread
    assert stopped.wait(TIMEOUT)
    thread.join(TIMEOUT)
    assert not thread.is_alive()  # Cancelled, not called again forever.


# -- Autoreloader -------------------------------------------------------------


@pytest.fixture
def reloader(bus, monkeypatch):
    restarts = []
    monkeypatch.setattr(bus, 'restart', lambda: restarts.append(1))
    plugin = wp.Autoreloader(bus, match=r'^test_wspbus_plugins$')
    plugin.restarts = restarts
    yield plugin
    if plugin.thread is not None:
        plugin.stop()


def test_autoreloader_watches_matching_modules(reloader):
    assert reloader.sysfiles() == {os.path.abspath(__file__)}
    reloader.match = r'^wspbus_plugins$'
    assert reloader.sysfiles() == {wp.__file__}
    assert wp.Autoreloader(reloader.bus).match == '.*'


@pytest.mark.parametrize('pattern', ['(', '[a-', 42])
def test_autoreloader_invalid_match_is_named(bus, pattern):
    with pytest.raises(
        ValueError,
        match=re.escape('Invalid Autoreloader match regex %r' % (pattern,)),
    ):
        wp.Autoreloader(bus, match=pattern)


def test_autoreloader_file_for_module_cases(monkeypatch, tmp_path):
    archive = tmp_path / 'lib.zip'
    with zipfile.ZipFile(archive, 'w') as zf:
        zf.writestr('zipped_mod_x.py', 'X = 1\n')
    monkeypatch.syspath_prepend(str(archive))
    import zipped_mod_x

    try:
        assert wp.Autoreloader._file_for_module(zipped_mod_x) == str(archive)
    finally:
        del sys.modules['zipped_mod_x']
    nothing = type(sys)('nothing')
    nothing.__file__ = None
    assert wp.Autoreloader._file_for_module(nothing) is None
    assert wp.Autoreloader._file_for_module(type(sys)('bare')) is None
    relative = type(sys)('relative')
    relative.__file__ = os.path.join('sub', 'mod.py')
    assert wp.Autoreloader._file_for_module(relative) == os.path.join(
        wp._STARTUP_DIR, 'sub', 'mod.py'
    )

    class Lazy(type(sys)):
        def __getattr__(self, name):
            raise ImportError('lazy module exploded')

    assert wp.Autoreloader._file_for_module(Lazy('lazy')) is None


def edit(path):
    path.write_text(path.read_text() + '# edited\n')


def set_mtime_backwards(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))


def replace_by_rename(path):
    temp = path.with_name(path.name + '.tmp')
    temp.write_text(path.read_text())  # Same content, same size.
    os.utime(temp, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    os.replace(temp, path)


def delete(path):
    path.unlink()


CHANGES = [edit, set_mtime_backwards, replace_by_rename, delete]


@pytest.mark.parametrize('change', CHANGES, ids=lambda f: f.__name__)
def test_autoreloader_polling_sees_every_kind_of_change(
    reloader, tmp_path, change
):
    watched = tmp_path / 'settings.py'
    watched.write_text('A = 1\n')
    reloader.files.add(str(watched))
    reloader.run()
    reloader.run()
    assert reloader.restarts == []
    change(watched)
    reloader.run()
    assert reloader.restarts == [1]
    assert (
        'Restarting because %s changed.' % watched
        in reloader.bus.recorder.messages()
    )


def test_autoreloader_a_new_file_appearing_counts(reloader, tmp_path):
    later = tmp_path / 'later.cfg'
    reloader.files.add(str(later))
    reloader.run()
    assert reloader.mtimes[str(later)] is None
    later.write_text('x')
    reloader.run()
    assert reloader.restarts == [1]


def start_reloader(reloader, frequency):
    reloader.frequency = frequency
    reloader.subscribe()
    reloader.bus.start()
    # The thread ran its first scan when the watched file has a signature.


@linux_only
def test_autoreloader_inotify_wakes_long_before_the_poll(reloader, tmp_path):
    watched = tmp_path / 'settings.py'
    watched.write_text('A = 1\n')
    reloader.files.add(str(watched))
    start_reloader(reloader, 60)  # A poll would take a minute.
    assert isinstance(reloader.thread, wp._WatchTask)
    wait_until(lambda: str(watched) in reloader.mtimes, 'the first scan')
    (tmp_path / 'unwatched.py').write_text('noise')  # Same directory.
    time.sleep(0.2)
    assert reloader.restarts == []
    for _ in range(5):  # A burst of writes: one restart.
        edit(watched)
    wait_until(lambda: reloader.restarts, 'the restart')
    time.sleep(0.2)
    assert reloader.restarts == [1]


@linux_only
def test_autoreloader_watcher_takes_descriptors_above_1024(tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip('cannot open 1,100 descriptors here')
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        watcher = wp._Inotify()
        try:
            assert watcher.fd >= 1024  # select() would refuse it.
            watched = tmp_path / 'settings.py'
            watched.write_text('A = 1\n')
            watcher.add([str(watched)])
            edit(watched)
            watcher.wait(TIMEOUT)
            assert watcher.pop_changed() == {str(watched)}
        finally:
            watcher.close()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_autoreloader_falls_back_to_polling_when_inotify_fails(
    reloader, tmp_path, monkeypatch
):
    def no_inotify():
        raise OSError(38, 'Function not implemented')

    monkeypatch.setattr(wp, '_Inotify', no_inotify)
    watched = tmp_path / 'settings.py'
    watched.write_text('A = 1\n')
    reloader.files.add(str(watched))
    start_reloader(reloader, 0.02)
    assert type(reloader.thread) is wp.BackgroundTask
    wait_until(lambda: str(watched) in reloader.mtimes, 'the first scan')
    edit(watched)
    wait_until(lambda: reloader.restarts, 'the polling restart')
    assert any(
        'inotify is unavailable' in m for m in reloader.bus.recorder.messages()
    )


def test_autoreloader_falls_back_when_the_watch_limit_is_hit(
    reloader, tmp_path, monkeypatch
):
    if not sys.platform.startswith('linux'):
        pytest.skip('inotify')

    def full(self, filenames):
        raise OSError(28, 'inotify watch limit reached')

    monkeypatch.setattr(wp._Inotify, 'add', full)
    watched = tmp_path / 'settings.py'
    watched.write_text('A = 1\n')
    reloader.files.add(str(watched))
    start_reloader(reloader, 0.02)
    wait_until(lambda: str(watched) in reloader.mtimes, 'the first scan')
    edit(watched)
    wait_until(lambda: reloader.restarts, 'the polling restart')
    assert any(
        'falls back to polling' in m
        for m in reloader.bus.recorder.messages(30)
    )


def test_autoreloader_use_inotify_false_forces_polling(reloader):
    reloader.use_inotify = False
    start_reloader(reloader, 60)
    assert type(reloader.thread) is wp.BackgroundTask


def test_autoreloader_stop_ends_the_thread_at_once(reloader):
    start_reloader(reloader, 60)
    thread = reloader.thread
    reloader.bus.stop()
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def make_configmap(base):
    """Lay out `base` as Kubernetes mounts a ConfigMap volume."""
    base.mkdir()
    (base / '..2024_01').mkdir()
    (base / '..2024_01' / 'app.ini').write_text('a = 1\n')
    os.symlink('..2024_01', str(base / '..data'))
    os.symlink(os.path.join('..data', 'app.ini'), str(base / 'app.ini'))
    return base / 'app.ini'


def update_configmap(base):
    """Swap the ..data link atomically, as the kubelet does."""
    (base / '..2024_02').mkdir()
    (base / '..2024_02' / 'app.ini').write_text('a = 2\n')
    os.symlink('..2024_02', str(base / '..data_tmp'))
    os.replace(str(base / '..data_tmp'), str(base / '..data'))  # mv -T
    import shutil

    shutil.rmtree(str(base / '..2024_01'))


def make_link_farm(base):
    base.mkdir()
    (base / 'store').mkdir()
    (base / 'store' / 'app.ini').write_text('a = 1\n')
    (base / 'farm').mkdir()
    os.symlink(str(base / 'store' / 'app.ini'), str(base / 'farm' / 'app.ini'))
    return base / 'farm' / 'app.ini'


def edit_link_farm(base):
    edit(base / 'store' / 'app.ini')  # The target, in another directory.


def make_release_link(base):
    base.mkdir()
    for version in ('v1', 'v2'):
        (base / version).mkdir()
        (base / version / 'app.py').write_text('VERSION = %r\n' % version)
    os.symlink('v1', str(base / 'current'))
    return base / 'current' / 'app.py'


def switch_release_link(base):
    os.symlink('v2', str(base / 'next'))
    os.replace(str(base / 'next'), str(base / 'current'))


SYMLINK_LAYOUTS = {
    'configmap': (make_configmap, update_configmap),
    'link-farm': (make_link_farm, edit_link_farm),
    'release-link': (make_release_link, switch_release_link),
}


@linux_only
@pytest.mark.parametrize('layout', sorted(SYMLINK_LAYOUTS))
def test_autoreloader_inotify_sees_changes_through_symlinks(
    reloader, tmp_path, layout
):
    make, change = SYMLINK_LAYOUTS[layout]
    base = tmp_path / 'config'
    watched = make(base)
    reloader.files.add(str(watched))
    start_reloader(reloader, 60)  # Only inotify can restart it in time.
    assert isinstance(reloader.thread, wp._WatchTask)
    wait_until(lambda: str(watched) in reloader.mtimes, 'the first scan')
    change(base)
    wait_until(lambda: reloader.restarts, 'the restart')
    assert (
        'Restarting because %s changed.' % watched
        in reloader.bus.recorder.messages()
    )


@linux_only
@pytest.mark.parametrize('edited', ['settings.ini', 'mod.py'])
def test_autoreloader_inotify_one_directory_named_two_ways(
    reloader, tmp_path, monkeypatch, edited
):
    # One inotify watch descriptor for both spellings of the directory.
    monkeypatch.chdir(tmp_path)
    for name in ('settings.ini', 'mod.py'):
        (tmp_path / name).write_text('x = 1\n')
    reloader.files.update(['settings.ini', str(tmp_path / 'mod.py')])
    start_reloader(reloader, 60)
    wait_until(lambda: 'settings.ini' in reloader.mtimes, 'the first scan')
    edit(tmp_path / edited)
    wait_until(lambda: reloader.restarts, 'the restart')


@linux_only
def test_autoreloader_inotify_full_check_catches_what_events_miss(
    reloader, tmp_path, monkeypatch
):
    # A change inotify cannot see (a network file system, lost events):
    # the periodic full check still finds it.
    monkeypatch.setattr(wp, '_FULL_CHECK', 0.3)
    watched = tmp_path / 'settings.ini'
    watched.write_text('a = 1\n')
    reloader.files.add(str(watched))
    start_reloader(reloader, 0.05)
    watcher = reloader.thread.watcher
    see = watcher.pop_changed
    monkeypatch.setattr(watcher, 'pop_changed', lambda: see() and set())
    wait_until(lambda: str(watched) in reloader.mtimes, 'the first scan')
    edit(watched)
    wait_until(lambda: reloader.restarts, 'the full check')


RELOAD_CHILD = """
    import os, sys, wspbus_plugins as wp
    watched, starts, mode = sys.argv[1:4]
    with open(starts, 'a') as f:
        f.write('%d\\n' % os.getpid())
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: print(msg, file=sys.stderr,
                                                  flush=True))
    if mode == 'fallback':
        wp._LINUX = False  # As on a platform without inotify.
    reloader = wp.Autoreloader(bus, frequency=float(sys.argv[4]),
                               use_inotify=(mode != 'polling'))
    reloader.files.add(watched)
    reloader.subscribe()
    wp.SignalHandler(bus).subscribe()
    bus.subscribe('started', lambda: reloader.thread and
                  open(starts + '.ready', 'w').close())
    bus.start()
    bus.block()
"""


def appear(path):
    path.write_text('new')


@pytest.mark.parametrize('mode', ['inotify', 'polling'])
@pytest.mark.parametrize(
    'change', CHANGES + [appear], ids=lambda f: f.__name__
)
def test_autoreloader_restarts_a_real_process(child, tmp_path, mode, change):
    if mode == 'inotify' and not sys.platform.startswith('linux'):
        pytest.skip('inotify')
    watched = tmp_path / 'watched.cfg'
    if change is not appear:
        watched.write_text('A = 1\n')
    starts = tmp_path / 'starts'
    ready = tmp_path / 'starts.ready'
    # inotify mode polls only once a minute: a restart proves the watcher.
    frequency = '60' if mode == 'inotify' else '0.05'
    proc = child(RELOAD_CHILD, str(watched), str(starts), mode, frequency)
    wait_until(ready.exists, 'the child to start')
    time.sleep(0.3)  # Let the first scan record the file.
    ready.unlink()
    change(watched)
    wait_until(ready.exists, 'the restarted child')
    assert lines_of(starts) == [str(proc.pid)] * 2
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert status == 0, err
    assert 'Restarting because %s changed.' % watched in err


def start_reload_child(child, tmp_path, mode, frequency, debounce=None):
    watched = tmp_path / 'watched.cfg'
    watched.write_text('A = 1\n')
    starts = tmp_path / 'starts'
    ready = tmp_path / 'starts.ready'
    code = RELOAD_CHILD
    if debounce is not None:
        code = textwrap.dedent(code).replace(
            'bus.start()', 'wp._DEBOUNCE = %r\nbus.start()' % debounce
        )
    proc = child(code, str(watched), str(starts), mode, frequency)
    wait_until(ready.exists, 'the child to start')
    ready.unlink()
    return proc, watched, starts, ready


@linux_only
def test_autoreloader_real_burst_restarts_once_and_ignores_neighbours(
    child, tmp_path
):
    # The debounce is made 0.25 s so that a busy machine descheduling this
    # test between two steps of the burst cannot split it in two saves.
    proc, watched, starts, ready = start_reload_child(
        child, tmp_path, 'inotify', '60', debounce=0.25
    )
    (tmp_path / 'neighbour.cfg').write_text('not watched')
    edit(tmp_path / 'neighbour.cfg')
    time.sleep(0.75)
    assert lines_of(starts) == [str(proc.pid)]  # No restart.
    for _ in range(5):  # An editor's multi-step save.
        edit(watched)
    wait_until(ready.exists, 'the restarted child')
    time.sleep(0.5)
    assert lines_of(starts) == [str(proc.pid)] * 2  # Exactly one restart.
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc)[0] == 0


def test_autoreloader_real_fallback_to_polling_restarts(child, tmp_path):
    proc, watched, starts, ready = start_reload_child(
        child, tmp_path, 'fallback', '0.05'
    )
    edit(watched)
    wait_until(ready.exists, 'the restarted child')
    assert lines_of(starts) == [str(proc.pid)] * 2
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert status == 0, err
    assert 'Autoreloader polls every 0.05 s: inotify is unavailable' in err


@linux_only
def test_autoreloader_real_configmap_update_restarts(child, tmp_path):
    base = tmp_path / 'config'
    watched = make_configmap(base)
    starts = tmp_path / 'starts'
    ready = tmp_path / 'starts.ready'
    proc = child(RELOAD_CHILD, str(watched), str(starts), 'inotify', '60')
    wait_until(ready.exists, 'the child to start')
    ready.unlink()
    update_configmap(base)
    wait_until(ready.exists, 'the restarted child')
    assert lines_of(starts) == [str(proc.pid)] * 2
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert status == 0, err
    assert 'Restarting because %s changed.' % watched in err


@linux_only
def test_autoreloader_real_save_in_steps_restarts_once_on_the_whole_file(
    child, tmp_path
):
    # A save written in several steps: the debounce waits for the last one.
    # Without it the process restarts on a partial file.  The debounce is
    # made 0.2 s (20 ms steps) so that a busy machine cannot fake a pause.
    code = textwrap.dedent(RELOAD_CHILD).replace(
        'bus.start()',
        """
wp._DEBOUNCE = 0.2
def record_what_the_restart_sees():
    if bus.execv:
        with open(watched) as f, open(starts + '.seen', 'a') as seen:
            seen.write(repr(f.read()) + '\\n')
bus.subscribe('stop', record_what_the_restart_sees)
bus.start()""",
    )
    watched = tmp_path / 'watched.cfg'
    watched.write_text('')
    starts = tmp_path / 'starts'
    ready = tmp_path / 'starts.ready'
    proc = child(code, str(watched), str(starts), 'inotify', '60')
    wait_until(ready.exists, 'the child to start')
    ready.unlink()
    chunks = ['[app]\n'] + ['key%d = %d\n' % (n, n) for n in range(8)]
    with open(str(watched), 'a') as f:
        for chunk in chunks:
            f.write(chunk)
            f.flush()
            time.sleep(0.02)
    wait_until(ready.exists, 'the restarted child')
    time.sleep(0.5)
    assert lines_of(starts) == [str(proc.pid)] * 2  # Exactly one restart.
    assert lines_of(tmp_path / 'starts.seen') == [repr(''.join(chunks))]
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc)[0] == 0


# -- ThreadManager ------------------------------------------------------------


def test_threadmanager_indexes_and_channels(bus):
    manager = wp.ThreadManager(bus)
    manager.subscribe()
    rec = Recorder()
    bus.subscribe('start_thread', rec.listener('start'))
    bus.subscribe('stop_thread', rec.listener('stop'))
    barrier = threading.Barrier(4)
    release = threading.Event()

    def worker():
        bus.publish('acquire_thread')
        bus.publish('acquire_thread')  # Once per thread.
        barrier.wait(TIMEOUT)
        release.wait(TIMEOUT)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    barrier.wait(TIMEOUT)
    assert sorted(manager.threads.values()) == [1, 2, 3]
    assert sorted(args[0] for _, args, _ in rec.calls) == [1, 2, 3]
    release.set()
    for thread in threads:
        thread.join(TIMEOUT)
    bus.start()
    bus.stop()
    assert manager.threads == {}
    assert sorted(a[0] for n, a, _ in rec.calls if n == 'stop') == [1, 2, 3]


def test_threadmanager_gives_the_lowest_free_index_never_a_used_one(bus):
    manager = wp.ThreadManager(bus)
    manager.subscribe()
    release = {name: threading.Event() for name in 'abcd'}
    got = {}

    def worker(name):
        bus.publish('acquire_thread')
        got[name] = manager.threads[threading.get_ident()]
        release[name].wait(TIMEOUT)
        bus.publish('release_thread')

    def run(name):
        thread = threading.Thread(target=worker, args=(name,))
        thread.start()
        wait_until(lambda: name in got, name)
        return thread

    threads = [run('a'), run('b')]
    release['a'].set()
    threads[0].join(TIMEOUT)  # Index 1 is free again, 2 is still held.
    threads += [run('c'), run('d')]
    assert got == {'a': 1, 'b': 2, 'c': 1, 'd': 3}
    for event in release.values():
        event.set()
    for thread in threads:
        thread.join(TIMEOUT)
    assert manager.threads == {}


def test_threadmanager_indexes_stay_unique_after_release(bus):
    manager = wp.ThreadManager(bus)
    manager.subscribe()
    got = {}

    def acquire(name, release=False):
        bus.publish('acquire_thread')
        got[name] = manager.threads[threading.get_ident()]
        if release:
            bus.publish('release_thread')

    hold = threading.Event()

    def holder():
        acquire('b')
        hold.wait(TIMEOUT)

    t1 = threading.Thread(target=acquire, args=('a', True))
    t1.start()
    t1.join(TIMEOUT)
    t2 = threading.Thread(target=holder)
    t2.start()
    wait_until(lambda: 'b' in got, 'b')
    t3 = threading.Thread(target=lambda: (acquire('c'), hold.wait(TIMEOUT)))
    t3.start()
    wait_until(lambda: 'c' in got, 'c')
    assert got['a'] == 1 and got['b'] == 1 and got['c'] == 2
    hold.set()
    t2.join(TIMEOUT)
    t3.join(TIMEOUT)
    bus.publish('graceful')
    assert manager.threads == {}


# -- Containers: ChildReaper and ProbeFiles -----------------------------------
# As PID 1, a service runs in a new PID namespace: `unshare --pid --fork
# --mount-proc --kill-child` (root); killing unshare kills the namespace.

_PID_NAMESPACE = []  # Why namespaces cannot be made here ('' if they can).


def pid_namespace_or_skip():
    if not _PID_NAMESPACE:
        reason = ''
        if not sys.platform.startswith('linux'):
            reason = 'PID namespaces are Linux only'
        elif not IS_ROOT:
            reason = 'needs root for unshare --pid'
        elif not shutil.which('unshare'):
            reason = 'needs unshare (util-linux)'
        else:
            probe = subprocess.run(
                ['unshare', '--pid', '--fork', '--mount-proc', 'true'],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            if probe.returncode:
                reason = 'unshare --pid fails: %s' % probe.stderr.strip()
        _PID_NAMESPACE.append(reason)
    if _PID_NAMESPACE[0]:
        pytest.skip(_PID_NAMESPACE[0])


UNSHARE = ('--pid', '--fork', '--mount-proc', '--kill-child')


def as_pid1(child, code, *args, **kwargs):
    """Run `code` as PID 1 of a new PID namespace; return (proc, its PID).

    The PID is the one outside the namespace, where signals come from.
    """
    pid_namespace_or_skip()
    proc = child(
        code,
        *args,
        executable='unshare',
        python_args=UNSHARE + (sys.executable,),
        **kwargs,
    )
    holder = []
    wait_until(
        lambda: holder.extend(children_of(proc.pid)) or holder,
        'the namespace init',
    )
    child.track(holder[0])
    return proc, holder[0]


def process_stats():
    """Yield (pid, state, parent PID) of every process, from /proc."""
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                with open('/proc/%s/stat' % name, 'rb') as f:
                    fields = f.read().rpartition(b')')[2].split()
            except OSError:
                continue
            yield int(name), fields[0].decode(), int(fields[1])


def children_of(pid):
    return [p for p, _, parent in process_stats() if parent == pid]


def zombies_of(pid):
    return [
        p
        for p, state, parent in process_stats()
        if parent == pid and state == 'Z'
    ]


def expect_line(proc, wanted):
    """Read the child's output up to a line starting with `wanted`."""
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            status, out, err = finish(proc)
            raise AssertionError(
                'no %r line; got %r, status %r, stderr:\n%s'
                % (wanted, lines, status, err)
            )
        if line.startswith(wanted):
            return line.strip()
        lines.append(line)


def test_childreaper_subreaper_must_be_a_bool(bus):
    with pytest.raises(TypeError, match=re.escape("not 'yes'")):
        wp.ChildReaper(bus, subreaper='yes')
    assert repr(wp.ChildReaper(bus, True)) == 'ChildReaper(subreaper=True)'


@pytest.mark.parametrize(
    'pid, error',
    [
        ('12', TypeError),
        (1.0, TypeError),
        (True, TypeError),
        (0, ValueError),
        (-4, ValueError),
    ],
)
def test_childreaper_keep_rejects_what_is_not_a_pid(bus, pid, error):
    with pytest.raises(error, match=re.escape(repr(pid))):
        wp.ChildReaper(bus).keep(pid)


def test_childreaper_keep_and_release(bus):
    reaper = wp.ChildReaper(bus)
    me = os.getpid()
    start = wp._start_time(me)
    release = reaper.keep(me)
    assert reaper._is_kept((me, start))
    assert not reaper._is_kept((me, start + 1))  # Another process, same PID.
    release()
    assert not reaper._is_kept((me, start))
    reaper.keep(me)
    reaper.release(me)
    assert not reaper._is_kept((me, start))


def test_childreaper_keep_forgets_processes_that_ended(bus):
    reaper = wp.ChildReaper(bus)
    ended = []
    for _ in range(20):
        proc = subprocess.Popen(['true'])
        proc.wait()
        ended.append(proc.pid)
        reaper.keep(proc.pid)
    reaper.keep(os.getpid())
    assert set(reaper._kept) <= {os.getpid()} | set(ended)
    assert len(reaper._kept) < 20  # Pruned as it grew.
    assert os.getpid() in reaper._kept


def start_reaper(bus, reaper):
    reaper.subscribe()
    bus.start()
    return bus.recorder.messages()


def test_childreaper_does_nothing_off_linux(bus, monkeypatch):
    monkeypatch.setattr(wp, '_LINUX', False)
    reaper = wp.ChildReaper(bus, subreaper=True)
    logs = start_reaper(bus, reaper)
    assert (
        'ChildReaper does nothing on %r: it needs Linux.' % sys.platform
        in logs
    )
    assert reaper.thread is None


@linux_only
def test_childreaper_not_pid1_nor_subreaper_has_nothing_to_reap(bus):
    reaper = wp.ChildReaper(bus)
    logs = start_reaper(bus, reaper)
    assert (
        'ChildReaper has nothing to reap: PID %r is not PID 1 and '
        'subreaper=False, so orphans go to init.' % os.getpid()
    ) in logs
    assert reaper.thread is None


@linux_only
def test_childreaper_needs_this_namespaces_proc(bus, monkeypatch):
    monkeypatch.setattr(os, 'readlink', lambda path: '999999')
    reaper = wp.ChildReaper(bus, subreaper=True)
    logs = start_reaper(bus, reaper)
    assert any(
        'ChildReaper cannot reap: /proc belongs to another PID namespace' in m
        and 'unshare --mount-proc' in m
        for m in bus.recorder.messages(logging.WARNING)
    ), logs
    assert reaper.thread is None


@linux_only
def test_childreaper_refused_subreaper_is_logged(bus, monkeypatch):
    def refuse(on):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), 'prctl')

    monkeypatch.setattr(wp, '_child_subreaper', lambda: False)
    monkeypatch.setattr(wp, '_set_child_subreaper', refuse)
    reaper = wp.ChildReaper(bus, subreaper=True)
    start_reaper(bus, reaper)
    assert (
        'ChildReaper could not make PID %r a child subreaper ([Errno %d] %s: '
        "'prctl'); orphans go to init."
        % (os.getpid(), errno.EINVAL, os.strerror(errno.EINVAL))
    ) in bus.recorder.messages(logging.WARNING)
    assert reaper.thread is None


SUBREAPER_CHILD = """
    import os, sys, time, wspbus_plugins as wp
    if sys.argv[1] == 'scan':  # As on PyPy, which cannot peek.
        wp._CAN_PEEK_AT_ZOMBIES = False
    bus = wp.Bus()
    wp.SignalHandler(bus).subscribe()
    if sys.argv[2] == 'reaper':
        wp.ChildReaper(bus, subreaper=True).subscribe()
    bus.start()
    for _ in range(20):  # Orphans: their parent ends at once.
        pid = os.fork()
        if pid == 0:
            if os.fork() == 0:
                time.sleep(1)  # Long enough to be seen adopted.
                os._exit(3)
            os._exit(0)
        os.waitpid(pid, 0)
    print('orphaned', flush=True)
    bus.block()
"""


@linux_only
@pytest.mark.parametrize('peek', ['peek', 'scan'])
def test_childreaper_subreaper_adopts_and_reaps_orphans(child, peek):
    proc = child(SUBREAPER_CHILD, peek, 'reaper')
    expect_line(proc, 'orphaned')
    adopted = children_of(proc.pid)  # Reparented to the service.
    assert len(adopted) == 20
    wait_until(lambda: not children_of(proc.pid), 'the orphans to be reaped')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert status == 0, err


ORPHANS_CHILD = """
    import os, sys, time, wspbus_plugins as wp
    bus = wp.Bus()
    wp.SignalHandler(bus).subscribe()
    if sys.argv[1] == 'reaper':
        reaper = wp.ChildReaper(bus)
        reaper.subscribe()
    bus.start()
    print('pid', os.getpid(), flush=True)
    for _ in range(int(sys.argv[2])):  # Double fork: the grandchild ends
        pid = os.fork()                 # as an orphan, adopted by PID 1.
        if pid == 0:
            if os.fork() == 0:
                os._exit(0)
            os._exit(0)
        os.waitpid(pid, 0)
    print('orphaned', flush=True)
    bus.block()
"""


def test_childreaper_as_pid1_leaves_no_zombie(child):
    proc, pid = as_pid1(child, ORPHANS_CHILD, 'reaper', '200')
    assert expect_line(proc, 'pid') == 'pid 1'
    expect_line(proc, 'orphaned')
    wait_until(lambda: not zombies_of(pid), 'no zombie', timeout=1)
    os.kill(pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert status == 0, err


@pytest.mark.parametrize('reaper', ['reaper', 'no reaper'])
def test_childreaper_as_pid1_sigterm_ends_the_service(child, reaper):
    proc, pid = as_pid1(child, ORPHANS_CHILD, reaper, '0')
    expect_line(proc, 'orphaned')
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert time.monotonic() - started < 1, 'SIGTERM took over 1 s'
    assert status == 0, err


def test_pid1_ignores_sigterm_without_a_handler(child):
    # What the README says: the kernel applies no default action to PID 1.
    code = """
        import time
        print('running', flush=True)
        time.sleep(60)
    """
    proc, pid = as_pid1(child, code)
    expect_line(proc, 'running')
    os.kill(pid, signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.5)  # Alive: SIGTERM did nothing.


EXIT_SEVEN_CHILD = """
    import multiprocessing, os, subprocess, time, wspbus_plugins as wp
    bus = wp.Bus()
    reaper = wp.ChildReaper(bus)
    reaper.subscribe()
    bus.start()
    assert reaper.thread is not None
    wrong = []

    def check(what, status):
        if status != 7:
            wrong.append((what, status))

    def fork7():
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        return pid

    def status_of(pid):
        try:
            return os.WEXITSTATUS(os.waitpid(pid, 0)[1])
        except ChildProcessError:  # Taken by someone else.
            return 'ECHILD'

    for _ in range(500):
        check('run', subprocess.run(['sh', '-c', 'exit 7']).returncode)
    for _ in range(100):
        done = subprocess.run(['sh', '-c', 'echo x; exit 7'],
                              capture_output=True)
        check('run, capture_output', done.returncode)
    for _ in range(500):
        check('fork, waitpid', status_of(fork7()))
    # Waited for within the grace period (0.2 s), with no keep().
    for _ in range(10):
        pids = [fork7() for _ in range(20)]
        time.sleep(0.05)
        for pid in pids:
            check('fork, waitpid soon', status_of(pid))
    # Waited for long after they ended: a naive reaper steals them all.
    popens = [subprocess.Popen(['sh', '-c', 'exit 7']) for _ in range(20)]
    kept = [fork7() for _ in range(20)]
    for pid in kept:
        reaper.keep(pid)
    fork = multiprocessing.get_context('fork')
    workers = [fork.Process(target=os._exit, args=(7,)) for _ in range(5)]
    for worker in workers:
        worker.start()
    time.sleep(1)
    for popen in popens:
        check('Popen.wait', popen.wait())
    for pid in kept:
        check('keep, waitpid', status_of(pid))
    for worker in workers:
        worker.join()
        check('multiprocessing', worker.exitcode)
    print('wrong', wrong, flush=True)
    bus.exit()
"""


def test_childreaper_as_pid1_never_takes_a_status_the_program_waits_for(
    child,
):
    proc, pid = as_pid1(child, EXIT_SEVEN_CHILD)
    status, out, err = finish(proc)
    assert status == 0, err
    assert 'wrong []' in out, out + err


def readme_probe_commands():
    """The readinessProbe and livenessProbe commands of README's recipe."""
    return [
        json.loads(line.split('command:', 1)[1])
        for line in readme_text().splitlines()
        if line.strip().startswith('command: [')
    ]


def test_readme_container_recipe_as_pid1(child, tmp_path):
    (app,) = readme_examples(container=True)
    (tmp_path / 'main.py').write_text(app)
    readiness, liveness = readme_probe_commands()
    launcher = """
        import os, subprocess, sys, wspbus_plugins
        # PID 1 for now: mount a private /tmp, put the module and the app
        # in /tmp/srv (the Dockerfile's COPY lines; the tmpfs hides a
        # checkout under /tmp) and become `python -m app`, as its CMD.
        app = open('main.py').read()
        module = open(wspbus_plugins.__file__).read()
        python = os.path.realpath(sys.executable)  # A venv's may be in /tmp.
        subprocess.run(['mount', '-t', 'tmpfs', 'tmpfs', '/tmp'], check=True)
        os.makedirs('/tmp/srv/app')
        with open('/tmp/srv/app/__main__.py', 'w') as f:
            f.write(app)
        with open('/tmp/srv/wspbus_plugins.py', 'w') as f:
            f.write(module)
        os.chdir('/tmp/srv')
        os.execv(python, [python, '-m', 'app'])
    """
    proc, pid = as_pid1(child, launcher)
    inside = ['nsenter', '--target', str(pid), '--mount', '--pid', '--']

    def probe(command):
        return subprocess.run(inside + command, timeout=TIMEOUT).returncode

    wait_until(lambda: probe(readiness) == 0, 'the readiness probe')
    assert probe(liveness) == 0
    orphans = 'for i in $(seq 50); do (sleep 1 &); done'  # As kubectl exec.
    assert probe(['sh', '-c', orphans]) == 0
    assert len(children_of(pid)) == 50  # Adopted by PID 1, asleep.
    wait_until(lambda: not children_of(pid), 'the orphans to be reaped')
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: probe(readiness) != 0, 'not ready')
    assert proc.poll() is None and probe(liveness) == 0  # Draining.
    os.kill(pid, signal.SIGTERM)  # Cut the 5 s drain short.
    status, out, err = finish(proc)
    assert status == 0, err


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'interval': 0}, 'Invalid interval: 0 '),
        ({'interval': -1}, 'Invalid interval: -1 '),
        ({'interval': float('nan')}, 'Invalid interval: nan '),
        ({'interval': float('inf')}, 'Invalid interval: inf '),
        ({'interval': '5'}, "Invalid interval: '5' "),
        ({'interval': True}, 'Invalid interval: True '),
        ({'drain': -0.5}, 'Invalid drain: -0.5 '),
        ({'drain': float('inf')}, 'Invalid drain: inf '),
        ({'drain': None}, 'Invalid drain: None '),
        ({'drain': 1e300}, 'Invalid drain: 1e+300 '),
    ],
)
def test_probefiles_rejects_bad_numbers(bus, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        wp.ProbeFiles(bus, **kwargs)


def test_probefiles_rejects_bad_paths(bus, tmp_path, monkeypatch):
    missing = str(tmp_path / 'missing' / 'ready')
    with pytest.raises(ValueError, match='Ready file directory .* does not'):
        wp.ProbeFiles(bus, ready=missing)
    with pytest.raises(TypeError, match=re.escape('not 42')):
        wp.ProbeFiles(bus, alive=42)
    same = str(tmp_path / 'probe')
    monkeypatch.chdir(str(tmp_path))
    with pytest.raises(ValueError, match=re.escape('not both %r' % same)):
        wp.ProbeFiles(bus, ready='probe', alive=pathlib.Path(same))
    assert wp.ProbeFiles(bus, ready='probe').ready == same  # Absolute.
    monkeypatch.setattr(os, 'access', lambda *args, **kwargs: False)
    with pytest.raises(ValueError, match='Alive file directory .* not writ'):
        wp.ProbeFiles(bus, alive=same)


@pytest.mark.parametrize(
    'path, message',
    [
        ('', "Ready file '' names a directory, not a file."),
        ('sub/', "Ready file 'sub/' names a directory, not a file."),
        ('.', "Ready file '.' names a directory, not a file."),
        ('sub', "Ready file 'sub' names a directory, not a file."),
        ('a\0b', "Ready file 'a\\x00b' contains a NUL byte."),
    ],
)
def test_probefiles_rejects_a_path_that_is_no_file(
    bus, tmp_path, monkeypatch, path, message
):
    # '' used to become the working directory, where ready could never be
    # made: the service ran, never ready, with only an error logged.
    monkeypatch.chdir(str(tmp_path))
    (tmp_path / 'sub').mkdir()
    with pytest.raises(ValueError, match=re.escape(message)):
        wp.ProbeFiles(bus, ready=path)
    with pytest.raises(ValueError, match=re.escape(message[6:])):
        wp.ProbeFiles(bus, alive=path.encode())


@pytest.fixture
def probes(bus, tmp_path):
    """ProbeFiles on `bus`, made with probes(**kwargs)."""

    def make(**kwargs):
        kwargs.setdefault('ready', str(tmp_path / 'ready'))
        kwargs.setdefault('alive', str(tmp_path / 'alive'))
        plugin = wp.ProbeFiles(bus, **kwargs)
        plugin.subscribe()
        return plugin

    return make


def age(path):
    return time.time() - os.stat(path).st_mtime


def test_probefiles_life_cycle(bus, probes):
    plugin = probes(interval=0.05)
    assert repr(plugin) == (
        'ProbeFiles(ready=%r, alive=%r, interval=0.05, drain=0)'
        % (plugin.ready, plugin.alive)
    )
    seen = []
    bus.subscribe(
        'start',
        lambda: seen.append(
            (os.path.exists(plugin.ready), os.path.exists(plugin.alive))
        ),
    )
    bus.start()
    assert seen == [(False, True)]  # Not ready before STARTED.
    assert os.path.exists(plugin.ready)
    assert 'Ready: created %r.' % plugin.ready in bus.recorder.messages()
    old = time.time() - 120
    os.utime(plugin.alive, (old, old))
    plugin.interval = 60
    bus.publish('main')  # Touched at most every interval.
    assert age(plugin.alive) > 100
    plugin.interval = 0.05
    time.sleep(0.06)
    bus.publish('main')
    assert age(plugin.alive) < 100
    bus.stop()
    assert not os.path.exists(plugin.ready)
    os.utime(plugin.alive, (old, old))
    time.sleep(0.06)
    bus.publish('main')  # Not STARTED: not touched.
    assert age(plugin.alive) > 100
    bus.start()
    assert os.path.exists(plugin.ready)
    bus.exit()
    assert not os.path.exists(plugin.ready)
    assert not os.path.exists(plugin.alive)


def test_probefiles_drain_only_on_an_exit_from_started(bus, probes):
    probes(drain=60)
    bus.start()
    started = time.monotonic()
    bus.stop()  # A plain stop: no drain.
    bus.start()
    bus.restart()  # ListenSockets keeps the sockets: no drain either.
    assert time.monotonic() - started < 30
    assert bus.state is wp.states.EXITING
    assert not any('Draining' in m for m in bus.recorder.messages())


def test_probefiles_stale_ready_file_goes_before_the_start(
    bus, probes, tmp_path
):
    # Left by a run killed with SIGKILL, on a volume that outlives it (a
    # Kubernetes emptyDir): the probe must not pass while this one starts.
    (tmp_path / 'ready').write_text('')
    plugin = probes()
    seen = []
    bus.subscribe('start', lambda: seen.append(os.path.exists(plugin.ready)))
    bus.start()
    assert seen == [False]
    assert os.path.exists(plugin.ready)
    assert (
        'Removed a stale ready file %r: not ready until started.'
        % plugin.ready
        in bus.recorder.messages(logging.WARNING)
    )
    bus.exit()
    assert not os.path.exists(plugin.ready)


def test_probefiles_refuses_a_planted_symlink(bus, probes, tmp_path):
    target = tmp_path / 'target'
    target.write_text('keep me')
    old = time.time() - 120
    os.utime(str(target), (old, old))
    os.symlink(str(target), str(tmp_path / 'ready'))
    plugin = probes()
    bus.start()
    assert any(
        m.startswith('Could not create ready file %r: ' % plugin.ready)
        for m in bus.recorder.messages(logging.ERROR)
    )
    assert target.read_text() == 'keep me' and age(str(target)) > 100
    bus.exit()
    assert os.path.islink(plugin.ready)  # Not ours: left alone.


def test_probefiles_leaves_a_replaced_file(bus, probes, tmp_path):
    plugin = probes()
    bus.start()
    (tmp_path / 'other').write_text('')
    os.replace(str(tmp_path / 'other'), plugin.ready)
    bus.stop()
    assert os.path.exists(plugin.ready)
    assert (
        'Probe file %r was replaced; leaving it.' % plugin.ready
        in bus.recorder.messages(logging.WARNING)
    )


PROBE_CHILD = """
    import os, socket, sys, threading, wspbus_plugins as wp
    ready, alive, drain = sys.argv[1], sys.argv[2], float(sys.argv[3])
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: print(msg, file=sys.stderr))
    handler = wp.SignalHandler(bus)

    def wedge():  # Runs on the main thread, from block()'s loop.
        print('wedged', flush=True)
        threading.Event().wait()

    handler.handlers['SIGUSR1'] = wedge
    handler.subscribe()
    wp.ProbeFiles(bus, ready, alive, interval=0.1, drain=drain).subscribe()
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(16)
    server.settimeout(0.05)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn = server.accept()[0]
            except OSError:
                continue
            with conn:
                conn.sendall(b'served\\n')

    thread = threading.Thread(target=serve)

    def stop():  # The server's own stop listener: stops accepting.
        done.set()
        thread.join()
        server.close()
        print('stopped serving', flush=True)

    bus.subscribe('start', thread.start)
    bus.subscribe('stop', stop)
    bus.subscribe('started', lambda: print(
        'started', server.getsockname()[1], os.path.exists(ready),
        flush=True), priority=90)
    bus.start()
    bus.block()
"""


PROBE_ASYNC_CHILD = """
    import asyncio, os, sys, wspbus_plugins as wp
    ready, alive, drain = sys.argv[1], sys.argv[2], float(sys.argv[3])
    bus = wp.Bus()
    bus.subscribe('log', lambda msg, level: print(msg, file=sys.stderr))
    wp.SignalHandler(bus).subscribe()
    wp.ProbeFiles(bus, ready, alive, interval=0.1, drain=drain).subscribe()

    async def answer(reader, writer):
        writer.write(b'served\\n')
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(answer, '127.0.0.1', 0)
        port = server.sockets[0].getsockname()[1]
        print('started', port, os.path.exists(ready), flush=True)
        try:
            await server.serve_forever()
        finally:
            print('stopped serving', flush=True)

    bus.run_async(main())
"""
PROBE_CHILDREN = {'block': PROBE_CHILD, 'run_async': PROBE_ASYNC_CHILD}


def start_probe_child(child, tmp_path, drain, how='block'):
    ready, alive = str(tmp_path / 'ready'), str(tmp_path / 'alive')
    proc = child(PROBE_CHILDREN[how], ready, alive, str(drain))
    _, port, was_ready = expect_line(proc, 'started').split()
    assert was_ready == 'True'
    assert ask(('127.0.0.1', int(port))) == 'served\n'
    return proc, int(port), ready, alive


@pytest.mark.parametrize('how', sorted(PROBE_CHILDREN))
def test_probefiles_drain_keeps_serving_then_exits(child, tmp_path, how):
    proc, port, ready, alive = start_probe_child(child, tmp_path, 2, how)
    sigterm = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    wait_until(lambda: not os.path.exists(ready), 'ready removed', timeout=1)
    assert proc.poll() is None
    for after in (0.5, 1.0, 1.5):  # Still serving, though not ready.
        time.sleep(max(0, sigterm + after - time.monotonic()))
        assert ask(('127.0.0.1', port)) == 'served\n'
    expect_line(proc, 'stopped serving')
    assert time.monotonic() - sigterm >= 2
    status, out, err = finish(proc)
    assert status == 0, err
    assert (
        'Draining: serving 2.0 s more before stopping (a second SIGTERM or '
        'Ctrl+C stops now).' in err
    )
    assert not os.path.exists(ready) and not os.path.exists(alive)


@pytest.mark.parametrize('how', sorted(PROBE_CHILDREN))
def test_probefiles_second_sigterm_cuts_the_drain_short(child, tmp_path, how):
    proc, port, ready, alive = start_probe_child(child, tmp_path, 60, how)
    os.kill(proc.pid, signal.SIGTERM)
    wait_until(lambda: not os.path.exists(ready), 'ready removed')
    assert ask(('127.0.0.1', port)) == 'served\n'
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc, timeout=15)  # Not the 60 s drain.
    assert status == 0, err
    assert 'Draining cut short: stopping now.' in err
    assert not os.path.exists(ready) and not os.path.exists(alive)


LIVENESS = 'test -n "$(find %s -mmin -1)"'  # As in README's recipe.


def fresh(path):
    return subprocess.run(['sh', '-c', LIVENESS % path]).returncode == 0


def test_probefiles_alive_goes_stale_when_the_main_thread_is_wedged(
    child, tmp_path
):
    proc, port, ready, alive = start_probe_child(child, tmp_path, 0)
    old = time.time() - 120
    os.utime(alive, (old, old))
    assert not fresh(alive)  # The probe sees an old file.
    wait_until(lambda: fresh(alive), 'alive touched again')
    os.kill(proc.pid, signal.SIGUSR1)
    expect_line(proc, 'wedged')
    os.utime(alive, (old, old))
    time.sleep(1)  # Ten intervals.
    assert not fresh(alive)
    assert age(alive) > 100
    assert ask(('127.0.0.1', port)) == 'served\n'  # Other threads still serve.


# -- SystemdNotifier ----------------------------------------------------------


@pytest.fixture(params=['path', 'abstract'])
def notify_socket(request, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == 'path':
        address = str(tmp_path / 'notify.sock')
        sock.bind(address)
    else:
        address = '@wspbus-test-%d-%d' % (os.getpid(), id(sock))
        sock.bind('\0' + address[1:])
    sock.settimeout(TIMEOUT)
    yield NotifySocket(sock, address)
    sock.close()


class NotifySocket:
    def __init__(self, sock, address):
        self.sock = sock
        self.address = address


def datagrams(notify, count):
    return [notify.sock.recv(4096).decode() for _ in range(count)]


def pending_datagrams(notify):
    """Return the datagrams already waiting, without waiting."""
    got = []
    notify.sock.settimeout(0)
    try:
        while True:
            got.append(notify.sock.recv(4096).decode())
    except BlockingIOError:
        return got
    finally:
        notify.sock.settimeout(TIMEOUT)


SYSTEMD_CHILD = """
    import os, sys, threading, wspbus_plugins as wp
    mode = sys.argv[1]
    if mode == 'watchdog-pid-ours':  # As systemd sets it for MAINPID.
        os.environ['WATCHDOG_PID'] = str(os.getpid())
    bus = wp.Bus()
    notifier = wp.SystemdNotifier(bus)
    notifier.subscribe()
    # Markers: where the notifier's messages fall among other listeners.
    for channel in ('graceful', 'stop'):
        bus.subscribe(channel, lambda c=channel: notifier.notify(
            'X-LISTENER=' + c), priority=1)
    if mode == 'fail':
        def broken():
            raise ValueError
        bus.subscribe('start', broken)
    bus.start()
    if mode.startswith('watchdog'):  # Pings come from block()'s loop.
        threading.Timer(0.5, bus.exit).start()
        bus.block()
    else:
        bus.graceful()
        bus.exit()
"""


def test_systemdnotifier_sends_the_life_cycle_in_order(child, notify_socket):
    proc = child(
        SYSTEMD_CHILD, 'ok', env={'NOTIFY_SOCKET': notify_socket.address}
    )
    got = datagrams(notify_socket, 6)
    status, out, err = finish(proc)
    assert status == 0, err
    assert got[0] == 'READY=1\nMAINPID=%d\nSTATUS=started' % proc.pid
    assert re.fullmatch(
        r'RELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=reloading', got[1]
    )
    usec = int(re.search(r'MONOTONIC_USEC=(\d+)', got[1]).group(1))
    assert abs(usec - time.monotonic_ns() // 1000) < TIMEOUT * 10**6
    # RELOADING=1 before every graceful listener, READY=1 after them;
    # STOPPING=1 before every other stop listener.
    assert got[2:] == [
        'X-LISTENER=graceful',
        'READY=1\nSTATUS=started',
        'STOPPING=1\nSTATUS=stopping',
        'X-LISTENER=stop',
    ]


def pings_until_stopping(notify):
    got = []
    while not got or not got[-1].startswith('STOPPING=1'):
        got += datagrams(notify, 1)
    return got


@pytest.mark.parametrize('mode', ['watchdog', 'watchdog-pid-ours'])
def test_systemdnotifier_watchdog_pings(child, notify_socket, mode):
    proc = child(
        SYSTEMD_CHILD,
        mode,
        env={
            'NOTIFY_SOCKET': notify_socket.address,
            'WATCHDOG_USEC': '100000',
        },
    )
    got = pings_until_stopping(notify_socket)
    assert finish(proc)[0] == 0
    assert got.count('WATCHDOG=1') >= 2


def test_systemdnotifier_no_pings_for_another_watchdog_pid(
    child, notify_socket
):
    proc = child(
        SYSTEMD_CHILD,
        'watchdog',
        env={
            'NOTIFY_SOCKET': notify_socket.address,
            'WATCHDOG_USEC': '100000',
            'WATCHDOG_PID': '1',
        },
    )
    got = pings_until_stopping(notify_socket)
    finish(proc)
    assert [g.split('\n')[0] for g in got] == ['READY=1', 'STOPPING=1']


@pytest.mark.parametrize('watchdog_pid', [None, 'ours'])
def test_systemdnotifier_watchdog_pings_every_half_watchdog_usec(
    bus, monkeypatch, notify_socket, watchdog_pid
):
    monkeypatch.setenv('NOTIFY_SOCKET', notify_socket.address)
    monkeypatch.setenv('WATCHDOG_USEC', '1000000')  # Pings every 0.5 s.
    if watchdog_pid:
        monkeypatch.setenv('WATCHDOG_PID', str(os.getpid()))
    else:
        monkeypatch.delenv('WATCHDOG_PID', raising=False)
    clock = [1000.0]
    monkeypatch.setattr(time, 'monotonic', lambda: clock[0])
    wp.SystemdNotifier(bus).subscribe()
    bus.publish('main')  # Not started yet: no ping.
    bus.start()
    assert datagrams(notify_socket, 1)[0].startswith('READY=1')
    pinged = []
    for at in (0.1, 0.4, 0.59, 0.61, 0.9, 1.0, 1.12, 1.5):
        clock[0] = 1000.0 + at
        bus.publish('main')  # As block() does every 0.1 s.
        sent = pending_datagrams(notify_socket)
        assert sent in ([], ['WATCHDOG=1'])
        if sent:
            pinged.append(at)
    assert pinged == [0.1, 0.61, 1.12]


WEDGED_CHILD = """
    import os, sys, time, wspbus_plugins as wp
    marker = sys.argv[1]
    bus = wp.Bus()
    wp.SystemdNotifier(bus).subscribe()
    def main():
        if os.path.exists(marker):  # The main thread wedges for good ...
            open(marker + '.wedged', 'w').close()
            time.sleep(60)
            os._exit(1)  # ... or a minute, should the test not kill it.
    bus.subscribe('main', main)
    bus.start()
    bus.block()
"""


def test_systemdnotifier_wedged_main_thread_stops_the_pings(
    child, tmp_path, notify_socket
):
    marker = tmp_path / 'wedge'
    proc = child(
        WEDGED_CHILD,
        str(marker),
        env={
            'NOTIFY_SOCKET': notify_socket.address,
            'WATCHDOG_USEC': '100000',
        },
    )
    got = []
    while got.count('WATCHDOG=1') < 2:
        got += datagrams(notify_socket, 1)
    marker.touch()
    wait_until((tmp_path / 'wedge.wedged').exists, 'the main thread')
    time.sleep(0.2)  # Pings already sent are not the point: drain them.
    pending_datagrams(notify_socket)
    time.sleep(1)  # Ten ping intervals.
    assert pending_datagrams(notify_socket) == []
    assert proc.poll() is None
    proc.kill()
    proc.wait(TIMEOUT)


RESTART_NOTIFY_CHILD = """
    import sys, wspbus_plugins as wp
    with open(sys.argv[1], 'a') as f:
        f.write('run\\n')
    with open(sys.argv[1]) as f:
        first = len(f.readlines()) == 1
    bus = wp.Bus()
    notifier = wp.SystemdNotifier(bus)
    notifier.subscribe()
    bus.subscribe('stop', lambda: notifier.notify('X-LISTENER=stop'),
                  priority=1)
    bus.subscribe('started', bus.restart if first else bus.exit)
    bus.start()
    bus.block()
"""


def test_systemdnotifier_restart_is_a_reload_to_systemd(
    child, tmp_path, notify_socket
):
    proc = child(
        RESTART_NOTIFY_CHILD,
        str(tmp_path / 'runs'),
        env={'NOTIFY_SOCKET': notify_socket.address},
    )
    got = datagrams(notify_socket, 6)
    status, out, err = finish(proc)
    assert status == 0, err
    # systemd stays in "reloading" until the new image's READY=1; a
    # STOPPING=1 would make it kill the re-executed process.
    assert [g.split('\n')[0] for g in got] == [
        'READY=1',
        'RELOADING=1',
        'X-LISTENER=stop',
        'READY=1',
        'STOPPING=1',
        'X-LISTENER=stop',
    ]
    assert re.fullmatch(
        r'RELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=restarting', got[1]
    )
    assert 'MAINPID=%d' % proc.pid in got[3]


def test_systemdnotifier_failed_start_sends_no_ready(child, notify_socket):
    proc = child(
        SYSTEMD_CHILD, 'fail', env={'NOTIFY_SOCKET': notify_socket.address}
    )
    got = datagrams(notify_socket, 1)
    status, out, err = finish(proc)
    assert status == 70
    assert got == ['STOPPING=1\nSTATUS=stopping']


@needs_fork
def test_systemdnotifier_reports_the_daemon_pid(
    child, tmp_path, notify_socket
):
    code = textwrap.dedent(DAEMON_CHILD).replace(
        'bus.start()', 'wp.SystemdNotifier(bus).subscribe()\nbus.start()'
    )
    status, out, err, pidfile, starts, log = start_daemon(
        child, tmp_path, code, env={'NOTIFY_SOCKET': notify_socket.address}
    )
    assert status == 0, err
    [ready] = datagrams(notify_socket, 1)
    assert 'MAINPID=%d' % read_pid(pidfile) in ready
    os.kill(read_pid(pidfile), signal.SIGTERM)


def test_systemdnotifier_without_socket_is_a_silent_noop(bus, monkeypatch):
    monkeypatch.delenv('NOTIFY_SOCKET', raising=False)
    notifier = wp.SystemdNotifier(bus)
    notifier.subscribe()
    assert all(not bus.listeners[c] for c in ('start', 'stop', 'graceful'))
    assert 'started' not in bus.listeners
    notifier.notify('READY=1')  # Called directly: nothing happens.
    assert bus.recorder.logs == []


def test_systemdnotifier_failed_send_is_logged(bus, monkeypatch, tmp_path):
    monkeypatch.setenv('NOTIFY_SOCKET', str(tmp_path / 'nobody-listens'))
    wp.SystemdNotifier(bus).subscribe()
    bus.start()
    assert bus.state is wp.states.STARTED
    [warning] = bus.recorder.messages(30)
    assert warning.startswith(
        'Could not notify systemd at %r' % str(tmp_path / 'nobody-listens')
    )


# -- LoggingBridge ------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_loggingbridge_forwards_levels_and_tracebacks(bus):
    logger = logging.getLogger('wspbus.test.%d' % id(bus))
    logger.setLevel(logging.DEBUG)
    handler = ListHandler()
    logger.addHandler(handler)
    wp.LoggingBridge(bus, logger).subscribe()
    bus.log('detail', level=10)
    bus.log('plain')
    bus.log('careful', level=30)
    try:
        raise ValueError('bad thing')
    except ValueError:
        bus.log('failed', level=40, traceback=True)
    got = [(r.levelno, r.getMessage().split('\n')[0]) for r in handler.records]
    assert got == [
        (10, 'detail'),
        (20, 'plain'),
        (30, 'careful'),
        (40, 'failed'),
    ]
    assert 'ValueError: bad thing' in handler.records[-1].getMessage()


def test_loggingbridge_default_logger_is_wspbus(bus):
    assert wp.LoggingBridge(bus).logger is logging.getLogger('wspbus')


def test_loggingbridge_broken_handler_does_not_break_the_bus(bus):
    class Broken:
        name = 'broken'

        def log(self, level, msg):
            raise RuntimeError('handler down')

    bridge = wp.LoggingBridge(bus, Broken())
    assert bridge.log('called directly, not through the bus', 20) is None
    bridge.subscribe()
    bus.start()
    assert bus.state is wp.states.STARTED
    assert not [m for m in bus.recorder.messages() if 'Error in' in m]


# -- Demo ---------------------------------------------------------------------


def demo(*args, **kwargs):
    return subprocess.run(
        [sys.executable, '-m', 'wspbus_plugins', *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=kwargs.get('cwd', HERE),
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=HERE),
    )


def test_demo_duration_logs_every_transition():
    proc = demo('--duration', '0.5', '--heartbeat', '0.1')
    assert proc.returncode == 0, proc.stderr
    for text in (
        'demo, PID',
        'Bus STARTING',
        "Started monitor thread 'heartbeat'.",
        'Bus STARTED',
        'Heartbeat from PID',
        'Bus STOPPING',
        'Bus STOPPED',
        'Bus EXITING',
        'Bus EXITED',
    ):
        assert text in proc.stderr
    assert re.search(
        r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO +Bus STARTED$',
        proc.stderr,
        re.M,
    )


def test_demo_quiet_and_version():
    assert demo('--duration', '0', '--quiet').stderr == ''
    assert (
        demo('--version').stdout
        == 'python -m wspbus_plugins %s\n' % wp.__version__
    )
    assert '--daemonize' in demo('--help').stdout


@pytest.mark.parametrize(
    'args, message',
    [
        (['--bogus'], 'unrecognized arguments: --bogus'),
        (['--umask', '099'], "invalid umask: '099'"),
        (['--duration', '-1'], "invalid number of seconds: '-1'"),
        (['--heartbeat', 'often'], "invalid number of seconds: 'often'"),
        (
            ['--heartbeat', '99999999999999999999'],
            "invalid number of seconds: '99999999999999999999'",
        ),
        (['--duration', 'inf'], "invalid number of seconds: 'inf'"),
        (['--duration', 'nan'], "invalid number of seconds: 'nan'"),
        (['--user', 'no-such-user-x'], "No such user: 'no-such-user-x'"),
        (['--group', 'no-such-group-x'], "No such group: 'no-such-group-x'"),
        (['--pidfile', '/no/such/dir/x.pid'], "'/no/such/dir' does not exist"),
        (['--listen', '8080'], "invalid address: '8080' (HOST:PORT"),
        (
            ['--listen', 'localhost:99999'],
            "invalid address: 'localhost:99999'",
        ),
    ],
)
def test_demo_bad_input_is_one_line_and_status_2(args, message):
    proc = demo(*args)
    assert proc.returncode == 2
    assert proc.stderr.count('\n') == 1
    assert proc.stderr.startswith('python -m wspbus_plugins: error: ')
    assert message in proc.stderr


@needs_fork
def test_demo_daemonize_with_pidfile(child, tmp_path):
    pidfile = tmp_path / 'demo.pid'
    log = tmp_path / 'demo.log'
    proc = demo(
        '--daemonize',
        '--pidfile',
        str(pidfile),
        '--log-file',
        str(log),
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    pid = read_pid(pidfile)
    child.track(pid)
    assert pid_alive(pid)
    assert 'Daemonized to PID: %d' % pid in log.read_text()
    held = demo('--pidfile', str(pidfile), '--duration', '1')
    assert held.returncode == 70
    assert 'is held by running process %d' % pid in held.stderr
    last = held.stderr.rstrip().splitlines()[-1]
    assert re.search(
        r"CRITICAL Start failed \(RuntimeError: PID file '.*' is "
        r'held by running process %d; another instance is '
        r'running.\); exiting with status 70.$' % pid,
        last,
    )
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), 'the daemon to stop')
    assert not pidfile.exists()


def test_demo_autoreload_restarts_on_a_watched_change(child, tmp_path):
    watched = tmp_path / 'config.ini'
    watched.write_text('a = 1\n')
    log = tmp_path / 'demo.log'
    proc = subprocess.Popen(
        [
            sys.executable,
            '-m',
            'wspbus_plugins',
            '--autoreload',
            '--watch',
            str(watched),
            '--log-file',
            str(log),
            '--heartbeat',
            '0',
        ],
        cwd=HERE,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child.procs.append(proc)
    wait_until(
        lambda: log.exists() and 'Bus STARTED' in log.read_text(),
        'the demo to start',
    )
    edit(watched)
    wait_until(
        lambda: log.read_text().count('Bus STARTED') == 2,
        'the demo to restart',
    )
    assert 'Restarting because %s changed.' % watched in log.read_text()
    assert 'Re-spawning' in log.read_text()
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc)[0] == 0


def test_demo_listen_serves_through_an_autoreload_restart(child, tmp_path):
    watched = tmp_path / 'config.ini'
    watched.write_text('a = 1\n')
    port = free_port()
    proc = child(
        'import sys, wspbus_plugins; sys.exit(wspbus_plugins.main())',
        '--listen',
        '127.0.0.1:%d' % port,
        '--watch',
        str(watched),
        '--heartbeat',
        '0',
    )
    wait_until(
        lambda: ask(('127.0.0.1', port), timeout=1) != 'refused',
        'the demo to listen',
    )
    reply = 'wspbus_plugins demo, PID %d, start %%d\n' % proc.pid
    with LoadClient(('127.0.0.1', port)) as client:
        wait_until(lambda: client.results, 'a reply')
        edit(watched)
        wait_until(lambda: reply % 2 in client.results, 'the restart')
    assert client.failures() == []
    assert set(client.results) == {reply % 1, reply % 2}
    proc.send_signal(signal.SIGTERM)
    status, out, err = finish(proc)
    assert status == 0, err
    assert "Listening on ('127.0.0.1', %d) (demo), inherited." % port in err


def test_demo_listen_on_an_address_in_use_is_one_line_and_status_2(listener):
    host, port = listener.getsockname()
    proc = demo('--listen', '%s:%d' % (host, port), '--duration', '0')
    assert (proc.returncode, proc.stdout) == (2, '')
    assert proc.stderr == (
        'python -m wspbus_plugins: error: argument --listen: Cannot listen '
        'on %r: Address already in use\n' % ((host, port),)
    )


def test_demo_listen_help_says_when_kill_hup_restarts():
    # SignalHandler's rule: SIGHUP restarts a daemon and ends any other
    # process (a terminal's hang-up); the help promised kill -HUP always.
    text = ' '.join(demo('--help').stdout.split())
    assert (
        'so --autoreload, and kill -HUP with --daemonize, restart it without '
        'refusing a connection (without --daemonize, SIGHUP exits)' in text
    )


@needs_fork
def test_demo_listen_kill_hup_restarts_a_daemon(child, tmp_path):
    port, pidfile = free_port(), tmp_path / 'demo.pid'
    args = ['--listen', '127.0.0.1:%d' % port, '--heartbeat', '0']
    daemon = demo(*args, '--daemonize', '--pidfile', str(pidfile))
    assert daemon.returncode == 0, daemon.stderr
    pid = read_pid(pidfile)
    child.track(pid)
    reply = 'wspbus_plugins demo, PID %d, start %%d\n' % pid
    assert ask(('127.0.0.1', port)) == reply % 1
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: ask(('127.0.0.1', port)) == reply % 2, 'a restart')
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), 'the daemon to exit')


def test_demo_main_is_callable(capsys):
    assert wp.main(['--duration', '0', '--heartbeat', '0', '--quiet']) == 0


# -- README -------------------------------------------------------------------


def readme_text():
    with open(os.path.join(HERE, 'README.md')) as f:
        return f.read()


def readme_examples(container=False):
    """The README's Python blocks; the container recipe's runs as PID 1."""
    blocks = re.findall(r'^```python\n(.*?)^```', readme_text(), re.M | re.S)
    return [code for code in blocks if ("'/tmp/ready'" in code) == container]


@pytest.mark.parametrize(
    'code', readme_examples(), ids=lambda code: code.splitlines()[-1][:40]
)
def test_readme_example_runs(child, tmp_path, code):
    if 'DropPrivileges' in code and not IS_ROOT:
        pytest.skip('needs root')
    (tmp_path / 'settings.ini').write_text('[app]\n')
    # Free ports for the README's fixed ones (one below 1024 stays below):
    # another run of the suite (make test-matrix runs two) may be here too.
    address = r"(?<=\('127\.0\.0\.1', )[1-9]\d*(?=\))"
    ports = {
        port: str(free_port() if int(port) >= 1024 else free_privileged_port())
        for port in re.findall(address, code)
    }
    code = re.sub(address, lambda m: ports[m[0]], code)
    proc = child(code, env={'NOTIFY_SOCKET': ''})
    try:
        status, out, err = proc.wait(1.5), None, None
    except subprocess.TimeoutExpired:  # A service that blocks: stop it.
        os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    pidfile = tmp_path / 'app.pid'
    if pidfile.exists():  # The daemon recipe: a daemon is running.
        pid = read_pid(pidfile)
        child.track(pid)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pid_alive(pid), 'the example daemon')
        assert not pidfile.exists()
    assert status == 0, err
    assert 'Traceback' not in err


# -- Reliability --------------------------------------------------------------
# Short runs in `make test`; `make stress` sets WSPBUS_STRESS=1 and runs the
# tests marked `stress` longer.

STRESS = os.environ.get('WSPBUS_STRESS') == '1'


def scaled(short, long):
    return long if STRESS else short


STORM_CHILD = """
    import os, sys, threading, time, wspbus_plugins as wp
    out = open(sys.argv[1], 'a', buffering=1)
    out.write('run\\n')
    bus = wp.Bus()
    handler = wp.SignalHandler(bus)
    handler.handlers['SIGHUP'] = bus.restart  # Storms go through re-execs.
    handler.subscribe()
    running = []
    def graceful():
        if running:
            out.write('overlap\\n')
        running.append(1)
        time.sleep(0.001)
        running.pop()
        out.write('graceful\\n')
    bus.subscribe('graceful', graceful)
    bus.subscribe('exit', lambda: out.write('exit\\n'))
    bus.subscribe('started', lambda: out.write('ready\\n'))
    bus.start()
    bus.block()
"""


@pytest.mark.stress
@pytest.mark.parametrize('hup_share', [0.0, 0.1])
def test_reliability_signal_storm_exits_exactly_once(
    child, tmp_path, hup_share
):
    for round_ in range(scaled(3, 30)):
        record = tmp_path / ('storm%d' % round_)
        proc = child(STORM_CHILD, str(record))
        wait_until(lambda r=record: 'ready' in lines_of(r), 'the child')
        rng = random.Random(round_)
        storm = [
            signal.SIGHUP if rng.random() < hup_share else signal.SIGUSR1
            for _ in range(200)
        ]
        for sig in storm + [signal.SIGTERM]:
            os.kill(proc.pid, sig)  # It survives every one but the last.
            time.sleep(0.002)
        status, out, err = finish(proc)
        lines = lines_of(record)
        assert (status, err) == (0, '')
        # Per image: exit listeners at most once (an image may act on a
        # held SIGHUP or SIGTERM before it subscribes them), no graceful
        # after them; and the SIGHUPs did re-execute it.
        for image in ' '.join(lines).split('run')[1:]:
            notes = image.split()
            assert notes.count('exit') <= 1 and notes.count('ready') <= 1
            after_exit = (
                notes[notes.index('exit') :] if 'exit' in notes else []
            )
            assert 'graceful' not in after_exit, lines
        assert lines.count('run') >= 1 + (signal.SIGHUP in storm)
        assert 'graceful' in lines and 'overlap' not in lines


@pytest.mark.stress
def test_reliability_concurrent_use_while_cycling_states(bus):
    duration = scaled(2, 20)
    errors, states_seen = [], set()
    stop = threading.Event()
    valid = {
        wp.states.STOPPED,
        wp.states.STARTING,
        wp.states.STARTED,
        wp.states.STOPPING,
    }

    def hammer(seed):
        rng = random.Random(seed)
        mine = []
        try:
            while not stop.is_set():
                action = rng.random()
                if action < 0.4:
                    bus.publish(rng.choice(['x', 'graceful', 'main']))
                elif action < 0.7 or not mine:

                    def func():
                        pass

                    mine.append(func)
                    bus.subscribe(
                        rng.choice(['x', 'stop', 'start']),
                        func,
                        priority=rng.randint(0, 100),
                    )
                else:
                    func = mine.pop()
                    for channel in ('x', 'stop', 'start'):
                        bus.unsubscribe(channel, func)
                states_seen.add(bus.state)
        except Exception as exc:
            errors.append(exc)

    def cycle():
        try:
            while not stop.is_set():
                bus.start()
                bus.graceful()
                bus.stop()
        except Exception as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=hammer, args=(i,), daemon=True)
        for i in range(8)
    ]
    threads.append(threading.Thread(target=cycle, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(duration)
    stop.set()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), 'deadlock'
    assert errors == []
    assert states_seen <= valid and len(states_seen) >= 3


class FakeRestart(Exception):
    pass


@pytest.mark.stress
def test_reliability_randomised_state_machine(fake_exit):
    for seed in range(scaled(1000, 10000)):
        try:
            run_random_sequence(seed)
        except AssertionError as exc:
            raise AssertionError('seed %d: %s' % (seed, exc)) from None


def run_random_sequence(seed):
    rng = random.Random(seed)
    bus = wp.Bus()
    calls = []  # (channel, priority, order) per call
    subscribed = []
    order = iter(range(10**9))
    exits_this_life = {}  # exit listener -> runs this life
    valid = {
        wp.states.STOPPED,
        wp.states.STARTING,
        wp.states.STARTED,
        wp.states.STOPPING,
        wp.states.EXITING,
    }

    def make_listener(channel, priority, fails):
        def listener():
            calls.append((channel, priority, seq))
            if channel == 'exit':
                exits_this_life[seq] = exits_this_life.get(seq, 0) + 1
            if fails:
                raise ValueError('planned failure')

        seq = next(order)
        return listener

    try:
        for _ in range(rng.randint(5, 30)):
            op = rng.choice(
                [
                    'start',
                    'stop',
                    'graceful',
                    'exit',
                    'restart',
                    'subscribe',
                    'subscribe',
                    'unsubscribe',
                ]
            )
            del calls[:]
            if op == 'subscribe':
                channel = rng.choice(['start', 'stop', 'exit', 'graceful'])
                priority = rng.choice([10, 50, 50, 90])
                fails = rng.random() < 0.05
                func = make_listener(channel, priority, fails)
                bus.subscribe(channel, func, priority=priority)
                subscribed.append((channel, func))
                continue
            if op == 'unsubscribe':
                if subscribed:
                    bus.unsubscribe(
                        *subscribed.pop(rng.randrange(len(subscribed)))
                    )
                continue
            if op == 'start':  # Every start() begins a new life.
                exits_this_life.clear()
            try:
                getattr(bus, op)()
            except wp.ChannelFailures:
                pass  # graceful/stop listeners that fail are reported.
            assert bus.state in valid
            for channel in ('start', 'stop', 'exit', 'graceful'):
                ran = [(p, s) for c, p, s in calls if c == channel]
                assert ran == sorted(ran), 'out of order on %s' % channel
            assert max(exits_this_life.values(), default=0) <= 1, (
                'an exit listener ran twice'
            )
    except HardExit:
        pass  # The process would end here (status 70): the sequence ends.
    finally:
        atexit.unregister(bus._clean_exit)


@pytest.mark.parametrize(
    'what', ['SystemExit', 'KeyboardInterrupt', 'ValueError']
)
def test_reliability_start_listener_raising_leaves_nothing(
    child, tmp_path, what
):
    pidfile = tmp_path / 'app.pid'
    proc = child(
        """
        import sys, wspbus_plugins as wp
        bus = wp.Bus()
        bus.subscribe('log', lambda msg, level: level >= 40 and
                      print(msg.splitlines()[0], file=sys.stderr))
        wp.PIDFile(bus, sys.argv[1]).subscribe()
        def broken():
            raise %s('planned')
        bus.subscribe('start', broken, priority=80)  # After the PID file.
        bus.start()
        bus.block()
    """
        % what,
        str(pidfile),
    )
    status, out, err = finish(proc)
    assert status == 70
    assert 'Start failed (%s: planned); exiting with status 70.' % what in err
    assert not pidfile.exists()


def test_reliability_stop_listener_failing_during_signal_exit(child, tmp_path):
    ready = tmp_path / 'ready'
    proc = child(
        """
        import sys, wspbus_plugins as wp
        bus = wp.Bus()
        bus.subscribe('log', lambda msg, level: level >= 40 and
                      print(msg.splitlines()[0], file=sys.stderr))
        wp.SignalHandler(bus).subscribe()
        wp.PIDFile(bus, sys.argv[1] + '.pid').subscribe()
        def broken():
            raise OSError('disk gone')
        bus.subscribe('stop', broken)
        bus.subscribe('started', lambda: open(sys.argv[1], 'w').close())
        bus.start()
        bus.block()
    """,
        str(ready),
    )
    wait_until(ready.exists, 'the child')
    os.kill(proc.pid, signal.SIGTERM)
    status, out, err = finish(proc)
    assert status == 70
    assert "Error in 'stop' listener" in err
    assert 'Exiting with status 70: the stop or exit listeners failed' in err


def test_reliability_failing_log_listener_does_not_stop_the_service(child):
    proc = child("""
        import wspbus_plugins as wp
        bus = wp.Bus()
        def broken(msg, level):
            raise RuntimeError('log sink down')
        bus.subscribe('log', broken)
        bus.start()
        bus.graceful()
        bus.exit()
        print('done')
    """)
    status, out, err = finish(proc)
    assert (status, out) == (0, 'done\n')
    assert "a log listener failed (RuntimeError('log sink down'))" in err


@needs_fork
def test_reliability_kill_9_of_a_daemon_then_restart(child, tmp_path):
    status, _, err, pidfile, starts, log = start_daemon(child, tmp_path)
    assert status == 0, err
    first = read_pid(pidfile)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not pid_alive(first), 'the daemon to die')
    assert read_pid(pidfile) == first  # Stale, left behind.
    status, _, err, pidfile, starts, log = start_daemon(child, tmp_path)
    assert status == 0, err
    second = read_pid(pidfile)
    assert second != first and pid_alive(second)
    assert 'Replacing stale PID file' in log.read_text()
    os.kill(second, signal.SIGTERM)
    wait_until(lambda: not pid_alive(second), 'the daemon to exit')


@pytest.mark.stress
def test_reliability_restarts_leak_no_descriptors(child, tmp_path):
    record = tmp_path / 'fds'
    restarts = scaled(20, 100)
    proc = child(
        """
        import os, sys, wspbus_plugins as wp
        bus = wp.Bus()
        wp.PIDFile(bus, sys.argv[1] + '.pid').subscribe()
        reloader = wp.Autoreloader(bus, frequency=60)
        reloader.subscribe()
        bus.start()
        with open(sys.argv[1], 'a') as f:
            f.write('%d\\n' % len(os.listdir('/proc/self/fd')))
        with open(sys.argv[1]) as f:
            runs = len(f.readlines())
        if runs < int(sys.argv[2]):
            bus.restart()
        else:
            bus.exit()
        bus.block()
    """,
        str(record),
        str(restarts),
    )
    status, out, err = finish(proc)
    assert status == 0, err
    counts = lines_of(record)
    assert len(counts) == restarts
    assert len(set(counts)) == 1, counts


@pytest.mark.stress
def test_reliability_memory_stays_flat(bus):
    tracemalloc = pytest.importorskip('tracemalloc')  # Not on PyPy.
    funcs = [(lambda: None) for _ in range(10)]
    for func in funcs:
        bus.subscribe('x', func)

    def churn(publishes, cycles):
        for _ in range(publishes):
            bus.publish('x')
        for _ in range(cycles):

            def func():
                pass

            bus.subscribe('y', func)
            bus.unsubscribe('y', func)

    churn(1000, 100)  # Warm the caches.
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        churn(scaled(100000, 1000000), scaled(10000, 100000))
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(
        stat.size_diff
        for stat in after.compare_to(before, 'filename')
        if stat.traceback[0].filename == wp.__file__
    )
    assert growth < 4096


def test_reliability_plugin_threads_are_gone_after_exit(
    bus, tmp_path, monkeypatch
):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / 'notify'))
    monkeypatch.setenv('NOTIFY_SOCKET', str(tmp_path / 'notify'))
    monkeypatch.setenv('WATCHDOG_USEC', '1000000')
    before = set(threading.enumerate())
    try:
        wp.Monitor(bus, lambda: None, frequency=60).subscribe()
        wp.Autoreloader(bus, frequency=60).subscribe()
        wp.SystemdNotifier(bus).subscribe()
        bus.start()
        # Monitor and Autoreloader; the watchdog pings from block().
        assert len(set(threading.enumerate()) - before) == 2
        bus.exit()
        wait_until(
            lambda: set(threading.enumerate()) <= before,
            'plugin threads to end',
        )
    finally:
        sock.close()


def test_reliability_pidfile_in_a_world_writable_directory(bus, tmp_path):
    shared = tmp_path / 'shared'
    shared.mkdir()
    shared.chmod(0o1777)
    path = shared / 'app.pid'
    (shared / 'elsewhere').write_text('victim\n')
    path.symlink_to(shared / 'elsewhere')  # Planted by another user.
    with pytest.raises(RuntimeError, match='symbolic link'):
        wp.PIDFile(bus, str(path)).start()
    assert (shared / 'elsewhere').read_text() == 'victim\n'
    path.unlink()
    plugin = wp.PIDFile(bus, str(path))
    plugin.start()
    assert read_pid(path) == os.getpid()
    plugin.exit()


# -- systemd (real) -----------------------------------------------------------
# `make test-systemd` runs these (`pytest -m systemd`; plain `make test`
# deselects them, see setup.cfg). They build a Debian bookworm root with
# systemd once (cached under SYSTEMD_CACHE, built in a temporary directory
# and renamed when complete), boot it with systemd-nspawn for each scenario
# on a throwaway overlay (--volatile=overlay: the cached root is never
# written), and let a driver unit inside start, reload and stop real units
# with systemctl. The driver records `systemctl show` properties in
# /results/steps.json, bind-mounted from the host, and powers the machine
# off; the tests below assert on those records, one check per test.
#
# The units and programs are the README's recipes, extracted from README.md
# (so they cannot drift), with the few substitutions named in
# SYSTEMD_SCENARIOS. A drop-in (app.service.d/test.conf) only bounds the
# timeouts, or shortens WatchdogSec, so that a failure is quick.

systemd = pytest.mark.systemd
SYSTEMD_CACHE = os.environ.get(
    'WSPBUS_SYSTEMD_CACHE', '/var/cache/wspbus_plugins'
)
SYSTEMD_MIRROR = 'http://deb.debian.org/debian'
DEBOOTSTRAP = [
    'debootstrap',
    '--variant=minbase',
    '--include=systemd,systemd-sysv,dbus,python3,procps',
    'bookworm',
]
BOOT_TIMEOUT = 120  # Seconds for one boot, scenario and poweroff.


def _mounts_under(path):
    with open('/proc/self/mountinfo') as f:
        points = [line.split()[4] for line in f]
    return sorted(
        (p for p in points if p.startswith(path + '/')), reverse=True
    )


def _remove_tree(path):
    """Remove a root left by an interrupted build, mounts (/proc) first."""
    for point in _mounts_under(path):
        subprocess.run(['umount', '-l', point], timeout=TIMEOUT)
    subprocess.run(['rm', '-rf', '--one-file-system', path], timeout=300)


def _mirror_unreachable():
    import urllib.request

    url = SYSTEMD_MIRROR + '/dists/bookworm/Release'
    try:
        urllib.request.urlopen(url, timeout=20).close()
    except OSError as exc:
        return '%s: %s' % (url, exc)
    return None


def build_systemd_root():
    """Return the cached root's path, building it first if needed."""
    import hashlib

    stamp = hashlib.sha256(' '.join(DEBOOTSTRAP).encode()).hexdigest()[:12]
    root = os.path.join(SYSTEMD_CACHE, 'bookworm-' + stamp)
    if os.path.exists(os.path.join(root, 'usr/bin/python3')):
        return root
    unreachable = _mirror_unreachable()
    if unreachable:
        pytest.skip(
            'cannot build the systemd root: no mirror (%s)' % unreachable
        )
    os.makedirs(SYSTEMD_CACHE, exist_ok=True)
    for name in os.listdir(SYSTEMD_CACHE):  # Interrupted builds.
        if name.startswith('.building-'):
            _remove_tree(os.path.join(SYSTEMD_CACHE, name))
    building = os.path.join(SYSTEMD_CACHE, '.building-%d' % os.getpid())
    log = building + '.log'
    with open(log, 'w') as out:
        proc = subprocess.Popen(
            DEBOOTSTRAP + [building, SYSTEMD_MIRROR],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            status = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if status != 0:
        _remove_tree(building)
        with open(log) as f:
            tail = f.read()[-3000:]
        pytest.fail('debootstrap failed (%d):\n%s' % (status, tail))
    os.rename(building, root)
    os.unlink(log)
    return root


@pytest.fixture(scope='session')
def systemd_root():
    if not (sys.platform.startswith('linux') and IS_ROOT):
        pytest.skip('cannot build the systemd root: needs Linux and root')
    import shutil

    missing = [
        t for t in ('debootstrap', 'systemd-nspawn') if not shutil.which(t)
    ]
    if missing:
        pytest.skip(
            'cannot build the systemd root: %s not installed '
            '(make test-systemd installs them)' % ' and '.join(missing)
        )
    return build_systemd_root()


def readme_block(heading, language, index=0):
    """Return the ```language block number `index` under `### heading`."""
    with open(os.path.join(HERE, 'README.md')) as f:
        text = f.read()
    section = text.split('\n### %s\n' % heading, 1)[1]
    section = re.split(r'^##+ ', section, maxsplit=1, flags=re.M)[0]
    pattern = r'^```%s\n(.*?)^```' % language
    return re.findall(pattern, section, re.M | re.S)[index]


def substitute(text, old, new):
    """Replace `old`, which must occur exactly once, by `new`."""
    assert text.count(old) == 1, 'README changed: %r not found once' % old
    return text.replace(old, new)


def before_start(program, lines):
    """Insert test-only `lines` just before the program's bus.start()."""
    return substitute(program, 'bus.start()', lines + 'bus.start()')


FORKING_UNIT = ('systemd, `Type=forking`', 'ini')
SOCKET_UNIT = ('systemd socket activation', 'ini', 0)
SOCKET_SERVICE_UNIT = ('systemd socket activation', 'ini', 1)
ZERO_DOWNTIME_APP = (
    'Restarts that refuse no connection (`kill -HUP`, autoreload)',
    'python',
)
NOTIFY_UNIT = ('systemd, `Type=notify` with a watchdog', 'ini')
NOTIFY_APP = ('systemd, `Type=notify` with a watchdog', 'python')
DAEMON_APP = ('A daemon with a PID file', 'python')


def forking_app():
    # README: "with app.py as in the daemon recipe, using /run/app.pid".
    program = readme_block(*DAEMON_APP)
    return substitute(program, "'app.pid'", "'/run/app.pid'")


def socket_activated_app():
    # README: "app.py the program above plus SystemdNotifier".
    return before_start(
        readme_block(*ZERO_DOWNTIME_APP),
        'wspbus.SystemdNotifier(bus).subscribe()\n',
    )


def notify_app():
    # The recipe's own comment: "A real service calls bus.block() here."
    program = readme_block(*NOTIFY_APP)
    return substitute(
        program,
        'bus.exit()  # A real service calls bus.block() here.',
        'bus.block()',
    )


# Test-only lines, inserted before bus.start() in the variants below.
COUNT_STARTS = """\
import time  # Test hook: count starts, and make the start slow.
with open('/run/app.starts', 'a') as starts:
    starts.write('start\\n')
bus.subscribe('start', lambda: time.sleep(1), priority=80)
bus.subscribe('start', lambda: open('/run/app.slow-done', 'w').close(),
              priority=81)
"""
FAIL_START = """\
def broken():  # Test hook: a start listener that fails.
    raise RuntimeError('the database is down')


bus.subscribe('start', broken)
"""
WEDGE_ON_SIGUSR2 = """\
import signal, time  # Test hook: SIGUSR2 wedges the main thread.
signal.signal(signal.SIGUSR2, lambda *args: time.sleep(3600))
"""

# What CherryPy 18 does to a daemon on SIGHUP, in a few lines and without
# CherryPy: Daemonizer forks twice and PIDFile writes the file; SIGHUP
# (handle_SIGHUP, daemonized) calls bus.restart(): the exit listeners remove
# the PID file and the process re-executes itself, so the new image
# daemonizes again and the PID it had (systemd's MainPID) exits.
CHERRYPY_STANDIN = """\
import os, signal, sys

PIDFILE = '/run/app.pid'


def daemonize():
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)


def restart(*args):
    os.remove(PIDFILE)
    os.execv(sys.executable, [sys.executable] + sys.argv)


def stop(*args):
    os.remove(PIDFILE)
    sys.exit(0)


daemonize()
with open(PIDFILE, 'w') as f:
    f.write('%d\\n' % os.getpid())
signal.signal(signal.SIGHUP, restart)
signal.signal(signal.SIGTERM, stop)
while True:
    signal.pause()
"""

# The driver's steps for each scenario: `start()` etc. are in SYSTEMD_DRIVER.
FORKING_STEPS = """
start()
main = show()['MainPID']
record('reload', systemctl=systemctl('reload'), states=watch(2),
       pidfile=pidfile())
record('stop', systemctl=systemctl('stop'), show=show(), pidfile=pidfile(),
       main_alive=alive(main))
"""
NOTIFY_STEPS = """
start()
record('reload', systemctl=systemctl('reload'), states=watch(1.5))
record('sighup', systemctl=systemctl('kill', '-s', 'HUP', '--kill-who=main'),
       states=watch(1.5))
main = show()['MainPID']
record('stop', systemctl=systemctl('stop'), show=show(),
       main_alive=alive(main))
"""
FAIL_STEPS = """
start()
record('settled', states=watch(3), pidfile=pidfile())
"""
WATCHDOG_STEPS = """
start()
record('healthy', states=watch(3.5))
record('wedged', systemctl=systemctl('kill', '-s', 'USR2', '--kill-who=main'),
       states=watch(10, until=lambda p: p['NRestarts'] != '0'
                                     and p['MainPID'] != '0'))
"""
SOCKET_STEPS = """
import socket, threading


def ask():
    try:
        with socket.create_connection(('127.0.0.1', 8080), timeout=10) as c:
            return c.makefile('rb').readline().decode()
    except OSError as exc:
        return type(exc).__name__


record('listening', systemctl=subprocess.run(
    ['systemctl', 'start', 'app.socket'], timeout=30).returncode,
    show=show())
record('activated', reply=ask(), show=show())
replies, done = [], threading.Event()


def client():
    while not done.is_set():
        replies.append(ask())


clients = [threading.Thread(target=client) for _ in range(4)]
for thread in clients:
    thread.start()
reloads = []
for _ in range(3):
    reloads.append(systemctl('reload'))
    time.sleep(1)
done.set()
for thread in clients:
    thread.join()
record('reloads', reloads=reloads, states=watch(0.5), replies=len(replies),
       failures=[r for r in replies if r != 'hello\\n'])
main = show()['MainPID']
record('stop', systemctl=systemctl('stop'), show=show(),
       main_alive=alive(main))
"""
RESTART_STEPS = """
start()
record('restart', systemctl=systemctl('kill', '-s', 'HUP', '--kill-who=main'),
       states=watch(4), starts=starts())
"""

TEST_TIMEOUTS = '[Service]\nTimeoutStartSec=20s\nTimeoutStopSec=20s\n'

# name: (unit, drop-in, /srv/app/app.py, driver steps). Every program is the
# README's, with these substitutions: the daemon's PID file is /run/app.pid
# (as the forking recipe says), the notify program calls bus.block() where
# its comment says a real service does, and the variants insert the test
# hooks above before bus.start() (restart: SIGHUP -> bus.restart, as the
# README's SignalHandler entry suggests).
SYSTEMD_SCENARIOS = {
    'forking': (FORKING_UNIT, TEST_TIMEOUTS, forking_app, FORKING_STEPS),
    'forking-counted': (
        FORKING_UNIT,
        TEST_TIMEOUTS,
        lambda: before_start(forking_app(), COUNT_STARTS),
        FORKING_STEPS + 'record("counted", starts=starts())\n',
    ),
    'forking-fail': (
        FORKING_UNIT,
        TEST_TIMEOUTS,
        lambda: before_start(forking_app(), FAIL_START),
        FAIL_STEPS,
    ),
    'notify': (NOTIFY_UNIT, TEST_TIMEOUTS, notify_app, NOTIFY_STEPS),
    'notify-fail': (
        NOTIFY_UNIT,
        TEST_TIMEOUTS,
        lambda: before_start(notify_app(), FAIL_START),
        FAIL_STEPS,
    ),
    'notify-watchdog': (
        NOTIFY_UNIT,
        TEST_TIMEOUTS + 'WatchdogSec=1s\n',
        lambda: before_start(notify_app(), WEDGE_ON_SIGUSR2),
        WATCHDOG_STEPS,
    ),
    'notify-restart': (
        NOTIFY_UNIT,
        '[Service]\nTimeoutStartSec=20s\nTimeoutStopSec=2s\n',
        lambda: before_start(
            substitute(
                notify_app(),
                "handlers['SIGHUP'] = bus.graceful",
                "handlers['SIGHUP'] = bus.restart",
            ),
            COUNT_STARTS,
        ),
        RESTART_STEPS,
    ),
    'cherrypy-standin': (
        FORKING_UNIT,
        TEST_TIMEOUTS,
        lambda: CHERRYPY_STANDIN,
        FORKING_STEPS,
    ),
    'socket-activation': (
        SOCKET_SERVICE_UNIT,
        TEST_TIMEOUTS,
        socket_activated_app,
        SOCKET_STEPS,
    ),
}
# Units beside app.service, by scenario.
SYSTEMD_EXTRA_UNITS = {'socket-activation': {'app.socket': SOCKET_UNIT}}

DRIVER_UNIT = """\
[Unit]
Description=wspbus_plugins test driver
After=basic.target

[Service]
Type=exec
ExecStart=/usr/bin/python3 /srv/driver.py
StandardOutput=journal+console
StandardError=journal+console
"""

# Runs inside the machine (its python3), as root, under systemd.
SYSTEMD_DRIVER = """\
import json, os, subprocess, time, traceback

PROPERTIES = ('ActiveState', 'SubState', 'MainPID', 'Result', 'ExecMainCode',
              'ExecMainStatus', 'NRestarts', 'StatusText')
steps = {}


def record(name, **values):
    steps[name] = values
    with open('/results/steps.tmp', 'w') as f:
        json.dump(steps, f, indent=1)
    os.replace('/results/steps.tmp', '/results/steps.json')
    print('driver: %s %s' % (name, json.dumps(values)), flush=True)


def systemctl(*args, timeout=60):
    begun = time.monotonic()
    proc = subprocess.run(('systemctl',) + args + ('app.service',),
                          capture_output=True, text=True, timeout=timeout)
    return {'status': proc.returncode,
            'seconds': round(time.monotonic() - begun, 3),
            'output': (proc.stdout + proc.stderr).strip()}


def show():
    out = subprocess.run(
        ['systemctl', 'show', '-p', ','.join(PROPERTIES), 'app.service'],
        capture_output=True, text=True, timeout=30).stdout
    return dict(line.split('=', 1) for line in out.splitlines())


def watch(seconds, until=None):
    # Samples show() every 50 ms; returns the distinct states in order.
    states, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        props = show()
        if not states or states[-1] != props:
            states.append(props)
        if until and until(props):
            break
        time.sleep(0.05)
    return states


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def pidfile():
    return read('/run/app.pid')


def starts():
    return (read('/run/app.starts') or '').count('start')


def alive(pid):
    return os.path.exists('/proc/%s' % pid)


def start():
    record('start', systemctl=systemctl('start'), show=show(),
           pidfile=pidfile(), slow_done=os.path.exists('/run/app.slow-done'))


try:
    with open('/srv/steps.py') as f:
        exec(f.read())
except Exception:
    record('driver error', traceback=traceback.format_exc())
finally:
    record('journal', text=subprocess.run(
        ['journalctl', '-b', '-u', 'app.service', '-o', 'short-monotonic',
         '--no-pager'], capture_output=True, text=True, timeout=30).stdout)
    subprocess.run(['systemctl', 'poweroff', '--no-block'], timeout=30)
"""


class SystemdRun:
    """What one boot recorded: `steps` (name -> values) and the console."""

    def __init__(self, name, steps, console):
        self.name = name
        self.steps = steps
        self.console = console

    def __getitem__(self, step):
        assert step in self.steps, 'step %r did not run\n%r' % (step, self)
        return self.steps[step]

    def journal(self):
        return self.steps.get('journal', {}).get('text', '')

    def __repr__(self):
        steps = {k: v for k, v in self.steps.items() if k != 'journal'}
        return 'scenario %r:\n%s\njournal:\n%s\nconsole tail:\n%s' % (
            self.name,
            json.dumps(steps, indent=1),
            self.journal(),
            self.console[-3000:],
        )


def _stop_machine(proc):
    """End an nspawn that overran: power off, then kill its whole machine."""
    proc.send_signal(signal.SIGTERM)  # nspawn asks the machine to power off.
    try:
        proc.wait(5)
        return
    except subprocess.TimeoutExpired:
        pass
    # Killing nspawn alone leaves the machine running: kill its init (the
    # machine's PID 1), which takes every process of the machine with it.
    for entry in os.listdir('/proc'):
        try:
            with open('/proc/%s/stat' % entry) as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == proc.pid:
            os.kill(int(entry), signal.SIGKILL)
    proc.kill()
    proc.wait()


def boot_scenario(root, name, workdir):
    """Boot `root` once to run scenario `name`; return a SystemdRun."""
    unit, dropin, program, steps = SYSTEMD_SCENARIOS[name]
    units, srv, results = (workdir / d for d in ('units', 'srv', 'results'))
    (units / 'app.service.d').mkdir(parents=True)
    (srv / 'app').mkdir(parents=True)
    results.mkdir()
    (units / 'app.service').write_text(readme_block(*unit))
    (units / 'app.service.d' / 'test.conf').write_text(dropin)
    (units / 'wspbus-driver.service').write_text(DRIVER_UNIT)
    for filename, block in SYSTEMD_EXTRA_UNITS.get(name, {}).items():
        (units / filename).write_text(readme_block(*block))
    (srv / 'app' / 'app.py').write_text(program())
    with open(wp.__file__) as f:
        (srv / 'app' / 'wspbus_plugins.py').write_text(f.read())
    (srv / 'driver.py').write_text(SYSTEMD_DRIVER)
    (srv / 'steps.py').write_text(steps)
    command = [
        'systemd-nspawn', '-q', '-D', root, '-b', '--register=no',
        '--keep-unit', '--volatile=overlay', '--private-network',
        '--bind-ro=%s:/usr/local/lib/systemd/system' % units,
        '--bind-ro=%s:/srv' % srv,
        '--bind=%s:/results' % results,
        'systemd.wants=wspbus-driver.service',
    ]  # fmt: skip
    console = workdir / 'console.log'
    with open(console, 'wb') as out:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        proc.wait(BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        with open(console, 'a') as out:
            out.write('\n(boot timed out after %d s)\n' % BOOT_TIMEOUT)
    finally:
        if proc.poll() is None:
            _stop_machine(proc)
    try:
        with open(results / 'steps.json') as f:
            recorded = json.load(f)
    except FileNotFoundError:
        recorded = {}
    run = SystemdRun(name, recorded, console.read_text(errors='replace'))
    assert 'driver error' not in recorded, run
    assert proc.returncode == 0 and 'journal' in recorded, run
    return run


@pytest.fixture(scope='session')
def systemd_run(systemd_root, tmp_path_factory):
    """systemd_run(name): the SystemdRun of scenario `name`, booted once."""
    runs = {}

    def run(name):
        if name not in runs:
            workdir = tmp_path_factory.mktemp('systemd-' + name)
            runs[name] = boot_scenario(systemd_root, name, workdir)
        return runs[name]

    return run


def states_of(states, prop):
    return [s[prop] for s in states]


@systemd
def test_systemd_forking_start_returns_when_the_daemon_runs(systemd_run):
    run = systemd_run('forking')
    start = run['start']
    assert start['systemctl']['status'] == 0, run
    assert start['show']['ActiveState'] == 'active', run
    assert start['show']['SubState'] == 'running', run
    assert start['pidfile'] == '%s\n' % start['show']['MainPID'], run


@systemd
def test_systemd_forking_start_waits_for_every_start_listener(systemd_run):
    run = systemd_run('forking-counted')
    start = run['start']
    assert start['systemctl']['status'] == 0, run
    assert start['systemctl']['seconds'] >= 1, run  # The slow listener.
    assert start['slow_done'], run
    assert start['pidfile'] == '%s\n' % start['show']['MainPID'], run


@systemd
@pytest.mark.parametrize('name', ['forking', 'forking-counted'])
def test_systemd_forking_reload_keeps_the_unit_and_its_main_pid(
    systemd_run, name
):
    run = systemd_run(name)
    main = run['start']['show']['MainPID']
    reload = run['reload']
    assert reload['systemctl']['status'] == 0, run
    assert set(states_of(reload['states'], 'ActiveState')) <= {
        'active',
        'reloading',
    }, run
    assert reload['states'][-1]['ActiveState'] == 'active', run
    assert set(states_of(reload['states'], 'MainPID')) == {main}, run
    assert reload['pidfile'] == '%s\n' % main, run
    if name == 'forking-counted':  # Re-executed in place, not just alive.
        assert run['counted']['starts'] == 2, run


@systemd
def test_systemd_forking_stop_is_clean_and_fast(systemd_run):
    run = systemd_run('forking')
    stop = run['stop']
    assert stop['systemctl']['status'] == 0, run
    assert stop['systemctl']['seconds'] < 2, run
    assert stop['show']['ActiveState'] == 'inactive', run
    assert stop['show']['Result'] == 'success', run
    assert stop['pidfile'] is None, run
    assert not stop['main_alive'], run


@systemd
@pytest.mark.parametrize(
    'name, exited',
    [
        ('forking-fail', 'Control process exited, code=exited, status=1/'),
        ('notify-fail', 'Main process exited, code=exited, status=70/'),
    ],
    ids=['forking', 'notify'],
)
def test_systemd_failing_start_fails_systemctl_start_at_once(
    systemd_run, name, exited
):
    run = systemd_run(name)
    start = run['start']
    assert start['systemctl']['status'] != 0, run
    assert start['systemctl']['seconds'] < 5, run  # TimeoutStartSec=20s
    assert start['show']['Result'] == 'exit-code', run
    assert start['pidfile'] is None, run
    assert exited in run.journal(), run
    if name == 'forking-fail':  # The launcher prints the daemon's error.
        assert 'the database is down' in run.journal(), run
    # Restart=on-failure tries again until systemd's start limit (5).
    settled = run['settled']
    assert 'active' not in states_of(settled['states'], 'ActiveState'), run
    assert settled['states'][-1]['ActiveState'] == 'failed', run
    assert settled['states'][-1]['NRestarts'] == '5', run
    assert settled['pidfile'] is None, run


@systemd
def test_systemd_notify_start_reports_ready(systemd_run):
    run = systemd_run('notify')
    start = run['start']
    assert start['systemctl']['status'] == 0, run
    assert start['show']['ActiveState'] == 'active', run
    assert start['show']['SubState'] == 'running', run
    assert start['show']['StatusText'] == 'started', run
    assert start['show']['MainPID'] != '0', run


@systemd
def test_systemd_notify_start_waits_for_every_start_listener(systemd_run):
    run = systemd_run('notify-restart')
    start = run['start']
    assert start['systemctl']['status'] == 0, run
    assert start['systemctl']['seconds'] >= 1, run  # The slow listener.
    assert start['slow_done'], run
    assert start['show']['ActiveState'] == 'active', run


@systemd
@pytest.mark.parametrize('step', ['reload', 'sighup'])
def test_systemd_notify_reload_keeps_the_unit_and_its_main_pid(
    systemd_run, step
):
    run = systemd_run('notify')
    main = run['start']['show']['MainPID']
    reload = run[step]
    assert reload['systemctl']['status'] == 0, run
    assert set(states_of(reload['states'], 'ActiveState')) <= {
        'active',
        'reloading',
    }, run
    assert reload['states'][-1]['ActiveState'] == 'active', run
    assert reload['states'][-1]['StatusText'] == 'started', run
    assert set(states_of(reload['states'], 'MainPID')) == {main}, run


@systemd
def test_systemd_notify_stop_is_clean_and_fast(systemd_run):
    run = systemd_run('notify')
    stop = run['stop']
    assert stop['systemctl']['status'] == 0, run
    assert stop['systemctl']['seconds'] < 2, run
    assert stop['show']['ActiveState'] == 'inactive', run
    assert stop['show']['Result'] == 'success', run
    assert stop['show']['ExecMainStatus'] == '0', run
    assert not stop['main_alive'], run


@systemd
def test_systemd_watchdog_keeps_a_healthy_service_alive(systemd_run):
    run = systemd_run('notify-watchdog')
    main = run['start']['show']['MainPID']
    healthy = run['healthy']['states']  # 3.5 s with WatchdogSec=1s.
    assert set(states_of(healthy, 'ActiveState')) == {'active'}, run
    assert set(states_of(healthy, 'MainPID')) == {main}, run
    assert set(states_of(healthy, 'NRestarts')) == {'0'}, run


@systemd
def test_systemd_watchdog_fires_when_the_main_thread_is_wedged(systemd_run):
    run = systemd_run('notify-watchdog')
    main = run['start']['show']['MainPID']
    wedged = run['wedged']['states']
    assert 'Watchdog timeout' in run.journal(), run
    assert wedged[-1]['NRestarts'] == '1', run  # Restart=on-failure
    assert wedged[-1]['MainPID'] not in ('0', main), run


@systemd
def test_systemd_notify_restart_keeps_the_unit_active(systemd_run):
    run = systemd_run('notify-restart')
    main = run['start']['show']['MainPID']
    restart = run['restart']  # Watched for 4 s; TimeoutStopSec=2s.
    assert restart['systemctl']['status'] == 0, run
    assert restart['starts'] == 2, run
    assert set(states_of(restart['states'], 'ActiveState')) <= {
        'active',
        'reloading',
    }, run
    assert restart['states'][-1]['ActiveState'] == 'active', run
    assert restart['states'][-1]['StatusText'] == 'started', run
    assert set(states_of(restart['states'], 'MainPID')) == {main}, run
    assert set(states_of(restart['states'], 'NRestarts')) == {'0'}, run


@systemd
def test_systemd_cherrypy_style_redaemonizing_loses_its_main_pid_on_reload(
    systemd_run,
):
    # Evidence for README's compatibility note on CherryPy's
    # test_SIGHUP_daemonized: a SIGHUP that re-daemonizes makes the main PID
    # that systemd watches exit. systemd then re-reads the PID file: if the
    # new daemon has already written it, the unit follows the new PID (a
    # race the daemon cannot win on purpose); if not, the unit ends. This
    # module's in-place restart keeps both
    # (test_systemd_forking_reload_keeps_the_unit_and_its_main_pid).
    run = systemd_run('cherrypy-standin')
    start = run['start']
    assert start['systemctl']['status'] == 0, run
    assert start['show']['ActiveState'] == 'active', run
    main = start['show']['MainPID']
    last = run['reload']['states'][-1]
    if last['ActiveState'] == 'inactive':
        assert 'app.service: Deactivated successfully.' in run.journal(), run
    else:
        assert last['ActiveState'] == 'active', run
        assert last['MainPID'] not in (main, '0'), run


@systemd
def test_systemd_socket_activation_and_reloads_refuse_nothing(systemd_run):
    # README's .socket + .service recipe: systemd binds the port, the first
    # connection starts the service, which adopts the socket by its name;
    # three reloads (kill -HUP: restart in place) under 4 client threads.
    run = systemd_run('socket-activation')
    assert run['listening']['systemctl'] == 0, run
    assert run['listening']['show']['ActiveState'] == 'inactive', run
    assert run['activated']['reply'] == 'hello\n', run
    main = run['activated']['show']['MainPID']
    reloads = run['reloads']
    assert [r['status'] for r in reloads['reloads']] == [0, 0, 0], run
    assert reloads['failures'] == [] and reloads['replies'] > 30, run
    assert set(states_of(reloads['states'], 'MainPID')) == {main}, run
    assert reloads['states'][-1]['ActiveState'] == 'active', run
    stop = run['stop']
    assert stop['show']['ActiveState'] == 'inactive', run
    assert not stop['main_alive'], run
