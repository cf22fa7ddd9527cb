"""Every public option refuses hostile values when the pool or engine is made, by name.

Table-driven: every pool option (``connguard.arguments.POOL_OPTIONS``) through each front end
(``connguard.Pool``, the drop-in ``connguard.connect``, ``connguard.configure``) and every
plugin option (``connguard.sqlalchemy_options.OPTION_NAMES``, in the URL and as a
``create_engine`` keyword) against NaN, the infinities, ``10**30``, the wrong type and the
wrong text. Each is refused with a message that starts with the option as the caller spelt it
(``max_connect_rate``, ``connguard_max_connect_rate``), or is listed below as accepted, as
docs/pool.md ("Allowed values") documents. Nothing here connects: a pool with ``min_idle=0``
and an engine only connect on first use (port 1 would refuse anyway).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import sqlalchemy as sa

import connguard
from connguard import dropin, options
from connguard.arguments import POOL_OPTIONS
from connguard.sqlalchemy_options import OPTION_NAMES, PREFIX
from tests.netns import REPO_ROOT

SECRET = "s3cret-Zq9x"  # must never show in a message
SERVER = {"host": "127.0.0.1", "port": 1, "user": "app", "password": SECRET}
URL = f"mysql+pymysql://app:{SECRET}@127.0.0.1:1/db?plugin=connguard"
REDIS = "redis://127.0.0.1:1/0"

#: The hostile values, by the name a failure shows.
HOSTILE: Dict[str, Any] = {
    "nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "10**30": 10 ** 30,
    "10**400": 10 ** 400,  # past a float: float(value) raises OverflowError, not ValueError
    "object()": object(), "[1]": [1], "'off'": "off", "'abc'": "abc", "None": None,
}

#: What Python front ends accept of HOSTILE, as documented: None where it means a default, "no
#: limit" or off; any non-empty text where the option is a name.
ACCEPTED = {
    *{(name, value) for name in ("name", "coordinator_key") for value in ("'off'", "'abc'")},
    *{(name, "None") for name in (
        "name", "coordinator_key", "max_lifetime", "idle_timeout", "leak_threshold",
        "port_reserve", "keepalive", "host_gate", "coordinator", "global_max",
        "coordinator_fail", "lease_ttl")},
}

#: Options checked beside another (global_max needs a coordinator): the value's own rule is
#: what is tested, not the pairing.
COMPANIONS: Dict[str, Dict[str, Any]] = {"global_max": {"coordinator": REDIS}}


def _outcome(make: Callable[[Dict[str, Any]], Any], name: str, value: Any,
             spelled: str) -> Tuple[bool, str]:
    """(accepted, message): what ``make`` did with option ``name`` = ``value``."""
    try:
        made = make({**COMPANIONS.get(name, {}), name: value})
    except (ValueError, TypeError, sa.exc.ArgumentError) as exc:
        return False, str(exc)
    closer = getattr(made, "close", None) or getattr(made, "dispose", None)
    if closer is not None:
        closer()
    return True, ""


def _failures(make: Callable[[Dict[str, Any]], Any], name: str, spelled: str,
              values: Dict[str, Any], accepted: Any) -> List[str]:
    """Every value handled against the table: refused by name, or accepted as documented."""
    failures = []
    for label, value in values.items():
        ok, message = _outcome(make, name, value, spelled)
        if (name, label) in accepted:
            if not ok:
                failures.append(f"{spelled}={label} is documented-accepted, refused: {message}")
        elif ok:
            failures.append(f"{spelled}={label} accepted")
        elif not message.startswith(f"{spelled} must") or SECRET in message:
            failures.append(f"{spelled}={label}: the message does not start with "
                            f"'{spelled} must' (or shows the password): {message}")
    return failures


def test_every_pool_option_has_a_rule() -> None:
    assert set(options.RULES) == POOL_OPTIONS


# --- Python: connguard.Pool, connguard.connect, connguard.configure -----------------------------


def _pool(given: Dict[str, Any]) -> Any:
    return connguard.Pool(**{**SERVER, **given})  # as **connect_args: the same split


def _connect(given: Dict[str, Any]) -> Any:
    return connguard.connect(**SERVER, **given)


@pytest.mark.parametrize("name", sorted(POOL_OPTIONS))
def test_pool_refuses_hostile_values_by_name(name: str) -> None:
    assert _failures(_pool, name, name, HOSTILE, ACCEPTED) == []


@pytest.mark.parametrize("name", sorted(POOL_OPTIONS))
def test_connect_refuses_hostile_values_by_name(name: str) -> None:
    # Accepted values would connect (port 1 refuses): only the refusals are asked here.
    refused = {label: value for label, value in HOSTILE.items() if (name, label) not in ACCEPTED}
    assert _failures(_connect, name, name, refused, ACCEPTED) == []
    assert not dropin._pools  # refused before any pool was made


@pytest.mark.parametrize("name", sorted(POOL_OPTIONS))
def test_configure_refuses_hostile_values_by_name(name: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dropin, "_defaults", {})
    assert _failures(lambda given: connguard.configure(**given), name, name, HOSTILE,
                     ACCEPTED) == []


def test_connect_checks_options_before_comparing_them_with_an_existing_pool() -> None:
    pool = dropin.pool_for(**SERVER, max_size=2)
    try:
        with pytest.raises(ValueError, match=r"^max_size must be an integer >= 1 and <= 100000"):
            dropin.pool_for(**SERVER, max_size=math.nan)
    finally:
        connguard.close_all()
    assert pool.closed


@pytest.mark.parametrize("name", ["storm_control", "resource_guard", "fail_fast"])
@pytest.mark.parametrize("text", ["off", "no", "false", "0", "True"])
def test_python_booleans_are_true_or_false_only(name: str, text: str) -> None:
    with pytest.raises(ValueError) as info:
        _pool({name: text})
    assert str(info.value).startswith(f"{name} must be True or False, got {text!r}")
    pool = _pool({name: False})
    try:  # and False is off
        assert {"storm_control": pool._storm, "fail_fast": pool._connector.fail_fast,
                "resource_guard": pool._connector.guard}[name] in (None, False)
    finally:
        pool.close()


@pytest.mark.parametrize("given, start", [
    ({"keepalive": (math.nan, 5, 4)}, "keepalive idle must be"),
    ({"keepalive": (20, math.inf, 4)}, "keepalive interval must be"),
    ({"keepalive": (20, 5, 10 ** 30)}, "keepalive count must be an integer >= 1 and <= 127"),
    ({"keepalive": (32767, 32767, 127)}, "keepalive: idle + interval × count"),
    ({"keepalive": (20, 5)}, "keepalive must be True, False, None or a tuple"),
    ({"min_idle": 5, "max_size": 2}, "min_idle (5) must not exceed max_size (2)"),
    ({"lifetime_jitter": 1}, "lifetime_jitter must be a number >= 0 and < 1"),
    ({"max_overflow": -2}, "max_overflow must be an integer >= -1 (-1: no limit)"),
    ({"max_size": 100_001}, "max_size must be an integer >= 1 and <= 100000"),
    ({"checkout_timeout": 86_401}, "checkout_timeout must be a number of seconds >= 0 and "
                                   "<= 86400 (a day)"),
    ({"backoff_max": 3601}, "backoff_max must be a number of seconds > 0 and <= 3600"),
    ({"max_connect_rate": 0}, "max_connect_rate must be"),  # not "rate must be"
    ({"connect_burst": 0}, "connect_burst must be"),  # not "burst must be"
    ({"max_size": 2.0}, "max_size must be an integer"),
    ({"max_size": True}, "max_size must be an integer"),
    ({"fd_reserve": 2 ** 30 + 1}, "fd_reserve must be an integer >= 0 and <= 1073741824"),
    ({"port_reserve": 65536}, "port_reserve must be an integer >= 0 and <= 65535"),
    ({"name": ""}, "name must be a non-empty string"),
])
def test_structured_values_are_refused_by_name(given: Dict[str, Any], start: str) -> None:
    with pytest.raises(ValueError) as info:
        _pool(given)
    assert str(info.value).startswith(start), str(info.value)


@pytest.mark.parametrize("url, start", [
    ("redis://", "coordinator must name the Redis host"),
    ("redis:///0", "coordinator must name the Redis host"),
    (f"redis://:{SECRET}@", "coordinator must name the Redis host"),
    ("redis://[::1", "coordinator must be a URL that can be read"),
    (f"redis://:{SECRET}@[::1:6379/0", "coordinator must be a URL that can be read"),
    (f"redis://:{SECRET}@h:99999/0", "coordinator must name a port in 1..65535"),
    ("redis://h:abc/0", "coordinator must name a port in 1..65535"),
    # An unencoded "/" in the password: urllib reads "Zq9x" (after ":") as the port.
    ("redis://:pw/Zq9x@h:6379/0", "coordinator must name a port"),
    ("redis://h/abc", "coordinator must name the database by number"),
    ("unix://", "coordinator must name the socket"),
    (f"http://u:{SECRET}@h/0", "coordinator must be a URL with scheme redis, rediss, unix"),
    ("redis://h/0?socket_timeout=abc", "coordinator URL"),  # the client's own parse, now
])
def test_coordinator_urls_are_read_when_the_pool_is_made(url: str, start: str) -> None:
    with pytest.raises(ValueError) as info:
        _pool({"coordinator": url})
    text = str(info.value)
    assert text.startswith(start), text
    assert SECRET not in text and "Zq9x" not in text


#: Coordinator URLs whose password holds what text's redaction stops a token at (a blank):
#: urllib and the Redis client read them (the password is "s3cret Zq9x"), so they are accepted,
#: and their password must not show in what the pool tells (repr, stats) nor in a message.
BLANK_PASSWORDS = ["redis://app:s3cret Zq9x@127.0.0.1:1/0", "redis://:s3cret\tZq9x@127.0.0.1:1/0",
                   "redis://127.0.0.1:1/0?password=s3cret Zq9x"]


@pytest.mark.parametrize("url", BLANK_PASSWORDS)
def test_a_password_with_a_blank_never_shows(url: str) -> None:
    pool = _pool({"coordinator": url})
    try:
        shown = f"{pool!r} {pool.stats()} {pool._budget!r} {pool._coordinator!r}"
    finally:
        pool.close()
    assert "s3cret" not in shown and "Zq9x" not in shown, shown
    for bad in (url.replace("127.0.0.1:1", "127.0.0.1:99999"),  # refused: a message shows it
                url.replace("127.0.0.1:1/0", "127.0.0.1:1/abc")):
        with pytest.raises(ValueError) as info:
            _pool({"coordinator": bad})
        assert "s3cret" not in str(info.value) and "Zq9x" not in str(info.value), info.value
    with pytest.raises(sa.exc.ArgumentError) as conflict:  # given twice, differently
        sa.create_engine(f"{URL}&{PREFIX}coordinator={REDIS}", **{PREFIX + "coordinator": url})
    assert "s3cret" not in str(conflict.value) and "Zq9x" not in str(conflict.value)


def test_a_named_redis_host_is_accepted() -> None:
    for url in ("redis://localhost:6379/0", "rediss://u:pw@redis.internal/1", "redis://[::1]:6379",
                "unix:///run/redis.sock?db=0"):
        _pool({"coordinator": url}).close()


def test_docs_list_every_rule_as_the_code_has_it() -> None:
    text = Path(REPO_ROOT, "docs", "pool.md").read_text()
    section = text.split("## Allowed values", 1)[1].split("\n## ", 1)[0]
    documented = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|$", section, re.MULTILINE))
    assert documented == {name: rule.allowed() for name, rule in options.RULES.items()}


# --- the SQLAlchemy plugin: connguard_* in the URL and as create_engine keywords ----------------

#: URL text: each must be refused unless the option takes it (words for booleans, any text
#: for the coordinator key).
URL_TEXT = {"nan": "nan", "inf": "inf", "-inf": "-inf", "1e30": "1e30", "10**30": str(10 ** 30),
            "off": "off", "abc": "abc"}
FLAGS = ("reaper", "resource_guard", "storm_control", "invalidate_pool", "fail_fast", "host_gate")
URL_ACCEPTED = {*{(PREFIX + name, "off") for name in FLAGS},
                *{(PREFIX + "coordinator_key", label) for label in URL_TEXT}}
#: Python values as keywords (None is the default there: not given).
KWARGS = {label: HOSTILE[label] for label in ("nan", "+inf", "-inf", "10**30", "10**400",
                                               "object()", "[1]", "'abc'")}
KWARGS_ACCEPTED = {(PREFIX + "coordinator_key", "'abc'")}


def _engine_from_url(given: Dict[str, Any]) -> Any:
    query = "&".join(f"{PREFIX}{name}={value}" for name, value in given.items())
    return sa.create_engine(f"{URL}&{query}")


def _engine_from_kwargs(given: Dict[str, Any]) -> Any:
    return sa.create_engine(URL, **{PREFIX + name: value for name, value in given.items()})


@pytest.mark.parametrize("spelled", OPTION_NAMES)
def test_plugin_url_options_refuse_hostile_text_at_create_engine(spelled: str) -> None:
    name = spelled[len(PREFIX):]
    accepted = {(name, label) for (option, label) in URL_ACCEPTED if option == spelled}
    assert _failures(_engine_from_url, name, spelled, URL_TEXT, accepted) == []


@pytest.mark.parametrize("spelled", OPTION_NAMES)
def test_plugin_keywords_refuse_hostile_values_at_create_engine(spelled: str) -> None:
    name = spelled[len(PREFIX):]
    accepted = {(name, label) for (option, label) in KWARGS_ACCEPTED if option == spelled}
    assert _failures(_engine_from_kwargs, name, spelled, KWARGS, accepted) == []


def test_nan_in_an_engine_url_fails_create_engine() -> None:
    with pytest.raises(sa.exc.ArgumentError, match="^connguard_max_connect_rate must be a number "
                                                   "of connects per second >= 0.001"):
        sa.create_engine("mysql+pymysql://u@127.0.0.1:1/db?plugin=connguard"
                         "&connguard_max_connect_rate=nan")


@pytest.mark.parametrize("url", ["redis://", "redis://[::1", f"redis://:{SECRET}@h:x/0",
                                 "redis://h/0?socket_timeout=abc"])
def test_plugin_reads_the_coordinator_url_at_create_engine(url: str) -> None:
    with pytest.raises(sa.exc.ArgumentError) as info:
        sa.create_engine(URL, connguard_coordinator=url)
    assert str(info.value).startswith("connguard_coordinator ") and SECRET not in str(info.value)


@pytest.mark.parametrize("word, on", [(w, True) for w in ("true", "1", "yes", "on", "TRUE")]
                         + [(w, False) for w in ("false", "0", "no", "off", "Off")])
def test_plugin_url_booleans_take_sqlalchemys_words(word: str, on: bool) -> None:
    engine = sa.create_engine(f"{URL}&connguard_storm_control={word}")
    try:
        assert (engine.pool.connguard_policy is not None) is on
    finally:
        engine.dispose()


def test_plugin_options_in_connect_args_fail_create_engine() -> None:
    with pytest.raises(sa.exc.ArgumentError, match="connect_args holds connguard_max_connect_rate: "
                                                   "connect_args go to the driver's connect"):
        sa.create_engine(URL, connect_args={"connguard_max_connect_rate": "nan"})


def test_a_later_connect_with_other_values_is_checked_then_compared() -> None:
    dropin.pool_for(**SERVER, max_size=2, checkout_timeout=5)
    try:
        dropin.pool_for(**SERVER, max_size=2, checkout_timeout=5.0)  # the same values
        for given, start in [({"max_size": True}, "max_size must be an integer"),
                             ({"storm_control": "off"}, "storm_control must be True or False"),
                             ({"max_lifetime": math.nan}, "max_lifetime must be"),
                             ({"max_size": 3}, "connguard.connect(): a pool for these")]:
            with pytest.raises(ValueError) as info:
                dropin.pool_for(**SERVER, **given)
            assert str(info.value).startswith(start), str(info.value)
    finally:
        connguard.close_all()


@pytest.mark.parametrize("value", [float("nan"), "5", True])
def test_the_plugin_refuses_a_pool_timeout_that_is_no_number(value: Any) -> None:
    """SQLAlchemy's own pool_timeout, read by the guarded pool: NaN made every wait end at
    once with the plugin (plain QueuePool waits for ever)."""
    with pytest.raises(sa.exc.ArgumentError, match="pool_timeout must be a number"):
        sa.create_engine("mysql+pymysql://u@127.0.0.1:1/db?plugin=connguard",
                         pool_timeout=value)
