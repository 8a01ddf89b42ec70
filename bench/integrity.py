"""The benchmark's byte-exact check, run inside a client pod as a plain script
(``python bench/integrity.py --target IP:PORT --flows F --size S``; standard
library only, so it needs nothing from the bench package on the path).

F concurrent TCP flows to an echo server (``python -m sandbox.apps echo``, which
echoes every byte and, only after the client's EOF, sends the trailer
``bye <n>``). Each flow sends S deterministic pseudo-random bytes, half-closes
(shutdown SHUT_WR), and reads until EOF. A flow passes when the S echoed bytes
hash (SHA-256) to what was sent, which checks both directions (a byte lost,
changed or reordered on the way out comes back changed), and the trailer says
the server got exactly S bytes and then the EOF (the half-close crossed the
proxy after the data, and the reply after it still came back).

Bounded: a flow with no progress for --idle seconds is counted as stalled, and
at --deadline every unfinished flow is stalled; the report (one JSON line)
is printed either way, with what each bad flow got.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import time

CHUNK = 256 * 1024


async def one_flow(state: dict[str, object], host: str, port: int, size: int, seed: int,
                   idle: float) -> None:
    """One flow; what happened goes into ``state`` as it goes, so that a flow cut
    short by the deadline still tells how far it got."""
    state.update(flow=seed, sent=0, echoed=0, ok=False, phase="connect")
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), idle)
    except (OSError, TimeoutError) as exc:
        state["error"] = f"connect: {exc!r}"
        return
    sent_hash = hashlib.sha256()
    back_hash = hashlib.sha256()
    tail = bytearray()
    rng = random.Random(seed)

    async def send() -> None:
        left = size
        while left:
            chunk = rng.randbytes(min(CHUNK, left))
            sent_hash.update(chunk)
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), idle)
            left -= len(chunk)
            state["sent"] = size - left
        writer.write_eof()  # half-close: done talking, still listening
        state["phase"] = "half-closed, reading"

    async def recv() -> None:
        got = 0
        while True:
            chunk = await asyncio.wait_for(reader.read(CHUNK), idle)
            if not chunk:
                break
            if got < size:
                body = chunk[: size - got]
                back_hash.update(body)
                tail.extend(chunk[len(body):])
            else:
                tail.extend(chunk)
            got += len(chunk)
            state["echoed"] = min(got, size)

    state["phase"] = "sending"
    tasks = [asyncio.ensure_future(send()), asyncio.ensure_future(recv())]
    error = None
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        for t in tasks:
            exc = t.exception() if t in done else None
            if isinstance(exc, TimeoutError):
                error = f"stalled: no progress for {idle:g}s ({state['phase']})"
            elif exc is not None:
                error = f"{type(exc).__name__}: {exc} ({state['phase']})"
    finally:
        for t in tasks:
            t.cancel()
        writer.close()
    trailer = bytes(tail[:64]).decode(errors="replace")
    match = state["echoed"] == size and sent_hash.digest() == back_hash.digest()
    trailer_ok = trailer == f"bye {size}\n"
    state.update(match=match, trailer_ok=trailer_ok, ok=match and trailer_ok and not error,
                 seconds=round(time.monotonic() - t0, 3))
    state.pop("phase")
    if error:
        state["error"] = error
    elif not trailer_ok:
        state["trailer"] = trailer


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    host, _, port = args.target.rpartition(":")
    t0 = time.monotonic()
    states: list[dict[str, object]] = [{} for _ in range(args.flows)]
    tasks = [asyncio.ensure_future(one_flow(states[i], host, int(port), args.size, i, args.idle))
             for i in range(args.flows)]
    _, pending = await asyncio.wait(tasks, timeout=args.deadline)
    for t in pending:
        t.cancel()
    flows = []
    for st, t in zip(states, tasks, strict=True):
        if t in pending:
            st["error"] = f"stalled: unfinished at the {args.deadline:g}s deadline ({st.pop('phase', '?')})"
        elif t.exception() is not None:
            st["error"] = repr(t.exception())
        st.pop("phase", None)
        flows.append(st)
    return {"target": args.target, "flows": flows, "size": args.size,
            "seconds": round(time.monotonic() - t0, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="IP:PORT of an echo server (or a VIP in front of one)")
    p.add_argument("--flows", type=int, default=16)
    p.add_argument("--size", type=int, default=1 << 20, help="bytes each flow sends (and gets back)")
    p.add_argument("--idle", type=float, default=8.0, help="seconds without progress: a stalled flow")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds for all flows")
    args = p.parse_args()
    report = asyncio.run(main_async(args))
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
