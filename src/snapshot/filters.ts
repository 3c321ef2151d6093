/**
 * containerd's filter syntax (containerd filters/ package), used by List/Walk. containerd itself sends
 * `labels."containerd.io/snapshot.ref"==<chainID>,parent==<parent>` after a remote Prepare answered
 * AlreadyExists, so this must behave exactly like the Go parser, error texts and byte positions included.
 *
 * Grammar (from filters/parser.go):
 *   selectors := selector ("," selector)*
 *   selector  := fieldpath (operator value)
 *   fieldpath := field ('.' field)*
 *   field     := quoted | [A-Za-z] [A-Za-z0-9_]+
 *   operator  := "==" | "!=" | "~="
 *   value     := quoted | [^\s,]+
 *   quoted    := <go string syntax>, plus /.../ and |...| after ~=
 *
 * The scanner works on the UTF-8 bytes of the input, as Go does, so positions in errors are byte
 * offsets and match containerd's messages.
 */
import { InvalidArgumentError } from '../errors';

/** Maps a field path to the value of one object; `present` false when the field is absent. */
export type FieldAdaptor = (fieldpath: readonly string[]) => { value: string; present: boolean };

export interface Filter {
  match(adaptor: FieldAdaptor): boolean;
}

/** Thrown for syntax errors; the message is the same text containerd produces. */
export class FilterSyntaxError extends InvalidArgumentError {
  /** Byte offset in the input the parser complained about. */
  readonly position: number;
  constructor(message: string, position: number) {
    super(message);
    this.position = position;
  }
}

// Token kinds are negative so that they never collide with a rune (a code point >= 0).
export const TOKEN_EOF = -1;
export const TOKEN_QUOTED = -2;
export const TOKEN_VALUE = -3;
export const TOKEN_FIELD = -4;
export const TOKEN_SEPARATOR = -5;
export const TOKEN_OPERATOR = -6;
export const TOKEN_ILLEGAL = -7;

const RUNE_ERROR = 0xfffd;
const CH_NEWLINE = 0x0a;
const CH_BACKSLASH = 0x5c;

export type Operator = 'present' | '==' | '!=' | '~=';

/** Decodes one rune of `buf` at `i` the way Go's utf8.DecodeRuneInString does. */
function decodeRune(buf: Buffer, i: number): { rune: number; width: number } {
  if (i >= buf.length) return { rune: RUNE_ERROR, width: 0 };
  const b0 = buf[i]!;
  if (b0 < 0x80) return { rune: b0, width: 1 };
  const need = b0 >= 0xf0 && b0 <= 0xf4 ? 4 : b0 >= 0xe0 ? 3 : b0 >= 0xc2 && b0 < 0xe0 ? 2 : 0;
  if (need === 0 || i + need > buf.length) return { rune: RUNE_ERROR, width: 1 };
  let r = b0 & (need === 2 ? 0x1f : need === 3 ? 0x0f : 0x07);
  for (let k = 1; k < need; k++) {
    const b = buf[i + k]!;
    if ((b & 0xc0) !== 0x80) return { rune: RUNE_ERROR, width: 1 };
    r = (r << 6) | (b & 0x3f);
  }
  const min = need === 2 ? 0x80 : need === 3 ? 0x800 : 0x10000;
  if (r < min || r > 0x10ffff || (r >= 0xd800 && r <= 0xdfff)) return { rune: RUNE_ERROR, width: 1 };
  return { rune: r, width: need };
}

/** Go's unicode.IsSpace. */
function isSpaceRune(r: number): boolean {
  if (r <= 0xff) return r === 0x20 || (r >= 0x09 && r <= 0x0d) || r === 0x85 || r === 0xa0;
  return /\p{White_Space}/u.test(String.fromCodePoint(r));
}

function isAlphaRune(r: number): boolean {
  return (r >= 0x41 && r <= 0x5a) || (r >= 0x61 && r <= 0x7a);
}

function isDigitRune(r: number): boolean {
  return r >= 0x30 && r <= 0x39;
}

