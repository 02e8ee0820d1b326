"""Patch a pyfuse3 3.5.0 source tree: cached directory listings, fallocate, cheaper requests.

    python tools/pyfuse3/patch.py SRC_DIR      # the unpacked pyfuse3-3.5.0 sdist

Stock pyfuse3 sends every ``opendir``/``releasedir`` to the daemon (two
round trips per directory a program opens) and gives no way to set
FOPEN_CACHE_DIR, so every listing of every directory is a request too:
``find``, ``du`` and ``git status`` on a warm tree spend most of their time
there.  And pyfuse3 has no fallocate handler, so libfuse answers ENOSYS and
the kernel gives every fallocate(2) on the mount EOPNOTSUPP (databases,
torrent clients and ``fallocate -l`` use it).  This patch changes four
handlers and the read loop, and adds one handler, nothing else:

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
* the module gets ``DELTAFS_PATCHES``, so deltafs can tell the patched
  build from a stock one: ``dir_handle_is_inode`` (else it falls back to
  normal opendir handles), ``fallocate`` (else fallocate(2) on the mount
  answers EOPNOTSUPP, as with any stock pyfuse3 file system),
  ``nocaps_inodes`` and ``inline_loop`` (else the same answers, from Python).

Every replacement is checked: on any other pyfuse3 version this fails
loudly instead of building something half-patched.
"""

from __future__ import annotations

import os
import sys

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
    if fi.fh == 0 and getattr(operations, 'dir_handle_is_inode', False):
        c.fh = ino
    save_retval(fuse_readdirplus_async(c))
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
        ("    fuse_ops.poll = fuse_poll\n",
         "    fuse_ops.poll = fuse_poll\n"
         "    fuse_ops.fallocate = fuse_fallocate\n"),
    ],
    "src/pyfuse3/__init__.pyx": [
        ("ROOT_INODE = FUSE_ROOT_ID\n",
         "ROOT_INODE = FUSE_ROOT_ID\n"
         "DELTAFS_PATCHES = ('dir_handle_is_inode', 'fallocate', 'nocaps_inodes', 'inline_loop')"
         "  # see deltafs tools/pyfuse3/patch.py\n"),
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
