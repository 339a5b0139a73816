# Copyright (c) 2026, the wspbus_plugins authors
# All rights reserved.
#
# Redistribution and use in source and binary forms, with or without
# modification, are permitted provided that the following conditions are met:
#
# 1. Redistributions of source code must retain the above copyright notice,
#    this list of conditions and the following disclaimer.
# 2. Redistributions in binary form must reproduce the above copyright notice,
#    this list of conditions and the following disclaimer in the documentation
#    and/or other materials provided with the distribution.
# 3. Neither the name of the copyright holder nor the names of its
#    contributors may be used to endorse or promote products derived from
#    this software without specific prior written permission.
#
# THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
# AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
# IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE
# ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE
# LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR
# CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF
# SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS
# INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN
# CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE)
# ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
# POSSIBILITY OF SUCH DAMAGE.

"""A process bus and its plugins: the life cycle of a Python service.

The bus is a publish/subscribe hub with a small state machine.  Listeners
subscribe to channels (``start``, ``stop``, ``exit``, ``graceful``, ``log``,
``main`` and any you invent); the bus publishes to them as the process moves
through its states, so each part of a service (a server, a worker pool, a
PID file) only says what to do when, and never who calls it::

    import wspbus_plugins as wspbus

    bus = wspbus.Bus()
    wspbus.SignalHandler(bus).subscribe()       # SIGTERM exits, SIGHUP ...
    wspbus.PIDFile(bus, '/tmp/app.pid').subscribe()

    @bus.subscribe('start')
    def open_sockets():
        print('serving')

    bus.subscribe('stop', lambda: print('closing'))
    bus.start()
    bus.block()                                 # until SIGTERM or exit()

The states, and the calls that move between them::

                  start()                      stop()
      STOPPED ------------> STARTING --> STARTED ----> STOPPING --> STOPPED
         |                                  |                         |
         |                  exit() = stop() then EXITING               |
         +----------------------------------+-------------------------+
                                            v
                                         EXITING  (block() returns;
                                                   restart() re-executes)

The file's sections, in order (``grep '^# --'`` prints their banners):

    Platform        every difference between platforms, decided once
    Types           names for type checkers; typing is never imported
    States, Errors  the bus's states; ChannelFailures
    Bus             channels, transitions, signals, block(), run_async(),
                    restart(); then the module's own ``bus``
    SimplePlugin    the base of the plugins that follow:
    SignalHandler, ConsoleCtrlHandler, DropPrivileges, Daemonizer, PIDFile
    ListenSockets   listening sockets kept across restart(); systemd's
    PerpetualTimer and BackgroundTask, Monitor, Autoreloader (and inotify)
    ThreadManager
    Containers      ChildReaper and ProbeFiles: PID 1, probes, draining
    SystemdNotifier, LoggingBridge
    Demo            main(): ``python -m wspbus_plugins``

This file is a drop-in for ``cherrypy.process.wspbus`` and
``cherrypy.process.plugins`` with fixes and additions; see README.md.
"""

from __future__ import annotations  # Annotations cost nothing at run time.

import atexit
import errno
import os
import sys
import threading
import time
from _weakrefset import WeakSet  # What threading uses: costs no import.

TYPE_CHECKING = False  # Read as typing.TYPE_CHECKING by type checkers.
if TYPE_CHECKING:
    import signal as _signal
else:
    # signal imports enum (half of this module's import time); the names
    # used here are all in the C module.
    import _signal

__version__ = '0.1.0'

__all__ = [
    'states',
    'ChannelFailures',
    'Bus',
    'bus',
    'SimplePlugin',
    'SignalHandler',
    'ConsoleCtrlHandler',
    'DropPrivileges',
    'Daemonizer',
    'PIDFile',
    'ListenSockets',
    'PerpetualTimer',
    'BackgroundTask',
    'Monitor',
    'Autoreloader',
    'ThreadManager',
    'ChildReaper',
    'ProbeFiles',
    'SystemdNotifier',
    'LoggingBridge',
    'main',
]


# -- Platform -----------------------------------------------------------------
# Every difference between platforms is decided here.  Code reads these
# globals when it runs, so a test can simulate a platform with monkeypatch.

_WINDOWS = sys.platform == 'win32'
_JYTHON = sys.platform.startswith('java')
_LINUX = sys.platform.startswith('linux')
_HAVE_FORK = hasattr(os, 'fork')
# Windows refuses to delete an open file: PIDFile closes it first there.
# Elsewhere it stays open (and locked) until it is gone.
_CLOSE_BEFORE_REMOVE = _WINDOWS
# ChildReaper finds zombies in /proc, so it reaps on Linux only.  It peeks
# with os.waitid(WNOWAIT), which reaps nothing; PyPy 3.9 lacks waitid, and
# the reaper then scans /proc at every tick instead.
_CAN_PEEK_AT_ZOMBIES = hasattr(os, 'waitid') and hasattr(os, 'WNOWAIT')
_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37  # linux/prctl.h
# ProbeFiles touches a file through its descriptor; Windows takes a path.
_UTIME_BY_FD = os.utime in os.supports_fd

fcntl: Optional[ModuleType]  # None where the platform lacks it.
try:
    import fcntl
except ImportError:  # Windows: PID files fall back to exclusive creation.
    fcntl = None

_EX_SOFTWARE = 70  # sysexits.h: internal software error.
_DEBUG, _INFO, _WARNING, _ERROR, _CRITICAL = 10, 20, 30, 40, 50

# The two constants below take a fallback value in their `except` clause:
# pyright's rule for upper-case names would call that a redefinition.
try:
    _STARTUP_DIR: Optional[str] = os.getcwd()
except OSError:  # The working directory was deleted before we started.
    _STARTUP_DIR = None  # pyright: ignore[reportConstantRedefinition]

try:
    _MAX_FILES = os.sysconf('SC_OPEN_MAX')
except (AttributeError, ValueError, OSError):
    _MAX_FILES = 1024  # pyright: ignore[reportConstantRedefinition]

# Environment variables that carry state across restart()'s re-exec.
_DAEMON_ENV = 'WSPBUS_DAEMON_PID'
_PIDFILE_ENV = 'WSPBUS_PIDFILE_FD'
_REPORT_ENV = 'WSPBUS_READY_REPORT_FD'  # Daemonizer's, if not ready yet.


# restart() blocks the signals the program handles across the re-exec and
# names them here.  From this module's import on, the new image holds them
# instead (a handler that only counts), so nothing it starts inherits a
# blocked mask.  SignalHandler puts its own handler in place for the signals
# to come; those that came meanwhile wait until the bus has started (or the
# main thread blocks or waits), when every plugin has subscribed and taken
# back what the old image handed over; so do the SIGHUPs and SIGUSR1s that
# come before then.  A SIGTERM after that point acts at once.
_CARRIED_ENV = 'WSPBUS_CARRIED_SIGNALS'  # 'numbers/wakeup pipe'
_sigmask: Optional[Callable[[int, Iterable[int]], Set[int]]]
_sigmask = getattr(_signal, 'pthread_sigmask', None)  # None on Windows.
_held: Dict[int, bool] = {}  # carried signal number -> came while held


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _hold(signum: int, frame: Optional[FrameType]) -> None:
    _held[signum] = True


def _hold_carried_signals() -> None:
    numbers, _, pipe_fd = os.environ.pop(_CARRIED_ENV, '').partition('/')
    try:
        carried = [int(n) for n in numbers.split()]
        pipe = int(pipe_fd) if pipe_fd else None
    except ValueError:
        return
    if not carried or _sigmask is None:
        return
    if threading.current_thread() is threading.main_thread():
        for signum in carried:
            _signal.signal(signum, _hold)
            _held[signum] = False
    if pipe is not None:  # What other threads took as the exec began.
        try:
            os.set_blocking(pipe, False)
            for signum in os.read(pipe, 4096):
                if signum in _held:
                    _held[signum] = True
        except OSError:
            pass
        _close_quietly(pipe)
    _sigmask(_signal.SIG_UNBLOCK, carried)


_hold_carried_signals()

# A fork copies the locks of this module as they are: one that another thread
# holds at that moment would stay held in the child for ever.  They are all
# held across a fork, so the child gets them consistent and free.

# Objects whose ._lock a fork must not split.
_FORK_GUARDED: WeakSet[Any] = WeakSet()
_FORK_LOCK = threading.Lock()
_fork_held: List[Any] = []


def _guard_for_fork(guarded: object) -> None:
    with _FORK_LOCK:
        _FORK_GUARDED.add(guarded)


def _acquire_for_fork() -> None:
    _FORK_LOCK.acquire()
    _fork_held[:] = list(_FORK_GUARDED)
    for guarded in _fork_held:
        guarded._lock.acquire()


def _release_after_fork() -> None:
    for guarded in reversed(_fork_held):
        guarded._lock.release()
    del _fork_held[:]
    _FORK_LOCK.release()


def _release_in_child() -> None:
    me = threading.get_ident()
    for guarded in _fork_held:  # A transition of a thread that is gone.
        if getattr(guarded, '_runner', None) not in (None, me):
            guarded._runner, guarded._depth = None, 0
    _release_after_fork()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(
        before=_acquire_for_fork,
        after_in_parent=_release_after_fork,
        after_in_child=_release_in_child,
    )


def _daemonized_by_us() -> bool:
    """Tell whether Daemonizer made this process (kept across re-exec)."""
    return os.environ.get(_DAEMON_ENV) == str(os.getpid())


def _import_optional(name: str) -> Optional[ModuleType]:
    """Return module `name`, or None where this platform lacks it."""
    try:
        return __import__(name)
    except ImportError:
        return None


def _pid_alive(pid: int) -> bool:
    """Tell whether process `pid` exists (a zombie counts as alive)."""
    if _WINDOWS:
        # os.kill(pid, 0) would terminate the process on Windows.
        import ctypes

        # Windows only: the checkers' stubs for other platforms lack it.
        kernel32 = getattr(ctypes, 'windll').kernel32  # noqa: B009
        handle = kernel32.OpenProcess(0x1000, False, pid)  # QUERY_LIMITED
        if not handle:
            return False
        kernel32.CloseHandle(handle)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, but owned by another user.
        return True
    except OSError:
        return False
    return True


def _open_fds(limit: int) -> Sequence[int]:
    """List this process's open descriptors below `limit`, cheaply.

    Listing /proc/self/fd (Linux) or /dev/fd (macOS, BSD) avoids looping
    over a huge SC_OPEN_MAX (CherryPy issue #2075).
    """
    for listing in ('/proc/self/fd', '/dev/fd'):
        try:
            return [int(fd) for fd in os.listdir(listing) if int(fd) < limit]
        except (OSError, ValueError):
            continue
    return range(limit)


def _readable(fds: Iterable[int], timeout: float) -> List[int]:
    """Return which of `fds` are readable (or closed) within `timeout` s.

    poll(), unlike select(), takes descriptors numbered 1024 and above,
    which a busy server has; select() is the fallback where poll is absent.
    """
    import select

    if not hasattr(select, 'poll'):
        return select.select(fds, [], [], timeout)[0]
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0, int(timeout * 1000 + 0.999)))]


# What this module must clean up when the process ends, also when it ends
# with os._exit() after a failed start or exit (which skips atexit): a PID
# file a restart() handed over, sockets kept for an exec that failed.
_owed_cleanups: List[Callable[[], None]] = []


def _clean_up_owed() -> None:
    while _owed_cleanups:
        try:
            _owed_cleanups.pop()()
        except Exception:
            pass


atexit.register(_clean_up_owed)


def _hard_exit(status: int) -> NoReturn:
    """Flush what the user would lose, then end the process at once."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_priority(value: object) -> bool:
    return _is_number(value) and value == value  # NaN sorts nowhere.


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_wait_interval(interval: float) -> None:
    """Refuse an interval a waiting loop cannot poll at (0 spins)."""
    if not (_is_number(interval) and 0 < interval <= threading.TIMEOUT_MAX):
        raise ValueError(
            'Invalid interval: %r (seconds, a finite number > 0)' % (interval,)
        )


def _is_finite_wait(seconds: float) -> bool:
    """Tell whether a number of seconds is one threading can wait.

    NaN makes a wait loop spin; inf and anything beyond TIMEOUT_MAX raise
    OverflowError in the waiting thread.
    """
    return -threading.TIMEOUT_MAX <= seconds <= threading.TIMEOUT_MAX


# -- Types --------------------------------------------------------------------
# For mypy and pyright only: the annotations are strings (from __future__
# import annotations), and what they name is imported here, which the
# program never runs.  The classes of this one file share private state
# (the bus's signals and kept descriptors), which pyright's strict mode
# would flag at each use:
# pyright: reportPrivateUsage=false

if TYPE_CHECKING:
    import argparse
    import asyncio
    import logging
    import socket
    from types import FrameType, ModuleType
    from typing import (
        IO,
        Any,
        Awaitable,
        Callable,
        Collection,
        Dict,
        FrozenSet,
        Iterable,
        Iterator,
        List,
        Mapping,
        MutableMapping,
        NoReturn,
        Optional,
        Sequence,
        Set,
        Tuple,
        TypeVar,
        Union,
        overload,
    )

    _T = TypeVar('_T')
    _Callback = TypeVar('_Callback', bound=Callable[..., Any])
    Listener = Callable[..., Any]
    SignalAction = Union[Callable[[int, Optional[FrameType]], Any], int, None]
    # A socket address listen() takes: a (host, port[, flowinfo, scope_id])
    # tuple, or an AF_UNIX path (bytes when the family is given).
    _Address = Union[str, bytes, Tuple[str, int], Tuple[str, int, int, int]]
    _Signature = Tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)
    # The file an AF_UNIX socket was bound to: absolute path, st_dev, st_ino.
    _SocketFile = Tuple[str, int, int]
    # A socket restart() hands over: name, descriptor, file, address asked.
    _HandedOver = Tuple[str, int, Optional[_SocketFile], Optional[str]]
    _Subscription = Tuple[str, Listener, Optional[int]]  # channel, priority
    _Zombie = Tuple[int, int]  # a zombie child's PID and start time


# -- States -------------------------------------------------------------------


class _State:
    """One state of the bus; compared by identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return 'states.%s' % self.name


class _States:
    """The namespace of bus states: ``states.STOPPED`` and friends."""

    # For type checkers only: __init__ sets them, on the instance.
    STOPPED: _State
    STARTING: _State
    STARTED: _State
    STOPPING: _State
    EXITING: _State

    def __init__(self, *names: str) -> None:
        for name in names:
            setattr(self, name, _State(name))


states = _States('STOPPED', 'STARTING', 'STARTED', 'STOPPING', 'EXITING')
"""The five states of a Bus, compared with ``is``."""


# -- Errors -------------------------------------------------------------------


