/**
 * The snapshot data model shared by the metadata store, the snapshotter and the gRPC service:
 * containerd's snapshots.Info / Usage / mount.Mount, in TypeScript.
 */

export type SnapshotKind = 'view' | 'active' | 'committed';

/**
 * Nanoseconds since the Unix epoch. containerd compares Created/Updated with `==` and checks them against
 * its own nanosecond clock, so millisecond Dates would lose information it relies on.
 */
export type TimestampNs = bigint;

export interface SnapshotInfo {
  /** The key (active, view) or name (committed). */
  name: string;
  /** Name of the committed parent; '' when none. */
  parent: string;
  kind: SnapshotKind;
  createdAt: TimestampNs;
  updatedAt: TimestampNs;
  labels: Record<string, string>;
}

export interface SnapshotUsage {
  /** Bytes allocated on disk (st_blocks * 512, hardlinks once). */
  size: number;
  inodes: number;
}

/** A mount as containerd's types.Mount: mount(2) fields with fstab-style options. */
export interface Mount {
  type: string;
  source: string;
  options: string[];
}

const NS_PER_MS = 1_000_000n;
/** Bound on the one-off busy wait that anchors the monotonic clock to a wall-clock millisecond edge. */
const CALIBRATION_MAX_SPIN_NS = 2_000_000n;
/** How far the anchored clock may stray outside Date.now()'s millisecond before it is re-anchored. */
const DRIFT_TOLERANCE_NS = 200_000n;

/** Wall-clock nanoseconds at `anchorHrNs`. */
let anchorWallNs = 0n;
/** process.hrtime.bigint() at the moment Date.now() was seen to tick over. */
let anchorHrNs = -1n;
/** Last value handed out, so timestamps never go backwards within the process. */
let lastNowNs = 0n;

/**
 * Anchors the monotonic clock to the wall clock: spin until Date.now() ticks to the next millisecond,
 * at which instant the wall clock is exactly on that millisecond. Costs at most ~1 ms, once (and again
 * only if the two clocks drift apart by a millisecond).
 */
function calibrate(): void {
  const start = Date.now();
  const deadline = process.hrtime.bigint() + CALIBRATION_MAX_SPIN_NS;
  let ms = start;
  let hr = process.hrtime.bigint();
  while (ms === start && hr < deadline) {
    ms = Date.now();
    hr = process.hrtime.bigint();
  }
  anchorWallNs = BigInt(ms) * NS_PER_MS;
  anchorHrNs = hr;
}

/**
 * Wall-clock time in nanoseconds. Node has no nanosecond wall clock (Date.now() is milliseconds and
 * performance.timeOrigin is off by milliseconds), so the sub-millisecond part comes from the monotonic
 * clock anchored by calibrate(). The result always lies inside the millisecond Date.now() reports and
 * never repeats, so Created == Updated only when they were written together.
 */
export function nowNs(): TimestampNs {
  if (anchorHrNs < 0n) calibrate();
  const msNs = BigInt(Date.now()) * NS_PER_MS;
  let ns = anchorWallNs + (process.hrtime.bigint() - anchorHrNs);
  if (ns < msNs - DRIFT_TOLERANCE_NS || ns >= msNs + NS_PER_MS + DRIFT_TOLERANCE_NS) {
    calibrate();
    ns = anchorWallNs + (process.hrtime.bigint() - anchorHrNs);
  }
  if (ns < msNs) ns = msNs;
  if (ns <= lastNowNs) ns = lastNowNs + 1n;
  lastNowNs = ns;
  return ns;
}

/** containerd's field adaptor for snapshots (snapshots/storage adaptSnapshot). */
export function snapshotFieldAdaptor(info: SnapshotInfo) {
  return (fieldpath: readonly string[]): { value: string; present: boolean } => {
    switch (fieldpath[0]) {
      case 'kind':
        return { value: info.kind, present: true };
      case 'name':
        return { value: info.name, present: true };
      case 'parent':
        return { value: info.parent, present: true };
      case 'labels': {
        const key = fieldpath.slice(1).join('.');
        if (Object.prototype.hasOwnProperty.call(info.labels, key)) return { value: info.labels[key]!, present: true };
        return { value: '', present: false };
      }
      default:
        return { value: '', present: false };
    }
  };
}
