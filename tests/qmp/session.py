#!/usr/bin/env python3
"""Drives a cowlab control socket with the QEMU project's own QMP client
library, `qemu.qmp` (requirements.txt), as it would drive QEMU.

    session.py async|legacy SOCKET

cowlab must be `cowlab run hello --vcpus 2 --wait --control SOCKET`. The
`async` session uses `qemu.qmp.QMPClient`, the `legacy` one the synchronous
`qemu.qmp.legacy.QEMUMonitorProtocol`. Each: connects and negotiates
capabilities, waits (with a deadline) for `query-status` to show both
vCPUs parked, gets an error reply for an unknown command and for a bad
argument, sends `stop`, lets vCPU 0 run with `cont vcpu=0` and receives its
events, disconnects while cowlab waits; then a second client connects,
sends `cont` and receives events up to `SHUTDOWN`, when cowlab hangs up.

Every wait has a deadline (STEP seconds); the Rust test (vmm/tests/qmp.rs)
has one on the whole script too. Prints one line per step; exits 0 when
every check held.
"""
import asyncio
import sys
import time

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

STEP = 20.0  # seconds for any one step


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what if isinstance(what, str) else what(), flush=True)


def parked(status):
    return (
        status["what"] == "hello"
        and status["status"] == "paused"
        and [v["state"] for v in status["vcpus"]] == ["stopped", "stopped"]
    )


def ended(event, vcpu):
    return event["event"] == "VCPU_ENDED" and event["data"]["vcpu"] == vcpu


# --- the async API ----------------------------------------------------------


async def next_event(qmp):
    return dict(await asyncio.wait_for(qmp.events.get(), STEP))


async def events_until(qmp, last):
    seen = []
    while not seen or not last(seen[-1]):
        seen.append(await next_event(qmp))
    return seen


async def async_session(sock):
    qmp = QMPClient("cowlab-async")
    await asyncio.wait_for(qmp.connect(sock), STEP)  # greeting, qmp_capabilities
    check("cowlab" in qmp.greeting.QMP.version, "greeting names cowlab")
    check(list(qmp.greeting.QMP.capabilities) == [], "no capabilities offered")

    until = time.monotonic() + STEP
    while True:
        status = await asyncio.wait_for(qmp.execute("query-status"), STEP)
        if parked(status):
            break
        check(time.monotonic() < until, f"vCPUs parked in time: {status}")
        await asyncio.sleep(0.02)
    check(True, f"query-status: {status}")

    try:
        await asyncio.wait_for(qmp.execute("frobnicate"), STEP)
        check(False, "frobnicate fails")
    except ExecuteError as e:
        check(e.error_class == "CommandNotFound", f"unknown command: {e.error_class}: {e}")
    try:
        await asyncio.wait_for(qmp.execute("stop", {"vcpu": "one"}), STEP)
        check(False, "stop vcpu=one fails")
    except ExecuteError as e:
        check(e.error_class == "GenericError", f"bad argument: {e.error_class}: {e}")

    check(await asyncio.wait_for(qmp.execute("stop"), STEP) == {}, "stop")
    check(await asyncio.wait_for(qmp.execute("cont", {"vcpu": 0}), STEP) == {}, "cont vcpu=0")
    seen = await events_until(qmp, lambda e: ended(e, 0))
    names = [e["event"] for e in seen]
    check("VCPU_RESUMED" in names, f"events for vCPU 0: {names}")
    check(seen[-1]["data"]["outcome"] == "exited", "vCPU 0 exited")
    check(all("timestamp" in e for e in seen), "events carry timestamps")
    status = await asyncio.wait_for(qmp.execute("query-status"), STEP)
    check(
        [v["state"] for v in status["vcpus"]] == ["ended", "stopped"],
        f"vCPU 1 still parked: {status}",
    )
    await asyncio.wait_for(qmp.disconnect(), STEP)
    check(True, "disconnected while cowlab waits")

    # A second client ends the run; cowlab hangs up after SHUTDOWN.
    qmp = QMPClient("cowlab-async-2")
    await asyncio.wait_for(qmp.connect(sock), STEP)
    check(await asyncio.wait_for(qmp.execute("cont"), STEP) == {}, "cont")
    seen = await events_until(qmp, lambda e: e["event"] == "SHUTDOWN")
    names = [e["event"] for e in seen]
    check("RUN_FINISHED" in names and any(ended(e, 1) for e in seen), f"to the end: {names}")
    try:
        await asyncio.wait_for(qmp.disconnect(), STEP)
    except EOFError:
        pass  # qemu.qmp reports the server's hang-up here, as with QEMU's quit
    check(True, "disconnected after SHUTDOWN")


# --- the legacy (synchronous) API ---------------------------------------------


def legacy_events_until(qmp, last):
    seen = []
    while not seen or not last(seen[-1]):
        seen.extend(qmp.get_events(wait=STEP))
    return seen


def legacy_session(sock):
    qmp = QEMUMonitorProtocol(sock, nickname="cowlab-legacy")
    qmp.settimeout(STEP)
    greeting = qmp.connect(negotiate=True)
    check("cowlab" in greeting["QMP"]["version"], f"greeting: {greeting}")

    until = time.monotonic() + STEP
    while True:
        status = qmp.cmd("query-status")
        if parked(status):
            break
        check(time.monotonic() < until, f"vCPUs parked in time: {status}")
        time.sleep(0.02)
    check(True, f"query-status: {status}")

    reply = qmp.cmd_raw("frobnicate")
    check(reply["error"]["class"] == "CommandNotFound", f"unknown command: {reply}")
    try:
        qmp.cmd("stop", vcpu="one")
        check(False, "stop vcpu=one fails")
    except ExecuteError as e:
        check(e.error_class == "GenericError", f"bad argument: {e.error_class}: {e}")

    check(qmp.cmd("stop") == {}, "stop")
    check(qmp.cmd("cont", vcpu=0) == {}, "cont vcpu=0")
    seen = legacy_events_until(qmp, lambda e: ended(e, 0))
    names = [e["event"] for e in seen]
    check("VCPU_RESUMED" in names, f"events for vCPU 0: {names}")
    check(seen[-1]["data"]["outcome"] == "exited", "vCPU 0 exited")
    qmp.close()
    check(True, "disconnected while cowlab waits")

    qmp = QEMUMonitorProtocol(sock, nickname="cowlab-legacy-2")
    qmp.settimeout(STEP)
    qmp.connect(negotiate=True)
    check(qmp.cmd("cont") == {}, "cont")
    seen = legacy_events_until(qmp, lambda e: e["event"] == "SHUTDOWN")
    names = [e["event"] for e in seen]
    check("RUN_FINISHED" in names and any(ended(e, 1) for e in seen), f"to the end: {names}")
    try:
        qmp.close()
    except EOFError:
        pass  # the server hung up first, as QEMU does after quit
    check(True, "disconnected after SHUTDOWN")


def main():
    mode, sock = sys.argv[1], sys.argv[2]
    if mode == "async":
        asyncio.run(async_session(sock))
    elif mode == "legacy":
        legacy_session(sock)
    else:
        sys.exit(f"unknown mode {mode!r} (async or legacy)")
    print("session passed", flush=True)


if __name__ == "__main__":
    main()
