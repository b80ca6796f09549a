"""Kernel isolation layers a worker applies to itself before any user code runs.

Everything goes through ctypes (no third-party packages): the batch scheduling
policy, rlimits, ``PR_SET_NO_NEW_PRIVS``, Landlock, the privilege drop to a
per-slot uid/gid, ``PR_SET_DUMPABLE=0`` and a small classic-BPF seccomp filter.
:func:`apply` runs them in that order and returns which layers are active; a
layer the kernel does not offer is reported as missing, the others still apply.

This module is imported by the worker bootstrap: standard library only.
"""

from __future__ import annotations

import ctypes
import os
import resource
import struct
import sys

PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
ENOSYS = 38
CLONE_THREAD = 0x00010000

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7

# Syscalls a script never needs. Denied with EPERM so the script sees an OSError.
_DENIED_X86_64 = {
    "socket": 41,
    "socketpair": 53,
    "fork": 57,
    "vfork": 58,
    "execve": 59,
    "ptrace": 101,
    "pivot_root": 155,
    "chroot": 161,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "init_module": 175,
    "delete_module": 176,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "execveat": 322,
    "userfaultfd": 323,
    # System V IPC and POSIX message queues: memory and objects that outlive the
    # worker, outside RLIMIT_AS, shared by every worker that ever had the same uid.
    "shmget": 29,
    "shmat": 30,
    "shmctl": 31,
    "semget": 64,
    "semop": 65,
    "semctl": 66,
    "shmdt": 67,
    "msgget": 68,
    "msgsnd": 69,
    "msgrcv": 70,
    "msgctl": 71,
    "semtimedop": 220,
    "mq_open": 240,
    "mq_unlink": 241,
    "mq_timedsend": 242,
    "mq_timedreceive": 243,
    "mq_notify": 244,
    "mq_getsetattr": 245,
    # Anonymous files: memory that RLIMIT_AS does not count.
    "memfd_create": 319,
    # Leaving SCHED_BATCH (see batch_scheduling).
    "sched_setscheduler": 144,
    "sched_setattr": 314,
}
_DENIED_AARCH64 = {
    "umount2": 39,
    "mount": 40,
    "pivot_root": 41,
    "chroot": 51,
    "unshare": 97,
    "kexec_load": 104,
    "init_module": 105,
    "delete_module": 106,
    "ptrace": 117,
    "reboot": 142,
    "socket": 198,
    "socketpair": 199,
    "add_key": 217,
    "request_key": 218,
    "keyctl": 219,
    "execve": 221,
    "swapon": 224,
    "swapoff": 225,
    "perf_event_open": 241,
    "setns": 268,
    "process_vm_readv": 270,
    "process_vm_writev": 271,
    "finit_module": 273,
    "bpf": 280,
    "execveat": 281,
    "userfaultfd": 282,
    "kexec_file_load": 294,
    "mq_open": 180,
    "mq_unlink": 181,
    "mq_timedsend": 182,
    "mq_timedreceive": 183,
    "mq_notify": 184,
    "mq_getsetattr": 185,
    "msgget": 186,
    "msgctl": 187,
    "msgrcv": 188,
    "msgsnd": 189,
    "semget": 190,
    "semctl": 191,
    "semtimedop": 192,
    "semop": 193,
    "shmget": 194,
    "shmctl": 195,
    "shmat": 196,
    "shmdt": 197,
    "memfd_create": 279,
    "sched_setscheduler": 119,
    "sched_setattr": 274,
}
# The generic table shared by both architectures from 5.x on.
_DENIED_COMMON = {
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_getfd": 438,
    "mount_setattr": 442,
    "memfd_secret": 447,
}
# arch -> (audit arch, denied syscalls, clone, prctl)
_ARCHES = {
    "x86_64": (AUDIT_ARCH_X86_64, _DENIED_X86_64, 56, 157),
    "aarch64": (AUDIT_ARCH_AARCH64, _DENIED_AARCH64, 220, 167),
}
CLONE3 = 435

SYS_landlock_create_ruleset = 444
SYS_landlock_add_rule = 445
SYS_landlock_restrict_self = 446

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


class SandboxError(OSError):
    """A layer the kernel offers could not be applied."""


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"{what}: {os.strerror(err)}")
    return ret


# --- rlimits -------------------------------------------------------------------------


def set_limit(which: int, value: int) -> None:
    """Set soft and hard limit to ``value`` (never above the current hard limit)."""
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY and value > hard:
        value = hard
    resource.setrlimit(which, (value, value))


def apply_rlimits(
    *,
    address_space: int,
    cpu_seconds: int,
    file_size: int,
    open_files: int,
    processes: int | None,
) -> None:
    """The worker's lifetime ceilings; per-execution limits only ever lower them."""
    set_limit(resource.RLIMIT_CORE, 0)
    set_limit(resource.RLIMIT_NOFILE, open_files)
    set_limit(resource.RLIMIT_FSIZE, file_size)
    set_limit(resource.RLIMIT_AS, address_space)
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    cpu = cpu_seconds if hard == resource.RLIM_INFINITY else min(hard, cpu_seconds)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    if processes is not None:
        set_limit(resource.RLIMIT_NPROC, processes)


