/**
 * TOC entry modtimes (RFC 3339 strings) as epoch milliseconds. The parser checks them and the layer tree
 * stores them, both through this one cache: a layer has few distinct modtimes (it is built in seconds),
 * and Date.parse showed in profiles of large TOCs.
 */

/** Past this many distinct strings the cache starts over: bounded memory whatever the TOCs hold. */
const MODTIME_CACHE_MAX = 4096;
const parsed = new Map<string, number>();

/** Milliseconds since the epoch; NaN when `modtime` is not a date Date.parse reads. */
export function modtimeMs(modtime: string): number {
  let ms = parsed.get(modtime);
  if (ms === undefined) {
    ms = Date.parse(modtime);
    if (parsed.size >= MODTIME_CACHE_MAX) parsed.clear();
    parsed.set(modtime, ms);
  }
  return ms;
}
