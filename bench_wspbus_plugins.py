"""Measure wspbus_plugins against its limits and against CherryPy's bus.

Each row of SPEC section 6 is measured for this module, for the bare
operation it wraps (its limit) and, when ``cherrypy`` is importable, for
CherryPy's ``cherrypy.process``.  Variants run interleaved (A B C A B C ...)
so a noisy machine slows them alike; the table shows medians and ratios.

    python bench_wspbus_plugins.py [--quick] [--json]

Standard library only; ``make bench`` runs it in a venv with CherryPy.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import wspbus_plugins as wp

try:
    from cherrypy.process import plugins as cp_plugins
    from cherrypy.process import wspbus as cp_wspbus
except ImportError:
    cp_plugins = cp_wspbus = None

HERE = os.path.dirname(os.path.abspath(__file__))
HEAVY = (
    'ctypes',
    'subprocess',
    'logging',
    'argparse',
    'pwd',
    'grp',
    'socket',
    're',
    'traceback',
    'typing',
    'enum',
)


# -- Measuring ----------------------------------------------------------------


def interleaved(variants, rounds):
    """Run each variant once per round, in turn; return medians by name.

    `variants` maps a name to a function returning one sample (seconds).
    """
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, measure in variants.items():
            samples[name].append(measure())
    return {
        name: statistics.median(values) for name, values in samples.items()
    }


def per_call(func, calls):
    def measure():
        started = time.perf_counter()
        for _ in range(calls):
            func()
        return (time.perf_counter() - started) / calls

    return measure


# -- publish ------------------------------------------------------------------


def listener():
    return None


def bare_loop(funcs):
    output = []
    for func in funcs:
        try:
            output.append(func())
        except Exception:
            pass
    return output


def bench_publish(count, rounds):
    funcs = [(lambda: None) for _ in range(count)]
    ours = wp.Bus()
    for func in funcs:
        ours.subscribe('x', func)
    variants = {
        'ours': per_call(lambda: ours.publish('x'), 2000),
        'limit': per_call(lambda: bare_loop(funcs), 2000),
    }
    if cp_wspbus:
        theirs = cp_wspbus.Bus()
        for func in funcs:
            theirs.subscribe('x', func)
        variants['cherrypy'] = per_call(lambda: theirs.publish('x'), 2000)
    return interleaved(variants, rounds)


# -- SIGTERM to a blocked process ---------------------------------------------

SIGTERM_CHILDREN = {
    'ours': """
        import wspbus_plugins as wp
        bus = wp.Bus()
        wp.SignalHandler(bus).subscribe()
        bus.start()
        print('ready', flush=True)
        bus.block()
    """,
    'limit': """
        import signal, sys
        signal.signal(signal.SIGTERM, lambda *args: sys.exit(0))
        print('ready', flush=True)
        signal.pause()
    """,
    'cherrypy': """
        from cherrypy.process import plugins, wspbus
        bus = wspbus.Bus()
        plugins.SignalHandler(bus).subscribe()
        bus.start()
        print('ready', flush=True)
        bus.block()
    """,
}
# The same with idle executor threads (a pool and asyncio's default one):
# CherryPy's block() joins them for ever (its issue #1942).
IDLE_POOLS = """
    import asyncio, concurrent.futures
    concurrent.futures.ThreadPoolExecutor(2).submit(int).result()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(loop.run_in_executor(None, int))
