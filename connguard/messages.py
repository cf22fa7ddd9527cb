"""How an error's message is written: templates filled from the facts of a diagnosis.

A template names facts in braces (``{port_range_text}``); a bracketed segment is dropped when
a fact it names is unknown (``[ (now {port_range_text})]``), and ``[a|b]`` takes the first
alternative whose facts are all known. Numbers are shown with separators and about three
significant digits. The message is the cause and its top remedy on the first line, the other
remedies, the original error and where to read its page (:func:`see`) after it. Pure functions:
:mod:`connguard.errors` decides what to say, this module only how.
"""

from __future__ import annotations

import errno as errno_codes
import os
import re
import string
from typing import Any, Dict, List, Mapping, Optional

_RLIM_INFINITY = -1  # resource.RLIM_INFINITY on Linux; resource is absent on Windows
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")
_FORMATTER = string.Formatter()


def fields(template: str) -> List[str]:
    return [name for _, name, _, _ in _FORMATTER.parse(template) if name]


def fill(template: str, facts: Mapping[str, str]) -> str:
    try:
        return template.format_map(facts)
    except (KeyError, ValueError, IndexError):
        return template  # a template bug; tests render every template with no facts


def first_known(alternatives: str, facts: Mapping[str, str]) -> str:
    for alternative in alternatives.split("|"):
        if all(name in facts for name in fields(alternative)):
            return fill(alternative, facts)
    return ""


def render(template: str, facts: Mapping[str, str]) -> str:
    """Fill ``template``; each ``[a|b]`` becomes its first alternative with all facts known."""
    parts: List[str] = []
    position = 0
    for segment in _SEGMENT.finditer(template):
        parts.append(fill(template[position : segment.start()], facts))
        parts.append(first_known(segment.group(1), facts))
        position = segment.end()
    parts.append(fill(template[position:], facts))
    return "".join(parts)


def number(value: Any) -> str:
    """Thousands separators; whole floats without decimals, others with one."""
    if isinstance(value, float):
        if value.is_integer():
            return f"{value:,.0f}"
        # Short waits need two decimals (0.25 s); long ones read better with one.
        text = f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}"
        return text.rstrip("0").rstrip(".")
    return f"{value:,}"


def target(host: Any, port: Any) -> Optional[str]:
    if not host:
        return None
    if port is None:
        return str(host)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def derived(diagnosis: Mapping[str, Any]) -> Dict[str, Any]:
    """Facts computed from the diagnosis for messages: totals, rates, readable forms."""
    facts: Dict[str, Any] = {"target": target(diagnosis.get("host"), diagnosis.get("port"))}
    port_range = diagnosis.get("port_range")
    if isinstance(port_range, tuple):
        total = port_range[1] - port_range[0] + 1
        facts.update(
            port_range_text=f"{port_range[0]}-{port_range[1]}",
            ports_total=total,
            # ports ÷ 60 s of TIME_WAIT; a narrow range needs the fraction ("0.13/s").
            max_rate=total // 60 if total >= 600 else round(total / 60, 2),
        )
    census = diagnosis.get("census")
    if isinstance(census, dict):
        facts.update(census)
        facts.update(census_facts(census))
    errno, name = diagnosis.get("errno"), diagnosis.get("errno_name")
    if name and isinstance(errno, int) and errno > 0:
        facts["reason"] = f"errno {errno} {name}: {os.strerror(errno)}"
    elif name:
        facts["reason"] = name
    for key in ("fd_soft", "fd_hard"):
        if diagnosis.get(key) == _RLIM_INFINITY:
            facts[key] = "unlimited"
    facts.update(server_facts(diagnosis))
    return facts


def census_facts(census: Mapping[str, Any]) -> Dict[str, Any]:
    """Totals and the states worth naming: "TIME_WAIT 27,904, ESTABLISHED 286"."""
    counts = {str(k): v for k, v in census.items() if isinstance(v, int) and v > 0}
    top = sorted(counts.items(), key=lambda item: -item[1])[:3]
    facts: Dict[str, Any] = {"ports_in_use": sum(counts.values())}
    if top:
        facts["socket_states"] = ", ".join(f"{k.upper()} {number(v)}" for k, v in top)
    established = counts.get("established", 0)
    if established and established >= counts.get("time_wait", 0):
        facts["mostly_established"] = established
    if counts.get("close_wait"):
        facts["stuck_close_wait"] = counts["close_wait"]
    return facts