class ChannelFailures(Exception):
    """The exceptions raised by the listeners of one publish.

    Truthy when it holds any; ``str()`` joins their reprs, one a line.
    """

    delimiter = '\n'
    """The text between two exceptions in ``str()``."""

    def __init__(self, *args: object, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._exceptions: List[BaseException] = []

    def handle_exception(self) -> None:
        """Record the exception being handled right now (if any)."""
        error = sys.exc_info()[1]
        if error is not None:
            self._exceptions.append(error)

    def get_instances(self) -> List[BaseException]:
        """Return a copy of the recorded exceptions, in raising order."""
        return self._exceptions[:]

    def __str__(self) -> str:
        return self.delimiter.join(map(repr, self._exceptions))

    __repr__ = __str__

    def __bool__(self) -> bool:
        return bool(self._exceptions)


# -- Bus ----------------------------------------------------------------------

_BUILTIN_CHANNELS = ('start', 'stop', 'exit', 'graceful', 'log', 'main')
_STOPPING = ('SIGTERM', 'SIGINT')  # A second one hurries an exit.
_STILL_WAITING_EVERY = 5.0  # Seconds between block()'s reports on threads.


class Bus:
    """A publish/subscribe hub that drives a process through its states.

    Channels: ``start``, ``stop``, ``exit``, ``graceful``, ``log`` and
    ``main`` exist from the start; any other name becomes a channel when
    something subscribes to it.  ``started`` (+) is published once every
    ``start`` listener has succeeded.  Listeners run in priority order
    (lower first, default 50), equal priorities in subscription order.

    Every method may be called from any thread, and from a signal handler.
    The transitions (start, stop, graceful, exit, restart) run one at a
    time: one asked for while another thread runs one waits for it (start,
    stop) or is run by that thread when it ends (exit, restart, graceful),
    and once an exit is asked for, no ``start`` or ``graceful`` listener
    runs any more.  The state lock is re-entrant and never held while a
    listener runs.  ``listeners`` maps each channel to its set of
    callbacks; treat it as read-only and change it through subscribe() and
    unsubscribe().
    """

    states: _States = states
    max_cloexec_files: int = _MAX_FILES
    """restart() marks descriptors below this close-on-exec; 0 skips it."""

    _wakeup_pipe: Tuple[int, int, int]  # restart()'s: read, write, previous

    def __init__(self) -> None:
        self.execv: bool = False
        """True once restart() was asked for: block() then re-executes."""
        self.listeners: Dict[str, Set[Listener]] = {
            channel: set() for channel in _BUILTIN_CHANNELS
        }
        self._priorities: Dict[Tuple[str, Listener], float] = {}
        # (channel, callback) -> subscription count
        self._order: Dict[Tuple[str, Listener], int] = {}
        # channel -> tuple of callbacks, cached
        self._sorted: Dict[str, Tuple[Listener, ...]] = {}
        self._count = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._state: _State = states.STOPPED
        # The transitions: which thread runs them, how deeply nested.
        self._runner: Optional[int] = None
        self._depth = 0
        self._exit_phase: Optional[str] = None  # 'asked', 'running', 'done'
        self._exit_asker: Optional[int] = None  # The thread that asked.
        self._graceful_asked = False  # Run graceful when the runner ends.
        # Why the last start() failed.
        self._start_error: Optional[BaseException] = None
        self._lives = 0  # How many start()s began.
        self._atexit_registered = False
        self._keep_fds: Set[int] = set()  # restart() must not close these
        # Signals: handlers append to _signals and release _wakeup (both
        # safe between any two bytecodes); the main thread acts on them.
        self._signals: List[str] = []
        # number -> name, from SignalHandler
        self._handled_signals: Dict[int, str] = {}
        # run_async()'s main task and its loop.
        self._main_task: Optional[asyncio.Future[Any]] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._driver: Optional[asyncio.Task[Any]] = None  # The bus's task.
        # Written when a signal is recorded, so that the loop wakes.
        self._loop_waker: Optional[socket.socket] = None
        self._wakeup = threading.Lock()
        self._wakeup.acquire()  # Locked: no wake-up pending.
        self._busy = 0  # >0 while the main thread transitions or waits.
        self._saved_sigint: SignalAction = None
        self._sigint_seen = False
        self._hurry = False  # A second SIGTERM/SIGINT while exiting.
        # Done once run_async() acted on _hurry.
        self._hurried: Optional[asyncio.Future[None]] = None
        self._exit_status = 0  # What a hurried interpreter exit returns.
        self._exit_hook_registered = False
        self._exit_interruptible = False  # Waiting as the interpreter ends.
        _guard_for_fork(self)

    def __repr__(self) -> str:
        return '<%s %r>' % (type(self).__name__, self._state)

    @property
    def state(self) -> _State:
        """The current state; setting it wakes every wait()."""
        return self._state

    @state.setter
    def state(self, value: _State) -> None:
        with self._changed:
            self._state = value
            self._changed.notify_all()
        self._wake()
        self._act_if_idle()

    if TYPE_CHECKING:  # subscribe() returns what it is given.

        @overload
        def subscribe(
            self,
            channel: str,
            callback: None = None,
            priority: Optional[float] = None,
        ) -> Callable[[_Callback], _Callback]: ...

        @overload
        def subscribe(
            self,
            channel: str,
            callback: _Callback,
            priority: Optional[float] = None,
        ) -> _Callback: ...

    def subscribe(
        self,
        channel: str,
        callback: Optional[_Callback] = None,
        priority: Optional[float] = None,
    ) -> Union[_Callback, Callable[[_Callback], _Callback]]:
        """Add `callback` to `channel`; lower `priority` runs first.

        Without `callback`, return a decorator.  The priority comes from
        the argument, else the callback's ``priority`` attribute if it is a
        number (a mock has every attribute), else 50.  Subscribing again
        only updates the priority.  Returns `callback`.
        """
        if callback is None:
            return lambda func: self.subscribe(channel, func, priority)
        if priority is None:
            attribute = getattr(callback, 'priority', 50)
            rank: float = attribute if _is_priority(attribute) else 50
        elif _is_priority(priority):
            rank = priority
        else:  # Refused here, else every publish() would fail.
            raise ValueError(
                'Invalid priority for %r: %r (a number)' % (callback, priority)
            )
        with self._lock:
            self.listeners.setdefault(channel, set()).add(callback)
            key = (channel, callback)
            self._priorities[key] = rank
            if key not in self._order:
                self._count += 1
                self._order[key] = self._count
            self._sorted.pop(channel, None)
        self._act_if_idle()
        return callback

    def unsubscribe(self, channel: str, callback: Listener) -> None:
        """Remove `callback` from `channel`; unknown ones are ignored."""
        with self._lock:
            listeners = self.listeners.get(channel)
            if listeners and callback in listeners:
                listeners.discard(callback)
                del self._priorities[(channel, callback)]
                del self._order[(channel, callback)]
                self._sorted.pop(channel, None)
        self._act_if_idle()

    def _listeners_now(self, channel: str) -> Tuple[Listener, ...]:
        listeners = self._sorted.get(channel)  # Cached: no lock.
        if listeners is None:
            listeners = self._listeners_of(channel)
        return listeners

    def _listeners_of(self, channel: str) -> Tuple[Listener, ...]:
        """Return (and cache) the channel's callbacks in running order."""
        with self._lock:
            callbacks = sorted(
                self.listeners.get(channel, ()),
                key=lambda cb: (
                    self._priorities[(channel, cb)],
                    self._order[(channel, cb)],
                ),
            )
            self._sorted[channel] = result = tuple(callbacks)
        self._act_if_idle()
        return result

    def publish(self, channel: str, *args: Any, **kwargs: Any) -> List[Any]:
        """Call every listener of `channel`; return their results.

        Every listener runs even if an earlier one fails; the failures are
        logged and raised together as ChannelFailures.  KeyboardInterrupt
        propagates at once, and so does SystemExit, its code made non-zero
        when an earlier listener had failed.  The listeners called are those
        subscribed when the publish began.
        """
        return self._call(channel, self._listeners_now(channel), args, kwargs)

    def _call(
        self,
        channel: str,
        listeners: Iterable[Listener],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        to_the_end: bool = False,
    ) -> List[Any]:
        """Call `listeners`; with `to_the_end` (cleanup), a SystemExit or
        KeyboardInterrupt is raised only once every listener has run."""
        output: List[Any] = []
        failures: Optional[ChannelFailures] = None
        interrupt: Optional[BaseException] = None
        # Most channels carry no arguments.  A plain call is ~25% faster:
        # CPython inlines it, but not a call through *args/**kwargs.
        plain = not (args or kwargs)
        for listener in listeners:
            try:
                if plain:
                    output.append(listener())
                else:
                    output.append(listener(*args, **kwargs))
            except (KeyboardInterrupt, SystemExit) as exc:
                if not to_the_end:
                    _exit_code_after(exc, failures)
                    raise
                interrupt = interrupt or exc
            except Exception:
                if failures is None:
                    failures = ChannelFailures()
                failures.handle_exception()
                if channel != 'log':  # A failing logger must not recurse.
                    self.log(
                        'Error in %r listener %r' % (channel, listener),
                        level=_ERROR,
                        traceback=True,
                    )
        if interrupt is not None:
            _exit_code_after(interrupt, failures)
            raise interrupt
        if failures:
            raise failures
        return output

    def _publish_until_exit(self, channel: str) -> List[Any]:
        """Publish `channel`, calling no listener once an exit is asked."""
        listeners = self._until_exit(self._listeners_now(channel))
        return self._call(channel, listeners, (), {})

    def _until_exit(self, listeners: Iterable[Listener]) -> Iterator[Listener]:
        for listener in listeners:
            if self._exit_phase is not None:
                return
            yield listener

    # -- Transitions --
    # One thread at a time runs them (the "runner"); its nested calls run
    # inline.  An exit, restart or graceful asked meanwhile is recorded and
    # run by the runner when its outermost transition ends.

    def start(self) -> None:
        """Move to STARTING, publish ``start``, then move to STARTED.

        If a listener fails (KeyboardInterrupt and SystemExit included),
        or itself calls exit(), log it, exit the bus and re-raise; on the
        main thread the process then ends with status 70.  An exit asked
        for by another thread meanwhile wins: the remaining ``start``
        listeners are skipped and the bus exits, never STARTED (a signal
        meanwhile is acted on once the start is done).  Ignored, with a log
        line, while an exit is under way, after a restart() that has not
        re-executed yet, and after an exit that came before any start (a
        SIGTERM during the program's set-up).  Otherwise a start after an
        exit begins a new life, as in CherryPy.
        """
        with self._lock:
            refused = self._start_refused()
        if refused:
            self.log('Start ignored: %s.' % refused)
        else:
            self._transition(self._start)

    def _start_refused(self) -> Optional[str]:
        """Why a start cannot begin now, or None (lock held)."""
        if self._exit_phase in ('asked', 'running'):
            return 'the bus is exiting'
        if self._exit_phase == 'done' and self.execv:
            return 'the process is about to re-execute'
        if self._exit_phase == 'done' and not self._lives:
            return 'the bus exited before it was started'
        return None

    def _start(self) -> None:
        with self._lock:
            refused = self._start_refused()  # Asked while we waited?
            if not refused:
                self._lives += 1
                self._exit_phase = None  # A new life: exit() may run again.
                self._start_error = None
                self._hurry = False
                if not self._atexit_registered:
                    atexit.register(self._clean_exit)
                    self._atexit_registered = True
        if refused:
            self.log('Start ignored: %s.' % refused)
            return
        self.state = states.STARTING
        self.log('Bus STARTING')
        try:
            self._publish_until_exit('start')
        except BaseException as error:
            # KeyboardInterrupt and SystemExit too: a half-started service
            # must be stopped now, not by atexit.
            self.log(
                'Shutting down due to error in start listener:',
                level=_ERROR,
                traceback=True,
            )
            self._start_error = error
            self._ask_exit()
            raise
        with self._changed:
            started = self._exit_phase is None
            if started:
                self._state = states.STARTED
                self._changed.notify_all()
        if not started:
            self.log('Start interrupted: the bus is exiting.')
            return
        self._wake()
        self.log('Bus STARTED')
        try:
            self.publish('started')
        except ChannelFailures:
            pass  # Logged by publish; the service is running regardless.
        _release_carried_signals(self)

    def stop(self) -> None:
        """Move to STOPPING, publish ``stop``, then move to STOPPED.

        Every ``stop`` listener runs.  Once an exit is under way (it stops
        the bus itself) this returns at once: a stop listener may join a
        worker that calls stop() without a deadlock.
        """
        if self._exit_phase is None:
            self._transition(self._stop_unless_exiting)
        else:
            self.log('Stop ignored: the bus is exiting.')

    def _stop_unless_exiting(self) -> None:
        if self._exit_phase is not None:  # Checked again: we may have waited.
            self.log('Stop ignored: the bus is exiting.')
        else:
            self._stop()

    def _stop(self) -> None:
        self.state = states.STOPPING
        self.log('Bus STOPPING')
        self.publish('stop')
        self.state = states.STOPPED
        self.log('Bus STOPPED')

    def graceful(self) -> None:
        """Publish ``graceful`` (reload without stopping the process).

        Asked for while another transition runs (a signal storm, another
        thread, a ``graceful`` listener), it runs once more when that one
        ends, so ``graceful`` listeners never overlap; asked for while
        STARTING, it runs once STARTED.  Ignored, with a log line, while the
        bus is stopped (a SIGUSR1 during set-up) and once an exit has begun;
        a run under way then calls no more listeners.
        """
        run_now = False
        with self._lock:
            if self._exit_phase is not None:
                ignored = 'the bus is exiting'
            elif self._state is states.STOPPED:
                ignored = 'the bus is not started'
            else:
                ignored = None
                self._graceful_asked = True
                run_now = (
                    self._runner is None and self._state is states.STARTED
                )
        if ignored:
            self.log('Graceful ignored: %s.' % ignored)
        elif run_now:
            self._transition(self._graceful, wait=False)
        self._act_if_idle()

    def _graceful(self) -> None:
        with self._lock:
            if not self._graceful_asked or self._exit_phase is not None:
                return  # Run by another thread meanwhile, or exiting.
            self._graceful_asked = False
        self.log('Bus graceful')
        self._publish_until_exit('graceful')

    def exit(self) -> None:
        """Stop, move to EXITING and publish ``exit``, once.

        A second call while an exit is asked for, under way or done returns
        at once.  Called while another transition runs (from another thread
        or from one of its listeners), the exit runs when that transition
        ends, and this call returns at once.  If the ``stop`` or ``exit``
        listeners fail, every ``exit`` listener still runs, then the process
        ends with status 70.  A start that fails or calls exit() from a
        ``start`` listener ends the process with status 70 after exiting,
        when on the main thread; elsewhere it logs the failure loudly.
        """
        if self._ask_exit() and not self._cancel_main_task():
            self._transition(_nothing, wait=False)
        self._act_if_idle()

    def _ask_exit(self, execv: bool = False) -> bool:
        """Record an exit request; False if one was already made."""
        with self._lock:
            if self._exit_phase is not None:
                return False
            self._exit_phase = 'asked'
            self._exit_asker = threading.get_ident()
            self.execv = execv or self.execv
        self._wake()
        return True

    def restart(self) -> None:
        """Exit, then re-execute the process from block() on the main thread.

        Ignored (with a log line) when an exit is already under way.
        """
        if self._ask_exit(execv=True):
            if not self._cancel_main_task():
                self._transition(_nothing, wait=False)
        else:
            self.log('Restart ignored: the bus is already exiting.')
        self._act_if_idle()

    def _transition(
        self, body: Callable[[], object], wait: bool = True
    ) -> None:
        """Run `body` as the bus's one transition, then what was asked.

        Without `wait`, return at once if another thread runs one (it will
        run what was asked when it ends).
        """
        main = self._begin_busy()
        try:
            if self._enter(wait):
                try:
                    body()
                finally:
                    self._leave()
        finally:
            self._end_busy(main)

    def _enter(self, wait: bool) -> bool:
        me = threading.get_ident()
        with self._changed:
            while self._runner not in (None, me):
                if not wait:
                    return False
                self._changed.wait()
            self._runner = me
            self._depth += 1
        return True

    def _leave(self) -> None:
        try:
            while True:
                with self._changed:
                    if self._depth > 1:  # Nested: the outermost decides.
                        self._depth -= 1
                        return
                    job = self._next_job()
                    if job is None:
                        self._depth = 0
                        self._runner = None
                        self._changed.notify_all()
                        return
                job()
        except BaseException:
            with self._changed:
                self._depth = 0
                self._runner = None
                self._changed.notify_all()
            raise

    def _next_job(self) -> Optional[Callable[[], None]]:
        """Return what the runner must do next, or None (lock held)."""
        if self._exit_phase == 'asked' and self._main_task is None:
            return self._run_exit  # (run_async() runs it after its task.)
        if self._graceful_asked:
            if self._exit_phase is None and self._state is states.STARTED:
                return self._asked_graceful
            if self._state is not states.STARTING:
                self._graceful_asked = False  # Dropped: stopped or exiting.
        return None

    def _asked_graceful(self) -> None:
        try:
            self._graceful()
        except ChannelFailures:
            pass  # Logged by publish; whoever asked has gone on.

    def _run_exit(self) -> None:
        with self._lock:
            self._exit_phase = 'running'
            exitstate = self._state
            asked_by_starter = self._exit_asker == threading.get_ident()
        failure: Optional[BaseException] = None
        try:
            self._stop()
        except BaseException as exc:  # Logged; the exit listeners run.
            failure = exc
        try:
            self.state = states.EXITING
            self.log('Bus EXITING')
            # Cleanup: a SystemExit in one skips none of the others.
            listeners = self._listeners_now('exit')
            self._call('exit', listeners, (), {}, to_the_end=True)
            self.log('Bus EXITED')
        except BaseException as exc:
            failure = failure or exc
        finally:
            with self._changed:
                self._exit_phase = 'done'
                self._changed.notify_all()
            self._wake()
        if isinstance(failure, (KeyboardInterrupt, SystemExit)):
            raise failure
        if failure is not None:
            self.log(
                'Exiting with status %d: the stop or exit listeners '
                'failed (see above).' % _EX_SOFTWARE,
                level=_CRITICAL,
            )
            _clean_up_owed()
            _hard_exit(_EX_SOFTWARE)
        if exitstate is states.STARTING and (
            self._start_error is not None or asked_by_starter
        ):
            self._start_failed()

    def _start_failed(self) -> None:
        reason = _describe(self._start_error)
        if threading.current_thread() is threading.main_thread():
            # A start listener failed: ending the process is the only way
            # to leave no half-started service behind.
            self.log(
                'Start failed (%s); exiting with status %d.'
                % (reason, _EX_SOFTWARE),
                level=_CRITICAL,
            )
            _clean_up_owed()
            _hard_exit(_EX_SOFTWARE)
        self.log(
            'The bus failed to start on thread %r (%s) and has '
            'exited; the host process goes on.'
            % (threading.current_thread().name, reason),
            level=_CRITICAL,
        )

    # -- Signals --
    # A signal handler runs on the main thread between any two bytecodes,
    # inside locked sections and listeners too.  While the main thread
    # transitions or waits (it is "busy"), the handler only records the
    # signal and wakes the waiter; the work runs when the transition ends
    # or in the waiting loop, one signal at a time, in arrival order.

    def _signal_arrived(self, channel: str) -> None:
        """Act on signal `channel` now, or record it if the main thread is
        busy; called by signal handlers (SignalHandler, SIGINT)."""
        self._sigint_seen = self._sigint_seen or channel == 'SIGINT'
        if channel in ('SIGTERM', 'SIGINT') and self._exit_interruptible:
            raise _ExitHurried  # Out of the interpreter's wait for threads.
        if self._hurries(channel):
            self._hurry = True
        elif (
            channel == 'SIGINT'
            and 'SIGINT' in self._signals
            and self._interruptible()
        ):
            # Ctrl+C again while the first waits for a transition or the
            # program's code on run_async()'s loop to give the thread back:
            # interrupt it, as Python would have (never an exit's cleanup).
            raise KeyboardInterrupt
        if (
            self._busy
            # RLock._is_owned() is private, and missing from the stubs.
            or self._lock._is_owned()  # type: ignore[attr-defined]
            or self._waits_for_plugins(channel)
        ):
            self._signals.append(channel)  # _lock: in mid-bookkeeping.
            self._wake()
            self._wake_loop()
            return
        main = self._begin_busy()
        try:
            self._act_on_signal(channel)
        finally:
            self._end_busy(main)

    def _interruptible(self) -> bool:
        """Tell whether a second Ctrl+C may interrupt what runs now.

        A transition, or the program's code on run_async()'s loop: not
        run_async() making its loop, nor its own driver task, whose end
        would skip the exit (the second Ctrl+C is recorded too).
        """
        if self._runner is not None:
            return True
        if self._main_task is None:
            return False
        import asyncio

        return asyncio.current_task(self._loop) is not self._driver

    def _hurries(self, channel: str) -> bool:
        """Tell whether signal `channel` is a second SIGTERM or Ctrl+C
        during an exit, which hurries it.

        A restart is no exit: its first SIGTERM or Ctrl+C is kept for the
        new image (_next_signal), which acts on it.
        """
        if channel not in _STOPPING or self._exit_phase is None:
            return False
        return not self.execv or any(s in _STOPPING for s in self._signals)

    def _act_on_signal(self, channel: str) -> None:
        self.log('Caught signal %s.' % channel)
        if channel == 'SIGINT' and not self.listeners.get('SIGINT'):
            self.log('Keyboard Interrupt: shutting down bus')
            self.exit()
            return
        try:
            self.publish(channel)
        except ChannelFailures:
            pass  # Logged by publish; the process goes on.

    def _act_on_recorded_signals(self) -> None:
        channel = self._next_signal()
        while channel is not None:
            self._signals.remove(channel)
            self._act_on_signal(channel)
            channel = self._next_signal()

    def _next_signal(self) -> Optional[str]:
        """The first recorded signal to act on now, if any."""
        if self.execv or not self._signals:  # execv: for the new image.
            return None
        for channel in list(self._signals):
            if not self._waits_for_plugins(channel):
                return channel
        return None

    @staticmethod
    def _waits_for_plugins(channel: str) -> bool:
        # A new image that restart() executed acts on a SIGHUP or SIGUSR1
        # once its plugins have taken back what the old image handed over
        # (_release_carried_signals); a SIGTERM never waits: its set-up may
        # hang (a database that is down).
        return bool(_held) and channel not in ('SIGTERM', 'SIGINT')

    def _act_if_idle(self) -> None:
        """Act on signals recorded while the main thread held the lock."""
        if (
            not self._busy
            and self._next_signal() is not None
            and threading.current_thread() is threading.main_thread()
        ):
            self._end_busy(self._begin_busy())

    def _wake(self) -> None:
        """Wake the main thread's waiting loop (safe in a signal handler)."""
        try:
            self._wakeup.release()
        except RuntimeError:
            pass  # Released already: a wake-up is pending.

    def _wake_loop(self) -> None:
        """Wake run_async()'s loop (safe in a signal handler).

        The wakeup fd alone is not enough: the program may take it
        (loop.add_signal_handler(), signal.set_wakeup_fd()).
        """
        waker = self._loop_waker
        if waker is not None:
            try:
                waker.send(b'\0')
            except OSError:
                pass  # Full (a wake-up is pending), or closed just now.

    def _begin_busy(self, defer_sigint: bool = True) -> bool:
        """Mark the main thread busy; return whether this is it."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._busy += 1
        if self._busy == 1 and defer_sigint:
            self._defer_sigint()
        return True

    def _end_busy(self, main: bool) -> None:
        """The outermost busy section acts on what was recorded meanwhile."""
        if not main:
            return
        try:
            if self._busy == 1:
                self._act_on_recorded_signals()
        finally:
            self._busy -= 1
            if not self._busy:
                self._restore_sigint()
        if not self._busy and self._next_signal() is not None:
            self._end_busy(self._begin_busy())  # Came in the last moment.

    def _defer_sigint(self) -> None:
        # Python's default SIGINT handler raises KeyboardInterrupt in the
        # middle of whatever runs, a stop or exit listener too; while busy,
        # Ctrl+C is recorded like any other signal (and means exit()).  In
        # a re-executed image the carried signals' hold stands in for it
        # until released (which re-raises a held Ctrl+C, recorded then).
        if _signal.getsignal(_signal.SIGINT) in (
            _signal.default_int_handler,
            _hold,
        ):
            _signal.signal(_signal.SIGINT, self._record_sigint)
            self._saved_sigint = _signal.default_int_handler

    def _restore_sigint(self) -> None:
        if self._sigint_seen and self._exit_phase == 'done':
            return  # Ctrl+C ended it: never interrupt the program's cleanup.
        # Taken in one step: a signal handled in between restores it too.
        saved, self._saved_sigint = self._saved_sigint, None
        if saved is not None:
            if _signal.getsignal(_signal.SIGINT) == self._record_sigint:
                _signal.signal(_signal.SIGINT, saved)

    def _record_sigint(
        self, signum: Optional[int] = None, frame: Optional[FrameType] = None
    ) -> None:
        self._signal_arrived('SIGINT')

    # -- Waiting --

    def block(self, interval: float = 0.1) -> None:
        """Wait for EXITING, then for every non-daemon thread; re-exec.

        Call it from the main thread; signals are acted on from here.
        KeyboardInterrupt or SystemExit while waiting exits the bus.
        Returns only after the ``exit`` listeners have finished, whichever
        thread ran them (CherryPy issue #1942).  Idle ``concurrent.futures``
        and asyncio executor threads are not waited for (the interpreter
        stops them at exit); other non-daemon threads are, with a log line
        every few seconds; a second SIGTERM or Ctrl+C stops that wait (and
        the interpreter's, after this returns, for running executor work).
        ``main`` is published every `interval` seconds while waiting; an
        `interval` that is not a finite number > 0 is a ValueError.
        """
        _check_wait_interval(interval)
        main = self._begin_busy()
        try:
            _release_carried_signals(self)
            try:
                self._wait_for(
                    lambda: self._state is states.EXITING, interval, 'main'
                )
            except (KeyboardInterrupt, OSError):
                self.log('Keyboard Interrupt: shutting down bus')
                self.exit()
            except SystemExit:
                self.log('SystemExit raised: shutting down bus')
                self.exit()
                raise
            # EXITING set directly, with no exit(), passes.
            self._wait_for(
                lambda: self._exit_phase not in ('asked', 'running'),
                interval,
            )
            self._after_exit()
        finally:
            self._end_busy(main)

    def _after_exit(self, status: int = 0) -> None:
        """Join the threads left, then re-execute or end as asked (with
        `status` if hurried)."""
        self.log('Waiting for child threads to terminate...')
        left = self._join_threads()
        if self.execv and not left:
            left = self._end_executors()
        if self.execv:
            self._do_execv()  # Signals recorded meanwhile go along.
        if left:
            self._hurried_exit(left, status)
        self._exit_status = status
        self._hurry_interpreter_exit()

    def _hurry_interpreter_exit(self) -> None:
        """Let a second SIGTERM or Ctrl+C cut short the interpreter's own
        wait for running executor work, after block() has returned."""
        if self._exit_hook_registered:
            return
        # Run before concurrent.futures' own wait: Python 3.9+ calls these
        # hooks in reverse order before joining threads; 3.8 uses atexit.
        register = getattr(threading, '_register_atexit', atexit.register)
        try:
            register(self._end_executors_at_exit)
        except RuntimeError:
            return  # The interpreter's exit has begun already.
        self._exit_hook_registered = True

    def _end_executors_at_exit(self) -> None:
        """Wait for running executor work here, on the main thread, as the
        interpreter would next (Python 3.12 starts no thread any more); a
        second SIGTERM or Ctrl+C interrupts the wait and ends the process.
        """
        try:
            self._exit_interruptible = True
            try:
                if self._hurry:  # Hurried already (run_async()'s wait).
                    raise _ExitHurried
                for end in _executor_ends():
                    end()
            finally:
                self._exit_interruptible = False
        except (_ExitHurried, KeyboardInterrupt):
            left = [t for t in threading.enumerate() if _is_pool_thread(t)]
            if hasattr(threading, '_register_atexit'):  # Joined next.
                self._hurried_exit(left, self._exit_status)
            self.log(  # Python 3.8: daemon workers, joined by atexit.
                'Not waiting for threads %s: exiting now.'
                % ', '.join(t.name for t in left),
                level=_WARNING,
            )
            for end in _executor_ends():
                atexit.unregister(end)

    def _join_threads(self) -> List[threading.Thread]:
        """Join the non-daemon threads; return those left when hurried."""
        current = threading.current_thread()
        on_main = current is threading.main_thread()
        waiting = [
            thread
            for thread in threading.enumerate()
            if not (
                thread is current
                or thread.daemon
                or thread is threading.main_thread()
                or _is_pool_thread(thread)
            )
        ]
        for thread in waiting:
            self.log('Waiting for thread %s.' % thread.name)
        report_at = time.monotonic() + _STILL_WAITING_EVERY
        while waiting:
            waiting[0].join(0.05)
            waiting = [thread for thread in waiting if thread.is_alive()]
            if on_main:
                self._act_on_recorded_signals()
            if self._hurry:
                return waiting
            if waiting and time.monotonic() >= report_at:
                report_at += _STILL_WAITING_EVERY
                self.log(
                    'Still waiting for threads: %s.'
                    % ', '.join(thread.name for thread in waiting),
                    level=_WARNING,
                )
        return []

    def _end_executors(self) -> List[threading.Thread]:
        """Let executor workers finish their work, as the interpreter does
        at exit (an exec skips that); return them if hurried meanwhile."""
        ends = _executor_ends()
        ender = threading.Thread(
            target=lambda: [end() for end in ends],
            name='ending executors',
            daemon=True,
        )
        ender.start()
        while ender.is_alive():
            ender.join(0.05)
            if self._hurry:
                return [t for t in threading.enumerate() if _is_pool_thread(t)]
        return []

    def _hurried_exit(
        self, threads: Iterable[threading.Thread], status: int = 0
    ) -> NoReturn:
        # Python would wait for these threads again at its own shutdown.
        self.log(
            'Not waiting for threads %s: exiting now.'
            % ', '.join(t.name for t in threads),
            level=_WARNING,
        )
        run_exitfuncs = getattr(atexit, '_run_exitfuncs', None)
        if run_exitfuncs is not None:
            run_exitfuncs()
        _hard_exit(status)

    # -- asyncio --
    # run_async() drives an event loop over the bus's own transitions: the
    # loop is one more thing that waits for the exit.  While its main task
    # runs, exit() cancels that task instead of running the exit, and the
    # driver runs the exit once the task has finished its own cleanup.
    # Before that cancel, the bus publishes ``_drain`` on the loop; its
    # listeners (ProbeFiles) may return seconds the task serves on.

    def run_async(
        self, main: Awaitable[_T], interval: float = 0.1
    ) -> Optional[_T]:
        """Start the bus, run coroutine `main` on a new event loop; return
        its result.

        Call it from the main thread, in place of start() and block().
        Before the bus starts: `main` that is not awaitable (``main`` for
        ``main()``, say) is a TypeError, a bad `interval` a ValueError, and
        a running event loop a RuntimeError.
        SignalHandler's signals (and Ctrl+C) are recorded as under block()
        and acted on by the loop, between two callbacks, never nested; a
        restart carries them to the new image.  exit() from anywhere (a
        signal, another thread, a listener) cancels the main task; once it
        has finished (its ``finally`` blocks too), the bus runs its ``stop``
        and ``exit`` listeners, cancels the tasks left and waits for them,
        shuts the default executor down and waits for its running work (as
        asyncio.run() does), closes the loop, and re-executes if restart()
        was asked for.  A second SIGTERM or Ctrl+C during that cleanup
        cancels the main task's and waits no more; the ``exit`` listeners
        still run.  ``main`` is published every `interval` seconds.  An
        exception in `main` (or a CancelledError no exit asked for, or a
        loop.stop()) is logged, and the process then exits with status 1
        (SystemExit).  SystemExit or KeyboardInterrupt raised in a task or
        a ``stop``/``exit`` listener is an exit() too: once the bus has
        exited, the SystemExit is raised again (its status kept), and
        a KeyboardInterrupt returns None, as Ctrl+C does.
        """
        import asyncio

        refused = self._refuse_run_async(main, interval)
        if refused is not None:  # Before a start listener forks.
            self._never_run(main)
            raise refused
        # Signals are recorded from here: one just after start() returns
        # must not run the exit inside the code it interrupts.
        main_thread = self._begin_busy()
        try:
            try:
                self.start()
            except BaseException:
                self._never_run(main)
                raise
            self._hurried = None
            loop = asyncio.new_event_loop()
            # First thing, act on those recorded since the bus was busy.
            loop.call_soon(self._act_on_loop_signals)
            try:
                asyncio.set_event_loop(loop)
                restore = self._loop_signals(loop)
                try:
                    drive = loop.create_task(self._drive(loop, main, interval))
                    escaped = self._run_driver(loop, drive)
                    failed, result, interrupt = drive.result()
                finally:
                    restore()
            finally:
                asyncio.set_event_loop(None)
                loop.close()
            failed = failed or isinstance(escaped, Exception)
            self._after_exit(1 if failed else 0)
        finally:
            self._end_busy(main_thread)
        interrupt = escaped or interrupt
        if isinstance(interrupt, SystemExit):
            raise interrupt  # With its status, as block() does.
        if failed:
            raise SystemExit(1)
        return result

    @staticmethod
    def _refuse_run_async(
        main: object, interval: float
    ) -> Optional[Exception]:
        """The error that run_async(main, interval) must raise, if any."""
        import asyncio
        import inspect  # (asyncio imports it.)

        if not inspect.isawaitable(main):
            return TypeError(
                'run_async() needs an awaitable, such as main(), not %r'
                % (main,)
            )
        try:
            _check_wait_interval(interval)
        except ValueError as exc:
            return exc
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None  # None running, as it must be.
        return RuntimeError(
            'run_async() cannot be called from a running event loop'
        )

    def _run_driver(
        self, loop: asyncio.AbstractEventLoop, drive: asyncio.Task[Any]
    ) -> Optional[BaseException]:
        """Run `drive` to its end; return the first exception that stopped
        the loop meanwhile.

        asyncio lets SystemExit and KeyboardInterrupt out of
        run_until_complete() at once, and a loop.stop() from the program
        makes it raise RuntimeError, leaving `drive` suspended: take each
        as an exit() (as block() does) and run the loop on, so the bus still
        exits and cleans up.
        """
        escaped: Optional[BaseException] = None
        while True:
            try:
                loop.run_until_complete(drive)
                return escaped
            except BaseException as exc:
                if drive.done():
                    raise  # The driver's own: nothing is left to run.
                escaped = escaped or exc
                if isinstance(exc, SystemExit):
                    self.log('SystemExit raised: shutting down bus')
                elif isinstance(exc, KeyboardInterrupt):
                    self.log('Keyboard Interrupt: shutting down bus')
                else:
                    self.log('Error in the event loop:', _ERROR, True)
                self.exit()

    async def _drive(
        self,
        loop: asyncio.AbstractEventLoop,
        main: Awaitable[_T],
        interval: float,
    ) -> Tuple[bool, Optional[_T], Optional[BaseException]]:
        import asyncio

        tick = loop.call_later(interval, self._tick, loop, interval)
        failed, result, interrupt = await self._run_main(loop, main)
        self._ask_exit()
        try:
            self._transition(_nothing, wait=False)
        except (KeyboardInterrupt, SystemExit) as exc:
            # From a stop or exit listener, after every exit listener ran:
            # cleaned up, then raised or returned as block() does.
            interrupt = interrupt or exc
        while self._exit_phase != 'done':  # Run by a thread's transition.
            await asyncio.sleep(0.01)
        tick.cancel()
        await self._cancel_leftover_tasks()
        await loop.shutdown_asyncgens()
        await self._end_default_executor(loop)
        return failed, result, interrupt

    async def _end_default_executor(
        self, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Shut `loop`'s default executor down; wait for work still running
        (as asyncio.run() does), so that its result finds the loop open,
        until hurried.  Idle workers end at once."""
        import asyncio

        executor = getattr(loop, '_default_executor', None)
        if executor is None:
            return
        if sys.version_info >= (3, 9):
            executor.shutdown(wait=False, cancel_futures=True)
        else:
            executor.shutdown(wait=False)
        threads = getattr(executor, '_threads', ())
        while not self._hurry and any(t.is_alive() for t in threads):
            await asyncio.sleep(0.05)

    def _make_main_task(
        self, loop: asyncio.AbstractEventLoop, main: Awaitable[_T]
    ) -> Optional[asyncio.Future[_T]]:
        """Return `main`'s task, or None if an exit came first.

        Made under the lock: an exit() from another thread either comes
        first, or finds the task to cancel.
        """
        import asyncio

        with self._lock:
            if self._exit_phase is None:  # Else start() was cut short.
                task = asyncio.ensure_future(main)
                self._main_task, self._loop = task, loop
                self._driver = asyncio.current_task(loop)
                return task
        self._never_run(main)
        return None

    async def _run_main(
        self, loop: asyncio.AbstractEventLoop, main: Awaitable[_T]
    ) -> Tuple[bool, Optional[_T], Optional[BaseException]]:
        """Run `main` as the main task; return (failed, result, interrupt)."""
        import asyncio

        task = self._make_main_task(loop, main)
        if task is None:
            return False, None, None
        hurried = self._hurried = loop.create_future()
        try:
            await asyncio.wait({task, hurried}, return_when='FIRST_COMPLETED')
        finally:
            with self._lock:
                self._main_task = None
        if not task.done():  # A second signal: wait no more, as block().
            task.cancel()  # Awaited with the tasks left, until hurried.
            return False, None, None
        return self._main_outcome(task)

    def _main_outcome(
        self, task: asyncio.Future[Any]
    ) -> Tuple[bool, Any, Optional[BaseException]]:
        """Return (failed, result, interrupt) of the finished main task."""
        import asyncio

        try:
            return False, task.result(), None
        except asyncio.CancelledError:
            if self._exit_phase is not None:
                return False, None, None  # exit() asked for it.
            self.log('Error in the main task:', _ERROR, traceback=True)
            return True, None, None  # As asyncio.run() fails.
        except (KeyboardInterrupt, SystemExit) as exc:
            return False, None, exc  # _run_driver() has asked for the exit.
        except Exception:
            self.log('Error in the main task:', _ERROR, traceback=True)
            return True, None, None

    @staticmethod
    def _never_run(main: Awaitable[Any]) -> None:
        """Close `main` if it is a coroutine, so that Python does not warn
        that it was never awaited (it will not be)."""
        import asyncio

        if asyncio.iscoroutine(main):
            main.close()

    def _tick(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        loop.call_later(interval, self._tick, loop, interval)
        try:
            self.publish('main')
        except ChannelFailures:
            pass  # Logged by publish; asyncio need not print it again.
        self._act_on_loop_signals()  # If nothing woke it (Windows, say).

    async def _cancel_leftover_tasks(self) -> None:
        """Cancel the tasks left and wait for them, naming them as block()
        names threads, until hurried."""
        import asyncio

        current = asyncio.current_task()
        pending: Collection[asyncio.Task[Any]]
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        report_at: Optional[float] = None  # None: not reported yet.
        while pending:
            done, pending = await asyncio.wait(pending, timeout=0.1)
            self._log_task_errors(done)
            if pending and self._hurry:
                self._abandon_tasks(pending)
                return
            if pending and (report_at is None or time.monotonic() > report_at):
                self._log_waiting_for(pending, first=report_at is None)
                report_at = time.monotonic() + _STILL_WAITING_EVERY

    def _log_task_errors(self, tasks: Iterable[asyncio.Task[Any]]) -> None:
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                self.log(
                    'Error in task %r: %s: %s'
                    % (task, type(exc).__name__, exc),
                    level=_ERROR,
                )

    def _log_waiting_for(
        self, tasks: Collection[asyncio.Task[Any]], first: bool
    ) -> None:
        if first:
            for task in tasks:
                self.log('Waiting for task %r.' % task)
        else:
            self.log(
                'Still waiting for tasks: %s.' % ', '.join(map(repr, tasks)),
                level=_WARNING,
            )

    def _abandon_tasks(self, tasks: Collection[asyncio.Task[Any]]) -> None:
        self.log(
            'Not waiting for tasks %s: exiting now.'
            % ', '.join(map(repr, tasks)),
            level=_WARNING,
        )
        for task in tasks:  # Left on purpose: no "destroyed but pending".
            task._log_destroy_pending = False  # type: ignore[attr-defined]

    def _loop_signals(
        self, loop: asyncio.AbstractEventLoop
    ) -> Callable[[], None]:
        """Wake `loop` when a signal comes; return an undo.

        The handlers stay in place: the main thread is busy, so they record
        the signal as under block(), and a restart carries what is left
        (asyncio's own handlers would set SIG_DFL on removal, and drop what
        they had not delivered).  The wakeup fd, written on any thread,
        and the handler itself (_wake_loop: the program may take the fd)
        wake the loop, which then drains the queue (_act_on_loop_signals).
        """
        import socket  # (asyncio imports it.)

        if threading.current_thread() is not threading.main_thread():
            return _nothing  # Only the main thread gets signals.
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        try:
            loop.add_reader(reader.fileno(), self._loop_woken, reader)
        except NotImplementedError:  # Windows' proactor: _tick drains.
            reader.close()
            writer.close()
            return _nothing
        # Bytes left unread carry nothing: the queue is _signals.
        previous = _signal.set_wakeup_fd(
            writer.fileno(), warn_on_full_buffer=False
        )
        self._loop_waker = writer

        def restore() -> None:
            self._loop_waker = None  # Before it closes.
            _signal.set_wakeup_fd(previous)
            loop.remove_reader(reader.fileno())
            reader.close()
            writer.close()

        return restore

    def _loop_woken(self, reader: socket.socket) -> None:
        try:
            reader.recv(4096)
        except OSError:
            pass  # Read by an earlier call.
        self._act_on_loop_signals()

    def _act_on_loop_signals(self) -> None:
        """Act on the signals recorded meanwhile, between two callbacks;
        a second SIGTERM or Ctrl+C during the exit first hurries it."""
        hurried = self._hurried
        if self._hurry and hurried is not None and not hurried.done():
            self.log('Caught a second SIGTERM or Ctrl+C: hurrying.')
            hurried.set_result(None)  # _run_main() waits no more.
        self._act_on_recorded_signals()

    def _cancel_main_task(self) -> bool:
        """Under run_async(), an exit first cancels the main task."""
        with self._lock:
            task, loop = self._main_task, self._loop
        if task is None or loop is None:  # (A task comes with its loop.)
            return False
        if loop.is_closed():  # run_async() was cut short: exit here.
            return False
        loop.call_soon_threadsafe(self._drain_main_task, loop, task)
        return True

    def _drain_main_task(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Future[Any]
    ) -> None:
        """Cancel the main task, after the longest drain that the
        ``_drain`` listeners return (ProbeFiles: the service goes on
        serving while the orchestrator stops routing to it).

        A second SIGTERM or Ctrl+C (_act_on_loop_signals) cancels it at
        once.
        """
        try:
            drains = self.publish('_drain')
        except ChannelFailures:
            drains = []  # Logged by publish: no drain.
        seconds = max([0.0] + [s for s in drains if _is_number(s)])
        if seconds > 0 and not self._hurry:
            loop.call_later(seconds, self._end_drain, task)
        else:
            task.cancel()

    def _end_drain(self, task: asyncio.Future[Any]) -> None:
        if not self._hurry:  # Else cancelled already, when hurried.
            task.cancel()

    def wait(
        self,
        state: Union[
            _State,
            Tuple[_State, ...],
            List[_State],
            Set[_State],
            FrozenSet[_State],
        ],
        interval: float = 0.1,
        channel: Optional[str] = None,
    ) -> None:
        """Block until the bus is in `state` (or any of a sequence of them).

        Returns as soon as the state is reached; meanwhile publishes
        `channel` every `interval` seconds.  On the main thread, signals
        are acted on from here, and Ctrl+C raises KeyboardInterrupt.
        """
        wanted: Collection[_State]
        if isinstance(state, (tuple, list, set, frozenset)):
            wanted = frozenset(state)
        else:
            wanted = (state,)
        main = self._begin_busy(defer_sigint=False)  # Ctrl+C interrupts.
        try:
            _release_carried_signals(self)
            self._wait_for(lambda: self._state in wanted, interval, channel)
        finally:
            self._end_busy(main)

    def _wait_for(
        self,
        predicate: Callable[[], bool],
        interval: float,
        channel: Optional[str] = None,
    ) -> None:
        """Wait until predicate(); publish `channel` every `interval` s."""
        on_main = threading.current_thread() is threading.main_thread()
        next_tick = time.monotonic() + interval
        while True:
            if on_main:
                self._act_on_recorded_signals()
            if predicate():
                return
            remaining = next_tick - time.monotonic()
            if remaining <= 0:
                if channel is not None:
                    self.publish(channel)
                next_tick = time.monotonic() + interval
                continue
            remaining = min(remaining, threading.TIMEOUT_MAX)
            if on_main:  # A signal handler can release this lock.
                self._wakeup.acquire(timeout=remaining)
            else:
                with self._changed:
                    if not predicate():
                        self._changed.wait(remaining)

    def start_with_callback(
        self,
        func: Callable[..., object],
        args: Optional[Iterable[Any]] = None,
        kwargs: Optional[Mapping[str, Any]] = None,
    ) -> threading.Thread:
        """Start the bus and call ``func(*args, **kwargs)`` once STARTED.

        The call runs in a new thread, which is returned; it is skipped if
        the start fails.
        """
        args = () if args is None else tuple(args)
        kwargs = {} if kwargs is None else kwargs

        def when_started() -> None:
            if self._state is states.STARTED:
                func(*args, **kwargs)

        thread = threading.Thread(target=when_started)
        thread.name = 'Bus Callback ' + thread.name
        self.start()  # Raises if the start fails (off the main thread).
        thread.start()
        return thread

    def log(
        self, msg: str = '', level: int = _INFO, traceback: bool = False
    ) -> None:
        """Publish `msg` on ``log`` with a `level` number (logging's).

        With `traceback`, the exception being handled is appended.  A log
        listener that fails is reported on stderr, never raised.
        """
        if traceback:
            import traceback as _traceback

            msg += '\n' + ''.join(_traceback.format_exception(*sys.exc_info()))
        try:
            self.publish('log', msg, level)
        except ChannelFailures as failures:
            try:
                sys.stderr.write(
                    'wspbus: a log listener failed (%s) on: %s\n'
                    % (failures, msg)
                )
            except Exception:
                pass

    def _clean_exit(self) -> None:
        """At interpreter exit, exit a bus that was left running."""
        if self._exit_phase is None and self._state is not states.EXITING:
            import warnings  # Here: most programs never need it.

            warnings.warn(
                'The main thread is exiting, but the Bus is in the %r state; '
                'shutting it down automatically now. You must either call '
                'bus.block() after start(), or call bus.exit() before the '
                'main thread exits.' % self._state,
                RuntimeWarning,
                stacklevel=2,
            )
            self.exit()

    # -- Re-execution (restart) --

    def _do_execv(self) -> NoReturn:
        """Replace the process with a fresh run of the same command."""
        try:
            args = self._get_true_argv()
        except NotImplementedError:
            args = [sys.executable] + self._get_interpreter_argv() + sys.argv
        self.log('Re-spawning %s' % ' '.join(args))
        self._extend_pythonpath(os.environ)
        if _JYTHON:
            # Jython's own module, which no type checker knows.
            raise __import__('_systemrestart').SystemRestart
        if _WINDOWS:
            args = ['"%s"' % arg for arg in args]
        carried = self._carry_signals()
        if _STARTUP_DIR is not None:
            try:
                os.chdir(_STARTUP_DIR)
            except OSError as exc:  # Privileges dropped since, say.
                self.log(
                    'Re-executing from %r: cannot return to the start-up '
                    'directory (%s).' % (os.getcwd(), exc),
                    level=_WARNING,
                )
        if self.max_cloexec_files:
            self._set_cloexec()
        try:
            # Last: while this thread blocks them, other threads take
            # them, and the exec kills a thread before its handler has
            # recorded the signal if the scheduler stops it just then.
            if carried and _sigmask is not None:
                _sigmask(_signal.SIG_BLOCK, carried)
            while self._raise_recorded_signal():  # One may have come.
                pass
            os.execv(sys.executable, args)
        except BaseException as exc:  # This image goes on, for a while.
            os.environ.pop(_CARRIED_ENV, None)
            if carried and _sigmask is not None:  # (None carries nothing.)
                read_end, write_end, previous = self._wakeup_pipe
                _signal.set_wakeup_fd(previous)
                _close_quietly(read_end)
                _close_quietly(write_end)
                _sigmask(_signal.SIG_UNBLOCK, carried)
            if not isinstance(exc, OSError):
                raise
            self.log(  # The interpreter is gone, say (an upgrade).
                'Cannot re-execute %s (%s); exiting with status %d.'
                % (sys.executable, exc, _EX_SOFTWARE),
                level=_CRITICAL,
            )
            raise SystemExit(_EX_SOFTWARE) from None

    def _carry_signals(self) -> List[int]:
        """Name the signals to keep pending across the exec; return them.

        Without this, a SIGHUP, SIGTERM or Ctrl+C arriving during the
        re-exec, before the new image installs its handlers, would kill it.
        They are blocked just before the exec; those recorded and not yet
        acted on are raised again then, so that they stay pending.
        """
        handled = set(self._handled_signals)
        if callable(_signal.getsignal(_signal.SIGINT)):
            handled.add(_signal.SIGINT)  # Python's or ours: Ctrl+C counts.
        if _sigmask is None or not handled:
            return []
        carried = sorted(handled)
        # While this thread blocks them, other threads take them; Python
        # would then run the handler on this thread, maybe too late.  The
        # wakeup pipe, which the new image inherits, keeps their numbers.
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._keep_across_exec(read_end)
        self._wakeup_pipe = (read_end, write_end, _signal.set_wakeup_fd(-1))
        _signal.set_wakeup_fd(write_end)
        os.environ[_CARRIED_ENV] = '%s/%d' % (
            ' '.join('%d' % n for n in carried),
            read_end,
        )
        return carried

    def _raise_recorded_signal(self) -> bool:
        # A Python call: a signal another thread took since is recorded by
        # the time this runs.  (Those it takes after the last call are
        # lost: only the main thread blocks them.)
        if not self._signals or _sigmask is None:
            return False
        signum = getattr(_signal, self._signals.pop(0))
        _signal.pthread_kill(_main_thread_id(), signum)
        return True

    @staticmethod
    def _get_interpreter_argv() -> List[str]:
        """Return the interpreter options (-X, -W, -O ...) of this run."""
        if getattr(sys, 'frozen', False):
            return []
        import subprocess

        # Private to subprocess (Python 3.3+), so missing from the stubs.
        name = '_args_from_interpreter_flags'
        flags: List[str] = getattr(subprocess, name)()
        return flags

    @staticmethod
    def _get_true_argv() -> List[str]:
        """Return the command line that started this process.

        Uses ``sys.orig_argv`` (Python 3.10+), else rebuilds it from the
        interpreter flags, ``__main__.__spec__`` (for ``-m``) and
        ``sys.argv``.  The first item is always ``sys.executable``.  Raises
        RuntimeError for ``-c``, stdin and interactive sessions, whose code
        cannot be run again.
        """
        if getattr(sys, 'frozen', False):
            return [sys.executable] + sys.argv[1:]
        orig_argv = getattr(sys, 'orig_argv', None)
        if orig_argv:
            _check_rerunnable(orig_argv[1:])
            return [sys.executable] + list(orig_argv[1:])
        main_spec = getattr(sys.modules.get('__main__'), '__spec__', None)
        flags = Bus._get_interpreter_argv()
        if main_spec is not None and main_spec.name:
            module = main_spec.name
            if module.endswith('.__main__'):
                module = module[: -len('.__main__')]
            return [sys.executable] + flags + ['-m', module] + sys.argv[1:]
        if not sys.argv or sys.argv[0] in ('', '-', '-c'):
            _check_rerunnable(sys.argv[:1] or [''])
        return [sys.executable] + flags + sys.argv

    @staticmethod
    def _extend_pythonpath(env: MutableMapping[str, str]) -> None:
        """Put '.' on PYTHONPATH when sys.path[0] is '' (as tornado does).

        An empty first path entry means the current directory; the re-run
        starts in the start-up directory and must find the same modules.
        """
        prefix = '.' + os.pathsep
        existing = env.get('PYTHONPATH', '')
        if sys.path and sys.path[0] == '' and not existing.startswith(prefix):
            env['PYTHONPATH'] = prefix + existing

    def _keep_across_exec(self, fd: int) -> None:
        """Hand `fd` to the image restart() is about to execute."""
        os.set_inheritable(fd, True)
        self._keep_fds.add(fd)

    def _set_cloexec(self) -> None:
        """Mark every descriptor above stderr close-on-exec."""
        for fd in _open_fds(self.max_cloexec_files):
            if fd > 2 and fd not in self._keep_fds:
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    pass  # Closed meanwhile (the listing's own descriptor).


def _nothing() -> None:
    pass


def _exit_code_after(
    exc: BaseException, failures: Optional[ChannelFailures]
) -> None:
    """Make a SystemExit's success code 1 after a listener failed."""
    if isinstance(exc, SystemExit) and failures and exc.code in (None, 0):
        exc.code = 1


def _is_pool_thread(thread: threading.Thread) -> bool:
    """Tell whether `thread` serves a concurrent.futures executor.

    Idle workers wait for work forever (CherryPy #1942); the interpreter's
    own shutdown ends them, so block() need not wait for them.
    """
    pool = sys.modules.get('concurrent.futures.thread')
    worker = getattr(pool, '_worker', None)
    if worker is not None and getattr(thread, '_target', None) is worker:
        return True
    processes = sys.modules.get('concurrent.futures.process')
    manager = getattr(processes, '_ExecutorManagerThread', None)
    return manager is not None and isinstance(thread, manager)


def _executor_ends() -> List[Callable[[], None]]:
    """The hooks by which concurrent.futures waits for its work at exit."""
    ends: List[Callable[[], None]] = []
    for name in ('concurrent.futures.thread', 'concurrent.futures.process'):
        end = getattr(sys.modules.get(name), '_python_exit', None)
        if end is not None:
            ends.append(end)
    return ends


class _ExitHurried(BaseException):
    """A second SIGTERM or Ctrl+C during the interpreter's exit."""


def _main_thread_id() -> int:
    ident = threading.main_thread().ident
    assert ident is not None  # The main thread has always started.
    return ident


def _release_carried_signals(bus: Bus) -> None:
    """Act on the signals carried across the re-exec, and end their hold.

    Called on the main thread when `bus` has started, blocks or waits: not
    earlier, when the program has not subscribed all its plugins yet (a
    SIGTERM must find PIDFile, a SIGHUP ListenSockets).  Until then the bus
    also keeps the SIGHUPs and SIGUSR1s its handlers catch (see
    Bus._waits_for_plugins).  Those `bus` handles, and a held Ctrl+C, are
    recorded as if they came now, before those kept, and acted on by the
    bus (a SIGTERM then asks for the exit; it never hurries one); another
    handler in place gets its signal again; a signal no longer handled
    gets its default action.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # (Only the main thread may set handlers.)
    carried: List[str] = []
    for signum, arrived in list(_held.items()):
        del _held[signum]
        handler = _signal.getsignal(signum)
        if handler is _hold:
            handler = _unhold(signum)
        if not arrived:
            continue
        if signum == _signal.SIGINT and handler is _signal.default_int_handler:
            carried.append('SIGINT')
        elif signum in bus._handled_signals:
            carried.append(bus._handled_signals[signum])
        else:
            _signal.pthread_kill(_main_thread_id(), signum)
    bus._signals[:0] = carried  # Before those that came in the set-up.


def _unhold(signum: int) -> SignalAction:
    """Give a held signal no handler took its default handling back."""
    if signum == _signal.SIGINT:
        handler: SignalAction = _signal.default_int_handler
    else:
        handler = _signal.SIG_DFL
    _signal.signal(signum, handler)
    return handler


def _describe(error: Optional[BaseException]) -> str:
    """Say in one line what went wrong: 'ValueError: bad port; ...'."""
    if error is None:
        return 'an exit while starting'
    errors = (
        error.get_instances()
        if isinstance(error, ChannelFailures)
        else [error]
    )
    return '; '.join(
        type(e).__name__ + (': %s' % e if str(e) else '') for e in errors
    )


def _check_rerunnable(interpreter_args: Iterable[str]) -> None:
    """Raise RuntimeError unless these interpreter arguments name a program.

    `interpreter_args` is the command line after the executable.  Code from
    ``-c``, stdin (``-``) or the interactive prompt cannot be run again.
    """
    args = list(interpreter_args)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == '--check-hash-based-pycs':
            i += 2
            continue
        if arg == '--':
            i += 1
            break
        if arg == '-' or not arg.startswith('-'):
            break
        letters = '' if arg.startswith('--') else arg[1:]
        for pos, letter in enumerate(letters):
            if letter == 'c':
                raise _not_rerunnable("'-c'")
            if letter == 'm':
                return
            if letter in 'WX':  # The value follows, here or in the next arg.
                i += pos == len(letters) - 1
                break
        i += 1
    if i >= len(args) or args[i] in ('', '-'):
        raise _not_rerunnable('stdin or an interactive prompt')


def _not_rerunnable(source: str) -> RuntimeError:
    return RuntimeError(
        'Cannot reconstruct command from %s: code given that way cannot be '
        'run again. Start the program from a script or with python -m so '
        'that restart() can re-execute it.' % source
    )


bus: Bus = Bus()
"""The process-wide bus, for programs that need only one."""


# -- SimplePlugin -------------------------------------------------------------


class SimplePlugin:
    """A plugin whose methods named like a channel listen on that channel.

    subscribe() attaches every method named like a channel in
    ``bus.listeners`` (``start``, ``stop``, ``exit`` ...), with the method's
    ``priority`` attribute if it has one; unsubscribe() detaches them.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        """The bus this plugin serves."""

    def __repr__(self) -> str:
        return '%s(%r)' % (type(self).__name__, self.bus)

    def subscribe(self) -> None:
        """Register this plugin's channel methods with the bus."""
        for channel in list(self.bus.listeners):
            method = getattr(self, channel, None)
            if method is not None:
                self.bus.subscribe(channel, method)

    def unsubscribe(self) -> None:
        """Unregister this plugin's channel methods from the bus."""
        for channel in list(self.bus.listeners):
            method = getattr(self, channel, None)
            if method is not None:
                self.bus.unsubscribe(channel, method)


# -- SignalHandler ------------------------------------------------------------


class SignalHandler:
    """Turn OS signals into bus channels named after them (``SIGTERM`` ...).

    ``handlers`` maps a signal name or number to the listener subscribed for
    it by subscribe(): SIGTERM exits the bus, SIGHUP calls handle_SIGHUP()
    and SIGUSR1 runs graceful() (on ``java`` platforms SIGUSR2, plus SIGINT
    through _jython_SIGINT_handler()).  Change ``handlers`` before
    subscribe(), or call set_handler(), to choose another behaviour; under a
    supervisor that uses SIGHUP for reloads, set ``handlers['SIGHUP'] =
    bus.graceful``.  Signals this platform lacks are skipped.  Handlers can
    only be set on the main thread; elsewhere subscribe() logs and returns.
    """

    signals: Dict[int, str] = {
        getattr(_signal, name): name
        for name in sorted(dir(_signal), reverse=True)
        if name.startswith('SIG') and not name.startswith('SIG_')
    }
    """Signal number -> canonical name (SIGIO, not its alias SIGPOLL)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.handlers: Dict[Union[str, int], Listener] = {
            'SIGTERM': self.bus.exit,
            'SIGHUP': self.handle_SIGHUP,
            'SIGUSR1': self.bus.graceful,
        }
        """Signal name (or number) -> listener, read by subscribe()."""
        if _JYTHON:
            del self.handlers['SIGUSR1']
            self.handlers['SIGUSR2'] = self.bus.graceful
            self.bus.log(
                'SIGUSR1 cannot be set on the JVM platform. '
                'Using SIGUSR2 instead.'
            )
            self.handlers['SIGINT'] = self._jython_SIGINT_handler
        self._previous_handlers: Dict[int, SignalAction] = {}
        self._original_pid = os.getpid()

    def __repr__(self) -> str:
        return 'SignalHandler(%s)' % ', '.join(map(str, self.handlers))

    def _jython_SIGINT_handler(
        self, signum: Optional[int] = None, frame: Optional[FrameType] = None
    ) -> None:
        # The JVM has no KeyboardInterrupt: exit the bus on SIGINT instead.
        self.bus.log('Keyboard Interrupt: shutting down bus')
        self.bus.exit()

    def _is_daemonized(self) -> bool:
        """Tell whether this process was daemonized (forked, no terminal).

        A daemon re-executed by restart() keeps the answer through the
        WSPBUS_DAEMON_PID environment variable that Daemonizer sets.
        """
        forked = self._original_pid != os.getpid() or _daemonized_by_us()
        return forked and not _isatty(sys.stdin)

    def subscribe(self) -> None:
        """Install a handler for each signal in ``handlers``."""
        if threading.current_thread() is not threading.main_thread():
            self.bus.log(
                'Signal handlers can only be set on the main '
                'thread; %r did nothing.' % self,
                level=_WARNING,
            )
            return
        atexit.register(self._ignore_late_signals)
        for sig, listener in self.handlers.items():
            if isinstance(sig, str) and not hasattr(_signal, sig):
                continue  # This platform lacks it (Windows: SIGHUP ...).
            try:
                self.set_handler(sig, listener)
            except ValueError as exc:
                self.bus.log(
                    'Could not handle %s: %s' % (sig, exc), level=_WARNING
                )

    def _ignore_late_signals(self) -> None:
        # At interpreter exit Python resets its handlers to SIG_DFL, so a
        # SIGUSR1 or SIGHUP arriving in the last moments would kill the
        # process (status -10) after a clean exit.  SIG_IGN is left alone.
        for signum in self._previous_handlers:
            if _signal.getsignal(signum) == self._handle_signal:
                _signal.signal(signum, _signal.SIG_IGN)

    def unsubscribe(self) -> None:
        """Restore the handlers that were installed before ours."""
        atexit.unregister(self._ignore_late_signals)
        for signum, handler in self._previous_handlers.items():
            # The bus's own record, kept by its plugins (also below).
            self.bus._handled_signals.pop(signum, None)
            signame = self.signals[signum]
            if handler is None:
                self.bus.log('Restoring %s handler to SIG_DFL.' % signame)
                handler = _signal.SIG_DFL
            else:
                self.bus.log('Restoring %s handler %r.' % (signame, handler))
            try:
                our_handler = _signal.signal(signum, handler)
                if our_handler is None:
                    self.bus.log(
                        'Restored old %s handler %r, but our '
                        'handler was not registered.' % (signame, handler),
                        level=_WARNING,
                    )
            except ValueError:
                self.bus.log(
                    'Unable to restore %s handler %r.' % (signame, handler),
                    level=_ERROR,
                    traceback=True,
                )
        self._previous_handlers.clear()

    def set_handler(
        self, signal: Union[str, int], listener: Optional[Listener] = None
    ) -> None:
        """Handle `signal` (a name or number) by publishing its name.

        With `listener`, subscribe it to that channel.  Raises ValueError
        for a signal this platform does not know or that no process can
        handle (SIGKILL, SIGSTOP).  An alias (SIGPOLL)
        publishes and subscribes under the canonical name (SIGIO).
        """
        if isinstance(signal, str):
            signum = getattr(_signal, signal, None)
            if (
                not signal.startswith('SIG')
                or signal.startswith('SIG_')
                or not isinstance(signum, int)
            ):
                raise ValueError('No such signal: %r' % signal)
        elif isinstance(signal, bool):
            raise ValueError('No such signal: %r' % signal)
        else:
            signum = signal
        try:
            signame = self.signals[signum]
        except (KeyError, TypeError):
            raise ValueError('No such signal: %r' % signal) from None
        if signame in ('SIGKILL', 'SIGSTOP'):  # (PyPy would accept them.)
            raise ValueError('%s cannot be handled' % signame)
        previous = _signal.signal(signum, self._handle_signal)
        if previous is _hold:  # Held since a restart(): now handled.
            previous = _signal.SIG_DFL
            if signum == _signal.SIGINT:
                previous = _signal.default_int_handler
        self._previous_handlers.setdefault(signum, previous)
        self.bus._handled_signals[signum] = signame
        if listener is not None:
            self.bus.log('Listening for %s.' % signame)
            self.bus.subscribe(signame, listener)

    def _handle_signal(
        self, signum: int, frame: Optional[FrameType] = None
    ) -> None:
        """Hand the signal to the bus, which publishes its name as soon as
        the main thread is not in the middle of a transition or a wait."""
        self.bus._signal_arrived(self.signals[signum])

    def handle_SIGHUP(self) -> None:
        """Restart when daemonized, else exit.

        A terminal hangs up (SIGHUP) when its user closes it, so a process
        attached to one exits; a daemon has no terminal, and SIGHUP is the
        conventional request to reload, so it restarts.
        """
        if self._is_daemonized():
            self.bus.log('SIGHUP caught while daemonized. Restarting.')
            self.bus.restart()
        else:
            self.bus.log('SIGHUP caught but not daemonized. Exiting.')
            self.bus.exit()


def _isatty(stream: IO[Any]) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return False  # Closed or replaced by something without a descriptor.


# -- ConsoleCtrlHandler -------------------------------------------------------

_CONSOLE_EVENTS = {
    0: 'CTRL_C_EVENT',
    1: 'CTRL_BREAK_EVENT',
    2: 'CTRL_CLOSE_EVENT',
    5: 'CTRL_LOGOFF_EVENT',
    6: 'CTRL_SHUTDOWN_EVENT',
}


class ConsoleCtrlHandler(SimplePlugin):
    """Exit the bus on Windows console events, through ctypes.

    Channels: ``start`` sets the handler, ``stop`` removes it.  Ctrl+C,
    Ctrl+Break, close, logoff and shutdown each log and exit the bus.
    Elsewhere subscribe() logs that there is nothing to do.
    """

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus)
        self.is_set = False
        """True while the handler is registered with Windows."""
        # Kept alive: Windows calls into it.
        self._callback: Optional[Callable[[int], int]] = None

    def subscribe(self) -> None:
        """Subscribe on Windows; elsewhere log that it does nothing."""
        if not _WINDOWS:
            self.bus.log(
                'ConsoleCtrlHandler does nothing on %r.' % sys.platform,
                level=_DEBUG,
            )
            return
        super().subscribe()

    def _set_console_handler(self, add: bool) -> int:
        import ctypes

        # getattr: typeshed has windll and get_last_error on Windows only
        # (elsewhere tests fake them).
        kernel32 = getattr(ctypes, 'windll').kernel32  # noqa: B009
        if self._callback is None:
            prototype = getattr(ctypes, 'WINFUNCTYPE', ctypes.CFUNCTYPE)
            self._callback = prototype(ctypes.c_int, ctypes.c_uint)(
                self.handle
            )
        if kernel32.SetConsoleCtrlHandler(self._callback, int(add)):
            return 0
        error: int = getattr(ctypes, 'get_last_error')()  # noqa: B009
        return error or kernel32.GetLastError()

    def start(self) -> None:
        """Register the console handler."""
        if self.is_set:
            self.bus.log('Handler for console events already set.')
            return
        error = self._set_console_handler(True)
        if error:
            self.bus.log(
                'Could not SetConsoleCtrlHandler (error %r)' % error,
                level=_ERROR,
            )
        else:
            self.bus.log('Set handler for console events.')
            self.is_set = True

    def stop(self) -> None:
        """Unregister the console handler."""
        if not self.is_set:
            self.bus.log('Handler for console events already off.')
            return
        error = self._set_console_handler(False)
        if error:
            self.bus.log(
                'Could not remove SetConsoleCtrlHandler (error %r)' % error,
                level=_ERROR,
            )
        else:
            self.bus.log('Removed handler for console events.')
            self.is_set = False

    def handle(self, event: int) -> int:
        """Exit the bus on a known event; return 1 if handled, else 0."""
        if event not in _CONSOLE_EVENTS:
            return 0
        self.bus.log(
            'Console event %s: shutting down bus' % _CONSOLE_EVENTS[event]
        )
        self.stop()  # First, so a second Ctrl+C does not re-enter.
        self.bus.exit()
        return 1


# -- DropPrivileges -----------------------------------------------------------


class DropPrivileges(SimplePlugin):
    """Give up root: switch group, supplementary groups, then user.

    Channel: ``start`` (priority 77, after PIDFile and Daemonizer, so the
    PID file and low ports are taken as root).  `uid` and `gid` are numbers
    or names, resolved at once: an unknown name raises ValueError here.
    With `gid`, the supplementary groups are cleared; with `uid` alone, the
    process takes that user's primary group and supplementary groups
    (initgroups), so no root group is kept, and a numeric uid that has no
    passwd entry raises ValueError (give a gid).  `umask` (an int such as
    0o022) is applied at start too.  Where the ``pwd``/``grp`` modules are
    missing, uid/gid are ignored with a warning.
    """

    def __init__(
        self,
        bus: Bus,
        umask: Optional[int] = None,
        uid: Union[int, str, None] = None,
        gid: Union[int, str, None] = None,
    ) -> None:
        super().__init__(bus)
        self.finalized = False
        """True after start() ran once; a second start changes nothing."""
        # mypy < 1.16 wants a setter to take the getter's type (int only).
        self.uid = uid  # type: ignore[assignment, unused-ignore]
        self.gid = gid  # type: ignore[assignment, unused-ignore]
        self.umask = umask
        self._users_group()

    def __repr__(self) -> str:
        return 'DropPrivileges(uid=%r, gid=%r, umask=%r)' % (
            self._uid,
            self._gid,
            self._umask,
        )

    @property
    def uid(self) -> Optional[int]:
        """The user id to switch to, or None."""
        return self._uid

    @uid.setter
    def uid(self, value: Union[int, str, None]) -> None:
        self._uid = self._resolve(value, 'pwd', 'getpwnam', 'user', 'uid')
        # (name, primary gid) of that user, if known.
        self._user: Optional[Tuple[str, int]] = None
        if self._uid is not None:
            import pwd  # There: _resolve() found it.

            try:
                if isinstance(value, str):
                    entry = pwd.getpwnam(value)
                else:
                    entry = pwd.getpwuid(self._uid)
                self._user = entry.pw_name, entry.pw_gid
            except KeyError:
                pass  # Without a gid, _users_group() says so.

    @property
    def gid(self) -> Optional[int]:
        """The group id to switch to, or None."""
        return self._gid

    @gid.setter
    def gid(self, value: Union[int, str, None]) -> None:
        self._gid = self._resolve(value, 'grp', 'getgrnam', 'group', 'gid')

    def _resolve(
        self,
        value: object,  # Checked: untyped callers may pass anything.
        module_name: str,
        lookup: str,
        kind: str,
        attr: str,
    ) -> Optional[int]:
        if value is None:
            return None
        module = _import_optional(module_name)
        if module is None:
            self.bus.log(
                '%s module not available; ignoring %s.' % (module_name, attr),
                level=_WARNING,
            )
            return None
        if isinstance(value, str):
            try:
                number: int = getattr(module, lookup)(value)[2]
            except KeyError:
                raise ValueError('No such %s: %r' % (kind, value)) from None
            return number
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                'Invalid %s: %r (a name or a number >= 0)' % (attr, value)
            )
        return value

    @property
    def umask(self) -> Optional[int]:
        """The umask to set at start, or None."""
        return self._umask

    @umask.setter
    def umask(self, value: Optional[int]) -> None:
        if value is not None:
            if not hasattr(os, 'umask'):
                self.bus.log(
                    'umask function not available; ignoring umask.',
                    level=_WARNING,
                )
                value = None
            else:
                _check_umask(value)
        self._umask = value

    def _users_group(self) -> Optional[Tuple[str, int]]:
        """Return (user name, primary gid) to switch groups by, or None.

        Only for a uid given without a gid: ValueError when the uid has no
        passwd entry, since its group would silently stay root's.
        """
        if self._uid is None or self._gid is not None:
            return None
        if self._user is None:
            raise ValueError(
                'uid %r has no passwd entry, so its group is unknown: give '
                'a gid too.' % self._uid
            )
        return self._user

    def _current_ids(
        self,
    ) -> Tuple[Union[str, int, None], Union[str, int, None]]:
        pwd, grp = _import_optional('pwd'), _import_optional('grp')
        uid, gid = os.getuid(), os.getgid()
        try:
            name = pwd.getpwuid(uid)[0] if pwd else None
        except KeyError:  # A uid without a passwd entry: its number.
            name = uid
        try:
            group = grp.getgrgid(gid)[0] if grp else None
        except KeyError:
            group = gid
        return name, group

    def start(self) -> None:
        """Switch group, supplementary groups, user and umask, once."""
        if self.finalized:
            if not (self.uid is None and self.gid is None):
                self.bus.log(
                    'Already running as uid: %r gid: %r' % self._current_ids()
                )
            if self.umask is not None:
                self.bus.log('umask already set to: %03o' % self.umask)
            return
        if self.uid is None and self.gid is None:
            if _import_optional('pwd') or _import_optional('grp'):
                self.bus.log('uid/gid not set', level=_WARNING)
        else:
            users_group = self._users_group()
            self.bus.log('Started as uid: %r gid: %r' % self._current_ids())
            root = os.getuid() == 0
            if users_group is not None:  # uid alone: the user's groups.
                name, gid = users_group
                if root:
                    os.initgroups(name, gid)
                os.setgid(gid)
            else:
                if self.gid is not None:
                    os.setgid(self.gid)
                if root:
                    os.setgroups([])  # Root's groups must not outlive root.
            if self.uid is not None:
                os.setuid(self.uid)
            self.bus.log('Running as uid: %r gid: %r' % self._current_ids())
        if self.umask is None:
            self.bus.log('umask not set', level=_WARNING)
        else:
            old_umask = os.umask(self.umask)
            self.bus.log(
                'umask old: %03o, new: %03o' % (old_umask, self.umask)
            )
        self.finalized = True

    start.priority = 77  # type: ignore[attr-defined]  # Read by subscribe().


def _check_umask(umask: int) -> None:
    if not _is_int(umask) or not 0 <= umask <= 0o777:
        raise ValueError(
            'Invalid umask: %r (an int from 0 to 0o777)' % (umask,)
        )


# -- Daemonizer ---------------------------------------------------------------

# The readiness pipe a restart() before READY handed over, taken from the
# environment at import: its number must not outlive this image, where a
# file the program opens could get it.
_handed_over_report = [os.environ.pop(_REPORT_ENV, '')]


class Daemonizer(SimplePlugin):
    """Detach the process from its terminal: double fork, new session.

    Channel: ``start`` (priority 65, before PIDFile, so the file holds the
    daemon's PID).  The daemon's umask becomes `umask` (0, as CherryPy; an
    int from 0 to 0o777, else ValueError here) and its descriptors 0, 1
    and 2 the files named, even if they were closed (``app >&-``) or
    sys.stdout was replaced.

    With `wait_ready` (the default) the process you launched waits until the
    daemon's bus is STARTED, then exits 0; if a start listener fails or the
    daemon dies first, it prints the daemon's error on its own stderr and
    exits 1, and after `ready_timeout` seconds it sends the daemon SIGTERM
    and exits 1.  So ``app && next-step`` and systemd ``Type=forking`` only
    go on when the service runs.  A restart() before the daemon is ready
    hands the wait to the new image.  ``wait_ready=False`` exits at once.
    """

    def __init__(
        self,
        bus: Bus,
        stdin: str = '/dev/null',
        stdout: str = '/dev/null',
        stderr: str = '/dev/null',
        umask: int = 0,
        wait_ready: bool = True,
        ready_timeout: float = 30,
    ) -> None:
        super().__init__(bus)
        if not _HAVE_FORK:
            raise RuntimeError(
                'Daemonizer needs os.fork(), which %r lacks.' % sys.platform
            )
        if (
            not _is_number(ready_timeout)
            or not _is_finite_wait(ready_timeout)
            or ready_timeout <= 0
        ):
            raise ValueError(
                'Invalid ready_timeout: %r (seconds, a finite number > 0)'
                % (ready_timeout,)
            )
        _check_umask(umask)  # Not only in the daemon, too late to say.
        for path in (stdout, stderr):
            if not _daemonized_by_us():  # Re-executed: no files to open.
                _check_parent_dir(path, 'Daemonizer output')
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.umask = umask
        self.wait_ready = wait_ready
        self.ready_timeout = ready_timeout
        self.finalized = False
        """True once this process is the daemon."""
        self._report_fd: Optional[int] = None
        self._first_error: Optional[str] = None
        if _daemonized_by_us():  # Re-executed by restart(): before READY?
            self._adopt_report()

    def __repr__(self) -> str:
        return 'Daemonizer(stdout=%r, stderr=%r, wait_ready=%r)' % (
            self.stdout,
            self.stderr,
            self.wait_ready,
        )

    def start(self) -> None:
        """Become a daemon, unless this process already is one."""
        if self.finalized or _daemonized_by_us():
            self.bus.log('Already daemonized.')
            self.finalized = True
            return
        if threading.active_count() != 1:
            self.bus.log(
                'There are %r active threads. Daemonizing now may '
                'cause strange failures.' % threading.enumerate(),
                level=_WARNING,
            )
        _occupy_stdio()  # First: the pipe must not land on 0, 1 or 2.
        if self.wait_ready:
            read_fd, write_fd = os.pipe()
            launcher = _Launcher(read_fd, write_fd, self.ready_timeout)
            _detach(self.bus.log, launcher.wait)
            os.close(read_fd)
            os.write(write_fd, b'PID %d\n' % os.getpid())
            self._watch_start(write_fd)
        else:
            _detach(self.bus.log, _exit_parent)
        _redirect_stdio(self.stdin, self.stdout, self.stderr, self.umask)
        os.environ[_DAEMON_ENV] = str(os.getpid())
        self.bus.log('Daemonized to PID: %s' % os.getpid())
        self.finalized = True

    start.priority = 65  # type: ignore[attr-defined]  # Read by subscribe().

    @staticmethod
    def daemonize(
        stdin: str = '/dev/null',
        stdout: str = '/dev/null',
        stderr: str = '/dev/null',
        logger: Callable[[str], Any] = lambda msg: None,
    ) -> None:
        """Double fork, start a session, umask 0 and redirect stdio.

        The original process exits 0 at once (no readiness handshake).
        """
        _occupy_stdio()
        _detach(logger, _exit_parent)
        _redirect_stdio(stdin, stdout, stderr, 0)
        logger('Daemonized to PID: %s' % os.getpid())

    # The daemon's side of the readiness handshake.

    def _watch_start(self, fd: int) -> None:
        self._report_fd = fd
        self.bus.subscribe('log', self._remember_error)
        self.bus.subscribe('started', self._report_ready)
        self.bus.subscribe('exit', self._report_failure)

    def _remember_error(self, msg: str, level: int) -> None:
        if level >= _ERROR and self._first_error is None:
            self._first_error = msg

    def _report_ready(self) -> None:
        self._report(b'READY\n')

    def _adopt_report(self) -> None:
        """Report for the image that a restart() before READY replaced."""
        import stat

        try:
            fd = int(_handed_over_report.pop())
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return
            os.set_inheritable(fd, False)
        except (IndexError, ValueError, OSError):
            return
        self._watch_start(fd)

    def _report_failure(self) -> None:
        fd = self._report_fd
        if self.bus.execv and fd is not None:  # The new image will report.
            self._unsubscribe_reports()
            self.bus._keep_across_exec(fd)
            os.environ[_REPORT_ENV] = '%d' % fd
            return
        error = self._first_error or 'The daemon exited before it was ready.'
        text = error.encode('utf-8', 'replace')
        self._report(b'ERROR %d\n' % len(text) + text)

    def _report(self, message: bytes) -> None:
        fd = self._report_fd
        self._unsubscribe_reports()
        if fd is None:
            return
        try:
            while message:  # A long traceback may not fit in one write.
                message = message[os.write(fd, message) :]
        except OSError:
            pass  # The launcher gave up (ready_timeout); nothing to tell.
        finally:
            os.close(fd)

    def _unsubscribe_reports(self) -> None:
        self._report_fd = None
        for channel, listener in (
            ('log', self._remember_error),
            ('started', self._report_ready),
            ('exit', self._report_failure),
        ):
            self.bus.unsubscribe(channel, listener)


def _exit_parent(fork_number: int, child_pid: int) -> NoReturn:
    os._exit(0)


def _occupy_stdio() -> None:
    """Open /dev/null on whichever of descriptors 0, 1, 2 is closed.

    A program started with a closed stdout (``app >&-``, as some init
    scripts do) would otherwise get its next descriptor there: the
    readiness pipe, which the redirection of stdout would then replace.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _flush_stdio() -> None:
    # sys.stdout may be None (started closed) or anything a program set.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _detach(
    logger: Callable[[str], Any], on_parent: Callable[[int, int], Any]
) -> None:
    """Fork twice around setsid(); parents call on_parent(n, child_pid)."""
    _flush_stdio()
    for number, msg in ((1, 'Forking once.'), (2, 'Forking twice.')):
        try:
            pid = os.fork()
        except OSError as exc:
            sys.exit(
                '%s: fork #%d failed: (%s) %s\n'  # errno: Optional[int].
                % (sys.argv[0], number, exc.errno, exc.strerror)
            )
        if pid > 0:
            logger(msg)
            if number == 1:
                on_parent(number, pid)
            os._exit(0)
        if number == 1:
            os.setsid()


def _redirect_stdio(stdin: str, stdout: str, stderr: str, umask: int) -> None:
    """Put the named files on descriptors 0, 1 and 2.

    The descriptors themselves, not sys.stdout's: it may be None or an
    object without a descriptor.  A standard stream that is None (its
    descriptor was closed at start-up) is opened on its new file.
    """
    os.umask(umask)
    append = os.O_RDWR | os.O_CREAT | os.O_APPEND  # open()'s 'a+'.
    for fd, path, flags in (
        (0, stdin, os.O_RDONLY),
        (1, stdout, append),
        (2, stderr, append),
    ):
        target = os.open(path, flags, 0o666)
        if target != fd:
            os.dup2(target, fd)
            os.close(target)
    for name, fd, mode in (
        ('stdin', 0, 'r'),
        ('stdout', 1, 'w'),
        ('stderr', 2, 'w'),
    ):
        if getattr(sys, name) is None:
            stream = open(
                fd,
                mode,
                buffering=-1 if fd == 0 else 1,
                errors='backslashreplace',
                closefd=False,
            )
            setattr(sys, name, stream)


class _Interrupted(Exception):
    """A signal reached the launcher while it waited for the daemon."""


def _interrupt(signum: int, frame: Optional[FrameType]) -> NoReturn:
    raise _Interrupted('signal %d' % signum)


class _Launcher:
    """The launched process's side of Daemonizer's readiness handshake.

    The daemon writes a line ``PID n``, then one message: the line
    ``READY``, or a line ``ERROR size`` followed by `size` bytes of text
    (its first error); wait() reads them and ends this process.  Parsed as
    messages, an error text that holds a line ``READY`` is still an error,
    and a complete error is reported at once, even when workers the daemon
    forked keep the pipe open (no end of file comes then).
    """

    def __init__(self, read_fd: int, write_fd: int, timeout: float) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.timeout = timeout

    def wait(self, fork_number: int, child_pid: int) -> None:
        os.close(self.write_fd)  # Else we would never see the daemon's EOF.
        # No bus serves this process any more: a signal stops the waiting,
        # and stops the daemon that is not ready yet.
        for signum in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
            _signal.signal(signum, _interrupt)
        self.pid: str = '?'  # The daemon's, once it has said it.
        try:
            self._wait(child_pid)
        except _Interrupted as interrupted:
            self._give_up(self.pid, 'was interrupted (%s)' % interrupted)

    def _wait(self, child_pid: int) -> None:
        deadline = time.monotonic() + self.timeout
        data = b''
        pid, verdict, text = _parse_report(data)
        while verdict is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._give_up(  # Never returns: it ends this process.
                    pid, 'was not ready after %r seconds' % self.timeout
                )
            # Wake now and then: workers the daemon forked hold the pipe
            # open, so no end of file comes when the daemon dies silently.
            if _readable([self.read_fd], min(remaining, 0.5)):
                chunk = os.read(self.read_fd, 65536)
                if not chunk:
                    break  # The daemon is gone, and its workers if any.
                data += chunk
                pid, verdict, text = _parse_report(data)
                self.pid = pid
            elif pid != '?' and _has_ended(int(pid)):
                break
        try:
            os.waitpid(child_pid, 0)  # Reap the first child.
        except OSError:
            pass
        if verdict == 'READY':
            _hard_exit(0)
        error = text.decode('utf-8', 'replace').rstrip()
        if verdict == 'BAD':
            error = 'it sent an unreadable report: %r' % error
        self._fail(
            'Daemon %s failed to start:\n%s'
            % (pid, error or 'it exited before it was ready.')
        )

    def _give_up(self, pid: str, why: str) -> NoReturn:
        if pid != '?':
            _terminate(int(pid), _KILL_AFTER)
        self._fail(
            'Daemon %s %s; sent it SIGTERM (SIGKILL after %r s) and gave up.'
            % (pid, why, _KILL_AFTER)
        )

    @staticmethod
    def _fail(message: str) -> NoReturn:
        try:
            sys.stderr.write(message + '\n')
        finally:
            _hard_exit(1)


def _has_ended(pid: int) -> bool:
    """Tell whether process `pid` has ended; a zombie has.

    The daemon is not our child: where no one reaps orphans (some
    containers' init) it stays a zombie, which /proc shows, where there is
    one; elsewhere kill(pid, 0) is all we know.
    """
    if not _pid_alive(pid):
        return True
    try:
        with open('/proc/%d/stat' % pid, 'rb') as f:
            state = f.read().rpartition(b')')[2].split()[:1]
    except OSError:
        return False
    return state == [b'Z']


_KILL_AFTER = 5.0  # Seconds a daemon that is not ready has to act on SIGTERM.


def _terminate(pid: int, grace: float) -> None:
    """Send `pid` SIGTERM, and SIGKILL if it is still there after `grace` s.

    A daemon stuck in a start listener acts on SIGTERM only when that
    listener returns (signals never interrupt a transition).
    """
    try:
        os.kill(pid, _signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + grace
    while not _has_ended(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, _signal.SIGKILL)
            except OSError:
                pass
            return
        time.sleep(0.02)


def _parse_report(data: bytes) -> Tuple[str, Optional[str], bytes]:
    """Parse what the daemon sent so far: (pid text, verdict, error text).

    The pid is '?' until its line is complete.  `verdict` is None until a
    whole message has arrived (the error text is what came of it), then
    'READY', 'ERROR' or 'BAD' (not the protocol: a bug).
    """
    first, newline, rest = data.partition(b'\n')
    if not newline:
        return '?', None, b''
    if not (first.startswith(b'PID ') and first[4:].isdigit()):
        return '?', 'BAD', data
    pid = first[4:].decode()
    line, newline, body = rest.partition(b'\n')
    if not newline:
        return pid, None, b''
    if line == b'READY':
        return pid, 'READY', b''
    word, _, size = line.partition(b' ')
    if word != b'ERROR' or not size.isdigit():
        return pid, 'BAD', rest
    if len(body) < int(size):
        return pid, None, body
    return pid, 'ERROR', body[: int(size)]


def _check_parent_dir(path: str, what: str) -> None:
    """Raise ValueError unless `path`'s directory exists and is writable."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.stat(directory)
    except PermissionError:
        raise ValueError(
            '%s directory %r cannot be reached: permission '
            'denied (for %r).' % (what, directory, path)
        ) from None
    except OSError:
        pass
    if not os.path.isdir(directory):
        raise ValueError(
            '%s directory %r does not exist (for %r).'
            % (what, directory, path)
        )
    if not os.access(directory, os.W_OK):
        raise ValueError(
            '%s directory %r is not writable (for %r).'
            % (what, directory, path)
        )


# -- PIDFile ------------------------------------------------------------------


def _remove_unclaimed_pidfile() -> None:
    """Remove the PID file restart() handed over if no PIDFile took it back
    (a SIGTERM in the new image's set-up, a program that dropped PIDFile).
    """
    fd_text, _, path = os.environ.pop(_PIDFILE_ENV, '').partition(' ')
    try:
        fd = int(fd_text)
        if not _same_file(fd, path):
            return  # Not ours (any more).
    except (ValueError, OSError):
        return
    try:
        if _read_pid(fd) == os.getpid():
            if _CLOSE_BEFORE_REMOVE:
                os.close(fd)
                fd = -1
            os.remove(path)
    except OSError:
        pass
    finally:
        if fd >= 0:
            _close_quietly(fd)  # Unix: the lock goes after the file.


if _PIDFILE_ENV in os.environ:  # At exit, unless a PIDFile takes it back.
    _owed_cleanups.append(_remove_unclaimed_pidfile)


class PIDFile(SimplePlugin):
    """Write the process's PID to a file while it runs, safely.

    Channels: ``start`` (priority 70) writes ``"<pid>\\n"`` (mode 0644),
    ``exit`` removes the file.  On Unix the file is locked (``flock``) for
    the process's life, so a second instance fails its start with a message
    naming the file and the running PID; a file left by a dead process is
    replaced with a warning; anything but a regular file at the path (a
    symlink, device, FIFO or socket) is refused, and never removed; at exit
    the file is removed only if it still holds our PID.  restart() keeps
    the file and its lock through the re-exec.  Without ``fcntl`` exclusive
    creation and a liveness check stand in for the lock.  A missing or
    unwritable directory, or a directory at the path, raises ValueError
    here.
    """

    def __init__(self, bus: Bus, pidfile: str) -> None:
        super().__init__(bus)
        if not os.environ.get(_PIDFILE_ENV, '').endswith(
            ' ' + os.path.abspath(pidfile)
        ):  # Unless restart() handed it over (maybe after dropping root).
            _check_parent_dir(pidfile, 'PID file')
        if os.path.isdir(os.path.abspath(pidfile)):  # Again at start, too.
            raise ValueError('PID file %r is a directory' % pidfile)
        self.pidfile = pidfile
        """The path as given."""
        self.finalized = False
        """True once the file is written."""
        self._path = os.path.abspath(pidfile)
        self._fd: Optional[int] = None

    def __repr__(self) -> str:
        return 'PIDFile(%r)' % self.pidfile

    def start(self) -> None:
        """Claim the file and write our PID, or raise naming the holder."""
        pid = os.getpid()
        if self.finalized:
            self.bus.log('PID %r already written to %r.' % (pid, self.pidfile))
            return
        self._fd = self._adopt_inherited() or self._claim()
        self.finalized = True
        self.bus.log('PID %r written to %r.' % (pid, self.pidfile))

    start.priority = 70  # type: ignore[attr-defined]  # Read by subscribe().

    def exit(self) -> None:
        """Remove the file if it still holds our PID; keep it on restart."""
        fd, self._fd = self._fd, None
        if fd is None:  # A start cut short before ours, after a restart():
            fd = self._adopt_inherited()  # the file handed over is ours.
        if fd is None:
            return
        if self.bus.execv:  # restart(): hand the locked file to the re-exec.
            self.bus._keep_across_exec(fd)
            os.environ[_PIDFILE_ENV] = '%d %s' % (fd, self._path)
            _owed_cleanups.append(lambda: self._remove(fd))  # If exec fails.
            return
        self._remove(fd)

    def _remove(self, fd: int) -> None:
        closed = False
        try:
            if _read_pid(fd) == os.getpid() and _same_file(fd, self._path):
                if _CLOSE_BEFORE_REMOVE:
                    os.close(fd)
                    closed = True
                os.remove(self._path)
                self.bus.log('PID file removed: %r.' % self.pidfile)
            else:
                self.bus.log(
                    'PID file %r no longer holds PID %r; leaving it.'
                    % (self.pidfile, os.getpid()),
                    level=_WARNING,
                )
        except OSError as exc:
            self.bus.log(
                'Could not remove PID file %r: %s' % (self.pidfile, exc),
                level=_WARNING,
            )
        finally:
            if not closed:
                os.close(fd)  # Releases the lock, after the file is gone.
            self.finalized = False

    def _adopt_inherited(self) -> Optional[int]:
        """Take back the locked file a restart() handed over, if ours."""
        fd_text, _, path = os.environ.get(_PIDFILE_ENV, '').partition(' ')
        if path != self._path:
            return None
        del os.environ[_PIDFILE_ENV]
        try:
            fd = int(fd_text)
            if _same_file(fd, path) and _read_pid(fd) == os.getpid():
                os.set_inheritable(fd, False)
                self.bus.log(
                    'PID file %r kept across the restart.' % self.pidfile
                )
                return fd
        except (ValueError, OSError):
            pass
        return None

    def _claim(self) -> int:
        locking: Optional[ModuleType] = fcntl  # None on Windows.
        if locking is None:
            return self._claim_exclusive()
        for _ in range(10):  # The file can be replaced while we lock it.
            fd = _open_pidfile(self._path, os.O_RDWR | os.O_CREAT)
            try:
                try:
                    locking.flock(fd, locking.LOCK_EX | locking.LOCK_NB)
                except BlockingIOError:
                    raise self._held(_holder_pid(fd)) from None
                if not _same_file(fd, self._path):
                    os.close(fd)
                    continue
                self._write(fd)
                return fd
            except BaseException:
                _close_quietly(fd)
                raise
        raise self._replaced()

    def _claim_exclusive(self) -> int:
        for _ in range(10):
            try:
                fd = _open_pidfile(
                    self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL
                )
            except FileExistsError:
                existing = _open_pidfile(self._path, os.O_RDONLY)
                try:
                    pid = _read_pid(existing)
                finally:
                    os.close(existing)
                if pid is not None and pid != os.getpid() and _pid_alive(pid):
                    raise self._held(pid) from None
                self._warn_stale(pid)
                _remove_quietly(self._path)
                continue
            try:
                _write_pid(fd)
            except BaseException:
                _close_quietly(fd)
                _remove_quietly(self._path)
                raise
            return fd
        raise self._replaced()

    def _write(self, fd: int) -> None:
        """Write our PID into the locked file `fd`; on failure remove it."""
        self._warn_stale(_read_pid(fd))
        try:
            _write_pid(fd)
        except OSError as exc:
            if _same_file(fd, self._path):  # Locked by us: ours to remove.
                _remove_quietly(self._path)
            raise OSError(
                exc.errno,
                'Could not write PID file %r: %s'
                % (self.pidfile, exc.strerror),
            ) from None

    def _warn_stale(self, old_pid: Optional[int]) -> None:
        if old_pid is not None and old_pid != os.getpid():
            self.bus.log(
                'Replacing stale PID file %r left by PID %r.'
                % (self.pidfile, old_pid),
                level=_WARNING,
            )

    def _replaced(self) -> RuntimeError:
        return RuntimeError(
            'PID file %r keeps being replaced; giving up.' % self.pidfile
        )

    def _held(self, pid: Optional[int]) -> RuntimeError:
        return RuntimeError(
            'PID file %r is held by running process %s; '
            'another instance is running.'
            % (self.pidfile, pid if pid else '(unknown)')
        )


def _open_pidfile(path: str, flags: int) -> int:
    """Open a PID file, refusing anything but a regular file.

    A symlink, device, FIFO, socket or directory is refused before it is
    opened (opening a device can have effects), and again on the
    descriptor, for a path replaced meanwhile: O_NOFOLLOW keeps the open
    off a symlink where the platform has it, O_NONBLOCK keeps a FIFO from
    hanging it.
    """
    try:
        _check_regular(path, os.lstat(path).st_mode)
    except FileNotFoundError:
        pass
    nonblock = getattr(os, 'O_NONBLOCK', 0)
    flags |= getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_CLOEXEC', 0)
    try:
        fd = os.open(path, flags | nonblock, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            _check_regular(path, os.lstat(path).st_mode)
        raise
    try:
        _check_regular(path, os.fstat(fd).st_mode)
        if nonblock:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(path: str, mode: int) -> None:
    """Raise RuntimeError naming `path` unless `mode` is a regular file's."""
    import stat

    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        raise RuntimeError(
            'Refusing to use PID file %r: it is a symbolic link.' % path
        )
    kind = 'a special file'
    for test, name in (
        (stat.S_ISDIR, 'a directory'),
        (stat.S_ISFIFO, 'a FIFO'),
        (stat.S_ISCHR, 'a character device'),
        (stat.S_ISBLK, 'a block device'),
        (stat.S_ISSOCK, 'a socket'),
    ):
        if test(mode):
            kind = name
    raise RuntimeError(
        'Refusing to use PID file %r: it is %s, not a regular file.'
        % (path, kind)
    )


def _read_pid(fd: int) -> Optional[int]:
    os.lseek(fd, 0, os.SEEK_SET)
    return _parse_pid(os.read(fd, 64))


def _holder_pid(fd: int) -> Optional[int]:
    """Read the PID of the process holding the lock on `fd`.

    The holder writes it just after locking: give it a moment.
    """
    deadline = time.monotonic() + 1
    pid = _read_pid(fd)
    while pid is None and time.monotonic() < deadline:
        time.sleep(0.01)
        pid = _read_pid(fd)
    return pid


def _parse_pid(data: bytes) -> Optional[int]:
    try:
        return int(data.strip() or b'x')
    except ValueError:
        return None


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    data = b'%d\n' % os.getpid()
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.fsync(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        found = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (found.st_dev, found.st_ino)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# -- ListenSockets ------------------------------------------------------------

_SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start here.
# restart() writes 'pid', then a line per socket, its fields separated by
# tabs: name, fd, the AF_UNIX file this process bound as path and
# 'st_dev:st_ino' (else two ''), repr() of the address asked for ('' when
# systemd gave it).  Older versions wrote the first three only: the
# address is unknown (not systemd's), so listen() takes the socket by name
# once, and the next restart writes the address it asked for; an unknown
# one still unclaimed is written in the older form again.  Fields after
# the fifth (a newer version's) are ignored, and a malformed line is
# skipped alone, with a warning.
_LISTEN_ENV = 'WSPBUS_LISTEN_FDS'


class _Inherited:
    """A socket this process inherited that no listen() has asked for."""

    __slots__ = ('name', 'sock', 'file', 'asked', 'superseded')

    def __init__(
        self,
        name: str,
        sock: socket.socket,
        file: Optional[_SocketFile],
        asked: Optional[str],
    ) -> None:
        self.name = name  # Several may share one: systemd names every
        self.sock = sock  # socket of a unit after it by default.
        self.file = file  # The AF_UNIX file an earlier image bound.
        # repr() of the address asked for; '' if systemd gave it; None if
        # unknown (an older version's handover): taken by name, once.
        self.asked = asked
        # Its name now listens elsewhere: closed at 'started' if unclaimed.
        self.superseded = False

    @property
    def given(self) -> bool:
        """Whether systemd gave it: its unit decides the address."""
        return self.asked == ''


# A library's ListenSockets and the application's share one process: the
# first one made adopts all it inherited (it removes the variables) into
# this pool, which every one claims from, and restart() hands over the
# sockets of every one.
_unclaimed: List[_Inherited] = []
_listen_sockets: WeakSet[ListenSockets] = WeakSet()


class ListenSockets(SimplePlugin):
    """Own the service's listening sockets, so a restart refuses nothing.

    At construction it adopts the sockets this process inherited: from
    systemd socket activation (``LISTEN_PID`` naming this process,
    ``LISTEN_FDS``, names from ``LISTEN_FDNAMES``; descriptors from 3) and
    from a restart() of this process.  It removes those variables from
    ``os.environ`` and marks the descriptors close-on-exec.  What is not
    right (variables meant for another process, a count beyond the
    descriptors this process has open, names that do not match the count,
    a descriptor that is not a socket, or not listening, a handover line
    it cannot read, whose descriptor it closes) is logged as a warning and
    ignored; the rest is adopted.  Several in one process (a library's and
    the application's) share what it inherited, each listen() taking its
    own by name, and restart() hands over the sockets of every one.

    listen() hands out a socket by name, and keeps a duplicate of its
    descriptor: a server may close the socket it was given (asyncio's does)
    and the socket still crosses a restart, and listen() asked again for it
    returns a new socket object on the same descriptor's duplicate; an
    instance garbage-collected without an exit closes its duplicates.
    Channel ``exit``: after restart() the sockets stay open for the new
    image, and connections arriving meanwhile wait in the kernel's backlog;
    on a real exit they are closed and the AF_UNIX files this process bound
    are removed (never those it was given), if their path, absolute, still
    names the file bound (not one another process bound there since).
    Channel ``started``: an inherited socket whose name now listens at
    another address, and that no other name took, is closed.  One no
    listen() has claimed is handed on at a restart (a listen() may come
    after ``started``: run_async's main task) and closed at a real exit,
    or when a new socket's host overlaps its on that port (a warning).
    Call listen() before DropPrivileges' start (priority 77) to bind a low
    port as root.
    """

    def __init__(self, bus: Bus) -> None:
        import weakref

        super().__init__(bus)
        self.sockets: Dict[str, socket.socket] = {}
        """Name -> the listening socket.socket that listen() handed out."""
        self._kept: Dict[str, int] = {}  # our dup of a handed-out socket's fd
        # Dropped unsubscribed (a library's), it must not leave them open.
        weakref.finalize(self, _close_kept, self._kept)
        self._files: Dict[str, _SocketFile] = {}  # AF_UNIX files we bound
        self._addresses: Dict[str, _Address] = {}  # asked for, by name
        self._given: Set[str] = set()  # names of sockets systemd gave
        inherited = self._from_restart() + self._from_systemd()
        for name, fd, file, asked in inherited:
            sock = self._adopt(name, fd)
            if sock is not None:
                _unclaimed.append(_Inherited(name, sock, file, asked))
        _listen_sockets.add(self)

    def __repr__(self) -> str:
        names = {entry.name for entry in _unclaimed}
        return 'ListenSockets(%s)' % ', '.join(
            sorted(set(self.sockets) | names)
        )

    def listen(
        self,
        name: str,
        address: _Address,
        family: Optional[int] = None,
        type: Optional[int] = None,
        backlog: int = 128,
    ) -> socket.socket:
        """Return the listening socket called `name`, binding it if needed.

        `address` is a ``(host, port)`` tuple (AF_INET, or AF_INET6 when the
        host has a colon) or a ``str`` path (AF_UNIX); `family` and `type`
        (default SOCK_STREAM) override the guess.  An inherited socket of
        that name (systemd's: the unit decides the address, and the family
        when `family` is not given), or bound to that address, of that type,
        is returned instead of a new one; across a restart a name asked for
        another address is bound anew, and an unclaimed socket that holds
        the port on an overlapping host is closed (a fresh start would bind
        it).  An address spelled as before is the same; one spelled
        otherwise is compared by what it binds to.  Bad input is an error
        naming it: the same name with another address, a family or type
        that differs, a name or path the handover cannot carry (a tab,
        newline, NUL or lone surrogate).  README's ListenSockets section
        gives every rule, and why.
        """
        import socket

        _check_handed_over('socket name', name)
        if isinstance(address, str) and not _is_abstract(address):
            _check_handed_over('AF_UNIX path', address)
        guessed = family is None
        family = _address_family(address) if family is None else family
        type = socket.SOCK_STREAM if type is None else type
        sock = self._handed_out(name, address)
        inherited = (
            None if sock else self._inherited_for(name, address, family, type)
        )
        if inherited is not None:
            sock = inherited.sock
        if (
            sock
            and guessed
            and self._unit_decides(name, sock, family, inherited)
        ):
            family = sock.family  # ListenStream=P gives '::': the unit's.
        if sock is None:
            sock = self._bind_anew(name, address, family, type, backlog)
        elif (sock.family, sock.type) != (family, type):
            raise ValueError(
                'Socket %r is %s, not the %s asked for %r.'
                % (
                    name,
                    _socket_kind(sock.family, sock.type),
                    _socket_kind(family, type),
                    address,
                )
            )
        if inherited is not None:
            self._claim(name, inherited)
            self.bus.log(
                'Listening on %r (%s), inherited.'
                % (_bound_address(sock), name)
            )
        if name not in self._kept:
            self._kept[name] = os.dup(sock.fileno())
        self.sockets[name] = sock
        self._addresses.setdefault(name, address)
        return sock

    def _handed_out(
        self, name: str, address: _Address
    ) -> Optional[socket.socket]:
        """Return the socket `name` listen() gave, if asked for `address`."""
        sock = self.sockets.get(name)
        if sock is None:
            return None
        if sock.fileno() == -1:
            sock = self._reopen(name)  # Its server closed it (asyncio's).
        asked, file = self._addresses[name], self._files.get(name)
        if address != asked and not _same_address(sock, address, file):
            raise ValueError(
                'Socket %r was asked for %r and is bound to %r, not to %r: '
                'one name, one address.'
                % (name, asked, _bound_address(sock), address)
            )
        return sock

    def _unit_decides(
        self,
        name: str,
        sock: socket.socket,
        family: int,
        inherited: Optional[_Inherited],
    ) -> bool:
        """Tell whether systemd gave `name`'s `sock` (`inherited`, or
        handed out) and it and `family` are IP: the unit decides which."""
        import socket

        if {sock.family, family} - {socket.AF_INET, socket.AF_INET6}:
            return False  # An AF_UNIX path is no (host, port).
        if inherited is None:
            return name in self._given
        return inherited.given

    def _inherited_for(
        self, name: str, address: _Address, family: int, type: int
    ) -> Optional[_Inherited]:
        def matches(entry: _Inherited) -> bool:
            # ('', P) is 0.0.0.0 or '::' by the family; of a socket
            # systemd gave, the unit decides (listen() checks the family).
            # One port may have a stream and a datagram socket.
            if entry.sock.family != family and not entry.given:
                return False
            if entry.sock.type != type:
                return False
            return entry.asked == repr(address) or _same_address(
                entry.sock, address, entry.file
            )

        named = [entry for entry in _unclaimed if entry.name == name]
        if len(named) == 1 and named[0].asked in ('', None):
            return named[0]  # systemd's unit decides, or unknown.
        if len(named) == 1 and matches(named[0]):
            return named[0]
        if len(named) == 1:  # The configuration changed the address:
            # another unclaimed socket may hold it (a name dropped, or two
            # swapped), and bind() would find it in use.
            for entry in _unclaimed:
                if entry is not named[0] and matches(entry):
                    named[0].superseded = True  # A swap may still take it.
                    return entry
            self._retire(named[0], 'now asked for %r' % (address,))
            return None
        # Several of that name, or none (systemd's default names, the
        # unit's): the one bound to the address, of the family asked first.
        for entry in sorted(
            named or _unclaimed, key=lambda e: e.sock.family != family
        ):
            if matches(entry):
                return entry
        if named:
            raise ValueError(
                '%d inherited sockets are called %r and none is bound to '
                '%r: they are bound to %s.'
                % (
                    len(named),
                    name,
                    address,
                    ', '.join(repr(_bound_address(e.sock)) for e in named),
                )
            )
        return None

    def _retire(self, entry: _Inherited, why: str, level: int = _INFO) -> None:
        """Close inherited `entry`, which no listen() will claim."""
        self.bus.log(
            'Closing the inherited socket %r bound to %r: %s.'
            % (entry.name, _bound_address(entry.sock), why),
            level=level,
        )
        _unclaimed.remove(entry)
        entry.sock.close()
        if entry.file:
            self._remove_socket_file(entry.file)

    def _bind_anew(
        self,
        name: str,
        address: _Address,
        family: int,
        type: int,
        backlog: int,
    ) -> socket.socket:
        """Bind a new socket called `name`; note its file, log its address.

        A fresh start would bind it, so an unclaimed socket an earlier
        image handed on (its name dropped) must not make it EADDRINUSE by
        holding the port on an overlapping host: closed, with a warning (a
        listen() still to come cannot claim it), bind() is retried.  One
        systemd gave is left (the unit decides), and named in the error.
        """
        try:
            sock, file = self._bind(address, family, type, backlog)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            overlapping = self._overlapping(address, family, type)
            for entry in overlapping:
                if entry.given:
                    raise OSError(
                        exc.errno,
                        '%s; systemd gave this process %r (%s) on that '
                        'port: ask for that address, or change the unit.'
                        % (
                            exc.strerror,
                            _bound_address(entry.sock),
                            entry.name,
                        ),
                    ) from None
            if not overlapping:
                raise
            for entry in overlapping:
                why = '%r asked for %r, which overlaps it' % (name, address)
                self._retire(entry, why, _WARNING)
            sock, file = self._bind(address, family, type, backlog)
        if file is not None:
            self._files[name] = file
        self.bus.log('Listening on %r (%s).' % (_bound_address(sock), name))
        return sock

    def _overlapping(
        self, address: _Address, family: int, type: int
    ) -> List[_Inherited]:
        """The unclaimed inherited sockets that hold `address`'s port on a
        host it overlaps."""
        import socket

        if isinstance(address, (str, bytes)):
            return []  # A path is taken as it is, or bound anew.
        host = _bind_host(address, family, type)
        with socket.socket(family, type) as new:  # As _bind() makes it.
            ipv4 = _takes_ipv4(new)
        return [
            entry
            for entry in _unclaimed
            if entry.sock.type == type
            and _overlaps(
                _bound_address(entry.sock),
                host,
                address[1],
                ipv4 and _takes_ipv4(entry.sock),
            )
        ]

    def subscribe(self) -> None:
        """Register exit, and started (no built-in channel of the bus)."""
        super().subscribe()
        self.bus.subscribe('started', self.started)

    def unsubscribe(self) -> None:
        """Unregister what subscribe() registered."""
        super().unsubscribe()
        self.bus.unsubscribe('started', self.started)

    def started(self) -> None:
        """Close the inherited sockets whose name now listens elsewhere."""
        for entry in list(_unclaimed):
            if entry.superseded:
                self._retire(entry, '%r listens elsewhere' % entry.name)

    def _reopen(self, name: str) -> socket.socket:
        """Make a new socket object from our duplicate of `name`'s."""
        import socket

        sock = socket.socket(fileno=os.dup(self._kept[name]))
        sock.setblocking(True)  # The closed one's server may have changed it.
        return sock

    def _claim(self, name: str, entry: _Inherited) -> None:
        """Move inherited `entry` to those handed out, as `name`."""
        _unclaimed.remove(entry)
        if entry.file:
            self._files[name] = entry.file
        if entry.given:
            self._given.add(name)

    def _bind(
        self, address: _Address, family: int, type: int, backlog: int
    ) -> Tuple[socket.socket, Optional[_SocketFile]]:
        """Return a new socket bound to `address`, and the file it made."""
        import socket

        sock, file = socket.socket(family, type), None
        try:
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif isinstance(address, str) and not _is_abstract(address):
                _remove_stale_socket_file(address)
            sock.bind(address)
            if isinstance(address, str) and not _is_abstract(address):
                # Kept absolute: the program may change directory.
                file = _socket_file(address)
            if type in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
                sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, 'Cannot listen on %r: %s' % (address, exc.strerror)
            ) from None
        except BaseException:
            sock.close()
            raise
        return sock, file

    def exit(self) -> None:
        """Keep the sockets for the new image on restart; else close them.

        restart() re-executes the whole process: every ListenSockets'
        sockets and the unclaimed ones cross it (a listen() may come late),
        whichever's listener runs last.  A real exit closes
        this one's, and the unclaimed ones unless a ListenSockets of
        another bus, not exited, may still claim them.
        """
        if self.bus.execv:
            fds = [fd for each in _listen_sockets for fd in each._own()]
            fds += [
                (e.name, e.sock.fileno(), e.file, e.asked) for e in _unclaimed
            ]
            entries = ['%d' % os.getpid()]
            for name, fd, file, asked in fds:
                self.bus._keep_across_exec(fd)
                path, identity = (
                    ('', '')
                    if file is None
                    else (
                        file[0],
                        '%d:%d' % file[1:],
                    )
                )
                fields = (name, str(fd), path, identity, asked or '')
                # An unknown address is written in the older form again.
                entries.append('\t'.join(fields[: 3 if asked is None else 5]))
            os.environ[_LISTEN_ENV] = '\n'.join(entries)
            _owed_cleanups.append(self._close)  # Only if the exec fails.
            return
        self._close()

    def _own(self) -> List[_HandedOver]:
        """Describe the sockets listen() handed out, for the handover."""
        return [
            (
                name,
                fd,
                self._files.get(name),
                '' if name in self._given else repr(self._addresses[name]),
            )
            for name, fd in self._kept.items()
        ]

    def _close(self) -> None:
        files = list(self._files.values())
        # Another bus's instance (a library's) may still claim them.
        unclaimed = [] if self._others_live() else _unclaimed[:]
        for entry in unclaimed:
            _unclaimed.remove(entry)
            entry.sock.close()
            if entry.file:
                files.append(entry.file)
        for sock in self.sockets.values():
            sock.close()
        _close_kept(self._kept)
        self.sockets = {}
        for file in files:
            self._remove_socket_file(file)
        self._files, self._addresses, self._given = {}, {}, set()

    def _others_live(self) -> bool:
        """Tell whether a ListenSockets of another bus, not exited, lives."""
        return any(
            each.bus is not self.bus and each.bus.state is not states.EXITING
            for each in _listen_sockets
        )

    def _remove_socket_file(self, file: _SocketFile) -> None:
        """Remove the AF_UNIX file we bound, if its path still names it.

        The path may have been cleared and bound again by another process
        since; that file is left to it.  A failure is a warning.
        """
        path, device, inode = file
        try:
            found = os.lstat(path)
            if (found.st_dev, found.st_ino) == (device, inode):
                os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # EACCES: root's directory, root dropped.
            self.bus.log(
                'Cannot remove the socket file %r: %s.' % (path, exc.strerror),
                level=_WARNING,
            )

    # Inherited descriptors.

    def _from_restart(
        self,
    ) -> List[_HandedOver]:
        lines = os.environ.pop(_LISTEN_ENV, '').split('\n')
        if lines[0] != '%d' % os.getpid():
            return []  # Nothing, or another process's (an inherited env).
        entries: List[_HandedOver] = []
        malformed: List[str] = []
        for line in lines[1:]:
            try:
                entries.append(_parse_handed_over(line))
            except ValueError:  # One line alone: the others still cross.
                malformed.append(line)
        adopted = {entry[1] for entry in entries}
        for line in malformed:
            fd, closed = _handed_over_fd(line), ''
            if fd is not None and fd >= 3 and fd not in adopted:
                _close_quietly(fd)  # Else it leaks, inheritable.
                closed = ' (descriptor %d closed)' % fd
            self.bus.log(
                'Ignoring the %s line %r: not what restart() writes%s.'
                % (_LISTEN_ENV, line, closed),
                level=_WARNING,
            )
        return entries

    def _from_systemd(
        self,
    ) -> List[_HandedOver]:
        pid, count, fdnames = (
            os.environ.pop(variable, None)
            for variable in ('LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES')
        )
        if count is None:
            return []
        if pid != '%d' % os.getpid():
            self.bus.log(
                'Ignoring LISTEN_FDS=%r: LISTEN_PID=%r is not this process '
                '(%d).' % (count, pid, os.getpid()),
                level=_WARNING,
            )
            return []
        if not (count.isascii() and count.isdigit()):  # Not '²', nor ' 1'.
            self.bus.log(
                'Ignoring LISTEN_FDS=%r: not a number.' % count,
                level=_WARNING,
            )
            return []
        # Checked before int(): a count of 10**9 made 10**9 entries (and
        # warnings), and Python 3.11+ refuses to read 4,300 digits.
        opened = len(_open_fds(_MAX_FILES))
        if len(count.lstrip('0')) > len(str(opened)) or int(count) > opened:
            self.bus.log(
                'Ignoring LISTEN_FDS=%r: more than the %d descriptors this '
                'process has open.' % (count, opened),
                level=_WARNING,
            )
            return []
        fds = range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + int(count))
        names = fdnames.split(':') if fdnames else []
        if names and len(names) != len(fds):
            self.bus.log(
                'Ignoring LISTEN_FDNAMES=%r: %d names for %d descriptors; '
                'listen() finds them by address.'
                % (':'.join(names), len(names), len(fds)),
                level=_WARNING,
            )
            names = []
        return [
            (names[i] if names else 'fd%d' % fd, fd, None, '')
            for i, fd in enumerate(fds)
        ]

    def _adopt(self, name: str, fd: int) -> Optional[socket.socket]:
        import socket

        if any(entry.sock.fileno() == fd for entry in _unclaimed):
            # A second socket object would close it under the first.
            self._ignore(fd, name, 'listed twice')
            return None
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:  # Not a socket, or not open.
            self._ignore(fd, name, exc.strerror or str(exc))
            return None
        except (ValueError, OverflowError) as exc:  # -1, 10**20
            self._ignore(fd, name, str(exc))
            return None
        accepting = getattr(socket, 'SO_ACCEPTCONN', None)
        if (
            sock.type in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
            and accepting is not None
            and not sock.getsockopt(socket.SOL_SOCKET, accepting)
        ):
            sock.detach()
            self._ignore(fd, name, 'not a listening socket')
            return None
        os.set_inheritable(fd, False)
        sock.setblocking(True)  # As a new one; the last owner may differ.
        return sock

    def _ignore(self, fd: int, name: str, reason: str) -> None:
        self.bus.log(
            'Ignoring inherited descriptor %d (%s): %s.' % (fd, name, reason),
            level=_WARNING,
        )


def _parse_handed_over(
    line: str,
) -> _HandedOver:
    """Read one socket's line of the handover; ValueError if malformed.

    Fields after the fifth (a newer version's) are ignored.
    """
    fields = line.split('\t')
    older = len(fields) == 3  # An older version: no identity, no address.
    if len(fields) < 5 and not older:
        raise ValueError('%d fields' % len(fields))
    name, fd, path, identity, asked = (fields + ['', ''])[:5]
    file = None
    if identity:
        device, inode = identity.split(':')
        file = (path, int(device), int(inode))
    elif path:  # An older version: the file found there now.
        file = _socket_file(path)
    return name, int(fd), file, None if older else asked


def _close_kept(kept: Dict[str, int]) -> None:
    """Close the duplicates a ListenSockets kept, and forget them."""
    for fd in kept.values():
        _close_quietly(fd)
    kept.clear()  # In place: its finalizer holds this dict.


def _handed_over_fd(line: str) -> Optional[int]:
    """Return the descriptor a malformed handover line names, if a number."""
    fields = line.split('\t')
    try:
        return int(fields[1]) if len(fields) > 1 else None
    except ValueError:
        return None


def _socket_file(path: str) -> Optional[_SocketFile]:
    """Name the file at `path`: absolute path, st_dev, st_ino, or None."""
    try:
        found = os.lstat(path)
    except OSError:
        return None
    return (os.path.abspath(path), found.st_dev, found.st_ino)


def _check_handed_over(what: str, text: str) -> None:
    """Refuse what restart()'s tab- and newline-separated lines cannot carry.

    One such character made the new image ignore every socket; a NUL is
    refused by os.environ (and by bind()).  What os.environ cannot encode
    (a lone surrogate) ended the restart with status 70.
    """
    if any(c in text for c in '\t\n\0'):
        raise ValueError(
            'Invalid %s %r: a tab, newline or NUL cannot cross a restart.'
            % (what, text)
        )
    try:
        os.fsencode(text)  # As os.environ encodes it.
    except UnicodeError:
        raise ValueError(
            'Invalid %s %r: it cannot be encoded for the environment, so it '
            'cannot cross a restart.' % (what, text)
        ) from None


def _address_family(address: Union[str, bytes, Tuple[object, ...]]) -> int:
    """Guess the family of `address`; ValueError when it is neither."""
    import socket

    if isinstance(address, str) and hasattr(socket, 'AF_UNIX'):
        return socket.AF_UNIX
    if (
        isinstance(address, tuple)
        and len(address) in (2, 4)
        and isinstance(address[0], str)
        and isinstance(address[1], int)
    ):
        return socket.AF_INET6 if ':' in address[0] else socket.AF_INET
    raise ValueError(
        'Invalid address %r: a (host, port) tuple or an AF_UNIX path.'
        % (address,)
    )


def _socket_kind(family: int, type: int) -> str:
    import socket

    try:
        return '%s/%s' % (
            socket.AddressFamily(family).name,
            socket.SocketKind(type).name,
        )
    except ValueError:
        return '%r/%r' % (family, type)


def _same_address(
    sock: socket.socket,
    address: _Address,
    file: Optional[_SocketFile] = None,
) -> bool:
    """Tell whether `sock` is bound to `address` ('' meaning any host).

    Compared by what they bind to: spelled otherwise than getsockname()
    has it, a host is resolved as bind() does, and a path made absolute
    (`file` names the one bound, absolute when it was bound).  '' is any
    host of `sock`'s family: the caller compares the family asked for.
    """
    bound = _bound_address(sock)
    if bound is None:
        return False
    if isinstance(address, (str, bytes)) and isinstance(bound, (str, bytes)):
        return _same_path(bound, address, file)
    if isinstance(address, (str, bytes)) or isinstance(bound, (str, bytes)):
        return False
    if address[1] != bound[1] or address[1] == 0:
        return False
    bound_host: str = bound[0]
    host = address[0] or ('::' if ':' in bound_host else '0.0.0.0')
    found = _bind_host(address, sock.family, sock.type)
    return host == bound_host or found == bound_host


def _same_path(
    bound: Union[str, bytes],
    address: Union[str, bytes],
    file: Optional[_SocketFile],
) -> bool:
    """Tell whether AF_UNIX address `bound` is `address`, made absolute."""
    if not bound:  # Not bound (or autobound, Linux).
        return False
    if os.fsencode(bound) == os.fsencode(address):
        return True
    if _is_abstract(address) or _is_abstract(bound):
        return False  # Linux gives an abstract name back as bytes.
    here = os.path.abspath(os.fsencode(address))
    if file:  # Made absolute where it was bound.
        return here == os.fsencode(file[0])
    return here == os.path.abspath(os.fsencode(bound))


def _bind_host(
    address: Tuple[Any, ...], family: int, type: int
) -> Optional[str]:
    """Return the host bind() would take for `address`, or None."""
    import socket

    flags = socket.AI_PASSIVE | socket.AI_NUMERICSERV
    try:
        found = socket.getaddrinfo(
            address[0] or None, address[1], family, type, 0, flags
        )
    except (OSError, UnicodeError):  # Unknown: bind() will say so.
        return None
    return str(found[0][4][0]) if found else None


def _overlaps(
    bound: Union[str, bytes, Tuple[Any, ...], None],
    host: Optional[str],
    port: int,
    ipv4: bool,
) -> bool:
    """Tell whether a socket bound to `bound` holds (`host`, `port`).

    On one port, a host overlaps itself and a wildcard: '0.0.0.0' every
    IPv4 host, '::' every IPv6 host, and the IPv4 ones too if `ipv4` (both
    sockets take IPv4: see _takes_ipv4).  An IPv4-mapped host
    ('::ffff:127.0.0.1') is its IPv4 one.  Of these, bind() finds a
    listening one in use.
    """
    if not isinstance(bound, tuple) or host is None or bound[1] != port:
        return False
    # Both spelled by inet_ntop() (getsockname(), getaddrinfo()): lower
    # case, the IPv4 part dotted.
    hosts = {
        each[7:] if each.startswith('::ffff:') and '.' in each else each
        for each in (bound[0], host)
    }
    if len(hosts) == 1:
        return True
    if '::' in hosts:
        return ipv4 or all(':' in each for each in hosts)
    return '0.0.0.0' in hosts and not any(':' in each for each in hosts)


def _takes_ipv4(sock: socket.socket) -> bool:
    """Tell whether `sock` is AF_INET, or AF_INET6 not IPV6_V6ONLY.

    Its '::' then takes IPv4 too: Linux's default, unless the sysctl
    net.ipv6.bindv6only is 1 (Windows' default is IPv6 only).
    """
    import socket

    if sock.family != socket.AF_INET6:
        return sock.family == socket.AF_INET
    try:
        return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except OSError:  # Closed behind our back: it holds nothing.
        return False


def _bound_address(
    sock: socket.socket,
) -> Union[str, bytes, Tuple[Any, ...], None]:
    try:
        bound: Union[str, bytes, Tuple[Any, ...]] = sock.getsockname()
    except OSError:
        return None
    return bound


def _is_abstract(address: Union[str, bytes]) -> bool:
    """Tell whether an AF_UNIX address is abstract (Linux): not a file."""
    if isinstance(address, str):
        return address.startswith('\0')
    return address.startswith(b'\0')


def _remove_stale_socket_file(path: str) -> None:
    """Remove a socket file at `path` that no process listens on."""
    import socket
    import stat

    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return  # Not a socket: bind() will say the address is in use.
    except OSError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        # Never wait: connect() to a listener whose backlog is full (wedged,
        # stopped or busy) blocks until it accepts.  Only ECONNREFUSED says
        # nobody listens; EAGAIN is a full backlog, in use all the same.
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            _remove_quietly(path)  # Left by a process that died.
        except OSError:
            pass


# -- PerpetualTimer and BackgroundTask ----------------------------------------


class PerpetualTimer(threading.Timer):
    """A threading.Timer that calls its function every `interval` seconds.

    Takes Timer's arguments plus `bus`; an `interval` that is not a number
    from 0 to threading.TIMEOUT_MAX (negative, NaN, inf) raises ValueError.
    The first exception from the function is logged on the bus (raised,
    without one) and ends the timer; cancel() ends it at once.
    """

    def __init__(
        self,
        interval: float,
        function: Callable[..., Any],
        args: Optional[Iterable[Any]] = None,
        kwargs: Optional[Mapping[str, Any]] = None,
        *,
        bus: Optional[Bus] = None,
    ) -> None:
        self.bus = bus
        """The bus that logs the function's exception, or None to raise it."""
        super().__init__(interval, function, args, kwargs)
        _check_interval(self.interval)

    def run(self) -> None:
        while not self.finished.wait(self.interval):
            try:
                self.function(*self.args, **self.kwargs)
            except Exception:
                if self.bus is None:
                    raise
                self.bus.log(
                    'Error in perpetual timer thread function %r.'
                    % self.function,
                    level=_ERROR,
                    traceback=True,
                )
                return


class BackgroundTask(threading.Thread):
    """A daemon thread that calls ``function(*args, **kwargs)`` repeatedly.

    It waits `interval` seconds before each call; anything but a number
    from 0 to threading.TIMEOUT_MAX (negative, NaN, inf) raises ValueError
    here.  cancel() ends the thread at once, even in the middle of a wait.
    The first exception is logged on `bus` (raised, without one) and ends
    the thread.  ``running`` is True while the thread loops.  Subclasses may
    override _sleep() to wait on something else.
    """

    def __init__(
        self,
        interval: float,
        function: Callable[..., Any],
        args: Sequence[Any] = [],
        kwargs: Mapping[str, Any] = {},
        bus: Optional[Bus] = None,
    ) -> None:
        super().__init__()
        _check_interval(interval)
        self.interval: float = interval
        self.function: Callable[..., Any] = function
        self.args: Sequence[Any] = args
        self.kwargs: Mapping[str, Any] = kwargs
        self.running: bool = False
        self.bus: Optional[Bus] = bus
        self.daemon = True
        self._cancelled = threading.Event()
        # A thread to wait for before the first run.
        self._after: Optional[threading.Thread] = None

    def cancel(self) -> None:
        """Stop the loop; the thread ends without waiting out its sleep."""
        self.running = False
        self._cancelled.set()

    def _sleep(self) -> bool:
        """Wait one interval; return True if cancelled meanwhile."""
        return self._cancelled.wait(self.interval)

    def run(self) -> None:
        after = self._after
        if after is not None and after is not threading.current_thread():
            after.join()  # Monitor.graceful(): its last run must end first.
        self.running = not self._cancelled.is_set()
        while self.running:
            if self._sleep() or not self.running:
                break
            try:
                self.function(*self.args, **self.kwargs)
            except Exception:
                self.running = False
                if self.bus is None:
                    raise
                self.bus.log(
                    'Error in background task thread function %r.'
                    % self.function,
                    level=_ERROR,
                    traceback=True,
                )


def _check_interval(interval: float) -> None:
    # Here, not in the thread: CherryPy's time.sleep() raised there for a
    # non-number or a negative number; a negative wait returns at once, so
    # the function would run in a hot loop.
    if not _is_number(interval) or not 0 <= interval <= threading.TIMEOUT_MAX:
        raise ValueError(
            'Invalid interval: %r (seconds, a number from 0 to '
            'threading.TIMEOUT_MAX)' % (interval,)
        )


# -- Monitor ------------------------------------------------------------------


class Monitor(SimplePlugin):
    """Call `callback` every `frequency` seconds while the bus runs.

    Channels: ``start`` (priority 70) starts a BackgroundTask named `name`
    (default: the class name), ``stop`` cancels it and waits for a callback
    in progress to end (unless called from that callback), ``graceful``
    restarts it while the bus is STARTED.  Two runs of the callback never
    overlap, and none runs after stop() returned.  A `frequency` <= 0
    disables the monitor; one that is not a finite number raises
    ValueError.  Subclasses may override _new_thread().
    """

    def __init__(
        self,
        bus: Bus,
        callback: Callable[[], Any],
        frequency: float = 60,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(bus)
        if not callable(callback):
            raise TypeError(
                'Monitor callback must be callable, not %r' % (callback,)
            )
        if not _is_number(frequency) or not _is_finite_wait(frequency):
            raise ValueError(
                'Invalid frequency: %r (seconds, a finite number up to '
                'threading.TIMEOUT_MAX; <= 0 disables)' % (frequency,)
            )
        self.callback: Callable[[], Any] = callback
        self.frequency: float = frequency
        self.thread: Optional[BackgroundTask] = None
        """The running BackgroundTask, or None."""
        self.name: Optional[str] = name
        self._lock = threading.RLock()  # A signal handler can reach stop().
        _guard_for_fork(self)
        # The last thread stopped; it may still run.
        self._last: Optional[BackgroundTask] = None

    def __repr__(self) -> str:
        return '%s(%r, frequency=%r)' % (
            type(self).__name__,
            self._name(),
            self.frequency,
        )

    def _name(self) -> str:
        return self.name or type(self).__name__

    def _new_thread(self) -> BackgroundTask:
        return BackgroundTask(self.frequency, self.callback, bus=self.bus)

    def start(self) -> None:
        """Start the monitor thread, unless disabled or running."""
        if self.frequency <= 0:
            return
        with self._lock:
            if self.thread is not None:
                self.bus.log(
                    'Monitor thread %r already started.' % self._name()
                )
                return
            thread = self._new_thread()
            thread.name = self._name()
            # Stopped from its own callback, the last thread may still be
            # running it: the new one waits for it to end (a handshake
            # private to Monitor and BackgroundTask).
            thread._after = self._last
            self.thread = thread
            thread.start()
        self.bus.log('Started monitor thread %r.' % self._name())

    start.priority = 70  # type: ignore[attr-defined]  # Read by subscribe().

    def stop(self) -> None:
        """Cancel the monitor thread and wait for its callback to end.

        Called from that callback (or one the new thread waits for), it
        cancels without waiting, which would never end.
        """
        with self._lock:
            thread, self.thread = self.thread, None
            if thread is not None:
                self._last = thread
        if thread is None:
            self.bus.log('No thread running for %s.' % self._name())
            return
        thread.cancel()
        current = threading.current_thread()
        if current not in (thread, getattr(thread, '_after', None)):
            if not thread.daemon:
                self.bus.log('Joining %r' % thread.name)
            thread.join()
            self.bus.log('Stopped thread %r.' % thread.name)

    def graceful(self) -> None:
        """Restart the monitor thread, unless the bus is stopping.

        An exit that began meanwhile has stopped it, or will: either way
        no thread outlives the bus.
        """
        self.stop()
        with self._lock:
            if self.bus.state is states.STARTED:
                self.start()


# -- Autoreloader -------------------------------------------------------------

_UNSEEN = object()  # Autoreloader.mtimes default: not stat'ed yet.
_DEBOUNCE = 0.02  # Seconds of quiet that end an editor's multi-step save.
_FULL_CHECK = 60.0  # Seconds between full checks when inotify watches.


class Autoreloader(Monitor):
    """Restart the process when a module file or a file in ``files`` changes.

    Channels: as Monitor (``start`` at priority 70).  Watches the files of
    the imported modules whose name matches the regex `match` (modules from
    a zip archive watch the archive) plus the paths added to ``files``.  A
    change is any move of a file's mtime (either way), size or inode, its
    deletion, or its appearance.  On Linux an inotify watcher wakes the
    thread within milliseconds of a save, renames included; elsewhere, with
    ``use_inotify=False``, or if inotify fails, it polls every `frequency`
    seconds.  New imports are picked up every `frequency` seconds.
    ``mtimes`` maps each file to its last (mtime_ns, size, inode), or None.
    """

    def __init__(
        self,
        bus: Bus,
        frequency: float = 1,
        match: str = '.*',
        use_inotify: bool = True,
    ) -> None:
        self.files: Set[str] = set()
        """Extra paths to watch; add to it at any time."""
        import operator

        self.mtimes: Dict[str, Optional[_Signature]] = {}
        self._signature_of: Callable[[os.stat_result], _Signature] = (
            operator.attrgetter('st_mtime_ns', 'st_size', 'st_ino')
        )
        # (files, signatures) of the last full check
        self._verified: Optional[
            Tuple[Tuple[str, ...], Optional[List[_Signature]]]
        ] = None
        self._full_check_at = 0.0  # When inotify's safety net runs next.
        self.match = match
        self._ordered_from: Optional[FrozenSet[str]] = None
        self._ordered: Tuple[str, ...] = ()
        self.use_inotify: bool = use_inotify
        """False forces polling."""
        super().__init__(bus, self.run, frequency)

    @property
    def match(self) -> str:
        """The regex a module name must match for its file to be watched."""
        return self._match

    @match.setter
    def match(self, pattern: str) -> None:
        import re

        try:
            self._match_re = re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ValueError(
                'Invalid Autoreloader match regex %r: %s' % (pattern, exc)
            ) from None
        self._match = pattern
        # module name -> (module, file or None)
        self._module_files: Dict[str, Tuple[ModuleType, Optional[str]]] = {}
        self._sysfiles: FrozenSet[str] = frozenset()

    def start(self) -> None:
        """Forget old signatures and start watching."""
        if self.thread is None:
            self.mtimes = {}
            self._verified = None
        super().start()

    start.priority = 70  # type: ignore[attr-defined]  # Read by subscribe().

    def _new_thread(self) -> BackgroundTask:
        # Watch, then take the baseline, before the thread runs: a change
        # made during its first sleep must count too.
        watcher = self._open_watcher()
        watched = self._watched_files()
        if watcher is not None and not self._add_watches(watcher, watched):
            watcher.close()
            watcher = None
        self._first_change(self._in_order(watched))
        self._full_check_at = time.monotonic() + _FULL_CHECK
        if watcher is None:
            return super()._new_thread()
        return _WatchTask(watcher, self.frequency, self.callback, bus=self.bus)

    def _add_watches(
        self, watcher: _Inotify, filenames: Iterable[str]
    ) -> bool:
        try:
            watcher.add(filenames)
            return True
        except OSError as exc:
            self.bus.log(
                'Autoreloader falls back to polling: %s' % exc, level=_WARNING
            )
            watcher.failed = True
            return False

    def _watched_files(self) -> FrozenSet[str]:
        self._scan_modules()
        return self._sysfiles.union(self.files)

    def _open_watcher(self) -> Optional[_Inotify]:
        if not self.use_inotify:
            return None
        try:
            return _Inotify()
        except (OSError, AttributeError, ImportError) as exc:
            self.bus.log(
                'Autoreloader polls every %r s: inotify is '
                'unavailable (%s).' % (self.frequency, exc)
            )
            return None

    def sysfiles(self) -> Set[str]:
        """Return the files of the imported modules that ``match`` names."""
        self._scan_modules()
        return set(self._sysfiles)

    def _scan_modules(self) -> None:
        # Each module is looked at once: later scans only compare identities.
        cache = self._module_files
        modules = sys.modules
        grew = False
        for name, module in list(modules.items()):
            entry = cache.get(name)
            if entry is None or entry[0] is not module:
                filename: Optional[str] = None
                if self._match_re.match(name):
                    filename = self._file_for_module(module)
                    if filename and filename.endswith('.pyc'):
                        filename = filename[:-1]
                cache[name] = (module, filename)
                grew = True
        if len(cache) > len(modules):
            for name in [name for name in cache if name not in modules]:
                del cache[name]
            grew = True
        if grew:
            self._sysfiles = frozenset(
                filename for _, filename in cache.values() if filename
            )

    @classmethod
    def _file_for_module(cls, module: ModuleType) -> Optional[str]:
        """Return the file to watch for `module`, or None."""
        return cls._archive_for_zip_module(
            module
        ) or cls._file_for_file_module(module)

    @staticmethod
    def _archive_for_zip_module(module: ModuleType) -> Optional[str]:
        """Return the zip archive a module was imported from, or None."""
        try:
            loader: Any = module.__loader__  # zipimporter has .archive
            archive: Optional[str] = loader.archive
        except Exception:  # Lazy modules may raise anything from getattr.
            return None
        return archive

    @classmethod
    def _file_for_file_module(cls, module: ModuleType) -> Optional[str]:
        """Return the module's absolute ``__file__``; None if it has none."""
        try:
            filename = module.__file__
        except Exception:
            return None
        return filename and cls._make_absolute(filename)

    @staticmethod
    def _make_absolute(filename: str) -> str:
        """Make `filename` absolute against the start-up directory."""
        if os.path.isabs(filename) or _STARTUP_DIR is None:
            return filename
        return os.path.normpath(os.path.join(_STARTUP_DIR, filename))

    def run(self) -> None:
        """Check the watched files once; restart the bus if one changed."""
        watched = self._watched_files()
        watcher: Optional[_Inotify] = getattr(self.thread, 'watcher', None)
        candidates: Optional[Tuple[str, ...]] = None
        if watcher is not None and not watcher.failed:
            touched = watched.intersection(watcher.pop_changed())
            new = watched.difference(self.mtimes)
            # Changed paths are watched anew: a symlink on their way may
            # lead elsewhere now (a ConfigMap's ..data, say).
            if self._add_watches(watcher, new.union(touched)):
                candidates = tuple(
                    sorted(new.union(touched, watcher.unwatched))
                )
        now = time.monotonic()
        if candidates is None or now >= self._full_check_at:
            # Polling: every watched file, every tick.  With inotify, now
            # and then too: the safety net for changes it cannot see (a
            # network file system, a lost event).
            candidates = self._in_order(watched)
            self._full_check_at = now + _FULL_CHECK
        changed = self._first_change(candidates)
        if changed is not None:
            self.bus.log('Restarting because %s changed.' % changed)
            thread = self.thread
            if thread is not None:
                thread.cancel()
                self.bus.log('Stopped thread %r.' % thread.name)
            self.bus.restart()

    def _in_order(self, filenames: FrozenSet[str]) -> Tuple[str, ...]:
        # Sorted, the stats walk one directory after another and the dict
        # in insertion order: a polling tick is ~8% faster than in hash
        # order.  Re-sorted only when the set of watched files changes.
        if filenames != self._ordered_from:
            self._ordered_from = filenames
            self._ordered = tuple(sorted(filenames))
        return self._ordered

    def _first_change(self, filenames: Tuple[str, ...]) -> Optional[str]:
        """Return a file whose signature moved; record unseen ones."""
        # Polling's hot path.  When the same files show the same signatures
        # as at the last full check, nothing moved: map() over os.stat runs
        # in C, ~5% cheaper than the exact loop, which runs otherwise.
        try:
            now: Optional[List[_Signature]] = list(
                map(self._signature_of, map(os.stat, filenames))
            )
        except OSError:
            now = None  # A file is missing: the exact loop says which.
        if now is not None and self._verified == (filenames, now):
            return None
        changed = self._compare_each(filenames)
        unchanged = changed is None and now is not None
        self._verified = (filenames, now) if unchanged else None
        return changed

    def _compare_each(self, filenames: Iterable[str]) -> Optional[str]:
        mtimes = self.mtimes
        stat = os.stat
        for filename in filenames:
            try:
                st = stat(filename)
                signature: Optional[_Signature] = (
                    st.st_mtime_ns,
                    st.st_size,
                    st.st_ino,
                )
            except OSError:
                signature = None
            old = mtimes.get(filename, _UNSEEN)
            if old != signature:
                if old is not _UNSEEN:
                    return filename
                mtimes[filename] = signature
        return None


class _WatchTask(BackgroundTask):
    """A BackgroundTask whose sleep also ends when inotify has events."""

    def __init__(self, watcher: _Inotify, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watcher = watcher

    def cancel(self) -> None:
        super().cancel()
        self.watcher.wake()

    def _sleep(self) -> bool:
        if not self._cancelled.is_set():
            self.watcher.wait(self.interval)
        return self._cancelled.is_set()

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.watcher.close()


# inotify(7) constants, from <sys/inotify.h>.
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF = 0x400, 0x800
_IN_Q_OVERFLOW, _IN_IGNORED, _IN_ONLYDIR = 0x4000, 0x8000, 0x1000000
_IN_WATCH_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
)
_IN_GONE = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_IGNORED


class _Inotify:
    """Linux inotify through ctypes: which watched files may have changed.

    Watches directory entries, not files, so that a save by rename (a new
    inode) is seen.  For each watched path it watches the entry of every
    symlink met while resolving it and the entry of the file it resolves
    to: a ConfigMap's swapped ``..data`` link or a link target edited in
    another directory count as changes of the path.  Events are mapped
    back to the paths as they were given, by watch descriptor, so one
    directory named two ways (``settings.ini`` and ``/srv/app/mod.py``)
    serves both.  Raises OSError when inotify is unavailable.
    """

    def __init__(self) -> None:
        if not _LINUX:
            raise OSError(errno.ENOSYS, 'inotify exists only on Linux')
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        init1 = libc.inotify_init1  # AttributeError: no such symbol.
        add_watch = libc.inotify_add_watch
        add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._add_watch: Callable[[int, bytes, int], int] = add_watch
        fd: int = init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), 'inotify_init1')
        self._get_errno = ctypes.get_errno
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._lock = threading.Lock()
        _guard_for_fork(self)
        self._closed = False
        # real directory -> watch descriptor, or None
        self._wds: Dict[str, Optional[int]] = {}
        # watch descriptor -> {name: watched paths}
        self._paths: Dict[int, Dict[str, Set[str]]] = {}
        # directory as given -> _resolve_links()
        self._resolved: Dict[str, Tuple[str, List[Tuple[str, str]]]] = {}
        # files whose directory cannot be watched
        self.unwatched: Set[str] = set()
        self.failed = False  # set by the reloader: poll instead

    def add(self, filenames: Iterable[str]) -> None:
        """Watch what these paths go through; OSError at the watch limit.

        Adding a path again watches it anew, as it resolves now.
        """
        for path in filenames:
            watched = True
            for directory, name in self._entries_of(path):
                wd = self._watch(directory)
                if wd is None:
                    watched = False
                else:
                    names = self._paths.setdefault(wd, {})
                    names.setdefault(name, set()).add(path)
            if watched:
                self.unwatched.discard(path)
            else:
                self.unwatched.add(path)  # Polled instead.

    def _entries_of(self, path: str) -> List[Tuple[str, str]]:
        """List the (real directory, name) entries `path` goes through:
        each symlink met while resolving it, then the file it names."""
        directory, name = os.path.split(path)
        entries: List[Tuple[str, str]] = []
        for _ in range(_MAX_SYMLINKS):
            resolved = self._resolved.get(directory)
            if resolved is None:
                resolved = _resolve_links(directory or os.curdir)
                self._resolved[directory] = resolved
            real, links = resolved
            entries.extend(links)
            entries.append((real, name))
            try:
                target = os.readlink(os.path.join(real, name))
            except OSError:  # Not a symlink, or missing: the chain ends.
                break
            directory, name = os.path.split(os.path.join(real, target))
        return entries

    def _watch(self, directory: str) -> Optional[int]:
        """Return the watch descriptor of `directory`; None if it has none."""
        wd = self._wds.get(directory, -1)
        if wd == -1:
            wd = self._add_watch(
                self.fd, os.fsencode(directory), _IN_WATCH_MASK
            )
            if wd < 0:
                code = self._get_errno()
                if code == errno.ENOSPC:
                    raise OSError(
                        code,
                        'inotify watch limit reached '
                        '(fs.inotify.max_user_watches)',
                    )
                wd = None
            self._wds[directory] = wd
        return wd

    def wait(self, timeout: float) -> None:
        """Block until an event, a wake() or `timeout` seconds."""
        # poll() takes at most ~24 days: a longer wait wakes early, once.
        ready = _readable([self.fd, self._wake_r], min(timeout, 86400.0))
        if self._wake_r in ready:
            os.read(self._wake_r, 512)

    def wake(self) -> None:
        """End a wait() now (from any thread)."""
        with self._lock:
            if not self._closed:
                try:
                    os.write(self._wake_w, b'x')
                except OSError:
                    pass  # Pipe full: a wake-up is pending anyway.

    def pop_changed(self) -> Set[str]:
        """Return the watched paths with events, once a save has settled."""
        changed: Set[str] = set()
        self._drain(changed)
        deadline = time.monotonic() + 0.5  # A file written without pause.
        while changed and time.monotonic() < deadline:
            if not _readable([self.fd], _DEBOUNCE):
                break
            self._drain(changed)
        if changed:  # A symlink may have moved: resolve afresh.
            self._resolved.clear()
            self._wds = {d: wd for d, wd in self._wds.items() if wd}
        return changed

    def _drain(self, changed: Set[str]) -> None:
        import struct

        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                wd, mask, _, length = struct.unpack_from('iIII', data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b'\0')
                offset += 16 + length
                self._note(wd, mask, os.fsdecode(name), changed)

    def _note(self, wd: int, mask: int, name: str, changed: Set[str]) -> None:
        if mask & _IN_Q_OVERFLOW:  # Events were lost: check everything.
            for by_name in self._paths.values():
                for paths in by_name.values():
                    changed.update(paths)
            return
        names = self._paths.get(wd)
        if names is None:
            return
        if mask & _IN_GONE:  # The directory itself was removed or moved.
            for paths in names.values():
                changed.update(paths)
            if mask & _IN_IGNORED:  # Its watch is gone: forget it.
                del self._paths[wd]
                for directory in [d for d, w in self._wds.items() if w == wd]:
                    del self._wds[directory]
        elif name in names:
            changed.update(names[name])

    def close(self) -> None:
        """Release the descriptors; later wake() calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.fd, self._wake_r, self._wake_w):
                _close_quietly(fd)


_MAX_SYMLINKS = 40  # Linux's own limit when it resolves a path.


def _resolve_links(path: str) -> Tuple[str, List[Tuple[str, str]]]:
    """Resolve `path` as the kernel would: (real path, links met).

    Each symlink met is given as the (real directory, name) of its entry.
    A missing component ends the resolution there; so does a loop.
    """
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    parts = path.split(os.sep)
    parts.reverse()
    real = os.sep
    links: List[Tuple[str, str]] = []
    while parts:
        part = parts.pop()
        if part in ('', os.curdir):
            continue
        if part == os.pardir:
            real = os.path.dirname(real)
            continue
        candidate = os.path.join(real, part)
        try:
            target = os.readlink(candidate)
        except OSError:  # A directory, or missing: taken as it is.
            real = candidate
            continue
        if len(links) == _MAX_SYMLINKS:  # A loop: stop following.
            real = candidate
            continue
        links.append((real, part))
        if os.path.isabs(target):
            real = os.sep
        parts.extend(reversed(target.split(os.sep)))
    return real, links


# -- ThreadManager ------------------------------------------------------------


class ThreadManager(SimplePlugin):
    """Number the threads that serve requests, and announce their life.

    Channels: ``acquire_thread`` (call it from a thread that starts work;
    the first time, ``start_thread`` is published with the thread's index),
    ``release_thread`` (publishes ``stop_thread``), ``stop`` and
    ``graceful`` (release every thread).  Indexes start at 1 and are unique
    among the threads that hold one.  ``threads`` maps thread ident to index.
    """

    def __init__(self, bus: Bus) -> None:
        self.threads: Dict[int, int] = {}
        super().__init__(bus)
        self._lock = threading.RLock()  # A signal handler can reach stop().
        _guard_for_fork(self)
        for channel in (
            'acquire_thread',
            'start_thread',
            'release_thread',
            'stop_thread',
        ):
            self.bus.listeners.setdefault(channel, set())

    def acquire_thread(self) -> None:
        """Give the calling thread an index; publish ``start_thread``."""
        ident = threading.get_ident()
        with self._lock:
            if ident in self.threads:
                return
            used = set(self.threads.values())
            index = 1
            while index in used:
                index += 1
            self.threads[ident] = index
        self.bus.publish('start_thread', index)

    def release_thread(self) -> None:
        """Free the calling thread's index; publish ``stop_thread``."""
        with self._lock:
            index = self.threads.pop(threading.get_ident(), None)
        if index is not None:
            self.bus.publish('stop_thread', index)

    def stop(self) -> None:
        """Release every thread; ``stop_thread`` for each."""
        with self._lock:
            indexes = sorted(self.threads.values())
            self.threads.clear()
        for index in indexes:
            self.bus.publish('stop_thread', index)

    graceful = stop


# -- Containers: ChildReaper and ProbeFiles -----------------------------------


class ChildReaper(SimplePlugin):
    """Reap orphaned descendants, as a container's init (PID 1) must.

    The kernel hands every orphaned process to PID 1 of its PID namespace
    (or to the nearest "child subreaper" above it), and each stays a zombie
    once it ends until that process waits for it.  A Python service that
    runs as PID 1 (``CMD ["python", "-m", "app"]``) or spawns programs that
    leave orphans then piles up zombies until fork() fails.  This plugin
    reaps them, as PID 1, or as a subreaper when `subreaper` is true
    (``prctl(PR_SET_CHILD_SUBREAPER)`` through ctypes, on ``start``;
    cleared again on ``stop`` if this plugin set it).

    It never takes the exit status of a child the program waits for
    itself: the kernel cannot tell an adopted orphan from a child of our
    own (both have us as parent), so a zombie is reaped only once it has
    stayed one for ``grace`` seconds (a thread blocked in waitpid() for
    its child reaps it at once, so such a zombie never ages) and only if
    its PID is not one the program still waits for: a live
    subprocess.Popen (asyncio's subprocesses hold one too), a
    multiprocessing process or helper, or a PID registered with keep().
    Register with keep() any other child that the program waits for
    later than ``grace`` after it ends (os.fork(), os.posix_spawn(),
    pty.fork() followed by other work), or use subprocess.  A program that
    reaps its own children with ``os.waitpid(-1, ...)`` (a pre-fork
    server) does not need this plugin.

    Channels: ``start`` (priority 70, after Daemonizer's fork) starts a
    daemon thread named ``ChildReaper``; ``stop`` (priority 90, after the
    other stop listeners, whose shutdown may leave orphans) ends it.
    Every ``interval`` seconds the thread peeks with ``os.waitid(P_ALL,
    WNOWAIT)``, which reaps nothing and costs one system call; only when
    some child is a zombie does it read ``/proc`` to list them, and only
    when one has aged does it look for Popen objects (gc.get_objects(),
    a walk of the heap).  Each orphan reaped is logged at DEBUG with its
    PID and status, and counted in ``reaped``.

    Linux only: elsewhere, and when this process is neither PID 1 nor a
    subreaper, or /proc shows another PID namespace (mount one:
    ``unshare --mount-proc``; container runtimes do), ``start`` logs that
    there is nothing to reap and does nothing.
    """

    interval: float = 0.1
    """Seconds between two peeks for zombies."""
    grace: float = 0.2
    """Seconds a zombie must stay one before it is reaped."""

    def __init__(self, bus: Bus, subreaper: bool = False) -> None:
        super().__init__(bus)
        if subreaper not in (True, False):
            raise TypeError(
                'ChildReaper subreaper must be True or False, not %r'
                % (subreaper,)
            )
        self.subreaper: bool = bool(subreaper)
        """Become a subreaper on start when not PID 1."""
        self.reaped: int = 0
        """How many orphans this plugin reaped."""
        self.thread: Optional[threading.Thread] = None
        """The reaping thread while it runs, else None."""
        self._lock = threading.RLock()  # A signal handler can reach stop().
        self._stopped: Optional[threading.Event] = None  # Ends the thread.
        # pid -> start time (None: unknown) from keep()
        self._kept: Dict[int, Optional[int]] = {}
        self._prune_at = 16  # Forget ended kept PIDs past this many.
        self._made_subreaper = False
        _guard_for_fork(self)

    def __repr__(self) -> str:
        return 'ChildReaper(subreaper=%r)' % self.subreaper

    def keep(self, pid: int) -> Callable[[], None]:
        """Never reap child `pid`: the program will wait for it itself.

        Call it right after the fork.  Returns a function that undoes it,
        as release(pid) does; the PID is forgotten anyway once its process
        is gone, so a new process given the same PID is not kept.  Raises
        TypeError or ValueError unless `pid` is a positive int.
        """
        if not _is_int(pid):  # Untyped callers may pass anything.
            raise TypeError('PID must be an int, not %r' % (pid,))
        if pid <= 0:
            raise ValueError('Invalid PID: %r (a positive int)' % (pid,))
        start = _start_time(pid)
        with self._lock:
            self._kept[pid] = start
            prune = len(self._kept) >= self._prune_at
        if prune:
            self._prune()
        return lambda: self.release(pid)

    def release(self, pid: int) -> None:
        """Let child `pid` be reaped again like any orphan."""
        with self._lock:
            self._kept.pop(pid, None)

    def _prune(self) -> None:
        with self._lock:
            kept = dict(self._kept)
        ended: List[int] = []
        for pid, start in kept.items():
            now = _start_time(pid)
            if now is None or start not in (None, now):
                ended.append(pid)
        with self._lock:
            for pid in ended:
                if pid in self._kept and self._kept[pid] == kept[pid]:
                    del self._kept[pid]
            self._prune_at = 2 * len(self._kept) + 16

    def _is_kept(self, zombie: _Zombie) -> bool:
        pid, start = zombie
        with self._lock:
            return pid in self._kept and self._kept[pid] in (None, start)

    def start(self) -> None:
        """Start reaping if this process adopts orphans; else log why not."""
        if self.thread is not None:
            self.bus.log('ChildReaper already running.')
            return
        role = self._role()
        if role is None:
            return
        stopped = threading.Event()
        thread = threading.Thread(
            target=self._run, args=(stopped,), name='ChildReaper'
        )
        thread.daemon = True
        with self._lock:
            self.thread, self._stopped = thread, stopped
        thread.start()
        self.bus.log('Reaping orphaned processes as %s.' % role)

    start.priority = 70  # type: ignore[attr-defined]  # Read by subscribe().

    def _role(self) -> Optional[str]:
        """Return 'PID 1' or 'a subreaper', or log why neither and None."""
        if not _LINUX:
            self.bus.log(
                'ChildReaper does nothing on %r: it needs Linux.'
                % sys.platform
            )
            return None
        if os.getpid() != 1 and not self.subreaper:
            self.bus.log(
                'ChildReaper has nothing to reap: PID %r is not PID 1 and '
                'subreaper=False, so orphans go to init.' % os.getpid()
            )
            return None
        if not _proc_shows_self():
            self.bus.log(
                'ChildReaper cannot reap: /proc belongs to another PID '
                'namespace (PID %r is not /proc/self). Mount a /proc for '
                'this namespace (unshare --mount-proc).' % os.getpid(),
                level=_WARNING,
            )
            return None
        if os.getpid() == 1:
            return 'PID 1'
        try:
            if not _child_subreaper():
                _set_child_subreaper(True)
                self._made_subreaper = True
        except (OSError, AttributeError) as exc:  # No symbol, or refused.
            self.bus.log(
                'ChildReaper could not make PID %r a child subreaper (%s); '
                'orphans go to init.' % (os.getpid(), exc),
                level=_WARNING,
            )
            return None
        return 'a subreaper'

    def stop(self) -> None:
        """End the reaping thread; stop being a subreaper if we became one."""
        with self._lock:
            thread, self.thread = self.thread, None
            stopped = self._stopped
        if thread is None or stopped is None:  # Both set, or neither.
            return
        stopped.set()
        if thread is not threading.current_thread():
            thread.join()
        if self._made_subreaper:
            self._made_subreaper = False
            try:
                _set_child_subreaper(False)
            except OSError as exc:
                self.bus.log(
                    'Could not stop being a child subreaper: %s' % exc,
                    level=_WARNING,
                )
        self.bus.log('Stopped reaping orphaned processes.')

    stop.priority = 90  # type: ignore[attr-defined]  # Read by subscribe().

    def _run(self, stopped: threading.Event) -> None:
        seen: Dict[_Zombie, float] = {}  # zombie -> when first seen
        theirs: Dict[_Zombie, bool] = {}  # whether the program waits for it
        try:
            while not stopped.wait(self.interval):
                if seen or _zombie_waiting():
                    seen, theirs = self._reap(seen, theirs)
        except Exception:
            self.bus.log(
                'ChildReaper stopped: error in its thread.',
                level=_ERROR,
                traceback=True,
            )

    def _reap(
        self, seen: Dict[_Zombie, float], theirs: Dict[_Zombie, bool]
    ) -> Tuple[Dict[_Zombie, float], Dict[_Zombie, bool]]:
        """Reap the aged zombies nobody waits for; return the new state."""
        now = time.monotonic()
        zombies = _zombie_children()
        seen = {zombie: seen.get(zombie, now) for zombie in zombies}
        theirs = {z: theirs[z] for z in zombies if z in theirs}
        aged = [
            zombie
            for zombie, since in seen.items()
            if now - since >= self.grace and not self._is_kept(zombie)
        ]
        unknown = [zombie for zombie in aged if zombie not in theirs]
        if unknown:  # Walk the heap once for all of them.
            waited = _waited_pids()
            for zombie in unknown:
                theirs[zombie] = zombie[0] in waited
        for zombie in aged:
            if not theirs[zombie]:
                self._reap_one(zombie[0])
        return seen, theirs

    def _reap_one(self, pid: int) -> None:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # The program waited for it meanwhile.
        if reaped != pid:
            return  # A leader whose other threads still run: not yet.
        self.reaped += 1
        self.bus.log(
            'Reaped orphaned process %r (%s).' % (pid, _exit_reason(status)),
            level=_DEBUG,
        )


def _read_stat(pid: Union[int, str]) -> Optional[Tuple[bytes, int, int]]:
    """Return (state, parent PID, start time) of process `pid`, or None."""
    try:
        fd = os.open('/proc/%s/stat' % pid, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 2048)
    except OSError:
        return None
    finally:
        os.close(fd)
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    fields = data.rpartition(b')')[2].split()
    try:
        return fields[0], int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _start_time(pid: int) -> Optional[int]:
    stat = _read_stat(pid) if _LINUX else None
    return None if stat is None else stat[2]


def _zombie_children() -> Set[_Zombie]:
    """Return the (pid, start time) of each zombie child of this process."""
    me = os.getpid()
    zombies: Set[_Zombie] = set()
    for name in os.listdir('/proc'):
        if name.isdigit():
            stat = _read_stat(name)
            if stat is not None and stat[0] == b'Z' and stat[1] == me:
                zombies.add((int(name), stat[2]))
    return zombies


def _zombie_waiting() -> bool:
    """Tell whether some child is a zombie, without reaping it."""
    if not _CAN_PEEK_AT_ZOMBIES:
        return True  # Cannot peek: the caller scans /proc each time.
    try:
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        return os.waitid(os.P_ALL, 0, flags) is not None
    except ChildProcessError:
        return False  # No child at all.


def _waited_pids() -> Set[Optional[int]]:
    """Return the PIDs of the children the program will wait for itself.

    Popen objects whose returncode is None (but not those subprocess keeps
    in its ``_active`` list: dropped unwaited, reaped by nobody), and
    multiprocessing's processes and helper processes.  Walks every object
    of the heap (a few ms per 100,000 objects), so it runs only when a
    zombie has aged.
    """
    import gc

    pids: Set[Optional[int]] = set()
    subprocess = sys.modules.get('subprocess')
    popen_fork = sys.modules.get('multiprocessing.popen_fork')
    classes = tuple(m.Popen for m in (subprocess, popen_fork) if m)
    dropped = {id(p) for p in getattr(subprocess, '_active', None) or ()}
    if classes:
        for obj in gc.get_objects():
            if (  # By type(): a proxy's __class__ is never asked.
                issubclass(type(obj), classes)
                and getattr(obj, 'returncode', 0) is None
                and id(obj) not in dropped
            ):
                pids.add(getattr(obj, 'pid', None))
    for module, holder, attr in (
        ('multiprocessing.resource_tracker', '_resource_tracker', '_pid'),
        ('multiprocessing.forkserver', '_forkserver', '_forkserver_pid'),
    ):
        helper = getattr(sys.modules.get(module), holder, None)
        pids.add(getattr(helper, attr, None))
    pids.discard(None)
    return pids


def _exit_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        return 'killed by signal %d' % os.WTERMSIG(status)
    return 'exit status %d' % os.WEXITSTATUS(status)


def _proc_shows_self() -> bool:
    """Tell whether /proc is this PID namespace's (it names us as self)."""
    try:
        return os.readlink('/proc/self') == str(os.getpid())
    except OSError:
        return False


def _prctl(option: int, arg: object) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    if libc.prctl(option, arg, zero, zero, zero) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), 'prctl')


def _child_subreaper() -> bool:
    """Tell whether this process is a child subreaper."""
    import ctypes

    flag = ctypes.c_int(0)
    _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag))
    return bool(flag.value)


def _set_child_subreaper(on: bool) -> None:
    import ctypes

    _prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(int(on)))