"""
POOL_CHILDREN = {
    name: textwrap.dedent(IDLE_POOLS) + textwrap.dedent(code)
    for name, code in SIGTERM_CHILDREN.items()
}
# An asyncio service whose main task awaits, against asyncio.run with a
# SIGTERM handler that cancels it.
ASYNC_CHILDREN = {
    'ours': """
        import asyncio, wspbus_plugins as wp
        bus = wp.Bus()
        wp.SignalHandler(bus).subscribe()
        async def main():
            print('ready', flush=True)
            await asyncio.sleep(3600)
        bus.run_async(main())
    """,
    'limit': """
        import asyncio, signal
        async def main():
            task = asyncio.current_task()
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGTERM, task.cancel)
            print('ready', flush=True)
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass
        asyncio.run(main())
    """,
}


def sigterm_to_gone(code, patience=30):
    """Measure SIGTERM -> process gone; inf if still there after
    `patience` seconds (then killed)."""

    def measure():
        proc = subprocess.Popen(
            [sys.executable, '-c', textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=HERE),
        )
        try:
            if proc.stdout.readline() != b'ready\n':
                raise RuntimeError('child did not start')
            time.sleep(0.05)  # Let it settle into block().
            # wait() without a timeout blocks in waitpid(); with one, it
            # polls with doubling sleeps and rounds the result up to ~4 ms.
            guard = threading.Timer(patience, proc.kill)
            guard.start()
            started = time.perf_counter()
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait()
            elapsed = time.perf_counter() - started
            guard.cancel()
            return elapsed if proc.returncode == 0 else float('inf')
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()

    return measure


def bench_sigterm(rounds, children=SIGTERM_CHILDREN):
    names = ['ours', 'limit'] + (['cherrypy'] if cp_wspbus else [])
    variants = {
        n: sigterm_to_gone(children[n]) for n in names if n in children
    }
    if children is POOL_CHILDREN and cp_wspbus:  # It never exits: once.
        del variants['cherrypy']
        result = interleaved(variants, rounds)
        result['cherrypy'] = sigterm_to_gone(children['cherrypy'], 2)()
        return result
    return interleaved(variants, rounds)


# -- BackgroundTask.cancel() --------------------------------------------------


def cancel_to_ended(task_class, wait=10.0):
    def measure():
        task = task_class(60, listener)
        task.start()
        while not task.running:
            time.sleep(0.001)
        started = time.perf_counter()
        task.cancel()
        task.join(wait)
        if task.is_alive():
            return float('inf')
        return time.perf_counter() - started

    return measure


def bench_cancel(rounds):
    result = interleaved({'ours': cancel_to_ended(wp.BackgroundTask)}, rounds)
    if cp_plugins:  # Its thread sleeps out the interval: try once, briefly.
        result['cherrypy'] = cancel_to_ended(
            cp_plugins.BackgroundTask, wait=1.0
        )()
    return result


# -- Autoreload ---------------------------------------------------------------

NO_MODULES = r'^wspbus_bench_matches_no_module$'


def make_files(root, count=2000, per_dir=100):
    files = []
    for i in range(count):
        directory = os.path.join(root, 'd%02d' % (i // per_dir))
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, 'mod%04d.py' % i)
        with open(path, 'w') as f:
            f.write('X = %d\n' % i)
        files.append(path)
    return files


class RestartRecorder:
    def __init__(self):
        self.event = threading.Event()
        self.at = None

    def restart(self):
        self.at = time.perf_counter()
        self.event.set()


def save_to_restart(make_reloader, files, settle, rng):
    """Time from a file's save to the reloader's restart() call.

    The save lands at a random moment of the 1 s polling interval, so a
    polling reloader shows its mean wait, not one fixed phase.
    """
    state = {'n': 0}

    def measure():
        recorder = RestartRecorder()
        reloader = make_reloader(recorder)
        reloader.start()
        # Baseline taken (CherryPy: only after its first tick).
        time.sleep(settle + rng.random())
        path = files[state['n'] % len(files)]
        state['n'] += 1
        started = time.perf_counter()
        with open(path, 'a') as f:
            f.write('# saved\n')
        if not recorder.event.wait(10):
            reloader.stop()
            return float('inf')
        reloader.stop()
        return recorder.at - started

    return measure


def our_reloader(files, use_inotify):
    def make(recorder):
        bus = wp.Bus()
        bus.restart = recorder.restart
        reloader = wp.Autoreloader(
            bus, frequency=1, match=NO_MODULES, use_inotify=use_inotify
        )
        reloader.files.update(files)
        return reloader

    return make


def cherrypy_reloader(files):
    def make(recorder):
        bus = cp_wspbus.Bus()
        bus.restart = recorder.restart
        bus.log = lambda *args, **kwargs: None
        reloader = cp_plugins.Autoreloader(bus, frequency=1, match=NO_MODULES)
        reloader.files.update(files)
        return reloader

    return make


def bench_reload_latency(files, rounds):
    rng = random.Random(1)
    variants = {
        'inotify': save_to_restart(our_reloader(files, True), files, 0.1, rng),
        'polling': save_to_restart(
            our_reloader(files, False), files, 0.1, rng
        ),
    }
    if cp_plugins:
        variants['cherrypy'] = save_to_restart(
            cherrypy_reloader(files), files, 1.2, rng
        )
    return interleaved(variants, rounds)


def bench_polling_tick(files, rounds):
    bus = wp.Bus()
    bus.restart = lambda: None
    ours = wp.Autoreloader(bus, match=NO_MODULES, use_inotify=False)
    ours.files.update(files)
    ours.run()  # Baseline.
    stat = os.stat

    def bare():
        for path in files:
            stat(path)

    variants = {'ours': per_call(ours.run, 20), 'limit': per_call(bare, 20)}
    if cp_plugins:
        cp_bus = cp_wspbus.Bus()
        theirs = cp_plugins.Autoreloader(cp_bus, match=NO_MODULES)
        theirs.files.update(files)
        theirs.run()
        variants['cherrypy'] = per_call(theirs.run, 20)
    return interleaved(variants, rounds)


def bench_idle_inotify_tick(files, rounds):
    bus = wp.Bus()
    bus.restart = lambda: None
    reloader = wp.Autoreloader(bus, frequency=3600, match=NO_MODULES)
    reloader.files.update(files)
    reloader.start()
    try:
        if not isinstance(reloader.thread, wp._WatchTask):
            return None
        return interleaved({'ours': per_call(reloader.run, 200)}, rounds)
    finally:
        reloader.stop()


# -- Restarts under load ------------------------------------------------------
# A tiny TCP service answers each connection with its start count; SIGHUP
# restarts it while 4 client threads connect in a loop.  With ListenSockets
# the listening socket crosses the re-exec; the others bind a new one at
# each start, as services do without it.

RESTART_SERVICE = """
    import os, socket, sys, threading
    IMPORTS
    port, how = int(sys.argv[1]), sys.argv[2]
    starts = int(os.environ.get('BENCH_STARTS', '0')) + 1
    os.environ['BENCH_STARTS'] = str(starts)
    bus = wspbus.Bus()
    handler = plugins.SignalHandler(bus)
    handler.handlers['SIGHUP'] = bus.restart
    handler.subscribe()
    if how == 'handoff':
        listening = plugins.ListenSockets(bus)
        listening.subscribe()
        server = listening.listen('web', ('127.0.0.1', port))
    done = threading.Event()

    def serve():
        while not done.is_set():
            server.settimeout(0.05)
            try:
                conn = server.accept()[0]
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(None)
                conn.sendall(b'%d\\n' % starts)

    def start():
        global server
        if how == 'rebind':
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(('127.0.0.1', port))
            server.listen(128)
        threading.Thread(target=serve).start()

    def stop():
        done.set()
        for thread in threading.enumerate():
            if thread.name != 'MainThread':
                thread.join()
        if how == 'rebind':
            server.close()

    fds = []  # Counted before the server runs: no connection open yet.
    count_fds = lambda: fds.append(len(os.listdir('/proc/self/fd')))
    bus.subscribe('start', count_fds, priority=10)
    bus.subscribe('start', start)
    bus.subscribe('stop', stop)
    bus.subscribe('started', lambda: print('ready', starts, fds[-1],
                                           flush=True))
    bus.start()
    bus.block()
