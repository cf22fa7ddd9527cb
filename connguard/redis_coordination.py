"""The Redis coordinator: leases, token bucket and breaker per destination, in Lua scripts.

Each operation is one script, so it is atomic however many processes and hosts run it, and
every time in it is the Redis server's own clock (``TIME``): hosts need not agree on theirs.
Keys per destination share one hash tag (``connguard:{10.0.0.5:3306}:...``), as a script's
keys must on Redis Cluster (the client here is a plain ``redis.Redis``: one server, or a
Sentinel- or DNS-managed primary). Every key expires on its own when no process uses it.

``pip install 'connguard[redis]'`` installs the client; ``redis`` is imported only when a
pool names a Redis coordinator.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from connguard import redaction
from connguard.backend import BackendDown, Census, Coordinator, GateVerdict

# Redis < 5 needs this before a script may write after reading TIME; later it is a no-op.
_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

#: KEYS: holders (zset holder -> expiry ms), counts (hash holder -> leases), needy (zset
#: holder -> expiry ms). ARGV: holder, want, held, released, resync, cap, ttl ms, needy ms.
#: Returns {granted, total, mine, holders, share, needy others}.
LEASE = _NOW + """
local holder = ARGV[1]
local want, held, released = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local resync, cap, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local needy_ttl = tonumber(ARGV[8])
-- Holders that stopped refreshing (killed, crashed, cut off) lose their leases.
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, h in ipairs(dead) do
  redis.call('HDEL', KEYS[2], h)
  redis.call('ZREM', KEYS[3], h)
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
-- The holder's count: its own word if we do not know it (new, expired, data lost) or it
-- asks (after an error), else the running count less what it released since.
local mine
if resync == 1 or not redis.call('ZSCORE', KEYS[1], holder) then
  mine = held
else
  mine = math.max(0, (tonumber(redis.call('HGET', KEYS[2], holder)) or 0) - released)
end
redis.call('ZADD', KEYS[1], now + ttl, holder)
local total = mine
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  if all[i] ~= holder then total = total + tonumber(all[i + 1]) end
end
local holders = redis.call('ZCARD', KEYS[1])
local share = math.max(1, math.floor(cap / holders))
local needy = redis.call('ZCARD', KEYS[3])
if redis.call('ZSCORE', KEYS[3], holder) then needy = needy - 1 end
local granted = 0
if want == 1 and total < cap and (mine < share or needy == 0) then
  granted = 1
  mine = mine + 1
  total = total + 1
end
redis.call('HSET', KEYS[2], holder, mine)
if want == 1 and granted == 0 and mine < share then
  redis.call('ZADD', KEYS[3], now + needy_ttl, holder)
elseif mine >= share then
  redis.call('ZREM', KEYS[3], holder)
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl * 4) end
return {granted, total, mine, holders, share, needy}
"""

#: KEYS: holders, counts, needy. ARGV: holder.
DROP = """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

#: KEYS: gate (hash). ARGV: rate per s, burst, probe timeout ms, key ttl ms.
#: Returns {action, wait ms, failures, cause}.
GATE_ADMIT = _NOW + """
local g = redis.call('HMGET', KEYS[1], 'tokens', 'stamp', 'failures', 'open_until',
                     'probe_until', 'cause')
local failures = tonumber(g[3]) or 0
local open_until = tonumber(g[4]) or 0
local cause = g[6] or ''
if open_until > 0 then
  if now < open_until then return {'open', open_until - now, failures, cause} end
  local probe_until = tonumber(g[5]) or 0
  if probe_until > now then return {'busy', probe_until - now, failures, cause} end
  redis.call('HSET', KEYS[1], 'probe_until', now + tonumber(ARGV[3]))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'probe', 0, failures, cause}
end
local rate = tonumber(ARGV[1]) / 1000
local burst = tonumber(ARGV[2])
local tokens = tonumber(g[1]) or burst
local stamp = tonumber(g[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local action, wait = 'go', 0
-- The epsilon absorbs float rounding, as in connguard.storm.TokenBucket.
if tokens >= 1 - 1e-9 then
  tokens = math.max(0, tokens - 1)
else
  action = 'wait'
  wait = math.ceil((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'stamp', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {action, wait, failures, cause}
"""

#: KEYS: gate. ARGV: threshold, wait ms, cause, key ttl ms. Returns the failures in a row.
GATE_FAILED = _NOW + """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until')) or 0
-- Open at the threshold; a failure while open or half-open (a failed probe, or an attempt
-- that started before the breaker opened) keeps it open at least this much longer.
if open_until > 0 or failures >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'open_until', math.max(open_until, now + tonumber(ARGV[2])),
             'probe_until', 0)
end
redis.call('HSET', KEYS[1], 'cause', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return failures
"""