def server_facts(diagnosis: Mapping[str, Any]) -> Dict[str, Any]:
    """Readings of the server's numbers (from ``extra`` or its message) worth a phrase."""
    facts: Dict[str, Any] = {}
    threads, most = diagnosis.get("threads_connected"), diagnosis.get("max_connections")
    if isinstance(threads, int) and isinstance(most, int):
        if threads > most:  # the connection reserved for SUPER / CONNECTION ADMIN is in use
            facts["admin_slot_used"] = threads
        elif threads < most:
            facts["threads_below_max"] = threads
    census = diagnosis.get("census")
    established = census.get("established") if isinstance(census, dict) else None
    if (threads is None and isinstance(most, int) and isinstance(established, int)
            and established > most):
        # More from this host alone than max_connections: MariaDB and MySQL allow
        # max_connections + 1, the last for an account with SUPER / CONNECTION ADMIN.
        facts["established_past_max"] = established
    user_limit = diagnosis.get("max_user_connections")
    if isinstance(user_limit, int) and user_limit > 0:  # 0 means "no global limit"
        facts["user_limit"] = user_limit
    server_errno = diagnosis.get("server_errno")
    if isinstance(server_errno, int):
        name = errno_codes.errorcode.get(server_errno)
        facts["server_errno_text"] = f"{server_errno} {name}" if name else str(server_errno)
    return facts


# Identifiers, not quantities: no thousands separators.
_PLAIN_NUMBERS = ("port", "errno", "mysql_code", "server_errno", "thread_id")


_NO_PASSWORD = ("no password was sent (using password: NO): give it (password=, the URL's "
                "user:password@), then check the user name")


def facts(diagnosis: Mapping[str, Any], server_message: str = "") -> Dict[str, str]:
    """Known facts as display strings, for templates; unknown ones are left out."""
    merged: Dict[str, Any] = {**diagnosis, **derived(diagnosis)}
    if server_message:
        merged["server_message"] = server_message
        if "(using password: NO)" in server_message:
            merged["no_password"] = _NO_PASSWORD
    facts: Dict[str, str] = {}
    for key, value in merged.items():
        if value is None or isinstance(value, (dict, tuple, list)):
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        facts[key] = number(value) if numeric and key not in _PLAIN_NUMBERS else str(value)
    return facts


_docs_base: Optional[str] = None  # found once; a failed lookup is tried again next time


def docs_base() -> str:
    """Where the built docs are published: the ``Documentation`` project URL of the
    installed distribution (``[project.urls]`` in pyproject.toml), or "" when it names none."""
    global _docs_base
    if _docs_base is None:
        try:
            from importlib.metadata import metadata

            urls = metadata("connguard").get_all("Project-URL") or []
        except ModuleNotFoundError:  # not installed as a distribution (a bare checkout)
            urls = []
        except Exception:  # noqa: BLE001 - e.g. no descriptor left (EMFILE): try again later
            return ""
        found = [url.strip() for label, _, url in (u.partition(",") for u in urls)
                 if label.strip().lower() == "documentation" and url.strip()]
        _docs_base = found[0].rstrip("/") + "/" if found else ""
    return _docs_base


def docs_link(page: str) -> Optional[str]:
    """Error page ``page`` (``access-denied``) as a link to the published page when the
    distribution names where its docs live (mkdocs' directory URLs); else None."""
    base = docs_base()
    if not base:
        return None
    return base + ("errors/" if page == "index" else f"errors/{page}/")


def see(page: str) -> str:
    """Where to read error page ``page``: the command that prints it (the pages ship with
    the package, so it works offline), and the published page when there is one."""
    link = docs_link(page)
    command = f"connguard explain {page}"
    return f"{command} (or {link})" if link else command


def compose(cause: str, remedies: List[str], original: str, docs: str) -> str:
    """First line: cause and top remedy; then the other remedies, the original, the page."""
    lines = [f"{cause} — {remedies[0]}" if remedies else cause]
    lines.extend(f"  - {remedy}" for remedy in remedies[1:])
    if original:
        lines.append(f"original: {original}")
    lines.append(f"see: {see(docs)}")
    return "\n".join(lines)
