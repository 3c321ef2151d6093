/**
 * The filter parser against containerd's own tables: filters/scanner_test.go (token stream with byte
 * positions and errors) and filters/filter_test.go (corpus matching and exact error strings), plus the
 * snapshot adaptor and the filters containerd and its testsuite send.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { InvalidArgumentError } from '../../../src/errors';
import {
  FilterScanner,
  FilterSyntaxError,
  parseFilter,
  parseFilters,
  TOKEN_EOF,
  TOKEN_FIELD,
  TOKEN_ILLEGAL,
  TOKEN_OPERATOR,
  TOKEN_QUOTED,
  TOKEN_SEPARATOR,
  TOKEN_VALUE,
  type FieldAdaptor,
} from '../../../src/snapshot/filters';
import { snapshotFieldAdaptor, type SnapshotInfo } from '../../../src/snapshot/snapshot-info';

interface Tok {
  pos: number;
  token: number;
  text?: string;
  err?: string;
}

const F = TOKEN_FIELD;
const O = TOKEN_OPERATOR;
const V = TOKEN_VALUE;
const S = TOKEN_SEPARATOR;
const Q = TOKEN_QUOTED;
const I = TOKEN_ILLEGAL;
const E = TOKEN_EOF;

const SCANNER_CASES: { name: string; input: string; expected: Tok[] }[] = [
  { name: 'Field', input: 'name', expected: [{ pos: 0, token: F, text: 'name' }, { pos: 4, token: E }] },
  {
    name: 'SelectorsWithOperators',
    input: 'name==value,foo!=bar',
    expected: [
      { pos: 0, token: F, text: 'name' },
      { pos: 4, token: O, text: '==' },
      { pos: 6, token: V, text: 'value' },
      { pos: 11, token: S, text: ',' },
      { pos: 12, token: F, text: 'foo' },
      { pos: 15, token: O, text: '!=' },
      { pos: 17, token: V, text: 'bar' },
      { pos: 20, token: E },
    ],
  },
  {
    name: 'SelectorsWithFieldPaths',
    input: 'name==value,labels.foo=value,other.bar~=match',
    expected: [
      { pos: 0, token: F, text: 'name' },
      { pos: 4, token: O, text: '==' },
      { pos: 6, token: V, text: 'value' },
      { pos: 11, token: S, text: ',' },
      { pos: 12, token: F, text: 'labels' },
      { pos: 18, token: S, text: '.' },
      { pos: 19, token: F, text: 'foo' },
      { pos: 22, token: O, text: '=' },
      { pos: 23, token: V, text: 'value' },
      { pos: 28, token: S, text: ',' },
      { pos: 29, token: F, text: 'other' },
      { pos: 34, token: S, text: '.' },
      { pos: 35, token: F, text: 'bar' },
      { pos: 38, token: O, text: '~=' },
      { pos: 40, token: V, text: 'match' },
      { pos: 45, token: E },
    ],
  },
  {
    name: 'RegexpValue',
    input: 'name~=[abc]+,foo=test',
    expected: [
      { pos: 0, token: F, text: 'name' },
      { pos: 4, token: O, text: '~=' },
      { pos: 6, token: V, text: '[abc]+' },
      { pos: 12, token: S, text: ',' },
      { pos: 13, token: F, text: 'foo' },
      { pos: 16, token: O, text: '=' },
      { pos: 17, token: V, text: 'test' },
      { pos: 21, token: E },
    ],
  },
  {
    name: 'RegexpEscapedValue',
    input: 'name~=[abc]\\+,foo=test',
    expected: [
      { pos: 0, token: F, text: 'name' },
      { pos: 4, token: O, text: '~=' },
      { pos: 6, token: V, text: '[abc]\\+' },
      { pos: 13, token: S, text: ',' },
      { pos: 14, token: F, text: 'foo' },
      { pos: 17, token: O, text: '=' },
      { pos: 18, token: V, text: 'test' },
      { pos: 22, token: E },
    ],
  },
  {
    name: 'RegexpQuotedValue',
    input: 'name~=/[abc]{0,2}/,foo=test',
    expected: [
      { pos: 0, token: F, text: 'name' },
      { pos: 4, token: O, text: '~=' },
      { pos: 6, token: Q, text: '/[abc]{0,2}/' },
      { pos: 18, token: S, text: ',' },
      { pos: 19, token: F, text: 'foo' },
      { pos: 22, token: O, text: '=' },
      { pos: 23, token: V, text: 'test' },
      { pos: 27, token: E },
    ],
  },
  {
    name: 'Cowsay',
    input: 'name~=牛,labels.moo=true',
    expected: [
      { pos: 0, token: F, text: 'name' },
      { pos: 4, token: O, text: '~=' },
      { pos: 6, token: V, text: '牛' },
      { pos: 9, token: S, text: ',' },
      { pos: 10, token: F, text: 'labels' },
      { pos: 16, token: S, text: '.' },
      { pos: 17, token: F, text: 'moo' },
      { pos: 20, token: O, text: '=' },
      { pos: 21, token: V, text: 'true' },
      { pos: 25, token: E },
    ],
  },
  {
    name: 'CowsayRegexpQuoted',
    input: 'name~=|牛|,labels.moo=true',
    expected: [
      { pos: 0, token: F, text: 'name' },
      { pos: 4, token: O, text: '~=' },
      { pos: 6, token: Q, text: '|牛|' },
      { pos: 11, token: S, text: ',' },
      { pos: 12, token: F, text: 'labels' },
      { pos: 18, token: S, text: '.' },
      { pos: 19, token: F, text: 'moo' },
      { pos: 22, token: O, text: '=' },
      { pos: 23, token: V, text: 'true' },
      { pos: 27, token: E },
    ],
  },
  {
    name: 'Escapes',
    input: 'name~="asdf\\n\\tfooo"',
    expected: [
      { pos: 0, token: F, text: 'name' },
      { pos: 4, token: O, text: '~=' },
      { pos: 6, token: Q, text: '"asdf\\n\\tfooo"' },
      { pos: 20, token: E },
    ],
  },
  {
    name: 'NullInput',
    input: 'foo\x00bar',
    expected: [
      { pos: 0, token: F, text: 'foo' },
      { pos: 3, token: I, err: 'unexpected null' },
      { pos: 4, token: F, text: 'bar' },
      { pos: 7, token: E },
    ],
  },
  {
    name: 'SpacesChomped',
    input: 'foo = bar    ',
    expected: [
      { pos: 0, token: F, text: 'foo' },
      { pos: 4, token: O, text: '=' },
      { pos: 6, token: V, text: 'bar' },
      { pos: 13, token: E },
    ],
  },
  {
    name: 'ValuesPunctauted',
    input: 'compound.labels==punctuated_value.foo-bar',
    expected: [
      { pos: 0, token: F, text: 'compound' },
      { pos: 8, token: S, text: '.' },
      { pos: 9, token: F, text: 'labels' },
      { pos: 15, token: O, text: '==' },
      { pos: 17, token: V, text: 'punctuated_value.foo-bar' },
      { pos: 41, token: E },
    ],
  },
  {
    name: 'PartialInput',
    input: 'interrupted=',
    expected: [
      { pos: 0, token: F, text: 'interrupted' },
      { pos: 11, token: O, text: '=' },
      { pos: 12, token: E },
    ],
  },
  {
    name: 'DoubleValue',
    input: 'doublevalue=value value',
    expected: [
      { pos: 0, token: F, text: 'doublevalue' },
      { pos: 11, token: O, text: '=' },
      { pos: 12, token: V, text: 'value' },
      { pos: 18, token: F, text: 'value' },
      { pos: 23, token: E },
    ],
  },
  {
    name: 'LeadingWithQuoted',
    input: '"leading quote".postquote==value',
    expected: [
      { pos: 0, token: Q, text: '"leading quote"' },
      { pos: 15, token: S, text: '.' },
      { pos: 16, token: F, text: 'postquote' },
      { pos: 25, token: O, text: '==' },
      { pos: 27, token: V, text: 'value' },
      { pos: 32, token: E },
    ],
  },
  {
    name: 'MissingValue',
    input: 'input==,id!=ff',
    expected: [
      { pos: 0, token: F, text: 'input' },
      { pos: 5, token: O, text: '==' },
      { pos: 7, token: S, text: ',' },
      { pos: 8, token: F, text: 'id' },
      { pos: 10, token: O, text: '!=' },
      { pos: 12, token: V, text: 'ff' },
      { pos: 14, token: E },
    ],
  },
  {
    name: 'QuotedRegexp',
    input: 'input~=/foo\\/bar/,id!=ff',
    expected: [
      { pos: 0, token: F, text: 'input' },
      { pos: 5, token: O, text: '~=' },
      { pos: 7, token: Q, text: '/foo\\/bar/' },
      { pos: 17, token: S, text: ',' },
      { pos: 18, token: F, text: 'id' },
      { pos: 20, token: O, text: '!=' },
      { pos: 22, token: V, text: 'ff' },
      { pos: 24, token: E },
    ],
  },
  {
    name: 'QuotedRegexpAlt',
    input: 'input~=|foo/bar|,id!=ff',
    expected: [
      { pos: 0, token: F, text: 'input' },
      { pos: 5, token: O, text: '~=' },
      { pos: 7, token: Q, text: '|foo/bar|' },
      { pos: 16, token: S, text: ',' },
      { pos: 17, token: F, text: 'id' },
      { pos: 19, token: O, text: '!=' },
      { pos: 21, token: V, text: 'ff' },
      { pos: 23, token: E },
    ],
  },
  {
    name: 'IllegalQuoted',
    input: 'labels.containerd.io/key==value',
    expected: [
      { pos: 0, token: F, text: 'labels' },
      { pos: 6, token: S, text: '.' },
      { pos: 7, token: F, text: 'containerd' },
      { pos: 17, token: S, text: '.' },
      { pos: 18, token: F, text: 'io' },
      { pos: 20, token: I, text: '/key==value', err: 'quoted literal not terminated' },
      { pos: 31, token: E },
    ],
  },
  {
    name: 'IllegalQuotedWithNewLine',
    input: 'labels."containerd.io\nkey"==value',
    expected: [
      { pos: 0, token: F, text: 'labels' },
      { pos: 6, token: S, text: '.' },
      { pos: 7, token: I, text: '"containerd.io\n', err: 'quoted literal not terminated' },
      { pos: 22, token: F, text: 'key' },
      { pos: 25, token: I, text: '"==value', err: 'quoted literal not terminated' },
      { pos: 33, token: E },
    ],
  },
  {
    name: 'IllegalEscapeSequence',
    input: 'labels."\\g"',
    expected: [
      { pos: 0, token: F, text: 'labels' },
      { pos: 6, token: S, text: '.' },
      { pos: 7, token: I, text: '"\\g"', err: 'illegal escape sequence' },
      { pos: 11, token: E },
    ],
  },
  {
    name: 'IllegalNumericEscapeSequence',
    input: 'labels."\\xaz"',
    expected: [
      { pos: 0, token: F, text: 'labels' },
      { pos: 6, token: S, text: '.' },
      { pos: 7, token: I, text: '"\\xaz"', err: 'illegal numeric escape sequence' },
      { pos: 13, token: E },
    ],
  },
];

describe('filter scanner (containerd filters/scanner_test.go)', () => {
  for (const tc of SCANNER_CASES) {
    it(tc.name, () => {
      const sc = new FilterScanner();
      sc.init(tc.input);
      const got: Tok[] = [];
      for (let i = 0; i < tc.expected.length + 2; i++) {
        const t = sc.scan();
        const tok: Tok = { pos: t.pos, token: t.token, text: t.text };
        if (t.token === TOKEN_ILLEGAL) tok.err = sc.err;
        got.push(tok);
        if (t.token === TOKEN_EOF) break;
      }
      const want = tc.expected.map((e) => ({ ...e, text: e.text ?? '' }));
      assert.deepEqual(got, want);
      assert.equal(sc.scan().token, TOKEN_EOF, 'must consume all input');
    });
  }
});

interface Entry {
  name: string;
  other?: string;
  labels?: Record<string, string>;
}

const CORPUS: Entry[] = [
  { name: 'foo', labels: { foo: 'true' } },
  { name: 'bar' },
  { name: 'foo', labels: { foo: 'present', 'more complex label': 'present' } },
  { name: 'bar', labels: { bar: 'true' } },
  { name: 'fooer', labels: { 'more complex label with \\ and "': 'present' } },
  { name: 'fooer', labels: { 'more complex label with \\ and ".post': 'present' } },
  { name: 'baz', other: 'too complex, yo' },
  { name: 'bazo', other: 'abc' },
  { name: 'compound', labels: { foo: 'omg_asdf.asdf-qwer' } },
];

/** The adaptor of filter_test.go. */
function adapt(obj: Entry): FieldAdaptor {
  return (fieldpath) => {
    switch (fieldpath[0]) {
      case 'name':
        return { value: obj.name, present: obj.name.length > 0 };
      case 'other':
        return { value: obj.other ?? '', present: (obj.other ?? '').length > 0 };
      case 'labels': {
        const key = fieldpath.slice(1).join('.');
        const labels = obj.labels ?? {};
        return Object.prototype.hasOwnProperty.call(labels, key) ? { value: labels[key]!, present: true } : { value: '', present: false };
      }
    }
    return { value: '', present: false };
  };
}