# --- scratch quota -------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
MS_NOSUID = 1 << 1
MS_NODEV = 1 << 2
MS_NOEXEC = 1 << 3
MS_REC = 1 << 14
MS_PRIVATE = 1 << 18
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]


def scratch_quota(scratch: str, size: int, uid: int | None, gid: int | None) -> None:
    """As root: a mount namespace of the worker's own, with a tmpfs of ``size`` bytes
    over its scratch directory. What a script writes is bounded in all (``ENOSPC``,
    where ``RLIMIT_FSIZE`` bounds each file only), and goes away with the worker."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "private mounts")
    owner = "" if uid is None or gid is None else f",uid={uid},gid={gid}"
    options = f"size={size},mode=0700{owner}".encode()
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _check(
        _libc.mount(b"picloud-scratch", scratch.encode(), b"tmpfs", flags, options),
        "mount the scratch tmpfs",
    )


# --- scheduling ----------------------------------------------------------------------


def batch_scheduling() -> bool:
    """Run as ``SCHED_BATCH``: a worker woken by its host's frame no longer preempts
    the host on the CPU the host runs on (batch tasks wait for the tick or a free CPU).
    Under load a preempting wake-up kept the host off its CPU for ~100 µs per frame
    it sent, mid-``write`` (bench/RESULTS.md, session 8). Time slices are unchanged;
    seccomp keeps a script from switching back. ``False`` where there is no such
    policy."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


# --- prctl ---------------------------------------------------------------------------


def no_new_privs() -> None:
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


def not_dumpable() -> None:
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "PR_SET_DUMPABLE")


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (real, effective and saved), no groups."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise SandboxError(EPERM, "privilege drop did not stick")


