"""Linux TCP state numbers and their names.

The numbers are the kernel's ``enum tcp_state`` (include/net/tcp_states.h); they
are what ``TCP_INFO``'s ``tcpi_state``, ``sock_diag``'s ``idiag_state`` and the
``st`` column of ``/proc/net/tcp`` report.  Both :mod:`connguard.liveness` and
:mod:`connguard.census` speak in these numbers, so they live here once.
"""

from typing import Dict

ESTABLISHED = 1
SYN_SENT = 2
SYN_RECV = 3
FIN_WAIT1 = 4
FIN_WAIT2 = 5
TIME_WAIT = 6
CLOSE = 7
CLOSE_WAIT = 8
LAST_ACK = 9
LISTEN = 10
CLOSING = 11

#: State number -> lowercase name, as used in census results.
STATE_NAMES: Dict[int, str] = {
    ESTABLISHED: "established",
    SYN_SENT: "syn_sent",
    SYN_RECV: "syn_recv",
    FIN_WAIT1: "fin_wait1",
    FIN_WAIT2: "fin_wait2",
    TIME_WAIT: "time_wait",
    CLOSE: "close",
    CLOSE_WAIT: "close_wait",
    LAST_ACK: "last_ack",
    LISTEN: "listen",
    CLOSING: "closing",
}

#: Bit mask selecting every state above (bit N set for state N), for sock_diag.
ALL_STATES_MASK = sum(1 << number for number in STATE_NAMES)
