#!/usr/bin/env python3
"""A TCP proxy on 127.0.0.1 that delays every chunk by DELAY_MS in each direction, keeping
order and pipelining (a chunk leaves DELAY_MS after it arrived, whatever is queued ahead):
a round-trip time on loopback where the kernel has no netem (scripts/bench-host.sh).

    delay-proxy.py DELAY_MS LISTEN_PORT TARGET_PORT
"""
import asyncio
import sys
import time

DELAY = float(sys.argv[1]) / 1000


async def pump(reader, writer):
    queue = asyncio.Queue()

    async def send():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.ensure_future(send())
    while True:
        data = await reader.read(65536)
        await queue.put((time.monotonic() + DELAY, data or None))
        if not data:
            break
    await sender


async def handle(client_r, client_w):
    server_r, server_w = await asyncio.open_connection("127.0.0.1", int(sys.argv[3]))
    await asyncio.gather(pump(client_r, server_w), pump(server_r, client_w), return_exceptions=True)


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[2]))
    await server.serve_forever()


asyncio.run(main())
