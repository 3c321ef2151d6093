#!/usr/bin/env node
// Test runner: finds the compiled tests and runs them with `node --test`, one file at a time.
//
//   node script/run-tests.mjs [unit|e2e] [--coverage] [extra node --test flags, e.g. --test-name-pattern=foo]
//
// unit: dist/test/unit/**/*.test.js; e2e: dist/test/e2e/**/*.test.js; no argument: unit, then e2e.
// --coverage: the unit suite runs under c8, which reports on src/**/*.ts (through the source maps) and fails
// the run when lines, branches or functions fall below the floor; both are set in package.json's "c8".
// Node 20 does not expand globs, so the files are listed here. A compiled test whose .ts source is
// gone (stale dist/) is skipped. e2e tests need root (containerd, mounts, FUSE): without root they
// are skipped with a message; with root they always run, and fail loudly if something is missing.
// Env: STARGAZE_UNIT_TIMEOUT_MS / STARGAZE_E2E_TIMEOUT_MS override the per-test timeouts.
import { spawn } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const C8_BIN = path.join(REPO_ROOT, 'node_modules', 'c8', 'bin', 'c8.js');
const SUITES = {
  unit: { dir: 'test/unit', timeoutMs: Number(process.env.STARGAZE_UNIT_TIMEOUT_MS ?? 120_000) },
  e2e: { dir: 'test/e2e', timeoutMs: Number(process.env.STARGAZE_E2E_TIMEOUT_MS ?? 900_000) },
};

function findTests(relDir) {
  const root = path.join(REPO_ROOT, 'dist', relDir);
  const found = [];
  const walk = (dir) => {
    let entries;
    try {
      entries = readdirSync(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries.sort((a, b) => a.name.localeCompare(b.name))) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile() && e.name.endsWith('.test.js')) found.push(p);
    }
  };
  walk(root);
  return found.filter((file) => {
    const source = path.join(REPO_ROOT, path.relative(path.join(REPO_ROOT, 'dist'), file)).replace(/\.js$/, '.ts');
    if (existsSync(source)) return true;
    process.stderr.write(`run-tests: skipping ${path.relative(REPO_ROOT, file)} (no ${path.relative(REPO_ROOT, source)}; stale build output)\n`);
    return false;
  });
}

function runNodeTest(files, timeoutMs, extraFlags, coverage) {
  const args = ['--test', '--test-concurrency=1', `--test-timeout=${timeoutMs}`, ...extraFlags, ...files];
  if (!extraFlags.some((f) => f.startsWith('--test-reporter'))) args.splice(1, 0, '--test-reporter=spec');
  // c8 runs node --test as its child (it passes signals on) and collects the coverage of every process below it
  if (coverage) args.unshift(C8_BIN, process.execPath);
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args, { cwd: REPO_ROOT, stdio: 'inherit' });
    // Ctrl-C reaches the whole foreground group already; other signals are passed on so the
    // test processes can run their cleanup hooks
    const forward = (sig) => child.kill(sig);
    const ignore = () => {};
    process.on('SIGTERM', forward);
    process.on('SIGHUP', forward);
    process.on('SIGINT', ignore);
    child.on('close', (code, signal) => {
      process.off('SIGTERM', forward);
      process.off('SIGHUP', forward);
      process.off('SIGINT', ignore);
      resolve(code ?? 128 + (os.constants.signals[signal] ?? 0));
    });
  });
}

async function main() {
  const argv = process.argv.slice(2);
  const which = argv[0] && !argv[0].startsWith('-') ? argv.shift() : undefined;
  const coverage = argv.includes('--coverage');
  if (coverage) argv.splice(argv.indexOf('--coverage'), 1);
  if ((which !== undefined && !(which in SUITES)) || (coverage && which === 'e2e')) {
    process.stderr.write(`usage: node script/run-tests.mjs [unit|e2e] [--coverage (unit only)] [node --test flags]\n`);
    return 2;
  }
  if (coverage && !existsSync(C8_BIN)) {
    process.stderr.write('run-tests: --coverage needs c8 (a devDependency): run `npm ci`\n');
    return 1;
  }
  if (!existsSync(path.join(REPO_ROOT, 'dist'))) {
    process.stderr.write('run-tests: dist/ is missing; run `npm run build` first (npm test does)\n');
    return 1;
  }
  let exitCode = 0;
  for (const name of which ? [which] : Object.keys(SUITES)) {
    const suite = SUITES[name];
    if (name === 'e2e' && process.getuid?.() !== 0) {
      process.stdout.write('run-tests: skipping e2e tests: they need root (containerd, runc, mounts, /dev/fuse)\n');
      continue;
    }
    const files = findTests(suite.dir);
    if (files.length === 0) {
      process.stdout.write(`run-tests: no ${name} tests found under dist/${suite.dir}\n`);
      continue;
    }
    const covered = coverage && name === 'unit';
    process.stdout.write(`run-tests: ${name}: ${files.length} file(s), per-test timeout ${suite.timeoutMs} ms${covered ? ', under coverage (c8)' : ''}\n`);
    const code = await runNodeTest(files, suite.timeoutMs, argv, covered);
    if (code !== 0) exitCode = code;
  }
  return exitCode;
}

process.exitCode = await main();