"""


def restarts_under_load(how, restarts, cherrypy=False):
    """Return (refused, reset, descriptor counts, restart->served)."""
    code = textwrap.dedent(RESTART_SERVICE).replace(
        'IMPORTS',
        'from cherrypy.process import wspbus, plugins'
        if cherrypy
        else 'import wspbus_plugins as wspbus\nplugins = wspbus',
    )
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f:
        f.write(code)
    proc = subprocess.Popen(
        [sys.executable, f.name, str(port), how],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=HERE),
    )
    replies, done = [], threading.Event()

    def client():
        while not done.is_set():
            reply = ask(port)
            replies.append((time.perf_counter(), reply))

    clients = [threading.Thread(target=client) for _ in range(4)]
    descriptors, asked_at = [], {}
    guard = threading.Timer(60, proc.kill)  # Renewed at each restart.
    guard.start()
    try:
        descriptors.append(proc.stdout.readline().split()[2])
        for thread in clients:
            thread.start()
        for count in range(2, restarts + 2):
            asked_at[count] = time.perf_counter()
            os.kill(proc.pid, signal.SIGHUP)
            line = proc.stdout.readline().split()
            if line[:2] != [b'ready', b'%d' % count]:
                raise RuntimeError('restart %d failed: %r' % (count, line))
            descriptors.append(line[2])
            guard.cancel()
            guard = threading.Timer(60, proc.kill)
            guard.start()
        time.sleep(0.1)
    finally:
        done.set()
        for thread in clients:
            thread.join()
        proc.kill()
        proc.wait()
        guard.cancel()
        proc.stdout.close()
        os.remove(f.name)
    results = [reply for _, reply in replies]
    served = {}
    for at, reply in replies:
        if reply.isdigit():
            served.setdefault(int(reply), at)
    latencies = [
        served[count] - at for count, at in asked_at.items() if count in served
    ]
    return (
        results.count('refused'),
        results.count('reset'),
        set(descriptors),
        statistics.median(latencies) if latencies else None,
    )


def ask(port):
    with socket.socket() as conn:
        conn.settimeout(10)
        try:
            conn.connect(('127.0.0.1', port))
            reply = conn.makefile('rb').readline().strip().decode()
        except ConnectionRefusedError:
            return 'refused'
        except (ConnectionResetError, socket.timeout):
            return 'reset'
        return reply or 'reset'


def bench_restarts(restarts):
    result = {
        'ours': restarts_under_load('handoff', restarts),
        'rebind': restarts_under_load('rebind', restarts),
    }
    if cp_wspbus:
        try:
            result['cherrypy'] = restarts_under_load(
                'rebind', restarts, cherrypy=True
            )
        except RuntimeError as error:  # Its restart can hang: seen here.
            print('CherryPy under restarts: %s' % error, file=sys.stderr)
            hung = float('inf')
            result['cherrypy'] = (hung, hung, set(), hung)
    return result


# -- Containers: PID 1, ChildReaper, ProbeFiles -------------------------------

UNSHARE = ['unshare', '--pid', '--fork', '--mount-proc', '--kill-child']

PID1_SERVICE = """
    import json, os, sys, time, wspbus_plugins as wp
    mode, reaping = sys.argv[1], sys.argv[2] == 'reaper'


    class TimedReaper(wp.ChildReaper):
        def _run(self, stopped):  # The thread's CPU time, when it ends.
            super()._run(stopped)
            self.cpu = time.thread_time()


    def zombies():
        count = 0
        for name in os.listdir('/proc'):
            try:
                with open('/proc/%s/stat' % name, 'rb') as f:
                    count += f.read().rpartition(b')')[2].split()[0] == b'Z'
            except (OSError, IndexError):
                pass
        return count


    bus = wp.Bus()
    wp.SignalHandler(bus).subscribe()
    reaper = TimedReaper(bus)
    if reaping:
        reaper.subscribe()
    bus.start()
    if mode == 'sigterm':
        print('ready', flush=True)
        bus.block()
        sys.exit(0)
    report = {}
    if mode == 'idle':
        time.sleep(5)
        report['seconds'] = 5
    else:
        for _ in range(200):  # Double fork: 200 orphans for PID 1.
            pid = os.fork()
            if pid == 0:
                if os.fork() == 0:
                    os._exit(0)
                os._exit(0)
            os.waitpid(pid, 0)
        flooded = time.monotonic()
        while zombies() and time.monotonic() - flooded < 1:
            time.sleep(0.001)
        report['cleared'] = time.monotonic() - flooded
        time.sleep(max(0, flooded + 1 - time.monotonic()))
        report['zombies'] = zombies()
    bus.exit()
    report['cpu'] = getattr(reaper, 'cpu', None)
    report['reaped'] = reaper.reaped
    print(json.dumps(report), flush=True)