function isFieldRune(r: number): boolean {
  return r === 0x5f || isAlphaRune(r) || isDigitRune(r);
}

function isOperatorRune(r: number): boolean {
  return r === 0x3d || r === 0x21 || r === 0x7e; // = ! ~
}

function isQuoteRune(r: number): boolean {
  return r === 0x2f || r === 0x7c || r === 0x22; // / | "
}

function isSeparatorRune(r: number): boolean {
  return r === 0x2c || r === 0x2e; // , .
}

/** Go: r != ',' && !IsSpace(r) && (IsLetter || IsDigit || IsNumber || IsGraphic || IsPunct). */
const GRAPHIC_RE = /[\p{L}\p{M}\p{N}\p{P}\p{S}\p{Zs}]/u;
function isValueRune(r: number): boolean {
  if (r < 0 || r === 0x2c || isSpaceRune(r)) return false;
  return GRAPHIC_RE.test(String.fromCodePoint(r));
}

function digitVal(ch: number): number {
  if (ch >= 0x30 && ch <= 0x39) return ch - 0x30;
  if (ch >= 0x61 && ch <= 0x66) return ch - 0x61 + 10;
  if (ch >= 0x41 && ch <= 0x46) return ch - 0x41 + 10;
  return 16; // larger than any legal digit value
}

export interface ScannedToken {
  pos: number;
  token: number;
  text: string;
}

/** A port of filters/scanner.go: same state machine, same positions. */
export class FilterScanner {
  private input: Buffer = Buffer.alloc(0);
  private pos = 0;
  /** Bounds the current rune. */
  private ppos = 0;
  /** True right after an operator: the next bare word is a value, not a field. */
  private value = false;
  /** First error met; sticky, as in Go. */
  err = '';

  init(input: string | Buffer): void {
    this.input = typeof input === 'string' ? Buffer.from(input, 'utf8') : input;
    this.pos = 0;
    this.ppos = 0;
    this.value = false;
    this.err = '';
  }

  /** Byte offset just past the current rune (the parser reports some errors there). */
  get nextPos(): number {
    return this.ppos;
  }

  get bytes(): Buffer {
    return this.input;
  }

  private next(): number {
    if (this.pos >= this.input.length) return TOKEN_EOF;
    this.pos = this.ppos;
    const { rune, width } = decodeRune(this.input, this.ppos);
    this.ppos += width;
    if (rune === RUNE_ERROR) {
      if (width > 0) {
        this.error('rune error');
        return TOKEN_ILLEGAL;
      }
      return TOKEN_EOF;
    }
    if (rune === 0) {
      this.error('unexpected null');
      return TOKEN_ILLEGAL;
    }
    return rune;
  }

  peek(): number {
    const pos = this.pos;
    const ppos = this.ppos;
    const ch = this.next();
    this.pos = pos;
    this.ppos = ppos;
    return ch;
  }

  scan(): ScannedToken {
    let ch = this.next();
    let pos = this.pos;
    for (;;) {
      if (ch === TOKEN_EOF || ch === TOKEN_ILLEGAL) break;
      if (isQuoteRune(ch)) {
        if (!this.scanQuoted(ch)) return { pos, token: TOKEN_ILLEGAL, text: this.slice(pos, this.ppos) };
        return { pos, token: TOKEN_QUOTED, text: this.slice(pos, this.ppos) };
      }
      if (isSeparatorRune(ch)) {
        this.value = false;
        return { pos, token: TOKEN_SEPARATOR, text: this.slice(pos, this.ppos) };
      }
      if (isOperatorRune(ch)) {
        this.scanOperator();
        this.value = true;
        return { pos, token: TOKEN_OPERATOR, text: this.slice(pos, this.ppos) };
      }
      if (isSpaceRune(ch)) {
        ch = this.next();
        pos = this.pos;
        continue;
      }
      if (this.value) {
        this.scanValue();
        this.value = false;
        return { pos, token: TOKEN_VALUE, text: this.slice(pos, this.ppos) };
      }
      if (isFieldRune(ch)) {
        this.scanField();
        return { pos, token: TOKEN_FIELD, text: this.slice(pos, this.ppos) };
      }
      break;
    }
    return { pos: this.pos, token: ch, text: '' };
  }

