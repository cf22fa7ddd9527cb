"""Count TCP sockets toward a destination, by state, across the current network namespace.

Why: port exhaustion and CLOSE_WAIT leaks are invisible from inside a pool.  The kernel
knows every socket toward the database (including TIME_WAIT ones that no process owns any
more), so we ask it.

Two implementations give the same answer:

* ``netlink`` (default): a ``NETLINK_SOCK_DIAG`` dump, the interface ``ss`` uses.  The
  request carries a bytecode filter on the destination port, so the kernel only sends back
  sockets toward that port; the address is then matched here.  About 10-30 ms at 30 000
  matching sockets, works unprivileged, sees the caller's network namespace.
* ``proc``: parse ``/proc/net/tcp`` and ``/proc/net/tcp6``.  Several times slower because
  the kernel formats every socket of the namespace as text, but needs nothing else.

With ``impl="auto"`` netlink is tried first and ``/proc`` is used if netlink is unavailable
(for instance a sandbox that forbids ``AF_NETLINK``).
"""

import errno
import ipaddress
import os
import re
import socket
import struct
from collections import Counter
from typing import Dict, FrozenSet, Iterator, List, Literal, NamedTuple, Optional, Set, Tuple

from connguard.tcpstates import ALL_STATES_MASK, STATE_NAMES

# --- sock_diag ABI (include/uapi/linux/{netlink,sock_diag,inet_diag}.h) -------------------

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_BC_D_COND = 8

# struct nlmsghdr: len, type, flags, seq, pid (host byte order).
_NLMSGHDR = struct.Struct("=IHHII")
# struct inet_diag_req_v2 up to the socket id: family, protocol, ext, pad, states.
_REQ_V2_HEAD = struct.Struct("=BBBBI")
# struct inet_diag_sockid: sport, dport (network order), src[16], dst[16], if, cookie[2].
_SOCKID = struct.Struct("!HH16s16sIII")
# struct nlattr: len, type.
_NLATTR = struct.Struct("=HH")
# struct inet_diag_bc_op: code, yes, no.
_BC_OP = struct.Struct("=BBH")
# struct inet_diag_hostcond without its address: family, prefix_len, (2 pad), int port.
_HOSTCOND = struct.Struct("=BBxxi")
# The two nlmsghdr fields the reply loop needs: len, type.
_NLMSG_LEN_TYPE = struct.Struct("=IH")
# struct nlmsgerr (and NLMSG_DONE's payload) starts with the negated errno.
_NLMSGERR_ERRNO = struct.Struct("=i")

# Offsets inside one reply message (nlmsghdr + struct inet_diag_msg).
_NLMSGHDR_LEN = _NLMSGHDR.size
_MSG_STATE = _NLMSGHDR_LEN + 1
_MSG_DST = _NLMSGHDR_LEN + 4 + 4 + 16  # after family/state/timer/retrans, ports, src
_MSG_INODE = _NLMSGHDR_LEN + 68
_INODE = struct.Struct("=I")

# The kernel caps one dump message batch at 32 KiB; twice that can never be truncated.
_RECV_BUFSIZE = 65536
_NETLINK_TIMEOUT = 10.0  # seconds

# --- addresses -------------------------------------------------------------------------

_V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

# Destination addresses to accept, as prefixes for bytes.startswith; None accepts any.
Accepted = Optional[Tuple[bytes, ...]]

Impl = Literal["auto", "netlink", "proc"]
_IMPLS = ("auto", "netlink", "proc")

_PROC_FILES = (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6))
_PORT_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


class NetlinkUnavailable(OSError):
    """The sock_diag netlink interface cannot be used here (socket refused or dump failed)."""