const FILTER_CASES: { name: string; input: string; expected?: number[]; errString?: string }[] = [
  { name: 'Empty', input: '', expected: [0, 1, 2, 3, 4, 5, 6, 7, 8] },
  { name: 'Present', input: 'name', expected: [0, 1, 2, 3, 4, 5, 6, 7, 8] },
  { name: 'LabelPresent', input: 'labels.foo', expected: [0, 2, 8] },
  { name: 'NameAndLabelPresent', input: 'labels.foo,name', expected: [0, 2, 8] },
  { name: 'LabelValue', input: 'labels.foo==true', expected: [0] },
  { name: 'LabelValuePunctuated', input: 'labels.foo==omg_asdf.asdf-qwer', expected: [8] },
  {
    name: 'LabelValueNoAltQuoting',
    input: 'labels.|foo|==omg_asdf.asdf-qwer',
    errString: 'filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered',
  },
  { name: 'Name', input: 'name==bar', expected: [1, 3] },
  { name: 'NameNotEqual', input: 'name!=bar', expected: [0, 2, 4, 5, 6, 7, 8] },
  { name: 'NameAndLabelPresent2', input: 'name==bar,labels.bar', expected: [3] },
  { name: 'QuotedValue', input: 'other=="too complex, yo"', expected: [6] },
  { name: 'RegexpValue', input: 'other~=[abc]+,name!=foo', expected: [6, 7] },
  { name: 'RegexpQuotedValue', input: 'other~=/[abc]+/,name!=foo', expected: [6, 7] },
  { name: 'RegexpQuotedValue2', input: 'other~=/[abc]{1,2}/,name!=foo', expected: [6, 7] },
  { name: 'RegexpQuotedValueGarbage', input: 'other~=/[abc]{0,1}"\\//,name!=foo', expected: [] },
  { name: 'NameAndLabelValue', input: 'name==bar,labels.bar==true', expected: [3] },
  { name: 'NameAndLabelValueNoMatch', input: 'name==bar,labels.bar==wrong', expected: [] },
  { name: 'LabelQuotedFieldPathPresent', input: 'name==foo,labels."more complex label"', expected: [2] },
  { name: 'LabelQuotedFieldPathPresentWithQuoted', input: 'labels."more complex label with \\\\ and \\""==present', expected: [4] },
  {
    name: 'LabelQuotedFieldPathPresentWithQuotedEmbed',
    input: 'labels."more complex label with \\\\ and \\"".post==present',
    expected: [5],
  },
  {
    name: 'LabelQuotedFieldPathPresentWithQuotedEmbedInvalid',
    input: 'labels.?"more complex label with \\\\ and \\"".post==present',
    errString: 'filters: parse error: [labels. >|?|< "more complex label with \\\\ and \\"".post==present]: expected field or quoted',
  },
  { name: 'TrailingComma', input: 'name==foo,', errString: 'filters: parse error: [name==foo,]: expected field or quoted' },
  { name: 'TrailingFieldSeparator', input: 'labels.', errString: 'filters: parse error: [labels.]: expected field or quoted' },
  {
    name: 'MissingValue',
    input: 'image~=,id?=?fbaq',
    errString: 'filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted',
  },
  {
    name: 'FieldQuotedLiteralNotTerminated',
    input: 'labels.ns/key==value',
    errString: 'filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated',
  },
  {
    name: 'ValueQuotedLiteralNotTerminated',
    input: 'labels.key==/value',
    errString: 'filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated',
  },
];

