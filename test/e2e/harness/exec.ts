/**
 * Child processes for the e2e harness: one-shot commands (`run`) and long-lived servers
 * (`spawnGroup`), both in their own process group so a whole tree can be signalled at once.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, type WriteStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { connect, createServer } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { addExitGuard } from './cleanup';

/** Default limit for one-shot commands; image conversion of a 64 MiB layer stays well below. */
export const DEFAULT_RUN_TIMEOUT_MS = 180_000;
/** How long `ProcessGroup.stop` waits after SIGTERM before SIGKILL. */
export const DEFAULT_STOP_GRACE_MS = 10_000;
/** Longest stdout/stderr kept in a CommandError message. */
const ERROR_OUTPUT_TAIL_CHARS = 4_000;

export interface RunOptions {
  cwd?: string;
  /** Merged over process.env. */
  env?: NodeJS.ProcessEnv;
  /** Written to stdin, which is then closed. Without it stdin is /dev/null. */
  input?: string | Buffer;
  timeoutMs?: number;
  /** Resolve with the result instead of throwing when the exit code is not 0. */
  allowFailure?: boolean;
}

export interface RunResult {
  command: string;
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  durationMs: number;
}

export class CommandError extends Error {
  constructor(readonly result: RunResult, reason: string) {
    super(
      `${result.command}: ${reason}` +
        (result.stderr ? `\n--- stderr ---\n${tail(result.stderr)}` : '') +
        (result.stdout ? `\n--- stdout ---\n${tail(result.stdout)}` : ''),
    );
    this.name = 'CommandError';
  }
}

function tail(text: string): string {
  return text.length > ERROR_OUTPUT_TAIL_CHARS ? '...' + text.slice(-ERROR_OUTPUT_TAIL_CHARS) : text;
}

export function formatCommand(cmd: string, args: readonly string[]): string {
  return [cmd, ...args].map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : JSON.stringify(a))).join(' ');
}

/** Sends `signal` to the process group led by `pid`; false when it is already gone. */
export function signalGroup(pid: number, signal: NodeJS.Signals): boolean {
  try {
    process.kill(-pid, signal);
    return true;
  } catch {
    return false;
  }
}