"""


def can_unshare():
    if not hasattr(os, 'geteuid') or os.geteuid() != 0:
        return False
    if not shutil.which('unshare'):
        return False
    probe = subprocess.run(UNSHARE[:-1] + ['true'], capture_output=True)
    return probe.returncode == 0


def run_pid1(mode, reaping):
    """Run PID1_SERVICE as PID 1 of a new PID namespace; return its report."""
    out = subprocess.run(
        UNSHARE
        + [sys.executable, '-c', textwrap.dedent(PID1_SERVICE), mode]
        + ['reaper' if reaping else 'none'],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=HERE),
    )
    if out.returncode:
        raise RuntimeError('PID 1 service failed: %s' % out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def namespace_init(unshare_pid):
    """Return the PID (seen from here) of the namespace's PID 1."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for name in os.listdir('/proc'):
            try:
                with open('/proc/%s/stat' % name, 'rb') as f:
                    fields = f.read().rpartition(b')')[2].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == unshare_pid:
                return int(name)
        time.sleep(0.001)
    raise RuntimeError('no PID 1 under unshare %d' % unshare_pid)


def pid1_sigterm_to_gone(reaping):
    def measure():
        proc = subprocess.Popen(
            UNSHARE
            + [sys.executable, '-c', textwrap.dedent(PID1_SERVICE)]
            + ['sigterm', 'reaper' if reaping else 'none'],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=HERE),
        )
        try:
            if proc.stdout.readline() != b'ready\n':
                raise RuntimeError('PID 1 service did not start')
            init = namespace_init(proc.pid)
            time.sleep(0.05)
            guard = threading.Timer(30, proc.kill)
            guard.start()
            started = time.perf_counter()
            os.kill(init, signal.SIGTERM)
            proc.wait()  # unshare ends once its PID 1 is gone.
            elapsed = time.perf_counter() - started
            guard.cancel()
            return elapsed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()

    return measure


def idle_thread_cpu(seconds=5):
    """CPU seconds per second of a thread that only waits 0.1 s at a time."""
    stopped, cpu = threading.Event(), []

    def loop():
        while not stopped.wait(0.1):
            pass
        cpu.append(time.thread_time())

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(seconds)
    stopped.set()
    thread.join()
    return cpu[0] / seconds


def bench_pid1(rounds):
    """SIGTERM to gone, zombies after a flood, and the reaper's CPU."""
    result = interleaved(
        {
            'reaper': pid1_sigterm_to_gone(True),
            'none': pid1_sigterm_to_gone(False),
        },
        rounds,
    )
    floods = [run_pid1('flood', True) for _ in range(3)]
    idle = run_pid1('idle', True)
    idle_rate = idle['cpu'] / idle['seconds']  # CPU s per wall s
    result['zombies'] = max(flood['zombies'] for flood in floods)
    result['zombies_without'] = run_pid1('flood', False)['zombies']
    result['cleared'] = statistics.median(f['cleared'] for f in floods)
    result['idle_cpu'] = idle_rate
    result['idle_limit'] = idle_thread_cpu()
    result['cpu_per_orphan'] = statistics.median(
        f['cpu'] / max(1, f['reaped']) for f in floods
    )
    return result


PROBE_SERVICE = """
    import sys, wspbus_plugins as wp
    bus = wp.Bus()
    wp.SignalHandler(bus).subscribe()
    wp.ProbeFiles(bus, ready=sys.argv[1], drain=0.5).subscribe()
    bus.start()
    print('ready', flush=True)
    bus.block()
"""


def sigterm_to_not_ready(directory):
    ready = os.path.join(directory, 'ready')

    def measure():
        proc = subprocess.Popen(
            [sys.executable, '-c', textwrap.dedent(PROBE_SERVICE), ready],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=HERE),
        )
        try:
            if proc.stdout.readline() != b'ready\n' or not os.path.exists(
                ready
            ):
                raise RuntimeError('probe service did not start')
            time.sleep(0.05)
            started = time.perf_counter()
            os.kill(proc.pid, signal.SIGTERM)
            while os.path.exists(ready):
                if time.perf_counter() - started > 30:
                    return float('inf')
                time.sleep(0.0002)
            return time.perf_counter() - started
        finally:
            proc.wait(30)
            proc.stdout.close()

    return measure


def bench_not_ready(rounds):
    directory = tempfile.mkdtemp(prefix='wspbus-bench-')
    try:
        return interleaved({'ours': sigterm_to_not_ready(directory)}, rounds)
    finally:
        shutil.rmtree(directory)


# -- Import time --------------------------------------------------------------