_DRAIN_STEP = 0.1  # Seconds between two looks at the bus while draining.


class ProbeFiles(SimplePlugin):
    """Show readiness and liveness as files, for exec probes; drain.

    An orchestrator's ``exec`` probe (Kubernetes, Nomad) or any supervisor
    that can look at files asks "ready?" with ``test -e READY`` and
    "alive?" by the age of ALIVE.  Channels:

    - ``start`` (priority 10) removes a `ready` an earlier run left and
      creates `alive`; ``started`` creates `ready` (so only once every
      start listener succeeded) and touches `alive`.
    - ``main``, which block() publishes every interval while it waits,
      touches `alive` once `interval` seconds have passed, while STARTED:
      a wedged main thread lets it go stale.
    - ``stop`` (priority 0, the first thing an exit does) removes `ready`.
      When the bus exits from STARTED (not for restart(), whose sockets
      ListenSockets keeps, nor for a plain stop()), it then waits `drain`
      seconds before the other stop listeners run, so the service goes on
      serving while the orchestrator stops routing to it; `alive` is still
      touched meanwhile.  A second SIGTERM or Ctrl+C ends the wait at once.
    - ``_drain``, which run_async() publishes on the loop as an exit is
      asked for: the same, but the main task (the server) goes on running
      `drain` seconds before the bus cancels it; the loop is never blocked.
    - ``exit`` removes both files.

    `ready` and `alive` are paths (None: not used), made absolute, naming
    a file (not '', a directory, or with a NUL), whose directory must exist
    and be writable; `interval` a finite number of seconds > 0; `drain` a
    finite number of seconds >= 0.  Anything else raises here.
    A symlink or anything but a regular file at a path is refused, and a
    file is removed only if it is still the one this plugin made.  A file
    that cannot be made or touched is logged (for ``start``: raised), so
    the probe fails and says why.
    """

    def __init__(
        self,
        bus: Bus,
        ready: Optional[str] = None,
        alive: Optional[str] = None,
        interval: float = 5,
        drain: float = 0,
    ) -> None:
        super().__init__(bus)
        self.ready: Optional[str] = _probe_path(ready, 'Ready file')
        """Absolute path of the readiness file, or None."""
        self.alive: Optional[str] = _probe_path(alive, 'Alive file')
        """Absolute path of the liveness file, or None."""
        if self.ready is not None and self.alive is not None:
            if self.ready == self.alive:
                raise ValueError(
                    'ProbeFiles ready and alive must differ, not both %r.'
                    % (self.ready,)
                )
        if not _is_wait(interval) or interval <= 0:
            raise ValueError(
                'Invalid interval: %r (seconds, a finite number > 0)'
                % (interval,)
            )
        if not _is_wait(drain) or drain < 0:
            raise ValueError(
                'Invalid drain: %r (seconds, a finite number >= 0)' % (drain,)
            )
        self.interval: float = interval
        """Seconds between two touches of `alive`."""
        self.drain: float = drain
        """Seconds to go on serving after an exit is asked for."""
        # path -> (st_dev, st_ino) of the file we made
        self._made: Dict[str, Tuple[int, int]] = {}
        # monotonic time of the last touch of alive
        self._touched: Optional[float] = None
        self._touch_failed = False
        self._serving = False  # Between started and stop: drain applies.
        # run_async(): when the main task's drain ends (monotonic), or None
        self._draining_until: Optional[float] = None

    def __repr__(self) -> str:
        return 'ProbeFiles(ready=%r, alive=%r, interval=%r, drain=%r)' % (
            self.ready,
            self.alive,
            self.interval,
            self.drain,
        )

    def _listeners(self) -> Tuple[_Subscription, ...]:
        return (
            ('start', self.start, 10),
            ('started', self.started, None),
            ('main', self.main, None),
            ('stop', self.stop, 0),
            ('exit', self.exit, None),
            ('_drain', self._drain_async, None),
        )

    def subscribe(self) -> None:
        """Subscribe to every channel above (``started`` included)."""
        for channel, listener, priority in self._listeners():
            self.bus.subscribe(channel, listener, priority)

    def unsubscribe(self) -> None:
        """Unsubscribe from every channel above."""
        for channel, listener, _ in self._listeners():
            self.bus.unsubscribe(channel, listener)

    def start(self) -> None:
        """Remove a stale `ready`; create `alive` (OSError naming it)."""
        if self.ready is not None and self.ready not in self._made:
            self._remove_stale(self.ready)
        if self.alive is not None:
            self._make(self.alive)
            self._touched = time.monotonic()

    def started(self) -> None:
        """Create `ready` and touch `alive`: the bus is STARTED."""
        self._serving = True
        if self.ready is not None:
            try:
                self._make(self.ready)
                self.bus.log('Ready: created %r.' % self.ready)
            except OSError as exc:
                self.bus.log(
                    'Could not create ready file %r: %s' % (self.ready, exc),
                    level=_ERROR,
                )
        self._touch_alive(force=True)

    def main(self) -> None:
        """Touch `alive` if `interval` seconds have passed, while STARTED."""
        if self.bus.state is states.STARTED:
            self._touch_alive()

    def stop(self) -> None:
        """Remove `ready`; when exiting from STARTED, wait `drain` s."""
        # Draining is part of the bus's exit: it reads the bus's private
        # state, here and in _drain (hence pyright's reportPrivateUsage).
        if self._stop_serving() and self.bus._exit_phase == 'running':
            self._drain()
        elif self._draining_until is not None:  # Under run_async().
            if self.bus._hurry and time.monotonic() < self._draining_until:
                self.bus.log('Draining cut short: stopping now.')
        self._draining_until = None

    def _stop_serving(self) -> bool:
        """Remove `ready`; return whether to drain: leaving STARTED, and
        not for restart() (whose sockets ListenSockets keeps)."""
        serving, self._serving = self._serving, False
        if self.ready is not None:
            self._remove(self.ready)
        return serving and self.drain > 0 and not self.bus.execv

    def _drain_async(self) -> float:
        """Under run_async(), as an exit is asked for: remove `ready`, and
        return how long the main task (the server) is to go on serving."""
        if not self._stop_serving():
            return 0
        self._draining_until = time.monotonic() + self.drain
        self._log_draining()
        return self.drain

    def _log_draining(self) -> None:
        self.bus.log(
            'Draining: serving %r s more before stopping (a second SIGTERM '
            'or Ctrl+C stops now).' % self.drain
        )

    def exit(self) -> None:
        """Remove both files."""
        for path in (self.ready, self.alive):
            if path is not None:
                self._remove(path)
        self._touched = None

    def _drain(self) -> None:
        self._log_draining()
        bus = self.bus
        deadline = time.monotonic() + self.drain
        while not bus._hurry:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._touch_alive()
            # A signal handler releases _wakeup (Bus._wake) on the main
            # thread: a second SIGTERM ends this wait at once there.
            wakeup = bus._wakeup
            wakeup.acquire(timeout=min(remaining, _DRAIN_STEP))
        # Pass on a wake-up this loop may have taken.
        bus._wake()
        if bus._hurry:
            bus.log('Draining cut short: stopping now.')

    def _touch_alive(self, force: bool = False) -> None:
        if self.alive is None or (self._touched is None and not force):
            return  # Not started, or exited.
        now = time.monotonic()
        if (
            not force
            and self._touched is not None  # None only when forced (above).
            and now - self._touched < self.interval
        ):
            return
        self._touched = now
        try:
            self._make(self.alive)
        except OSError as exc:
            if not self._touch_failed:
                self.bus.log(
                    'Could not touch alive file %r: %s' % (self.alive, exc),
                    level=_WARNING,
                )
            self._touch_failed = True
        else:
            if self._touch_failed:
                self.bus.log('Alive file %r touched again.' % self.alive)
            self._touch_failed = False

    def _make(self, path: str) -> None:
        """Create `path` or update its mtime, refusing a non-regular file."""
        import stat

        flags = os.O_WRONLY | os.O_CREAT
        for name in ('O_NOFOLLOW', 'O_CLOEXEC', 'O_NONBLOCK'):
            flags |= getattr(os, name, 0)  # NONBLOCK: a FIFO never hangs.
        fd = os.open(path, flags, 0o644)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OSError(errno.EEXIST, 'not a regular file', path)
            os.utime(fd if _UTIME_BY_FD else path)
        finally:
            os.close(fd)
        self._made[path] = (info.st_dev, info.st_ino)

    def _remove_stale(self, path: str) -> None:
        """Remove a regular file at `path` that an earlier run left (killed,
        on a volume that outlived it): the probe would pass too early."""
        import stat

        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.remove(path)
                self.bus.log(
                    'Removed a stale ready file %r: not ready until started.'
                    % path,
                    level=_WARNING,
                )
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.bus.log(
                'Could not remove stale ready file %r: %s' % (path, exc),
                level=_WARNING,
            )

    def _remove(self, path: str) -> None:
        """Remove `path` if it is the file this plugin made."""
        made = self._made.pop(path, None)
        if made is None:
            return
        try:
            found = os.lstat(path)
            if (found.st_dev, found.st_ino) == made:
                os.remove(path)
            else:
                self.bus.log(
                    'Probe file %r was replaced; leaving it.' % path,
                    level=_WARNING,
                )
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.bus.log(
                'Could not remove probe file %r: %s' % (path, exc),
                level=_WARNING,
            )


