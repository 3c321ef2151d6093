/**
 * A TCP proxy that emulates a network link on loopback: a round-trip time and a bandwidth shared by every
 * connection through it (unlike throttle-proxy.ts, which caps each HTTP connection separately). Run as its
 * own process so its CPU does not compete with the client being measured:
 *
 *   node dist/script/bench/link-proxy.js <listen port> <target host:port> <rtt ms> <bits per second>
 *
 * Prints `ready <port>` on stdout when listening (port 0: any free port).
 *
 * Model: each direction is one link of the given rate with a one-way delay of rtt/2. A chunk read from one
 * side starts transmitting when the link is free (FIFO over all connections), takes `bytes / rate`, and is
 * written to the other side `rtt/2` after its transmission ends. A new connection pays one extra round trip
 * before any data moves (the TCP handshake a remote registry would cost). A connection whose queued bytes
 * exceed MAX_QUEUED is paused until its queue drains (backpressure: the sender slows down, as over TCP).
 */
import { createServer, connect, type Socket } from 'node:net';

/** Bytes one connection may have in flight inside the emulated link before its sender is paused. */
const MAX_QUEUED = 1 << 20;
/** Chunks are split to at most this size so that pacing over connections is fair and smooth. */
const MAX_CHUNK = 16 * 1024;

/** One direction of the link: a FIFO transmitter shared by all connections. */
class Link {
  private freeAt = 0;
  constructor(
    private readonly bytesPerMs: number,
    private readonly delayMs: number,
  ) {}
  /** When (ms, performance.now clock) a chunk of `n` bytes offered now arrives at the far end. */
  arrival(n: number): number {
    const now = performance.now();
    const start = Math.max(now, this.freeAt);
    this.freeAt = start + n / this.bytesPerMs;
    return this.freeAt + this.delayMs;
  }
}

/** Forwards `from` to `to` through `link`, keeping order and applying backpressure. */
function pipeThrough(from: Socket, to: Socket, link: Link): void {
  const queue: Array<{ at: number; data: Buffer }> = [];
  let queued = 0;
  let timer: NodeJS.Timeout | undefined;
  let ended = false;
  const flush = (): void => {
    timer = undefined;
    const now = performance.now();
    while (queue.length > 0 && queue[0]!.at <= now + 0.5) {
      const { data } = queue.shift()!;
      queued -= data.length;
      if (!to.destroyed) to.write(data);
    }
    if (queued < MAX_QUEUED / 2 && from.isPaused()) from.resume();
    if (queue.length > 0) timer = setTimeout(flush, Math.max(0, queue[0]!.at - performance.now()));
    else if (ended && !to.destroyed) to.end();
  };
  from.on('data', (chunk: Buffer) => {
    for (let off = 0; off < chunk.length; off += MAX_CHUNK) {
      const data = chunk.subarray(off, Math.min(chunk.length, off + MAX_CHUNK));
      queue.push({ at: link.arrival(data.length), data });
      queued += data.length;
    }
    if (queued >= MAX_QUEUED) from.pause();
    if (timer === undefined) timer = setTimeout(flush, Math.max(0, queue[0]!.at - performance.now()));
  });
  from.on('end', () => {
    ended = true;
    if (queue.length === 0 && !to.destroyed) to.end();
  });
}

function main(): void {
  const [portArg, target, rttArg, bpsArg] = process.argv.slice(2);
  const rttMs = Number(rttArg);
  const bps = Number(bpsArg);
  if (portArg === undefined || target === undefined || !(rttMs >= 0) || !(bps > 0)) {
    process.stderr.write('usage: link-proxy <listen port> <target host:port> <rtt ms> <bits per second>\n');
    process.exitCode = 2;
    return;
  }
  const [host, tport] = target.split(':');
  const bytesPerMs = bps / 8 / 1000;
  const down = new Link(bytesPerMs, rttMs / 2);
  const up = new Link(bytesPerMs, rttMs / 2);
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    sockets.add(client);
    client.on('close', () => sockets.delete(client));
    client.pause();
    // the handshake's round trip, then connect upstream (loopback: instant)
    setTimeout(() => {
      const upstream = connect({ host, port: Number(tport) }, () => {
        pipeThrough(client, upstream, up);
        pipeThrough(upstream, client, down);
        client.resume();
      });
      sockets.add(upstream);
      // A clean close of the upstream (its FIN: 'end') is passed on by pipeThrough once the bytes still
      // crossing the emulated link are delivered. Destroying the client here would cut them off: the
      // registry side closes idle keep-alive connections after a second, while several connections sharing
      // a slow link may still have their last MiB in flight (responses cut short, then fetched again).
      upstream.on('close', () => sockets.delete(upstream));
      upstream.on('error', () => client.destroy());
      client.on('close', () => upstream.destroy());
    }, rttMs);
    client.on('error', () => client.destroy());
  });
  server.listen(Number(portArg), '127.0.0.1', () => {
    const addr = server.address();
    process.stdout.write(`ready ${typeof addr === 'object' && addr !== null ? addr.port : portArg}\n`);
  });
  process.on('SIGTERM', () => {
    for (const s of sockets) s.destroy();
    server.close(() => process.exit(0));
  });
}

main();
