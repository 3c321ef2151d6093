/**
 * TOC entry names are tar paths: they may start with `./` or `/` and dirs may end with `/`. Readers
 * key everything by the cleaned path relative to the layer root ("" is the root itself).
 */

/**
 * Cleans a tar path to the root-relative form, or returns undefined when the name is unsafe: it holds
 * a NUL byte or a `..` component (which could only mean escaping the layer root).
 */
export function normalizeEntryName(raw: string): string | undefined {
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
