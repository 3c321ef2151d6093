import assert from 'node:assert/strict';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';

import pino from 'pino';

import { DaemonPullError, pullThroughDaemon } from '../../../src/cmd/rpull-daemon';
import type { PullEvent } from '../../../src/containerd/pull';
import { preloadPull, type PullRequest, type PullSummary, type runPull } from '../../../src/containerd/pull-request';
import { parsePullCall, parsePullReply } from '../../../src/service/pull-protocol';
import { startPullServer, type PullServer } from '../../../src/service/pull-service';
import { request } from './pull-fixture';


const summary: PullSummary = { name: request.ref, manifestDigest: `sha256:${'a'.repeat(64)}`, platform: 'linux/amd64', layers: [{ digest: `sha256:${'b'.repeat(64)}`, outcome: 'lazy', bytes: 0 }], ms: 12 };
const resolvedEvent: PullEvent = {
  type: 'resolved',
  name: request.ref,
  target: { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: summary.manifestDigest, size: 10 },
  manifest: { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: summary.manifestDigest, size: 10 },
  platform: 'linux/amd64',
  layers: 1,
};

/** Sends raw lines on the pull socket and collects the replies until the daemon closes. */
function exchange(address: string, lines: string): Promise<unknown[]> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(address);
    let text = '';
    socket.on('data', (d: Buffer) => (text += d.toString()));
    socket.on('error', reject);
    socket.on('close', () => resolve(text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as unknown)));
    socket.write(lines);
  });
}

describe('pull protocol', () => {
  it('takes a well-formed request as it is', () => {
    assert.deepEqual(parsePullCall({ v: 1, pull: request }), { v: 1, pull: request });
    assert.deepEqual(parsePullCall({ v: 1, pull: { ...request, user: undefined } }).pull.user, undefined);
  });

  it('refuses a request whose fields are missing, relative or of the wrong kind, saying which', () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ ref: '' }, /ref must be/],
      [{ address: 'containerd.sock' }, /address must be an absolute path/],
      [{ hostsDir: 'certs.d' }, /hostsDir must be an absolute path/],
      [{ dockerConfigDir: 42 }, /dockerConfigDir must be/],
      [{ prefetchBytes: -1 }, /prefetchBytes/],
      [{ prefetchBytes: 1.5 }, /prefetchBytes/],
      [{ plainHttp: 'yes' }, /plainHttp/],
      [{ user: { username: 'u' } }, /user must be/],
      [{ platform: 'linux/amd64' }, /platform must be/],
      [{ namespace: 'x'.repeat(5000) }, /namespace must be/],
      [{ snapshotter: 'a\0b' }, /snapshotter must be/],
    ];
    for (const [change, error] of cases) {
      assert.throws(() => parsePullCall({ v: 1, pull: { ...request, ...change } }), error, JSON.stringify(change).slice(0, 80));
    }
    assert.throws(() => parsePullCall({ v: 1 }), /an object \{ v, pull \}/);
  });

  it('checks replies enough that printing them cannot throw', () => {
    assert.deepEqual(parsePullReply({ event: resolvedEvent }), { event: resolvedEvent });
    assert.deepEqual(parsePullReply({ done: summary }), { done: summary });
    assert.deepEqual(parsePullReply({ error: { code: 'ERR_REGISTRY', message: 'gone' } }), { error: { code: 'ERR_REGISTRY', message: 'gone' } });
    assert.throws(() => parsePullReply({ event: { type: 'layer-done', digest: 'x', outcome: 'stolen' } }), /outcome/);
    assert.throws(() => parsePullReply({ event: { type: 'resolved' } }), /resolved event/);
    assert.throws(() => parsePullReply({ done: { ...summary, layers: [{ digest: 1 }] } }), /done needs/);
    assert.throws(() => parsePullReply({ error: {} }), /error needs a message/);
    assert.throws(() => parsePullReply([]), /object/);
  });
});