def import_cost(statement):
    """Microseconds that `statement` adds to a fresh interpreter's imports."""

    def top_level(code):
        err = subprocess.run(
            [sys.executable, '-X', 'importtime', '-c', code],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=HERE),
        ).stderr
        costs = {}
        for line in err.splitlines():
            if line.startswith('import time:') and '|' in line:
                _, cumulative, name = line.split('|')
                if not name.startswith('  ') and cumulative.strip().isdigit():
                    costs[name.strip()] = int(cumulative)
        return costs

    baseline = top_level('pass')
    costs = top_level(statement)
    return sum(v for k, v in costs.items() if k not in baseline) / 1e6


def heavy_modules_pulled_in():
    code = (
        'import sys; before = set(sys.modules); import wspbus_plugins; '
        'print(" ".join(sorted(set(sys.modules) - before)))'
    )
    out = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=HERE),
    )
    return sorted(set(out.stdout.split()) & set(HEAVY))


def bench_import(rounds):
    # pip compiles CherryPy's files when it installs them; compile ours too,
    # even where PYTHONDONTWRITEBYTECODE is set, so both import from .pyc.
    import py_compile

    py_compile.compile(wp.__file__)
    variants = {'ours': lambda: import_cost('import wspbus_plugins')}
    if cp_wspbus:
        variants['cherrypy'] = lambda: import_cost('import cherrypy.process')
    return interleaved(variants, rounds)


# -- Mutation testing ---------------------------------------------------------
# `make mutation` (`bench_wspbus_plugins.py --mutants`): each mutant is one
# small deliberate bug, applied to a temporary copy of the module.  The
# tests named for it, which target the behaviour it breaks, must fail; a
# mutant they miss runs against the whole suite, to tell "caught by some
# other test" (not good enough: maybe by a timeout) from "missed".