/**
 * Runs a command to completion in its own process group and collects its output. On timeout the
 * whole group is SIGKILLed. Throws `CommandError` on a non-zero exit unless `allowFailure`.
 */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const command = formatCommand(cmd, args);
  const started = Date.now();
  const timeoutMs = opts.timeoutMs ?? DEFAULT_RUN_TIMEOUT_MS;
  return new Promise<RunResult>((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: { ...process.env, ...opts.env },
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
      detached: true,
    });
    const unguard = child.pid !== undefined ? addExitGuard(() => signalGroup(child.pid!, 'SIGKILL')) : () => {};
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on('data', (b: Buffer) => out.push(b));
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      if (child.pid !== undefined) signalGroup(child.pid, 'SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      unguard();
      reject(new Error(`${command}: ${e.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      unguard();
      const result: RunResult = {
        command,
        code,
        signal,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        durationMs: Date.now() - started,
      };
      if (timedOut) reject(new CommandError(result, `timed out after ${timeoutMs} ms`));
      else if (code !== 0 && !opts.allowFailure)
        reject(new CommandError(result, signal ? `killed by ${signal}` : `exit code ${code}`));
      else resolve(result);
    });
  });
}

export interface SpawnGroupOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  /** File that receives stdout (appended). */
  stdoutFile?: string;
  /** File that receives stderr (appended); defaults to stdoutFile. */
  stderrFile?: string;
  /** Called with each complete stdout line (after it was written to stdoutFile). */
  onStdoutLine?: (line: string) => void;
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A long-lived child that leads its own process group. */
export interface ProcessGroup {
  readonly pid: number;
  readonly command: string;
  readonly child: ChildProcess;
  /** Resolves when the process has exited and its output streams are flushed. */
  readonly exited: Promise<ExitStatus>;
  isRunning(): boolean;
  /** Signals the whole group. */
  signal(signal: NodeJS.Signals): void;
  /** SIGTERM to the group, then SIGKILL after `graceMs`; resolves with the exit status. */
  stop(graceMs?: number): Promise<ExitStatus>;
  /** SIGKILL to the group; resolves with the exit status. */
  kill(): Promise<ExitStatus>;
}

/** Starts a server process as the leader of a new process group (detached) and tracks its exit. */
export function spawnGroup(cmd: string, args: readonly string[], opts: SpawnGroupOptions = {}): ProcessGroup {
  const command = formatCommand(cmd, args);
  const stdoutStream = opts.stdoutFile ? createWriteStream(opts.stdoutFile, { flags: 'a' }) : undefined;
  const stderrStream: WriteStream | undefined = opts.stderrFile
    ? createWriteStream(opts.stderrFile, { flags: 'a' })
    : stdoutStream;
  const child = spawn(cmd, args, {
    cwd: opts.cwd,
    env: { ...process.env, ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  if (child.pid === undefined) {
    // spawn failures (ENOENT) are reported asynchronously through 'error'; surface them synchronously
    child.on('error', () => undefined);
    stdoutStream?.end();
    if (stderrStream !== stdoutStream) stderrStream?.end();
    throw new Error(`${command}: failed to start (is ${cmd} installed?)`);
  }
  const pid = child.pid;
  const unguard = addExitGuard(() => signalGroup(pid, 'SIGKILL'));
  let running = true;
  let pending = '';
  child.stdout.on('data', (b: Buffer) => {
    stdoutStream?.write(b);
    if (!opts.onStdoutLine) return;
    pending += b.toString('utf8');
    let nl: number;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      opts.onStdoutLine(line);
    }
  });
  child.stderr.on('data', (b: Buffer) => stderrStream?.write(b));
  const exited = new Promise<ExitStatus>((resolve) => {
    child.on('error', () => {
      /* reported through 'close' */
    });
    child.on('close', (code, signal) => {
      running = false;
      unguard();
      if (pending && opts.onStdoutLine) opts.onStdoutLine(pending);
      pending = '';
      const ends: Promise<void>[] = [];
      for (const s of new Set([stdoutStream, stderrStream])) {
        if (s) ends.push(new Promise((r) => s.end(() => r())));
      }
      void Promise.all(ends).then(() => resolve({ code, signal }));
    });
  });
  const group: ProcessGroup = {
    pid,
    command,
    child,
    exited,
    isRunning: () => running,
    signal: (sig) => {
      if (running) signalGroup(pid, sig);
    },
    async stop(graceMs = DEFAULT_STOP_GRACE_MS) {
      if (running) {
        signalGroup(pid, 'SIGTERM');
        const timer = setTimeout(() => signalGroup(pid, 'SIGKILL'), graceMs);
        const status = await exited;
        clearTimeout(timer);
        // children that ignored SIGTERM but outlived the leader
        signalGroup(pid, 'SIGKILL');
        return status;
      }
      signalGroup(pid, 'SIGKILL');
      return exited;
    },
    async kill() {
      signalGroup(pid, 'SIGKILL');
      return exited;
    },
  };
  return group;
}

export interface WaitForOptions {
  timeoutMs?: number;
  intervalMs?: number;
  /** Checked before every probe; a returned string aborts the wait with that message. */
  abortIf?: () => string | undefined;
}

/**
 * Polls `probe` until it returns something other than undefined/false (which is returned).
 * Errors thrown by the probe count as "not yet"; the last one is included in the timeout error.
 */
export async function waitFor<T>(
  what: string,
  probe: () => Promise<T | undefined | false> | T | undefined | false,
  opts: WaitForOptions = {},
): Promise<T> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const intervalMs = opts.intervalMs ?? 100;
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    const abort = opts.abortIf?.();
    if (abort !== undefined) throw new Error(`while waiting for ${what}: ${abort}`);
    try {
      const value = await probe();
      if (value !== undefined && value !== false) return value;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() >= deadline) {
      const detail = lastError instanceof Error ? ` (last error: ${lastError.message})` : '';
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${detail}`);
    }
    await sleep(intervalMs);
  }
}

/** A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a bind race). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const addr = server.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      server.close(() => resolve(port));
    });
  });
}

/** Reads the last `maxChars` characters of a text file, or '' if it does not exist. */
export async function readTail(file: string, maxChars = ERROR_OUTPUT_TAIL_CHARS): Promise<string> {
  try {
    const text = await readFile(file, 'utf8');
    return text.length > maxChars ? '...' + text.slice(-maxChars) : text;
  } catch {
    return '';
  }
}

/** Whether a unix socket accepts a connection now (a server's readiness probe). */
export function socketAccepts(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = connect(socketPath);
    const done = (ok: boolean): void => {
      sock.destroy();
      resolve(ok);
    };
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
    sock.setTimeout(1_000, () => done(false));
  });
}