describe('pull service', () => {
  let dir: string;
  let server: PullServer;
  let address: string;
  /** What the fake pull does; the real one needs containerd (the e2e rpull tests run it). */
  let pull: (req: PullRequest, signal: AbortSignal, onEvent: (e: PullEvent) => void) => Promise<PullSummary>;
  const run: typeof runPull = (req, _log, signal, onEvent) => pull(req, signal, onEvent);

  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-pull-service-'));
    address = path.join(dir, 'sub', 'pull.sock');
    server = await startPullServer({ address, log: pino({ level: 'silent' }), run });
  });
  after(async () => {
    await server.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('is root only: the socket is 0600 in a 0700 directory', async () => {
    assert.equal((await stat(address)).mode & 0o777, 0o600);
    assert.equal((await stat(path.dirname(address))).mode & 0o777, 0o700);
  });

  it('hands the request over, streams the events, and ends with the summary', async () => {
    let seen: PullRequest | undefined;
    pull = (req, _signal, onEvent) => {
      seen = req;
      onEvent(resolvedEvent);
      return Promise.resolve(summary);
    };
    const events: PullEvent[] = [];
    const outcome = await pullThroughDaemon(address, request, (e) => events.push(e), new AbortController().signal);
    assert.deepEqual(outcome, { kind: 'pulled', summary });
    assert.deepEqual(events, [resolvedEvent]);
    assert.deepEqual(seen, request);
  });

  it("reports the pull's failure with its message, and serves the next pull", async () => {
    pull = () => Promise.reject(new Error('registry.example/app:v1: not found'));
    await assert.rejects(pullThroughDaemon(address, request, () => undefined, new AbortController().signal), (err: unknown) => {
      assert.ok(err instanceof DaemonPullError);
      assert.equal(err.message, 'registry.example/app:v1: not found');
      return true;
    });
    pull = () => Promise.resolve(summary);
    assert.equal((await pullThroughDaemon(address, request, () => undefined, new AbortController().signal)).kind, 'pulled');
  });

  it('cancels the pull when the client goes away', async () => {
    let aborted: Promise<unknown> | undefined;
    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    pull = (_req, signal) => {
      aborted = new Promise((resolve) => signal.addEventListener('abort', () => resolve(signal.reason), { once: true }));
      started();
      // As the real pull does: it stops when its signal says so.
      return new Promise((_resolve, reject) => signal.addEventListener('abort', () => reject(signal.reason as Error), { once: true }));
    };
    const abort = new AbortController();
    const outcome = pullThroughDaemon(address, request, () => undefined, abort.signal);
    await running;
    abort.abort(new Error('interrupted'));
    await assert.rejects(outcome, /interrupted/);
    assert.match(String(await aborted), /closed the connection/);
  });

  it('pulls once for identical rpulls that come while it runs; each gets the events and the summary', async () => {
    let starts = 0;
    let finish!: () => void;
    let started!: () => void;
    const running = new Promise<void>((r) => (started = r));
    pull = (_req, _signal, onEvent) => {
      starts++;
      onEvent(resolvedEvent);
      started();
      return new Promise((resolve) => (finish = () => resolve(summary)));
    };
    const eventsA: PullEvent[] = [];
    const eventsB: PullEvent[] = [];
    const a = pullThroughDaemon(address, request, (e) => eventsA.push(e), new AbortController().signal);
    await running;
    const b = pullThroughDaemon(address, { ...request }, (e) => eventsB.push(e), new AbortController().signal);
    // b is on the daemon's side once its replayed event arrived.
    while (eventsB.length === 0) await new Promise((r) => setTimeout(r, 5));
    finish();
    assert.deepEqual(await a, { kind: 'pulled', summary });
    assert.deepEqual(await b, { kind: 'pulled', summary });
    assert.equal(starts, 1);
    assert.deepEqual(eventsA, [resolvedEvent]);
    assert.deepEqual(eventsB, [resolvedEvent]);
  });

  it('answers bad requests with an error and keeps serving', async () => {
    pull = () => Promise.resolve(summary);
    const notJson = await exchange(address, 'this is not json\n');
    assert.deepEqual(notJson, [], 'a line that is not JSON costs the connection');
    const [oldVersion] = await exchange(address, `${JSON.stringify({ v: 99, pull: request })}\n`);
    assert.deepEqual(oldVersion, { error: { code: 'ERR_PROTOCOL', message: 'pull protocol: version 99 is not 1', unsupported: true } });
    const [relative] = await exchange(address, `${JSON.stringify({ v: 1, pull: { ...request, address: 'rel.sock' } })}\n`);
    assert.deepEqual(relative, { error: { code: 'ERR_PROTOCOL', message: 'pull protocol: address must be an absolute path' } });
    assert.deepEqual(await exchange(address, `${'x'.repeat(1024 * 1024 + 10)}\n`), [], 'an over-long line costs the connection');
    assert.equal((await pullThroughDaemon(address, request, () => undefined, new AbortController().signal)).kind, 'pulled');
  });

  it('says it took the pull before anything else', async () => {
    pull = () => Promise.resolve(summary);
    const replies = await exchange(address, `${JSON.stringify({ v: 1, pull: request })}\n`);
    assert.deepEqual(replies[0], { accepted: true });
    assert.deepEqual(replies.at(-1), { done: summary });
  });

  it('a daemon that goes away mid-pull: unavailable, marked midway, so rpull says so and pulls itself', async () => {
    const midway = net.createServer((s) => {
      s.write(`${JSON.stringify({ accepted: true })}\n${JSON.stringify({ event: resolvedEvent })}\n`);
      setImmediate(() => s.destroy());
    });
    const midwayAddress = path.join(dir, 'midway.sock');
    await new Promise<void>((r) => midway.listen(midwayAddress, r));
    try {
      const events: PullEvent[] = [];
      const outcome = await pullThroughDaemon(midwayAddress, request, (e) => events.push(e), new AbortController().signal);
      assert.equal(outcome.kind, 'unavailable');
      assert.equal(outcome.kind === 'unavailable' && outcome.midway, true);
      assert.deepEqual(events, [resolvedEvent]);
    } finally {
      midway.close();
    }
  });

  it('a daemon that accepts the connection but never answers: unavailable after the bound, not a hang', async () => {
    const silent = net.createServer(() => undefined);
    const silentAddress = path.join(dir, 'silent.sock');
    await new Promise<void>((r) => silent.listen(silentAddress, r));
    try {
      const outcome = await pullThroughDaemon(silentAddress, request, () => undefined, new AbortController().signal, 100);
      assert.deepEqual(outcome, { kind: 'unavailable', reason: `${silentAddress}: no answer within 100 ms`, midway: false });
    } finally {
      silent.close();
    }
  });

  it('says unavailable, not failed, where nobody listens or speaks the version', async () => {
    const none = await pullThroughDaemon(path.join(dir, 'absent.sock'), request, () => undefined, new AbortController().signal);
    assert.equal(none.kind, 'unavailable');
    await writeFile(path.join(dir, 'plain-file'), '');
    assert.equal((await pullThroughDaemon(path.join(dir, 'plain-file'), request, () => undefined, new AbortController().signal)).kind, 'unavailable');
    const older = net.createServer((s) => s.end(`${JSON.stringify({ error: { message: 'pull protocol: version 1 is not 2', unsupported: true } })}\n`));
    const olderAddress = path.join(dir, 'older.sock');
    await new Promise<void>((r) => older.listen(olderAddress, r));
    try {
      assert.equal((await pullThroughDaemon(olderAddress, request, () => undefined, new AbortController().signal)).kind, 'unavailable');
    } finally {
      older.close();
    }
  });
});

describe('preloadPull', () => {
  it('loads the modules and protobuf definitions a pull needs', async () => {
    await preloadPull();
    const { ContainerdClient } = await import('../../../src/containerd/client');
    assert.equal(typeof ContainerdClient.connect, 'function');
  });
});

describe('pull service: a daemon that stops', () => {
  it('cuts its pulls short with an answer that lets rpull pull by itself', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'stargaze-pull-stop-'));
    try {
      let started!: () => void;
      const running = new Promise<void>((r) => (started = r));
      const run: typeof runPull = (_req, _log, signal) => {
        started();
        return new Promise((_resolve, reject) => signal.addEventListener('abort', () => reject(signal.reason as Error), { once: true }));
      };
      const server = await startPullServer({ address: path.join(dir, 'pull.sock'), log: pino({ level: 'silent' }), run });
      const outcome = pullThroughDaemon(path.join(dir, 'pull.sock'), request, () => undefined, new AbortController().signal);
      await running;
      await server.close();
      const o = await outcome;
      assert.equal(o.kind, 'unavailable');
      assert.match(o.kind === 'unavailable' ? o.reason : '', /the daemon is stopping/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