describe('filter parser and matcher (containerd filters/filter_test.go)', () => {
  for (const tc of FILTER_CASES) {
    it(tc.name, () => {
      if (tc.errString !== undefined) {
        assert.throws(
          () => parseFilter(tc.input),
          (err: unknown) => {
            assert.ok(err instanceof FilterSyntaxError);
            assert.ok(err instanceof InvalidArgumentError, 'syntax errors are InvalidArgument');
            assert.equal(err.code, 'ERR_SNAP_INVALID_ARGUMENT');
            assert.equal(err.message, tc.errString);
            return true;
          },
        );
        return;
      }
      const filter = parseFilter(tc.input);
      const got = CORPUS.flatMap((e, i) => (filter.match(adapt(e)) ? [i] : []));
      assert.deepEqual(got, tc.expected);
    });
  }

  it('reports the byte position of the error', () => {
    try {
      parseFilter('name~=牛,labels.ns/x==y');
      assert.fail('expected a syntax error');
    } catch (err) {
      assert.ok(err instanceof FilterSyntaxError);
      assert.equal(err.position, 19); // 牛 is 3 bytes: positions are UTF-8 byte offsets, as in Go
    }
  });

  it('rejects unknown operators and stray input', () => {
    assert.throws(() => parseFilter('name=foo'), /unsupported operator "="/);
    // As in Go, the lookahead after a selector does not skip blanks.
    assert.throws(() => parseFilter('name==foo bar'), /\[name==foo >\| \|< bar\]: unexpected input: {2}$/);
    assert.throws(() => parseFilter('labels.a b'), /expected an operator/);
    assert.throws(() => parseFilter('name=='), /expected value or quoted/);
  });

  it('unquotes Go escapes in quoted values', () => {
    const f = parseFilter('name=="a\\tb\\u00e9\\x41\\101"');
    assert.ok(f.match(adapt({ name: 'a\tbéAA' })));
  });

  it('a regexp that does not compile matches nothing, like containerd', () => {
    const f = parseFilter('name~=/(unclosed/');
    assert.equal(f.match(adapt({ name: '(unclosed' })), false);
  });
});