def _is_wait(seconds: float) -> bool:
    return _is_number(seconds) and _is_finite_wait(seconds)


def _probe_path(path: Optional[str], what: str) -> Optional[str]:
    """Return `path` made absolute, checked; None stays None.

    Absolute: the program may change its working directory meanwhile.
    """
    if path is None:
        return None
    try:
        path = os.fsdecode(path)
    except TypeError:
        raise TypeError(
            'ProbeFiles %s must be a path or None, not %r'
            % (what.lower(), path)
        ) from None
    if '\0' in path:
        raise ValueError('%s %r contains a NUL byte.' % (what, path))
    # '' would be the working directory: ready never made, only logged.
    if not os.path.basename(path) or os.path.isdir(path):
        raise ValueError('%s %r names a directory, not a file.' % (what, path))
    _check_parent_dir(path, what)
    return os.path.abspath(path)


# -- SystemdNotifier ----------------------------------------------------------


class SystemdNotifier(SimplePlugin):
    """Tell systemd about the service's state (the sd_notify protocol).

    With ``NOTIFY_SOCKET`` set (a path, or ``@name`` for the abstract
    namespace) it sends ``READY=1`` and ``MAINPID`` on ``started`` (so never
    after a failed start), ``RELOADING=1`` with ``MONOTONIC_USEC`` before
    the ``graceful`` listeners (priority 0) and ``READY=1`` after them
    (priority 100), and first thing on ``stop`` (priority 0) ``STOPPING=1``,
    or ``RELOADING=1`` when the bus exits for restart(): systemd then waits
    for the re-executed process's ``READY=1`` instead of killing it.  These
    carry a ``STATUS=``.  ``WATCHDOG=1`` is sent on ``main``, which block()
    publishes every interval, once half of ``WATCHDOG_USEC`` has passed
    since the last ping, while STARTED, if ``WATCHDOG_PID`` is unset or
    names this process: a wedged main thread stops the pings, and systemd's
    ``WatchdogSec`` fires.  Without ``NOTIFY_SOCKET`` subscribe() and
    notify() do nothing; a send that fails is logged, never raised.
    """

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus)
        self.socket_path: Optional[str] = (
            os.environ.get('NOTIFY_SOCKET') or None
        )
        """Where messages go, read from NOTIFY_SOCKET; None disables."""
        # Seconds between pings, while started.
        self._ping_every: Optional[float] = None
        self._last_ping: Optional[float] = None

    def __repr__(self) -> str:
        return 'SystemdNotifier(%r)' % self.socket_path

    def _listeners(self) -> Tuple[_Subscription, ...]:
        return (
            ('started', self.started, None),
            ('main', self._watchdog, None),
            ('graceful', self._reloading, 0),
            ('graceful', self._reloaded, 100),
            ('stop', self.stop, 0),
        )

    def subscribe(self) -> None:
        """Subscribe when NOTIFY_SOCKET is set."""
        if self.socket_path:
            for channel, listener, priority in self._listeners():
                self.bus.subscribe(channel, listener, priority)

    def unsubscribe(self) -> None:
        for channel, listener, _ in self._listeners():
            self.bus.unsubscribe(channel, listener)

    def notify(self, *fields: str) -> None:
        """Send one datagram of ``KEY=value`` fields; log failures.

        Does nothing without NOTIFY_SOCKET.
        """
        if not self.socket_path:
            return
        import socket

        address = self.socket_path
        if address.startswith('@'):
            address = '\0' + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto('\n'.join(fields).encode(), address)
        except OSError as exc:
            self.bus.log(
                'Could not notify systemd at %r: %s' % (self.socket_path, exc),
                level=_WARNING,
            )

    def started(self) -> None:
        """Send READY=1 with our PID; block()'s loop sends the pings."""
        self._ping_every = self._watchdog_interval()
        self._last_ping = None
        self.notify('READY=1', 'MAINPID=%d' % os.getpid(), 'STATUS=started')

    def _watchdog_interval(self) -> Optional[float]:
        usec, pid = (
            os.environ.get('WATCHDOG_USEC'),
            os.environ.get('WATCHDOG_PID'),
        )
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2e6 if int(usec) > 0 else None
        except ValueError:
            self.bus.log(
                'Ignoring WATCHDOG_USEC=%r: not a number.' % usec,
                level=_WARNING,
            )
            return None

    def _watchdog(self) -> None:
        # On ``main``, from the thread in block(): the pings prove that
        # thread alive, which a timer thread of our own would not.
        every = self._ping_every
        if every is None or self.bus.state is not states.STARTED:
            return
        now = time.monotonic()
        if self._last_ping is None or now - self._last_ping >= every:
            self._last_ping = now
            self.notify('WATCHDOG=1')

    def _reloading(self, status: str = 'reloading') -> None:
        self.notify(
            'RELOADING=1',
            'MONOTONIC_USEC=%d' % (time.monotonic_ns() // 1000),
            'STATUS=' + status,
        )

    def _reloaded(self) -> None:
        self.notify('READY=1', 'STATUS=started')

    def stop(self) -> None:
        """Stop the pings; send STOPPING=1, or RELOADING=1 for restart()."""
        self._ping_every = None
        if self.bus.execv:  # The re-executed process sends READY=1.
            self._reloading('restarting')
        else:
            self.notify('STOPPING=1', 'STATUS=stopping')


# -- LoggingBridge ------------------------------------------------------------


class LoggingBridge(SimplePlugin):
    """Forward the bus's ``log`` channel to a logging.Logger.

    Levels are logging's numbers, unchanged; traceback text added by
    ``bus.log(..., traceback=True)`` is part of the message.  `logger`
    defaults to ``logging.getLogger('wspbus')``.  Nothing a handler does
    raises into the bus.
    """

    def __init__(
        self, bus: Bus, logger: Optional[logging.Logger] = None
    ) -> None:
        super().__init__(bus)
        if logger is None:
            import logging

            logger = logging.getLogger('wspbus')
        self.logger: logging.Logger = logger
        """Where records go."""

    def __repr__(self) -> str:
        return 'LoggingBridge(%r)' % self.logger.name

    def log(self, msg: str, level: int) -> None:
        """Log `msg` at `level`."""
        try:
            self.logger.log(level, msg)
        except Exception:
            pass  # The bus must outlive a broken handler.


# -- Demo ---------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo service of ``python -m wspbus_plugins``; return status.

    Bad options print one line naming the value and exit 2 (SystemExit),
    and so does a --listen address in use (return 2); a failed start ends
    the process with status 70.
    """
    options = _parse_demo_options(argv)
    demo = Bus()
    LoggingBridge(demo, _demo_logger(options)).subscribe()
    if options.listen:  # Bound first: in use, it is a bad option.
        sockets = ListenSockets(demo)
        try:
            listening = sockets.listen('demo', options.listen)
        except OSError as exc:
            sys.stderr.write(
                'python -m wspbus_plugins: error: argument --listen: %s\n'
                % exc.strerror
            )
            return 2
        sockets.subscribe()
        _DemoServer(demo, listening).subscribe()
    if not options.quiet:
        sys.stderr.write(
            'wspbus_plugins %s demo, PID %d. Stop it with Ctrl+C or '
            'kill -TERM %d; kill -USR1 %d reloads it.\n'
            % (__version__, os.getpid(), os.getpid(), os.getpid())
        )
    SignalHandler(demo).subscribe()
    threads = ThreadManager(demo)
    threads.subscribe()
    if options.daemonize:
        Daemonizer(demo).subscribe()
    if options.pidfile:
        PIDFile(demo, options.pidfile).subscribe()
    if (options.user, options.group, options.umask) != (None, None, None):
        DropPrivileges(
            demo, umask=options.umask, uid=options.user, gid=options.group
        ).subscribe()
    if options.autoreload or options.watch:
        reloader = Autoreloader(demo)
        reloader.files.update(os.path.abspath(path) for path in options.watch)
        reloader.subscribe()
    if options.systemd:
        SystemdNotifier(demo).subscribe()
    if options.heartbeat > 0:

        def heartbeat() -> None:
            demo.publish('acquire_thread')
            demo.log(
                'Heartbeat from PID %d (thread index %r).'
                % (os.getpid(), threads.threads.get(threading.get_ident()))
            )

        Monitor(
            demo, heartbeat, options.heartbeat, name='heartbeat'
        ).subscribe()
    if options.duration is not None:
        timer = threading.Timer(options.duration, demo.exit)
        timer.name = 'demo duration'
        timer.daemon = True
        demo.subscribe('started', timer.start)
        demo.subscribe('exit', timer.cancel)
    demo.start()
    demo.block()
    return 0


class _DemoServer(SimplePlugin):
    """Answer each connection with one line: our PID and start count.

    The start count lives in the environment, so it survives restart().
    """

    def __init__(self, bus: Bus, sock: socket.socket) -> None:
        super().__init__(bus)
        self.sock = sock
        self.thread: Optional[threading.Thread] = None
        self._done = threading.Event()

    def start(self) -> None:
        starts = int(os.environ.get('WSPBUS_DEMO_STARTS', '0')) + 1
        os.environ['WSPBUS_DEMO_STARTS'] = str(starts)
        reply = b'wspbus_plugins demo, PID %d, start %d\n' % (
            os.getpid(),
            starts,
        )
        self._done.clear()
        self.thread = threading.Thread(
            target=self._serve, args=(reply,), name='demo server'
        )
        self.thread.start()

    # Serve once all else is ready (privileges too).
    start.priority = 80  # type: ignore[attr-defined]  # Read by subscribe().

    def _serve(self, reply: bytes) -> None:
        while not self._done.is_set():
            if _readable([self.sock.fileno()], 0.05):
                connection = self.sock.accept()[0]
                with connection:
                    connection.sendall(reply)

    def stop(self) -> None:
        """Stop accepting; connections meanwhile wait for the next start."""
        self._done.set()
        if self.thread is not None:
            self.thread.join()


def _demo_logger(options: argparse.Namespace) -> logging.Logger:
    import logging

    logger = logging.getLogger('wspbus.demo')
    logger.propagate = False
    handler: logging.Handler
    if options.log_file:
        handler = logging.FileHandler(options.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter('%(asctime)s %(levelname)-7s %(message)s')
    )
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if options.quiet else logging.INFO)
    return logger


def _parse_demo_options(
    argv: Optional[Sequence[str]],
) -> argparse.Namespace:
    import argparse

    def option_type(check: Callable[[str], _T]) -> Callable[[str], _T]:
        def convert(text: str) -> _T:
            try:
                return check(text)
            except (ValueError, KeyError) as exc:
                raise argparse.ArgumentTypeError(exc.args[0]) from None

        convert.__name__ = check.__name__
        return convert

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= threading.TIMEOUT_MAX:  # NaN fails too.
            raise ValueError(
                'invalid number of seconds: %r (a number from 0 to %d)'
                % (text, threading.TIMEOUT_MAX)
            )
        return value

    def umask(text: str) -> int:
        if (
            not text
            or any(c not in '01234567' for c in text)
            or int(text, 8) > 0o777
        ):
            raise ValueError('invalid umask: %r (octal, like 022)' % text)
        return int(text, 8)

    def user(text: str) -> str:
        DropPrivileges(Bus(), uid=text)  # ValueError names an unknown one.
        return text

    def group(text: str) -> str:
        DropPrivileges(Bus(), gid=text)
        return text

    def writable_path(text: str) -> str:
        _check_parent_dir(text, 'the')
        return text

    def address(text: str) -> Tuple[str, int]:
        host, colon, port = text.rpartition(':')
        if not (colon and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(
                'invalid address: %r (HOST:PORT, like 127.0.0.1:8080)' % text
            )
        return host.strip('[]'), int(port)

    parser = argparse.ArgumentParser(
        prog='python -m wspbus_plugins',
        description='Run a small demo service on the process bus: it logs '
        'every bus transition and a heartbeat, and handles SIGTERM/Ctrl+C '
        '(exit), SIGHUP (exit, or restart when daemonized) and SIGUSR1 '
        '(graceful reload).',
    )
    add = parser.add_argument
    add(
        '--daemonize',
        action='store_true',
        help='detach into the background; the command returns once the '
        'daemon has started (non-zero if it failed)',
    )
    add(
        '--pidfile',
        metavar='PATH',
        type=option_type(writable_path),
        help='write the PID here while running; refuse to start if another '
        'running instance holds it',
    )
    add(
        '--user',
        metavar='NAME',
        type=option_type(user),
        help='switch to this user after start-up (needs root)',
    )
    add(
        '--group',
        metavar='NAME',
        type=option_type(group),
        help='switch to this group after start-up (needs root)',
    )
    add(
        '--umask',
        metavar='022',
        type=option_type(umask),
        help='set this umask (octal) after start-up',
    )
    add(
        '--autoreload',
        action='store_true',
        help='restart when an imported module or a --watch file changes',
    )
    add(
        '--watch',
        metavar='FILE',
        action='append',
        default=[],
        help='a file to watch (repeatable; implies --autoreload)',
    )
    add(
        '--heartbeat',
        metavar='SECONDS',
        type=option_type(seconds),
        default=5.0,
        help='log a heartbeat this often; 0 disables (default: 5)',
    )
    add(
        '--systemd',
        action='store_true',
        help='report readiness, reloads and stopping to systemd '
        '(NOTIFY_SOCKET), with watchdog pings',
    )
    add(
        '--listen',
        metavar='HOST:PORT',
        type=option_type(address),
        help='answer each TCP connection with a line naming the PID and the '
        'start count; the socket stays open across restarts, so '
        '--autoreload, and kill -HUP with --daemonize, restart it without '
        'refusing a connection (without --daemonize, SIGHUP exits)',
    )
    add(
        '--duration',
        metavar='SECONDS',
        type=option_type(seconds),
        help='exit after this many seconds (for scripts and tests)',
    )
    add(
        '--log-file',
        metavar='PATH',
        type=option_type(writable_path),
        help='append the log here instead of stderr',
    )
    add(
        '--quiet',
        action='store_true',
        help='log warnings and errors only; no banner',
    )
    add('--version', action='version', version='%(prog)s ' + __version__)

    def one_line_error(message: str) -> NoReturn:
        parser.exit(2, '%s: error: %s\n' % (parser.prog, message))

    # mypy refuses a method patched on an instance; this one parser wants it.
    parser.error = one_line_error  # type: ignore[method-assign]
    return parser.parse_args(argv)


if __name__ == '__main__':
    sys.exit(main())
