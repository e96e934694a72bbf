"""A brake on guessing the admin key: wrong keys are counted per client address.

After `LIMIT` wrong admin keys from one address within `WINDOW` seconds, every admin request
from that address is refused (429, `Retry-After`) for `LOCKOUT` seconds, right key or wrong:
a guesser learns nothing while it waits. Other addresses are never slowed, so an attacker
cannot lock the operator out from elsewhere. A request without an `Authorization` header
guessed nothing and is not counted (a scraper left without the key locks nobody out).

The table is bounded: at most `MAX_ADDRESSES` addresses are remembered, so a flood from many
addresses costs a fixed amount of memory. A live lock-out is never forgotten to make room:
when the table is full, an expired lock-out goes first, then the address merely counting
whose last wrong key is oldest. When every slot holds a live lock-out (`MAX_ADDRESSES`
addresses each sent `LIMIT` wrong keys within `LOCKOUT` seconds), the brake fails closed: an
address it does not hold is refused as if locked out, right key or wrong, until the lock-out
that ends first frees its slot. (An attacker with more addresses than the table holds can
still rotate through them so that their counts are forgotten before they reach `LIMIT`: the
key's length, at least 16 characters, is what makes guessing hopeless.) An IPv6 address counts
as its /64, the block one host or one network is given (an attacker holding one has 2^64
addresses to rotate through), one that carries an IPv4 address (mapped, NAT64, 6to4,
Teredo) as that address; a right key from one host of a /64 (or a 6to4 site, or a Teredo
client's NAT) forgets none of the block's wrong keys. Only the
admin routes (the admin API and a non-public `/metrics`) consult it: a virtual key's request
never does. The address is the connection's peer: behind a reverse proxy, every client is the
proxy, and a guesser locks the proxy's address out of the admin API for `LOCKOUT` seconds.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["AdminBrake", "counted_as"]

LIMIT = 10
WINDOW = 60.0
LOCKOUT = 300.0
MAX_ADDRESSES = 10_000


def counted_as(address: str) -> str:
    """Who `address` counts as: an IPv6 address its /64 network; one that carries an IPv4
    address (IPv4-mapped or -compatible, NAT64's well-known and local-use prefixes, SIIT's,
    6to4, Teredo's client) that IPv4 address; a link-local one itself; any other as it is."""
    return _counted(address)[0]


def _counted(address: str) -> tuple[str, bool]:
    """`counted_as(address)`, and whether that is one host (whose right key may forget its
    wrong ones), not a network: a /64, a 6to4 site, the hosts behind a Teredo client's NAT."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # (a zone: fe80::1%eth0)
    except ValueError:
        return address, True
    if isinstance(ip, ipaddress.IPv4Address):
        return address, True
    site = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
    if site is not None:
        return str(site), False
    host = ip.ipv4_mapped
    if host is None and ip in _LOCAL_NAT64:  # (RFC 6052's /48 layout: bits 64 to 71 skipped)
        host = ipaddress.IPv4Address(ip.packed[6:8] + ip.packed[9:11])
    if host is None and any(ip in net for net in _CARRY_IPV4) and ip != _LOOPBACK:
        host = ipaddress.IPv4Address(ip.packed[12:])
    if host is not None:
        return str(host), True
    if ip.is_link_local or ip == _LOOPBACK:
        return address, True
    return str(ipaddress.IPv6Network((ip, 64), strict=False)), False


# IPv6 blocks whose last 32 bits are an IPv4 host: NAT64's well-known prefix, SIIT's, and the
# old IPv4-compatible addresses; and NAT64's local-use prefix (RFC 8215), a /48.
_CARRY_IPV4 = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96")
)
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
_LOOPBACK = ipaddress.IPv6Address("::1")


class _Count:
    __slots__ = ("failures", "since")

    def __init__(self, now: float) -> None:
        self.failures = 0
        self.since = now  # the start of the current window


class AdminBrake:
    """Wrong admin keys per address, and the addresses locked out for sending too many."""

    def __init__(
        self,
        limit: int = LIMIT,
        window: float = WINDOW,
        lockout: float = LOCKOUT,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window, self.lockout = limit, window, lockout
        self.max_addresses = max_addresses
        self._clock = clock
        # Addresses counting wrong keys, the one whose last was longest ago first.
        self._counts: OrderedDict[str, _Count] = OrderedDict()
        # Locked-out addresses and when each lock-out ends, in the order they end (every
        # lock-out lasts `lockout`, so that is the order they began in).
        self._locked: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts) + len(self._locked)

    @property
    def full(self) -> bool:
        """Every slot holds a live lock-out: addresses not held are refused (fail closed)."""
        return len(self._locked) >= self.max_addresses

    def _expire(self, now: float) -> None:
        locked = self._locked
        while locked:
            address, until = next(iter(locked.items()))
            if until > now:
                return
            del locked[address]

    def locked_for(self, address: str) -> float:
        """Seconds `address` is still locked out for (0: it is not)."""
        address = counted_as(address)
        now = self._clock()
        self._expire(now)
        until = self._locked.get(address)
        if until is None and self.full:  # not held, and no slot to hold it: refused
            until = next(iter(self._locked.values()))
        return 0.0 if until is None else until - now

    def failed(self, address: str) -> bool:
        """`address` sent a wrong admin key: counted; whether that locked it out."""
        address = counted_as(address)
        now = self._clock()
        self._expire(now)
        if address in self._locked or self.full:
            return False  # refused while locked (`locked_for`): nothing more to count
        count = self._counts.get(address)
        if count is None:
            if len(self) >= self.max_addresses:
                self._counts.popitem(last=False)  # (not empty: not `full`)
            count = self._counts[address] = _Count(now)
        else:
            self._counts.move_to_end(address)
            if now - count.since >= self.window:
                count.failures, count.since = 0, now
        count.failures += 1
        if count.failures < self.limit:
            return False
        del self._counts[address]
        self._locked[address] = now + self.lockout
        return True

    def passed(self, address: str) -> None:
        """`address` sent the right key: its wrong ones are forgotten (not those of its /64,
        which other hosts may have sent: a guesser there would be let off by every right
        key of a monitor beside it)."""
        who, one_host = _counted(address)
        if self._counts and one_host:
            self._counts.pop(who, None)