#: KEYS: gate. The server answered: the breaker closes.
GATE_SUCCEEDED = """
redis.call('HSET', KEYS[1], 'failures', 0, 'open_until', 0, 'probe_until', 0, 'cause', '')
return 1
"""

#: Gate state outlives its last use by this long (the bucket refills long before).
GATE_KEY_TTL_MS = 600_000

INSTALL_HINT = ("the Redis coordinator needs the redis package: pip install 'connguard[redis]' "
                "(or pip install redis)")


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return redis


class RedisCoordinator(Coordinator):
    """A :class:`~connguard.backend.Coordinator` on Redis (>= 4).

    ``url``: ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS) or
    ``unix:///path/to/redis.sock?db=0``; query arguments go to the client
    (``?socket_timeout=0.5``). The client does not retry: a failed call makes the process
    fall back at once (see :class:`~connguard.backend.Health`). Timeouts default to 1 s.
    """

    def __init__(self, url: str, prefix: str = "connguard", client: Any = None,
                 **client_options: Any) -> None:
        redis = _import_redis()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.address = redaction.redact_url(url)  # as coordination.redact_url
        super().__init__()
        self.prefix = prefix
        if client is None:
            options = {"socket_connect_timeout": 1.0, "socket_timeout": 1.0,
                       "retry": Retry(NoBackoff(), 0), "client_name": "connguard",
                       **client_options}
            try:
                client = redis.Redis.from_url(url, **options)
            except ValueError:
                # urllib's own words may quote a piece of the password ("Port could not be
                # cast to integer value as 'Zq9x'"): not shown.
                raise ValueError(
                    f"coordinator URL {self.address!r} could not be read by the Redis client: "
                    "check its query arguments (?socket_timeout=0.5) and percent-encode "
                    "characters such as / @ : # ? in its user name and password (/ is "
                    "%2F)") from None
        self.client = client
        self._errors = (redis.exceptions.RedisError, OSError)
        self._lease = client.register_script(LEASE)
        self._drop = client.register_script(DROP)
        self._admit = client.register_script(GATE_ADMIT)
        self._failed = client.register_script(GATE_FAILED)
        self._succeeded = client.register_script(GATE_SUCCEEDED)

    # -- keys ------------------------------------------------------------------------------
    def lease_keys(self, destination: str) -> List[str]:
        tag = f"{self.prefix}:{{{destination}}}"
        return [f"{tag}:holders", f"{tag}:leases", f"{tag}:needy"]

    def gate_key(self, destination: str) -> str:
        return f"{self.prefix}:{{{destination}}}:gate"

    def _run(self, script: Any, keys: List[str], args: List[Any]) -> Any:
        try:
            return script(keys=keys, args=args)
        except self._errors as exc:
            raise BackendDown(f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    # -- budget ----------------------------------------------------------------------------
    def lease(self, destination: str, holder: str, *, want: bool, held: int, released: int,
              resync: bool, cap: int, ttl: float, needy_ttl: float) -> Census:
        reply = self._run(self._lease, self.lease_keys(destination),
                          [holder, int(want), held, released, int(resync), cap,
                           int(ttl * 1000), int(needy_ttl * 1000)])
        granted, total, mine, holders, share, needy = (int(v) for v in reply)
        return Census(bool(granted), total, mine, holders, share, needy)

    def drop(self, destination: str, holder: str) -> None:
        self._run(self._drop, self.lease_keys(destination), [holder])

    def holders(self, destination: str) -> Dict[str, int]:
        """``{holder: leases}`` as Redis has them now (for tests and ``connguard doctor``)."""
        try:
            raw = self.client.hgetall(self.lease_keys(destination)[1])
        except self._errors as exc:
            raise BackendDown(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        return {_text(k): int(v) for k, v in raw.items()}

    # -- gate ------------------------------------------------------------------------------
    def gate_admit(self, destination: str, rate: float, burst: int,
                   probe_timeout: float) -> GateVerdict:
        action, wait, failures, cause = self._run(
            self._admit, [self.gate_key(destination)],
            [repr(float(rate)), burst, int(probe_timeout * 1000), GATE_KEY_TTL_MS])
        return GateVerdict(_text(action), int(wait) / 1000.0, int(failures), _text(cause))

    def gate_failed(self, destination: str, threshold: int, wait: float, cause: str) -> None:
        self._run(self._failed, [self.gate_key(destination)],
                  [threshold, max(1, int(wait * 1000)), cause, GATE_KEY_TTL_MS])

    def gate_succeeded(self, destination: str) -> None:
        self._run(self._succeeded, [self.gate_key(destination)], [])

    def close(self) -> None:
        self.client.close()


def _text(value: Optional[Any]) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
