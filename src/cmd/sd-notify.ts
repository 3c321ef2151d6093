/**
 * Readiness for systemd's `Type=notify` (script/systemd/stargaze.service): once the daemon answers calls
 * (its socket listens earlier, while the previous run's snapshots are mounted again), tell the service
 * manager `READY=1`. Node cannot write to the unix datagram socket in
 * `$NOTIFY_SOCKET` itself, so this runs `systemd-notify --ready --pid=<our pid>`: the message names us
 * as the main PID, and systemd-notify waits until the manager has read it. Outside systemd
 * (no NOTIFY_SOCKET: a shell, a container, the tests) this does nothing.
 */
import { execFile } from 'node:child_process';
import { errorMessage } from '../errors';
import type { Logger } from '../log';

const NOTIFY_SOCKET_ENV = 'NOTIFY_SOCKET';
const SYSTEMD_NOTIFY_BIN = 'systemd-notify';
const NOTIFY_TIMEOUT_MS = 10_000;

/** Sends READY=1 when started by systemd; failures are logged, never thrown (systemd then times out the start). */
export function notifySystemdReady(log: Logger): Promise<void> {
  if (!process.env[NOTIFY_SOCKET_ENV]) return Promise.resolve();
  return new Promise((resolve) => {
    execFile(SYSTEMD_NOTIFY_BIN, ['--ready', `--pid=${process.pid}`], { timeout: NOTIFY_TIMEOUT_MS }, (err, _stdout, stderr) => {
      if (err) log.error({ module: 'sd-notify', err: errorMessage(err), stderr: stderr.trim() }, 'could not notify systemd of readiness');
      else log.info({ module: 'sd-notify' }, 'notified systemd: ready');
      resolve();
    });
  });
}