  slice(from: number, to: number): string {
    return this.input.subarray(from, to).toString('utf8');
  }

  private scanField(): void {
    while (isFieldRune(this.peek())) this.next();
  }

  private scanOperator(): void {
    while (isOperatorRune(this.peek())) this.next();
  }

  private scanValue(): void {
    while (isValueRune(this.peek())) this.next();
  }

  private scanQuoted(quote: number): boolean {
    let illegal = false;
    let ch = this.next(); // the character after the opening quote
    while (ch !== quote) {
      if (ch === CH_NEWLINE || ch < 0) {
        this.error('quoted literal not terminated');
        return false;
      }
      if (ch === CH_BACKSLASH) {
        const r = this.scanEscape(quote);
        ch = r.ch;
        if (!r.legal) illegal = true;
      } else {
        ch = this.next();
      }
    }
    return !illegal;
  }

  private scanEscape(quote: number): { ch: number; legal: boolean } {
    const ch = this.next(); // the character after the backslash
    switch (ch) {
      case 0x61: // a
      case 0x62: // b
      case 0x66: // f
      case 0x6e: // n
      case 0x72: // r
      case 0x74: // t
      case 0x76: // v
      case CH_BACKSLASH:
        return { ch: this.next(), legal: true };
      case 0x78: // x
        return this.scanDigits(this.next(), 16, 2);
      case 0x75: // u
        return this.scanDigits(this.next(), 16, 4);
      case 0x55: // U
        return this.scanDigits(this.next(), 16, 8);
      default:
        if (ch === quote) return { ch: this.next(), legal: true };
        if (ch >= 0x30 && ch <= 0x37) return this.scanDigits(ch, 8, 3);
        this.error('illegal escape sequence');
        return { ch, legal: false };
    }
  }

  private scanDigits(first: number, base: number, count: number): { ch: number; legal: boolean } {
    let ch = first;
    let n = count;
    while (n > 0 && digitVal(ch) < base) {
      ch = this.next();
      n--;
    }
    if (n > 0) {
      this.error('illegal numeric escape sequence');
      return { ch, legal: false };
    }
    return { ch, legal: true };
  }

  private error(msg: string): void {
    if (this.err === '') this.err = msg;
  }
}