# Each mutant: its name, the tests that target it (a pytest -k expression),
# then one or more edits written as a diff: '-' lines are replaced by the
# '+' lines that follow them (the text after '- '/'+ ' must occur once).
MUTANTS = """
launcher exits 0 when the daemon dies unready, silently
tests daemonizer_launcher_fails_when_the_daemon_dies_silently
-         if verdict == 'READY':
+         if verdict in ('READY', None):

no inotify debounce
tests real_save_in_steps_restarts_once_on_the_whole_file
-             if not _readable([self.fd], _DEBOUNCE):
+             if True:

DropPrivileges keeps supplementary groups
tests dropprivileges_switches_user_group_and_umask
-                     os.setgroups([])  # Root's groups must not outlive root.
+                     pass

ThreadManager hands out len(threads) + 1
tests threadmanager
-             index = 1
-             while index in used:
+             index = len(used) + 1
+             while False:

LoggingBridge raises DEBUG to INFO
tests loggingbridge_forwards_levels
-             self.logger.log(level, msg)
+             self.logger.log(max(level, 20), msg)

LoggingBridge without its own guard
tests loggingbridge_broken_handler
-             pass  # The bus must outlive a broken handler.
+             raise

RELOADING=1 after the graceful listeners
tests systemdnotifier_sends_the_life_cycle_in_order
-             ('graceful', self._reloading, 0),
+             ('graceful', self._reloading, 200),

STOPPING=1 after the other stop listeners
tests systemdnotifier_sends_the_life_cycle_in_order
-             ('graceful', self._reloaded, 100),
-             ('stop', self.stop, 0),
+             ('graceful', self._reloaded, 100),
+             ('stop', self.stop, 100),

watchdog pings every WATCHDOG_USEC, not half
tests systemdnotifier_watchdog
-             return int(usec) / 2e6 if int(usec) > 0 else None
+             return int(usec) / 1e6 if int(usec) > 0 else None

no watchdog pings when WATCHDOG_PID is ours
tests systemdnotifier_watchdog
-         if not usec or (pid and pid != str(os.getpid())):
+         if not usec or pid:

block() does not wait for the exit listeners (#1942)
tests block_returns_after_exit_listeners_run_elsewhere
-                 lambda: self._exit_phase not in ('asked', 'running'),
+                 lambda: True,

handle_SIGHUP ignores the terminal
tests sighup_exits_when_attached_to_a_terminal
-         return forked and not _isatty(sys.stdin)
+         return forked

the main thread polls every 0.1 s instead of waking
tests wakes_within_50ms and main
-                 self._wakeup.acquire(timeout=remaining)
+                 time.sleep(min(remaining, 0.1))

other threads poll every 0.1 s instead of waking
tests wakes_within_50ms and another
-                         self._changed.wait(remaining)
+                         self._changed.wait(0) or time.sleep(0.1)

publish stops at the first failing listener
tests publish_runs_every_listener
-                 failures.handle_exception()
+                 failures.handle_exception()
+                 break

SystemExit(0) after a failure stays 0
tests systemexit_code_forced
-     if isinstance(exc, SystemExit) and failures and exc.code in (None, 0):
+     if False:

equal priorities in reverse subscription order
tests priorities_and_subscription_order
-                     self._order[(channel, cb)],
+                     -self._order[(channel, cb)],

exit() runs twice
tests exit_runs_once or exit_from_many_threads
-                 return False
-             self._exit_phase = 'asked'
+                 pass
+             self._exit_phase = 'asked'

an exit during start does not win
tests exit_from_a_thread_during_start_wins or once_exit_began
-             if self._exit_phase is not None:
-                 return
-             yield listener
+             if False:
+                 return
+             yield listener

signal handlers run listeners inline
tests never_nest_inside_a_listener or inside_the_main_work
-             self._signals.append(channel)  # _lock: in mid-bookkeeping.
-             self._wake()
-             self._wake_loop()
-             return
+             pass  # Acted on at once, inside whatever was running.

a second Ctrl+C does not interrupt a slow start
tests second_ctrl_c_interrupts_a_slow_start or interrupts_a_wedged_main
-             and 'SIGINT' in self._signals
+             and False

restart() does not keep signals pending across execv
tests signal_during_reexec_is_kept
-         carried = sorted(handled)
+         carried = []

no fork safety
tests fork_while_threads_use_the_bus
-     os.register_at_fork(
+     (lambda **hooks: None)(

block() joins idle executor workers
tests idle_pool_threads_never_hang
-     if worker is not None and getattr(thread, '_target', None) is worker:
+     if False:

run_async: an exit runs before the main task ends
tests run_async_exit_from_a_thread_or_a_listener
-         if task is None or loop is None:  # (A task comes with its loop.)
+         if True:

ListenSockets closes its sockets on restart
tests listensockets_restart_hands_sockets
-         if self.bus.execv:
-             fds = [fd for each in _listen_sockets for fd in each._own()]
+         if False:
+             fds = [fd for each in _listen_sockets for fd in each._own()]

PID file not locked
tests pidfile_second_holder
-                     locking.flock(fd, locking.LOCK_EX | locking.LOCK_NB)
+                     pass

PID file removed although it holds another PID
tests pidfile_rewritten_by_someone_else
-             if _read_pid(fd) == os.getpid() and _same_file(fd, self._path):
+             if True:

PID file left when a restarted start ends before PIDFile's
tests pidfile_removed_when_the_restarted_start_ends_before_it
-             fd = self._adopt_inherited()  # the file handed over is ours.
+             pass

the launcher hears of a restart() before READY as a failure
tests daemonizer_launcher_waits_for_the_image_a_restart_executes
-         if self.bus.execv and fd is not None:  # The new image will report.
+         if False:

a new image acts on a SIGHUP before its plugins took back their files
tests signal_in_the_new_images_set_up_waits_for_its_plugins
-         return bool(_held) and channel not in ('SIGTERM', 'SIGINT')
+         return False

a PID file handed over and not taken back is left at exit
tests new_images_set_up_waits_for_its_plugins or unclaimed_goes_even
- if _PIDFILE_ENV in os.environ:  # At exit, unless a PIDFile takes it back.
+ if False:

PID file follows a symlink
tests pidfile_refuses_a_symlink
-     try:
-         _check_regular(path, os.lstat(path).st_mode)
+     try:
+         os.lstat(path)
-     flags |= getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_CLOEXEC', 0)
+     flags |= getattr(os, 'O_CLOEXEC', 0)

autoreload sees only newer mtimes
tests polling_sees_every_kind_of_change
-             if old != signature:
+             if old is _UNSEEN or (old and signature and signature > old):

cancel() waits out the sleep
tests backgroundtask_repeats_and_cancel
-         return self._cancelled.wait(self.interval)
+         return time.sleep(self.interval) or self._cancelled.is_set()

Daemonizer does not start a session
tests daemonizer_detaches
-             os.setsid()
+             pass

READY=1 on start, before it succeeded
tests systemdnotifier_failed_start_sends_no_ready
-             ('started', self.started, None),
-             ('main', self._watchdog, None),
+             ('start', self.started, None),
+             ('main', self._watchdog, None),

frequency 0 does not disable a Monitor
tests monitor_frequency_zero_or_less_disables
-         if self.frequency <= 0:
+         if self.frequency < 0:

ThreadManager never publishes start_thread
tests threadmanager_indexes_and_channels
-         self.bus.publish('start_thread', index)
+         pass

a signal wakes run_async's loop only through the wakeup fd
tests signal_wakes_the_loop_when_the_program_takes_the_fd
-             self._wake_loop()
+             pass

a dropped socket on an overlapping host keeps the port
tests dropped_socket_on_an_overlapping_host_is_closed
-                 self._retire(entry, why, _WARNING)
+                 pass
"""


def parse_mutants(text=MUTANTS):
    """Return [(name, tests, [(old, new), ...])] from the MUTANTS text."""
    mutants = []
    for block in text.strip().split('\n\n'):
        name, tests, *lines = block.split('\n')
        edits = []
        for line in lines:
            sign, code = line[0], line[2:] + '\n'
            if sign == '-' and (not edits or edits[-1][1]):
                edits.append([code, ''])
            elif sign == '-':
                edits[-1][0] += code
            else:
                edits[-1][1] += code
        mutants.append((name, tests[len('tests ') :], edits))
    return mutants


FAILED_LINE = re.compile(r'^(?:FAILED|ERROR) (\S+)', re.M)


