"""Patch a pyfuse3 3.5.0 source tree: cached directory listings, fallocate, cheaper requests.

    python tools/pyfuse3/patch.py SRC_DIR      # the unpacked pyfuse3-3.5.0 sdist

Stock pyfuse3 sends every ``opendir``/``releasedir`` to the daemon (two
round trips per directory a program opens) and gives no way to set
FOPEN_CACHE_DIR, so every listing of every directory is a request too:
``find``, ``du`` and ``git status`` on a warm tree spend most of their time
there.  And pyfuse3 has no fallocate handler, so libfuse answers ENOSYS and
the kernel gives every fallocate(2) on the mount EOPNOTSUPP (databases,
torrent clients and ``fallocate -l`` use it).  This patch changes five
handlers and the read loop, and adds two handlers, nothing else:

* ``opendir``: if the file system's ``opendir`` raises ENOSYS, pyfuse3
  replies ENOSYS, and the kernel (Linux >= 5.1) stops sending OPENDIR and
  RELEASEDIR for good and keeps directory listings in its page cache
  (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR are its defaults then).  Changes made
  through the mount invalidate a cached listing.
* ``readdirplus`` and ``fsyncdir``: with no open handle the kernel sends
  fh 0; the patched handlers pass the directory's inode instead when the
  operations class sets ``dir_handle_is_inode = True``.
* ``fallocate``: a new handler, registered with libfuse, that calls
  ``operations.fallocate(fh, mode, offset, length)``; the base class's
  default raises ENOSYS, which makes the kernel stop sending FALLOCATE
  (what a stock pyfuse3 gets for every file system).
* ``getxattr`` (``nocaps_inodes``): the kernel asks for
  ``security.capability`` before every write(2).  If the operations object
  has a ``nocaps_inodes`` container (read once, at ``init``) and the inode
  is in it, the C callback replies ENODATA itself: no coroutine, no trio.
  The file system keeps the container right (deltafs: inodes known to have
  no such attribute; a file that has one is never in it).
* the request loop (``inline_loop``): the read lock is taken with
  ``acquire_nowait`` when free, so a request costs one scheduler pass (the
  wait for the fd) instead of two (trio's ``async with lock`` yields too).
* the request loop (``direct_loop``): one task at a time is the reader.
  While trio has nothing to do (no runnable task, no due deadline, nothing
  ready on its epoll fd) it waits in poll(2) on the FUSE fd *and* trio's
  epoll fd itself, with the GIL released, and runs each handler inline
  with ``coro.send(None)``: a request whose handler does not suspend costs
  poll + read + writev, no scheduler pass, no epoll_ctl.  A handler that
  suspends (a thread, a lock, a timer) hands the reader role to another
  task (started if none waits) and finishes as an ordinary trio task
  (``_pyfuse3._resume_suspended`` passes its yields through).  Whenever
  trio has work, the loop waits through trio as before.  Uses trio
  internals (the runner's runq, tasks, deadlines, epoll object); on
  anything it does not recognise (pyfuse3.asyncio, guest mode, MockClock)
  or with ``PYFUSE3_DIRECT_LOOP=0`` in the environment, the stock loop
  (with ``inline_loop``) runs.
* ``readdir`` (``readdirplus_auto``): stock pyfuse3 answers only
  READDIRPLUS and turns the kernel's adaptive mode off, so every entry of
  every listing is instantiated in the kernel (an inode and a dentry each,
  the bulk of a first ``find``).  The patch adds a plain READDIR handler
  (the same ``operations.readdir``; the token's ``plus`` says which reply
  it builds: ``readdir_reply`` then sends only the name, inode and type)
  and, if the operations class sets ``readdirplus_auto = True``, leaves
  FUSE_CAP_READDIRPLUS_AUTO on: the kernel asks for READDIRPLUS at the
  start of a listing and when a program looks its entries up (``ls -l``),
  plain READDIR otherwise (``find``, ``ls``).  A plain entry adds no
  lookup count.
* the module gets ``DELTAFS_PATCHES``, so deltafs can tell the patched
  build from a stock one: ``dir_handle_is_inode`` (else it falls back to
  normal opendir handles), ``fallocate`` (else fallocate(2) on the mount
  answers EOPNOTSUPP, as with any stock pyfuse3 file system),
  ``nocaps_inodes``, ``inline_loop`` and ``direct_loop`` (else the same
  answers, from Python, through trio for every request), ``readdirplus_auto``
  (else every listing is READDIRPLUS).

Every replacement is checked: on any other pyfuse3 version this fails
loudly instead of building something half-patched.
"""

