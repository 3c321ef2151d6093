/**
 * TOC entry names are tar paths: they may start with `./` or `/` and dirs may end with `/`. Readers
 * key everything by the cleaned path relative to the layer root ("" is the root itself).
 */

/**
 * Cleans a tar path to the root-relative form, or returns undefined when the name is unsafe: it holds
 * a NUL byte or a `..` component (which could only mean escaping the layer root).
 */
export function normalizeEntryName(raw: string): string | undefined {
  // Fast path: writers prefix every name with `./` and end directories with `/`; past those, most names are
  // already clean and need no splitting.
  const start = raw.startsWith('./') ? 2 : 0;
  const end = raw.length > start && raw.charCodeAt(raw.length - 1) === SLASH ? raw.length - 1 : raw.length;
  const core = start === 0 && end === raw.length ? raw : raw.slice(start, end);
  if (isClean(core)) return core;
  if (raw.includes('\0')) return undefined;
  const parts: string[] = [];
  for (const part of raw.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') return undefined;
    parts.push(part);
  }
  return parts.join('/');
}

/** The cleaned parent of a cleaned name ("" for top-level names and the root). */
export function parentName(name: string): string {
  const i = name.lastIndexOf('/');
  return i < 0 ? '' : name.slice(0, i);
}

/** The last component of a cleaned name. */
export function baseName(name: string): string {
  return name.slice(name.lastIndexOf('/') + 1);
}

const SLASH = 0x2f;
const DOT = 0x2e;

/**
 * True when `name` is already in cleaned form: no NUL, no empty, `.` or `..` component, no leading or
 * trailing slash. One pass without allocating, for the common case (a TOC's names are mostly clean but for
 * a `./` prefix on some writers); anything else takes the splitting path.
 */
function isClean(name: string): boolean {
  const n = name.length;
  let start = 0; // start of the current component
  for (let i = 0; i <= n; i++) {
    const c = i < n ? name.charCodeAt(i) : SLASH;
    if (c === 0) return false;
    if (c !== SLASH) continue;
    const len = i - start;
    if (len === 0) return n === 0; // "" is the clean root; an empty component is not clean
    if (name.charCodeAt(start) === DOT && (len === 1 || (len === 2 && name.charCodeAt(start + 1) === DOT))) return false;
    start = i + 1;
  }
  return true;
}