def pytest_in(directory, args, timeout=900):
    """Run pytest there; return the failing tests' ids (or why none ran)."""
    command = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider']
    try:
        proc = subprocess.run(
            command + args,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return ['(timed out after %d s)' % timeout]
    if (
        'no tests ran' in proc.stdout
        or ' deselected' in proc.stdout
        and (' passed' not in proc.stdout and ' failed' not in proc.stdout)
    ):
        raise RuntimeError('no test selected by %r' % args)
    return FAILED_LINE.findall(proc.stdout)


def run_mutant(name, targets, edits):
    """Return (verdict, the first failing test) for one mutant."""
    directory = tempfile.mkdtemp(prefix='wspbus-mutant-')
    try:
        for filename in ('test_wspbus_plugins.py', 'README.md', 'setup.cfg'):
            shutil.copy(os.path.join(HERE, filename), directory)
        with open(os.path.join(HERE, 'wspbus_plugins.py')) as f:
            source = f.read()
        for old, new in edits:
            if source.count(old) != 1:
                raise RuntimeError(
                    'mutant %r: %r is in the module %d times, not once'
                    % (name, old, source.count(old))
                )
            source = source.replace(old, new)
        with open(os.path.join(directory, 'wspbus_plugins.py'), 'w') as f:
            f.write(source)
        failed = pytest_in(directory, ['-x', '-k', targets])
        if failed:
            return 'caught', failed[0]
        failed = pytest_in(directory, [])
        if failed:
            return 'NOT TARGETED', failed[0]
        return 'MISSED', ''
    finally:
        shutil.rmtree(directory)


def mutation(names=None):
    rows = []
    for name, targets, edits in parse_mutants():
        if names and not any(n in name for n in names):
            continue
        verdict, test = run_mutant(name, targets, edits)
        rows.append((name, verdict, test))
        print('%-12s %-58s %s' % (verdict, name, test), flush=True)
    caught = sum(verdict == 'caught' for _, verdict, _ in rows)
    print('\n| mutant | result | caught by |')
    print('|---|---|---|')
    for name, verdict, test in rows:
        print('| %s | %s | `%s` |' % (name, verdict, test.split('::')[-1]))
    print(
        '\n%d of %d mutants caught by the tests that target them.'
        % (caught, len(rows))
    )
    return 0 if caught == len(rows) else 1


# -- Report -------------------------------------------------------------------


class Row:
    def __init__(
        self,
        metric,
        ours,
        limit=None,
        cherrypy=None,
        unit='ms',
        target='',
        passed=None,
    ):
        self.metric = metric
        self.ours, self.limit, self.cherrypy = ours, limit, cherrypy
        self.unit = unit
        self.target = target
        self.passed = passed

    def ratio(self, other):
        if other in (None, 0) or self.ours is None:
            return None
        return self.ours / other

    def as_dict(self):
        return {
            'metric': self.metric,
            'unit': self.unit,
            'ours': self.ours,
            'limit': self.limit,
            'cherrypy': self.cherrypy,
            'ratio_to_limit': self.ratio(self.limit),
            'ratio_to_cherrypy': self.ratio(self.cherrypy),
            'target': self.target,
            'result': {True: 'PASS', False: 'FAIL', None: '-'}[self.passed],
        }


def fmt(value, unit):
    if value is None:
        return '-'
    if value == float('inf'):
        return '>timeout'
    if unit == 'n':  # A count.
        return '%d' % value
    scale = {'ms': 1e3, 'us': 1e6, 'ns': 1e9}[unit]
    return '%.3g %s' % (value * scale, unit)


def fmt_ratio(value):
    return '-' if value is None else '%.2fx' % value


def print_table(rows):
    header = (
        'metric',
        'this module',
        'limit',
        'CherryPy 18.10',
        'x limit',
        'x CherryPy',
        'target',
        'result',
    )
    lines = [header] + [
        (
            r.metric,
            fmt(r.ours, r.unit),
            fmt(r.limit, r.unit),
            fmt(r.cherrypy, r.unit),
            fmt_ratio(r.ratio(r.limit)),
            fmt_ratio(r.ratio(r.cherrypy)),
            r.target,
            r.as_dict()['result'],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(8)]
    for n, line in enumerate(lines):
        print(
            '| '
            + ' | '.join(cell.ljust(w) for cell, w in zip(line, widths))
            + ' |'
        )
        if n == 0:
            print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')


def within(value, bound):
    return value is not None and bound is not None and value <= bound


def run(quick):
    rounds = 5 if quick else 15
    rows = []
    for count in (1, 10, 100):
        r = bench_publish(count, rounds * 2)
        row = Row(
            'publish, %d listener%s' % (count, 's' * (count > 1)),
            r['ours'],
            r['limit'],
            r.get('cherrypy'),
            unit='us',
        )
        if count == 10:
            row.target = '<= 1.8x limit, >= 4x faster than CherryPy'
            row.passed = within(row.ratio(row.limit), 1.8) and (
                row.cherrypy is None or within(row.ratio(row.cherrypy), 0.25)
            )
        rows.append(row)

    r = bench_sigterm(rounds if quick else 25)
    rows.append(
        Row(
            'SIGTERM to block()ed process -> gone (p50)',
            r['ours'],
            r['limit'],
            r.get('cherrypy'),
            target='<= 2x limit',
            passed=within(r['ours'], 2 * r['limit']),
        )
    )

    r = bench_sigterm(rounds, POOL_CHILDREN)
    rows.append(
        Row(
            'SIGTERM -> gone, idle executor threads (p50)',
            r['ours'],
            r['limit'],
            r.get('cherrypy'),
            target='<= 2x limit',
            passed=within(r['ours'], 2 * r['limit']),
        )
    )
    r = bench_sigterm(rounds, ASYNC_CHILDREN)
    rows.append(
        Row(
            'SIGTERM -> gone, run_async vs asyncio.run (p50)',
            r['ours'],
            r['limit'],
            target='<= 2x limit',
            passed=within(r['ours'], 2 * r['limit']),
        )
    )

    r = bench_cancel(rounds * 4)
    rows.append(
        Row(
            'BackgroundTask(60, f).cancel() -> ended',
            r['ours'],
            None,
            r.get('cherrypy'),
            target='<= 10 ms',
            passed=within(r['ours'], 0.010),
        )
    )

    root = tempfile.mkdtemp(prefix='wspbus-bench-')
    try:
        files = make_files(root)
        r = bench_reload_latency(files, 5 if quick else 10)
        rows.append(
            Row(
                'save -> restart(), 2000 files, inotify (p50)',
                r['inotify'],
                None,
                r.get('cherrypy'),
                target='<= 50 ms',
                passed=within(r['inotify'], 0.050),
            )
        )
        rows.append(
            Row(
                'save -> restart(), 2000 files, polling (p50)',
                r['polling'],
                None,
                r.get('cherrypy'),
                target='(frequency=1)',
            )
        )
        r = bench_polling_tick(files, rounds)
        polling = Row(
            'polling tick, 2000 files',
            r['ours'],
            r['limit'],
            r.get('cherrypy'),
            target='<= 1.2x limit',
            passed=within(r['ours'], 1.2 * r['limit']),
        )
        rows.append(polling)
        r = bench_idle_inotify_tick(files, rounds)
        reference = polling.cherrypy or polling.limit
        rows.append(
            Row(
                'idle tick with inotify, 2000 files',
                r and r['ours'],
                None,
                polling.cherrypy,
                unit='us',
                target='<= 1/10 CherryPy polling tick',
                passed=r is not None and within(r['ours'], reference / 10),
            )
        )
    finally:
        shutil.rmtree(root)

    restarts = 20 if quick else 100
    r = bench_restarts(restarts)
    ours, rebind, cherrypy = r['ours'], r['rebind'], r.get('cherrypy')
    for i, what in ((0, 'refused'), (1, 'reset')):
        rows.append(
            Row(
                '%s, %d restarts, ListenSockets (rebinding: limit)'
                % (what, restarts),
                ours[i],
                rebind[i],
                cherrypy and cherrypy[i],
                unit='n',
                target='0, descriptors constant' if i else '0',
                passed=ours[i] == 0 and (i == 0 or len(ours[2]) == 1),
            )
        )
    rows.append(
        Row(
            'restart -> first reply of the new image (p50)',
            ours[3],
            rebind[3],
            cherrypy and cherrypy[3],
        )
    )

    r = bench_not_ready(rounds)
    rows.append(
        Row(
            'SIGTERM -> ProbeFiles ready file removed (p50)',
            r['ours'],
            target='<= 100 ms',
            passed=within(r['ours'], 0.100),
        )
    )
    if can_unshare():
        r = bench_pid1(5 if quick else 15)
        rows.append(
            Row(
                'PID 1: SIGTERM -> gone, ChildReaper (limit: without) (p50)',
                r['reaper'],
                r['none'],
                target='<= 1 s',
                passed=within(r['reaper'], 1.0),
            )
        )
        rows.append(
            Row(
                'PID 1: zombies 1 s after 200 orphans (limit: without)',
                r['zombies'],
                r['zombies_without'],
                unit='n',
                target='0',
                passed=r['zombies'] == 0,
            )
        )
        rows.append(Row('PID 1: 200 orphans -> no zombie (p50)', r['cleared']))
        rows.append(
            Row(
                'ChildReaper CPU while idle, per second '
                '(limit: a thread in Event.wait(0.1))',
                r['idle_cpu'],
                r['idle_limit'],
                unit='us',
            )
        )
        rows.append(
            Row(
                'ChildReaper CPU per orphan reaped (flood of 200)',
                r['cpu_per_orphan'],
                unit='us',
            )
        )
    else:
        print('PID 1 rows skipped: they need root and unshare --pid.')

    r = bench_import(5 if quick else 10)
    heavy = heavy_modules_pulled_in()
    rows.append(
        Row(
            'import (-X importtime, cumulative)',
            r['ours'],
            None,
            r.get('cherrypy'),
            target='<= 1/20 CherryPy; '
            'no heavy module'
            + ('' if not heavy else ' (pulls in %s)' % ', '.join(heavy)),
            passed=not heavy
            and (
                r.get('cherrypy') is None
                or within(r['ours'], r['cherrypy'] / 20)
            ),
        )
    )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--quick',
        action='store_true',
        help='fewer rounds: done in under a minute',
    )
    parser.add_argument(
        '--json',
        action='store_true',
        help='print the rows as JSON instead of a table',
    )
    parser.add_argument(
        '--mutants',
        nargs='*',
        metavar='NAME',
        help='run the mutation tests instead (those whose name contains '
        'one of the NAMEs, or all)',
    )
    options = parser.parse_args(argv)
    if options.mutants is not None:
        return mutation(options.mutants)
    rows = run(options.quick)
    if options.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        print(
            'Python %s on %s, %d CPUs; CherryPy %s'
            % (
                sys.version.split()[0],
                sys.platform,
                os.cpu_count(),
                'present' if cp_wspbus else 'not installed',
            )
        )
        print_table(rows)
    return 0 if all(row.passed is not False for row in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