from __future__ import annotations

import os
import sys

STOCK_LOOP_HEADER = "@async_wrapper\nasync def _session_loop(nursery, int min_tasks, int max_tasks):\n"

# direct_loop: inserted before the stock loop (renamed _session_loop_stock,
# still used when the direct loop cannot work with the event loop)
DIRECT_LOOP = r'''
cdef extern from "<poll.h>" nogil:
    # direct_loop (deltafs patch): poll(2) for the FUSE fd and trio's epoll fd
    struct pollfd:
        int fd
        short events
        short revents
    int c_poll "poll" (pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef object _direct_runner():
    """direct_loop: the trio runner, if this loop can wait for it itself.

    None (the stock loop is used) under pyfuse3.asyncio, trio's guest mode,
    a clock other than the system clock (MockClock), an I/O manager other
    than epoll, or PYFUSE3_DIRECT_LOOP=0 in the environment.
    """
    if os.environ.get('PYFUSE3_DIRECT_LOOP', '1') == '0':
        return None
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT, SystemClock
        runner = GLOBAL_RUN_CONTEXT.runner
        if runner.is_guest or type(runner.clock) is not SystemClock:
            return None
        runner.io_manager._epoll.fileno()
        runner.runq, runner.tasks, runner.waiting_for_idle
        runner.deadlines.next_deadline()
        if not hasattr(worker_data.read_lock or trio.Lock(), 'acquire_nowait'):
            return None
    except Exception:
        return None
    return runner

cdef int _direct_wait(object runner, int epfd, bint after_yield) except -1:
    """direct_loop: wait for the FUSE fd without a pass of trio's scheduler.

    Returns 1 when the FUSE fd is readable and trio has nothing to do, 0
    when trio must run (a task is runnable, a deadline is due, or one of
    trio's fds -- thread wake-ups, signals, sockets -- is ready: its epoll
    fd is polled together with the FUSE fd).  After a yield to trio,
    tasks of the batch we were resumed in may still be waiting to run
    (they are no longer in runq): they count as runnable.
    """
    cdef pollfd fds[2]
    cdef int timeout_ms, n
    if runner.runq or runner.waiting_for_idle:
        return 0
    if after_yield:
        for t in runner.tasks:
            if t._next_send_fn is not None:
                return 0
    deadline = runner.deadlines.next_deadline()
    if deadline == float('inf'):
        timeout_ms = -1
    else:
        dt = deadline - runner.clock.current_time()
        if dt <= 0:
            return 0
        timeout_ms = <int> min(dt * 1000 + 1, 3600000)
    fds[0].fd = session_fd
    fds[0].events = POLLIN
    fds[0].revents = 0
    fds[1].fd = epfd
    fds[1].events = POLLIN
    fds[1].revents = 0
    with nogil:
        n = c_poll(fds, 2, timeout_ms)
    if n <= 0 or fds[1].revents != 0 or fds[0].revents == 0:
        return 0
    return 1

@async_wrapper
async def _session_loop(nursery, int min_tasks, int max_tasks):
    """direct_loop (deltafs patch): one task at a time is the reader; it
    polls the FUSE fd itself (GIL released) while trio has nothing to do,
    and runs each request's handler inline.  Only when a handler really
    suspends (awaits a thread, a lock held elsewhere, a timer) does it give
    up the reader role (another task takes it, or one is started) and
    finish the handler as a normal trio task.  A request whose handler
    does not suspend costs poll + read + writev and no scheduler pass."""
    cdef int res
    cdef int epfd
    cdef int ready
    cdef bint after_yield
    cdef bint done = False
    cdef fuse_buf buf

    runner = _direct_runner()
    if runner is None:
        await _session_loop_stock(nursery, min_tasks, max_tasks)
        return
    epfd = runner.io_manager._epoll.fileno()
    if worker_data.read_lock is None:
        worker_data.read_lock = trio.Lock()
    lock = worker_data.read_lock
    name = trio.lowlevel.current_task().name
    buf.mem = NULL
    buf.size = 0
    buf.pos = 0
    buf.flags = 0
    try:
        while not done and not fuse_session_exited(session):
            # idle tasks besides this one: those waiting for the reader role,
            # and the reader (as in the stock loop, at most min_tasks + 1 idle)
            if worker_data.active_readers + lock.locked() > min_tasks:
                log.debug('%s: too many idle tasks (%d total, %d waiting), terminating.',
                          name, worker_data.task_count, worker_data.active_readers)
                break
            if lock.locked():
                worker_data.active_readers += 1
                try:
                    await lock.acquire()
                finally:
                    worker_data.active_readers -= 1
            else:
                lock.acquire_nowait()
            after_yield = True
            coro = None
            try:
                while True:
                    if fuse_session_exited(session):
                        done = True
                        break
                    ready = _direct_wait(runner, epfd, after_yield)
                    after_yield = False
                    if not ready:
                        try:
                            await trio.lowlevel.wait_readable(session_fd)
                        except trio.ClosedResourceError:
                            log.debug('FUSE fd about to be closed.')
                            done = True
                            break
                        after_yield = True
                        if fuse_session_exited(session):
                            done = True
                            break
                    res = fuse_session_receive_buf(session, &buf)
                    if res == -errno.EINTR or res == -errno.EAGAIN:
                        continue
                    elif res < 0:
                        raise OSError(-res, 'fuse_session_receive_buf failed with '
                                      + strerror(-res))
                    elif res == 0:
                        done = True
                        break
                    save_retval(None)
                    fuse_session_process_buf(session, &buf)
                    if py_retval is None:
                        continue
                    coro = py_retval
                    save_retval(None)
                    try:
                        trap = coro.send(None)
                    except StopIteration:
                        coro = None
                        continue
                    break  # the handler suspended
            finally:
                lock.release()
            if coro is None:
                continue
            # the handler waits: let another task read the FUSE fd meanwhile
            if not worker_data.active_readers and worker_data.task_count < max_tasks:
                worker_data.task_count += 1
                nursery.start_soon(_session_loop, nursery, min_tasks, max_tasks,
                                   name=worker_data.get_name())
            await _pyfuse3._resume_suspended(coro, trap)
            coro = None
    finally:
        log.debug('%s: terminated', name)
        stdlib.free(buf.mem)
        worker_data.task_count -= 1

'''

