/**
 * A forwarding HTTP proxy that caps each connection's bandwidth (what a CDN or a registry cache often does
 * per TCP connection). Run as its own process so its CPU does not compete with the client being measured:
 *
 *   node dist/script/bench/throttle-proxy.js <listen port> <target host:port> <bytes per second>
 *
 * Prints `ready <port>` on stdout when listening. Each response body is paced: when the bytes sent run ahead
 * of `rate x elapsed` (by more than one upstream chunk, at most 64 KiB), the upstream is paused until they don't.
 */
import { createServer, request as httpRequest } from 'node:http';

/** Pacing state of one response (one at a time per connection). */
interface Pace {
  start: number;
  sent: number;
}

function main(): void {
  const [portArg, target, rateArg] = process.argv.slice(2);
  const rate = Number(rateArg);
  if (portArg === undefined || target === undefined || !(rate > 0)) {
    process.stderr.write('usage: throttle-proxy <listen port> <target host:port> <bytes per second>\n');
    process.exitCode = 2;
    return;
  }
  const [hostname, tport] = target.split(':');
  const server = createServer((req, res) => {
    // Requests on one connection are serial: each response starts a fresh budget (no burst after idling).
    const p: Pace = { start: Date.now(), sent: 0 };
    const up = httpRequest({ hostname, port: Number(tport), method: req.method, path: req.url, headers: { ...req.headers, host: target } }, (upRes) => {
      res.writeHead(upRes.statusCode ?? 502, upRes.headers);
      // Forward each chunk as it comes; when the bytes sent run ahead of the budget, pause the upstream
      // until the budget catches up (TCP backpressure then slows the registry down, as a real cap would).
      upRes.on('data', (chunk: Buffer) => {
        p.sent += chunk.length;
        const ok = res.write(chunk);
        const ahead = p.start + (p.sent / rate) * 1000 - Date.now();
        if (ahead > 1 || !ok) {
          upRes.pause();
          let waits = ok ? 1 : 2;
          const go = (): void => {
            if (--waits === 0) upRes.resume();
          };
          if (!ok) res.once('drain', go);
          setTimeout(go, Math.max(0, ahead));
          if (ok) return;
        }
      });
      upRes.on('end', () => res.end());
      upRes.on('error', () => res.destroy());
    });
    up.on('error', () => {
      if (!res.headersSent) res.writeHead(502);
      res.end();
    });
    req.pipe(up);
  });
  server.keepAliveTimeout = 30_000;
  server.listen(Number(portArg), '127.0.0.1', () => {
    const addr = server.address();
    process.stdout.write(`ready ${typeof addr === 'object' && addr !== null ? addr.port : portArg}\n`);
  });
  process.on('SIGTERM', () => {
    server.closeAllConnections();
    server.close(() => process.exit(0));
  });
}

main();