class _Match(NamedTuple):
    """Which sockets to count: remote port and remote addresses (``None`` = any)."""

    port: Optional[int]
    # 16-byte addresses; IPv4 ones in their IPv4-mapped IPv6 form (::ffff:a.b.c.d).
    addresses: Optional[FrozenSet[bytes]]

    def v4(self) -> Optional[FrozenSet[bytes]]:
        """The 4-byte IPv4 addresses among ``addresses`` (``None`` = any)."""
        if self.addresses is None:
            return None
        return frozenset(a[12:] for a in self.addresses if a[:12] == _V4_MAPPED_PREFIX)


def _to_v6_form(family: int, text: str) -> bytes:
    """Pack an address as 16 bytes, mapping IPv4 into ::ffff:0:0/96 so both compare alike."""
    if family == socket.AF_INET:
        return _V4_MAPPED_PREFIX + socket.inet_pton(socket.AF_INET, text)
    # getaddrinfo keeps a link-local scope ("fe80::1%eth0"); the kernel's address has none.
    return socket.inet_pton(socket.AF_INET6, text.split("%", 1)[0])


def resolve(host: str) -> Tuple[str, ...]:
    """The IP addresses ``host`` stands for, unique, in resolver order (an IP literal is
    itself: no DNS for it). The one resolver of the census and the resource guard."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return (host,)
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    found = (str(sockaddr[0]) for family, _, _, _, sockaddr in infos
             if family in (socket.AF_INET, socket.AF_INET6))
    return tuple(dict.fromkeys(found))


def _resolve(host: str) -> FrozenSet[bytes]:
    """Resolve ``host`` to its addresses, 16 bytes each (IPv4 as IPv4-mapped IPv6)."""
    return frozenset(
        _to_v6_form(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        for address in resolve(host))


def _make_match(host: Optional[str], port: Optional[int]) -> _Match:
    """Build the filter; ``host=None`` or ``port=None`` mean "any"."""
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    return _Match(port, None if host is None else _resolve(host))


# --- netlink implementation --------------------------------------------------------------


def _port_bytecode(port: int) -> bytes:
    """INET_DIAG_REQ_BYTECODE attribute: "destination port == port", any address.

    A single D_COND op: on a match fall through (``yes`` = op length) to the end, which
    accepts; otherwise jump 4 bytes past the end, which rejects.
    """
    length = _BC_OP.size + _HOSTCOND.size
    program = _BC_OP.pack(_INET_DIAG_BC_D_COND, length, length + 4)
    program += _HOSTCOND.pack(socket.AF_UNSPEC, 0, port)
    return _NLATTR.pack(_NLATTR.size + len(program), _INET_DIAG_REQ_BYTECODE) + program


def _dump_request(family: int, port: Optional[int], seq: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request for TCP sockets of ``family`` in every state."""
    # The port goes in the bytecode only.  (Dumps of connected sockets also honour a
    # non-zero id.idiag_dport, but listeners ignore it; one filter keeps one semantics.)
    sockid = _SOCKID.pack(0, 0, b"", b"", 0, 0, 0)
    body = _REQ_V2_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES_MASK) + sockid
    if port is not None:
        body += _port_bytecode(port)
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0
    )
    return header + body


def _raise_for_error(data: bytes, offset: int) -> None:
    """Raise the errno carried by the NLMSG_ERROR/DONE message at ``offset`` (0: no error)."""
    if offset + _NLMSGHDR_LEN + _NLMSGERR_ERRNO.size > len(data):
        return
    (negative_errno,) = _NLMSGERR_ERRNO.unpack_from(data, offset + _NLMSGHDR_LEN)
    if negative_errno < 0:
        raise OSError(-negative_errno, os.strerror(-negative_errno))