PATCHES = {
    "src/pyfuse3/handlers.pxi": [
        ("""cdef void fuse_getxattr (fuse_req_t req, fuse_ino_t ino, const_char *name,
                         size_t size):
    cdef _Container c = _Container()
""", """cdef void fuse_getxattr (fuse_req_t req, fuse_ino_t ino, const_char *name,
                         size_t size):
    if (nocaps_inodes is not None and ino in nocaps_inodes
            and string.strcmp(name, b'security.capability') == 0):
        # nocaps_inodes: answered here, no coroutine, no trio (the kernel
        # asks before every write(2))
        if fuse_reply_err(req, ENOATTR) != 0:
            log.error('fuse_getxattr(): fuse_reply_err failed')
        return
    cdef _Container c = _Container()
"""),
        ("""    c.size = size
    c.off = off
    c.fh = fi.fh
    save_retval(fuse_readdirplus_async(c))
""", """    c.size = size
    c.off = off
    c.fh = fi.fh
    c.flags = 1  # READDIRPLUS (readdirplus_auto: fuse_readdir below sends 0)
    if fi.fh == 0 and getattr(operations, 'dir_handle_is_inode', False):
        c.fh = ino
    save_retval(fuse_readdirplus_async(c))

cdef void fuse_readdir (fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                        fuse_file_info *fi):
    # readdirplus_auto (deltafs patch): a plain READDIR, answered by the same
    # operations.readdir with a token whose plus is False
    global py_retval
    cdef _Container c = _Container()
    c.req = req
    c.size = size
    c.off = off
    c.fh = fi.fh
    c.flags = 0
    if fi.fh == 0 and getattr(operations, 'dir_handle_is_inode', False):
        c.fh = ino
    save_retval(fuse_readdirplus_async(c))
"""),
        ("""    token.size = c.size
    token.req = c.req
""", """    token.size = c.size
    token.req = c.req
    token.plus = c.flags != 0
"""),
        ("""    cdef char *buf
    cdef size_t size

cdef void fuse_readdirplus""", """    cdef char *buf
    cdef size_t size
    cdef readonly bint plus  # READDIRPLUS (else a plain READDIR: readdirplus_auto)

cdef void fuse_readdirplus"""),
        ("""    if not conn.capable & FUSE_CAP_READDIRPLUS:
        raise RuntimeError('Kernel too old, pyfuse3 requires kernel 3.9 or newer!')
    conn.want &= ~(<unsigned> FUSE_CAP_READDIRPLUS_AUTO)
""", """    if not conn.capable & FUSE_CAP_READDIRPLUS:
        raise RuntimeError('Kernel too old, pyfuse3 requires kernel 3.9 or newer!')
    if not getattr(operations, 'readdirplus_auto', False):  # deltafs patch: plain READDIR too
        conn.want &= ~(<unsigned> FUSE_CAP_READDIRPLUS_AUTO)
"""),
        ("""    c.flags = datasync
    c.fh = fi.fh
    save_retval(fuse_fsyncdir_async(c))
""", """    c.flags = datasync
    c.fh = fi.fh
    if fi.fh == 0 and getattr(operations, 'dir_handle_is_inode', False):
        c.fh = ino
    save_retval(fuse_fsyncdir_async(c))
"""),
        ("""    if ret != 0:
        log.error('fuse_fsync(): fuse_reply_* failed with %s', strerror(-ret))
""", """    if ret != 0:
        log.error('fuse_fsync(): fuse_reply_* failed with %s', strerror(-ret))


cdef void fuse_fallocate (fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                          off_t length, fuse_file_info *fi):
    cdef _Container c = _Container()
    c.req = req
    c.ino = ino
    c.flags = mode
    c.off = offset
    c.size = length
    c.fh = fi.fh
    save_retval(fuse_fallocate_async(c))

async def fuse_fallocate_async (_Container c):
    cdef int ret

    try:
        await operations.fallocate(c.fh, c.flags, c.off, c.size)
    except FUSEError as e:
        ret = fuse_reply_err(c.req, e.errno)
    else:
        ret = fuse_reply_err(c.req, 0)

    if ret != 0:
        log.error('fuse_fallocate(): fuse_reply_* failed with %s', strerror(-ret))
"""),
    ],
    "src/pyfuse3/internal.pxi": [
        ("""        async with worker_data.read_lock:
            #log.debug('%s: Waiting for fuse fd to become readable...', name)
            if fuse_session_exited(session):
                log.debug('FUSE session exit flag set while waiting for FUSE fd '
                          'to become readable.')
                return False
            await trio.lowlevel.wait_readable(session_fd)
""", """        if not worker_data.read_lock.locked() and hasattr(worker_data.read_lock, 'acquire_nowait'):
            # inline_loop: the usual case, no other reader.  acquire_nowait
            # does not yield to the scheduler (``async with`` does, a whole
            # run-loop pass per request); wait_readable below still does.
            # (trio only: asyncio.Lock has no acquire_nowait)
            worker_data.read_lock.acquire_nowait()
            try:
                if fuse_session_exited(session):
                    return False
                await trio.lowlevel.wait_readable(session_fd)
            finally:
                worker_data.read_lock.release()
            return True
        async with worker_data.read_lock:
            #log.debug('%s: Waiting for fuse fd to become readable...', name)
            if fuse_session_exited(session):
                log.debug('FUSE session exit flag set while waiting for FUSE fd '
                          'to become readable.')
                return False
            await trio.lowlevel.wait_readable(session_fd)
"""),
        (STOCK_LOOP_HEADER, DIRECT_LOOP + STOCK_LOOP_HEADER.replace('_session_loop(', '_session_loop_stock(')),
        ("    fuse_ops.poll = fuse_poll\n",
         "    fuse_ops.poll = fuse_poll\n"
         "    fuse_ops.fallocate = fuse_fallocate\n"
         "    fuse_ops.readdir = fuse_readdir\n"),
    ],
    "src/pyfuse3/__init__.pyx": [
        ("ROOT_INODE = FUSE_ROOT_ID\n",
         "ROOT_INODE = FUSE_ROOT_ID\n"
         "DELTAFS_PATCHES = ('dir_handle_is_inode', 'fallocate', 'nocaps_inodes', 'inline_loop', 'direct_loop',"
         " 'readdirplus_auto')"
         "  # see deltafs tools/pyfuse3/patch.py\n"),
        ("""    cname = PyBytes_AsString(name)
    len_ = fuse_add_direntry_plus(token.req, token.buf, token.size,
                                  cname, &attr.fuse_param, next_id)
""", """    cname = PyBytes_AsString(name)
    if token.plus:
        len_ = fuse_add_direntry_plus(token.req, token.buf, token.size,
                                      cname, &attr.fuse_param, next_id)
    else:  # readdirplus_auto (deltafs patch): name, inode and type only
        len_ = fuse_add_direntry(token.req, token.buf, token.size,
                                 cname, &attr.fuse_param.attr, next_id)
"""),
        ("cdef object py_retval\n",
         "cdef object py_retval\n"
         "cdef object nocaps_inodes = None  # operations.nocaps_inodes (deltafs patch)\n"),
        ("""    operations = ops
""", """    operations = ops
    global nocaps_inodes
    nocaps_inodes = getattr(ops, 'nocaps_inodes', None)
"""),
    ],
    "src/pyfuse3/_pyfuse3.py": [
        ("import functools\n", "import functools\nimport types\n"),
        ("""def async_wrapper(""", '''@types.coroutine
def _resume_suspended(coro: Any, trap: Any) -> Any:
    """Finish awaiting *coro*, which already yielded *trap* to the event loop.

    (direct_loop, added by deltafs's tools/pyfuse3/patch.py: the request
    loop starts a handler with ``coro.send(None)``, so that a handler that
    does not suspend costs no scheduler pass; one that did continues here,
    in the same task, every later yield and resumption passed through.)
    """
    while True:
        try:
            value = yield trap
        except BaseException as exc:
            try:
                trap = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                trap = coro.send(value)
            except StopIteration as stop:
                return stop.value


def async_wrapper('''),
        ("""    async def poll(
""", '''    async def fallocate(self, fh: FileHandleT, mode: int, offset: int, length: int) -> None:
        """Allocate or deallocate space of open file *fh* (fallocate(2)).

        *mode* is 0, or FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE and
        FALLOC_FL_ZERO_RANGE combined.  The default (ENOSYS) makes the
        kernel stop asking: fallocate(2) then answers EOPNOTSUPP.
        (Added by deltafs's tools/pyfuse3/patch.py.)
        """

        raise FUSEError(errno.ENOSYS)

    async def poll(
'''),
    ],
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: patch.py PYFUSE3_SOURCE_DIR", file=sys.stderr)
        return 2
    root = argv[0]
    for rel, edits in PATCHES.items():
        path = os.path.join(root, rel)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for old, new in edits:
            if text.count(old) != 1:
                print(f"patch.py: {rel}: expected text not found once; is this pyfuse3 3.5.0?",
                      file=sys.stderr)
                return 1
            text = text.replace(old, new)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    print(f"patched pyfuse3 in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