# --- Landlock ------------------------------------------------------------------------

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1
LANDLOCK_RULE_PATH_BENEATH = 1
O_PATH = 0o10000000


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is unavailable."""
    ret = _libc.syscall(SYS_landlock_create_ruleset, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(ret), 0)


# What a script may read besides its scratch directory and the interpreter's own
# files (``readable_paths``): the shared libraries extension modules load, and the
# system data the standard library reads (time zones, MIME types, the CPU count).
# Nothing else of the host: not /etc, /home, /tmp, other processes' /proc entries,
# the server's data directory or its configuration.
SYSTEM_READABLE = (
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/share/zoneinfo",
    "/etc/localtime",
    "/etc/ld.so.cache",
    "/etc/mime.types",
    "/dev/null",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
    "/sys/devices/system/cpu",
)


# What a worker may read of its own ``/proc`` entry: its descriptors and its own
# counters. Not ``net`` (the host's sockets, listening ports, routes: /proc/net is
# /proc/self/net), ``mountinfo``/``mounts`` (the host's mount table), ``maps``,
# ``cmdline``, ``environ`` or ``task`` (the same again, per thread).
OWN_PROC_READABLE = ("fd", "fdinfo", "stat", "statm", "status", "limits")


def readable_paths() -> list[str]:
    """Everything a worker may read but not write: the interpreter's installation and
    import path (as real paths), :data:`SYSTEM_READABLE` and :data:`OWN_PROC_READABLE`
    of its own ``/proc`` entry."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    paths += [entry for entry in sys.path if entry]
    paths += SYSTEM_READABLE
    paths += [f"/proc/{os.getpid()}/{entry}" for entry in OWN_PROC_READABLE]
    out: list[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if os.path.exists(real) and real not in out:
            out.append(real)
    return out


def apply_landlock(scratch: str, readable: list[str] | None = None) -> int:
    """Reads only beneath ``scratch`` and ``readable``; writes only beneath ``scratch``;
    no exec, no TCP bind/connect, scoped signals and abstract sockets (each as far as
    the ABI goes). Returns the ABI used, 0 if none."""
    abi = landlock_abi()
    if abi < 1:
        return 0
    read = FS_READ_FILE | FS_READ_DIR
    write = (
        FS_WRITE_FILE
        | FS_REMOVE_DIR
        | FS_REMOVE_FILE
        | FS_MAKE_CHAR
        | FS_MAKE_DIR
        | FS_MAKE_REG
        | FS_MAKE_SOCK
        | FS_MAKE_FIFO
        | FS_MAKE_BLOCK
        | FS_MAKE_SYM
    )
    if abi >= 2:
        write |= FS_REFER
    if abi >= 3:
        write |= FS_TRUNCATE
    handled_fs = write | read | FS_EXECUTE | (FS_IOCTL_DEV if abi >= 5 else 0)
    handled_net = (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0
    if abi >= 6:
        attr = struct.pack("=QQQ", handled_fs, handled_net, scoped)
    elif abi >= 4:
        attr = struct.pack("=QQ", handled_fs, handled_net)
    else:
        attr = struct.pack("=Q", handled_fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(
        _libc.syscall(
            SYS_landlock_create_ruleset, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)
        ),
        "landlock_create_ruleset",
    )
    try:
        _allow(ruleset, scratch, (write & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK)) | read)
        for path in readable or ():
            _allow(ruleset, path, read if os.path.isdir(path) else FS_READ_FILE)
        _check(
            _libc.syscall(SYS_landlock_restrict_self, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
            "landlock_restrict_self",
        )
    finally:
        os.close(ruleset)
    return abi


def _allow(ruleset: int, path: str, access: int) -> None:
    """Allow ``access`` beneath ``path`` (a directory, or just the file)."""
    fd = os.open(path, O_PATH | os.O_CLOEXEC)
    try:
        rule = struct.pack("=Qi", access, fd)
        rbuf = ctypes.create_string_buffer(rule, len(rule))
        _check(
            _libc.syscall(
                SYS_landlock_add_rule,
                ctypes.c_int(ruleset),
                ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                rbuf,
                ctypes.c_uint32(0),
            ),
            "landlock_add_rule",
        )
    finally:
        os.close(fd)


# --- seccomp -------------------------------------------------------------------------

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06


def seccomp_program(machine: str | None = None) -> bytes | None:
    """The classic-BPF filter for this architecture, ``None`` when it is unknown."""
    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        return None
    audit_arch, denied, clone_nr, prctl_nr = _ARCHES[machine]
    numbers = sorted(set(denied.values()) | set(_DENIED_COMMON.values()))
    # Instructions as (code, jt_label_or_offset, jf, k); labels resolved below.
    prog: list[tuple[int, object, object, int]] = [
        (_LD_W_ABS, 0, 0, 4),  # arch
        (_JEQ_K, 1, 0, audit_arch),
        (_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        (_LD_W_ABS, 0, 0, 0),  # nr
    ]
    if machine == "x86_64":
        prog.append((_JGE_K, "deny", 0, 0x40000000))  # the x32 ABI
    prog += [
        (_JEQ_K, "enosys", 0, CLONE3),
        (_JEQ_K, 0, 2, clone_nr),
        (_LD_W_ABS, 0, 0, 16),  # args[0], low word: clone flags
        (_JSET_K, "allow", "deny", CLONE_THREAD),
        # prctl: everything but making the worker dumpable again (ptrace-able, core).
        (_JEQ_K, 0, 2, prctl_nr),
        (_LD_W_ABS, 0, 0, 16),  # args[0], low word: the option
        (_JEQ_K, "deny", "allow", PR_SET_DUMPABLE),
    ]
    prog += [(_JEQ_K, "deny", 0, nr) for nr in numbers]
    labels = {"allow": len(prog), "deny": len(prog) + 1, "enosys": len(prog) + 2}
    prog += [
        (_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        (_RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS),
    ]
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out += struct.pack("=HBBI", code, jt, jf, k)
    return bytes(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def apply_seccomp() -> bool:
    """Load the filter; ``False`` (nothing loaded) on an unknown architecture."""
    program = seccomp_program()
    if program is None:
        return False
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
        "PR_SET_SECCOMP",
    )
    return True


def apply(
    *,
    scratch: str,
    uid: int | None,
    gid: int | None,
    address_space: int,
    cpu_seconds: int,
    file_size: int,
    open_files: int,
    processes: int,
    readable: list[str] | None = None,
    scratch_bytes: int | None = None,
) -> dict[str, object]:
    """Apply every layer, in order, and say which are active. ``readable``: what may
    be read besides ``scratch`` (see :func:`readable_paths`); ``scratch_bytes``: the
    most the scratch directory holds (as root; the caller changes into it again)."""
    as_root = os.geteuid() == 0
    batch = batch_scheduling()
    drop = as_root and uid is not None and gid is not None
    apply_rlimits(
        address_space=address_space,
        cpu_seconds=cpu_seconds,
        file_size=file_size,
        open_files=open_files,
        processes=processes if drop else None,
    )
    quota = as_root and scratch_bytes is not None
    if quota:
        assert scratch_bytes is not None
        scratch_quota(scratch, scratch_bytes, uid if drop else None, gid if drop else None)
    no_new_privs()
    landlock = apply_landlock(scratch, readable)
    if drop and uid is not None and gid is not None:
        drop_privileges(uid, gid)
    not_dumpable()
    seccomp = apply_seccomp()
    return {
        "sched_batch": batch,
        "rlimits": True,
        "nproc": drop,
        "no_new_privs": True,
        "landlock": landlock,
        "uid_drop": drop,
        "dumpable": False,
        "seccomp": seccomp,
        "scratch_quota": quota,
    }