def _split_batch(data: bytes, accepted: Accepted) -> Tuple[List[int], bool]:
    """Offsets of the accepted inet_diag messages in one batch, and whether the dump ended.

    This loop runs once per socket, so it is kept lean: ``startswith`` with a tuple of
    prefixes compares the destination in place, without slicing a bytes object per message.
    """
    offsets: List[int] = []
    unpack_header = _NLMSG_LEN_TYPE.unpack_from
    starts_with = data.startswith
    offset, end = 0, len(data)
    while offset + _NLMSGHDR_LEN <= end:
        length, msg_type = unpack_header(data, offset)
        if msg_type == _SOCK_DIAG_BY_FAMILY:
            if accepted is None or starts_with(accepted, offset + _MSG_DST):
                offsets.append(offset)
        elif msg_type == _NLMSG_DONE:
            # NLMSG_DONE carries an int too: non-zero when the dump was cut short.
            _raise_for_error(data, offset)
            return offsets, True
        elif msg_type == _NLMSG_ERROR:
            _raise_for_error(data, offset)
        if length < _NLMSGHDR_LEN:
            raise NetlinkUnavailable(errno.EPROTO, f"malformed netlink message length {length}")
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return offsets, False


def _dump(
    nl: socket.socket, family: int, port: Optional[int], accepted: Accepted
) -> Iterator[Tuple[bytes, List[int]]]:
    """Run one dump on ``nl``; yield each received batch with its accepted message offsets."""
    nl.send(_dump_request(family, port, seq=family))
    while True:
        data, _, flags, _ = nl.recvmsg(_RECV_BUFSIZE)
        if flags & socket.MSG_TRUNC:
            raise NetlinkUnavailable(errno.EMSGSIZE, "sock_diag reply truncated")
        offsets, done = _split_batch(data, accepted)
        yield data, offsets
        if done:
            return


def _open_diag_socket() -> socket.socket:
    """Open a NETLINK_SOCK_DIAG socket, or raise NetlinkUnavailable."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    except (OSError, AttributeError) as err:
        raise NetlinkUnavailable(errno.EPROTONOSUPPORT, f"no sock_diag netlink: {err}") from err
    # The kernel answers at once; a timeout only guarantees a census can never hang.
    nl.settimeout(_NETLINK_TIMEOUT)
    return nl


def _netlink_families(match: _Match) -> List[Tuple[int, Accepted]]:
    """The dumps to run, each with the destination prefixes to accept in its width."""
    v4 = match.v4()
    families: List[Tuple[int, Accepted]] = []
    if v4 is None or v4:
        families.append((socket.AF_INET, None if v4 is None else tuple(v4)))
    # AF_INET6 sockets may talk to IPv4 peers through mapped addresses, so always dump them.
    v6 = None if match.addresses is None else tuple(match.addresses)
    families.append((socket.AF_INET6, v6))
    return families


def _netlink_batches(match: _Match) -> Iterator[Tuple[bytes, List[int]]]:
    """Dump the matching TCP sockets of both families: (batch, accepted offsets) pairs.

    Raises NetlinkUnavailable if sock_diag cannot be used.
    """
    with _open_diag_socket() as nl:
        for family, accepted in _netlink_families(match):
            try:
                yield from _dump(nl, family, match.port, accepted)
            except NetlinkUnavailable:
                raise
            except OSError as err:
                if family == socket.AF_INET6 and err.errno == errno.ENOENT:
                    continue  # a kernel without IPv6: nothing to count
                raise NetlinkUnavailable(err.errno, f"sock_diag dump failed: {err}") from err


def _count_netlink(match: _Match) -> Counter[int]:
    """State number -> count via sock_diag.  The hot path: no per-socket objects."""
    tally = [0] * 256  # indexed by the one-byte state
    for data, offsets in _netlink_batches(match):
        for offset in offsets:
            tally[data[offset + _MSG_STATE]] += 1
    return Counter({state: count for state, count in enumerate(tally) if count})


def _netlink_rows(match: _Match) -> List[Tuple[int, int]]:
    """(state, inode) of every matching socket via sock_diag."""
    unpack_inode = _INODE.unpack_from
    return [
        (data[offset + _MSG_STATE], unpack_inode(data, offset + _MSG_INODE)[0])
        for data, offsets in _netlink_batches(match)
        for offset in offsets
    ]


# --- /proc implementation ----------------------------------------------------------------


def _proc_hex(address: bytes) -> str:
    """An address as /proc/net/tcp{,6} prints it: each 32-bit word in host order, as hex."""
    words = struct.unpack(f"={len(address) // 4}I", address)
    return "".join(f"{word:08X}" for word in words)


def _proc_pattern(family: int, match: _Match) -> re.Pattern[str]:
    """Regex capturing the state column of lines whose remote address/port match.

    The remote field is the only ``ADDR:PORT`` followed by a two-digit field (the state);
    the local one is followed by the remote address, so it cannot match by accident.
    """
    port = f"{match.port:04X}" if match.port is not None else "[0-9A-F]{4}"
    if match.addresses is None:
        address = "[0-9A-F]{8}" if family == socket.AF_INET else "[0-9A-F]{32}"
    else:
        accepted = match.v4() if family == socket.AF_INET else match.addresses
        choices = sorted(_proc_hex(a) for a in accepted or ())
        address = "(?:" + "|".join(choices) + ")" if choices else "(?!)"
    return re.compile(rf" {address}:{port} ([0-9A-F]{{2}}) ")


def _read_text(path: str) -> Optional[str]:
    """The file's content, or None if it does not exist (e.g. no IPv6)."""
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _count_proc(match: _Match) -> Counter[int]:
    """State number -> count by scanning /proc/net/tcp and /proc/net/tcp6."""
    counts: Counter[int] = Counter()
    for path, family in _PROC_FILES:
        text = _read_text(path)
        if text is not None:
            counts.update(int(state, 16) for state in _proc_pattern(family, match).findall(text))
    return counts


