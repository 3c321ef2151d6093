/**
 * Cleanup plumbing for the e2e harness.
 *
 * Every helper that starts a process, mounts something or creates a tmp dir takes a `CleanupScope`
 * and registers its teardown there. In a test, pass the node:test `TestContext` (`t`). For state
 * shared by a suite, call `suiteScope()` in the describe body and pass it from `before` hooks
 * (node:test's `after()` called inside a running `before` hook fires at once, so `{ after }` is
 * not a usable scope there). Scripts such as the demo use a `CleanupStack` directly.
 *
 * As a last resort (the test process exits without running its hooks) synchronous exit guards kill
 * process groups, lazily unmount and remove tmp dirs.
 */

import { constants as osConstants } from 'node:os';

/** Anything with node:test's `after(fn)` shape: TestContext, `{ after }` from node:test, CleanupStack. */
export interface CleanupScope {
  after(fn: () => unknown): void;
}

/** LIFO cleanup list for scripts (the demo): `run()` once at the end, on failure, or on a signal. */
export class CleanupStack implements CleanupScope {
  /** Registered teardown functions, run newest first. */
  private readonly fns: Array<() => unknown> = [];
  /** Set once `run()` started, so a second signal does not run teardown twice. */
  private running: Promise<void> | undefined;

  after(fn: () => unknown): void {
    this.fns.push(fn);
  }

  run(): Promise<void> {
    this.running ??= (async () => {
      while (this.fns.length > 0) {
        const fn = this.fns.pop()!;
        try {
          await fn();
        } catch (err) {
          process.stderr.write(`cleanup step failed: ${err instanceof Error ? err.message : String(err)}\n`);
        }
      }
    })();
    return this.running;
  }
}

/**
 * A `CleanupStack` that node:test runs after the current suite. Call it synchronously in a
 * `describe` body (not inside a hook):
 *
 *   describe('x', () => {
 *     const scope = suiteScope();
 *     before(async () => { registry = await startRegistry({ scope }); });
 *   });
 */
export function suiteScope(): CleanupStack {
  // required lazily so scripts that use the harness outside node:test never load the test runner (a dynamic
  // import() would be async, and after() has to be registered while the suite is being defined)
  // eslint-disable-next-line @typescript-eslint/no-require-imports -- see above
  const { after } = require('node:test') as typeof import('node:test');
  const stack = new CleanupStack();
  after(() => stack.run());
  return stack;
}

/** Synchronous last-resort teardown functions, run LIFO on process 'exit'. */
const exitGuards = new Set<() => void>();
let exitHookInstalled = false;

/**
 * Registers a synchronous function to run if the process exits while the resource is still live.
 * Returns the function that unregisters it (call it once the resource was cleaned up normally).
 */
export function addExitGuard(fn: () => void): () => void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', () => {
      for (const guard of [...exitGuards].reverse()) {
        try {
          guard();
        } catch {
          // best effort: the process is going away
        }
      }
    });
    // A signal would end the process without 'exit'; turn it into an exit so the guards run,
    // unless someone else (the demo) handles the signal.
    for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
      const onSignal = (): void => {
        if (process.listenerCount(sig) > 1) return;
        process.exit(128 + (osConstants.signals[sig] ?? 0));
      };
      process.on(sig, onSignal);
    }
  }
  exitGuards.add(fn);
  return () => {
    exitGuards.delete(fn);
  };
}

/** Runs `fn` and swallows (but reports) its error: teardown must go on after one step fails. */
export async function bestEffort(what: string, fn: () => unknown): Promise<void> {
  try {
    await fn();
  } catch (err) {
    process.stderr.write(`harness: ${what} failed: ${err instanceof Error ? err.message : String(err)}\n`);
  }
}
