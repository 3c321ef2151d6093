/**
 * Condition waits for unit tests: wait for the state that marks an event rather than for a guessed delay.
 * The deadline only bounds a failure (the condition never came true); a passing test never waits for it.
 */
import { setTimeout as delay } from 'node:timers/promises';

/** How often the condition is looked at again. */
const POLL_MS = 10;
const DEFAULT_TIMEOUT_MS = 30_000;

/** Resolves once `cond()` holds; throws "timed out waiting for <what>" after `timeoutMs`. */
export async function until(what: string, cond: () => boolean | Promise<boolean>, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await delay(POLL_MS);
  }
}