def _proc_rows(match: _Match) -> List[Tuple[int, int]]:
    """(state, inode) of every matching socket, from /proc/net/tcp{,6}."""
    rows: List[Tuple[int, int]] = []
    for path, family in _PROC_FILES:
        text = _read_text(path)
        if text is None:
            continue
        pattern = _proc_pattern(family, match)
        for line in text.splitlines()[1:]:
            if pattern.search(line) is not None:
                # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
                fields = line.split()
                rows.append((int(fields[3], 16), int(fields[9])))
    return rows


# --- public API ----------------------------------------------------------------------


def _check_impl(impl: Impl) -> None:
    """Reject an unknown ``impl`` early, whatever path would have run."""
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


def _named(counts: Counter[int]) -> Dict[str, int]:
    """Every known state name with its count (zeros included), unknown numbers appended."""
    result = {name: counts.get(number, 0) for number, name in STATE_NAMES.items()}
    for number, count in counts.items():
        if number not in STATE_NAMES:
            result[f"unknown_{number}"] = count
    return result


def census(host: Optional[str], port: int, *, impl: Impl = "auto") -> Dict[str, int]:
    """Count this network namespace's TCP sockets whose remote end is ``(host, port)``.

    ``host`` is resolved with ``getaddrinfo`` and every address counts (``"localhost"``
    covers 127.0.0.1 and ::1); an IPv4 address also matches IPv6 sockets connected to its
    IPv4-mapped form.  ``host=None`` counts every address.  The result maps each state name
    of :data:`connguard.tcpstates.STATE_NAMES` to its count, zeros included.

    All processes' sockets are counted, plus TIME_WAIT ones no process owns any more: it is
    the whole namespace's ephemeral ports toward that destination that run out.
    ``impl`` is ``"netlink"``, ``"proc"`` or ``"auto"`` (netlink, else /proc).
    """
    _check_impl(impl)
    match = _make_match(host, port)
    if impl != "proc":
        try:
            return _named(_count_netlink(match))
        except NetlinkUnavailable:
            if impl == "netlink":
                raise
    return _named(_count_proc(match))


