/**
 * The import level check (`npm run check:deps`, also run by `npm test`): dependency-cruiser over src/, test/ and
 * script/. The rules are generated from LEVELS below, the one table of which part of src/ sits on which level;
 * docs/design.md ("Import levels") shows the same table, and a unit test (test/unit/import-levels.test.ts) keeps
 * the two equal.
 *
 * A part may import anything on a lower level, and nothing on its own level or a higher one, except from within
 * itself. Type-only imports count: an interface ties two parts together as much as a value does.
 */

/**
 * Lowest first. A part is a folder under src/ (`remote`) or a file at the top of src/ (`log.ts`). Where code on
 * one level needs another part of that level, the level is split into ordered sub-levels (0a < 0b < 0c): still
 * one way, still no cycles.
 *   - 0: errors and the other leaf helpers import nothing from src/ (0a); the root logger may use them (0b); the
 *     rest of level 0 may use both (0c: metrics imports log's Logger type, user-namespace the overlayfs xattrs,
 *     json-lines the error classes).
 *   - 2: reader reads metadata's tree types, and task (the scheduler) stays below reader so reads can be
 *     scheduled by it: metadata and task (2a) < reader (2b).
 *   - 8: cli.ts dispatches to cmd/ (8a < 8b).
 */
const LEVELS = [
  { level: '0a', parts: ['errors.ts', 'abortable.ts', 'path-exists.ts', 'overlay-xattr.ts', 'lazy-unmount.ts'], what: 'error classes with codes; leaf helpers' },
  { level: '0b', parts: ['log.ts'], what: 'the pino root logger' },
  { level: '0c', parts: ['config', 'source', 'metrics', 'grpc', 'profile', 'user-namespace.ts', 'json-lines.ts'], what: 'config, snapshot labels, metrics, proto loading, the prefetch profile format, user namespace detection, JSON-lines framing' },
  { level: '1', parts: ['estargz', 'remote', 'cache'], what: 'the format (zstd framing included), registry access, caches' },
  { level: '2a', parts: ['metadata', 'task'], what: 'TOC -> inode tree; the work scheduler' },
  { level: '2b', parts: ['reader'], what: 'verifying chunk reader' },
  { level: '3', parts: ['layer'], what: 'layer lifetime, prefetch, background fetch' },
  { level: '4', parts: ['fuse'], what: 'fuse-native ops over a layer' },
  { level: '5', parts: ['fs'], what: 'FileSystem: mount / check / unmount' },
  { level: '6', parts: ['snapshot', 'image', 'containerd'], what: 'snapshotter semantics, image conversion, containerd client' },
  { level: '7', parts: ['service'], what: 'gRPC binding' },
  { level: '8a', parts: ['cmd'], what: 'the subcommands' },
  { level: '8b', parts: ['cli.ts'], what: 'the stargaze binary' },
];

const escape = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
/** The path regex of a part: a folder and everything under it, or one file. */
const partPath = (part) => (part.endsWith('.ts') ? `^src/${escape(part)}$` : `^src/${escape(part)}/`);

/** One rule per part: it may not import a part on its own level or a higher one. */
const levelRules = LEVELS.flatMap(({ level, parts }, rank) =>
  parts.flatMap((part) => {
    const notBelow = LEVELS.slice(rank).flatMap((l) => l.parts).filter((p) => p !== part);
    if (notBelow.length === 0) return []; // the top part may import every other
    return [
      {
        name: `level-${level}-${part}`,
        comment: `${part} (level ${level}) imports only from lower levels and from within itself: not from ${notBelow.join(', ')}`,
        severity: 'error',
        from: { path: partPath(part) },
        to: { path: notBelow.map(partPath) },
      },
    ];
  }),
);

const ALL_PARTS = LEVELS.flatMap((l) => l.parts).map(partPath);

/** @type {import('dependency-cruiser').IConfiguration} */
module.exports = {
  forbidden: [
    ...levelRules,
    {
      name: 'on-a-level',
      comment: 'every part of src/ has a level: add a new folder or top-level file to LEVELS in .dependency-cruiser.cjs (and docs/design.md)',
      severity: 'error',
      from: { path: '^src/', pathNot: ALL_PARTS },
      to: {},
    },
    {
      name: 'on-a-level-imported',
      comment: 'every part of src/ has a level: add a new folder or top-level file to LEVELS in .dependency-cruiser.cjs (and docs/design.md)',
      severity: 'error',
      from: {},
      to: { path: '^src/', pathNot: ALL_PARTS },
    },
    {
      name: 'no-circular',
      comment: 'no import cycles, within a part either',
      severity: 'error',
      from: {},
      to: { circular: true },
    },
    {
      name: 'src-not-test-or-script',
      comment: 'src/ is the product: it never imports the tests or the scripts (they may import src/)',
      severity: 'error',
      from: { path: '^src/' },
      to: { path: '^(test|script)/' },
    },
    {
      name: 'not-to-unresolvable',
      comment: 'an import that resolves to nothing (a typo, or a package missing from package.json)',
      severity: 'error',
      from: {},
      to: { couldNotResolve: true },
    },
  ],
  options: {
    doNotFollow: { path: 'node_modules' },
    exclude: { path: '^(dist|node_modules)/' },
    tsConfig: { fileName: 'tsconfig.json' },
    // Type-only imports count (see the header), and `import type` vanishes from the compiled JS.
    tsPreCompilationDeps: true,
    enhancedResolveOptions: { exportsFields: ['exports'], conditionNames: ['import', 'require', 'node', 'default', 'types'] },
  },
};

// For test/unit/import-levels.test.ts (not part of dependency-cruiser's schema, so not enumerable).
Object.defineProperty(module.exports, 'levels', { value: LEVELS, enumerable: false });
