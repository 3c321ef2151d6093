import assert from 'node:assert/strict';
import { describe, it } from 'node:test';

import type { PullEvent } from '../../../src/containerd/pull';
import type { PullRequest, PullSummary } from '../../../src/containerd/pull-request';
import { SharedPulls, sharedPullKey } from '../../../src/service/shared-pulls';
import { request } from './pull-fixture';

const summary: PullSummary = { name: request.ref, manifestDigest: `sha256:${'a'.repeat(64)}`, platform: 'linux/amd64', layers: [], ms: 12 };
const startEvent: PullEvent = { type: 'layer-start', index: 0, digest: `sha256:${'b'.repeat(64)}`, size: 3 };

/** A pull the test finishes by hand, counting how often it was started and seeing its signal. */
class ManualPull {
  starts = 0;
  signal: AbortSignal | undefined;
  emit: ((e: PullEvent) => void) | undefined;
  private finish: ((s: PullSummary) => void) | undefined;
  private fail: ((err: Error) => void) | undefined;

  readonly run = (_req: PullRequest, signal: AbortSignal, onEvent: (e: PullEvent) => void): Promise<PullSummary> => {
    this.starts++;
    this.signal = signal;
    this.emit = onEvent;
    return new Promise<PullSummary>((resolve, reject) => {
      this.finish = resolve;
      this.fail = reject;
      signal.addEventListener('abort', () => reject(signal.reason as Error), { once: true });
    });
  };

  resolve(): void {
    this.finish?.(summary);
  }

  reject(err: Error): void {
    this.fail?.(err);
  }
}

describe('SharedPulls', () => {
  it('runs identical concurrent pulls once; a caller that joins late sees the events before it', async () => {
    const manual = new ManualPull();
    const pulls = new SharedPulls(manual.run);
    const firstEvents: PullEvent[] = [];
    const lateEvents: PullEvent[] = [];
    const first = pulls.pull(request, new AbortController().signal, (e) => firstEvents.push(e));
    manual.emit?.(startEvent);
    let joined = false;
    const late = pulls.pull({ ...request }, new AbortController().signal, (e) => lateEvents.push(e), () => (joined = true));
    assert.equal(joined, true);
    assert.deepEqual(lateEvents, [startEvent]);
    manual.resolve();
    assert.deepEqual(await first, summary);
    assert.deepEqual(await late, summary);
    assert.equal(manual.starts, 1);
    assert.deepEqual(firstEvents, [startEvent]);
    assert.equal(pulls.size, 0);
  });

  it("replays only each layer's latest progress to a caller that joins late", async () => {
    const manual = new ManualPull();
    const pulls = new SharedPulls(manual.run);
    const first = pulls.pull(request, new AbortController().signal, () => undefined);
    const digest = startEvent.digest;
    manual.emit?.(startEvent);
    for (const bytes of [1, 2, 3]) manual.emit?.({ type: 'layer-progress', index: 0, digest, bytes, size: 3 });
    const late: PullEvent[] = [];
    const second = pulls.pull(request, new AbortController().signal, (e) => late.push(e));
    assert.deepEqual(late, [startEvent, { type: 'layer-progress', index: 0, digest, bytes: 3, size: 3 }]);
    manual.resolve();
    await Promise.all([first, second]);
  });

  it('runs pulls that differ in anything that decides the pull on their own', () => {
    const manual = new ManualPull();
    const pulls = new SharedPulls(manual.run);
    const signal = new AbortController().signal;
    void pulls.pull(request, signal, () => undefined).catch(() => undefined);
    void pulls.pull({ ...request, namespace: 'other' }, signal, () => undefined).catch(() => undefined);
    void pulls.pull({ ...request, user: { username: 'u', password: 'q' } }, signal, () => undefined).catch(() => undefined);
    void pulls.pull({ ...request, platform: { os: 'linux', architecture: 'arm64', variant: 'v8' } }, signal, () => undefined).catch(() => undefined);
    assert.equal(manual.starts, 4);
    assert.equal(pulls.size, 4);
    assert.notEqual(sharedPullKey(request), sharedPullKey({ ...request, user: undefined }));
    pulls.abortAll(new Error('stop'));
    assert.equal(pulls.size, 0);
  });

  it('keeps the pull going while one caller waits, and stops it when the last one goes', async () => {
    const manual = new ManualPull();
    const pulls = new SharedPulls(manual.run);
    const a = new AbortController();
    const b = new AbortController();
    const first = pulls.pull(request, a.signal, () => undefined);
    const second = pulls.pull(request, b.signal, () => undefined);
    a.abort(new Error('first went away'));
    await assert.rejects(first, /first went away/);
    assert.equal(manual.signal?.aborted, false);
    b.abort(new Error('second went away'));
    await assert.rejects(second, /second went away/);
    assert.equal(manual.signal?.aborted, true);
    assert.equal(pulls.size, 0);
    // A new call starts a new pull rather than joining the stopped one.
    void pulls.pull(request, new AbortController().signal, () => undefined).catch(() => undefined);
    assert.equal(manual.starts, 2);
    pulls.abortAll(new Error('stop'));
  });

  it('gives every caller the failure, and starts afresh after it', async () => {
    const manual = new ManualPull();
    const pulls = new SharedPulls(manual.run);
    const first = pulls.pull(request, new AbortController().signal, () => undefined);
    const second = pulls.pull(request, new AbortController().signal, () => undefined);
    manual.reject(new Error('manifest unknown'));
    await assert.rejects(first, /manifest unknown/);
    await assert.rejects(second, /manifest unknown/);
    assert.equal(pulls.size, 0);
    const third = pulls.pull(request, new AbortController().signal, () => undefined);
    assert.equal(manual.starts, 2);
    manual.resolve();
    assert.deepEqual(await third, summary);
  });

  it('leaves nothing to join behind a pull that throws before its first await', async () => {
    let starts = 0;
    const pulls = new SharedPulls(() => {
      starts++;
      throw new Error('bad at once');
    });
    await assert.rejects(pulls.pull(request, new AbortController().signal, () => undefined), /bad at once/);
    assert.equal(pulls.size, 0);
    await assert.rejects(pulls.pull(request, new AbortController().signal, () => undefined), /bad at once/);
    assert.equal(starts, 2);
  });

  it('refuses a caller whose signal is already aborted without starting anything', async () => {
    const manual = new ManualPull();
    const pulls = new SharedPulls(manual.run);
    const a = new AbortController();
    a.abort(new Error('gone'));
    await assert.rejects(pulls.pull(request, a.signal, () => undefined), /gone/);
    assert.equal(manual.starts, 0);
  });
});