def _socket_inodes(fd_dir: str = "/proc/self/fd") -> Set[int]:
    """Inodes of the sockets this process holds open (``socket:[12345]`` fd links)."""
    inodes: Set[int] = set()
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed between listdir and readlink (e.g. listdir's own fd)
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def own_sockets(
    port: Optional[int] = None, host: Optional[str] = None, *, impl: Impl = "auto"
) -> Dict[str, int]:
    """Count the TCP sockets held open by *this* process, by state.

    Optionally only those whose remote port is ``port`` and remote address is one of
    ``host``'s.  Sockets are matched to this process through the inodes behind
    ``/proc/self/fd``, so TIME_WAIT sockets (owned by nobody) never appear here; use
    :func:`census` for them.  Same result shape and ``impl`` choice as :func:`census`.
    """
    _check_impl(impl)
    match = _make_match(host, port)
    mine = _socket_inodes()
    rows: Optional[List[Tuple[int, int]]] = None
    if impl != "proc":
        try:
            rows = _netlink_rows(match)
        except NetlinkUnavailable:
            if impl == "netlink":
                raise
    if rows is None:
        rows = _proc_rows(match)
    return _named(Counter(state for state, inode in rows if inode in mine))


def local_port_range(path: str = _PORT_RANGE_FILE) -> Tuple[int, int]:
    """The ephemeral port range ``(low, high)`` of this network namespace, inclusive."""
    with open(path, encoding="ascii") as handle:
        low, high = handle.read().split()
    return int(low), int(high)


# --- Unix sockets: the listen queue ------------------------------------------------------
# sock_diag for AF_UNIX (include/uapi/linux/unix_diag.h): what `ss -xl` shows as Recv-Q
# (connections waiting to be accepted) and Send-Q (the backlog) of a listening socket.
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie
_UNIX_DIAG_MSG_SIZE = 16  # family, type, state, pad, ino, cookie[2]
_RTATTR = struct.Struct("=HH")
_UDIAG_SHOW_NAME, _UDIAG_SHOW_RQLEN = 0x01, 0x10
_UNIX_DIAG_NAME, _UNIX_DIAG_RQLEN = 0, 4
_TCP_LISTEN = 10
_UNIX_DIAG_TIMEOUT = 0.5  # seconds; an error's translation asks: it must stay cheap


def unix_listen_queue(path: str) -> Optional[Tuple[int, int]]:
    """(waiting, backlog) of the Unix socket listening on ``path``; None if unknown."""
    try:
        wanted = {os.fsencode(path), os.fsencode(os.path.realpath(path))}
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
            sock.settimeout(_UNIX_DIAG_TIMEOUT)
            body = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0,
                                       _UDIAG_SHOW_NAME | _UDIAG_SHOW_RQLEN, 0, 0)
            sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY,
                                     _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body)
            while True:
                data = sock.recv(_RECV_BUFSIZE)
                if not data:
                    return None
                found, done = _scan_unix_diag(data, wanted)
                if found is not None or done:
                    return found
    except Exception:  # no netlink, a sandbox, a timeout: the message goes without it
        return None


def _scan_unix_diag(data: bytes, wanted: Set[bytes]) -> Tuple[Optional[Tuple[int, int]], bool]:
    """Look through one batch of replies: (queue of the wanted socket, dump finished)."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind = _NLMSGHDR.unpack_from(data, offset)[:2]
        if length < _NLMSGHDR.size or kind in (_NLMSG_DONE, _NLMSG_ERROR):
            return None, True
        name, queue = None, None
        attr = offset + _NLMSGHDR.size + _UNIX_DIAG_MSG_SIZE
        while attr + _RTATTR.size <= offset + length:
            attr_len, attr_type = _RTATTR.unpack_from(data, attr)
            if attr_len < _RTATTR.size:
                break
            value = data[attr + _RTATTR.size : attr + attr_len]
            if attr_type == _UNIX_DIAG_NAME:
                name = value.rstrip(b"\0")
            elif attr_type == _UNIX_DIAG_RQLEN and len(value) >= 8:
                waiting, backlog = struct.unpack_from("=II", value)
                queue = (int(waiting), int(backlog))
            attr += (attr_len + 3) & ~3
        if name in wanted and queue is not None:
            return queue, True
        offset += (length + 3) & ~3
    return None, False
