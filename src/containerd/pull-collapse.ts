/**
 * Collapsing concurrent `stargaze rpull`s of one image (same containerd, namespace, snapshotter, reference,
 * platform and registry options): the first becomes the leader and pulls; the others wait for it, without
 * loading gRPC or the registry client, and finish with its result. Twenty pulls started at once then cost about
 * one pull plus nineteen bare Node starts, instead of twenty pulls fighting for two cores and the same locks.
 *
 * Leadership is a host lock (host-lock.ts: crash-safe, waiters woken when the leader is done). Lock and result
 * file live in rpull's private directory (rpull-dir.ts); a waiter trusts nothing it hears from the lock, only a
 * result file newer than its own start. Without a private directory nothing is collapsed.
 *
 * When the leader fails, what a waiter does depends on how:
 *  - its pull failed (an error it reports: not found, refused credentials, containerd down...): it says so
 *    (fail()), and every waiter pulls on its own at once, side by side, as without collapsing. The failure may
 *    well be theirs too, and then each reports it (its own message and exit status) after one pull's time,
 *    not after one pull's time per waiter, which is what taking the lead in turn would cost; if it was the
 *    leader's alone, they succeed. pull.ts's per-blob and per-layer host locks still keep them from
 *    downloading or unpacking a layer twice.
 *  - it went away without a word (interrupted, killed): that is nobody's failure but its own, so the
 *    collapse goes on: one waiter takes the lead and the others wait for it.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { errorCode } from '../errors';
import { tryHostLock, waitForHostLockRelease, type ReleaseHostLock } from './host-lock';
import { privateRpullDir, writeResultFile } from './rpull-dir';

/** Longest a waiter sleeps between looks at the lock (a release wakes it earlier). */
const WAIT_SLICE_MS = 1_000;
/** The longest a pull waits for another's result before it pulls on its own. */
const MAX_JOIN_WAIT_MS = 120_000;

/** What a waiter needs to report the pull as its own. */
export interface CollapsedPull {
  name: string;
  manifestDigest: string;
  platform: string | undefined;
  /** Layer digests, base first. */
  layers: string[];
}

/** The last outcome of a leader: its result, or that its pull failed. */
type ResultFile = (CollapsedPull & { finishedAt: number; failed?: undefined }) | { finishedAt: number; failed: true };

export type CollapseOutcome =
  | { kind: 'joined'; result: CollapsedPull; waitedMs: number }
  | {
      kind: 'lead';
      /** The pull succeeded: the waiters finish with `result`. */
      publish: (result: CollapsedPull) => Promise<void>;
      /** The pull failed (not interrupted): the waiters all pull on their own, at once. */
      fail: () => Promise<void>;
      release: ReleaseHostLock;
    };

/** Everything that decides what a pull does; two pulls with equal keys are interchangeable. */
export function collapseKey(parts: Record<string, unknown>): string {
  return createHash('sha256').update(JSON.stringify(parts)).digest('hex');
}

function isResult(x: unknown): x is ResultFile {
  const r = x as (Partial<CollapsedPull> & { finishedAt?: unknown; failed?: unknown }) | null;
  if (typeof r !== 'object' || r === null || typeof r.finishedAt !== 'number') return false;
  if (r.failed === true) return true;
  return (
    r.failed === undefined &&
    typeof r.name === 'string' &&
    typeof r.manifestDigest === 'string' &&
    (r.platform === undefined || typeof r.platform === 'string') &&
    Array.isArray(r.layers) &&
    r.layers.every((l) => typeof l === 'string')
  );
}

/** The outcome of a leader that finished after `since`: its result, 'failed', or undefined (none yet). */
async function readFresh(file: string, since: number): Promise<CollapsedPull | 'failed' | undefined> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(await readFile(file, 'utf8'));
  } catch (err) {
    if (errorCode(err) === 'ENOENT' || err instanceof SyntaxError) return undefined;
    throw err;
  }
  if (!isResult(parsed) || parsed.finishedAt < since) return undefined;
  if (parsed.failed === true) return 'failed';
  const { name, manifestDigest, platform, layers } = parsed;
  return { name, manifestDigest, platform, layers };
}

export interface JoinOptions {
  signal?: AbortSignal;
  /** rpull's private directory by default. */
  resultDir?: string;
  /**
   * Called each time this pull finds another leading and waits for it: first, and again after every look
   * (a release, or WAIT_SLICE_MS) that finds the lead still taken. Shows what the pull is doing meanwhile;
   * tests know from it that a waiter is waiting, rather than guessing a delay.
   */
  onWait?: () => void;
}

/**
 * Becomes the leader of pulls with this key, or waits for the current leader and returns its result. A leader
 * must publish() on success, fail() on a failure that is not an interruption, and release() always. A 'lead'
 * outcome may also mean "pull on your own": then its functions do nothing.
 */
export async function joinOrLead(key: string, opts: JoinOptions = {}): Promise<CollapseOutcome> {
  const noop: CollapseOutcome = { kind: 'lead', publish: () => Promise.resolve(), fail: () => Promise.resolve(), release: () => Promise.resolve() };
  const dir = await privateRpullDir(opts.resultDir);
  if (dir === undefined) return noop;
  const file = path.join(dir, `${key}.json`);
  const lockName = `rpull ${key}`;
  // Results finished before we started may be stale (the image was deleted since, say): only newer ones count.
  const since = Date.now();
  // Best effort: without the file the waiters take the lead in turn, which is slower but just as right.
  const write = async (outcome: ResultFile): Promise<void> => {
    await writeResultFile(file, JSON.stringify(outcome));
  };
  const lead = (release: ReleaseHostLock): CollapseOutcome => ({
    kind: 'lead',
    release,
    publish: (result) => write({ ...result, finishedAt: Date.now() }),
    fail: () => write({ finishedAt: Date.now(), failed: true }),
  });
  const outcome = (result: CollapsedPull | 'failed'): CollapseOutcome =>
    result === 'failed' ? noop : { kind: 'joined', result, waitedMs: Date.now() - since };
  for (;;) {
    opts.signal?.throwIfAborted();
    const release = await tryHostLock(lockName, dir);
    if (release !== undefined) {
      // The leader may have finished between our last look and taking the lock.
      const result = await readFresh(file, since);
      if (result === undefined) return lead(release);
      await release();
      return outcome(result);
    }
    opts.onWait?.();
    await waitForHostLockRelease(lockName, dir, WAIT_SLICE_MS, opts.signal);
    const result = await readFresh(file, since);
    if (result !== undefined) return outcome(result);
    // A leader that hangs (or a lock held by something else of ours): past this, pull without it (correct, just not shared).
    if (Date.now() - since > MAX_JOIN_WAIT_MS) return noop;
  }
}