/** filters/quote.go unquote: Go string-literal syntax, with `/` and `|` accepted as double quotes. */
export function unquote(s: string): string {
  const buf = Buffer.from(s, 'utf8');
  const n = buf.length;
  if (n < 2) throw new Error('quote syntax error');
  const quote = buf[0]!;
  if (quote !== buf[n - 1]) throw new Error('quote syntax error');
  const body = buf.subarray(1, n - 1);
  if (quote === 0x60) {
    // backquote: raw, minus carriage returns
    if (body.includes(0x60)) throw new Error('quote syntax error');
    return Buffer.from(body.filter((b) => b !== 0x0d)).toString('utf8');
  }
  if (quote !== 0x22 && quote !== 0x27 && quote !== 0x7c && quote !== 0x2f) throw new Error('quote syntax error');
  if (body.includes(CH_NEWLINE)) throw new Error('quote syntax error');
  if (!body.includes(CH_BACKSLASH) && !body.includes(quote)) {
    if (quote !== 0x27) return body.toString('utf8');
    const r = decodeRune(body, 0);
    if (r.width === body.length && (r.rune !== RUNE_ERROR || r.width !== 1)) return body.toString('utf8');
  }
  const out: number[] = [];
  let i = 0;
  while (i < body.length) {
    const c = body[i]!;
    if (c === quote) throw new Error('quote syntax error');
    if (c !== CH_BACKSLASH) {
      out.push(c);
      i++;
    } else {
      if (i + 1 >= body.length) throw new Error('quote syntax error');
      const e = body[i + 1]!;
      i += 2;
      const simple: Record<number, number> = { 0x61: 7, 0x62: 8, 0x66: 12, 0x6e: 10, 0x72: 13, 0x74: 9, 0x76: 11 };
      if (simple[e] !== undefined) {
        out.push(simple[e]);
      } else if (e === 0x78 || e === 0x75 || e === 0x55) {
        const digits = e === 0x78 ? 2 : e === 0x75 ? 4 : 8;
        if (i + digits > body.length) throw new Error('quote syntax error');
        let v = 0;
        for (let j = 0; j < digits; j++) {
          const d = digitVal(body[i + j]!);
          if (d >= 16) throw new Error('quote syntax error');
          v = v * 16 + d;
        }
        i += digits;
        if (e === 0x78) {
          out.push(v); // a single byte, possibly not UTF-8, as in Go
        } else {
          if (v > 0x10ffff) throw new Error('quote syntax error');
          out.push(...Buffer.from(String.fromCodePoint(v), 'utf8'));
        }
      } else if (e >= 0x30 && e <= 0x37) {
        if (i + 2 > body.length) throw new Error('quote syntax error');
        let v = e - 0x30;
        for (let j = 0; j < 2; j++) {
          const x = body[i + j]! - 0x30;
          if (x < 0 || x > 7) throw new Error('quote syntax error');
          v = (v << 3) | x;
        }
        i += 2;
        if (v > 255) throw new Error('quote syntax error');
        out.push(v);
      } else if (e === CH_BACKSLASH) {
        out.push(CH_BACKSLASH);
      } else if (e === 0x27 || e === 0x22 || e === 0x7c || e === 0x2f) {
        if (e !== quote) throw new Error('quote syntax error');
        out.push(e);
      } else {
        throw new Error('quote syntax error');
      }
    }
    if (quote === 0x27 && i < body.length) throw new Error('quote syntax error');
  }
  return Buffer.from(out).toString('utf8');
}

/** Compiles a Go (RE2) pattern as a JS RegExp; undefined when JS cannot express it. */
function compileRegexp(pattern: string): RegExp | undefined {
  try {
    return new RegExp(pattern, 'u');
  } catch {
    try {
      // Without the u flag JS accepts more identity escapes (`\"`), which RE2 also accepts.
      return new RegExp(pattern);
    } catch {
      return undefined;
    }
  }
}

/** One `<fieldpath><op><value>` term. */
export class Selector implements Filter {
  readonly fieldpath: readonly string[];
  readonly operator: Operator;
  readonly value: string;
  /** Compiled once per filter, like the Go selector caches its regexp; null = tried and failed. */
  private re: RegExp | null | undefined;

  constructor(fieldpath: readonly string[], operator: Operator, value: string) {
    this.fieldpath = fieldpath;
    this.operator = operator;
    this.value = value;
  }

  match(adaptor: FieldAdaptor): boolean {
    const { value, present } = adaptor(this.fieldpath);
    switch (this.operator) {
      case 'present':
        return present;
      case '==':
        return present && value === this.value;
      case '!=':
        return value !== this.value;
      case '~=': {
        if (this.re === undefined) this.re = compileRegexp(this.value) ?? null;
        // containerd logs and answers "no match" for a pattern that does not compile.
        return this.re !== null && this.re.test(value);
      }
    }
  }
}

export class AllFilter implements Filter {
  constructor(readonly filters: readonly Filter[]) {}
  match(adaptor: FieldAdaptor): boolean {
    return this.filters.every((f) => f.match(adaptor));
  }
}

export class AnyFilter implements Filter {
  constructor(readonly filters: readonly Filter[]) {}
  match(adaptor: FieldAdaptor): boolean {
    return this.filters.some((f) => f.match(adaptor));
  }
}

export const ALWAYS: Filter = { match: () => true };

/** A port of filters/parser.go. */
class Parser {
  private readonly scanner = new FilterScanner();
  constructor(private readonly input: string) {}

  parse(): Filter {
    this.scanner.init(this.input);
    return this.selectors();
  }

