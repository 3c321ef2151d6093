/**
 * The layer's status file (`<mountpoint>/.stargz-snapshotter/<digest>.json`), in the reference's format: how
 * much of the layer is local and its last read error.
 */

/**
 * The status file's fixed size. The kernel caches its size for `attr_timeout` like any file's; padding
 * keeps it constant, so a fresh read is never cut at a stale size.
 */
export const STATUS_FILE_BYTES = 1024;

/** The file's name in the mount's hidden status directory. */
export function statusFileName(digest: string): string {
  return `${digest}.json`;
}

/** One JSON object and a newline, padded with spaces to STATUS_FILE_BYTES. */
export function layerStatusJson(digest: string, size: number, fetchedBytes: number, lastError: string | undefined): string {
  const fetchedSize = Math.min(fetchedBytes, size);
  const fetchedPercent = size > 0 ? (fetchedSize / size) * 100 : 100;
  const render = (error: string | undefined): string =>
    JSON.stringify({ ...(error !== undefined ? { error } : {}), digest, size, fetchedSize, fetchedPercent });
  let json = render(lastError);
  // An error too long to fit is shortened; JSON escapes can lengthen it, so shorten until it fits.
  for (let keep = 512; Buffer.byteLength(json) > STATUS_FILE_BYTES - 1 && lastError !== undefined && keep > 0; keep -= 128) {
    json = render(`${lastError.slice(0, keep)}…`);
  }
  return json + ' '.repeat(Math.max(0, STATUS_FILE_BYTES - 1 - Buffer.byteLength(json))) + '\n';
}
