/**
 * Extra request headers as both config files write them: a TOML table `name = "value"` or `name = ["values"]`
 * (hosts.toml `header`, the daemon config's mirror `header`). One normaliser, so both files accept and refuse
 * the same things and give endpoints the same shape: lower-case names, every value a list.
 */

/** An HTTP token (RFC 9110 field-name); anything else is not a header name. */
const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
/** CR, LF and the other controls (tab aside) would split or corrupt the request's header block. */
// eslint-disable-next-line no-control-regex -- matching control characters is this regex's whole job: values holding them are refused
const CONTROL_CHAR = /[\u0000-\u0008\u000a-\u001f\u007f]/;

/**
 * Reads a header table. `fail(name, why)` builds the caller's error: `name` is the header as written, or
 * undefined when the table itself is wrong. Problems are refused here, at load, rather than by undici on
 * every request.
 */
export function parseHeaderTable(value: unknown, fail: (name: string | undefined, why: string) => Error): Record<string, string[]> {
  if (typeof value !== 'object' || value === null || Array.isArray(value) || value instanceof Date) {
    throw fail(undefined, 'must be a table of name = "value" or name = ["values"]');
  }
  const headers: Record<string, string[]> = {};
  for (const [name, raw] of Object.entries(value as Record<string, unknown>)) {
    if (!HEADER_NAME.test(name)) throw fail(name, 'is not a valid header name');
    const values = typeof raw === 'string' ? [raw] : raw;
    if (!Array.isArray(values) || !values.every((v): v is string => typeof v === 'string')) {
      throw fail(name, 'must be a string or an array of strings');
    }
    if (values.some((v) => CONTROL_CHAR.test(v))) throw fail(name, 'holds a control character');
    headers[name.toLowerCase()] = values;
  }
  return headers;
}