  private selectors(): Filter {
    const ss: Filter[] = [this.selector()];
    for (;;) {
      const tok = this.scanner.peek();
      if (tok === 0x2c) {
        const t = this.scanner.scan();
        if (t.token !== TOKEN_SEPARATOR) throw this.mkerr(t.pos, 'expected a separator');
        ss.push(this.selector());
      } else if (tok === TOKEN_EOF) {
        break;
      } else {
        throw this.mkerr(this.scanner.nextPos, `unexpected input: ${tok >= 0 ? String.fromCodePoint(tok) : '\ufffd'}`);
      }
    }
    return new AllFilter(ss);
  }

  private selector(): Selector {
    const fieldpath = this.fieldpath();
    const next = this.scanner.peek();
    if (next === 0x2c || next === TOKEN_SEPARATOR || next === TOKEN_EOF) {
      return new Selector(fieldpath, 'present', '');
    }
    const op = this.operator();
    const value = this.value(op === '~=');
    return new Selector(fieldpath, op, value);
  }

  private fieldpath(): string[] {
    const fs = [this.field()];
    while (this.scanner.peek() === 0x2e) {
      const t = this.scanner.scan(); // consume the separator
      if (t.token !== TOKEN_SEPARATOR) throw this.mkerr(t.pos, 'expected a field separator (`.`)');
      fs.push(this.field());
    }
    return fs;
  }

  private field(): string {
    const t = this.scanner.scan();
    switch (t.token) {
      case TOKEN_FIELD:
        return t.text;
      case TOKEN_QUOTED:
        return this.unquote(t.pos, t.text, false);
      case TOKEN_ILLEGAL:
        throw this.mkerr(t.pos, this.scanner.err);
    }
    throw this.mkerr(t.pos, 'expected field or quoted');
  }

  private operator(): Operator {
    const t = this.scanner.scan();
    switch (t.token) {
      case TOKEN_OPERATOR:
        if (t.text === '==' || t.text === '!=' || t.text === '~=') return t.text;
        throw this.mkerr(t.pos, `unsupported operator ${JSON.stringify(t.text)}`);
      case TOKEN_ILLEGAL:
        throw this.mkerr(t.pos, this.scanner.err);
    }
    throw this.mkerr(t.pos, 'expected an operator ("=="|"!="|"~=")');
  }

  private value(allowAltQuotes: boolean): string {
    const t = this.scanner.scan();
    switch (t.token) {
      case TOKEN_VALUE:
      case TOKEN_FIELD:
        return t.text;
      case TOKEN_QUOTED:
        return this.unquote(t.pos, t.text, allowAltQuotes);
      case TOKEN_ILLEGAL:
        throw this.mkerr(t.pos, this.scanner.err);
    }
    throw this.mkerr(t.pos, 'expected value or quoted');
  }

  private unquote(pos: number, s: string, allowAlts: boolean): string {
    if (!allowAlts && s[0] !== "'" && s[0] !== '"') throw this.mkerr(pos, 'invalid quote encountered');
    try {
      return unquote(s);
    } catch (err) {
      throw this.mkerr(pos, `unquoting failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  private mkerr(pos: number, msg: string): FilterSyntaxError {
    const bytes = this.scanner.bytes;
    let where: string;
    if (pos < bytes.length) {
      const before = bytes.subarray(0, pos).toString('utf8');
      const location = bytes.subarray(pos, pos + 1).toString('utf8');
      const after = bytes.subarray(pos + 1).toString('utf8');
      where = `[${before} >|${location}|< ${after}]`;
    } else {
      where = `[${this.input}]`;
    }
    return new FilterSyntaxError(`filters: parse error: ${where}: ${msg}`, pos);
  }
}

/** Parses one filter string (selectors joined by `,`, all must match). The empty string matches all. */
export function parseFilter(s: string): Filter {
  if (s === '') return ALWAYS;
  return new Parser(s).parse();
}

/** Parses several filter strings; an object matches when any of them matches. None = match all. */
export function parseFilters(ss: readonly string[]): Filter {
  if (ss.length === 0) return ALWAYS;
  return new AnyFilter(ss.map(parseFilter));
}
