/** Time bounds of registry requests: the Deadline signal and how timeout options read. */
import { RegistryError } from '../errors';

/** setTimeout's limit; longer timeouts are clamped. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** undefined -> default; null, 0 or negative -> no timeout. */
export function timeoutOption(v: number | null | undefined, dflt: number): number | null {
  if (v === undefined) return dflt;
  return v === null || !(v > 0) ? null : v;
}

/** A function, not an inline check, so TypeScript does not narrow `aborted` across awaits. */
export function isAborted(signal: AbortSignal | undefined): boolean {
  return signal?.aborted === true;
}

/**
 * An AbortSignal that fires when the caller aborts or `ms` passes, whichever is first. Built by hand rather
 * than with AbortSignal.any so nothing stays attached to a long-lived caller signal after dispose().
 */
export class Deadline {
  readonly signal: AbortSignal;
  private readonly controller = new AbortController();
  private readonly timer: NodeJS.Timeout | undefined;
  private readonly onParentAbort: () => void;
  /** Our own timer fired (as opposed to the caller aborting). */
  timedOut = false;

  constructor(
    private readonly parent: AbortSignal | undefined,
    readonly ms: number | null,
  ) {
    this.signal = this.controller.signal;
    this.onParentAbort = () => this.controller.abort(parent?.reason);
    if (parent?.aborted === true) {
      this.controller.abort(parent.reason);
    } else {
      parent?.addEventListener('abort', this.onParentAbort, { once: true });
    }
    if (ms !== null && !this.signal.aborted) {
      this.timer = setTimeout(() => {
        this.timedOut = true;
        this.controller.abort(new RegistryError(`timed out after ${ms} ms`));
      }, Math.min(ms, MAX_TIMER_MS));
    }
  }

  /** What to throw for `err`: the caller's abort reason, our own timeout as a RegistryError about `what`, or `err`. */
  error(err: unknown, what: string): unknown {
    if (this.parent?.aborted === true) return this.parent.reason ?? err;
    if (this.timedOut) return new RegistryError(`${what}: timed out after ${this.ms} ms`);
    return err;
  }

  dispose(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.parent?.removeEventListener('abort', this.onParentAbort);
  }
}