describe('parseFilters (several strings are OR)', () => {
  it('matches any filter; none matches all', () => {
    const f = parseFilters(['name==bar', 'name==baz']);
    assert.deepEqual(
      CORPUS.flatMap((e, i) => (f.match(adapt(e)) ? [i] : [])),
      [1, 3, 6],
    );
    assert.ok(parseFilters([]).match(adapt(CORPUS[0]!)));
  });

  it('one bad filter fails the whole list', () => {
    assert.throws(() => parseFilters(['name==bar', 'labels.']), InvalidArgumentError);
  });
});

describe('snapshot field adaptor', () => {
  const info = (over: Partial<SnapshotInfo>): SnapshotInfo => ({
    name: 'n',
    parent: '',
    kind: 'active',
    createdAt: 0n,
    updatedAt: 0n,
    labels: {},
    ...over,
  });
  const match = (filters: string[], i: SnapshotInfo): boolean => parseFilters(filters).match(snapshotFieldAdaptor(i));

  it('matches the filter containerd sends after a remote AlreadyExists', () => {
    const committed = info({
      name: 'sha256:chain',
      parent: 'sha256:parent',
      kind: 'committed',
      labels: { 'containerd.io/snapshot.ref': 'sha256:chain' },
    });
    assert.ok(match(['labels."containerd.io/snapshot.ref"==sha256:chain,parent==sha256:parent'], committed));
    assert.ok(!match(['labels."containerd.io/snapshot.ref"==sha256:chain,parent==sha256:other'], committed));
  });

  it('kind, name, parent (present even when empty), labels', () => {
    const a = info({ name: 'a', kind: 'active', labels: { l: '2' } });
    assert.ok(match(['kind==active'], a));
    assert.ok(!match(['kind==committed'], a));
    assert.ok(match(['parent'], a));
    assert.ok(match(['parent==""'], a));
    assert.ok(!match(['parent!=""'], a));
    assert.ok(match(['labels.l==2'], a));
    assert.ok(match(['labels.l'], a));
    assert.ok(!match(['labels.m'], a));
    assert.ok(match(['name~=^a$'], a));
    assert.ok(!match(['unknown'], a));
  });

  it('a label named __proto__ is just a label', () => {
    const a = info({ labels: JSON.parse('{"__proto__":"x"}') as Record<string, string> });
    assert.ok(match(['labels.__proto__==x'], a));
    assert.ok(!match(['labels.toString'], info({})));
  });
});
